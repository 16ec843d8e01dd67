"""The stand-in Hub's HTTP side: routing, authorization, CORS, and the answers of each endpoint
(listed in tests/standins/hub/server.py)."""

from __future__ import annotations

import base64
import json
import mimetypes
import secrets
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

from tests.standins.hub.store import HubError, decode_base64_file, valid_path, valid_repo_id

# What a browser page may read of an answer (the Hub exposes these too).
EXPOSED_HEADERS = (
    "X-Repo-Commit, X-Request-Id, X-Error-Code, X-Error-Message, ETag, Link, Accept-Ranges, Content-Range, "
    "X-Linked-Size, X-Linked-ETag"
)
CHUNK = 1024 * 1024


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server_version = "StandinHub/1"

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def hub(self):
        return self.server.hub

    def setup(self):
        super().setup()
        self.server.connections.add(self.connection)  # closed by StandinHub.stop: a stopped Hub answers nothing

    def finish(self):
        self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format, *args):  # quiet: the tests count requests through hub.requests
        pass

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.segments = [unquote(part) for part in split.path.split("/")[1:]]
        self.hub.requests.append((method, split.path))
        # The whole body first, whatever the answer: an unread body would be taken for the next
        # request on this keep-alive connection. Uploads here are test-sized.
        self.body = self._read_body() if method in ("POST", "PUT") else b""
        try:
            if method == "OPTIONS":
                return self._preflight()
            self._route(method)
        except HubError as error:
            self._error(error)
        except Exception as error:  # a stand-in bug: say so to the client rather than drop the connection
            self._error(HubError(500, None, f"stand-in Hub failure: {error!r}"))

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_OPTIONS(self):
        self._dispatch("OPTIONS")

    def _cors(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Expose-Headers", EXPOSED_HEADERS)

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self._cors()
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        self._send(status, json.dumps(value).encode())

    def _error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send(error.status, json.dumps({"error": error.message}).encode(), headers)

    def _preflight(self) -> None:
        self.send_response(204)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, OPTIONS")
        asked = self.headers.get("Access-Control-Request-Headers")
        self.send_header("Access-Control-Allow-Headers", asked or "Authorization, Content-Type, Range")
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _read_body(self) -> bytes:
        """The request body: with a Content-Length, or chunked (a streamed file upload)."""
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, up to the blank line
            pass
        return b"".join(chunks)

    def _body_json(self):
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, None, "Body is not JSON") from None

    # -- who is asking -------------------------------------------------------------------------
    def _user(self) -> str | None:
        authorization = self.headers.get("Authorization", "")
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _readable(self, repo_id: str) -> dict:
        """The repo's settings when the caller may see it; RepoNotFound as the Hub answers it otherwise."""
        user = self._user()
        store = self.hub.store
        if store.exists(repo_id):
            settings = store.settings(repo_id)
            if not settings["private"] or user == repo_id.split("/")[0]:
                return settings
        raise HubError(404 if user else 401, "RepoNotFound", "Repository not found")

    def _downloadable(self, repo_id: str) -> None:
        settings = self._readable(repo_id)
        user = self._user()
        if settings["gated"] and user != repo_id.split("/")[0] and user not in settings["authorized"]:
            if user is None:
                message = (
                    f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                    "to access it. Please log in."
                )
                raise HubError(401, "GatedRepo", message)
            message = (
                f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                f"Visit {self._base()}/{repo_id} to ask for access."
            )
            raise HubError(403, "GatedRepo", message)

    def _writable(self, repo_id: str) -> None:
        self._readable(repo_id)
        user = self._user()
        if user is None:
            raise HubError(401, None, "You must be authenticated to write to a repository")
        if user != repo_id.split("/")[0]:
            raise HubError(403, None, f"You don't have the rights to write to {repo_id}")

    def _base(self) -> str:
        return f"http://{self.headers.get('Host') or '127.0.0.1'}"

    # -- routing -------------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        s = self.segments
        if s[:2] == ["api", "models"] and len(s) >= 4:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if method == "GET" and not rest:
                return self._model_info(repo_id, "main")
            if method == "GET" and len(rest) == 2 and rest[0] == "revision":
                return self._model_info(repo_id, rest[1])
            if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(repo_id, rest[1], "/".join(rest[2:]))
            if method == "GET" and rest == ["refs"]:
                return self._refs(repo_id)
            if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                return self._preupload(repo_id, rest[1])
            if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                return self._commit(repo_id, rest[1])
        if method == "POST" and s == ["api", "repos", "create"]:
            return self._create_repo()
        if method == "POST" and s == ["api", "validate-yaml"]:
            return self._validate_yaml()
        if method == "POST" and len(s) == 6 and s[1].endswith(".git") and s[2:5] == ["info", "lfs", "objects"]:
            repo_id = f"{s[0]}/{s[1].removesuffix('.git')}"
            if s[5] == "batch":
                return self._lfs_batch(repo_id)
            if s[5] == "verify":
                return self._lfs_verify(repo_id)
        if method == "PUT" and len(s) == 2 and s[0] == "lfs-upload":
            return self._lfs_upload(s[1])
        if method in ("GET", "HEAD") and len(s) >= 5 and s[2] == "resolve":
            return self._resolve(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise HubError(404, None, f"Not Found: the stand-in Hub does not implement {method} {urlsplit(self.path).path}")

    # -- reading -------------------------------------------------------------------------------
    def _model_info(self, repo_id: str, revision: str) -> None:
        self._readable(repo_id)
        commit = self.hub.store.resolve(repo_id, revision)
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        self._json(self.hub.store.model_info(repo_id, commit, blobs=blobs))

    def _tree(self, repo_id: str, revision: str, folder: str) -> None:
        self._readable(repo_id)
        commit = self.hub.store.resolve(repo_id, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._json(self.hub.store.listing(repo_id, commit, folder, recursive=recursive))

    def _refs(self, repo_id: str) -> None:
        refs = self._readable(repo_id)["refs"]

        def listed(kind: str, prefix: str) -> list[dict]:
            return [{"name": n, "ref": f"{prefix}{n}", "targetCommit": c} for n, c in sorted(refs[kind].items())]

        answer = {"branches": listed("branches", "refs/heads/"), "tags": listed("tags", "refs/tags/"), "converts": []}
        if self.query.get("include_prs"):
            answer["pullRequests"] = []
        self._json(answer)

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        self._downloadable(repo_id)
        store = self.hub.store
        commit = store.resolve(repo_id, revision)
        entry = store.tree(repo_id, commit).get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        content = store.content_path(repo_id, entry)
        size = entry["size"]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if entry.get("lfs"):
            etag = entry["lfs"]["oid"]
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        else:
            etag = entry["oid"]
        headers["ETag"] = f'"{etag}"'
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and "," not in wanted and size:
            first, _, last = wanted[len("bytes=") :].partition("-")
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start > end:
                raise HubError(416, None, "Requested range not satisfiable", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self.send_response(status)
        self._cors()
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(end - start + 1))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(content, "rb") as handle:
            handle.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = handle.read(min(CHUNK, remaining))
                self.wfile.write(chunk)
                remaining -= len(chunk)

    # -- writing -------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        payload = self._body_json()
        user = self._user()
        if user is None:
            raise HubError(401, None, "You must be authenticated to create a repository")
        if payload.get("type", "model") not in (None, "model"):
            raise HubError(400, None, "The stand-in Hub holds model repositories only")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload.get('name')}"
        if namespace != user:
            raise HubError(403, None, f"You don't have the rights to create a model under the namespace {namespace}")
        if not valid_repo_id(repo_id):
            raise HubError(400, None, f"Invalid repo name: {repo_id}")
        url = f"{self._base()}/{repo_id}"
        private = payload.get("private") or payload.get("visibility") == "private"
        try:
            self.hub.store.create(repo_id, private=bool(private))
        except HubError as error:
            if error.status == 409:
                return self._json({"error": error.message, "url": url}, status=409)
            raise
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        content = self._body_json().get("content", "")
        if content.startswith("---\n") and "\n---" not in content[3:]:
            return self._json({"errors": [{"message": "The front matter is not closed by a '---' line"}]}, 400)
        self._json({"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._writable(repo_id)
        store = self.hub.store
        commit = store.resolve(repo_id, revision)
        tree = store.tree(repo_id, commit)
        answers = []
        for item in self._body_json().get("files", []):
            path = item["path"]
            sample = base64.b64decode(item.get("sample", ""))
            mode = store.upload_mode(repo_id, commit, path, int(item.get("size", 0)), sample)
            answer = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = tree.get(path)
            if existing is not None:
                answer["oid"] = existing["lfs"]["oid"] if existing.get("lfs") else existing["oid"]
            answers.append(answer)
        self._json({"files": answers, "commitOid": commit})

    def _lfs_batch(self, repo_id: str) -> None:
        self._writable(repo_id)
        request = self._body_json()
        if request.get("operation") != "upload":
            raise HubError(400, None, "The stand-in Hub's LFS batch endpoint takes uploads only")
        base = self._base()
        objects = []
        for item in request.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            answer: dict = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub.store.has_lfs_object(repo_id, oid, size):
                ticket = secrets.token_urlsafe(16)
                self.server.tickets[ticket] = (repo_id, oid, size)
                answer["actions"] = {
                    "upload": {"href": f"{base}/lfs-upload/{ticket}"},
                    "verify": {"href": f"{base}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        self._send(
            200, json.dumps({"transfer": "basic", "objects": objects}).encode(), None, "application/vnd.git-lfs+json"
        )

    def _lfs_upload(self, ticket: str) -> None:
        target = self.server.tickets.pop(ticket, None)
        if target is None:
            raise HubError(403, None, "Unknown or used upload URL")
        repo_id, oid, size = target
        self.hub.store.store_lfs_object(repo_id, oid, size, [self.body])
        self._send(200, b"", {"ETag": f'"{oid}"'}, "text/plain")

    def _lfs_verify(self, repo_id: str) -> None:
        self._writable(repo_id)
        item = self._body_json()
        if not self.hub.store.has_lfs_object(repo_id, item.get("oid", ""), item.get("size")):
            raise HubError(404, None, f"LFS object {item.get('oid')} of size {item.get('size')} is not stored")
        self._json({"success": True})

    def _commit(self, repo_id: str, branch: str) -> None:
        self._writable(repo_id)
        if self.query.get("create_pr"):
            raise HubError(501, None, "The stand-in Hub does not implement pull requests")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, None, "A commit starts with a header line")
        header = lines[0]["value"]
        files, lfs_files, deleted_files, deleted_folders = {}, {}, [], []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if not valid_path(path):
                raise HubError(400, None, f"Invalid path in commit: {value.get('path')!r}")
            if key == "file":
                files[path] = decode_base64_file(value)
            elif key == "lfsFile":
                lfs_files[path] = (value["oid"], int(value.get("size", -1)))  # no size: a copy, not implemented
            elif key == "deletedFile":
                deleted_files.append(path)
            elif key == "deletedFolder":
                deleted_folders.append(path)
            else:
                raise HubError(400, None, f"The stand-in Hub does not implement commit operation {key!r}")
        commit = self.hub.store.commit(
            repo_id,
            branch,
            header.get("summary") or "",
            description=header.get("description") or "",
            files=files,
            lfs_files=lfs_files,
            deleted_files=deleted_files,
            deleted_folders=deleted_folders,
            parent_commit=header.get("parentCommit"),
        )
        url = f"{self._base()}/{repo_id}/commit/{commit}"
        self._json({"success": True, "commitOid": commit, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None})
