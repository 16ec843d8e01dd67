"""Hostile inputs through the real front door (`invoke convert` on the host, the hermetic app image):
a model folder, adapter or output made the way an attacker or a damaged download would make it.
For each: no marker file written by injected code, no secret in any output, exit status 2 with a
message naming the problem (or, where the hostile part is only left out, a complete conversion),
and nothing that claims success. docs/SECURITY.md says what each guard stops."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest

from llm2wasm.host.browser import free_port
from tests.conftest import INVOKE, ROOT, app_image, invoke, run_app

CANARY = "hf_llm2wasm_canary_0123456789"  # a token the caller holds; it must never reach an output
# mlc_llm's gen_config eval()s each line of rwkv_vocab_v*.txt; this line gets past its quote check
RWKV_INJECTION = "0 \"\\\\\"+str(open(__import__('glob').glob('/output/*')[0]+'/PWNED','w'))#\" 2\n"
MAKE = """
from pathlib import Path
from llm2wasm.image.convert.tiny import make_lora_adapter, make_tiny_llama
make_tiny_llama(Path("/work/tiny"), vocab_size=64)
make_lora_adapter(Path("/work/tiny"), Path("/work/lora"))
"""


@pytest.fixture(scope="module")
def made(hermetic_chain, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    result = run_app("-c", MAKE, mounts={root: "/work"}, entrypoint="python")
    assert result.returncode == 0, result.stderr
    return root


def convert(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return invoke("convert", str(model), "-o", str(out), "--profile", "hermetic", *extra, env={"HF_TOKEN": CANARY})


def copy_of(made: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(made / name, target)
    return target


def assert_nothing_leaked(out: Path) -> None:
    for path in out.rglob("*") if out.exists() else []:
        assert path.name != "PWNED", f"injected code ran: {path}"
        if path.is_file() and not path.is_symlink():
            assert CANARY.encode() not in path.read_bytes(), f"the token reached {path}"


@pytest.fixture(scope="module")
def rwkv_conversion(made, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A model folder as a Hub repo may hold it: the model, a README, code, and an rwkv vocab whose
    line gets past mlc_llm's quote check into its eval()."""
    work = tmp_path_factory.mktemp("rwkv")
    model = copy_of(made, "tiny", work)
    (model / "rwkv_vocab_v20230424.txt").write_text(RWKV_INJECTION)
    (model / "modeling_evil.py").write_text("raise SystemExit('imported')\n")
    (model / "README.md").write_text("# a model\n")
    out = work / "out"
    return out, convert(model, out, "-q", "q0f32", "--conv-template", "llama-2")


def test_an_rwkv_vocab_file_in_a_model_folder_runs_no_code(rwkv_conversion):
    """Found by reading mlc_llm's gen_config: it eval()s each line of rwkv_vocab_v*.txt found beside
    config.json. The file (and the README, code and data a Hub repo carries) stays out of mlc_llm's
    view; the conversion finishes and says what it left out."""
    out, result = rwkv_conversion
    assert_nothing_leaked(out)
    assert result.returncode == 0, result.stderr
    assert "left out of" in result.stderr and "rwkv_vocab_v20230424.txt" in result.stderr
    assert (out / "app-config.json").is_file() and (out / "lib" / "out.wasm").read_bytes()[:4] == b"\0asm"
    shipped = {path.name for path in (out / "model" / "resolve" / "main").iterdir()}
    assert not shipped & {"rwkv_vocab_v20230424.txt", "modeling_evil.py", "README.md", "tokenizer_model"}


def get(url: str, path: str, host: str | None = None) -> tuple[int, bytes]:
    import http.client
    from urllib.parse import urlparse

    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    connection.putrequest("GET", path, skip_host=True)
    connection.putheader("Host", host or parsed.netloc)
    connection.endheaders()
    response = connection.getresponse()
    return response.status, response.read()


