"""Preflight against real local servers on 127.0.0.1 (a fake registry, wheel pages, an npm packument) and
local bare git repositories: every success path, and each failure with what it names as nearest."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from packaging.version import Version

from llm2wasm.errors import UsageError
from llm2wasm.host import preflight as preflight_module
from llm2wasm.host.layers import LAYERS
from llm2wasm.host.pins import Profile, resolve_profile
from llm2wasm.host.preflight import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    PYPI_SIMPLE,
    PreflightResult,
    for_layers,
    format_results,
    manifest_digest,
    nearest_versions,
    parse_image_reference,
    parse_pip_options,
    pinned_by_digest,
    preflight_or_stop,
    resolved_pins,
    run_preflight,
)

INTEGRITY = "sha512-" + "A" * 86 + "=="
OTHER_INTEGRITY = "sha512-" + "B" * 86 + "=="

Route = tuple[int, dict[str, str], bytes] | Callable[["Handler"], tuple[int, dict[str, str], bytes]]


class Handler(BaseHTTPRequestHandler):
    server: LocalServer

    def do_GET(self) -> None:
        self.server.log.append((self.path, dict(self.headers)))
        path = urlsplit(self.path).path
        route = self.server.routes.get(path)
        if route is None and path.startswith("/v2/"):
            route = self.server.registry
        status, headers, body = (404, {}, b"not found") if route is None else route(self) if callable(route) else route
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class LocalServer(ThreadingHTTPServer):
    """Routes by path; /v2/ paths go to a small fake of the registry v2 API over `images`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, Route] = {}
        self.log: list[tuple[str, dict[str, str]]] = []
        self.images: dict[str, dict[str, tuple[str, dict]]] = {}  # repository -> tag -> (media type, manifest)
        self.token: str | None = None  # when set, the registry wants `Bearer <token>` from /token
        self.content_digest: str | None = None  # when set, the Docker-Content-Digest header sent instead

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_port}"

    def requested(self, path: str) -> int:
        return sum(1 for logged, _ in self.log if urlsplit(logged).path == path)

    def registry(self, handler: Handler) -> tuple[int, dict[str, str], bytes]:
        path = urlsplit(handler.path).path.removeprefix("/v2/")
        if path.endswith("/tags/list"):
            repository, reference = path.removesuffix("/tags/list"), None
        else:
            repository, _, reference = path.partition("/manifests/")
        if self.token and handler.headers.get("Authorization") != f"Bearer {self.token}":
            challenge = f'Bearer realm="{self.url}/token",service="test-registry",scope="repository:{repository}:pull"'
            return 401, {"WWW-Authenticate": challenge}, errors("UNAUTHORIZED")
        if repository not in self.images:
            return 404, {"Content-Type": "application/json"}, errors("NAME_UNKNOWN")
        tags = self.images[repository]
        if reference is None:
            return 200, {"Content-Type": "application/json"}, as_json({"name": repository, "tags": list(tags)})
        by_digest = {sha256_digest(as_json(manifest)): (kind, manifest) for kind, manifest in tags.values()}
        if reference not in tags and reference not in by_digest:
            return 404, {"Content-Type": "application/json"}, errors("MANIFEST_UNKNOWN")
        media_type, manifest = tags.get(reference) or by_digest[reference]
        body = as_json(manifest)
        # as a real registry does: the digest of the bytes it sends
        return (
            200,
            {"Content-Type": media_type, "Docker-Content-Digest": self.content_digest or sha256_digest(body)},
            body,
        )


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def sha256_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def errors(code: str) -> bytes:
    return as_json({"errors": [{"code": code, "message": code.lower()}]})


def html(*anchors: str) -> tuple[int, dict[str, str], bytes]:
    body = "<!DOCTYPE html><html><body>\n" + "<br>\n".join(anchors) + "\n</body></html>"
    return 200, {"Content-Type": "text/html"}, body.encode()


def anchor(href: str, text: str = "", requires_python: str = "") -> str:
    extra = f' data-requires-python="{requires_python}"' if requires_python else ""
    return f'<a href="{href}"{extra}>{text or href.rsplit("/", 1)[-1]}</a>'


def image_index(*platforms: tuple[str, str]) -> tuple[str, dict]:
    manifests = [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": f"sha256:{n:064x}",
            "size": 1,
            "platform": {"os": os_name, "architecture": arch},
        }
        for n, (os_name, arch) in enumerate(platforms)
    ]
    return OCI_INDEX, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}


TORCH_2_13_REQUIRES = [
    "cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3;"
    ' platform_system == "Linux"',
    'cuda-bindings<14,>=13.0.3; platform_system == "Linux" and python_version < "3.15"',
    'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
    'nvidia-nccl-cu13==2.29.7; platform_system == "Linux"',
    "filelock",
]
TORCH_2_10_REQUIRES = [
    'nvidia-cuda-nvrtc-cu12==12.8.93; platform_system == "Linux"',
    'nvidia-cuda-runtime-cu12==12.8.90; platform_system == "Linux"',
    'nvidia-cublas-cu12==12.8.4.1; platform_system == "Linux"',
    "filelock",
]


def metadata(requires: list[str]) -> tuple[int, dict[str, str], bytes]:
    text = "Metadata-Version: 2.4\nName: torch\nVersion: 0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    return 200, {"Content-Type": "text/plain"}, text.encode()


