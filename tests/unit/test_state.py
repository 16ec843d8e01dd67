from llm2wasm.host.pins import resolve_profile
from llm2wasm.host.state import VerifiedImages, checks_digest


def test_records_per_image(tmp_path):
    state = VerifiedImages("p", state_dir=tmp_path)
    state.record("ml", "sha256:good", "d1")
    state.record("ml", "sha256:other", "d1")
    state.forget("ml", "sha256:other")  # a failing image must not erase the good one
    reloaded = VerifiedImages("p", state_dir=tmp_path)
    assert reloaded.is_verified("ml", "sha256:good", "d1")
    assert not reloaded.is_verified("ml", "sha256:other", "d1")
    assert not reloaded.is_verified("ml", "sha256:good", "d2")  # checks or pins changed
    assert not reloaded.is_verified("emsdk", "sha256:good", "d1")


def test_digest_follows_pins_and_parent_checks():
    stable = resolve_profile("stable")
    assert checks_digest("emsdk", stable) != checks_digest("emsdk", resolve_profile("stable", ["emsdk_version=3.1.57"]))
    assert checks_digest("emsdk", stable) != checks_digest("ml", stable)
