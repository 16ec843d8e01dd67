"""What a layer changed, and whether that can touch what its parents' checks look at.

A child image must not silently break a parent's checks. Running every parent's checks again on
every child makes the top layer pay for all the checks below it (torch and TVM imported again after
a one-line change under src/). Instead the build compares the child image with the parent image it
was built from, file by file and in its config, and runs a parent's checks again only when the
child did something that can change their outcome:

* it modified or removed anything that was already there (file content/size/time, mode, owner,
  symlink target, a directory's mode or owner, or the directory itself);
* it added a file that changes how existing programs start or what they find: Python start-up
  hooks (``*.pth``, ``sitecustomize``), configuration under /etc or in a home directory, a file
  inside a directory that is part of an installed package or library, or a name that shadows an
  existing one in a command, library or Python module search directory;
* it changed the configuration the checks run under: the user, the working directory, a variable
  (any new one outside the ``LLM2WASM_`` namespace, which no upstream tool reads), or a label other
  than the descriptive ones every layer sets.

Anything else (new files in new places, a new package beside the others) cannot change what the
parents' checks saw, so their results carry over. The rules are deliberately coarse: a false
"changed" costs a few seconds of checks, a false "unchanged" would cost the promise.
"""

from __future__ import annotations

import fnmatch
import gzip
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# One line per filesystem entry of the image's root filesystem (not /proc, /sys, /dev): path,
# type, size, modification time, mode, owner and symlink target. Run as root so nothing is hidden.
# Docker makes the /etc files and /.dockerenv below for every container: they differ per container.
MANIFEST_SCRIPT = (
    r"find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /etc/hostname -o -path /etc/hosts "
    r"-o -path /etc/resolv.conf -o -path /etc/mtab -o -path /.dockerenv \) -prune -o "
    r"-printf '%p\t%y\t%s\t%T@\t%m\t%U:%G\t%l\n'"
)

# Labels every layer sets to describe itself; parents' checks must not read them.
DESCRIPTIVE_LABELS = ("org.opencontainers.image.*", "io.llm2wasm.layer")
# Variables of our own namespace: set by our layers for our code, read by no upstream tool.
OWN_VARIABLE_PREFIX = "LLM2WASM_"

STARTUP_HOOKS = (
    "*.pth",
    "*/sitecustomize.py",
    "*/usercustomize.py",
    "/etc/*",
    "/usr/etc/*",
    "/root/.*",
    "/home/*/.*",
    "*/pyvenv.cfg",
    "*/pip.conf",
)
LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib")
PYTHON_EXTENSION_SUFFIXES = (".py", ".pyc", ".so", ".pyd")
# The standard library of the distribution's Python (its own directory, not its subfolders).
STDLIB_DIR = re.compile(r"^/usr(/local)?/lib/python3(\.\d+)?$")


@dataclass(frozen=True)
class Entry:
    kind: str  # find's %y: f file, d directory, l symlink, ...
    size: str
    mtime: str
    mode: str
    owner: str
    target: str

    def same_as(self, other: Entry) -> bool:
        if self.kind != other.kind:
            return False
        if self.kind == "d":  # a directory's size and time change whenever an entry is added
            return (self.mode, self.owner) == (other.mode, other.owner)
        return self == other


Manifest = dict[str, Entry]


def parse_manifest(text: str) -> Manifest:
    manifest: Manifest = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 7:
            continue  # a path with a tab or newline in it: too odd to compare, never ours
        manifest[parts[0]] = Entry(*parts[1:])
    return manifest


def load_manifest(path: Path) -> Manifest:
    return parse_manifest(gzip.decompress(path.read_bytes()).decode("utf-8", "replace"))


def save_manifest(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(text.encode(), compresslevel=1))
    tmp.replace(path)


@dataclass(frozen=True)
class LayerDiff:
    modified: list[str]
    removed: list[str]
    added: list[str]


def diff_manifests(parent: Manifest, child: Manifest) -> LayerDiff:
    modified = sorted(path for path, entry in parent.items() if path in child and not entry.same_as(child[path]))
    removed = sorted(path for path in parent if path not in child)
    added = sorted(path for path in child if path not in parent)
    return LayerDiff(modified, removed, added)


def _module_key(name: str) -> str:
    """numpy, numpy.py and numpy.cpython-311-x86_64-linux-gnu.so all answer `import numpy`."""
    for suffix in PYTHON_EXTENSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.split(".", 1)[0]


def _is_python_path_dir(path: str) -> bool:
    base = posixpath.basename(path)
    return base in ("site-packages", "dist-packages") or bool(STDLIB_DIR.match(path))


def search_dirs(parent: Manifest, env: dict[str, str]) -> tuple[set[str], set[str]]:
    """(command/library directories, Python import directories) of the image."""
    plain = {d for d in env.get("PATH", "").split(":") + env.get("LD_LIBRARY_PATH", "").split(":") if d}
    plain |= {
        d for d in parent if parent[d].kind == "d" and (d in LIBRARY_DIRS or posixpath.dirname(d) in LIBRARY_DIRS)
    }
    python = {d for d in parent if parent[d].kind == "d" and _is_python_path_dir(d)}
    return plain, python


