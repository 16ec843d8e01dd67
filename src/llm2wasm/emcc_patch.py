"""Apply llm2wasm's patch to TVM's wasm linker helper (emcc.py), loudly.

Runs inside the image (runtime-env layer) with only the standard library and `patch`:

    python emcc_patch.py apply --patches /opt/llm2wasm/patches [--tvm-dir DIR]

It finds the installed helper (tvm/support/emcc.py or tvm/contrib/emcc.py), picks the patch
whose `target:` matches, checks it with `patch --dry-run --fuzz=0`, and applies it. A patch that
is already applied is left alone. When no patch applies, it exits 1 naming the file, the installed
TVM version and the patches tried: upstream drifted, and the patch must be refreshed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = "llm2wasm_runtime_lib"


class PatchError(Exception):
    pass


@dataclass(frozen=True)
class Patch:
    path: Path
    target: str  # relative to the tvm package folder

    @classmethod
    def load(cls, path: Path) -> Patch:
        for line in path.read_text().splitlines():
            if line.startswith("target:"):
                return cls(path, line.split(":", 1)[1].strip())
            if line.startswith("--- "):
                break
        raise PatchError(f"{path} has no 'target:' header line before the diff")


def load_patches(patches_dir: Path) -> list[Patch]:
    patches = [Patch.load(path) for path in sorted(patches_dir.glob("*.patch"))]
    if not patches:
        raise PatchError(f"no *.patch files in {patches_dir}")
    return patches


def tvm_package_dir() -> Path:
    spec = importlib.util.find_spec("tvm")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("TVM is not installed in this Python: install mlc-ai (or apache-tvm) first")
    return Path(next(iter(spec.submodule_search_locations)))


def tvm_version(tvm_dir: Path) -> str:
    """The distribution that installed this tvm folder, e.g. 'apache-tvm 0.25.0'."""
    init = (tvm_dir / "__init__.py").resolve()
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            if (
                file.name == "__init__.py"
                and file.parent.name == "tvm"
                and Path(dist.locate_file(file)).resolve() == init
            ):
                return f"{dist.metadata['Name']} {dist.version}"
    return "unknown version (no installed distribution owns this folder)"


def _patch(patch: Patch, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["patch", "--batch", "--fuzz=0", "--no-backup-if-mismatch", *extra, str(target), str(patch.path)],
        capture_output=True,
        text=True,
    )


def is_applied(patch: Patch, target: Path) -> bool:
    return _patch(patch, target, "--dry-run", "--reverse", "--force").returncode == 0


def apply(tvm_dir: Path, patches: list[Patch], log=print) -> tuple[Patch, Path, str]:
    """Apply the matching patch. Returns (patch, file, 'applied' | 'already applied')."""
    tried: list[str] = []
    candidates = [(patch, tvm_dir / patch.target) for patch in patches]
    present = [(patch, target) for patch, target in candidates if target.is_file()]
    for patch, target in present:
        if is_applied(patch, target):
            log(f"{patch.path.name}: already applied to {target}; left alone")
            return patch, target, "already applied"
        check = _patch(patch, target, "--dry-run", "--forward")
        if check.returncode == 0:
            done = _patch(patch, target, "--forward")
            if done.returncode != 0:  # dry-run passed, so this is not drift; say everything
                raise PatchError(f"patch failed on {target} after a clean dry run:\n{done.stdout}{done.stderr}")
            if MARKER not in target.read_text():
                raise PatchError(f"{patch.path.name} applied to {target} but {MARKER} is not there")
            log(f"{patch.path.name}: applied to {target}")
            return patch, target, "applied"
        tried.append(
            f"  {patch.path.name} -> {target}:\n    " + (check.stdout + check.stderr).strip().replace("\n", "\n    ")
        )
    helpers = [str(target) for _, target in present] or [f"none of {sorted({p.target for p in patches})} exist"]
    tried += [
        f"  {patch.path.name} -> {target}: file not present" for patch, target in candidates if not target.is_file()
    ]
    raise PatchError(
        "TVM's emcc.py changed upstream; no llm2wasm patch applies.\n"
        f"helper: {', '.join(helpers)}\n"
        f"installed TVM: {tvm_version(tvm_dir)} in {tvm_dir}\n"
        "patches tried:\n" + "\n".join(tried) + "\n"
        "Refresh the patch under patches/ for this layout (see patches/README.md) or pin the TVM/MLC wheels "
        "the patches were made for."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["apply", "status"])
    parser.add_argument("--patches", type=Path, required=True, help="folder of *.patch files")
    parser.add_argument("--tvm-dir", type=Path, help="the tvm package folder (default: the installed one)")
    args = parser.parse_args(argv)
    try:
        patches = load_patches(args.patches)
        tvm_dir = args.tvm_dir or tvm_package_dir()
        if args.command == "status":
            for patch in patches:
                target = tvm_dir / patch.target
                state = "absent" if not target.is_file() else "applied" if is_applied(patch, target) else "not applied"
                print(f"{patch.path.name}: {target}: {state}")
            return 0
        apply(tvm_dir, patches, log=lambda text: print(f"[emcc-patch] {text}"))
    except PatchError as error:
        print(f"[emcc-patch] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
