"""A stand-in for the Hugging Face Hub, for tests that cannot reach huggingface.co.

Written against the `huggingface_hub` client 2.4.0 (file_download.py, _snapshot_download.py,
hf_api.py, _commit_api.py, lfs.py, utils/_http.py): it answers the calls that client really makes,
with the fields and headers it reads, and nothing else. Standard library only. Model repositories
only, ids `namespace/name` only (the store: tests/standins/hub/store.py).

Endpoints (paths as the client builds them; revisions URL-quoted):

    GET  /api/models/<repo>[/revision/<rev>][?blobs=true]  model_info / repo_info: `sha` (40 hex), `siblings`
                                                            (with `blobs`: size, blobId, lfs {sha256, size,
                                                            pointerSize}), `gated`, `private`, `cardData`
    GET  /api/models/<repo>/tree/<rev>[/<path>][?recursive=true]   list_repo_tree (one page, no `expand`)
    GET  /api/models/<repo>/refs                            list_repo_refs: branches, tags (converts empty)
    GET|HEAD /<repo>/resolve/<rev>/<path>                   the file itself, 200 (206 for a Range), never a
                                                            redirect: ETag (git blob id, or sha256 for LFS files),
                                                            X-Repo-Commit, Content-Length, and for LFS files
                                                            X-Linked-Etag and X-Linked-Size
    POST /api/repos/create                                  create_repo (409 when it exists: exist_ok)
    POST /api/validate-yaml                                 README.md check before a commit (front matter closed)
    POST /api/models/<repo>/preupload/<rev>                 uploadMode lfs|regular (lfs: a `filter=lfs` pattern of
                                                            the repo's .gitattributes, the Hub's default one since
                                                            create, or over 10 MiB, or a binary sample),
                                                            shouldIgnore (always false),
                                                            oid of the file already at that path (sha256 for LFS
                                                            files, git blob id otherwise): the client skips files
                                                            whose oid equals its own
    POST /<repo>.git/info/lfs/objects/batch                 LFS batch (basic transfer): upload + verify actions,
                                                            no actions for an object already stored
    PUT  /lfs-upload/<ticket>                               the upload action's href (a presigned-URL stand-in)
    POST /<repo>.git/info/lfs/objects/verify                the verify action
    POST /api/models/<repo>/commit/<branch>                 ndjson: header, file (base64), lfsFile, deletedFile,
                                                            deletedFolder; a new commit on the branch
    OPTIONS *                                               CORS preflight; every answer carries
                                                            Access-Control-Allow-Origin: * and exposes the headers

Errors carry X-Error-Code / X-Error-Message as the Hub's do: RepoNotFound (401 without a token, 404
with one; private repositories are visible to their owner only), GatedRepo (401 without a token, 403
for a token whose user is not authorized; the metadata and file list of a gated repository stay
public, as on the Hub), RevisionNotFound, EntryNotFound. Tokens are given at start: token -> user
name; a user may write to the namespace of its own name. Commit ids are 40 hex digits, as the
Hub's, but not git commit hashes. Branches other than main, and tags, come from `seed_repo`.

Deliberately not implemented: Xet storage (never advertised: no X-Xet-* headers, no xet token
routes; a client with hf_xet installed must run with HF_HUB_DISABLE_XET=1 to upload here), LFS
multipart uploads, pull requests (create_pr), .gitignore (shouldIgnore), copies between repos,
create_branch / create_tag / delete_repo / whoami, datasets and spaces, pagination, `expand`,
organizations, redirects (renamed repos, CDN), YAML validation beyond the front matter's delimiters
(`cardData` is read from top-level `key: value` and list lines only), and everything else the client
does not call to download and upload.

In-process: `with StandinHub(tmp_path / "hub", tokens={"hf_write": "tester"}) as hub: hub.url ...`;
standalone: `python -m tests.standins.hub.server --root DIR --port N [--token TOKEN=USER ...]`.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

from tests.standins.hub.routes import HubHandler
from tests.standins.hub.store import RepoStore


class StandinHub:
    """The stand-in Hub on 127.0.0.1 in a thread; a context manager. Repositories live under `root`
    (a temporary folder when None). `requests` lists every (method, path) served, for counting."""

    def __init__(self, root: Path | None = None, *, tokens: dict[str, str] | None = None, port: int = 0):
        self._tmp = tempfile.TemporaryDirectory(prefix="standin-hub-") if root is None else None
        self.store = RepoStore(Path(self._tmp.name) if self._tmp else Path(root))
        self.tokens = dict(tokens or {})
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", port), HubHandler)
        self.server.daemon_threads = True
        self.server.hub = self  # type: ignore[attr-defined]
        self.server.tickets = {}  # type: ignore[attr-defined]  # LFS upload URL -> (repo, oid, size)
        self.server.connections = set()  # type: ignore[attr-defined]  # open keep-alive connections
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StandinHub:
        # a short poll: stop() waits for the serving loop to notice, once per test
        serve = lambda: self.server.serve_forever(poll_interval=0.02)  # noqa: E731
        self._thread = threading.Thread(target=serve, name="standin-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
            self._thread = None
        self.server.server_close()
        for connection in list(self.server.connections):  # the client's pooled connections, too
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> StandinHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def seed_repo(self, repo_id: str, files: dict, **options) -> str:
        """Commit files straight into the store (see RepoStore.seed); the commit id."""
        return self.store.seed(repo_id, files, **options)

    def served(self, method: str | None = None, containing: str = "") -> list[tuple[str, str]]:
        """The requests served so far, filtered by method and by a part of the path."""
        return [(m, p) for m, p in list(self.requests) if (method is None or m == method) and containing in p]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the stand-in Hugging Face Hub (tests only).")
    parser.add_argument("--root", type=Path, required=True, help="folder holding the repositories")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    parser.add_argument("--token", action="append", default=[], help="TOKEN=USER, accepted as that user")
    args = parser.parse_args(argv)
    tokens = dict(item.split("=", 1) for item in args.token)
    hub = StandinHub(args.root, tokens=tokens, port=args.port)
    print(f"stand-in Hub serving {args.root} at {hub.url}", flush=True)
    try:
        hub.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub.server.server_close()


if __name__ == "__main__":
    main()
