"""The library cache: its key changes with what the library depends on and nothing else, and an entry is
used only when it verifies (a damaged, truncated, edited, linked or planted entry is a miss with a reason)."""

from __future__ import annotations

import copy
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from llm2wasm.image.convert import libcache
from llm2wasm.image.convert.libcache import LIBRARY_FIELDS, NON_LIBRARY_FIELDS, EntryChanged, LibraryCache, library_key

# What `mlc_llm gen_config` writes for a small Llama-shaped model (abridged model_config).
CHAT_CONFIG = {
    "version": "0.1.0",
    "model_type": "llama",
    "quantization": "q4f16_1",
    "model_config": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "vocab_size": 49152},
    "vocab_size": 49152,
    "context_window_size": 2048,
    "sliding_window_size": -1,
    "prefill_chunk_size": 2048,
    "attention_sink_size": -1,
    "tensor_parallel_shards": 1,
    "pipeline_parallel_stages": 1,
    "temperature": 0.6,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "top_p": 0.9,
    "tokenizer_files": ["tokenizer.json", "tokenizer_config.json"],
    "tokenizer_info": {"token_postproc_method": "byte_level", "prepend_space_in_encode": False},
    "conv_template": {"name": "chatml", "system_message": "You are a helpful assistant.", "stop_token_ids": [2]},
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "model_task": "chat",
    "embedding_metadata": None,
}
COMPILE_OPTIONS = {"device": "webgpu", "link_opt": "O3", "repair_wgsl": True, "overrides": {}}
TOOLCHAIN = {
    "llm2wasm": "0.9.0",
    "mlc_llm": "mlc-llm 0.20.0",
    "tvm": "apache-tvm 0.21.0",
    "tvm_ffi": "apache-tvm-ffi 0.1.0",
    "emcc": "3.1.56",
    "web_runtime": "mlc-llm 79d603f0, tvm 1a2b3c4d",
}
# For every kept field, a value another model (or another compile of this one) would have.
LIBRARY_FIELD_CHANGES = {
    "model_type": "qwen2",
    "quantization": "q0f16",
    "model_config": {**CHAT_CONFIG["model_config"], "num_hidden_layers": 24},
    "vocab_size": 49153,
    "active_vocab_size": 49000,
    "context_window_size": 4096,
    "sliding_window_size": 1024,
    "prefill_chunk_size": 1024,
    "attention_sink_size": 4,
    "tensor_parallel_shards": 2,
    "pipeline_parallel_stages": 2,
    "max_batch_size": 4,
    "disaggregation": True,
}
# What a fine-tune of the same base may differ in, and the library does not depend on.
NON_LIBRARY_FIELD_CHANGES = {
    "version": "0.1.1",
    "conv_template": {"name": "llama-3", "system_message": "You answer support tickets.", "stop_token_ids": [7]},
    "tokenizer_files": ["tokenizer.json", "tokenizer_config.json", "added_tokens.json"],
    "tokenizer_info": {"token_postproc_method": "byte_fallback", "prepend_space_in_encode": True},
    "temperature": 0.2,
    "top_p": 0.5,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "pad_token_id": 3,
    "bos_token_id": 4,
    "eos_token_id": [5, 6],
    "model_task": "embedding",
    "embedding_metadata": {"model_type": "encoder", "pooling_strategy": "cls", "normalize": True},
}
WASM = b"\0asm\x01\0\0\0" + bytes(range(256)) * 8


def key_with(chat_changes: dict | None = None, **arguments) -> str:
    chat_config = {**copy.deepcopy(CHAT_CONFIG), **(chat_changes or {})}
    arguments = {"quantization": "q4f16_1", "compile_options": COMPILE_OPTIONS, "toolchain": TOOLCHAIN} | arguments
    return library_key(chat_config, **arguments)[0]


BASE_KEY = key_with()


def test_every_field_is_exercised_below():
    """A field added to either list without a test case here fails, so no kept field goes untested."""
    assert set(LIBRARY_FIELD_CHANGES) == set(LIBRARY_FIELDS)
    assert set(NON_LIBRARY_FIELD_CHANGES) == NON_LIBRARY_FIELDS