MLC_FILES = [
    "mlc_ai_cu128-0.20.0-cp312-cp312-manylinux_2_28_x86_64.whl",
    "mlc_ai_cu128-0.20.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "mlc_ai_cu128-0.19.0-cp312-cp312-manylinux_2_28_x86_64.whl",
    "mlc_llm_cu128-0.20.0.dev0-cp312-cp312-manylinux_2_28_x86_64.whl",
    "mlc_llm_nightly_cu128-0.21.dev5-cp312-cp312-manylinux_2_28_x86_64.whl",
    "mlc_llm-0.1.dev0%2Bgabc.123-py3-none-any.whl",
    "mlc_ai_arm-0.20.0-cp312-cp312-manylinux_2_28_aarch64.whl",
    "mlc_ai_arm-0.20.0-cp312-cp312-macosx_13_0_arm64.whl",
    "not-a-wheel.whl",
    "README.html",
]


@pytest.fixture
def server():
    local = LocalServer()
    thread = threading.Thread(target=local.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    local.images["library/ubuntu"] = {
        "24.04": image_index(("linux", "amd64"), ("linux", "arm64"), ("unknown", "unknown")),
        "24.10": image_index(("linux", "amd64")),
        "22.04": image_index(("linux", "amd64")),
        "noble": image_index(("linux", "amd64")),
    }
    local.images["single"] = {"1.0": (DOCKER_MANIFEST, {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST})}
    local.images["armonly"] = {"1.0": image_index(("linux", "arm64"), ("unknown", "unknown"))}
    # the flat find-links page, with absolute and relative hrefs as real pages have
    local.routes["/mlc/"] = html(
        *(anchor(f"{local.url}/files/{name}" if n % 2 else name) for n, name in enumerate(MLC_FILES))
    )
    local.routes["/simple/"] = html(
        *(
            anchor(f"/simple/{name}/", name)
            for name in ("torch", "transformers", "peft", "bitsandbytes", "apache-tvm-ffi")
        )
    )
    local.routes["/simple/torch/"] = html(
        anchor("../../files/torch-2.13.0%2Bcpu-cp312-cp312-manylinux_2_28_x86_64.whl#sha256=00"),
        anchor("../../files/torch-2.12.0%2Bcpu-cp312-cp312-manylinux_2_28_x86_64.whl#sha256=00"),
    )
    # torch as the Python registry serves it: CUDA 13 wheels (2.13.0) and CUDA 12.8 (2.10.0), each
    # with its PEP 658 metadata file; the Requires-Dist lines are the real ones
    local.routes["/cuda/torch/"] = html(
        anchor("/files/torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl#sha256=00"),
        anchor("/files/torch-2.10.0-cp312-cp312-manylinux_2_28_x86_64.whl#sha256=00"),
        anchor("/files/torch-2.9.0%2Bcu126-cp312-cp312-manylinux_2_28_x86_64.whl#sha256=00"),
        anchor("/files/torch-2.12.0%2Bcpu-cp312-cp312-manylinux_2_28_x86_64.whl#sha256=00"),
    )
    local.routes["/files/torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl.metadata"] = metadata(TORCH_2_13_REQUIRES)
    local.routes["/files/torch-2.10.0-cp312-cp312-manylinux_2_28_x86_64.whl.metadata"] = metadata(TORCH_2_10_REQUIRES)
    local.routes["/simple/transformers/"] = html(
        anchor("/files/transformers-5.24.0-py3-none-any.whl", requires_python="&gt;=3.10"),
        anchor("/files/transformers-5.24.0.tar.gz"),
    )
    local.routes["/simple/peft/"] = html(anchor("/files/peft-0.21.2.tar.gz"))
    local.routes["/simple/bitsandbytes/"] = html(
        anchor("/files/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl")
    )
    local.routes["/simple/apache-tvm-ffi/"] = html(
        anchor("/files/apache_tvm_ffi-0.1.15.post2-cp312-abi3-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")
    )
    local.routes["/simple/wgpudawn/"] = html(anchor("/files/wgpudawn-0.32.0.4-py3-none-manylinux_2_28_x86_64.whl"))
    local.routes["/simple/futureonly/"] = html(
        anchor("/files/futureonly-1.0-py3-none-any.whl", requires_python="&gt;=3.14")
    )
    local.routes["/npm/@mlc-ai/web-llm"] = (
        200,
        {"Content-Type": "application/json"},
        as_json(
            {
                "name": "@mlc-ai/web-llm",
                "versions": {
                    version: {"version": version, "dist": {"integrity": INTEGRITY if version == "0.2.84" else "x"}}
                    for version in ("0.2.79", "0.2.83", "0.2.84", "0.3.0")
                },
            }
        ),
    )
    yield local
    local.shutdown()
    local.server_close()


def git(*args: str, cwd: Path | None = None) -> str:
    command = ["git", "-c", "user.name=preflight", "-c", "user.email=preflight@example.invalid", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def git_remote(tmp_path_factory) -> Path:
    """A bare repository with tags 3.1.55, 3.1.56, v0.19.0, annotated v0.20.0, and branches main, release."""
    root = tmp_path_factory.mktemp("git")
    remote, work = root / "remote.git", root / "work"
    git("init", "--quiet", "--bare", str(remote))
    git("init", "--quiet", "-b", "main", str(work))
    git("commit", "--quiet", "--allow-empty", "-m", "first", cwd=work)
    git("tag", "3.1.55", cwd=work)
    git("tag", "v0.19.0", cwd=work)
    git("commit", "--quiet", "--allow-empty", "-m", "second", cwd=work)
    git("tag", "3.1.56", cwd=work)
    git("tag", "-a", "-m", "release", "v0.20.0", cwd=work)
    git("branch", "release", cwd=work)
    git("push", "--quiet", "--tags", str(remote), "main", "release", cwd=work)
    return remote


def make_profile(server: LocalServer, git_remote: Path, **changes: str) -> Profile:
    """The stable profile's pins, every source pointed at the local servers; all of it resolves."""
    pins = dict(resolve_profile("stable").pins)
    pins.update(
        base_image=f"{server.host}/library/ubuntu:24.04",
        python_version="3.12",
        pip_options=f"--index-url {server.url}/simple/",
        mlc_wheel_index=f"{server.url}/mlc/",
        mlc_ai_requirement="mlc-ai-cu128==0.20.0",
        mlc_llm_requirement="mlc-llm-cu128==0.20.0.dev0",
        torch_requirement="torch==2.13.0+cpu",
        # a CPU torch: the profile's MLC wheels are not CUDA builds either (the CUDA check has its tests)
        cuda=False,
        variant="cpu",
        transformers_requirement="transformers==5.24.0",
        peft_requirement="peft==0.21.2",
        bitsandbytes_requirement="bitsandbytes==0.50.2",
        tvm_ffi_requirement="apache-tvm-ffi==0.1.15.post2",
        wgsl_validator_requirement="wgpudawn==0.32.0.4",
        emscripten_source="emsdk",
        emsdk_repo=str(git_remote),
        emsdk_ref="3.1.56",
        mlc_llm_repo=git_remote.as_uri(),
        mlc_llm_ref="v0.20.0",
        npm_registry=f"{server.url}/npm",
        webllm_version="0.2.84",
        webllm_integrity=INTEGRITY,
        # no hash lock: the ml lock's check is a file check of this checkout (tests/unit/test_locks.py)
        ml_lock="",
    )
    pins.update(changes)
    return Profile("test", "local sources", pins)


def preflight(profile: Profile) -> list[PreflightResult]:
    return run_preflight(profile, machine="x86_64")


def result_for(results: list[PreflightResult], pin: str) -> PreflightResult:
    matching = [result for result in results if pin in result.pins]
    assert len(matching) == 1, (pin, results)
    return matching[0]


# --- everything resolves ---------------------------------------------------------------------------


def test_a_profile_whose_pins_all_exist_passes_every_check(server, git_remote):
    results = preflight(make_profile(server, git_remote))
    text, healthy = format_results(results)
    assert healthy, text
    checked = {pin for result in results for pin in result.pins}
    assert checked == {
        "base_image",
        "mlc_ai_requirement",
        "mlc_llm_requirement",
        "torch_requirement",
        "transformers_requirement",
        "peft_requirement",
        "bitsandbytes_requirement",
        "tvm_ffi_requirement",
        "wgsl_validator_requirement",
        "emsdk_repo",
        "emsdk_ref",
        "mlc_llm_repo",
        "mlc_llm_ref",
        "npm_registry",
        "webllm_version",
        "webllm_integrity",
    }
    index_digest = sha256_digest(as_json(server.images["library/ubuntu"]["24.04"][1]))
    assert result_for(results, "base_image").message == (
        f"base_image {server.host}/library/ubuntu:24.04: linux/amd64 in {server.host}/library/ubuntu, {index_digest}"
    )
    assert (
        "mlc_ai_cu128-0.20.0-cp312-cp312-manylinux_2_28_x86_64.whl" in result_for(results, "mlc_ai_requirement").message
    )
    assert "torch-2.13.0+cpu-cp312" in result_for(results, "torch_requirement").message
    assert "peft-0.21.2.tar.gz" in result_for(results, "peft_requirement").message  # an sdist builds anywhere
    assert "transformers-5.24.0-py3-none-any.whl" in result_for(results, "transformers_requirement").message
    assert ": tag in " in result_for(results, "emsdk_ref").message
    assert ": tag in " in result_for(results, "mlc_llm_ref").message
    assert "integrity matches" in result_for(results, "webllm_integrity").message


def test_each_page_is_fetched_once_per_run(server, git_remote):
    # both MLC requirements read the same find-links page, concurrently
    preflight(make_profile(server, git_remote))
    assert server.requested("/mlc/") == 1
    assert server.requested("/simple/torch/") == 1
    assert server.requested("/npm/@mlc-ai/web-llm") == 1


def test_emsdk_is_not_checked_when_emscripten_comes_from_debian(server, git_remote):
    results = preflight(
        make_profile(server, git_remote, emscripten_source="debian", emsdk_repo="git://unused.invalid/x")
    )
    assert not [result for result in results if "emsdk_ref" in result.pins]
    assert format_results(results)[1]


def test_format_results_names_the_fix_only_for_problems():
    text, healthy = format_results(
        [
            PreflightResult(("a",), True, "a fine", fix="unused"),
            PreflightResult(("b",), False, "b missing", fix="--set b=1"),
        ]
    )
    assert not healthy
    assert text == "ok  a fine\nNO  b missing\n     fix: --set b=1"
    assert format_results([PreflightResult(("a",), True, "a fine")]) == ("ok  a fine", True)


# --- base image ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "registry", "repository", "reference", "written"),
    [
        ("ubuntu:24.04", "registry-1.docker.io", "library/ubuntu", "24.04", "ubuntu"),
        ("ubuntu", "registry-1.docker.io", "library/ubuntu", "latest", "ubuntu"),
        ("someone/tool:1", "registry-1.docker.io", "someone/tool", "1", "someone/tool"),
        (
            "docker.io/library/debian:bookworm",
            "registry-1.docker.io",
            "library/debian",
            "bookworm",
            "docker.io/library/debian",
        ),
        ("localhost/app:dev", "localhost", "app", "dev", "localhost/app"),
        ("127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", "t", "127.0.0.1:5000/a/b"),
        ("ghcr.io/o/r@sha256:" + "0" * 64, "ghcr.io", "o/r", "sha256:" + "0" * 64, "ghcr.io/o/r"),
        ("ghcr.io/o/r:1.0@sha256:" + "1" * 64, "ghcr.io", "o/r", "sha256:" + "1" * 64, "ghcr.io/o/r"),
    ],
)
def test_image_references_follow_dockers_rules(text, registry, repository, reference, written):
    image = parse_image_reference(text)
    assert (image.registry, image.repository, image.reference, image.written_name) == (
        registry,
        repository,
        reference,
        written,
    )


def test_loopback_registries_are_plain_http_others_https():
    assert parse_image_reference("127.0.0.1:5000/a:1").base_url == "http://127.0.0.1:5000"
    assert parse_image_reference("localhost:5000/a:1").base_url == "http://localhost:5000"
    assert parse_image_reference("[::1]:5000/a:1").base_url == "http://[::1]:5000"
    assert parse_image_reference("ubuntu").base_url == "https://registry-1.docker.io"
    assert parse_image_reference("registry.example:5000/a:1").base_url == "https://registry.example:5000"


def test_a_missing_tag_names_the_nearest_tags(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, base_image=f"{server.host}/library/ubuntu:24.40")), "base_image"
    )
    assert not result.ok
    assert result.message.startswith(
        f"base_image {server.host}/library/ubuntu:24.40: no such tag in {server.host}/library/ubuntu; nearest: "
    )
    nearest = result.message.split("nearest: ")[1].split(", ")
    assert {"24.04", "24.10"} <= set(nearest) and "noble" not in nearest
    assert result.fix == f"pin an existing tag: --set base_image={server.host}/library/ubuntu:{nearest[0]}"


