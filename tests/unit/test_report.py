import json

import pytest

from llm2wasm.errors import UsageError
from llm2wasm.report import BuildReport, LayerRow, human, parse_probe, write_report

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
