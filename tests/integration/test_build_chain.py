"""The whole hermetic layer graph with a real Docker engine: built, verified layer by layer (the two
branches side by side), and stopped at the first layer whose checks fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from llm2wasm.host.layers import LAYERS, ancestors, descendants, get_layer
from llm2wasm.host.pins import resolve_profile
from llm2wasm.host.verify import run_checks
from tests.conftest import HERMETIC, ROOT, build_derived_image, hermetic_build_args, image_exists, invoke

LAYER_NAMES = [layer.name for layer in LAYERS]


def test_every_layer_built_verified_and_tagged(hermetic_chain):
    # the final image is verified only after a real conversion in it
    assert "app: selftest passed (a real conversion)" in hermetic_chain
    for index, name in enumerate(LAYER_NAMES, 1):
        assert f"==> [{index}/{len(LAYERS)}] {name}: building" in hermetic_chain
        assert f"<== [{index}/{len(LAYERS)}] {name}: llm2wasm:{name}-{HERMETIC} ready" in hermetic_chain
        assert image_exists(f"llm2wasm:{name}-{HERMETIC}")
    # the build checked the pins first
    assert "<== preflight:" in hermetic_chain and "checks passed" in hermetic_chain
    # the app layer (rebuilt on every change under src/) adds files only, so its parents' checks carry over
    assert "app: verifying (testinfra: its own checks; it changed nothing its parents' checks look at" in hermetic_chain


def test_verify_every_layer_on_demand(hermetic_chain):
    result = invoke("verify", "--profile", HERMETIC)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert all("PASS" in lines[name] for name in LAYER_NAMES)
    assert "parents' checks carried over" in lines["app"]
    assert "with parents' checks" in lines["runtime-env"]  # it sets the user, the environment and patches TVM


def test_unchanged_layers_are_not_verified_again(hermetic_chain, hermetic_mirror, tmp_path):
    report = tmp_path / "report.json"
    result = invoke("build", *hermetic_build_args(hermetic_mirror), "--report", str(report))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("already passed these checks; not verified again") == len(LAYERS)
    # the build report: every layer's size, and the versions read from the final image
    data = json.loads(report.read_text())
    assert [row["layer"] for row in data["layers"]] == LAYER_NAMES
    assert all(row["size_bytes"] > 0 and row["result"] == "cached" for row in data["layers"])
    # own: what a layer adds to the image it is built FROM (the join: the ML branch it copies in)
    sizes = {row["layer"]: row["size_bytes"] for row in data["layers"]}
    for row in data["layers"][1:]:
        assert row["size_bytes"] == sizes[get_layer(row["layer"]).parent] + row["own_bytes"], row
    pins = resolve_profile(HERMETIC)
    assert data["versions"]["apache-tvm"] == pins["mlc_ai_requirement"].split("==")[1]
    assert data["versions"]["emcc"] == pins["emsdk_version"] and data["versions"]["mlc-llm"].startswith("0.1.dev0+g")
    assert data["cuda_libraries_bytes"] == 0  # a CPU profile
    # what each layer keeps, measured: the registry's paths, and little beside them
    rows = {row["layer"]: row for row in data["layers"]}
    for name, row in rows.items():
        assert [kept["path"] for kept in row["kept"]] == [path for path, _ in get_layer(name).keeps], name
        assert row["elsewhere_bytes"] < 50_000_000, f"{name} adds {row['elsewhere_bytes']} bytes outside its paths"
    web = {kept["path"]: kept["added_bytes"] for kept in rows["web-runtime"]["kept"]}
    assert 1_000_000 < web["/opt/mlc-llm"] < 50_000_000, "the web runtimes' outputs only, not their sources"
    assert "What each layer keeps, and why" in result.stdout
    assert "## llm2wasm build report: profile `hermetic`" in result.stdout


def test_invoke_verify_on_demand(hermetic_chain):
    result = invoke("verify", "--profile", HERMETIC, "--layer", "emsdk", "--own-only")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "emsdk" in result.stdout and "PASS" in result.stdout


def test_invoke_verify_runs_the_selftest_on_demand(selftest_on_demand):
    """The build's last gate, a real conversion, on the tagged app image (for an image pulled or
    built earlier); --keep leaves what it made, owned by the user."""
    result = selftest_on_demand.result
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("selftest"))
    assert "PASS  a real conversion in llm2wasm:app-hermetic" in line, result.stdout
    assert f"kept: {selftest_on_demand.run}" in line
    assert "selftest passed" in selftest_on_demand.log
    kept = list(selftest_on_demand.run.rglob("*"))
    assert any(path.name == "app-config.json" for path in kept)
    assert {path.lstat().st_uid for path in kept} == {os.getuid()}


def test_verify_before_build_names_the_fix(hermetic_chain):
    result = invoke("verify", "--profile", HERMETIC, "--layer", "app", "--repository", "llm2wasm-never-built")
    assert result.returncode == 2
    assert "not found: build it first with `invoke build" in result.stderr


# One broken layer per kind of check: (layer to break, line appended to its Dockerfile, the check that must catch it)
BREAKAGES = {
    "missing-artifact": (
        "web-runtime",
        "RUN rm /opt/mlc-llm/web/dist/wasm/mlc_wasm_runtime.bc",
        "test_mlc_wasm_runtime_built",
    ),
    "wrong-version": (
        "emsdk",
        # the hermetic profile's emscripten is Debian's package
        "RUN echo '\"3.1.99\"' > /usr/share/emscripten/emscripten-version.txt",
        "test_emcc_is_the_pinned_version",
    ),
    "env-path-with-spaces": ("python", "ENV PATH = /opt/venv/bin:$PATH", "test_no_malformed_env_in_metadata"),
    "dangling-ld-library-path": (
        "runtime-env",
        "ENV LD_LIBRARY_PATH=/usr/local/cuda/lib64",
        "test_path_entries_in_metadata_exist",
    ),
    # A join that breaks what the web toolchain's branch promised: each branch's checks run again
    # on the joined image and catch it
    "join-drops-a-tvm-web-bc": (
        "runtime-env",
        "USER 0\nRUN rm $TVM_SOURCE_DIR/web/dist/wasm/webgpu_runtime.bc\nUSER 10001:10001",
        "test_tvm_web_runtime_built",
    ),
    "join-overwrites-the-emscripten-cache": (
        "runtime-env",
        'USER 0\nRUN rm -rf "$EM_CACHE" && mkdir "$EM_CACHE"\nUSER 10001:10001',
        "test_debian_cache_is_the_prebuilt_one",
    ),
    # A child that breaks what a parent's checks look at, in the layer whose parents' checks
    # otherwise carry over (the app layer): the parents' checks must run again and catch it.
    "child-uninstalls-torch": (
        "app",
        "USER 0\nRUN pip uninstall --yes torch\nUSER 10001:10001",
        "test_ml_libraries_import",
    ),
    "child-removes-a-path-directory": (
        "app",
        "USER 0\nRUN rm -rf /usr/local/sbin\nUSER 10001:10001",
        "test_path_entries_in_metadata_exist",
    ),
}


@pytest.mark.parametrize("kind", list(BREAKAGES))
def test_broken_layer_stops_the_build(hermetic_chain, hermetic_mirror, tmp_path, kind):
    layer, line, check = BREAKAGES[kind]
    images = tmp_path / "images"
    shutil.copytree(ROOT / "images", images)
    with open(images / layer / "Dockerfile", "a") as handle:
        handle.write(f"\n# deliberately broken by tests/integration ({kind})\n{line}\n")
    repository = f"llm2wasm-broken-{kind}"
    try:
        result = invoke(
            "build", *hermetic_build_args(hermetic_mirror), "--images", str(images), "--repository", repository
        )
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert f"build stopped at layer '{layer}': checks failed" in output
        assert check in output and "FAILED" in output
        if kind.startswith("child-"):
            assert f"{layer}: verifying (testinfra: its checks and its parents' again (removed /" in output
        if kind.startswith("join-"):
            assert f"{layer}: verifying (testinfra: its checks and its parents' again (" in output
        # what it is built from was built and tagged; nothing built on it was built or tagged (the
        # other branch may have been: it does not depend on the broken layer)
        for before in ancestors(layer)[:-1]:
            assert image_exists(f"{repository}:{before.name}-{HERMETIC}"), before.name
        assert not image_exists(f"{repository}:{layer}-{HERMETIC}"), f"{layer} was tagged"
        for later in descendants(layer):
            assert not image_exists(f"{repository}:{later.name}-{HERMETIC}"), f"{later.name} was tagged"
            assert f"] {later.name}: building" not in output, f"{later.name} was built after a failed layer"
        # one inspectable image of the failed layer, named with the command to look inside
        kept = f"{repository}-failed:{layer}-{HERMETIC}"
        assert image_exists(kept) and f"docker run --rm -it --entrypoint bash {kept}" in output
    finally:
        for name in LAYER_NAMES:
            for tag in (f"{repository}:{name}-{HERMETIC}", f"{repository}-failed:{name}-{HERMETIC}"):
                subprocess.run(["docker", "image", "rm", tag], capture_output=True)


def failed_checks(tag: str, dockerfile: str, layer: str, mirror) -> str:
    """Build `dockerfile` as `tag` and run `layer`'s own checks on it, which must fail; their output."""
    build_derived_image(tag, dockerfile)
    try:
        pins = resolve_profile(HERMETIC, [f"mlc_llm_requirement={mirror.mlc_llm_requirement()}"])
        result = run_checks(tag, layer, pins, own_only=True)
    finally:
        subprocess.run(["docker", "image", "rm", tag], capture_output=True)
    assert not result.passed, result.output
    return result.output