@pytest.mark.parametrize("field", sorted(LIBRARY_FIELD_CHANGES))
def test_each_kept_chat_config_field_changes_the_key(field):
    assert key_with({field: LIBRARY_FIELD_CHANGES[field]}) != BASE_KEY


@pytest.mark.parametrize("field", sorted(NON_LIBRARY_FIELD_CHANGES))
def test_a_field_the_library_does_not_depend_on_leaves_the_key(field):
    assert CHAT_CONFIG.get(field) != NON_LIBRARY_FIELD_CHANGES[field]
    assert key_with({field: NON_LIBRARY_FIELD_CHANGES[field]}) == BASE_KEY


def test_two_fine_tunes_of_one_base_share_a_key():
    assert key_with(NON_LIBRARY_FIELD_CHANGES) == BASE_KEY


def test_a_field_not_reviewed_counts():
    """A newer mlc_llm's field might reach the library: a needless miss, never a wrong hit."""
    assert key_with({"rope_scaling_mode": "yarn"}) != BASE_KEY


def test_the_quantization_changes_the_key():
    assert key_with(quantization="q0f32") != BASE_KEY


@pytest.mark.parametrize(
    "option, value",
    [("device", "webgpu-subgroups"), ("link_opt", "O2"), ("repair_wgsl", False), ("overrides", {"max_batch_size": 2})],
)
def test_each_compile_option_changes_the_key(option, value):
    assert key_with(compile_options={**COMPILE_OPTIONS, option: value}) != BASE_KEY


@pytest.mark.parametrize("tool", sorted(TOOLCHAIN))
def test_each_tool_version_changes_the_key(tool):
    assert key_with(toolchain={**TOOLCHAIN, tool: TOOLCHAIN[tool] + "-next"}) != BASE_KEY


def test_the_key_is_a_sha256_of_inputs_that_rehash_equal_and_name_no_model():
    key, inputs = library_key(CHAT_CONFIG, quantization="q4f16_1", compile_options=COMPILE_OPTIONS, toolchain=TOOLCHAIN)
    assert libcache.KEY_PATTERN.fullmatch(key)
    assert libcache.key_of(json.loads(json.dumps(inputs))) == key  # what entry.json records re-hashes to the key
    assert set(inputs["chat_config"]) == set(LIBRARY_FIELDS) & set(CHAT_CONFIG)
    assert inputs["unreviewed_chat_config"] == {}
    assert "system_message" not in json.dumps(inputs)  # the conversation template is not in the key's inputs


# --- the cache ------------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path) -> LibraryCache:
    return LibraryCache(tmp_path / "lib-cache")


@pytest.fixture
def compiled(tmp_path) -> Path:
    library = tmp_path / "build" / "SmolLM2-135M-q4f16_1-webgpu.wasm"  # the model's name: not part of the entry
    library.parent.mkdir()
    library.write_bytes(WASM)
    return library


def stored(cache: LibraryCache, library: Path, wgsl: dict | None = None, **changes) -> libcache.Entry:
    key, inputs = library_key(
        {**CHAT_CONFIG, **changes}, quantization="q4f16_1", compile_options=COMPILE_OPTIONS, toolchain=TOOLCHAIN
    )
    return cache.store(key, inputs, library, wgsl or {"kernels": 42, "repaired": []})


def looked_up(cache: LibraryCache, key: str) -> tuple[libcache.Entry | None, list[str]]:
    reasons: list[str] = []
    return cache.lookup(key, on_reject=reasons.append), reasons


