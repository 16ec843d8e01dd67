import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host.pins import load_pin_file, parse_override, resolve_profile


def test_required_profiles_exist():
    assert {"stable", "nightly", "cpu", "hermetic"} <= set(load_pin_file())


def test_stable_profile_pins_the_known_good_upstream():
    stable = resolve_profile("stable")
    assert stable["mlc_ai_requirement"] == "mlc-ai-cu130==0.20.0"
    assert stable["mlc_llm_requirement"] == "mlc-llm-cu130==0.20.0.dev0"
    assert stable["mlc_llm_ref"] == "v0.20.0"
    assert stable["emsdk_version"] == "3.1.56" and stable["emsdk_ref"] == "3.1.56"
    assert stable["base_image"] == "ubuntu:24.04" and stable["python_version"] == "3.12"
    assert stable["mlc_wheel_index"] == "https://mlc.ai/wheels"
    assert stable.cuda


def test_no_profile_uses_the_gone_cu12x_wheels():
    for name in load_pin_file():
        pins = resolve_profile(name).pins
        for value in pins.values():
            assert not any(f"cu12{n}" in str(value) for n in (1, 2, 3)), (name, value)


def test_extends_inherits_and_overrides():
    nightly = resolve_profile("nightly")
    assert nightly["mlc_llm_ref"] == "main"
    assert nightly["emsdk_version"] == resolve_profile("stable")["emsdk_version"]
    assert resolve_profile("cpu").cuda is False
    hermetic = resolve_profile("hermetic")
    assert hermetic.cuda is False and hermetic["build_network"] == "host"


def test_override_applies():
    assert resolve_profile("stable", ["emsdk_version=3.1.57"])["emsdk_version"] == "3.1.57"


def test_override_bool_is_coerced():
    assert resolve_profile("stable", ["cuda=false"]).cuda is False
    with pytest.raises(UsageError, match="true or false"):
        resolve_profile("stable", ["cuda=maybe"])


def test_unknown_pin_is_refused_with_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown pin 'emsdk_verison'.*emsdk_version"):
        resolve_profile("stable", ["emsdk_verison=3.1.57"])


def test_unknown_profile_names_the_choices():
    with pytest.raises(UsageError, match=r"unknown profile 'stabel'.*stable"):
        resolve_profile("stabel")


@pytest.mark.parametrize("text", ["novalue", "=x", ""])
def test_malformed_override(text):
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_override(text)


def test_extends_loop_detected(tmp_path):
    path = tmp_path / "pins.toml"
    path.write_text('[profiles.a]\nextends = "b"\n[profiles.b]\nextends = "a"\n')
    with pytest.raises(UsageError, match="loop"):
        resolve_profile("a", path=path)


def test_invalid_toml_is_a_usage_error(tmp_path):
    path = tmp_path / "pins.toml"
    path.write_text("[profiles.a\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        resolve_profile("a", path=path)


def test_every_profile_has_every_pin_the_layers_use():
    from llm2wasm.host.layers import LAYERS

    needed = {pin for layer in LAYERS for pin in layer.build_args.values()}
    for name in load_pin_file():
        missing = needed - set(resolve_profile(name).pins)
        assert not missing, (name, missing)
