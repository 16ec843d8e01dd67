"""The WebLLM app config and README, and the memory figures they come from; writing a bundle by
renames only (a crash at any point leaves no app config naming what is not there), regular files
only; what makes a bundle complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.image.convert import bundle
from llm2wasm.image.convert.bundle import (
    bundle_readme,
    incomplete,
    link_or_copy,
    model_record,
    vram_required_mb,
    write_bundle,
)
from llm2wasm.image.convert.inputs import ConvertRequest
from llm2wasm.image.convert.mlc import parse_memory

# web-llm src/config.ts, interface ModelRecord
MODEL_RECORD_FIELDS = {
    "model",
    "model_id",
    "model_lib",
    "overrides",
    "vram_required_MB",
    "low_resource_required",
    "buffer_size_required_bytes",
    "required_features",
    "model_type",
    "integrity",
}

COMPILE_LOG = (
    "[2026-11-25 10:00:00] INFO \x1b[92mTotal memory usage without KV cache:\x1b[0m 879.04 MB "
    "(Parameters: 615.00 MB. Temporary buffer: 264.04 MB)\n"
    "[2026-11-25 10:00:00] INFO \x1b[92mKV cache size:\x1b[0m 0.11 MB per token in the context window\n"
    "[2026-11-25 10:00:00] INFO \x1b[92mTotal memory usage with a 4K KV cache:\x1b[0m 1330.00 MB\n"
)


def req(**overrides) -> ConvertRequest:
    values = {
        "model_dir": Path("/m/tiny"),
        "quantization": "q4f16_1",
        "conv_template": "llama-3",
        "output": Path("/out/tiny-q4f16_1"),
        "model_id": "tiny-q4f16_1",
        "base_url": "https://cdn.example/b/",
    }
    values.update(overrides)
    return ConvertRequest(**values)


def test_parse_memory_strips_colour():
    assert parse_memory(COMPILE_LOG) == {
        "without_kv_cache_mb": 879.04,
        "parameters_mb": 615.0,
        "temporary_buffer_mb": 264.04,
        "kv_cache_mb_per_token": 0.11,
        "with_4k_kv_cache_mb": 1330.0,
    }
    assert parse_memory("nothing here") == {}


def test_vram_from_context_window():
    memory = parse_memory(COMPILE_LOG)
    assert vram_required_mb(memory, 4096) == round(879.04 + 0.11 * 4096, 2)
    assert vram_required_mb({"with_4k_kv_cache_mb": 1330.0}, 4096) == 1330.0
    assert vram_required_mb({}, 4096) is None


def test_model_record_fields():
    record = model_record(req(prefill_chunk_size=1024), {"context_window_size": 4096}, parse_memory(COMPILE_LOG))
    assert set(record) <= MODEL_RECORD_FIELDS
    assert record["model"] == "https://cdn.example/b/model/"
    assert record["model_id"] == "tiny-q4f16_1"
    assert record["model_lib"] == "https://cdn.example/b/lib/tiny-q4f16_1.wasm"
    assert "overrides" not in record  # prefill_chunk_size is compile-time: not a WebLLM ChatOptions field
    assert record["required_features"] == ["shader-f16"]
    assert record["vram_required_MB"] == 1329.6 and record["low_resource_required"] is True


def test_f32_needs_no_shader_f16_and_no_figures_no_vram():
    record = model_record(req(quantization="q4f32_1"), {}, {})
    assert "required_features" not in record and "vram_required_MB" not in record and "overrides" not in record


def test_readme_explains_the_resolve_main_rule():
    text = bundle_readme(req(), Path("model/resolve/main"))
    assert "appends `resolve/main/`" in text and "shader-f16" in text
    assert "python3 -m http.server 8000" in text and "CreateMLCEngine" in text


def test_record_overrides_carry_only_webllm_chat_options():
    request = req(prefill_chunk_size=1024, context_window=2048)
    assert request.overrides() == {"context_window_size": 2048, "prefill_chunk_size": 1024}  # for mlc_llm compile
    record = model_record(request, {"context_window_size": 2048}, {})
    assert record["overrides"] == {"context_window_size": 2048}


# --- writing a bundle -------------------------------------------------------------------------------


def fake_work(
    work: Path, model_id: str, shards: dict[str, bytes] | None = None, wasm: bytes = b"\0asm\1\0\0\0"
) -> Path:
    """The finished steps' outputs write_bundle assembles: configs, weights with their tensor cache, library."""
    shards = {"params_shard_0.bin": b"0" * 16, "params_shard_1.bin": b"1" * 8} if shards is None else shards
    config = work / "gen_config" / "config"
    weights = work / "convert_weight" / "weights"
    for folder in (config, weights, work / "compile"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    (config / "mlc-chat-config.json").write_text(json.dumps({"context_window_size": 2048}))
    (config / "tokenizer.json").write_text("{}")
    records = [{"dataPath": name, "nbytes": len(data), "records": []} for name, data in shards.items()]
    (weights / "tensor-cache.json").write_text(json.dumps({"metadata": {}, "records": records}))
    for name, data in shards.items():
        (weights / name).write_bytes(data)
    (work / "compile" / f"{model_id}.wasm").write_bytes(wasm)
    return work


def bundle_request(
    out: Path, model_id: str = "tiny-q4f16_1", base_url: str = "https://cdn.example/b/"
) -> ConvertRequest:
    return req(output=out, model_id=model_id, base_url=base_url)


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".old")))


