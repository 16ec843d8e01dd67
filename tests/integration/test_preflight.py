"""The preflight against the hermetic mirror's real servers (its image registry, wheel index as a
flat page and as PEP 503, git daemon and npm path): every pin resolves, each kind of bad pin is named
with what exists nearest (exit 2, nothing built), and with no network at all each source is named."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import HERMETIC, ROOT, hermetic_build_args, invoke


def doctor(*sets: str) -> subprocess.CompletedProcess:
    args = ["doctor", "--profile", HERMETIC]
    for item in sets:
        args += ["--set", item]
    return invoke(*args)


def test_every_hermetic_pin_resolves(hermetic_mirror):
    result = doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NO " not in result.stdout
    for pin in ("base_image", "mlc_ai_requirement", "torch_requirement", "mlc_llm_ref", "webllm_version"):
        assert f"ok  {pin} " in result.stdout


def test_a_pep_503_index_is_read_too(hermetic_mirror):
    result = doctor("pip_options=--index-url http://127.0.0.1:38471/simple/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "in http://127.0.0.1:38471/simple/" in result.stdout


REGISTRY = "127.0.0.1:38474/llm2wasm-hermetic/debian"
BAD_PINS = {
    "base-image-tag": (
        f"base_image={REGISTRY}:bookwrm",
        f"NO  base_image {REGISTRY}:bookwrm: no such tag in {REGISTRY}; nearest: bookworm",
    ),
    "wheel-version": (
        "mlc_ai_requirement=apache-tvm==0.26.1",
        "NO  mlc_ai_requirement apache-tvm==0.26.1: no release matches ==0.26.1",
    ),
    "python-tag": ("python_version=3.12", "NO  torch_requirement torch==2.13.0+cpu has no cp312 wheel"),
    "git-ref": (
        "mlc_llm_ref=79d603f0-tvm-0.27-compat",
        "NO  mlc_llm_ref 79d603f0-tvm-0.27-compat: no such tag or branch in git://127.0.0.1:38472/mlc-llm; "
        "nearest: 79d603f0-tvm-0.26-compat",
    ),
    "npm-version": ("webllm_version=0.2.85", "NO  webllm_version 0.2.85:"),
}


@pytest.mark.parametrize("kind", list(BAD_PINS))
def test_a_bad_pin_is_named_with_what_exists(hermetic_mirror, kind):
    setting, message = BAD_PINS[kind]
    result = doctor(setting)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_build_stops_before_any_layer_on_a_bad_pin(hermetic_mirror):
    args = [*hermetic_build_args(hermetic_mirror), "--repository", "llm2wasm-preflight-never-built"]
    result = invoke("build", *args, "--set", "mlc_ai_requirement=apache-tvm==0.26.1")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "preflight: pins of profile hermetic do not resolve; nothing was built." in output
    assert "skip this check with --no-preflight" in output
    assert "building" not in output


def test_no_network_names_each_source(hermetic_mirror):
    """In a network namespace of its own (no interface up, not even loopback) nothing is reachable."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed for the no-network test")
    cmd = ["unshare", "--net", str(ROOT / ".venv" / "bin" / "invoke"), "--search-root", str(ROOT)]
    result = subprocess.run(
        [*cmd, "doctor", "--profile", HERMETIC], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    for source in ("127.0.0.1:38474", "http://127.0.0.1:38471", "git://127.0.0.1:38472/mlc-llm"):
        assert any(line.startswith("NO  cannot reach") and source in line for line in result.stdout.splitlines()), (
            source,
            result.stdout,
        )
