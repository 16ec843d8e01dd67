"""The hermetic mirror's own logic: upstream archives checked before use, wheels it makes, the
import adapter's tokenizer detection (a port of mlc-llm's C++ DetectTokenizerInfo)."""

import json
import sys
import zipfile

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "hermetic"))
sys.path.insert(0, str(ROOT / "tests" / "hermetic" / "mlc_adapter"))

import llm2wasm_hermetic_mlc_adapter as adapter
import mirror


def test_missing_upstream_archive_names_the_file_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2WASM_UPSTREAM_DIR", str(tmp_path))
    monkeypatch.delenv("LLM2WASM_UPSTREAM_FROM_GITHUB", raising=False)
    with pytest.raises(RuntimeError) as error:
        mirror.checked_archive(mirror.UPSTREAM["tvm"])
    message = str(error.value)
    assert "tvm-v0.26.0-c7b458e9.tar.xz" in message and "apache/tvm@c7b458e9" in message
    assert "LLM2WASM_UPSTREAM_DIR" in message


def test_altered_upstream_archive_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2WASM_UPSTREAM_DIR", str(tmp_path))
    (tmp_path / "tvm-ffi-12dbf053.tar.xz").write_bytes(b"not the archive")
    with pytest.raises(RuntimeError, match="expected 650be554"):
        mirror.checked_archive(mirror.UPSTREAM["tvm-ffi"])


def test_the_shared_archives_match_their_listed_digests():
    for archive in mirror.UPSTREAM.values():
        assert mirror.checked_archive(archive).name == archive.file


def test_written_wheel_is_installable_metadata(tmp_path):
    wheel = mirror.write_wheel(tmp_path, "demo-pkg", "1.0+abc", {"demo.pth": b"import os\n"}, ["requests"])
    assert wheel.name == "demo_pkg-1.0+abc-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read("demo_pkg-1.0+abc.dist-info/METADATA").decode()
        record = archive.read("demo_pkg-1.0+abc.dist-info/RECORD").decode()
    assert {"demo.pth", "demo_pkg-1.0+abc.dist-info/WHEEL"} <= names
    assert "Requires-Dist: requests" in metadata and "demo.pth,sha256=" in record


def tokenizer(tmp_path, data) -> str:
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    return str(tmp_path)


def test_detects_byte_level(tmp_path):
    info = json.loads(adapter.detect_tokenizer_info(tokenizer(tmp_path, {"decoder": {"type": "ByteLevel"}})))
    assert info == {
        "token_postproc_method": "byte_level",
        "prepend_space_in_encode": False,
        "strip_space_in_decode": False,
    }


def test_detects_llama_style_sentencepiece(tmp_path):
    data = {
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}]},
        "decoder": {
            "type": "Sequence",
            "decoders": [{"type": "ByteFallback"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}],
        },
    }
    info = json.loads(adapter.detect_tokenizer_info(tokenizer(tmp_path, data)))
    assert info == {
        "token_postproc_method": "byte_fallback",
        "prepend_space_in_encode": True,
        "strip_space_in_decode": True,
    }


def test_no_tokenizer_json_gives_the_defaults(tmp_path):
    info = json.loads(adapter.detect_tokenizer_info(str(tmp_path)))
    assert info["token_postproc_method"] == "byte_fallback" and info["prepend_space_in_encode"] is False


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot find tokenizer"):
        adapter.detect_tokenizer_info(str(tmp_path / "nope"))
