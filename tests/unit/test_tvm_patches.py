"""The patches to TVM against the real files of the apache-tvm wheels 0.25.0, 0.26.0, 0.27.0.post1
(downloaded from PyPI, cached): apply, idempotence, drift detection; for the emcc.py helper and for
the longrope rope kernel. Import and resolution with a real TVM are tested in the hermetic image
(tests/integration/test_emcc_patch_in_image.py; the longrope kernel by verify/ and the model matrix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm2wasm.image.scripts.tvm_patches import EMCC_FIX, MARKER, PatchError, apply, apply_all, load_patches, main
from tests.tvm_wheels import TVM_VERSIONS, contrib_layout_from, helper_source, position_embedding_source

PATCHES = Path(__file__).resolve().parents[2] / "patches"
LONGROPE_FIX = "longrope-ext-factors"
POSITION_EMBEDDING = "relax/frontend/nn/llm/position_embedding.py"


def emcc_patches():
    return load_patches(PATCHES, fixes=EMCC_FIX)


def tvm_tree(tmp_path: Path, relative: str, source: str) -> Path:
    tvm = tmp_path / "tvm"
    (tvm / relative).parent.mkdir(parents=True)
    (tvm / relative).write_text(source)
    return tvm


def test_every_patch_names_its_target_and_fix():
    patches = load_patches(PATCHES)
    assert {(p.fixes, p.target) for p in patches} == {
        (EMCC_FIX, "support/emcc.py"),
        (EMCC_FIX, "contrib/emcc.py"),
        (LONGROPE_FIX, POSITION_EMBEDDING),
    }
    assert all(p.marker for p in patches)


@pytest.mark.parametrize("version", TVM_VERSIONS)
def test_patch_applies_to_the_real_helper_once(tmp_path, version):
    original = helper_source(version)
    assert "all_libs = []" in original and "find_wasm_lib" in original
    tvm = tvm_tree(tmp_path, "support/emcc.py", original)
    patch, target, outcome = apply(tvm, emcc_patches(), log=lambda _: None)
    assert outcome == "applied" and patch.target == "support/emcc.py"
    patched = target.read_text()
    assert MARKER in patched and patched.count('llm2wasm_runtime_lib("') == 3
    assert 'find_wasm_lib("webgpu_runtime.bc")[0]' not in patched
    compile(patched, str(target), "exec")  # still valid Python
    # a second application is a no-op: detected, nothing edited
    assert apply(tvm, emcc_patches(), log=lambda _: None)[2] == "already applied"
    assert target.read_text() == patched
    assert not list(target.parent.glob("*.orig")) and not list(target.parent.glob("*.rej"))


@pytest.mark.parametrize(
    "imports,patch_name",
    [("tvm._ffi", "tvm-emcc-contrib-find_lib_path.patch"), ("tvm", "tvm-emcc-contrib-libinfo-find_lib_path.patch")],
)
def test_contrib_layout_patch(tmp_path, imports, patch_name):
    helper = contrib_layout_from(helper_source("0.25.0"), imports)
    assert f"from {imports}.libinfo import find_lib_path" in helper
    tvm = tvm_tree(tmp_path, "contrib/emcc.py", helper)
    patch, target, outcome = apply(tvm, emcc_patches(), log=lambda _: None)
    assert outcome == "applied" and patch.target == "contrib/emcc.py" and patch.path.name == patch_name
    patched = target.read_text()
    assert "return find_lib_path(name)[0]" in patched and patched.count('llm2wasm_runtime_lib("') == 3
    compile(patched, str(target), "exec")


@pytest.mark.parametrize(
    "drift",
    [
        ('all_libs += [find_wasm_lib("tvmjs_support.bc")[0]]', 'all_libs.append(find_wasm_lib("tvmjs_support.bc")[0])'),
        ("    all_libs = []\n", "    all_libs = list()\n"),
    ],
)
def test_drifted_helper_fails_loudly_and_is_left_alone(tmp_path, drift):
    drifted = helper_source("0.27.0.post1").replace(*drift)
    tvm = tvm_tree(tmp_path, "support/emcc.py", drifted)
    with pytest.raises(PatchError) as error:
        apply(tvm, emcc_patches(), log=lambda _: None)
    message = str(error.value)
    assert "TVM's emcc.py changed upstream; no llm2wasm patch applies" in message
    assert str(tvm / "support" / "emcc.py") in message
    assert "installed TVM:" in message
    assert "tvm-emcc-support-find_wasm_lib.patch" in message and "tvm-emcc-contrib-find_lib_path.patch" in message
    assert (tvm / "support" / "emcc.py").read_text() == drifted
    assert not list((tvm / "support").glob("*.rej"))


def test_no_helper_at_all(tmp_path):
    tvm = tmp_path / "tvm"
    tvm.mkdir()
    with pytest.raises(PatchError, match="none of"):
        apply(tvm, emcc_patches(), log=lambda _: None)


def test_command_line_exit_status(tmp_path, capsys):
    tvm = tvm_tree(tmp_path, "support/emcc.py", helper_source("0.26.0").replace("all_libs = []", "all_libs = [] "))
    assert main(["apply", "--patches", str(PATCHES), "--tvm-dir", str(tvm)]) == 1
    assert "no llm2wasm patch applies" in capsys.readouterr().err
    (tvm / "support" / "emcc.py").write_text(helper_source("0.26.0"))
    assert main(["apply", "--patches", str(PATCHES), "--tvm-dir", str(tvm)]) == 0
    assert main(["status", "--patches", str(PATCHES), "--tvm-dir", str(tvm)]) == 0
    assert "support/emcc.py: applied" in capsys.readouterr().out


def patched_runtime_lib(tmp_path: Path, patch_name: str, source: str, relative: str):
    """The patched helper's llm2wasm_runtime_lib, run on its own (the module imports TVM)."""
    import ast
    import os

    tvm = tvm_tree(tmp_path / "tree", relative, source)
    _, target, _ = apply(tvm, [p for p in emcc_patches() if p.path.name == patch_name], log=lambda _: None)
    module = ast.parse(target.read_text())
    function = next(n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == MARKER)
    namespace = {
        "os": os,
        "find_wasm_lib": lambda name: [f"upstream:{name}"],
        "find_lib_path": lambda name: [f"upstream:{name}"],
    }
    exec(compile(ast.Module([function], []), str(target), "exec"), namespace)
    return namespace[MARKER]


