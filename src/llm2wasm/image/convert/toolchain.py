"""What made a step's output besides its inputs: the tools it ran, by version.

A conversion re-run into the same folder keeps every step whose key is unchanged. The key covers
the inputs and the settings; it must also cover the tools, or a re-run with a newer image (another
mlc_llm or TVM, another emscripten, other web runtimes, a newer llm2wasm with a WGSL repair) would
keep a library the old tools made and say nothing. Each step's key holds the versions of the tools
that step runs, and the state file records them, so a re-run says which tool changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from llm2wasm import __version__
from llm2wasm.image.convert.mlc import python_executable

ABSENT = "absent"

# The tools each step runs. Python packages by their import name (the distribution that provides
# them differs: apache-tvm or mlc-ai-nightly-cu128, mlc-llm or mlc-llm-nightly-cpu); `emcc` and
# `web_runtime` (the commits mlc-llm's and TVM's web runtimes were built from) only link.
STEP_TOOLS: dict[str, tuple[str, ...]] = {
    "merge": ("llm2wasm", "torch", "transformers", "peft"),
    "gen_config": ("llm2wasm", "mlc_llm", "transformers"),
    "convert_weight": ("llm2wasm", "mlc_llm", "tvm", "tvm_ffi", "torch"),
    "compile": ("llm2wasm", "mlc_llm", "tvm", "tvm_ffi", "emcc", "web_runtime"),
}
PYTHON_MODULES = ("mlc_llm", "tvm", "tvm_ffi", "torch", "transformers", "peft")

# Reads distribution metadata only: importing torch or tvm to ask would cost seconds.
_VERSIONS_SCRIPT = """
import json, sys
from importlib import metadata
providers = metadata.packages_distributions()
found = {}
for module in sys.argv[1:]:
    names = sorted(set(providers.get(module, [])))
    found[module] = " ".join(f"{name} {metadata.version(name)}" for name in names)
print(json.dumps(found))
"""


@dataclass(frozen=True)
class Toolchain:
    versions: dict[str, str] = field(default_factory=dict)

    def of(self, step: str) -> dict[str, str]:
        """The versions of the tools `step` runs, as they go into its key and its record."""
        return {tool: self.versions.get(tool) or ABSENT for tool in STEP_TOOLS[step]}


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What changed between two records of a step's tools, one phrase per tool."""
    return [
        f"{tool}: {before.get(tool, ABSENT)} -> {after.get(tool, ABSENT)}"
        for tool in sorted(set(before) | set(after))
        if before.get(tool, ABSENT) != after.get(tool, ABSENT)
    ]


def python_packages(modules: tuple[str, ...] = PYTHON_MODULES) -> dict[str, str]:
    result = subprocess.run(
        [python_executable(), "-c", _VERSIONS_SCRIPT, *modules], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        return {}
    return json.loads(result.stdout.strip().splitlines()[-1])


def emcc_version() -> str:
    """emcc's version and the commit it names, from its first line
    (`emcc (Emscripten gcc/clang-like replacement + linker emulating GNU ld) 3.1.56 (<commit>)`)."""
    emcc = shutil.which("emcc")
    if not emcc:
        return ABSENT
    try:
        result = subprocess.run([emcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ABSENT
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return ABSENT
    version = re.search(r"\d+\.\d+\.\d+.*$", lines[0])
    return version.group(0).strip() if version else lines[0]


def web_runtime_commits(source_dir: str | None = None) -> str:
    """The mlc-llm and TVM commits the image's web runtimes were built from (its BUILT_FROM record,
    written by the web-runtime layer)."""
    folder = source_dir or os.environ.get("MLC_LLM_SOURCE_DIR")
    if not folder:
        return ABSENT
    try:
        text = (Path(folder) / "BUILT_FROM").read_text()
    except OSError:
        return ABSENT
    record = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    commits = [f"{name}={record[name]}" for name in ("MLC_LLM_COMMIT", "TVM_COMMIT") if record.get(name)]
    return " ".join(commits) or ABSENT


def llm2wasm_identity() -> str:
    """The version and a digest of llm2wasm's own code: a changed WGSL repair or command line changes
    what a step makes even where the version number did not move (a build from a newer commit)."""
    package = Path(__file__).resolve().parents[2]  # all of llm2wasm
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    return f"{__version__} ({digest.hexdigest()[:12]})"


@cache
def installed_toolchain() -> Toolchain:
    return Toolchain(
        {
            "llm2wasm": llm2wasm_identity(),
            **python_packages(),
            "emcc": emcc_version(),
            "web_runtime": web_runtime_commits(),
        }
    )