def test_a_stored_library_is_found_and_copied(cache, compiled, tmp_path):
    entry = stored(cache, compiled, wgsl={"kernels": 42, "repaired": ["fused_rope"]})
    found, reasons = looked_up(cache, entry.key)
    assert found == entry and reasons == []
    assert found.wgsl_result == {"kernels": 42, "repaired": ["fused_rope"]}
    assert found.inputs["toolchain"] == TOOLCHAIN
    assert entry.folder == cache.root / entry.key[:2] / entry.key
    target = tmp_path / "bundle" / "other-model-id.wasm"
    target.parent.mkdir()
    assert cache.copy_into(found, target) == target
    assert target.read_bytes() == WASM
    assert sorted(os.listdir(target.parent)) == ["other-model-id.wasm"]  # no temp file left behind


def test_an_absent_entry_is_a_silent_miss(cache):
    assert looked_up(cache, BASE_KEY) == (None, [])


def test_a_malformed_key_is_a_miss_not_a_path(cache):
    found, reasons = looked_up(cache, "../../etc")
    assert found is None and "not a library key" in reasons[0]


def flip_one_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_library_is_a_miss(cache, compiled):
    entry = stored(cache, compiled)
    flip_one_byte(entry.library)
    found, reasons = looked_up(cache, entry.key)
    assert found is None and "SHA-256" in reasons[0]


def test_a_library_that_is_no_wasm_module_is_a_miss(cache, compiled):
    entry = stored(cache, compiled)
    flip_one_byte(entry.library, offset=0)
    found, reasons = looked_up(cache, entry.key)
    assert found is None and "not a wasm module" in reasons[0]


def test_a_truncated_library_is_a_miss(cache, compiled):
    entry = stored(cache, compiled)
    entry.library.write_bytes(WASM[:-10])
    found, reasons = looked_up(cache, entry.key)
    assert found is None and f"has {len(WASM) - 10} bytes" in reasons[0]


def test_a_record_edited_to_other_inputs_is_a_miss(cache, compiled):
    entry = stored(cache, compiled)
    record_path = entry.folder / "entry.json"
    record = json.loads(record_path.read_text())
    record["inputs"]["chat_config"]["prefill_chunk_size"] = 512
    record_path.write_text(json.dumps(record))
    found, reasons = looked_up(cache, entry.key)
    assert found is None and "hash to another key" in reasons[0]


def test_a_record_that_is_no_json_is_a_miss(cache, compiled):
    entry = stored(cache, compiled)
    (entry.folder / "entry.json").write_text("{not json")
    found, reasons = looked_up(cache, entry.key)
    assert found is None and reasons


def test_a_symlinked_library_is_a_miss(cache, compiled, tmp_path):
    entry = stored(cache, compiled)
    elsewhere = tmp_path / "elsewhere.wasm"
    elsewhere.write_bytes(WASM)  # the very bytes recorded: only the link is wrong
    entry.library.unlink()
    entry.library.symlink_to(elsewhere)
    found, reasons = looked_up(cache, entry.key)
    assert found is None and "'library.wasm': 'other'" in reasons[0]


def test_a_symlinked_entry_folder_is_a_miss(cache, compiled, tmp_path):
    entry = stored(cache, compiled)
    moved = tmp_path / "moved-entry"
    entry.folder.rename(moved)
    entry.folder.symlink_to(moved, target_is_directory=True)
    found, reasons = looked_up(cache, entry.key)
    assert found is None and "not a plain folder" in reasons[0]


@pytest.mark.parametrize("also_edit_recorded_key", [False, True])
def test_an_entry_planted_under_another_key_is_a_miss(cache, compiled, also_edit_recorded_key):
    """A valid entry of one shape copied under the key of another: its inputs hash to its own key."""
    small = stored(cache, compiled)
    other_key = key_with({"model_config": {**CHAT_CONFIG["model_config"], "hidden_size": 2048}})
    planted = cache.folder_of(other_key)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.mkdir()
    for name in ("library.wasm", "entry.json"):
        (planted / name).write_bytes((small.folder / name).read_bytes())
    if also_edit_recorded_key:
        record = json.loads((planted / "entry.json").read_text())
        (planted / "entry.json").write_text(json.dumps(record | {"key": other_key}))
    found, reasons = looked_up(cache, other_key)
    assert found is None and "hash to another key" in reasons[0]
    assert cache.lookup(small.key) == small