def test_an_unknown_repository_is_named(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, base_image=f"{server.host}/nothere:1")), "base_image"
    )
    assert not result.ok
    assert f"no repository nothere in {server.host}" in result.message
    assert server.requested("/v2/nothere/tags/list") == 0  # NAME_UNKNOWN already said it


def test_a_missing_digest_is_named(server, git_remote):
    digest = "sha256:" + "f" * 64
    result = result_for(
        preflight(make_profile(server, git_remote, base_image=f"{server.host}/single@{digest}")), "base_image"
    )
    assert not result.ok and f"no manifest {digest} in {server.host}/single" in result.message


def test_a_single_platform_manifest_is_accepted(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, base_image=f"{server.host}/single:1.0")), "base_image"
    )
    assert result.ok and "(one platform)" in result.message


def test_a_manifest_list_without_this_hosts_platform_fails(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, base_image=f"{server.host}/armonly:1.0")), "base_image"
    )
    assert not result.ok
    assert result.message.endswith(f"has no linux/amd64 image in {server.host}/armonly; platforms: linux/arm64")
    # the same index is fine on an arm64 host
    arm = run_preflight(make_profile(server, git_remote, base_image=f"{server.host}/armonly:1.0"), machine="aarch64")
    assert result_for(arm, "base_image").ok


