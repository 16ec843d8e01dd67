import json
import re

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.layers import LAYERS, ancestors, get_layer, layers_until, registry_json, validate_registry
from llm2wasm.pins import PROJECT_ROOT


def test_registry_is_a_chain_with_files():
    validate_registry()
    assert [layer.name for layer in LAYERS] == ["base", "python", "ml", "emsdk", "web-runtime", "runtime-env", "app"]


def test_ancestors_and_until():
    assert [layer.name for layer in ancestors("emsdk")] == ["base", "python", "ml", "emsdk"]
    assert [layer.name for layer in layers_until("python")] == ["base", "python"]
    assert len(layers_until(None)) == len(LAYERS)


def test_unknown_layer():
    with pytest.raises(UsageError, match=r"unknown layer 'emsk'.*emsdk"):
        get_layer("emsk")


def test_registry_json_for_ci():
    data = json.loads(registry_json())
    assert data[0] == {
        "name": "base",
        "parent": None,
        "dockerfile": "images/base/Dockerfile",
        "checks": "verify/test_base.py",
        "summary": LAYERS[0].summary,
    }


def test_no_verify_module_outside_the_registry():
    modules = {path.name for path in (PROJECT_ROOT / "verify").glob("test_*.py")}
    assert modules == {layer.check_module.name for layer in LAYERS}


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_dockerfile_declares_exactly_the_registry_args(layer):
    text = layer.dockerfile.read_text()
    declared = set(re.findall(r"^ARG ([A-Z0-9_]+)", text, re.MULTILINE)) - {"DEBIAN_FRONTEND"}
    expected = set(layer.build_args) | set(layer.derived_args) | {"BASE_IMAGE"}
    if layer.name == "app":
        expected |= {"LLM2WASM_REVISION", "LLM2WASM_CREATED"}
    assert declared == expected


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.name)
def test_dockerfile_habits(layer):
    text = layer.dockerfile.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert 'SHELL ["/bin/bash", "-o", "pipefail", "-c"]' in text
    assert "FROM $BASE_IMAGE" in text
    assert "org.opencontainers.image.title" in text
    # `ENV NAME = value` sets NAME to the literal "= value" (the seed's bug; hadolint misses it)
    assert not re.search(r"^\s*ENV\s+\w+\s+=", text, re.MULTILINE)
    assert "--break-system-packages" not in code
    if "apt-get install" in text:
        assert "rm -rf /var/lib/apt/lists/*" in text
