"""A layer that failed its checks is kept as one inspectable image that replaces the one before."""

from llm2wasm import build


def test_failed_tag_names_the_layer_and_profile():
    assert build.failed_tag("llm2wasm:emsdk-stable") == "llm2wasm-failed:emsdk-stable"
    assert (
        build.failed_tag("registry.example:5000/team/llm2wasm:app-cpu")
        == "registry.example:5000/team/llm2wasm-failed:app-cpu"
    )


def test_the_previous_failed_image_is_replaced_and_removed(monkeypatch):
    calls = []
    images = {"llm2wasm-failed:emsdk-stable": "sha256:old"}
    monkeypatch.setattr(build.docker, "image_id", lambda ref: images.get(ref))
    monkeypatch.setattr(build.docker, "tag", lambda source, target: calls.append(("tag", source, target)))
    monkeypatch.setattr(build.docker, "remove_if_unused", lambda image: calls.append(("rm", image)))
    assert build.keep_failed_image("sha256:new", "llm2wasm:emsdk-stable") == "llm2wasm-failed:emsdk-stable"
    assert calls == [("tag", "sha256:new", "llm2wasm-failed:emsdk-stable"), ("rm", "sha256:old")]


def test_the_same_failed_image_again_removes_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(build.docker, "image_id", lambda ref: "sha256:same")
    monkeypatch.setattr(build.docker, "tag", lambda source, target: calls.append("tag"))
    monkeypatch.setattr(build.docker, "remove_if_unused", lambda image: calls.append("rm"))
    build.keep_failed_image("sha256:same", "llm2wasm:app-cpu")
    assert calls == ["tag"]


def test_a_rebuilt_layer_removes_the_image_its_tag_pointed_at(monkeypatch):
    calls = []
    images = {"llm2wasm:ml-cpu": "sha256:old"}
    monkeypatch.setattr(build.docker, "image_id", lambda ref: images.get(ref))
    monkeypatch.setattr(build.docker, "tag", lambda source, target: calls.append(("tag", source, target)))
    monkeypatch.setattr(build.docker, "remove_if_unused", lambda image: calls.append(("rm", image)))
    build.retag("sha256:new", "llm2wasm:ml-cpu")
    assert calls == [("tag", "sha256:new", "llm2wasm:ml-cpu"), ("rm", "sha256:old")]