def test_a_registry_asking_for_a_bearer_token_gets_an_anonymous_one(server, git_remote):
    server.token = "anonymous-pull-token"
    server.routes["/token"] = (200, {"Content-Type": "application/json"}, as_json({"token": server.token}))
    result = result_for(preflight(make_profile(server, git_remote)), "base_image")
    assert result.ok, result.message
    token_requests = [path for path, _ in server.log if path.startswith("/token")]
    assert len(token_requests) == 1
    query = parse_qs(urlsplit(token_requests[0]).query)
    assert query == {"service": ["test-registry"], "scope": ["repository:library/ubuntu:pull"]}
    authorized = [
        h for p, h in server.log if p.startswith("/v2/") and h.get("Authorization") == f"Bearer {server.token}"
    ]
    assert authorized


def test_a_repository_the_token_does_not_open_is_reported_as_unknown(server, git_remote):
    # Docker Hub answers 401, not 404, for a repository that does not exist
    server.token = "right"
    server.routes["/token"] = (200, {"Content-Type": "application/json"}, as_json({"access_token": "wrong"}))
    result = result_for(preflight(make_profile(server, git_remote)), "base_image")
    assert not result.ok
    assert "no repository library/ubuntu" in result.message and "needs a login" in result.message


# --- what the base image resolves to --------------------------------------------------------------