@pytest.mark.parametrize(
    "patch_name,layout",
    [
        ("tvm-emcc-support-find_wasm_lib.patch", None),
        ("tvm-emcc-contrib-find_lib_path.patch", "tvm._ffi"),
        ("tvm-emcc-contrib-libinfo-find_lib_path.patch", "tvm"),
    ],
)
def test_the_prebuilt_object_is_linked_when_the_image_made_one(tmp_path, monkeypatch, patch_name, layout):
    source = helper_source("0.26.0") if layout is None else contrib_layout_from(helper_source("0.25.0"), layout)
    relative = "support/emcc.py" if layout is None else "contrib/emcc.py"
    runtime_lib = patched_runtime_lib(tmp_path, patch_name, source, relative)
    runtime = tmp_path / "dist"
    runtime.mkdir()
    monkeypatch.delenv("LLM2WASM_WASM_RUNTIME_DIR", raising=False)
    assert runtime_lib("wasm_runtime.bc") == "upstream:wasm_runtime.bc"  # unset: TVM's own lookup
    monkeypatch.setenv("LLM2WASM_WASM_RUNTIME_DIR", str(runtime))
    with pytest.raises(RuntimeError, match=r"Cannot find wasm_runtime\.bc in LLM2WASM_WASM_RUNTIME_DIR"):
        runtime_lib("wasm_runtime.bc")
    (runtime / "wasm_runtime.bc").write_bytes(b"BC")
    assert runtime_lib("wasm_runtime.bc") == str(runtime / "wasm_runtime.bc")
    (runtime / "wasm_runtime.o").write_bytes(b"\0asm")
    assert runtime_lib("wasm_runtime.bc") == str(runtime / "wasm_runtime.o")
    # an object without its bitcode is not enough: the bitcode is what the image's checks vouch for
    (runtime / "webgpu_runtime.o").write_bytes(b"\0asm")
    with pytest.raises(RuntimeError, match=r"Cannot find webgpu_runtime\.bc"):
        runtime_lib("webgpu_runtime.bc")


