"""A read-only EM_CACHE becomes a writable view of itself in scratch; a writable one is left alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm2wasm.image.convert import emcache


@pytest.fixture
def read_only_cache(tmp_path, monkeypatch) -> Path:
    """A cache as the image has it, which this process may not write (os.access says so: the tests
    may run as root, whom folder permissions do not stop; a read-only mount stops root too)."""
    cache = tmp_path / "image" / "cache"
    lib = cache / "sysroot" / "lib" / "wasm32-emscripten"
    lib.mkdir(parents=True)
    (lib / "libc.a").write_bytes(b"!<arch>\n")
    (cache / "cache.lock").write_text("")
    (cache / "sysroot_install.stamp").write_text("3.1.6")
    real_access = os.access
    monkeypatch.setattr(
        emcache.os, "access", lambda path, mode: False if Path(path) == cache else real_access(path, mode)
    )
    return cache


def test_a_read_only_cache_is_read_through_links_and_written_in_scratch(read_only_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("EM_CACHE", str(read_only_cache))
    farm = emcache.ensure_writable_cache(tmp_path / "scratch")
    assert os.environ["EM_CACHE"] == str(farm)
    library = farm / "sysroot" / "lib" / "wasm32-emscripten" / "libc.a"
    assert library.is_symlink() and library.read_bytes() == b"!<arch>\n"
    for rewritten in ("cache.lock", "sysroot_install.stamp"):
        assert not (farm / rewritten).is_symlink()
        (farm / rewritten).write_text("written")  # not through a link into the image
    (library.parent / "libcompiler_rt.a").write_bytes(b"new")  # a library built now lands in scratch
    assert not (read_only_cache / "sysroot" / "lib" / "wasm32-emscripten" / "libcompiler_rt.a").exists()
    assert (read_only_cache / "sysroot_install.stamp").read_text() == "3.1.6"


def test_the_view_is_made_from_the_folder_tree(tmp_path):
    """The same as above without permissions (which root ignores): links, copies, folders."""
    source = tmp_path / "cache"
    (source / "sysroot" / "include").mkdir(parents=True)
    (source / "sysroot" / "include" / "stdio.h").write_text("h")
    (source / "cache.lock").write_text("")
    emcache.link_farm(source, tmp_path / "farm")
    assert (tmp_path / "farm" / "sysroot" / "include" / "stdio.h").is_symlink()
    assert (tmp_path / "farm" / "cache.lock").is_file() and not (tmp_path / "farm" / "cache.lock").is_symlink()
    emcache.link_farm(source, tmp_path / "farm")  # a second conversion in the same container: no error


def test_a_writable_cache_or_none_is_left_as_it_is(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_CACHE", str(tmp_path))
    assert emcache.ensure_writable_cache(tmp_path / "scratch") is None and os.environ["EM_CACHE"] == str(tmp_path)
    monkeypatch.delenv("EM_CACHE")
    assert emcache.ensure_writable_cache(tmp_path / "scratch") is None