def test_the_base_image_resolves_to_the_digest_of_the_manifest_served(server, git_remote):
    results = preflight(make_profile(server, git_remote))
    index_digest = sha256_digest(as_json(server.images["library/ubuntu"]["24.04"][1]))
    assert result_for(results, "base_image").resolved == (("base_image", index_digest),)
    assert resolved_pins(results)["base_image"] == index_digest
    # a single-platform image: the digest of that manifest
    single = result_for(
        preflight(make_profile(server, git_remote, base_image=f"{server.host}/single:1.0")), "base_image"
    )
    assert single.resolved == (("base_image", sha256_digest(as_json(server.images["single"]["1.0"][1]))),)


def test_a_pinned_digest_resolves_to_itself(server, git_remote):
    digest = sha256_digest(as_json(server.images["single"]["1.0"][1]))
    for pinned in (f"{server.host}/single@{digest}", f"{server.host}/single:1.0@{digest}"):
        result = result_for(preflight(make_profile(server, git_remote, base_image=pinned)), "base_image")
        assert result.ok and result.resolved == (("base_image", digest),), result.message


def test_a_manifest_that_is_not_the_pinned_digest_is_refused(server, git_remote):
    # a registry (or a proxy) answering the digest's request with other bytes
    wrong = "sha256:" + "e" * 64
    served = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "x": 1}
    server.images["single"][wrong] = (DOCKER_MANIFEST, served)
    result = result_for(
        preflight(make_profile(server, git_remote, base_image=f"{server.host}/single@{wrong}")), "base_image"
    )
    assert not result.ok and not result.resolved
    assert f"a manifest whose digest is {sha256_digest(as_json(served))}, not the pinned one" in result.message


def test_a_content_digest_header_that_is_not_the_bodys_sha256_is_refused(server, git_remote):
    server.content_digest = "sha256:" + "0" * 64
    result = result_for(preflight(make_profile(server, git_remote)), "base_image")
    assert not result.ok and not result.resolved
    assert f"Docker-Content-Digest {server.content_digest} is not the sha256" in result.message
    assert "check the registry" in result.fix
    assert resolved_pins([result]) == {}


def test_manifest_digest_is_the_sha256_of_the_bytes_and_must_agree_with_the_header():
    body = b'{"schemaVersion": 2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert manifest_digest(body) == digest
    assert manifest_digest(body, digest) == digest
    assert manifest_digest(body, "sha512:" + "0" * 128) == digest  # only a sha256 header can be compared
    with pytest.raises(ValueError, match="is not the sha256 of the manifest"):
        manifest_digest(body, "sha256:" + "1" * 64)
    with pytest.raises(ValueError, match="too large"):
        manifest_digest(body, digest, truncated=True)


@pytest.mark.parametrize(
    "pinned,digest,expected",
    [
        ("ubuntu:24.04", "sha256:" + "a" * 64, "ubuntu:24.04@sha256:" + "a" * 64),
        (
            "127.0.0.1:38474/llm2wasm-hermetic/debian:bookworm",
            "sha256:" + "b" * 64,
            "127.0.0.1:38474/llm2wasm-hermetic/debian:bookworm@sha256:" + "b" * 64,
        ),
        ("ubuntu:24.04", "", "ubuntu:24.04"),  # --no-preflight: by tag
        ("ubuntu@sha256:" + "c" * 64, "sha256:" + "c" * 64, "ubuntu@sha256:" + "c" * 64),  # pinned by digest already
    ],
)
def test_the_base_image_is_pulled_by_digest_when_known(pinned, digest, expected):
    assert pinned_by_digest(pinned, digest) == expected


def test_pinned_by_digest_refuses_what_is_not_a_digest():
    with pytest.raises(ValueError, match="not a sha256 digest"):
        pinned_by_digest("ubuntu:24.04", "latest")


# --- wheels ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "indexes", "find_links"),
    [
        ("", (PYPI_SIMPLE,), ()),
        ("--extra-index-url https://download.example/whl/cpu", (PYPI_SIMPLE, "https://download.example/whl/cpu"), ()),
        (
            "-i https://a.example/simple --extra-index-url=https://b.example/",
            ("https://a.example/simple", "https://b.example/"),
            (),
        ),
        (
            "--index-url=https://a.example/simple -f https://f.example/",
            ("https://a.example/simple",),
            ("https://f.example/",),
        ),
        ("--no-index --find-links http://127.0.0.1:1/", (), ("http://127.0.0.1:1/",)),
        ("--pre --find-links=/wheels -fhttp://x.example/", (PYPI_SIMPLE,), ("/wheels", "http://x.example/")),
        ("'--index-url' 'https://q.example/s p'", ("https://q.example/s p",), ()),
    ],
)
def test_pip_options_name_the_package_sources(text, indexes, find_links):
    sources = parse_pip_options(text)
    assert (sources.indexes, sources.find_links) == (indexes, find_links)


def test_pip_options_without_a_url_after_an_option_are_reported(server, git_remote):
    results = preflight(make_profile(server, git_remote, pip_options="--index-url"))
    result = result_for(results, "pip_options")
    assert not result.ok and "--index-url needs a URL" in result.message


def test_a_python_the_wheels_are_not_built_for_names_the_ones_they_are(server, git_remote):
    result = result_for(preflight(make_profile(server, git_remote, python_version="3.13")), "mlc_ai_requirement")
    assert not result.ok
    assert result.message == (
        f"mlc_ai_requirement mlc-ai-cu128==0.20.0 has no cp313 wheel for linux x86_64 in {server.url}/mlc/; "
        "cp312, cp311 exist"
    )
    assert "--set python_version=3.12" in result.fix


