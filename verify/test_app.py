"""Checks for the app layer: the conversion command, its metadata, an unprivileged user."""

import llm2wasm


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
