"""Pipeline mechanics that need no image: step keys, the workspace, failures reported with their log."""

from __future__ import annotations

import json

import pytest

from llm2wasm.image.convert.converter import Converter, step_keys
from llm2wasm.image.convert.inputs import ConvertRequest
from llm2wasm.image.convert.progress import StepFailed, run_logged
from llm2wasm.image.convert.steps import source_view
from llm2wasm.image.convert.toolchain import Toolchain, emcc_version, python_packages, web_runtime_commits
from llm2wasm.image.convert.workspace import Workspace, key_of


def prepared_converter(model_dir, output, toolchain=None, **settings) -> Converter:
    """A Converter on a request with the usual settings (overridable), its workspace ready."""
    values = {"quantization": "q4f32_1", "conv_template": "llama-2", "model_id": "m", **settings}
    converter = Converter(ConvertRequest(model_dir=model_dir, output=output, **values), toolchain=toolchain)
    converter.ws.prepare()
    return converter


def test_keys_change_with_inputs():
    assert key_of("a", 1) == key_of("a", 1)
    assert key_of("a", 1) != key_of("a", 2)


def test_workspace_finish_and_done(tmp_path):
    ws = Workspace(tmp_path)
    ws.prepare()
    (ws.root / "tmp-gen_config-x").mkdir()  # a killed run's partial output
    ws.prepare()
    assert not list(ws.root.glob("tmp-*"))
    tmp = ws.temp_dir("gen_config")
    (tmp / "config").mkdir()
    ws.finish("gen_config", "k1", tmp, 1.5)
    assert ws.done("gen_config", "k1") and not ws.done("gen_config", "k2")
    assert json.loads(ws.state_path.read_text())["steps"]["gen_config"]["key"] == "k1"
    assert Workspace(tmp_path).done("gen_config", "k1")  # survives a restart


def test_failed_command_names_the_step_and_its_log(tmp_path):
    log = tmp_path / "step.log"
    with pytest.raises(StepFailed) as error:
        run_logged("compile", ["sh", "-c", "echo 'Cannot find library: mlc_wasm_runtime.bc' >&2; exit 1"], log)
    assert "step compile failed" in str(error.value) and "Cannot find library" in str(error.value)


