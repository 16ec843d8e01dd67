import json
import re

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host import layers
from llm2wasm.host.layers import (
    LAYERS,
    Layer,
    ancestors,
    descendants,
    get_layer,
    image_arg,
    layers_until,
    registry_json,
    validate_registry,
)
from llm2wasm.host.pins import PROJECT_ROOT


def test_registry_is_in_build_order_with_files():
    validate_registry()
    assert [layer.name for layer in LAYERS] == ["base", "python", "ml", "emsdk", "web-runtime", "runtime-env", "app"]


def test_the_web_toolchain_is_a_branch_beside_the_ml_wheels_joined_at_runtime_env():
    assert [layer.name for layer in ancestors("web-runtime")] == ["base", "python", "emsdk", "web-runtime"]
    assert [layer.name for layer in ancestors("ml")] == ["base", "python", "ml"]
    assert [layer.name for layer in ancestors("runtime-env")] == [layer.name for layer in LAYERS[:-1]]
    assert [layer.name for layer in descendants("ml")] == ["runtime-env", "app"]
    assert [layer.name for layer in descendants("emsdk")] == ["web-runtime", "runtime-env", "app"]
    assert get_layer("runtime-env").depends_on == ("web-runtime", "ml")
    assert image_arg("web-runtime") == "WEB_RUNTIME_IMAGE"


def test_ancestors_and_until():
    assert [layer.name for layer in ancestors("emsdk")] == ["base", "python", "emsdk"]
    assert [layer.name for layer in layers_until("python")] == ["base", "python"]
    assert len(layers_until(None)) == len(LAYERS)


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ((Layer("b", "a", "x"), Layer("a", None, "x")), "layer b comes before a, which it depends on"),
        ((Layer("a", None, "x"), Layer("b", "a", "x", joins=("c",))), "layer b comes before c"),
        (
            (Layer("a", None, "x"), Layer("b", "a", "x", derived_args={"X": "c"})),
            "layer b derives X from c, which it does not depend on",
        ),
        (
            (Layer("a", None, "x", {"REF": "ref"}, resolved_args={"COMMIT": "other_ref"}),),
            "layer a: COMMIT carries what pin other_ref resolved to; pass other_ref too",
        ),
    ],
)
def test_a_registry_out_of_order_is_refused(monkeypatch, broken, message):
    monkeypatch.setattr(layers, "LAYERS", broken)
    with pytest.raises(AssertionError, match=message):
        validate_registry()


def test_the_preflight_feeds_the_commits_and_the_base_digest_to_the_layers_that_clone_and_pull():
    assert get_layer("base").resolved_args == {"BASE_IMAGE_DIGEST": "base_image"}
    assert get_layer("emsdk").resolved_args == {"EMSDK_COMMIT": "emsdk_ref"}
    assert get_layer("web-runtime").resolved_args == {"MLC_LLM_COMMIT": "mlc_llm_ref"}
    assert not any(layer.resolved_args for layer in LAYERS if layer.name not in {"base", "emsdk", "web-runtime"})


@pytest.mark.parametrize(
    ("layer", "arg", "label"),
    [
        ("base", "BASE_IMAGE_NAME", "org.opencontainers.image.base.name"),
        ("base", "BASE_IMAGE_DIGEST", "org.opencontainers.image.base.digest"),
        ("emsdk", "EMSDK_COMMIT", "io.llm2wasm.emsdk.commit"),
        ("web-runtime", "MLC_LLM_COMMIT", "io.llm2wasm.mlc-llm.commit"),
    ],
)
def test_each_resolved_value_is_recorded_in_a_label(layer, arg, label):
    text = get_layer(layer).dockerfile.read_text()
    assert f'{label}="${{{arg}}}"' in text


@pytest.mark.parametrize(("layer", "arg"), [("emsdk", "EMSDK_COMMIT"), ("web-runtime", "MLC_LLM_COMMIT")])
def test_each_clone_is_held_to_the_preflights_commit(layer, arg):
    """After `git clone --branch REF`, the layer stops when HEAD is not the commit the preflight found."""
    text = get_layer(layer).dockerfile.read_text()
    clone = text.index("clone --quiet --depth 1 --branch")
    check = text.index(f'if [ -n "${arg}" ] && [ "$cloned" != "${arg}" ]; then', clone)
    assert text.index('cloned="$(git -C', clone) < check
    assert "moved:" in text[check : check + 400] and "exit 1" in text[check : check + 400]


def test_unknown_layer():
    with pytest.raises(UsageError, match=r"unknown layer 'emsk'.*emsdk"):
        get_layer("emsk")


def test_registry_json_for_ci():
    data = json.loads(registry_json())
    assert data[0] == {
        "name": "base",
        "parent": None,
        "joins": [],
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
    expected = set(layer.build_args) | set(layer.derived_args) | set(layer.resolved_args)
    expected |= {"BASE_IMAGE"} | {image_arg(j) for j in layer.joins}
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