def file_reasons(parent: Manifest, diff: LayerDiff, env: dict[str, str], limit: int = 5) -> list[str]:
    """Why the file changes can touch what the parent's checks look at (empty: they cannot)."""
    reasons = [f"modified {path}" for path in diff.modified[:limit]]
    reasons += [f"removed {path}" for path in diff.removed[: max(0, limit - len(reasons))]]
    if len(reasons) >= limit:
        return reasons
    plain_dirs, python_dirs = search_dirs(parent, env)
    names_in = {}
    for path in parent:
        directory = posixpath.dirname(path)
        if directory in plain_dirs:
            names_in.setdefault("plain", set()).add(posixpath.basename(path))
        if directory in python_dirs:
            names_in.setdefault("python", set()).add(_module_key(posixpath.basename(path)))
    for path in diff.added:
        if len(reasons) >= limit:
            break
        directory = posixpath.dirname(path)
        name = posixpath.basename(path)
        if any(fnmatch.fnmatch(path, pattern) for pattern in STARTUP_HOOKS):
            reasons.append(f"added {path} (start-up or configuration file)")
        elif directory in plain_dirs and name in names_in.get("plain", set()):
            reasons.append(f"added {path} (shadows an existing {name})")
        elif directory in python_dirs and _module_key(name) in names_in.get("python", set()):
            reasons.append(f"added {path} (shadows Python module {_module_key(name)})")
        elif directory in parent and _inside_installed_tree(directory, plain_dirs | python_dirs):
            reasons.append(f"added {path} (inside {directory}, which was already installed)")
    return reasons


def _inside_installed_tree(directory: str, roots: Iterable[str]) -> bool:
    """A directory below a search directory (a package's folder, a library's subfolder) whose
    contents the parent installed: a new file there can change how that package behaves."""
    return any(directory.startswith(root.rstrip("/") + "/") for root in roots)


def config_reasons(parent: dict, child: dict) -> list[str]:
    """Why the image configuration changes can touch the parent's checks (empty: they cannot)."""
    reasons = []
    defaults = {"User": "", "WorkingDir": "/"}  # what Docker uses when the image sets nothing
    for field, default in defaults.items():
        before, after = parent.get(field) or default, child.get(field) or default
        if before != after:
            reasons.append(f"{field} {before!r} -> {after!r}")
    parent_env = _env(parent)
    child_env = _env(child)
    for key in sorted(set(parent_env) | set(child_env)):
        if key in parent_env and parent_env.get(key) != child_env.get(key):
            reasons.append(f"ENV {key} changed" if key in child_env else f"ENV {key} removed")
        elif key not in parent_env and not key.startswith(OWN_VARIABLE_PREFIX):
            reasons.append(f"ENV {key} added")
    parent_labels = parent.get("Labels") or {}
    child_labels = child.get("Labels") or {}
    for key, value in sorted(parent_labels.items()):
        if any(fnmatch.fnmatch(key, pattern) for pattern in DESCRIPTIVE_LABELS):
            continue
        if child_labels.get(key) != value:
            reasons.append(f"LABEL {key} changed")
    return reasons


def _env(config: dict) -> dict[str, str]:
    return dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)


# ---------------------------------------------------------------- images
def image_facts(image: str) -> dict:
    """The image's configuration plus its filesystem layer digests (RootFS.Layers)."""
    import json

    from llm2wasm.host import docker

    data = json.loads(docker.run(["image", "inspect", image]).stdout)[0]
    return {
        "Id": data["Id"],
        "Config": data.get("Config") or {},
        "Layers": (data.get("RootFS") or {}).get("Layers") or [],
    }


def built_from(parent: dict, child: dict) -> bool:
    """Is the child image built on exactly this parent image (its layers start with the parent's)?"""
    layers = parent["Layers"]
    return bool(layers) and child["Layers"][: len(layers)] == layers


def image_manifest(image_id: str, cache_dir: Path) -> Manifest:
    """The manifest of an image, made once per image ID (an image never changes) and kept."""
    from llm2wasm.host import docker

    path = cache_dir / f"{image_id.replace(':', '-')}.tsv.gz"
    if not path.exists():
        result = docker.run(
            ["run", "--rm", "--user", "0", "--network", "none", "--entrypoint", "sh", image_id, "-c", MANIFEST_SCRIPT],
            timeout=300,
        )
        save_manifest(path, result.stdout)
        _prune(cache_dir, keep=40)
    return load_manifest(path)


def _prune(cache_dir: Path, keep: int) -> None:
    files = sorted(cache_dir.glob("*.tsv.gz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in files[keep:]:
        stale.unlink(missing_ok=True)


def parent_check_reasons(parent_image: str, child_image: str, cache_dir: Path) -> list[str]:
    """Why the parents' checks must run again on the child (empty: their results carry over)."""
    parent = image_facts(parent_image)
    child = image_facts(child_image)
    if not built_from(parent, child):
        return [f"not built on the current {parent_image} (rebuilt since?)"]
    reasons = config_reasons(parent["Config"], child["Config"])
    if reasons:
        return reasons
    parent_files = image_manifest(parent["Id"], cache_dir)
    child_files = image_manifest(child["Id"], cache_dir)
    from llm2wasm.host.checks import env_dict

    return file_reasons(parent_files, diff_manifests(parent_files, child_files), env_dict(child["Config"].get("Env")))
