"""Checks for the base layer, and for every layer above it: the environment must stay sane.

These run on every image of the chain (a child's checks include its parents'), so an `ENV PATH =`
line or a dangling LD_LIBRARY_PATH entry in any layer is caught at that layer.
"""

import os

import pytest

from llm2wasm.host.checks import bad_path_entries, base_image_label_problems, env_garbage, expected_os

TOOLS = ["curl", "wget", "unzip", "git", "git-lfs", "nano", "make", "patch", "tar", "xz"]


@pytest.mark.parametrize("tool", TOOLS)
def test_tool_on_path(host, tool):
    assert host.exists(tool), f"{tool} is not on PATH"


def test_ca_certificates(host):
    assert host.file("/etc/ssl/certs/ca-certificates.crt").exists


def test_os_is_the_pinned_base(host, pins):
    distro, tag = expected_os(pins["base_image"])
    release = host.file("/etc/os-release").content_string
    fields = dict(line.split("=", 1) for line in release.splitlines() if "=" in line)
    fields = {key: value.strip('"') for key, value in fields.items()}
    assert fields.get("ID") == distro, release
    assert tag in {fields.get("VERSION_ID"), fields.get("VERSION_CODENAME"), "latest"}, release


def test_labels_record_the_base_image(image_config, pins):
    """org.opencontainers.image.base.name/.digest: the pin, and the manifest digest the build pulled
    (empty only for a build by tag, --no-preflight)."""
    problems = base_image_label_problems(image_config.get("Labels"), pins["base_image"])
    assert problems == [], problems


def test_apt_lists_cleaned(host):
    leftovers = host.run("find /var/lib/apt/lists -maxdepth 1 -type f ! -name lock").stdout.split()
    assert leftovers == [], f"apt lists left in the layer: {leftovers}"


def test_no_malformed_env_in_metadata(image_env):
    assert env_garbage(image_env) == [], f"malformed ENV (e.g. `ENV NAME = value`): {env_garbage(image_env)}"


@pytest.mark.parametrize("variable", ["PATH", "LD_LIBRARY_PATH"])
def test_path_entries_in_metadata_exist(host, image_env, variable):
    value = image_env.get(variable)
    if not value:
        pytest.skip(f"{variable} not set in the image")
    assert bad_path_entries(value) == [], f"{variable}={value!r} has malformed entries"
    missing = [entry for entry in value.split(":") if not host.file(entry).is_directory]
    assert missing == [], f"{variable} names directories that do not exist: {missing}"


def test_env_inside_matches_metadata(container_env, image_env):
    for variable in ("PATH", "LD_LIBRARY_PATH"):
        assert container_env.get(variable) == image_env.get(variable), variable


def test_path_has_no_duplicates(image_env):
    entries = image_env.get("PATH", "").split(os.pathsep)
    assert len(entries) == len(set(entries)), f"PATH repeats entries: {entries}"