def test_a_step_log_says_which_host_folder_each_container_path_is(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2WASM_HOST_PATHS", json.dumps({"/output/dist": "/home/u/dist", "/input/model": "/m"}))
    run_logged("gen_config", ["echo", "/output/dist/x"], tmp_path / "step.log")
    command, paths, said = (tmp_path / "step.log").read_text().splitlines()
    assert command == "$ echo /output/dist/x" and said == "/output/dist/x"  # the tool's own words are kept
    assert paths == "# paths here are the container's: /input/model is /m; /output/dist is /home/u/dist"


def test_source_view_links_every_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    view = source_view(model, tmp_path / "view")
    assert (view / "config.json").is_symlink() and (view / "config.json").resolve() == model / "config.json"


def test_merge_failure_is_a_failed_step_with_its_traceback(tmp_path):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir()
    adapter.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    converter = prepared_converter(model, tmp_path / "out", quantization="q4f16_1", adapter=adapter)
    with pytest.raises(StepFailed, match="step merge failed"):
        converter.merge(converter.ws.temp_dir("merge"))
    assert "Traceback" in (converter.ws.logs / "merge.log").read_text()


def test_convert_weight_out_of_gpu_memory_retries_on_the_cpu(tmp_path, monkeypatch, capsys):
    """A fake `python -m mlc_llm` that runs out of CUDA memory, and works with --device cpu."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *"--device cuda"*) echo "torch.OutOfMemoryError: CUDA out of memory." >&2; exit 1;; esac\n'
        'for last; do :; done; mkdir -p "$last"; echo "converted with: $*"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("LLM2WASM_PYTHON", str(fake))
    model = tmp_path / "model"
    model.mkdir()
    converter = prepared_converter(model, tmp_path / "out")
    converter._device = "cuda"  # as if a GPU had been found
    tmp = converter.ws.temp_dir("convert_weight")
    converter.convert_weight(tmp)
    assert "--device cpu" in (converter.ws.logs / "convert_weight.log").read_text()
    assert "ran out of GPU memory: converting the weights on the CPU instead" in capsys.readouterr().err


def test_convert_weight_other_failures_are_not_retried(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "ValueError: Unknown model type" >&2; exit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("LLM2WASM_PYTHON", str(fake))
    converter = prepared_converter(tmp_path, tmp_path / "out")
    converter._device = "cuda"
    with pytest.raises(StepFailed, match="Unknown model type"):
        converter.convert_weight(converter.ws.temp_dir("convert_weight"))


def test_a_library_the_browser_would_reject_is_a_failed_compile_step(tmp_path, monkeypatch):
    """What `python -m llm2wasm.image.convert.wgsl` reports (here a fake that finds an invalid kernel)
    becomes a failed step naming the kernel and the validator's message."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--no-repair*) ;; *) echo "repair was not turned off" >&2; exit 3;; esac\n'
        "echo \"  INVALID batch_decode_paged_kv_kernel: line 151:7: 'workgroupBarrier' must only be called"
        ' from uniform control flow"\n'
        "exit 1\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("LLM2WASM_PYTHON", str(fake))
    converter = prepared_converter(tmp_path, tmp_path / "out", repair_wgsl=False)
    tmp = converter.ws.temp_dir("compile")
    (tmp / "m.wasm").write_bytes(b"\0asm\x01\0\0\0")
    with pytest.raises(StepFailed) as error:
        converter.check_wgsl(tmp, tmp / "m.wasm")
    message = str(error.value)
    assert "compile (WGSL check: a kernel the browser would reject)" in message
    assert "INVALID batch_decode_paged_kv_kernel" in message and "uniform control flow" in message


@pytest.mark.parametrize(("link_opt", "user_cflags", "expected"), [("O2", None, "-O2"), ("O3", "-g0", "-g0 -O3")])
def test_the_link_runs_at_the_requested_level(tmp_path, monkeypatch, link_opt, user_cflags, expected):
    """emcc appends EMCC_CFLAGS to its arguments, so the last -O there decides over TVM's -O3: the
    compile step hands mlc_llm the level asked for, after any EMCC_CFLAGS of the user's."""
    seen = tmp_path / "emcc_cflags"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/sh\n"
        # the argument after a given option
        'after() { w="$1"; shift; p=""; for a in "$@"; do [ "$p" = "$w" ] && echo "$a"; p="$a"; done; }\n'
        'case "$*" in\n'
        f'  *"-m mlc_llm compile"*) printf %s "$EMCC_CFLAGS" > {seen};\n'
        '    printf "\\000asm\\001\\000\\000\\000" > "$(after -o "$@")";;\n'
        '  *llm2wasm.image.convert.wgsl*) echo \'{"repaired": []}\' > "$(after --report "$@")";;\n'
        "esac\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("LLM2WASM_PYTHON", str(fake))
    if user_cflags is None:
        monkeypatch.delenv("EMCC_CFLAGS", raising=False)
    else:
        monkeypatch.setenv("EMCC_CFLAGS", user_cflags)
    converter = prepared_converter(tmp_path, tmp_path / "out", link_opt=link_opt)
    converter.compile(converter.ws.temp_dir("compile"))
    assert seen.read_text() == expected


TOOLS = {
    "llm2wasm": "0.1.0 (abc)",
    "mlc_llm": "mlc-llm 0.20.0",
    "tvm": "apache-tvm 0.26.0",
    "tvm_ffi": "apache-tvm-ffi 0.1.15",
    "torch": "torch 2.13.0",
    "transformers": "transformers 5.24.0",
    "peft": "peft 0.21.2",
    "emcc": "3.1.56 (abcdef)",
    "web_runtime": "MLC_LLM_COMMIT=aa TVM_COMMIT=bb",
}


def keys_with(tmp_path, tools=None, **settings) -> dict[str, str]:
    values = {"quantization": "q4f32_1", "conv_template": "llama-2", "model_id": "m", **settings}
    request = ConvertRequest(model_dir=tmp_path, output=tmp_path / "out", **values)
    return step_keys(request, "source", Toolchain({**TOOLS, **(tools or {})}))


def changed_keys(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {step for step in before if before[step] != after[step]}


def test_another_link_level_compiles_again(tmp_path):
    """The compile step's key covers the link level: a cached library of another level is not reused."""
    assert changed_keys(keys_with(tmp_path, link_opt="O2"), keys_with(tmp_path, link_opt="O3")) == {"compile"}


@pytest.mark.parametrize(
    "tool, version, remade",
    [
        # another mlc_llm can generate another config, convert weights and compile differently
        ("mlc_llm", "mlc-llm 0.21.0", {"gen_config", "convert_weight", "compile"}),
        ("tvm", "apache-tvm 0.27.0", {"convert_weight", "compile"}),
        # only the link runs emcc and links the web runtimes
        ("emcc", "3.1.57 (fedcba)", {"compile"}),
        ("web_runtime", "MLC_LLM_COMMIT=cc TVM_COMMIT=bb", {"compile"}),
        ("torch", "torch 2.14.0", {"convert_weight"}),
        # llm2wasm's own code (the WGSL repair, the command lines) takes part in every step
        ("llm2wasm", "0.1.0 (def)", {"gen_config", "convert_weight", "compile"}),
        ("peft", "peft 0.22.0", set()),  # the merge's, which comes before these (its key is in "source")
    ],
)
def test_a_step_is_made_again_when_a_tool_it_runs_changed(tmp_path, tool, version, remade):
    assert changed_keys(keys_with(tmp_path), keys_with(tmp_path, {tool: version})) == remade


def test_the_merge_key_covers_its_tools():
    assert Toolchain({**TOOLS, "peft": "peft 0.22.0"}).of("merge") != Toolchain(TOOLS).of("merge")
    assert Toolchain({**TOOLS, "emcc": "other"}).of("merge") == Toolchain(TOOLS).of("merge")


def test_a_rerun_with_other_tools_says_which_changed(tmp_path, capsys):
    """A re-run in a newer image makes the step again, naming the tool that changed; the record
    keeps the tools of the run that made the output."""
    runs = []

    def action(tmp):
        (tmp / "made").write_text("library")
        runs.append(tmp)

    for emcc in ("3.1.56 (a)", "3.1.56 (a)", "3.1.57 (b)"):
        converter = prepared_converter(tmp_path, tmp_path / "out", toolchain=Toolchain({**TOOLS, "emcc": emcc}))
        key = step_keys(converter.request, "source", converter.toolchain)["compile"]
        converter.step("compile", key, action)
    err = capsys.readouterr().err
    assert len(runs) == 2, err  # the second run kept the first one's output
    assert "✓ compile: unchanged inputs, kept from an earlier run" in err
    assert "→ compile … (made again: emcc: 3.1.56 (a) -> 3.1.57 (b))" in err
    record = json.loads((tmp_path / "out" / ".llm2wasm" / "state.json").read_text())["steps"]["compile"]
    assert record["tools"]["emcc"] == "3.1.57 (b)"


def test_toolchain_reads_the_web_runtime_record(tmp_path):
    (tmp_path / "BUILT_FROM").write_text("MLC_LLM_REF=v0.20.0\nMLC_LLM_COMMIT=aa\nTVM_COMMIT=bb\nTVM_TAGS=v1=bb\n")
    assert web_runtime_commits(str(tmp_path)) == "MLC_LLM_COMMIT=aa TVM_COMMIT=bb"
    assert web_runtime_commits(str(tmp_path / "missing")) == "absent"


def test_toolchain_reads_python_package_versions_without_importing_them():
    found = python_packages(("pytest", "no_such_module_here"))
    assert found["pytest"].startswith("pytest ") and found["no_such_module_here"] == ""
    assert Toolchain({"mlc_llm": ""}).of("gen_config")["mlc_llm"] == "absent"


@pytest.mark.parametrize(
    "first_line, version",
    [
        (
            "emcc (Emscripten gcc/clang-like replacement + linker emulating GNU ld) 3.1.56 (cf90417346b78455)",
            "3.1.56 (cf90417346b78455)",
        ),
        ("emcc (Emscripten gcc/clang-like replacement + linker emulating GNU ld) 3.1.6 ()", "3.1.6 ()"),
    ],
)
def test_emcc_version_is_read_off_its_first_line(tmp_path, monkeypatch, first_line, version):
    emcc = tmp_path / "emcc"
    emcc.write_text(f"#!/bin/sh\necho '{first_line}'\necho 'Copyright (C) 2014 the Emscripten authors'\n")
    emcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert emcc_version() == version