def test_a_stray_file_in_an_entry_is_a_miss(cache, compiled):
    entry = stored(cache, compiled)
    (entry.folder / "notes.txt").write_text("x")
    found, reasons = looked_up(cache, entry.key)
    assert found is None and "notes.txt" in reasons[0]


def test_a_second_store_of_one_key_keeps_the_first(cache, compiled):
    first = stored(cache, compiled)
    compiled.write_bytes(WASM + b"another build of the same inputs")
    second = stored(cache, compiled)
    assert second == first and cache.lookup(first.key) == first
    assert first.library.read_bytes() == WASM
    assert sorted(os.listdir(cache.root)) == [first.key[:2]]  # our temp folder is gone


def test_concurrent_stores_of_one_key_leave_one_valid_entry(cache, compiled, tmp_path):
    libraries = []
    for index in range(8):
        library = tmp_path / f"build-{index}.wasm"
        library.write_bytes(WASM + bytes([index]))
        libraries.append(library)
    results: list[libcache.Entry] = []
    threads = [threading.Thread(target=lambda path=path: results.append(stored(cache, path))) for path in libraries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = cache.lookup(results[0].key)
    assert kept is not None and len(results) == 8
    assert {entry.library_sha256 for entry in results} == {kept.library_sha256}
    assert sorted(os.listdir(cache.root)) == [kept.key[:2]]


def test_a_store_replaces_a_damaged_entry(cache, compiled):
    entry = stored(cache, compiled)
    flip_one_byte(entry.library)
    assert stored(cache, compiled) == cache.lookup(entry.key) is not None
    assert entry.library.read_bytes() == WASM


def test_a_store_refuses_what_is_no_wasm_module_or_not_its_key(cache, compiled, tmp_path):
    text = tmp_path / "not.wasm"
    text.write_text("<html>")
    with pytest.raises(ValueError, match="not a wasm module"):
        stored(cache, text)
    _key, inputs = library_key(CHAT_CONFIG, quantization="q4f16_1", compile_options={}, toolchain=TOOLCHAIN)
    with pytest.raises(ValueError, match="do not hash to the key"):
        cache.store(BASE_KEY, inputs, compiled, {})


def test_entries_are_readable_by_all_whatever_the_umask(cache, compiled):
    previous = os.umask(0o077)
    try:
        entry = stored(cache, compiled)
    finally:
        os.umask(previous)
    for path, mode in [(entry.folder.parent, 0o755), (entry.folder, 0o755)]:
        assert stat.S_IMODE(path.stat().st_mode) == mode
    for name in ("library.wasm", "entry.json"):
        assert stat.S_IMODE((entry.folder / name).stat().st_mode) == 0o644


def test_a_library_changed_after_lookup_is_not_copied(cache, compiled, tmp_path):
    entry = stored(cache, compiled)
    found = cache.lookup(entry.key)
    flip_one_byte(entry.library)
    target = tmp_path / "bundle.wasm"
    with pytest.raises(EntryChanged):
        cache.copy_into(found, target)
    assert list(tmp_path.glob("*bundle.wasm*")) == []


def test_size_and_clear(cache, compiled):
    assert cache.size() == 0  # no folder yet
    first = stored(cache, compiled)
    second = stored(cache, compiled, prefill_chunk_size=512)
    record_bytes = sum((entry.folder / "entry.json").stat().st_size for entry in (first, second))
    assert cache.size() == 2 * len(WASM) + record_bytes
    cache.clear()
    assert cache.size() == 0 and cache.root.is_dir() and os.listdir(cache.root) == []
    assert cache.lookup(first.key) is None and cache.lookup(second.key) is None


def test_the_cache_comes_from_the_environment_or_is_off(tmp_path):
    assert LibraryCache.from_environment({}) is None
    assert LibraryCache.from_environment({"LLM2WASM_LIB_CACHE": " "}) is None
    assert LibraryCache.from_environment({"LLM2WASM_LIB_CACHE": str(tmp_path)}) == LibraryCache(tmp_path)
