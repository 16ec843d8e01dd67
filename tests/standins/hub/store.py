"""The stand-in Hub's storage: model repositories as folders of JSON and content-addressed blobs.

    ROOT/<namespace>/<name>/repo.json             visibility, gating, refs (branches and tags -> commit id)
    ROOT/<namespace>/<name>/commits/<id>.json     parent, message, date and the whole tree (path -> entry)
    ROOT/<namespace>/<name>/blobs/<git sha1>      content of a regular (git) file
    ROOT/<namespace>/<name>/lfs/<sha256>          content of an LFS object, whether committed yet or not

A tree entry is what the Hub reports for a file: `oid` (the git blob id: of the content for a regular
file, of the LFS pointer file for an LFS file), `size` (of the content) and, for LFS files,
`lfs: {oid: sha256, size, pointerSize}`. Commit ids are 40 hex digits, like the Hub's, but are the
SHA-1 of this store's own record of the commit, not of a git commit object.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path

# The .gitattributes the Hub puts in the first commit of every new model repository.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz "
        "*.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar "
        "*.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
    ).split()
)
# Larger files, and binary ones, go to LFS whatever .gitattributes says (the Hub refuses them in git).
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")


class HubError(Exception):
    """An answer other than success: HTTP status, the Hub's X-Error-Code (or None) and its message."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def valid_repo_id(repo_id: str) -> bool:
    parts = repo_id.split("/")
    return len(parts) == 2 and all(NAME.fullmatch(p) and ".." not in p and "--" not in p for p in parts)