def test_no_matching_release_lists_releases_nearest_first(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, mlc_ai_requirement="mlc-ai-cu128==0.20.1")), "mlc_ai_requirement"
    )
    assert not result.ok
    assert result.message.endswith(
        f"no release matches ==0.20.1 in {server.url}/mlc/; releases: 0.20.0, 0.19.0 (nearest first)"
    )
    assert result.fix == "pin an existing release: --set mlc_ai_requirement=mlc-ai-cu128==0.20.0"


def test_an_unknown_project_names_similar_ones_from_the_page(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, mlc_ai_requirement="mlc-ai-cu129==0.20.0")), "mlc_ai_requirement"
    )
    assert not result.ok
    assert "the index has no project mlc-ai-cu129" in result.message
    assert result.message.split("similar: ")[1].split(", ")[0] == "mlc-ai-cu128"
    assert result.fix == "--set mlc_ai_requirement=mlc-ai-cu128==0.20.0"


def test_an_unknown_project_on_an_index_names_similar_ones_from_its_root(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, torch_requirement="torchh==2.13.0")), "torch_requirement"
    )
    assert not result.ok
    assert "no project torchh" in result.message and "similar: torch" in result.message
    assert server.requested("/simple/torchh/") == 1 and server.requested("/simple/") == 1


def test_public_versions_match_local_builds_and_bare_names_accept_dev_releases(server, git_remote):
    results = preflight(
        make_profile(
            server,
            git_remote,
            torch_requirement="torch==2.13.0",
            mlc_llm_requirement="mlc-llm==0.1.dev0",
            mlc_ai_requirement="mlc-llm-nightly-cu128",
        )
    )
    assert "torch-2.13.0+cpu-cp312" in result_for(results, "torch_requirement").message
    mlc_llm = result_for(results, "mlc_llm_requirement")
    assert mlc_llm.ok and "mlc_llm-0.1.dev0+gabc.123-py3-none-any.whl" in mlc_llm.message
    nightly = result_for(results, "mlc_ai_requirement")
    assert nightly.ok and "0.21.dev5" in nightly.message


def test_wheels_for_other_architectures_only_name_their_platforms(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, mlc_ai_requirement="mlc-ai-arm==0.20.0")), "mlc_ai_requirement"
    )
    assert not result.ok
    assert "has no wheel for linux x86_64" in result.message
    assert result.message.endswith("platforms: macosx_13_0_arm64, manylinux_2_28_aarch64")
    arm = run_preflight(make_profile(server, git_remote, mlc_ai_requirement="mlc-ai-arm==0.20.0"), machine="aarch64")
    assert result_for(arm, "mlc_ai_requirement").ok


def test_requires_python_that_excludes_the_image_python_is_named(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, wgsl_validator_requirement="futureonly==1.0")),
        "wgsl_validator_requirement",
    )
    assert not result.ok and "needs Python >=3.14, the image has 3.12" in result.message


def test_an_index_answering_an_error_is_retried_then_reported(server, git_remote):
    server.routes["/simple/peft/"] = (503, {}, b"busy")
    started = time.monotonic()
    result = result_for(preflight(make_profile(server, git_remote)), "peft_requirement")
    assert not result.ok and result.message == f"{server.url}/simple/peft/ answered HTTP 503"
    assert server.requested("/simple/peft/") == 3  # the first try and two retries
    assert time.monotonic() - started < 5


def test_nearest_versions_prefer_the_longest_common_release_prefix():
    versions = [Version(v) for v in ("0.19.0", "0.20.0", "0.21.0", "1.20.1", "0.20.3", "0.20.1rc1")]
    nearest = [str(v) for v in nearest_versions(Version("0.20.1"), versions, n=6)]
    assert nearest == ["0.20.1rc1", "0.20.0", "0.20.3", "0.21.0", "0.19.0", "1.20.1"]
    assert [str(v) for v in nearest_versions(None, versions, n=2)] == ["1.20.1", "0.21.0"]


# --- git -------------------------------------------------------------------------------------------


def test_branches_and_tags_resolve(server, git_remote):
    results = preflight(make_profile(server, git_remote, emsdk_ref="3.1.55", mlc_llm_ref="release"))
    assert result_for(results, "emsdk_ref").message.startswith(f"emsdk_ref 3.1.55: tag in {git_remote} (")
    assert result_for(results, "mlc_llm_ref").message.startswith(
        f"mlc_llm_ref release: branch in {git_remote.as_uri()} ("
    )


def ls_remote(remote: Path) -> dict[str, str]:
    out = subprocess.run(["git", "ls-remote", str(remote)], capture_output=True, text=True, check=True).stdout
    return {name: commit for commit, name in (line.split("\t") for line in out.splitlines())}


