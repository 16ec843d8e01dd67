"""The compile step with the shared library cache (no image: mlc_llm compile and the WGSL check are a
fake `python` that records each compile): a second fine-tune of one base reuses the first's library,
another shape or setting compiles, --no-lib-cache compiles, a damaged entry is a miss, an unusable
cache folder never fails a conversion; and how the host gives a container the cache."""

from __future__ import annotations

import json
import threading
import time

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import librarycache
from llm2wasm.host import run as run_module
from llm2wasm.host.batchrun import item_command
from llm2wasm.host.run import ConvertJob, docker_command
from llm2wasm.image.batch.spec import load_spec
from llm2wasm.image.convert.converter import Converter
from llm2wasm.image.convert.inputs import ConvertRequest
from llm2wasm.image.convert.libcache import LibraryCache
from llm2wasm.image.convert.toolchain import Toolchain

TOOLS = {"llm2wasm": "0.1.0", "mlc_llm": "mlc-llm 0.20.0", "tvm": "apache-tvm 0.26.0", "tvm_ffi": "0.1.15",
         "emcc": "3.1.56 (abc)", "web_runtime": "MLC_LLM_COMMIT=aa TVM_COMMIT=bb"}  # fmt: skip
CHAT_CONFIG = {
    "model_type": "llama",
    "quantization": "q4f16_1",
    "model_config": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 300},
    "vocab_size": 300,
    "context_window_size": 256,
    "prefill_chunk_size": 64,
    "conv_template": {"name": "llama-3"},
    "temperature": 0.7,
}


@pytest.fixture
def fake_compile(tmp_path, monkeypatch):
    """A `python` whose `mlc_llm compile` writes a small wasm module (and counts itself) and whose
    WGSL check reports nothing repaired."""
    counter = tmp_path / "compiles"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'after() { w="$1"; shift; p=""; for a in "$@"; do [ "$p" = "$w" ] && echo "$a"; p="$a"; done; }\n'
        'case "$*" in\n'
        f'  *"-m mlc_llm compile"*) echo x >> {counter}; sleep "${{FAKE_COMPILE_SECONDS:-0}}";\n'
        '    printf "\\000asm\\001\\000\\000\\000" > "$(after -o "$@")";\n'
        '    echo "[INFO] Total memory usage without KV cache: 12.50 MB (Parameters: 10.00 MB. '
        'KVCache: 0.00 MB. Temporary buffer: 2.50 MB)";;\n'
        '  *llm2wasm.image.convert.wgsl*) echo \'{"kernels": 3, "repaired": []}\' > "$(after --report "$@")";;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("LLM2WASM_PYTHON", str(fake))
    monkeypatch.setenv("LLM2WASM_LIB_CACHE", str(tmp_path / "libraries"))

    def count() -> int:
        return len(counter.read_text().splitlines()) if counter.exists() else 0

    return count


def converted(tmp_path, name: str, chat_config: dict | None = None, **settings) -> tuple[Converter, dict]:
    """The compile step's action on a workspace whose gen_config made `chat_config`."""
    values = {"quantization": "q4f16_1", "conv_template": "llama-3", "model_id": name, **settings}
    converter = Converter(
        ConvertRequest(model_dir=tmp_path, output=tmp_path / name, **values), toolchain=Toolchain(TOOLS)
    )
    converter.ws.prepare()
    generated = converter.ws.root / "gen_config" / "config"
    generated.mkdir(parents=True)
    (generated / "mlc-chat-config.json").write_text(json.dumps(chat_config or CHAT_CONFIG))
    tmp = converter.ws.temp_dir("compile")
    return converter, {**converter.compile_or_reuse(tmp), "wasm": tmp / f"{name}.wasm"}


def test_a_second_fine_tune_of_the_base_reuses_the_library(tmp_path, fake_compile, capsys):
    # the two fine-tunes' chat configs differ in what a fine-tune changes, not in the shape
    _, first = converted(tmp_path, "tune-a")
    tuned = {**CHAT_CONFIG, "conv_template": {"name": "chatml"}, "temperature": 0.2}
    _, second = converted(tmp_path, "tune-b", tuned)
    assert fake_compile() == 1
    assert first["library_cache"] == {"key": second["library_cache"]["key"], "hit": False}
    assert second["library_cache"]["hit"] is True
    assert second["wasm"].read_bytes() == first["wasm"].read_bytes()
    # what the bundle needs of the compile comes with it: the memory figures and the WGSL result
    assert second["memory"] == first["memory"] and second["memory"]["without_kv_cache_mb"] == 12.5
    assert second["wgsl"] == first["wgsl"] == {"kernels": 3, "repaired": []}
    assert f"reused from the library cache (key {second['library_cache']['key']}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "chat_config, settings",
    [
        ({**CHAT_CONFIG, "context_window_size": 512}, {}),  # another sequence bound
        ({**CHAT_CONFIG, "model_config": {**CHAT_CONFIG["model_config"], "num_hidden_layers": 3}}, {}),
        (CHAT_CONFIG, {"link_opt": "O3"}),  # another compile option
        (CHAT_CONFIG, {"repair_wgsl": False}),
        (CHAT_CONFIG, {"use_lib_cache": False}),  # --no-lib-cache
    ],
)
def test_another_shape_setting_or_no_lib_cache_compiles(tmp_path, fake_compile, chat_config, settings):
    converted(tmp_path, "base")
    _, other = converted(tmp_path, "other", chat_config, **settings)
    assert fake_compile() == 2
    assert other.get("library_cache", {}).get("hit") is not True


