"""Which child changes make the parents' checks run again (llm2wasm.host.layerdiff)."""

from __future__ import annotations

import pytest

from llm2wasm.host.layerdiff import (
    Entry,
    built_from,
    config_reasons,
    diff_manifests,
    file_reasons,
    load_manifest,
    parse_manifest,
    save_manifest,
)

SITE = "/opt/venv/lib/python3.11/site-packages"
ENV = {"PATH": "/opt/venv/bin:/usr/local/bin:/usr/bin:/bin"}


def d(mode: str = "755") -> Entry:
    return Entry("d", "4096", "1.0", mode, "0:0", "")


def f(size: str = "10", mtime: str = "1.0", mode: str = "644", owner: str = "0:0") -> Entry:
    return Entry("f", size, mtime, mode, owner, "")


PARENT = {
    "/": d(),
    "/etc": d(),
    "/etc/passwd": f(),
    "/usr": d(),
    "/usr/bin": d(),
    "/usr/bin/python3": f(),
    "/usr/lib": d(),
    "/usr/lib/x86_64-linux-gnu": d(),
    "/usr/lib/x86_64-linux-gnu/libgomp.so.1": f(),
    "/usr/lib/python3.11": d(),
    "/usr/lib/python3.11/json": d(),
    "/opt": d(),
    "/opt/venv": d(),
    "/opt/venv/bin": d(),
    "/opt/venv/bin/python": Entry("l", "7", "1.0", "777", "0:0", "/usr/bin/python3"),
    SITE: d(),
    f"{SITE}/torch": d(),
    f"{SITE}/torch/__init__.py": f(),
    f"{SITE}/numpy": d(),
    "/opt/data": d(),
    "/opt/data/old.txt": f(),
}


def reasons_for(child: dict[str, Entry], env: dict[str, str] | None = None) -> list[str]:
    return file_reasons(PARENT, diff_manifests(PARENT, child), env or ENV)


def with_(**changes) -> dict[str, Entry]:
    child = dict(PARENT)
    child.update({path.replace("__", "/"): entry for path, entry in changes.items()})
    return child


def test_new_files_in_new_places_carry_over():
    child = dict(PARENT)
    child.update(
        {
            f"{SITE}/llm2wasm": d(),
            f"{SITE}/llm2wasm/__init__.py": f(),
            f"{SITE}/llm2wasm-1.0.dist-info": d(),
            f"{SITE}/llm2wasm-1.0.dist-info/RECORD": f(),
            "/opt/venv/bin/llm2wasm": f(mode="755"),
            "/opt/data/new.txt": f(),
            "/opt/llm2wasm": d(),
            "/opt/llm2wasm/webllm/index.js": f(),
        }
    )
    assert reasons_for(child) == []


def test_a_directory_gaining_entries_is_not_a_change():
    child = dict(PARENT)
    child["/opt/venv/bin"] = Entry("d", "8192", "99.0", "755", "0:0", "")
    assert reasons_for(child) == []


@pytest.mark.parametrize(
    "path, entry",
    [
        (f"{SITE}/torch/__init__.py", f(mtime="2.0")),
        (f"{SITE}/torch/__init__.py", f(size="11")),
        (f"{SITE}/torch/__init__.py", f(mode="600")),
        (f"{SITE}/torch/__init__.py", f(owner="10001:10001")),
        ("/opt/venv/bin/python", Entry("l", "7", "1.0", "777", "0:0", "/usr/bin/python3.12")),
        ("/opt/venv/bin", d(mode="700")),
        ("/etc/passwd", f(size="99")),
    ],
)
def test_modifying_what_was_there_runs_parents_checks(path, entry):
    child = dict(PARENT)
    child[path] = entry
    assert reasons_for(child) == [f"modified {path}"]


def test_removing_what_was_there_runs_parents_checks():
    """pip uninstall torch, or rm -rf of a PATH directory."""
    child = {path: entry for path, entry in PARENT.items() if not path.startswith(f"{SITE}/torch")}
    assert reasons_for(child)[0] == f"removed {SITE}/torch"
    child = {path: entry for path, entry in PARENT.items() if not path.startswith("/opt/venv/bin")}
    assert "removed /opt/venv/bin" in reasons_for(child)