def test_refs_resolve_to_the_commit_a_clone_checks_out(server, git_remote):
    """The commit the build holds its clone to: a branch's, a lightweight tag's, and for an annotated
    tag the commit it points at (its peeled entry), not the tag object `git ls-remote` lists first."""
    refs = ls_remote(git_remote)
    assert refs["refs/tags/v0.20.0"] != refs["refs/tags/v0.20.0^{}"]  # annotated: the tag object differs
    results = preflight(make_profile(server, git_remote))
    assert result_for(results, "emsdk_ref").resolved == (("emsdk_ref", refs["refs/tags/3.1.56"]),)
    assert result_for(results, "mlc_llm_ref").resolved == (("mlc_llm_ref", refs["refs/tags/v0.20.0^{}"]),)
    assert f"({refs['refs/tags/v0.20.0^{}'][:12]})" in result_for(results, "mlc_llm_ref").message
    branch = preflight(make_profile(server, git_remote, mlc_llm_ref="release"))
    assert resolved_pins(branch)["mlc_llm_ref"] == refs["refs/heads/release"]
    # what `git clone --branch v0.20.0` then checks out
    clone = git_remote.parent / "clone-v0.20.0"
    if not clone.exists():
        git("clone", "--quiet", "--depth", "1", "--branch", "v0.20.0", git_remote.as_uri(), str(clone))
    assert git("-C", str(clone), "rev-parse", "HEAD").strip() == resolved_pins(results)["mlc_llm_ref"]


def test_a_ref_that_does_not_resolve_resolves_to_nothing(server, git_remote):
    results = preflight(make_profile(server, git_remote, mlc_llm_ref="v0.20.1"))
    assert "mlc_llm_ref" not in resolved_pins(results)
    assert "emsdk_ref" in resolved_pins(results)


def test_a_missing_git_ref_names_the_nearest(server, git_remote):
    result = result_for(preflight(make_profile(server, git_remote, mlc_llm_ref="v0.20.1")), "mlc_llm_ref")
    assert not result.ok
    assert result.message.startswith(
        f"mlc_llm_ref v0.20.1: no such tag or branch in {git_remote.as_uri()}; nearest: v0.20.0"
    )
    assert "^{}" not in result.message  # peeled annotated tags are not names anyone can pin
    assert result.fix == "pin an existing tag or branch: --set mlc_llm_ref=v0.20.0"


def test_a_commit_id_is_refused_with_the_tag_at_that_commit(server, git_remote):
    """The layers clone with --branch, which takes tags and branches only."""
    refs = subprocess.run(["git", "ls-remote", "--tags", str(git_remote)], capture_output=True, text=True).stdout
    commit = refs.split("\t", 1)[0]
    result = result_for(preflight(make_profile(server, git_remote, mlc_llm_ref=commit[:10])), "mlc_llm_ref")
    assert not result.ok
    assert "a commit id, but the build clones a tag or branch" in result.message
    assert result.fix.startswith("pin the tag instead: --set mlc_llm_ref=")


# --- npm -------------------------------------------------------------------------------------------


def test_an_integrity_mismatch_shows_both_values(server, git_remote):
    result = result_for(
        preflight(make_profile(server, git_remote, webllm_integrity=OTHER_INTEGRITY)), "webllm_integrity"
    )
    assert not result.ok
    assert f"pinned {OTHER_INTEGRITY}, registry {INTEGRITY}" in result.message
    assert result.fix.endswith(f"--set webllm_integrity={INTEGRITY}")


def test_a_missing_webllm_version_names_the_nearest(server, git_remote):
    result = result_for(preflight(make_profile(server, git_remote, webllm_version="0.2.85")), "webllm_version")
    assert not result.ok
    assert "no such version of @mlc-ai/web-llm" in result.message
    assert result.message.split("nearest: ")[1].split(", ")[:2] == ["0.2.84", "0.2.83"]


def test_a_registry_without_the_package_says_so(server, git_remote):
    result = result_for(preflight(make_profile(server, git_remote, npm_registry=f"{server.url}/empty")), "npm_registry")
    assert not result.ok and result.message == f"npm_registry {server.url}/empty has no package @mlc-ai/web-llm"


# --- no network ------------------------------------------------------------------------------------


