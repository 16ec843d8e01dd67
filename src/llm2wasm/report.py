"""The build report: per layer its size (own and cumulative), build and verify time and result, and
what the final image actually holds (versions read from it, and the size of its CUDA libraries, so
a user can choose the `cpu` profile knowingly). Printed after `invoke build`; `--report FILE.md`
or `FILE.json` writes it; the publish workflow puts the Markdown in the job summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import docker

# distributions whose versions the report names (when installed)
REPORTED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "apache-tvm",
    "apache-tvm-ffi",
    "mlc-ai-cu128",
    "mlc-ai-cu130",
    "mlc-ai-cpu",
    "mlc-ai-nightly-cu128",
    "mlc-ai-nightly-cu130",
    "mlc-llm",
    "mlc-llm-cu128",
    "mlc-llm-cu130",
    "mlc-llm-cpu",
    "mlc-llm-nightly-cu128",
    "mlc-llm-nightly-cu130",
    "wgpudawn",
    "llm2wasm",
)
# pip list as JSON, emcc's first line, the bytes of the nvidia-* wheels' files, python's version
PROBE = (
    "python -m pip list --format json 2>/dev/null || echo '[]'; echo '--'; "
    "(emcc --version 2>/dev/null | head -n 1) || true; echo '--'; "
    "(du -sbc /opt/venv/lib/python3*/site-packages/nvidia 2>/dev/null | tail -n 1 | cut -f1) || true; echo '--'; "
    "python -c 'import platform; print(platform.python_version())' 2>/dev/null || true"
)


@dataclass
class LayerRow:
    layer: str
    tag: str
    size_bytes: int
    own_bytes: int
    build_seconds: float
    verify_seconds: float
    result: str


@dataclass
class BuildReport:
    profile: str
    layers: list[LayerRow] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    cuda_libraries_bytes: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"## llm2wasm build report: profile `{self.profile}`",
            "",
            "| layer | size | own | build | verify | checks |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for row in self.layers:
            lines.append(
                f"| {row.layer} | {human(row.size_bytes)} | {human(row.own_bytes)} | {row.build_seconds:.1f}s "
                f"| {row.verify_seconds:.1f}s | {row.result} |"
            )
        if self.versions:
            lines += ["", "| installed | version |", "| --- | --- |"]
            lines += [f"| {name} | {version} |" for name, version in sorted(self.versions.items())]
        if self.cuda_libraries_bytes:
            lines += [
                "",
                f"CUDA libraries (nvidia-* wheels) in the image: {human(self.cuda_libraries_bytes)}. "
                "Conversions use a GPU only for the PEFT merge and weight conversion; "
                "the `cpu` profile leaves them out.",
            ]
        return "\n".join(lines) + "\n"


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} GB"


def image_size(image: str) -> int:
    result = docker.run(["image", "inspect", "--format", "{{.Size}}", image], check=False)
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


def parse_probe(output: str) -> tuple[dict[str, str], int]:
    """Versions and CUDA library bytes from the PROBE's output."""
    parts = [*output.split("\n--\n"), "", "", "", ""][:4]
    versions: dict[str, str] = {}
    try:
        packages = json.loads(parts[0].strip() or "[]")
    except json.JSONDecodeError:
        packages = []
    wanted = {name.lower() for name in REPORTED_PACKAGES}
    for package in packages:
        name = package["name"].lower().replace("_", "-")
        if name in wanted:
            versions[name] = package["version"]
    emcc = parts[1].strip()
    if emcc:
        from .checks import emcc_version

        versions["emcc"] = emcc_version(emcc) or emcc
    if parts[3].strip():
        versions["python"] = parts[3].strip()
    cuda = int(parts[2].strip()) if parts[2].strip().isdigit() else 0
    return versions, cuda


def build_report(profile: str, results) -> BuildReport:
    from .layers import get_layer

    report = BuildReport(profile)
    sizes: dict[str, int] = {}
    for result in results:
        size = sizes[result.layer] = image_size(result.image_id)
        # own: what the layer adds to the image it is built FROM (a join counts what it copies in)
        parent = get_layer(result.layer).parent
        report.layers.append(
            LayerRow(
                result.layer,
                result.tag,
                size,
                max(size - sizes.get(parent, 0), 0) if parent else size,
                round(result.build_seconds, 1),
                round(result.verify_seconds, 1),
                result.verified,
            )
        )
    if results:
        probe = docker.run(
            ["run", "--rm", "--network", "none", "--entrypoint", "sh", results[-1].image_id, "-c", PROBE], check=False
        )
        report.versions, report.cuda_libraries_bytes = parse_probe(probe.stdout)
    return report


def write_report(report: BuildReport, path: Path) -> None:
    if path.suffix == ".json":
        path.write_text(report.to_json())
    elif path.suffix == ".md":
        path.write_text(report.to_markdown())
    else:
        from .errors import UsageError

        raise UsageError(f"--report {path}: name a .md or .json file")