def valid_path(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and all(part not in ("", ".", "..") for part in parts) and parts[0] not in (".git", ".cache")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    tmp.replace(path)


class RepoStore:
    """Every repository under one folder. One lock: the stand-in serves tests, not traffic."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # -- reading -------------------------------------------------------------------------------
    def folder(self, repo_id: str) -> Path:
        return self.root / repo_id

    def exists(self, repo_id: str) -> bool:
        return valid_repo_id(repo_id) and (self.folder(repo_id) / "repo.json").is_file()

    def settings(self, repo_id: str) -> dict:
        with self.lock:
            return json.loads((self.folder(repo_id) / "repo.json").read_text())

    def resolve(self, repo_id: str, revision: str) -> str:
        """A branch, a tag or a full commit id of this repository -> the commit id."""
        refs = self.settings(repo_id)["refs"]
        for kind in ("branches", "tags"):
            if revision in refs[kind]:
                return refs[kind][revision]
        if (
            re.fullmatch(r"[0-9a-f]{40}", revision)
            and (self.folder(repo_id) / "commits" / f"{revision}.json").is_file()
        ):
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def commit_record(self, repo_id: str, commit: str) -> dict:
        return json.loads((self.folder(repo_id) / "commits" / f"{commit}.json").read_text())

    def tree(self, repo_id: str, commit: str) -> dict[str, dict]:
        return self.commit_record(repo_id, commit)["tree"]

    def content_path(self, repo_id: str, entry: dict) -> Path:
        if entry.get("lfs"):
            return self.folder(repo_id) / "lfs" / entry["lfs"]["oid"]
        return self.folder(repo_id) / "blobs" / entry["oid"]

    def read_text(self, repo_id: str, commit: str, path: str) -> str | None:
        entry = self.tree(repo_id, commit).get(path)
        return None if entry is None else self.content_path(repo_id, entry).read_text(errors="replace")

    def model_info(self, repo_id: str, commit: str, *, blobs: bool) -> dict:
        """What /api/models/<repo>[/revision/<rev>] answers (the fields the client reads)."""
        settings, record = self.settings(repo_id), self.commit_record(repo_id, commit)
        siblings = []
        for path, entry in sorted(record["tree"].items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry.get("lfs"):
                    lfs = entry["lfs"]
                    sibling["lfs"] = {"sha256": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
            siblings.append(sibling)
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],  # stable per repository, like the Hub's
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "lastModified": record["date"],
            "createdAt": settings["createdAt"],
            "private": settings["private"],
            "disabled": False,
            "gated": settings["gated"],
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        card = card_data(self.read_text(repo_id, commit, "README.md"))
        if card is not None:
            info["cardData"] = card
        return info

    def listing(self, repo_id: str, commit: str, folder: str, *, recursive: bool) -> list[dict]:
        """What /api/models/<repo>/tree/<rev>[/<folder>] answers: folders, then files."""
        tree = self.tree(repo_id, commit)
        prefix = f"{folder.strip('/')}/" if folder.strip("/") else ""
        if prefix and not any(path.startswith(prefix) for path in tree):
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on {commit}")
        files, folders = [], set()
        for path, entry in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            # the folders on the way to this file: all of them, or only the first level
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
                if entry.get("lfs"):
                    item["lfs"] = dict(entry["lfs"])
                files.append(item)
        return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": path} for path in sorted(folders)] + files

    def has_lfs_object(self, repo_id: str, sha256: str, size: int | None = None) -> bool:
        path = self.folder(repo_id) / "lfs" / sha256
        return path.is_file() and (size is None or path.stat().st_size == size)

    def upload_mode(self, repo_id: str, commit: str, path: str, size: int, sample: bytes) -> str:
        """ "lfs" or "regular", as the Hub decides it for a file about to be committed."""
        if size > LFS_SIZE_THRESHOLD or b"\0" in sample:
            return "lfs"
        attributes = self.read_text(repo_id, commit, ".gitattributes") or ""
        for line in attributes.splitlines():
            pattern, *attrs = line.split() or [""]
            if "filter=lfs" in attrs:
                subject = path if "/" in pattern else path.rsplit("/", 1)[-1]
                if fnmatch.fnmatchcase(subject, pattern):
                    return "lfs"
        return "regular"

    # -- writing -------------------------------------------------------------------------------
    def create(self, repo_id: str, *, private: bool = False, gated: str | bool = False, authorized=()) -> str:
        """A new repository whose first commit holds the Hub's default .gitattributes; its commit id."""
        if not valid_repo_id(repo_id):
            raise HubError(400, None, f"Invalid repo name: {repo_id}")
        with self.lock:
            if self.exists(repo_id):
                raise HubError(409, None, "You already created this model repo")
            settings = {
                "private": private,
                "gated": gated,
                "authorized": sorted(authorized),
                "createdAt": _now(),
                "refs": {"branches": {}, "tags": {}},
            }
            _write_json(self.folder(repo_id) / "repo.json", settings)
            return self.commit(
                repo_id, "main", "initial commit", files={".gitattributes": DEFAULT_GITATTRIBUTES.encode()}
            )

    def store_lfs_object(self, repo_id: str, sha256: str, size: int, chunks) -> None:
        """Keep an uploaded object if its content has the announced sha256 and size (else HubError)."""
        folder = self.folder(repo_id) / "lfs"
        folder.mkdir(parents=True, exist_ok=True)
        digest, written = hashlib.sha256(), 0
        with tempfile.NamedTemporaryFile(dir=folder, delete=False) as handle:
            for chunk in chunks:
                digest.update(chunk)
                handle.write(chunk)
                written += len(chunk)
        if digest.hexdigest() != sha256 or written != size:
            os.unlink(handle.name)
            raise HubError(400, None, f"Uploaded content does not match oid {sha256} and size {size}")
        os.replace(handle.name, folder / sha256)

    def commit(
        self,
        repo_id: str,
        branch: str,
        summary: str,
        *,
        description: str = "",
        files: dict[str, bytes] | None = None,
        lfs_files: dict[str, tuple[str, int]] | None = None,
        deleted_files=(),
        deleted_folders=(),
        parent_commit: str | None = None,
        create_branch: bool = False,
    ) -> str:
        """A new commit on `branch`: regular files by content, LFS files by (sha256, size) of an
        object already stored, deletions; the branch moves to it. Its commit id."""
        with self.lock:
            settings = self.settings(repo_id)
            branches = settings["refs"]["branches"]
            if branch not in branches and not create_branch and branches:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            parent = branches.get(branch) or branches.get("main")
            if parent_commit is not None and parent is not None and not parent.startswith(parent_commit):
                raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
            tree = dict(self.tree(repo_id, parent)) if parent else {}
            for path in deleted_files:
                if path not in tree:
                    raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {path}")
                del tree[path]
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                for path in [p for p in tree if p.startswith(prefix)]:
                    del tree[path]
            for path, content in (files or {}).items():
                blob = git_blob_id(content)
                target = self.folder(repo_id) / "blobs" / blob
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                tree[path] = {"oid": blob, "size": len(content)}
            for path, (sha256, size) in (lfs_files or {}).items():
                if not self.has_lfs_object(repo_id, sha256, size):
                    raise HubError(422, None, f"LFS object {sha256} of {path} was never uploaded to {repo_id}")
                pointer = lfs_pointer(sha256, size)
                tree[path] = {
                    "oid": git_blob_id(pointer),
                    "size": size,
                    "lfs": {"oid": sha256, "size": size, "pointerSize": len(pointer)},
                }
            record = {"parent": parent, "summary": summary, "description": description, "date": _now(), "tree": tree}
            record_text = json.dumps(record, sort_keys=True)
            commit = hashlib.sha1(f"{record_text}{time.monotonic_ns()}".encode()).hexdigest()
            _write_json(self.folder(repo_id) / "commits" / f"{commit}.json", record)
            branches[branch] = commit
            _write_json(self.folder(repo_id) / "repo.json", settings)
            return commit

    def set_ref(self, repo_id: str, kind: str, name: str, commit: str) -> None:
        with self.lock:
            settings = self.settings(repo_id)
            settings["refs"][kind][name] = commit
            _write_json(self.folder(repo_id) / "repo.json", settings)

    def seed(
        self,
        repo_id: str,
        files: dict[str, bytes | str | Path],
        *,
        branch: str = "main",
        tag: str | None = None,
        message: str = "seed",
        private: bool = False,
        gated: str | bool = False,
        authorized=(),
    ) -> str:
        """For tests: commit `files` (content, text or a local file) on `branch` of `repo_id`,
        creating the repository and the branch (from main) when missing, each file stored as the
        Hub would store an upload of it (LFS or regular); optionally tag the commit. Its commit id."""
        with self.lock:
            if not self.exists(repo_id):
                self.create(repo_id, private=private, gated=gated, authorized=authorized)
            head = self.settings(repo_id)["refs"]["branches"].get(branch) or self.resolve(repo_id, "main")
            regular, lfs = {}, {}
            for path, value in files.items():
                content = Path(value).read_bytes() if isinstance(value, Path) else value
                content = content.encode() if isinstance(content, str) else content
                if content and self.upload_mode(repo_id, head, path, len(content), content[:512]) == "lfs":
                    sha256 = hashlib.sha256(content).hexdigest()
                    self.store_lfs_object(repo_id, sha256, len(content), [content])
                    lfs[path] = (sha256, len(content))
                else:
                    regular[path] = content
            commit = self.commit(repo_id, branch, message, files=regular, lfs_files=lfs, create_branch=True)
            if tag is not None:
                self.set_ref(repo_id, "tags", tag, commit)
            return commit


def decode_base64_file(value: dict) -> bytes:
    if value.get("encoding", "base64") != "base64":
        raise HubError(400, None, f"Unsupported encoding {value.get('encoding')!r} for {value.get('path')}")
    return base64.b64decode(value["content"])


def card_data(readme: str | None) -> dict | None:
    """The README's YAML front matter, read as far as a standard-library parser can: top-level
    `key: value` scalars and lists (`key: [a, b]` or `- item` lines). Enough for license and tags."""
    if not readme or not readme.startswith("---\n") or "\n---" not in readme[3:]:
        return None
    data: dict = {}
    key = None
    for line in readme[4:].split("\n---", 1)[0].splitlines():
        if line.startswith(("  - ", "- ")) and key is not None:
            data.setdefault(key, [])
            if isinstance(data[key], list):
                data[key].append(line.split("- ", 1)[1].strip().strip("'\""))
        elif ":" in line and not line.startswith((" ", "#")):
            key, value = (part.strip() for part in line.split(":", 1))
            if value.startswith("[") and value.endswith("]"):
                data[key] = [item.strip().strip("'\"") for item in value[1:-1].split(",") if item.strip()]
            elif value:
                data[key] = value.strip("'\"")
    return data