def test_write_bundle_lays_out_a_complete_bundle_of_hard_links(tmp_path):
    work, out = fake_work(tmp_path / "work", "tiny-q4f16_1"), tmp_path / "out"
    write_bundle(bundle_request(out), work, {})
    assert incomplete(out, "tiny-q4f16_1") is None
    weights = out / "model" / "resolve" / "main"
    assert sorted(p.name for p in weights.iterdir()) == [
        "mlc-chat-config.json", "params_shard_0.bin", "params_shard_1.bin", "tensor-cache.json", "tokenizer.json"
    ]  # fmt: skip
    source = work / "convert_weight" / "weights" / "params_shard_0.bin"
    assert (weights / "params_shard_0.bin").stat().st_ino == source.stat().st_ino  # no second copy
    assert (out / "lib" / "tiny-q4f16_1.wasm").read_bytes().startswith(b"\0asm")
    assert json.loads((out / "app-config.json").read_text())["model_list"][0]["model_id"] == "tiny-q4f16_1"
    assert "resolve/main" in (out / "README.md").read_text()
    assert leftovers(out) == []
    write_bundle(bundle_request(out), work, {})  # assembled again from the same steps, as a resumed run does
    assert incomplete(out, "tiny-q4f16_1") is None and leftovers(out) == []


