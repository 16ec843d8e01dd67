"""Checks for the ml layer: pinned wheels installed, importable, consistent."""

import json

import pytest

from llm2wasm.host.checks import lock_mismatches, normalize, requirement_pin, version_matches
from llm2wasm.host.locks import lock_path, locked_versions
from llm2wasm.host.pins import PROJECT_ROOT

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


def test_every_locked_package_is_installed_at_its_locked_version(installed, pins):
    """The ml layer installs the profile's hash lock (pip --require-hashes); nothing after it may move
    a locked package, or the lock no longer says what is in the image. (The layer's label
    io.llm2wasm.ml.lock names the lock; the joined images above carry the web branch's labels.)"""
    lock = lock_path(PROJECT_ROOT, pins.pins)
    if lock is None:
        pytest.skip(f"profile {pins.name} has no ml lock (pin ml_lock)")
    problems = lock_mismatches(installed, locked_versions(lock))
    assert not problems, f"differs from {lock.name}:\n" + "\n".join(problems)


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
        # which no wheel carries and checks run without a GPU: the ml layer's driver stub stands in
        hint = (
            "\nThe MLC CUDA wheels need the NVIDIA driver's libcuda.so.1, and image checks run without a GPU: "
            "the ml layer's driver stub is missing or off (see test_cuda_driver_stub_covers_every_library_that_"
            "needs_the_driver and LLM2WASM_CUDA_DRIVER_STUB)"
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


DRIVER_STUB_FACTS = r"""
import json, sys
sys.path.insert(0, "/opt/llm2wasm")
import cuda_driver_stub as stub
imports = stub.driver_imports(stub.site_packages())
hooks = [str(folder / (stub.HOOK_MODULE + ".pth")) for folder in stub.site_packages()]
print(json.dumps({
    "imports": {str(path): sorted(names) for path, names in imports.items()},
    "stub": sorted(stub.read_dynamic(stub.STUB_PATH)[4]) if stub.STUB_PATH.exists() else None,
    "hook": any(__import__("os").path.exists(hook) for hook in hooks),
}))
"""


def test_cuda_driver_stub_covers_every_library_that_needs_the_driver(exec_):
    # Image checks and builds run without a GPU: a wheel library that needs libcuda.so.1 loads only
    # through the stub (src/llm2wasm/image/scripts/cuda_driver_stub.py), which must define every driver function
    # it imports. Where nothing needs the driver (CPU wheels) nothing may be written.
    result = exec_.python(DRIVER_STUB_FACTS, timeout=300)
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    if not facts["imports"]:
        assert facts["stub"] is None and not facts["hook"], "a driver stub was installed though no library needs it"
        return
    assert facts["stub"] is not None and facts["hook"], (
        f"{', '.join(facts['imports'])} need libcuda.so.1, but no driver stub and start-up hook are installed: "
        "run `python /opt/llm2wasm/cuda_driver_stub.py install` after the last pip install of the ml layer"
    )
    for library, names in facts["imports"].items():
        missing = sorted(set(names) - set(facts["stub"]))
        assert not missing, f"the driver stub lacks {', '.join(missing)}, which {library} imports"
