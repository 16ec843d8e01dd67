import json

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.host.report import BuildReport, LayerRow, human, parse_probe, write_report

PROBE_OUTPUT = (
    json.dumps(
        [
            {"name": "torch", "version": "2.13.0+cpu"},
            {"name": "apache-tvm", "version": "0.26.0"},
            {"name": "mlc-llm", "version": "0.1.dev0+g79d603f0.abc"},
            {"name": "numpy", "version": "2.4.6"},
        ]
    )
    + "\n--\nemcc (Emscripten gcc/clang-like replacement + linker emulating GNU ld) 3.1.6 ()"
    + "\n--\n3400000000\n--\n3.11.2\n"
)


def test_probe_gives_versions_and_cuda_bytes():
    versions, cuda = parse_probe(PROBE_OUTPUT)
    assert versions == {
        "torch": "2.13.0+cpu",
        "apache-tvm": "0.26.0",
        "mlc-llm": "0.1.dev0+g79d603f0.abc",
        "emcc": "3.1.6",
        "python": "3.11.2",
    }
    assert cuda == 3_400_000_000


def test_probe_of_an_early_layer():
    assert parse_probe("[]\n--\n\n--\n\n--\n3.12.3\n") == ({"python": "3.12.3"}, 0)


def report() -> BuildReport:
    return BuildReport(
        "stable",
        [
            LayerRow("base", "llm2wasm:base-stable", 100_000_000, 100_000_000, 10.0, 2.0, "passed"),
            LayerRow("ml", "llm2wasm:ml-stable", 5_100_000_000, 5_000_000_000, 300.0, 20.0, "cached"),
        ],
        {"torch": "2.13.0"},
        3_400_000_000,
    )


def test_markdown_names_sizes_versions_and_the_cuda_cost():
    text = report().to_markdown()
    assert "| ml | 5.10 GB | 5.00 GB | 300.0s | 20.0s | cached |" in text
    assert "| torch | 2.13.0 |" in text
    assert "CUDA libraries (nvidia-* wheels) in the image: 3.40 GB" in text and "`cpu` profile" in text


def test_written_as_json_or_markdown(tmp_path):
    write_report(report(), tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["layers"][1]["own_bytes"] == 5_000_000_000
    write_report(report(), tmp_path / "r.md")
    assert (tmp_path / "r.md").read_text().startswith("## llm2wasm build report")
    with pytest.raises(UsageError, match=r"name a \.md or \.json file"):
        write_report(report(), tmp_path / "r.txt")


def test_human_sizes():
    assert human(999) == "999 B" and human(1_500_000) == "1.50 MB" and human(2_000_000_000_000) == "2000.00 GB"


class FakeDocker:
    """docker run of the du script: sizes per image, and a count of the runs."""

    def __init__(self, sizes):
        self.sizes, self.runs = sizes, 0

    def run(self, args, check=False):
        import subprocess

        self.runs += 1
        image, paths = args[args.index("--entrypoint") + 2], args[args.index("sh", args.index("-c")) + 1 :]
        out = "".join(f"{self.sizes[image].get(path, 0)}\n" for path in paths)
        return subprocess.CompletedProcess(args, 0, out, "")


def test_kept_paths_are_growth_over_the_parent_measured_once_per_image(monkeypatch):
    from llm2wasm.host import report as report_module
    from llm2wasm.host.layers import get_layer

    fake = FakeDocker(
        {
            "sha256:web": {"/opt/mlc-llm": 30_000_000, "/opt/emsdk/upstream/emscripten/cache": 400_000_000},
            "sha256:emsdk": {"/opt/emsdk/upstream/emscripten/cache": 100_000_000},
        }
    )
    monkeypatch.setattr(report_module.docker, "run", fake.run)
    cache = {}
    kept = report_module.kept_paths(get_layer("web-runtime"), "sha256:web", "sha256:emsdk", cache)
    assert [(item.path, item.added_bytes) for item in kept] == [
        ("/opt/mlc-llm", 30_000_000),
        ("/opt/emsdk/upstream/emscripten/cache", 300_000_000),
    ]
    assert "not their sources" in kept[0].why and fake.runs == 2
    report_module.kept_paths(get_layer("web-runtime"), "sha256:web", "sha256:emsdk", cache)
    assert fake.runs == 2  # an image ID's sizes are measured once


def test_an_image_that_cannot_be_measured_reports_nothing_kept(monkeypatch):
    import subprocess

    from llm2wasm.host import report as report_module
    from llm2wasm.host.layers import get_layer

    monkeypatch.setattr(
        report_module.docker,
        "run",
        lambda args, check=False: subprocess.CompletedProcess(args, 125, "", "no such image"),
    )
    assert report_module.kept_paths(get_layer("ml"), "sha256:gone", None, {}) is None


def test_markdown_says_what_each_layer_keeps_and_what_it_adds_elsewhere():
    from llm2wasm.host.report import KeptPath

    built = report()
    built.layers[1].kept = [KeptPath("/opt/venv", 4_900_000_000, "what conversions import")]
    built.layers[1].elsewhere_bytes = 100_000_000
    built.layers[0].kept = [KeptPath("/usr", 99_000_000, "the OS")]
    built.layers[0].elsewhere_bytes = 1_000_000
    text = built.to_markdown()
    assert "| ml | `/opt/venv` | 4.90 GB | what conversions import |" in text
    assert "| ml | elsewhere | 100.00 MB | not in the paths it declares |" in text
    assert "| base | elsewhere" not in text  # below what counts as more than noise