@pytest.mark.parametrize(
    "path, why",
    [
        (f"{SITE}/zzz-hook.pth", "start-up"),
        (f"{SITE}/sitecustomize.py", "start-up"),
        ("/etc/pip.conf", "configuration"),
        ("/root/.gitconfig", "configuration"),
        ("/usr/local/bin/python3", "shadows an existing python3"),
        ("/opt/venv/bin/python3", "shadows an existing python3"),
        ("/usr/lib/libgomp.so.1", "shadows an existing libgomp.so.1"),
        (f"{SITE}/numpy.py", "shadows Python module numpy"),
        (f"{SITE}/json.cpython-311-x86_64-linux-gnu.so", "shadows Python module json"),
        (f"{SITE}/torch/_patch.py", f"inside {SITE}/torch"),
        ("/usr/lib/python3.11/json/extra.py", "inside /usr/lib/python3.11/json"),
    ],
)
def test_additions_that_can_change_existing_programs_run_parents_checks(path, why):
    child = dict(PARENT)
    child[path] = f()
    reasons = reasons_for(child)
    assert len(reasons) == 1 and reasons[0].startswith(f"added {path}") and why in reasons[0]


def test_library_path_directories_count_as_search_directories():
    child = dict(PARENT)
    child["/opt/cuda"] = d()
    child["/opt/cuda/libgomp.so.1"] = f()
    assert reasons_for(child) == []
    assert "shadows" in reasons_for(child, dict(ENV, LD_LIBRARY_PATH="/opt/cuda"))[0]


def test_reasons_are_capped():
    child = {path: entry for path, entry in PARENT.items() if path in ("/", "/etc")}
    assert len(file_reasons(PARENT, diff_manifests(PARENT, child), ENV, limit=3)) == 3


CONFIG = {
    "User": "",
    "WorkingDir": "",
    "Env": ["PATH=/opt/venv/bin:/usr/bin", "VIRTUAL_ENV=/opt/venv"],
    "Labels": {"io.llm2wasm.layer": "ml", "org.opencontainers.image.title": "ml", "io.llm2wasm.x": "1"},
}


def test_own_variables_and_descriptive_labels_carry_over():
    child = dict(
        CONFIG,
        WorkingDir="/",
        Env=[*CONFIG["Env"], "LLM2WASM_WEBLLM_DIR=/opt/llm2wasm/webllm"],
        Labels={
            "io.llm2wasm.layer": "app",
            "org.opencontainers.image.title": "llm2wasm",
            "org.opencontainers.image.revision": "abc",
            "io.llm2wasm.x": "1",
            "io.llm2wasm.new": "2",
        },
        Entrypoint=["llm2wasm"],
    )
    assert config_reasons(CONFIG, child) == []


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"User": "10001:10001"}, "User '' -> '10001:10001'"),
        ({"WorkingDir": "/work"}, "WorkingDir '/' -> '/work'"),
        ({"Env": ["PATH=/usr/bin", "VIRTUAL_ENV=/opt/venv"]}, "ENV PATH changed"),
        ({"Env": ["PATH=/opt/venv/bin:/usr/bin"]}, "ENV VIRTUAL_ENV removed"),
        ({"Env": [*CONFIG["Env"], "PYTHONPATH=/x"]}, "ENV PYTHONPATH added"),
        ({"Labels": {"io.llm2wasm.layer": "ml"}}, "LABEL io.llm2wasm.x changed"),
    ],
)
def test_config_changes_run_parents_checks(change, reason):
    assert config_reasons(CONFIG, dict(CONFIG, **change)) == [reason]


def test_manifest_round_trip_and_odd_lines(tmp_path):
    text = "/\td\t4096\t1.0\t755\t0:0\t\n/a b\tf\t3\t2.5\t644\t0:0\t\nbroken line\n"
    manifest = parse_manifest(text)
    assert set(manifest) == {"/", "/a b"}
    save_manifest(tmp_path / "m.tsv.gz", text)
    assert load_manifest(tmp_path / "m.tsv.gz") == manifest


def test_built_from_compares_layer_prefixes():
    parent = {"Layers": ["a", "b"]}
    assert built_from(parent, {"Layers": ["a", "b", "c"]})
    assert not built_from(parent, {"Layers": ["a", "x", "c"]})
    assert not built_from({"Layers": []}, {"Layers": ["a"]})
