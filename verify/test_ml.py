"""Checks for the ml layer: pinned wheels installed, importable, consistent."""

import pytest

from llm2wasm.checks import normalize, requirement_pin, version_matches

PINNED = [
    "torch_requirement",
    "transformers_requirement",
    "peft_requirement",
    "bitsandbytes_requirement",
    "mlc_ai_requirement",
    "mlc_llm_requirement",
]


@pytest.fixture(scope="module")
def installed(host):
    packages = host.pip.get_packages(pip_path="/opt/venv/bin/pip")
    return {normalize(name): info["version"] for name, info in packages.items()}


@pytest.mark.parametrize("pin", PINNED)
def test_pinned_package_installed(installed, pins, pin):
    name, version = requirement_pin(pins[pin])
    assert name in installed, f"{name} ({pin}) is not installed"
    if version:
        assert version_matches(installed[name], version), f"{name} {installed[name]} installed, {version} pinned"


@pytest.mark.parametrize("pin", ["mlc_ai_requirement", "mlc_llm_requirement"])
def test_mlc_wheels_are_not_pypi_placeholders(installed, pins, pin):
    name, _ = requirement_pin(pins[pin])
    assert installed.get(name) != "0.1", f"{name} 0.1 is PyPI's placeholder, not an MLC wheel"


def test_tvm_and_mlc_llm_import_together(python_facts):
    # mlc-llm issue 3508: nightlies out of step fail with libtvm.so not found.
    fact = python_facts["tvm_and_mlc_llm"]
    hint = ""
    if "libcuda.so.1" in (fact.get("error") or ""):
        # TVM's CUDA runtime links the driver's libcuda.so.1 (apache/tvm cmake/modules/CUDA.cmake),
        # which no wheel carries: checks and builds run without a GPU (docker build never has one)
        hint = (
            "\nThe MLC CUDA wheels need the NVIDIA driver's libcuda.so.1 to import, and image checks run "
            "without a GPU: build the cpu profile (WebGPU compilation needs no CUDA), or report the wheel"
        )
    assert fact["ok"], (fact["error"] or "") + hint


def test_mlc_llm_cli_lists_subcommands(python_facts):
    assert python_facts["mlc_llm_cli_help"]["ok"], python_facts["mlc_llm_cli_help"]["error"]
    out = python_facts["mlc_llm_cli_help"]["value"]
    for subcommand in ("compile", "convert_weight", "gen_config"):
        assert subcommand in out


def test_ml_libraries_import(python_facts):
    assert python_facts["ml_libraries"]["ok"], python_facts["ml_libraries"]["error"]


def test_pip_check(host):
    result = host.run("pip check")
    assert result.rc == 0, result.stdout + result.stderr


def test_torch_build_matches_variant(python_facts, pins):
    assert python_facts["ml_libraries"]["ok"], python_facts["ml_libraries"]["error"]
    out = python_facts["ml_libraries"]["value"]["cuda"] or "cpu"
    if pins.cuda:
        assert out != "cpu", "a CUDA variant got a CPU-only torch"
    else:
        assert out == "cpu", f"a CPU variant got torch for CUDA {out}"