def test_tvm_source_moved_off_the_pinned_commit_is_caught(hermetic_chain, hermetic_mirror):
    """The web runtime must come from the TVM commit mlc-llm pins; a checkout that moved is caught."""
    dockerfile = (
        f"FROM llm2wasm:web-runtime-{HERMETIC}\n"
        # the record the layer writes from git; a TVM checkout that moved records another commit
        "RUN sed -i 's/^TVM_COMMIT=.*/TVM_COMMIT=0123456789abcdef0123456789abcdef01234567/'"
        " $MLC_LLM_SOURCE_DIR/BUILT_FROM\n"
    )
    output = failed_checks("llm2wasm-broken:tvm-moved", dockerfile, "web-runtime", hermetic_mirror)
    assert "FAILED verify/test_web_runtime.py::test_tvm_source_is_the_submodule_mlc_llm_pins" in output


def test_tvm_without_the_longrope_fix_is_caught(hermetic_chain, hermetic_mirror):
    """A TVM whose longrope rope kernel fails to build (the upstream bug the patch fixes) is caught."""
    kernels = "/opt/venv/lib/python3.11/site-packages/tvm/relax/frontend/nn/llm/position_embedding.py"
    dockerfile = (
        f"FROM llm2wasm:runtime-env-{HERMETIC}\nUSER 0\n"
        f"RUN sed -i 's/        if ext_factors is not None:/        if ext_factors:/' {kernels}\n"
        "USER 10001:10001\n"
    )
    output = failed_checks("llm2wasm-broken:longrope-unfixed", dockerfile, "runtime-env", hermetic_mirror)
    assert "FAILED verify/test_runtime_env.py::test_tvm_builds_the_longrope_rope_kernel" in output
    assert "Cannot use and / or / not operator to Expr" in output


