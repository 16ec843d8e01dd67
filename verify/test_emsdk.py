"""Checks for the emsdk layer: emscripten from the source the pins chose (`emscripten_source`), at
the pinned version, with the environment later layers rely on (emcc, node, npm on PATH; EMSDK_NODE;
EM_CACHE). For emsdk, also the pinned checkout and an environment that matches emsdk's own (what
`source emsdk_env.sh` would set); for Debian, emcc from the distribution's package."""

import posixpath

import pytest

from llm2wasm.host.checks import EMSDK_COMMIT_LABEL, commit_label_check, emcc_version

SOURCES = ("emsdk", "debian")


@pytest.fixture(scope="module")
def source(pins):
    chosen = pins["emscripten_source"]
    assert chosen in SOURCES, f"emscripten_source={chosen!r}: choose one of {', '.join(SOURCES)}"
    return chosen


@pytest.fixture
def emsdk_only(source):
    if source != "emsdk":
        pytest.skip(f"emscripten comes from {source}, not from an emsdk checkout")


@pytest.fixture
def debian_only(source):
    if source != "debian":
        pytest.skip(f"emscripten comes from {source}, not from Debian's package")


def test_emcc_is_the_pinned_version(host, pins):
    first_line = host.check_output("emcc --version").splitlines()[0]
    assert emcc_version(first_line) == pins["emsdk_version"], first_line


def test_image_label_names_the_source(image_config, source):
    assert (image_config.get("Labels") or {}).get("io.llm2wasm.emscripten.source") == source


def test_emsdk_node_is_a_real_node(host, image_env):
    node = image_env["EMSDK_NODE"]
    assert host.file(node).exists and host.run(f"test -x {node}").rc == 0, f"EMSDK_NODE={node} is not executable"


def test_node_and_npm_on_path_are_the_ones_emcc_uses(host, image_env):
    assert host.check_output('readlink -f "$(command -v node)"') == host.check_output(
        f"readlink -f {image_env['EMSDK_NODE']}"
    )
    assert host.run("node --version").rc == 0
    assert host.run("npm --version").rc == 0


def test_em_cache_is_a_folder(host, image_env):
    assert host.file(image_env["EM_CACHE"]).is_directory, f"EM_CACHE={image_env['EM_CACHE']} is not a folder"


def test_emsdk_cache_is_writable_by_everyone(host, image_env, emsdk_only):
    """Conversions run unprivileged, and emsdk's emcc builds system libraries into its cache on first
    use: every folder and file in it must be writable, not only the top (a library added later by a
    root build would otherwise stop a conversion that needs another variant of it)."""
    cache = image_env["EM_CACHE"]
    locked = host.check_output(f"find {cache} ! -type l ! -perm -0002 -printf '%M %u %p\\n'")
    assert not locked, f"not writable by the conversion user, under EM_CACHE={cache}:\n{locked[:2000]}"


def test_emcc_comes_from_emsdk(host, image_env, emsdk_only):
    assert host.check_output("command -v emcc") == posixpath.join(image_env["EMSDK"], "upstream/emscripten/emcc")


def test_emsdk_variables_point_at_real_files(host, image_env, emsdk_only):
    assert host.file(image_env["EMSDK"]).is_directory
    assert host.file(posixpath.join(image_env["EMSDK"], ".emscripten")).is_file


def test_env_matches_emsdks_own(host, image_env, emsdk_only):
    own = host.check_output(
        'bash -c \'source "$EMSDK/emsdk_env.sh" >/dev/null 2>&1 && readlink -f "$EMSDK_NODE" && echo "$EMSDK"\''
    )
    node, emsdk = own.splitlines()
    assert emsdk == image_env["EMSDK"]
    assert node == host.check_output(f"readlink -f {image_env['EMSDK_NODE']}")


def test_checkout_is_the_pinned_ref(checked_out_ref, image_env, pins, emsdk_only):
    assert checked_out_ref(image_env["EMSDK"], pins["emsdk_ref"]) == pins["emsdk_ref"]


def test_commit_label_is_the_checkouts_commit(host, image_config, image_env, emsdk_only):
    label = (image_config.get("Labels") or {}).get(EMSDK_COMMIT_LABEL)
    check = commit_label_check(label, host.check_output(f"git -C {image_env['EMSDK']} rev-parse HEAD"), "emsdk")
    if check.status == "unrecorded":
        pytest.skip(check.message)
    assert check.status == "match", check.message


def test_downloads_cleaned(host, image_env, emsdk_only):
    downloads = host.file(posixpath.join(image_env["EMSDK"], "downloads"))
    assert not downloads.exists or downloads.listdir() == []


def test_emcc_is_debians_package(host, debian_only):
    emcc = host.check_output("command -v emcc")
    assert emcc == "/usr/bin/emcc", emcc
    owner = host.run("dpkg-query -S /usr/bin/emcc")
    assert owner.rc == 0 and owner.stdout.split(":")[0] == "emscripten", owner.stdout + owner.stderr


def test_debian_cache_is_the_prebuilt_one(host, image_env, debian_only):
    assert host.package("emscripten").is_installed
    # the frozen cache holds libc already built for wasm32: nothing is built at conversion time
    found = host.run(f"find {image_env['EM_CACHE']} -name 'libc.a' -print -quit")
    assert found.rc == 0 and found.stdout.strip(), f"no prebuilt libc.a under EM_CACHE={image_env['EM_CACHE']}"
