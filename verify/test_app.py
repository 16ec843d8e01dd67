"""Checks for the app layer: the conversion command, its metadata, an unprivileged user, the WGSL
validator, and the WebLLM that `llm2wasm preview` serves."""

import json
from pathlib import Path

import llm2wasm
from llm2wasm.image.convert.bundle import model_record
from llm2wasm.image.convert.inputs import ConvertRequest
from llm2wasm.image.convert.webllm_types import interface_fields


def test_llm2wasm_command(host):
    assert host.check_output("llm2wasm --version") == f"llm2wasm {llm2wasm.__version__}"


def test_convert_help(host):
    out = host.check_output("llm2wasm convert --help")
    for option in ("--quantization", "--adapter", "--output"):
        assert option in out


def test_entrypoint_and_user(image_config):
    assert image_config["Entrypoint"] == ["llm2wasm"]
    assert image_config["User"] == "10001:10001"
    assert image_config["WorkingDir"] == "/work"


def test_runs_unprivileged(host):
    assert host.check_output("id -u") == "10001"
    assert host.check_output("id -un") == "llm2wasm"


def test_oci_labels(image_config):
    labels = image_config.get("Labels") or {}
    for key in ("title", "description", "source", "licenses", "revision", "created"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"label org.opencontainers.image.{key} missing"


def test_no_secrets_in_metadata(image_config):
    names = {item.split("=", 1)[0] for item in image_config.get("Env") or []}
    assert not names & {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}


def test_toolkit_not_installed(exec_):
    # the image needs only the conversion half of llm2wasm, not docker/invoke/testinfra
    result = exec_.python("import importlib.util as u\nprint([m for m in ('invoke', 'testinfra') if u.find_spec(m)])")
    assert result.stdout.strip() == "[]"


def test_webllm_is_the_pinned_version(host, image_env, pins):
    webllm = image_env["LLM2WASM_WEBLLM_DIR"]
    package = json.loads(host.file(f"{webllm}/package.json").content_string)
    assert package["name"] == "@mlc-ai/web-llm" and package["version"] == pins["webllm_version"]
    module = host.file(f"{webllm}/lib/index.js")
    assert module.is_file and module.size > 1_000_000, "lib/index.js missing or too small to be WebLLM"


def test_app_config_follows_the_shipped_webllms_types(host, image_env):
    """Every field llm2wasm writes into a ModelRecord (and its overrides) exists in the WebLLM types."""
    declarations = host.file(f"{image_env['LLM2WASM_WEBLLM_DIR']}/lib/config.d.ts").content_string
    record_fields = interface_fields(declarations, "ModelRecord")
    chat_fields = interface_fields(declarations, "ChatConfig")  # ChatOptions = Partial<ChatConfig>
    request = ConvertRequest(
        model_dir=Path("/m"),
        quantization="q4f16_1",
        conv_template="llama-2",
        output=Path("/o"),
        model_id="m",
        prefill_chunk_size=1024,
        context_window=2048,
    )
    memory = {"without_kv_cache_mb": 1.0, "kv_cache_mb_per_token": 0.1}
    record = model_record(request, {"context_window_size": 2048}, memory)
    assert set(record) <= record_fields, set(record) - record_fields
    assert set(record["overrides"]) <= chat_fields, set(record["overrides"]) - chat_fields


def test_wgsl_validator_rejects_the_defect_and_accepts_the_repair(exec_):
    # the validator every compiled library goes through; its self-check includes a kernel it must reject
    result = exec_("python", "-m", "llm2wasm.image.convert.wgsl", "--self-check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WGSL validator self-check passed" in result.stdout


def test_preview_command(host):
    out = host.check_output("llm2wasm preview --help")
    assert "--port" in out and "--host" in out


def test_no_build_leftovers(exec_, image_env):
    """What building needed and conversions do not: package managers' caches (apt's downloaded
    packages, pip's, npm's), scratch files, and git histories of sources. The emsdk checkout's own
    .git (one commit deep) stays: its checks read it."""
    keep = {f"{image_env['EMSDK']}/.git"} if "EMSDK" in image_env else set()
    script = (
        "for p in /root/.cache /root/.npm /home/llm2wasm/.cache /home/llm2wasm/.npm; do [ -e $p ] && echo $p; done; "
        "find /tmp /var/tmp -mindepth 1 -maxdepth 1; "
        "find /var/cache/apt -name '*.deb' -o -name '*.bin'; "
        "find /opt /usr/local /srv /root /home /work -name .git -prune 2>/dev/null; true"
    )
    result = exec_("sh", "-c", script, user="0:0", timeout=300)
    leftovers = sorted(set(result.stdout.split()) - keep)
    assert result.returncode == 0 and not leftovers, f"left behind by the build: {leftovers}"