def test_preview_in_the_image_serves_the_bundle_and_nothing_else(rwkv_conversion, tmp_path):
    """The real preview container on a real bundle: its state, a traversal and a foreign Host are
    refused; a bundle whose library is a symlink out is refused at start (exit 2)."""
    from llm2wasm.host.browser import start_preview

    out, result = rwkv_conversion
    assert result.returncode == 0, result.stderr
    url, name = start_preview(app_image(), out)
    try:
        assert get(url, "/lib/out.wasm")[0] == 200
        for path in ("/./.llm2wasm/state.json", "/%2e%2e/%2e%2e/etc/passwd", "//etc/passwd", "/.llm2wasm/owner.json"):
            status, body = get(url, path)
            assert status in (400, 404) and b"steps" not in body and b"root:" not in body, path
        status, body = get(url, "/app-config.json", host="evil.example:80")
        assert status == 421 and b"evil" not in body
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    bundle = shutil.copytree(out, tmp_path / "bundle", symlinks=True)
    (bundle / "lib" / "out.wasm").unlink()
    (bundle / "lib" / "out.wasm").symlink_to("/etc/hostname")
    refused = invoke("preview", str(bundle), "--profile", "hermetic", "--port", str(free_port()))
    assert refused.returncode == 2, refused.stderr
    assert "lib/out.wasm" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "entry,problem",
    [
        ('path = "../tiny"', "must be a folder below the spec's folder"),
        ('path = "link-out"', "is a symlink out of the spec's folder"),
        ('path = "tiny"\nmodel_id = "../../x"', "must be letters, digits"),
    ],
)
def test_a_batch_spec_that_leads_out_of_its_folder_is_refused(made, tmp_path, entry, problem):
    spec_dir = tmp_path / "spec"
    shutil.copytree(made / "tiny", spec_dir / "tiny")
    (spec_dir / "link-out").symlink_to(made / "tiny")
    (spec_dir / "models.toml").write_text(f'[defaults]\nquantizations = ["q0f32"]\n\n[[model]]\n{entry}\n')
    out = tmp_path / "out"
    result = invoke("batch", str(spec_dir / "models.toml"), "-o", str(out), "--image", app_image())
    assert result.returncode == 2, result.stderr
    assert problem in result.stderr and "nothing was converted" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("folder", ["tiny", "lora"])
def test_a_symlink_out_of_an_input_folder_is_refused(made, tmp_path, folder):
    """merges.txt -> /proc/self/environ was copied by gen_config into the bundle, token and all."""
    model = copy_of(made, "tiny", tmp_path)
    adapter = copy_of(made, "lora", tmp_path) if folder == "lora" else None
    hostile = adapter if adapter else model
    (hostile / "merges.txt").symlink_to("/proc/self/environ")
    out = tmp_path / "out"
    extra = ["--adapter", str(adapter)] if adapter else []
    result = convert(model, out, "-q", "q0f32", "--conv-template", "llama-2", *extra)
    assert result.returncode == 2, result.stderr
    what = "adapter" if adapter else "model"
    assert f"merges.txt is a symlink to '/proc/self/environ', outside the {what} folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def pickle_checkpoint(path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch /output/out/PWNED",))

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"model.embed_tokens.weight": Payload()}, protocol=2))


def sparse(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)


def truncated_safetensors(model: Path) -> None:
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: 8 + 10])


