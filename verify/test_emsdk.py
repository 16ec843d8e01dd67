"""Checks for the emsdk layer: the pinned checkout and SDK, and an environment that matches
emsdk's own (what `source emsdk_env.sh` would set)."""

import posixpath

from llm2wasm.checks import emcc_version


def test_emcc_is_the_pinned_version(host, pins):
    first_line = host.check_output("emcc --version").splitlines()[0]
    assert emcc_version(first_line) == pins["emsdk_version"], first_line


def test_emcc_comes_from_emsdk(host, image_env):
    assert host.check_output("command -v emcc") == posixpath.join(image_env["EMSDK"], "upstream/emscripten/emcc")


def test_emsdk_variables_point_at_real_files(host, image_env):
    assert host.file(image_env["EMSDK"]).is_directory
    assert host.file(posixpath.join(image_env["EMSDK"], ".emscripten")).is_file
    node = host.file(image_env["EMSDK_NODE"])
    assert node.exists and host.run(f"test -x {image_env['EMSDK_NODE']}").rc == 0


def test_node_and_npm_on_path_are_emsdks(host, image_env):
    assert host.check_output('readlink -f "$(command -v node)"') == host.check_output(
        f"readlink -f {image_env['EMSDK_NODE']}"
    )
    assert host.run("node --version").rc == 0
    assert host.run("npm --version").rc == 0


def test_env_matches_emsdks_own(host, image_env):
    own = host.check_output(
        'bash -c \'source "$EMSDK/emsdk_env.sh" >/dev/null 2>&1 && readlink -f "$EMSDK_NODE" && echo "$EMSDK"\''
    )
    node, emsdk = own.splitlines()
    assert emsdk == image_env["EMSDK"]
    assert node == host.check_output(f"readlink -f {image_env['EMSDK_NODE']}")


def test_checkout_is_the_pinned_ref(checked_out_ref, image_env, pins):
    assert checked_out_ref(image_env["EMSDK"], pins["emsdk_ref"]) == pins["emsdk_ref"]


def test_downloads_cleaned(host, image_env):
    downloads = host.file(posixpath.join(image_env["EMSDK"], "downloads"))
    assert not downloads.exists or downloads.listdir() == []