def test_a_damaged_entry_is_compiled_again_and_replaced(tmp_path, fake_compile, capsys):
    _, first = converted(tmp_path, "a")
    entry = LibraryCache(tmp_path / "libraries").lookup(first["library_cache"]["key"])
    entry.library.write_bytes(b"\0asm-damaged")
    _, second = converted(tmp_path, "b")
    assert fake_compile() == 2 and second["library_cache"]["hit"] is False
    assert "compiling instead" in capsys.readouterr().err
    assert LibraryCache(tmp_path / "libraries").lookup(first["library_cache"]["key"]) is not None  # refiled


def test_an_unusable_cache_folder_compiles_without_it(tmp_path, fake_compile, monkeypatch, capsys):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("LLM2WASM_LIB_CACHE", str(tmp_path / "not-a-folder"))
    _, result = converted(tmp_path, "a")
    assert fake_compile() == 1 and result["wasm"].read_bytes()[:4] == b"\0asm"
    assert "compiling without it" in capsys.readouterr().err


def test_two_conversions_of_one_base_at_once_compile_once(tmp_path, fake_compile, monkeypatch):
    """Two batch items of one base in their own containers: the second waits for the first's compile
    (a lock in the cache) and reuses it, rather than compiling the same library side by side."""
    monkeypatch.setenv("FAKE_COMPILE_SECONDS", "1")
    results: dict[str, dict] = {}

    def convert(name: str) -> None:
        results[name] = converted(tmp_path, name)[1]

    threads = [threading.Thread(target=convert, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
        time.sleep(0.2)
    for thread in threads:
        thread.join()
    assert fake_compile() == 1
    assert sorted(result["library_cache"]["hit"] for result in results.values()) == [False, True]


# -- the host side ---------------------------------------------------------------------------


def test_the_default_cache_is_in_the_users_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM2WASM_LIB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert librarycache.default_library_cache() == tmp_path / "xdg" / "llm2wasm" / "libraries"
    monkeypatch.setenv("LLM2WASM_LIB_CACHE", str(tmp_path / "mine"))
    assert librarycache.default_library_cache() == tmp_path / "mine"


def test_the_host_makes_the_folder_and_no_lib_cache_gives_none(tmp_path):
    assert librarycache.library_cache_for(None, disabled=True) is None
    folder = librarycache.library_cache_for(str(tmp_path / "a" / "b"), disabled=False)
    assert folder == (tmp_path / "a" / "b").resolve() and folder.is_dir()


def test_a_cache_path_that_is_a_file_is_a_usage_error_naming_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"--lib-cache DIR.*--no-lib-cache"):
        librarycache.library_cache_for(str(tmp_path / "file"), disabled=False)


def test_a_conversion_container_gets_the_cache_read_write_and_named(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module.docker, "image_id", lambda ref: "sha256:x")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    job = ConvertJob(image="img", model_dir=model, output=tmp_path / "o", quantization="q", gpu=False)
    without, _ = docker_command(job)
    assert not any("LLM2WASM_LIB_CACHE" in arg for arg in without)
    job.library_cache = tmp_path / "libraries"
    cmd, _ = docker_command(job)
    head = cmd[: cmd.index("img")]
    assert f"type=bind,source={tmp_path / 'libraries'},target=/cache/libraries" in head
    assert "LLM2WASM_LIB_CACHE=/cache/libraries" in head
    shown = json.loads(next(arg for arg in head if arg.startswith("LLM2WASM_HOST_PATHS=")).split("=", 1)[1])
    assert shown["/cache/libraries"] == str(tmp_path / "libraries")


def test_each_batch_item_gets_the_same_cache(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "models.toml").write_text('[[model]]\npath = "m"\nquantizations = ["q4f16_1"]\n')
    spec = load_spec(tmp_path / "models.toml")
    cmd = item_command(spec, spec.items[0], "img", tmp_path / "out", False, "run", tmp_path / "libraries")
    assert "LLM2WASM_LIB_CACHE=/cache/libraries" in cmd[: cmd.index("img")]


def test_the_size_is_shown_and_emptying_keeps_the_folder(tmp_path, fake_compile):
    converted(tmp_path, "a")
    folder = tmp_path / "libraries"
    assert "0.0 MiB" in librarycache.describe(folder) and "emptied" in librarycache.empty(folder)
    assert folder.is_dir() and [p.name for p in folder.iterdir()] == []