# What a layer must not keep, and the check that catches it: (layer, Dockerfile lines, check)
LEFTOVERS = {
    "web-runtime-keeps-its-sources": (
        "web-runtime",
        "RUN mkdir -p $TVM_SOURCE_DIR/.git $TVM_SOURCE_DIR/src/runtime"
        " && echo ref > $TVM_SOURCE_DIR/.git/HEAD && echo '// c++' > $TVM_SOURCE_DIR/src/runtime/module.cc\n",
        "verify/test_web_runtime.py::test_only_what_conversions_link_is_kept",
    ),
    "app-keeps-caches": (
        "app",
        "USER 0\nRUN mkdir -p /root/.npm/_cacache && touch /var/cache/apt/archives/emscripten_3.1.6_all.deb\n",
        "verify/test_app.py::test_no_build_leftovers",
    ),
}


@pytest.mark.parametrize("kind", list(LEFTOVERS))
def test_build_leftovers_are_caught(hermetic_chain, hermetic_mirror, kind):
    """The image keeps what conversions use, not what building them needed (issue 15)."""
    layer, lines, check = LEFTOVERS[kind]
    output = failed_checks(
        f"llm2wasm-broken:{kind}", f"FROM llm2wasm:{layer}-{HERMETIC}\n{lines}", layer, hermetic_mirror
    )
    assert f"FAILED {check}" in output