def closed_ports(count: int) -> list[int]:
    """Ports nothing listens on: bound, then released."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def test_unreachable_sources_give_one_short_cannot_reach_each_quickly(server, git_remote):
    registry, wheels, index, npm, git_port = closed_ports(5)
    profile = make_profile(
        server,
        git_remote,
        base_image=f"127.0.0.1:{registry}/library/ubuntu:24.04",
        mlc_wheel_index=f"http://127.0.0.1:{wheels}/mlc/",
        pip_options=f"--index-url http://127.0.0.1:{index}/simple/",
        npm_registry=f"http://127.0.0.1:{npm}/npm",
        emsdk_repo=f"git://127.0.0.1:{git_port}/emsdk",
        mlc_llm_repo=f"http://127.0.0.1:{git_port}/mlc-llm.git",
    )
    started = time.monotonic()
    results = preflight(profile)
    elapsed = time.monotonic() - started
    assert elapsed < 5, elapsed
    assert not any(result.ok for result in results)
    assert all(result.message.startswith("cannot reach ") for result in results), results
    assert all("Traceback" not in result.message and len(result.message) < 300 for result in results)
    by_source = {result.source: result for result in results}
    assert len(by_source) == len(results) == 6  # registry, wheel page, index, npm, two git repositories
    assert (
        by_source[f"http://127.0.0.1:{index}"].message == f"cannot reach http://127.0.0.1:{index}: connection refused"
    )
    assert set(by_source[f"http://127.0.0.1:{index}"].pins) == {
        "torch_requirement",
        "transformers_requirement",
        "peft_requirement",
        "bitsandbytes_requirement",
        "tvm_ffi_requirement",
        "wgsl_validator_requirement",
    }
    assert by_source[f"http://127.0.0.1:{wheels}"].pins == ("mlc_ai_requirement", "mlc_llm_requirement")
    assert by_source[f"http://127.0.0.1:{registry}"].pins == ("base_image",)
    assert by_source[f"http://127.0.0.1:{npm}"].pins == ("npm_registry", "webllm_version", "webllm_integrity")
    assert by_source[f"git://127.0.0.1:{git_port}/emsdk"].pins == ("emsdk_repo", "emsdk_ref")
    assert all(result.fix for result in results)


def test_a_build_until_a_layer_is_stopped_only_by_the_pins_it_uses():
    results = [
        PreflightResult(("base_image",), False, "base"),
        PreflightResult(("webllm_version",), False, "npm"),  # only the app layer uses it
        PreflightResult(("python_version",), False, "python"),
        PreflightResult(("mlc_ai_requirement", "wgsl_validator_requirement"), False, "one index for ml and app"),
    ]
    kept = [result.message for result in for_layers(results, ["base", "python", "ml"])]
    assert kept == ["base", "python", "one index for ml and app"]
    assert len(for_layers(results, [layer.name for layer in LAYERS])) == len(results)


def test_the_build_stops_with_exit_2_naming_each_bad_pin(monkeypatch):
    bad = PreflightResult(("mlc_llm_ref",), False, "mlc_llm_ref v0.20.1: no such tag", "pin an existing tag")
    monkeypatch.setattr(preflight_module, "run_preflight", lambda profile: [bad])
    said: list[str] = []
    with pytest.raises(UsageError) as raised:
        preflight_or_stop(resolve_profile("stable"), ["base", "python", "ml", "emsdk", "web-runtime"], said.append)
    assert raised.value.exit_code == 2
    assert "nothing was built" in str(raised.value) and "NO  mlc_llm_ref v0.20.1: no such tag" in str(raised.value)
    assert "fix: pin an existing tag" in str(raised.value) and "--no-preflight" in str(raised.value)
    monkeypatch.setattr(
        preflight_module, "run_preflight", lambda profile: [PreflightResult(("base_image",), True, "ok")]
    )
    preflight_or_stop(resolve_profile("stable"), ["base"], said.append)
    assert said[-1].startswith("<== preflight: 1 checks passed")


def test_the_build_gets_what_the_pins_resolved_to(monkeypatch):
    digest, commit = "sha256:" + "d" * 64, "c" * 40
    monkeypatch.setattr(
        preflight_module,
        "run_preflight",
        lambda profile: [
            PreflightResult(("base_image",), True, "ok", resolved=(("base_image", digest),)),
            PreflightResult(("mlc_llm_repo", "mlc_llm_ref"), True, "ok", resolved=(("mlc_llm_ref", commit),)),
            PreflightResult(("peft_requirement",), True, "ok"),
        ],
    )
    resolved = preflight_or_stop(resolve_profile("stable"), ["base", "web-runtime"], [].append)
    assert resolved == {"base_image": digest, "mlc_llm_ref": commit}


# --- one CUDA major ------------------------------------------------------------------------------------


def cuda_profile(server, git_remote, variant: str, torch: str) -> Profile:
    return make_profile(
        server,
        git_remote,
        cuda=True,
        variant=variant,
        torch_requirement=torch,
        # torch only (the other wheel pins are not found there: this looks at the CUDA check alone)
        pip_options=f"--index-url {server.url}/cuda/",
    )


def test_torch_2_13_is_cuda_13_so_cu128_mlc_wheels_are_refused(server, git_remote):
    result = result_for(preflight(cuda_profile(server, git_remote, "cu128", "torch==2.13.0")), "variant")
    assert not result.ok
    assert (
        "torch==2.13.0 (torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl, its metadata) brings CUDA 13"
        in result.message
    )
    assert "cuda-toolkit[" in result.message and "variant cu128 are built for CUDA 12" in result.message
    assert result.fix.startswith("one CUDA major throughout: --set variant=cu130")


def test_one_cuda_major_passes(server, git_remote):
    assert result_for(preflight(cuda_profile(server, git_remote, "cu130", "torch==2.13.0")), "variant").ok
    result = result_for(preflight(cuda_profile(server, git_remote, "cu128", "torch==2.10.0")), "variant")
    assert result.ok and "CUDA 12 (nvidia-cuda-nvrtc-cu12==12.8.93)" in result.message


def test_cuda_major_from_the_local_label_without_metadata(server, git_remote):
    result = result_for(preflight(cuda_profile(server, git_remote, "cu130", "torch==2.9.0+cu126")), "variant")
    assert not result.ok and "brings CUDA 12 (+cu126)" in result.message


def test_a_cpu_torch_in_a_cuda_profile_is_refused(server, git_remote):
    result = result_for(preflight(cuda_profile(server, git_remote, "cu130", "torch==2.12.0+cpu")), "variant")
    assert not result.ok and "brings no CUDA (+cpu (no CUDA))" in result.message
    assert "or the MLC CPU wheels (profile cpu)" in result.fix


def test_stable_pins_one_cuda_major():
    from llm2wasm.host.preflight.torchcuda import torch_cuda_major

    stable = resolve_profile("stable")
    assert stable.cuda_major == 13  # the variant of the MLC wheels
    assert torch_cuda_major(TORCH_2_13_REQUIRES, None)[0] == 13  # what the pinned torch 2.13.0 requires
