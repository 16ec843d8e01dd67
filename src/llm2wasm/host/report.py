"""The build report: per layer its size (own and cumulative), build and verify time and result, what
it keeps and why (the registry's `keeps`, each path's growth measured in the images), and
what the final image actually holds (versions read from it, and the size of its CUDA libraries, so
a user can choose the `cpu` profile knowingly). Printed after `invoke build`; `--report FILE.md`
or `FILE.json` writes it; the publish workflow puts the Markdown in the job summary."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm2wasm.host import docker

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
class KeptPath:
    path: str
    added_bytes: int
    why: str


@dataclass
class LayerRow:
    layer: str
    tag: str
    size_bytes: int
    own_bytes: int
    build_seconds: float
    verify_seconds: float
    result: str
    # the registry's `keeps` with what each path grew by over the parent image; None: not measured
    kept: list[KeptPath] = field(default_factory=list)
    elsewhere_bytes: int | None = None


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
        if any(row.kept for row in self.layers):
            lines += [
                "",
                "What each layer keeps, and why (growth over the image it is built FROM):",
                "",
                "| layer | path | adds | why |",
                "| --- | --- | ---: | --- |",
            ]
            for row in self.layers:
                lines += [
                    f"| {row.layer} | `{kept.path}` | {human(kept.added_bytes)} | {kept.why} |" for kept in row.kept
                ]
                if row.elsewhere_bytes and row.elsewhere_bytes >= ELSEWHERE_SHOWN:
                    lines.append(
                        f"| {row.layer} | elsewhere | {human(row.elsewhere_bytes)} | not in the paths it declares |"
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


# below this, what a layer adds outside its declared paths is noise (/etc, dpkg's records, labels)
ELSEWHERE_SHOWN = 5_000_000
KEPT_SIZES = "kept-sizes.json"
PATH_SIZES_SCRIPT = 'for p in "$@"; do if [ -e "$p" ]; then du -sbx "$p" | cut -f1; else echo 0; fi; done'


def path_sizes(image_id: str, paths: list[str], cache: dict[str, dict[str, int]]) -> dict[str, int] | None:
    """Bytes under each path in the image (0 where it does not exist), measured once per image ID
    (images are immutable) with du as root; None when the image cannot be measured."""
    known = cache.setdefault(image_id, {})
    missing = [path for path in dict.fromkeys(paths) if path not in known]
    if missing:
        run_as_root = ["run", "--rm", "--network", "none", "--user", "0", "--entrypoint", "sh", image_id]
        result = docker.run([*run_as_root, "-c", PATH_SIZES_SCRIPT, "sh", *missing], check=False)
        values = result.stdout.split()
        if result.returncode != 0 or len(values) != len(missing) or not all(v.isdigit() for v in values):
            return None
        known.update(zip(missing, map(int, values), strict=True))
    return {path: known[path] for path in paths}


def kept_paths(layer, image_id: str, parent_id: str | None, cache) -> list[KeptPath] | None:
    """The layer's declared paths with what each grew by over the parent image."""
    paths = [path for path, _ in layer.keeps]
    here = path_sizes(image_id, paths, cache)
    before = path_sizes(parent_id, paths, cache) if parent_id else dict.fromkeys(paths, 0)
    if here is None or before is None:
        return None
    return [KeptPath(path, max(here[path] - before[path], 0), why) for path, why in layer.keeps]


def load_kept_sizes(state_dir: Path) -> dict[str, dict[str, int]]:
    try:
        return json.loads((state_dir / KEPT_SIZES).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def save_kept_sizes(state_dir: Path, cache: dict[str, dict[str, int]]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (KEPT_SIZES + ".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(state_dir / KEPT_SIZES)


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
        from llm2wasm.host.checks import emcc_version

        versions["emcc"] = emcc_version(emcc) or emcc
    if parts[3].strip():
        versions["python"] = parts[3].strip()
    cuda = int(parts[2].strip()) if parts[2].strip().isdigit() else 0
    return versions, cuda


def build_report(profile: str, results, state_dir: Path | None = None) -> BuildReport:
    from llm2wasm.host.layers import get_layer
    from llm2wasm.host.state import STATE_DIR

    state_dir = state_dir or STATE_DIR
    report = BuildReport(profile)
    sizes: dict[str, int] = {}
    image_ids = {result.layer: result.image_id for result in results}
    cache = load_kept_sizes(state_dir)
    for result in results:
        layer = get_layer(result.layer)
        size = sizes[result.layer] = image_size(result.image_id)
        # own: what the layer adds to the image it is built FROM (a join counts what it copies in)
        own = max(size - sizes.get(layer.parent, 0), 0) if layer.parent else size
        row = LayerRow(
            result.layer,
            result.tag,
            size,
            own,
            round(result.build_seconds, 1),
            round(result.verify_seconds, 1),
            result.verified,
        )
        kept = kept_paths(layer, result.image_id, image_ids.get(layer.parent), cache) if layer.keeps else None
        if kept is not None:
            row.kept = kept
            row.elsewhere_bytes = max(own - sum(item.added_bytes for item in kept), 0)
        report.layers.append(row)
    # only the images of this build: the file does not grow with every image ever built
    save_kept_sizes(state_dir, {image: sizes for image, sizes in cache.items() if image in image_ids.values()})
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
        from llm2wasm.errors import UsageError

        raise UsageError(f"--report {path}: name a .md or .json file")