def test_write_bundle_copies_where_it_cannot_link(tmp_path, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError("cross-device link")

    monkeypatch.setattr(bundle.os, "link", no_links)
    work, out = fake_work(tmp_path / "work", "tiny-q4f16_1"), tmp_path / "out"
    write_bundle(bundle_request(out), work, {})
    copied = out / "model" / "resolve" / "main" / "params_shard_0.bin"
    source = work / "convert_weight" / "weights" / "params_shard_0.bin"
    assert copied.read_bytes() == source.read_bytes() and copied.stat().st_ino != source.stat().st_ino
    assert incomplete(out, "tiny-q4f16_1") is None


def test_a_new_bundle_replaces_the_old_weights_folder_whole(tmp_path):
    work, out = fake_work(tmp_path / "work", "tiny-q4f16_1"), tmp_path / "out"
    write_bundle(bundle_request(out), work, {})
    fake_work(work, "tiny-q4f16_1", shards={"params_shard_0.bin": b"new" * 4})
    write_bundle(bundle_request(out), work, {})
    weights = out / "model" / "resolve" / "main"
    assert not (weights / "params_shard_1.bin").exists()  # the old bundle's shard is not carried over
    assert (weights / "params_shard_0.bin").read_bytes() == b"new" * 4
    assert incomplete(out, "tiny-q4f16_1") is None and leftovers(out) == []


class Crash(Exception):
    pass


@pytest.fixture
def crash_at_rename(monkeypatch):
    """Make the n-th rename of a file or folder (Path.rename, Path.replace) raise, as a kill would stop
    the process there; returns a function that arms it and reports how many renames ran."""
    calls = {"count": 0, "crash_at": None}

    def wrap(original):
        def renamed(self, target):
            calls["count"] += 1
            if calls["count"] == calls["crash_at"]:
                raise Crash(f"killed at rename {calls['count']}: {self} -> {target}")
            return original(self, target)

        return renamed

    monkeypatch.setattr(Path, "rename", wrap(Path.rename))
    monkeypatch.setattr(Path, "replace", wrap(Path.replace))

    def arm(crash_at: int | None) -> dict:
        calls.update(count=0, crash_at=crash_at)
        return calls

    return arm


def test_a_crash_at_any_rename_never_leaves_an_app_config_naming_what_is_not_there(tmp_path, crash_at_rename):
    model_id = "tiny-q4f16_1"
    work = tmp_path / "work"
    fake_work(work, model_id)
    crash_at_rename(None)
    write_bundle(bundle_request(tmp_path / "count"), work, {})
    counted = crash_at_rename(None)
    write_bundle(bundle_request(tmp_path / "count"), work, {})  # a re-assembly: the old folder is set aside too
    renames = counted["count"]
    assert renames >= 5  # model aside, model in, library, README, app config
    for crash_at in range(1, renames + 1):
        out = tmp_path / f"out-{crash_at}"
        fake_work(work, model_id)
        crash_at_rename(None)
        write_bundle(bundle_request(out), work, {})  # the bundle a second conversion replaces
        fake_work(work, model_id, shards={"params_shard_0.bin": b"v2" * 8})
        crash_at_rename(crash_at)
        with pytest.raises(Crash):
            write_bundle(bundle_request(out), work, {})
        # the app config is the mark of a complete bundle: present only where everything it names is
        if (out / "app-config.json").exists():
            assert incomplete(out, model_id) is None, crash_at
        # and the next run finishes the job from whatever was left
        crash_at_rename(None)
        write_bundle(bundle_request(out), work, {})
        assert incomplete(out, model_id) is None and leftovers(out) == [], crash_at
        assert (out / "model" / "resolve" / "main" / "params_shard_0.bin").read_bytes() == b"v2" * 8


@pytest.mark.parametrize("which", ["weights", "library"])
def test_a_symlink_among_the_step_outputs_is_refused_and_the_bundle_kept(tmp_path, which):
    model_id = "tiny-q4f16_1"
    work, out = fake_work(tmp_path / "work", model_id), tmp_path / "out"
    write_bundle(bundle_request(out), work, {})
    before = (out / "app-config.json").read_text()
    secret = tmp_path / "secret"
    secret.write_bytes(b"\0asm not ours")
    link = work / "convert_weight" / "weights" / "params_shard_1.bin"
    if which == "library":
        link = work / "compile" / f"{model_id}.wasm"
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(UsageError, match="is a symbolic link: a bundle takes only regular files"):
        write_bundle(bundle_request(out), work, {})
    assert (out / "app-config.json").read_text() == before and incomplete(out, model_id) is None
    assert not any(path.read_bytes() == secret.read_bytes() for path in out.rglob("*") if path.is_file())


def test_link_or_copy_takes_regular_files_only_and_never_writes_through_a_link(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(b"weights")
    elsewhere = tmp_path / "elsewhere"
    target = tmp_path / "bundle" / "file"
    target.parent.mkdir()
    target.symlink_to(elsewhere)  # dangling: exists() says no, a copy would follow it
    link_or_copy(source, target)
    assert not target.is_symlink() and target.read_bytes() == b"weights" and not elsewhere.exists()
    with pytest.raises(UsageError, match="not a regular file"):
        link_or_copy(tmp_path / "bundle", tmp_path / "other")


def complete_bundle(tmp_path, model_id: str = "tiny-q4f16_1") -> Path:
    out = tmp_path / "out"
    write_bundle(bundle_request(out, model_id), fake_work(tmp_path / "work", model_id), {})
    return out


WEIGHTS_DIR = Path("model/resolve/main")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda out: (out / "app-config.json").unlink(), "no app-config.json"),
        (lambda out: (out / "app-config.json").write_text("{"), "not a WebLLM app config"),
        (lambda out: (out / "app-config.json").write_text('{"model_list": []}'), "not a WebLLM app config"),
        (
            lambda out: (out / "app-config.json").write_text('{"model_list": [{"model_id": "other"}]}'),
            "names model 'other', not 'tiny-q4f16_1'",
        ),
        (lambda out: (out / "lib" / "tiny-q4f16_1.wasm").unlink(), "lib/tiny-q4f16_1.wasm is missing"),
        (lambda out: (out / "lib" / "tiny-q4f16_1.wasm").write_bytes(b"<html>"), "is not a wasm module"),
        (lambda out: (out / WEIGHTS_DIR / "mlc-chat-config.json").unlink(), "mlc-chat-config.json is missing"),
        (lambda out: (out / WEIGHTS_DIR / "tensor-cache.json").unlink(), "tensor-cache.json is missing"),
        (lambda out: (out / WEIGHTS_DIR / "tensor-cache.json").write_text("[]"), "is not a tensor cache"),
        (lambda out: (out / WEIGHTS_DIR / "params_shard_1.bin").unlink(), "params_shard_1.bin is missing"),
        (lambda out: (out / WEIGHTS_DIR / "params_shard_1.bin").write_bytes(b"1"), "holds 1 bytes"),
        (
            lambda out: (out / WEIGHTS_DIR / "tensor-cache.json").write_text(
                json.dumps({"records": [{"dataPath": "../../../app-config.json"}]})
            ),
            "not a file of its folder",
        ),
        (lambda out: shutil.rmtree(out / "model"), "mlc-chat-config.json is missing"),
    ],
)
def test_incomplete_names_what_a_bundle_lacks(tmp_path, damage, problem):
    out = complete_bundle(tmp_path)
    assert incomplete(out, "tiny-q4f16_1") is None
    damage(out)
    assert problem in incomplete(out, "tiny-q4f16_1")


def test_leftover_temporaries_are_replaced_not_written_through(tmp_path):
    work, out = fake_work(tmp_path / "work", "tiny-q4f16_1"), tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("app-config.json.tmp", "README.md.tmp"):
        (out / name).symlink_to(elsewhere / name)
    (out / "model.tmp").symlink_to(elsewhere)
    write_bundle(bundle_request(out), work, {})
    assert list(elsewhere.iterdir()) == [] and incomplete(out, "tiny-q4f16_1") is None and leftovers(out) == []
