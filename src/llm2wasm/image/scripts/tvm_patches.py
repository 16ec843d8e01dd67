"""Apply llm2wasm's patches to the installed TVM, loudly.

Runs inside the image (runtime-env layer) with only the standard library and `patch`:

    python tvm_patches.py apply --patches /opt/llm2wasm/patches [--tvm-dir DIR]

Each patch's header names its `target:` (relative to the tvm package), what it `fixes:` and the
`marker:` text the patched file holds. Patches of one fix are alternatives for different upstream
layouts: the one whose target exists and applies (`patch --dry-run --fuzz=0`) is applied; a patch
already applied is left alone. When none applies, it exits 1 naming the file, the installed TVM
version and the patches tried: upstream drifted, and the patch must be refreshed.

A fix of an upstream bug also names the buggy text (`needed-if:`): where the installed file does
not hold it, upstream no longer has the bug and the fix is skipped, said in the log. Where it does,
the patch must apply. (The image's checks prove the behaviour, not the text: verify/.)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = "llm2wasm_runtime_lib"  # the emcc.py patches' function
EMCC_FIX = "emcc-runtime-lib"


class PatchError(Exception):
    pass


@dataclass(frozen=True)
class Patch:
    path: Path
    target: str  # relative to the tvm package folder
    fixes: str  # patches of one fix are alternatives for different upstream layouts
    marker: str  # text the patched file holds
    needed_if: str | None = None  # an upstream bug's text: where absent, the fix is not needed

    @classmethod
    def load(cls, path: Path) -> Patch:
        headers: dict[str, str] = {}
        for line in path.read_text().splitlines():
            if line.startswith("--- "):
                break
            key, colon, value = line.partition(":")
            if colon and key in ("target", "fixes", "marker", "needed-if"):
                headers[key] = value.strip()
        missing = [key for key in ("target", "fixes", "marker") if key not in headers]
        if missing:
            raise PatchError(f"{path} has no {', '.join(repr(k + ':') for k in missing)} header line before the diff")
        return cls(path, headers["target"], headers["fixes"], headers["marker"], headers.get("needed-if"))


def load_patches(patches_dir: Path, fixes: str | None = None) -> list[Patch]:
    """The patches in `patches_dir`, or only those of one fix."""
    patches = [Patch.load(path) for path in sorted(patches_dir.glob("*.patch"))]
    if not patches:
        raise PatchError(f"no *.patch files in {patches_dir}")
    return [patch for patch in patches if fixes is None or patch.fixes == fixes]


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


def apply(tvm_dir: Path, patches: list[Patch], log=print) -> tuple[Patch | None, Path | None, str]:
    """Apply the patch among `patches` (the alternatives of one fix) that matches. Returns (patch,
    file, 'applied' | 'already applied' | 'not needed')."""
    tried: list[str] = []
    candidates = [(patch, tvm_dir / patch.target) for patch in patches]
    present = [(patch, target) for patch, target in candidates if target.is_file()]
    for patch, target in present:
        if is_applied(patch, target):
            log(f"{patch.path.name}: already applied to {target}; left alone")
            return patch, target, "already applied"
    bug_texts = {patch.needed_if for patch in patches}
    if None not in bug_texts and not any(patch.needed_if in target.read_text() for patch, target in present):
        files = ", ".join(str(target) for _, target in present) or "its file is not in this TVM"
        log(f"{patches[0].fixes}: not needed, upstream no longer has {' / '.join(sorted(bug_texts))!r} ({files})")
        return None, None, "not needed"
    for patch, target in present:
        check = _patch(patch, target, "--dry-run", "--forward")
        if check.returncode == 0:
            done = _patch(patch, target, "--forward")
            if done.returncode != 0:  # dry-run passed, so this is not drift; say everything
                raise PatchError(f"patch failed on {target} after a clean dry run:\n{done.stdout}{done.stderr}")
            patched = target.read_text()
            if patch.marker not in patched:
                raise PatchError(f"{patch.path.name} applied to {target} but {patch.marker!r} is not there")
            if patch.needed_if and patch.needed_if in patched:
                raise PatchError(f"{patch.path.name} applied to {target} but {patch.needed_if!r} is still there")
            log(f"{patch.path.name}: applied to {target}")
            return patch, target, "applied"
        tried.append(
            f"  {patch.path.name} -> {target}:\n    " + (check.stdout + check.stderr).strip().replace("\n", "\n    ")
        )
    files = [str(target) for _, target in present] or [f"none of {sorted({p.target for p in patches})} exist"]
    tried += [
        f"  {patch.path.name} -> {target}: file not present" for patch, target in candidates if not target.is_file()
    ]
    what = ", ".join(sorted({Path(p.target).name for p in patches}))  # emcc.py, in either layout
    raise PatchError(
        f"TVM's {what} changed upstream; no llm2wasm patch applies ({patches[0].fixes}).\n"
        f"file: {', '.join(files)}\n"
        f"installed TVM: {tvm_version(tvm_dir)} in {tvm_dir}\n"
        "patches tried:\n" + "\n".join(tried) + "\n"
        "Refresh the patch under patches/ for this layout (see patches/README.md) or pin the TVM/MLC wheels "
        "the patches were made for."
    )


def apply_all(tvm_dir: Path, patches: list[Patch], log=print) -> list[tuple[Patch | None, Path | None, str]]:
    """Every fix, each from its alternatives (apply)."""
    fixes = sorted({patch.fixes for patch in patches})
    return [apply(tvm_dir, [p for p in patches if p.fixes == fix], log) for fix in fixes]


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
                if state == "not applied" and patch.needed_if and patch.needed_if not in target.read_text():
                    state = "not needed"
                print(f"{patch.path.name}: {target}: {state}")
            return 0
        apply_all(tvm_dir, patches, log=lambda text: print(f"[tvm-patches] {text}"))
    except PatchError as error:
        print(f"[tvm-patches] error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