BAD_MODELS = {
    "pickle that runs code": (
        lambda m: ((m / "model.safetensors").unlink(), pickle_checkpoint(m / "pytorch_model.bin")),
        "pytorch_model.bin is a pickle that names 'posix system'",
    ),
    "config is a JSON list": (lambda m: (m / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    "config is deeply nested": (
        lambda m: (m / "config.json").write_text("[" * 100_000 + "]" * 100_000),
        "nested too deeply",
    ),
    "sparse 3 GiB config": (lambda m: sparse(m / "config.json", 3 * 2**30), "more than any config.json needs"),
    "zip-bomb-like tokenizer": (lambda m: sparse(m / "tokenizer.json", 300 * 2**20), "more than any tokenizer.json"),
    "truncated safetensors": (truncated_safetensors, "is not a complete safetensors file"),
    "safetensors header not JSON": (
        lambda m: (m / "model.safetensors").write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00nope"),
        "its header is not a JSON object",
    ),
    "tokenizer is a FIFO": (lambda m: ((m / "tokenizer.json").unlink(), os.mkfifo(m / "tokenizer.json")), "a FIFO"),
    "tokenizer config nested": (
        lambda m: (m / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000),
        "tokenizer_config.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_a_damaged_or_hostile_model_exits_2_and_writes_nothing(made, tmp_path, case):
    model = copy_of(made, "tiny", tmp_path)
    damage, message = BAD_MODELS[case]
    damage(model)
    out = tmp_path / "out"
    result = convert(model, out, "-q", "q0f32", "--conv-template", "llama-2")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


# adapter_config.json fields no merge can use: each failed deep in the merge with a traceback, and
# the pattern held the conversion (and the CI job running it) without end, in peft as in llm2wasm
BAD_ADAPTER_CONFIGS = {
    "a pattern that backtracks without end": ({"target_modules": "(.*)*z"}, "takes over 2 s to match"),
    "a rank that is a string": ({"r": "16"}, "r is str '16': a rank is a whole number above 0"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTER_CONFIGS))
def test_a_hostile_adapter_config_exits_2_and_writes_nothing(made, tmp_path, case):
    model, adapter = copy_of(made, "tiny", tmp_path), copy_of(made, "lora", tmp_path)
    fields, message = BAD_ADAPTER_CONFIGS[case]
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    out = tmp_path / "out"
    started = time.monotonic()
    result = convert(model, out, "-q", "q0f32", "--conv-template", "llama-2", "--adapter", str(adapter))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 120
    assert not out.exists()


def test_paths_with_colon_and_comma_reach_the_converter(made, tmp_path):
    """`-v` would read ':' as a volume spec (exit 125); the converter itself must answer (here: the
    quantization it does not know)."""
    model = shutil.copytree(made / "tiny", tmp_path / "my:model,v2")
    result = convert(model, tmp_path / "out:put", "-q", "q9f16")
    assert result.returncode == 2, result.stderr
    assert "unknown quantization 'q9f16'" in result.stderr
    assert not (tmp_path / "out:put").exists()


@pytest.mark.parametrize(
    "make_output,message",
    [
        (lambda tmp: (tmp / "file").write_text("x") and tmp / "file", "is a file: pass a folder"),
        (lambda tmp: (tmp / "link").symlink_to(tmp / "nowhere") or tmp / "link", "which does not exist"),
    ],
)
def test_bad_output_paths_exit_2(made, tmp_path, make_output, message):
    out = make_output(tmp_path)
    result = convert(made / "tiny", out, "-q", "q0f32", "--conv-template", "llama-2")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_an_output_the_container_cannot_write_exits_2(made, tmp_path):
    """As root on the host the folder looks writable; the container (no capabilities) cannot write
    to a 0555 folder, and must say so rather than fail with a traceback after its checks."""
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = convert(made / "tiny", out, "-q", "q0f32", "--conv-template", "llama-2")
    finally:
        out.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert "cannot write" in result.stderr and "Traceback" not in result.stderr
    assert list(out.iterdir()) == []


def conversion_containers() -> list[str]:
    result = subprocess.run(
        ["docker", "ps", "-q", "--filter", "name=llm2wasm-convert-"], capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_a_second_conversion_into_a_busy_folder_is_refused_and_ctrl_c_stops_the_first(made, tmp_path):
    """Two conversions into one folder destroyed each other's work; Ctrl-C left the container
    compiling for minutes and marking steps finished."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [*INVOKE, "convert", str(made / "tiny"), "-q", "q4f32_1", "--conv-template", "llama-2", "-o", str(out),
         "--profile", "hermetic", "--no-lib-cache"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / ".llm2wasm" / "owner.json").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1]
            time.sleep(0.5)
        owner = json.loads((out / ".llm2wasm" / "owner.json").read_text())
        second = convert(made / "tiny", out, "-q", "q4f32_1", "--conv-template", "llama-2")
        assert second.returncode == 2, second.stderr
        assert "is being written by another conversion" in second.stderr
        assert f"started by pid {owner['host_pid']} on the host" in second.stderr
        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole group
        _, stderr = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 130, stderr
    assert "interrupted: stopping the conversion" in stderr and "re-run the same command to resume" in stderr
    assert conversion_containers() == []
    finished = set(json.loads((out / ".llm2wasm" / "state.json").read_text()).get("steps", {}))
    time.sleep(3)  # nothing goes on writing after the command returned
    assert set(json.loads((out / ".llm2wasm" / "state.json").read_text()).get("steps", {})) == finished
    assert not (out / "app-config.json").exists()
