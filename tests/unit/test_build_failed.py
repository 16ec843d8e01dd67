"""A layer that failed its checks is kept as one inspectable image that replaces the one before;
a rebuilt layer's tag moves and the image it pointed at goes."""

import subprocess

import pytest

from llm2wasm.host import build


@pytest.fixture
def fake_docker(monkeypatch):
    """Tags in a dict; the docker calls recorded in order."""
    images: dict[str, str] = {}
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(build.docker, "image_id", lambda ref: images.get(ref))
    monkeypatch.setattr(build.docker, "tag", lambda source, target: calls.append(("tag", source, target)))
    monkeypatch.setattr(build.docker, "remove_if_unused", lambda image: calls.append(("rm", image)))
    return images, calls


def test_failed_tag_names_the_layer_and_profile():
    assert build.failed_tag("llm2wasm:emsdk-stable") == "llm2wasm-failed:emsdk-stable"
    assert (
        build.failed_tag("registry.example:5000/team/llm2wasm:app-cpu")
        == "registry.example:5000/team/llm2wasm-failed:app-cpu"
    )


def test_the_previous_failed_image_is_replaced_and_removed(fake_docker):
    images, calls = fake_docker
    images["llm2wasm-failed:emsdk-stable"] = "sha256:old"
    assert build.keep_failed_image("sha256:new", "llm2wasm:emsdk-stable") == "llm2wasm-failed:emsdk-stable"
    assert calls == [("tag", "sha256:new", "llm2wasm-failed:emsdk-stable"), ("rm", "sha256:old")]


def test_the_same_failed_image_again_removes_nothing(fake_docker):
    images, calls = fake_docker
    images["llm2wasm-failed:app-cpu"] = "sha256:same"
    build.keep_failed_image("sha256:same", "llm2wasm:app-cpu")
    assert calls == [("tag", "sha256:same", "llm2wasm-failed:app-cpu")]


def test_a_rebuilt_layer_removes_the_image_its_tag_pointed_at(fake_docker):
    images, calls = fake_docker
    images["llm2wasm:ml-cpu"] = "sha256:old"
    build.retag("sha256:new", "llm2wasm:ml-cpu")
    assert calls == [("tag", "sha256:new", "llm2wasm:ml-cpu"), ("rm", "sha256:old")]


def test_a_first_build_removes_nothing(fake_docker):
    _, calls = fake_docker
    build.retag("sha256:new", "llm2wasm:ml-cpu")
    assert calls == [("tag", "sha256:new", "llm2wasm:ml-cpu")]


class Said:
    def __init__(self):
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)


def test_a_failed_selftest_stops_the_build_and_keeps_the_image(fake_docker, monkeypatch, tmp_path):
    _, calls = fake_docker

    def docker_run(args, check=True, timeout=None, **_):
        assert args[-2:] == ["sha256:app", "selftest"] and "--network" in args
        return subprocess.CompletedProcess(args, 1, "", "step compile failed\nllm2wasm: selftest FAILED")

    monkeypatch.setattr(build.docker, "run", docker_run)
    said = Said()
    with pytest.raises(build.BuildFailed) as error:
        build.run_selftest_gate("sha256:app", "app", "llm2wasm:app-cpu", "[7/7]", said, tmp_path)
    assert "selftest failed (exit 1)" in str(error.value)
    assert ("tag", "sha256:app", "llm2wasm-failed:app-cpu") in calls  # kept for a look, not tagged
    assert not any(call[-1] == "llm2wasm:app-cpu" for call in calls)
    assert "selftest FAILED" in (tmp_path / "app-selftest.log").read_text()
    assert any("selftest FAILED (exit 1)" in line for line in said.lines)


def test_an_image_verified_without_its_selftest_is_not_publishable():
    from llm2wasm.host.pins import resolve_profile
    from llm2wasm.host.state import checks_digest

    profile = resolve_profile("cpu")
    assert checks_digest("app", profile, selftest=False) != checks_digest("app", profile)
    # layers without a selftest are verified the same either way
    assert checks_digest("ml", profile, selftest=False) == checks_digest("ml", profile)


def test_verify_selftest_of_an_image_never_built_names_the_fix(monkeypatch):
    from llm2wasm.errors import UsageError
    from llm2wasm.host.pins import resolve_profile
    from llm2wasm.host.verify import selftest_tag

    monkeypatch.setattr(build.docker, "image_id", lambda ref: None)
    with pytest.raises(UsageError) as error:
        selftest_tag(resolve_profile("cpu"), "mine")
    assert "image mine:app-cpu not found: build it first with `invoke build --profile cpu --repository mine`" in str(
        error.value
    )