def test_a_patch_without_its_headers_is_refused(tmp_path):
    (tmp_path / "x.patch").write_text("target: support/emcc.py\n--- a/emcc.py\n+++ b/emcc.py\n")
    with pytest.raises(PatchError, match="'fixes:', 'marker:'"):
        load_patches(tmp_path)


@pytest.mark.parametrize("version", TVM_VERSIONS)
def test_longrope_fix_applies_to_the_real_rope_kernels_once(tmp_path, version):
    original = position_embedding_source(version)
    assert original.count("        if ext_factors:\n") == 2  # the bug, in both rope builders
    tvm = tvm_tree(tmp_path, POSITION_EMBEDDING, original)
    patch, target, outcome = apply(tvm, load_patches(PATCHES, fixes=LONGROPE_FIX), log=lambda _: None)
    assert outcome == "applied" and patch.path.name == "tvm-longrope-ext-factors.patch"
    patched = target.read_text()
    assert "if ext_factors:" not in patched and patched.count("        if ext_factors is not None:\n") == 2
    compile(patched, str(target), "exec")
    assert apply(tvm, load_patches(PATCHES, fixes=LONGROPE_FIX), log=lambda _: None)[2] == "already applied"


def test_longrope_fix_is_skipped_where_upstream_fixed_the_bug(tmp_path):
    fixed_upstream = position_embedding_source("0.26.0").replace("if ext_factors:", "if ext_factors is not None :")
    tvm = tvm_tree(tmp_path, POSITION_EMBEDDING, fixed_upstream)
    said = []
    assert apply(tvm, load_patches(PATCHES, fixes=LONGROPE_FIX), log=said.append)[2] == "not needed"
    assert "upstream no longer has 'if ext_factors:'" in said[0]
    assert (tvm / POSITION_EMBEDDING).read_text() == fixed_upstream


def test_longrope_fix_fails_loudly_where_the_bug_is_there_but_its_context_drifted(tmp_path):
    drifted = position_embedding_source("0.26.0").replace("        kwargs = {}\n", "        kwargs = dict()\n")
    tvm = tvm_tree(tmp_path, POSITION_EMBEDDING, drifted)
    with pytest.raises(PatchError) as error:
        apply(tvm, load_patches(PATCHES, fixes=LONGROPE_FIX), log=lambda _: None)
    message = str(error.value)
    assert "TVM's position_embedding.py changed upstream; no llm2wasm patch applies (longrope-ext-factors)" in message
    assert f"file: {tvm / POSITION_EMBEDDING}" in message and "tvm-longrope-ext-factors.patch" in message
    assert (tvm / POSITION_EMBEDDING).read_text() == drifted


def test_apply_all_applies_each_fix(tmp_path, capsys):
    tvm = tvm_tree(tmp_path, "support/emcc.py", helper_source("0.26.0"))
    (tvm / POSITION_EMBEDDING).parent.mkdir(parents=True)
    (tvm / POSITION_EMBEDDING).write_text(position_embedding_source("0.26.0"))
    outcomes = apply_all(tvm, load_patches(PATCHES), log=lambda _: None)
    assert [(patch.fixes, outcome) for patch, _, outcome in outcomes] == [
        (EMCC_FIX, "applied"),
        (LONGROPE_FIX, "applied"),
    ]
    assert main(["status", "--patches", str(PATCHES), "--tvm-dir", str(tvm)]) == 0
    out = capsys.readouterr().out
    assert "support/emcc.py: applied" in out and "position_embedding.py: applied" in out