def test_emsdk_source_layer_builds_and_passes_its_checks(hermetic_chain, hermetic_mirror):
    """The emsdk path of the emsdk layer (what stable, nightly and cpu use) with the real emsdk 3.1.56
    checkout: its own `emsdk install`, `activate` and `emsdk_env.sh` (which unsets EM_CACHE; the
    layer stopped at `mkdir -p ""` before that was taken into account). Only the two archives it
    downloads stand in (emsdk's storage is unreachable here), fetched through the
    `emsdk_downloads_url` pin. Then the web-runtime layer on it (the stand-in emcc compiles nothing,
    but writes what emcc writes, a system library into emscripten's cache on the first link among
    it): the layer keeps what the link added to the cache, writable by everyone, not the scratch."""
    repository = "llm2wasm-emsdk-source"
    result = invoke(
        "build",
        *hermetic_build_args(hermetic_mirror),
        "--until",
        "web-runtime",
        "--repository",
        repository,
        "--set",
        "emscripten_source=emsdk",
        "--set",
        "emsdk_version=3.1.56",
        "--set",
        f"emsdk_downloads_url=http://127.0.0.1:{hermetic_mirror.WHEELHOUSE_PORT}/emsdk-downloads",
    )
    try:
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert image_exists(f"{repository}:emsdk-{HERMETIC}")
        inspected = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", f"{repository}:emsdk-{HERMETIC}"],
            capture_output=True,
            text=True,
            check=True,
        )
        labels = json.loads(inspected.stdout)
        assert labels["io.llm2wasm.emscripten.source"] == "emsdk" and labels["io.llm2wasm.emsdk.ref"] == "3.1.56"
        # the real emsdk resolved 3.1.56 to its release build and installed from the archives given
        build_log = (ROOT / ".llm2wasm" / "logs" / HERMETIC / "emsdk.log").read_text()
        assert "Done installing SDK 'sdk-releases-9d106be887796484c4aaffc9dc45f48a8810f336-64bit'" in build_log
        assert "wasm-binaries.tar.xz' already downloaded, skipping." in build_log
        assert "Clearing existing environment variable: EMSDK_REF" in build_log  # emsdk_env.sh's own unsetting
        # the web runtimes' build ran emsdk's emcc; the image keeps what it added to the cache
        web = f"{repository}:web-runtime-{HERMETIC}"
        script = (
            'ls "$EM_CACHE/sysroot/lib/wasm32-emscripten/libc.a"; ls -d "$EM_CACHE/build" 2>&1; '
            'find "$EM_CACHE" ! -type l ! -perm -0002; cat "$MLC_LLM_SOURCE_DIR/BUILT_FROM"'
        )
        looked = subprocess.run(
            ["docker", "run", "--rm", "--entrypoint", "bash", web, "-c", script], capture_output=True, text=True
        )
        lines = looked.stdout.splitlines()
        assert lines[0].endswith("/cache/sysroot/lib/wasm32-emscripten/libc.a"), looked.stdout + looked.stderr
        assert "No such file or directory" in lines[1], "the cache's scratch folder was kept"
        assert lines[2].startswith("MLC_LLM_REPO="), f"cache entries not writable by everyone: {lines[2:]}"
    finally:
        for name in LAYER_NAMES:
            subprocess.run(["docker", "image", "rm", f"{repository}:{name}-{HERMETIC}"], capture_output=True)


def test_stable_dry_run_prints_the_real_upstream_plan():
    result = invoke("build", "--profile", "stable", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "--build-arg MLC_WHEEL_INDEX=https://mlc.ai/wheels" in result.stdout
    assert "--build-arg MLC_LLM_REF=v0.20.0" in result.stdout
    assert "--build-arg BASE_IMAGE=ubuntu:24.04  (pin base_image)" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--profile", "nosuch"], "unknown profile 'nosuch'"),
        (["--set", "emsdk_verison=1"], "unknown pin 'emsdk_verison'"),
        (["--until", "nosuch"], "unknown layer 'nosuch'"),
    ],
)
def test_bad_build_input_exits_2(args, message):
    result = invoke("build", "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr
