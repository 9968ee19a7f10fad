"""A small, standard-library-only stand-in for the Hugging Face Hub HTTP API, for end-to-end tests.

It implements just enough of the Hub API for the *real* ``huggingface_hub`` client (and therefore
``transformers`` / ``peft``) to create repos, commit files (small files inline, large ones through the
git-LFS batch API with the "basic" transfer) and download them again. Xet storage is never advertised:
no ``X-Xet-*`` headers, no ``xetHash`` in listings. The client decides on Xet uploads purely locally, so
the test process must also set ``HF_HUB_DISABLE_XET=1`` before importing ``huggingface_hub``
(``tests/conftest.py`` does that).

Usage::

    with HubServer() as hub:            # or: hub = HubServer(); url = hub.start(); ...; hub.stop()
        os.environ["HF_ENDPOINT"] = hub.url   # must happen before huggingface_hub is imported

Repos live in memory (metadata) and in a temporary directory (content-addressed blobs). Only namespaced
repo ids (``"owner/name"``) are supported; ``create_repo("name")`` puts the repo under the user namespace.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USERNAME = "tester"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # files at least this big go through LFS, like on the real Hub
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz")
TYPE_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
CHUNK = 1024 * 1024


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    """An error answered to the client; ``code`` goes to the ``X-Error-Code`` header the client maps to
    ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class FileEntry:
    sha256: str  # content address of the blob on disk
    size: int
    lfs: bool
    git_oid: str  # git blob id (of the LFS pointer for LFS files)

    @property
    def etag(self) -> str:  # what the Hub uses as ETag: sha256 for LFS files, git blob id otherwise
        return self.sha256 if self.lfs else self.git_oid

    def tree_json(self, path: str) -> dict:
        out = {"type": "file", "oid": self.git_oid, "size": self.size, "path": path}
        if self.lfs:
            pointer_size = len(_lfs_pointer(self.sha256, self.size))
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": pointer_size}
        return out


@dataclass
class Commit:
    oid: str
    title: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit:
        """Branch name, full commit sha or a unique prefix (>= 7 chars) of one."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [oid for oid in list(self.commits) if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1, serving from a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, storage_dir: str | None = None):
        self.host, self.port = host, port
        self.url: str | None = None
        self.requests: list[str] = []  # "METHOD /path" of every request, handy for asserting on the protocol
        self.repos: dict[tuple[str, str], Repo] = {}
        self._owns_storage = storage_dir is None
        self._storage_dir = storage_dir
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> str:
        if self._httpd is not None:
            return self.url  # type: ignore[return-value]
        if self._storage_dir is None:
            self._storage_dir = tempfile.mkdtemp(prefix="hub_server_")
        os.makedirs(os.path.join(self._storage_dir, "blobs"), exist_ok=True)
        self._httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self.url = f"http://{self.host}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)  # type: ignore[union-attr]
            self._httpd = self._thread = None
        if self._owns_storage and self._storage_dir is not None:
            shutil.rmtree(self._storage_dir, ignore_errors=True)
            self._storage_dir = None
            self.repos.clear()  # their blobs are gone

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- storage -----------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> str:
        return os.path.join(self._storage_dir, "blobs", sha256)  # type: ignore[arg-type]

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return os.path.exists(path) and (size is None or os.path.getsize(path) == size)

    def write_blob(self, chunks: Iterator[bytes]) -> tuple[str, int]:
        """Store a content-addressed blob; returns (sha256, size)."""
        tmp = self.blob_path(f"tmp-{uuid.uuid4().hex}")
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
        sha256 = digest.hexdigest()
        os.replace(tmp, self.blob_path(sha256))
        return sha256, size

    def get_repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo")
            repo = Repo(repo_type=repo_type, repo_id=repo_id, created_at=_now())
            self.repos[(repo_type, repo_id)] = repo
            attributes = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
            ops = [("add", ".gitattributes", self.regular_file(attributes))]
            self.commit(repo, "main", "initial commit", ops)
            return repo

    def regular_file(self, content: bytes) -> FileEntry:
        sha256, size = self.write_blob(iter([content]))
        return FileEntry(sha256=sha256, size=size, lfs=False, git_oid=_git_blob_oid(content))

    def lfs_file(self, sha256: str, size: int | None) -> FileEntry:
        if not self.has_blob(sha256, size):
            raise HubError(400, f"LFS object {sha256} was not uploaded (or has the wrong size)")
        size = os.path.getsize(self.blob_path(sha256))
        pointer_oid = _git_blob_oid(_lfs_pointer(sha256, size))
        return FileEntry(sha256=sha256, size=size, lfs=True, git_oid=pointer_oid)

    def commit(self, repo: Repo, branch: str, title: str, ops: list, parent: str | None = None) -> Commit:
        """Apply ``("add", path, FileEntry)`` / ``("delete", path)`` / ``("delete_folder", path)`` ops."""
        with self._lock:
            if repo.branches and branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch} (not a branch)", "RevisionNotFound")
            head = repo.commits.get(repo.branches.get(branch, ""))
            if parent is not None and head is not None and not head.oid.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}; head is {head.oid}")
            files = dict(head.files) if head else {}
            for op in ops:
                if op[0] == "add":
                    files[op[1]] = op[2]
                elif op[0] == "delete":
                    if files.pop(op[1], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {op[1]}", "EntryNotFound")
                else:
                    prefix = op[1].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            tree = sorted((p, e.sha256) for p, e in files.items())
            seed = json.dumps([head.oid if head else None, title, tree, uuid.uuid4().hex])
            oid = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[oid] = Commit(oid=oid, title=title, date=_now(), files=files)
            repo.branches[branch] = oid
            return repo.commits[oid]


def _is_lfs_path(path: str, size: int) -> bool:
    return size >= LFS_SIZE_THRESHOLD or path.lower().endswith(LFS_SUFFIXES)


def _folders(files: dict[str, FileEntry]) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}


def _folder_json(path: str, files: dict[str, FileEntry]) -> dict:
    inside = sorted(f"{p}:{e.git_oid}" for p, e in files.items() if p.startswith(path + "/"))
    oid = hashlib.sha1("\n".join(inside).encode()).hexdigest()
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def _entry_json(path: str, files: dict[str, FileEntry]) -> dict | None:
    if path in files:
        return files[path].tree_json(path)
    if path in _folders(files):
        return _folder_json(path, files)
    return None


_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API = r"/api/(?P<kind>models|datasets|spaces)/" + _REPO
_GIT = r"/(?:(?P<prefix>datasets|spaces)/)?" + _REPO
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", _API + r"/refs", "refs"),
    ("POST", _API + r"/branch/(?P<rev>[^/]+)", "create_branch"),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", _API + r"/xet-(?:read|write)-token(?:/(?P<rev>[^/]+))?", "xet_token"),
    ("POST", _GIT + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", r"/_lfs/(?P<oid>[0-9a-f]{64})/verify", "lfs_verify"),
    ("GET", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", _GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in ROUTES]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response carries a Content-Length
    server: ThreadingHTTPServer

    def log_message(self, format, *args):  # silence the default stderr access log
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def do_GET(self):
        self._dispatch(self.command)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # -- plumbing ----------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._body_read = False
        parts = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self.hub._lock:
            self.hub.requests.append(f"{method} {parts.path}")
        try:
            for route_method, pattern, name in ROUTES:
                match = pattern.fullmatch(parts.path) if route_method == method else None
                if match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, f"route_{name}")(**args)
            raise HubError(404, f"hub_server: no route for {method} {parts.path}")
        except HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-response
        except Exception as err:  # a bug in this server: make it visible in the client's error message
            traceback.print_exc()
            self._send_error(HubError(500, f"hub_server crashed: {type(err).__name__}: {err}"))

    def _send_error(self, err: HubError) -> None:
        if not self._body_read and (int(self.headers.get("Content-Length") or 0) > 0 or self._is_chunked()):
            self.close_connection = True  # unread request body: the connection cannot be reused
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers["X-Error-Message"] = err.message
        self._send_json({"error": err.message}, status=err.status, headers=headers)

    def _send_json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _iter_body(self) -> Iterator[bytes]:
        """Request body, honouring both Content-Length and chunked transfer encoding."""
        self._body_read = True
        if self._is_chunked():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(CHUNK, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json(self) -> dict:
        body = self._body()
        return json.loads(body) if body else {}

    def _require_token(self) -> None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, kind: str, ns: str, name: str) -> Repo:
        repo_type = kind[:-1]  # "models" -> "model"
        return self.hub.get_repo(repo_type, f"{ns}/{name}")

    def _git_repo(self, ns: str, name: str, prefix: str | None = None) -> Repo:
        return self._repo(prefix or "models", ns, name)

    # -- account / repos ---------------------------------------------------------------------------------
    def route_whoami(self):
        self._require_token()
        token = {"displayName": "hub_server", "role": "write"}
        auth = {"type": "access_token", "accessToken": token}
        self._send_json(dict(type="user", id="0" * 24, name=USERNAME, fullname="Test User", orgs=[], auth=auth))

    def route_agent_harnesses(self):  # best-effort user-agent telemetry registry of the client
        self._send_json({"standardEnvVars": [], "harnesses": {}})

    def route_validate_yaml(self):
        self._body()
        self._send_json({"errors": [], "warnings": []})

    def route_create_repo(self):
        payload = self._json()
        self._require_token()
        repo_type = payload.get("type") or "model"
        if repo_type not in TYPE_PREFIXES:
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        repo_id = f"{payload.get('organization') or USERNAME}/{payload['name']}"
        url = f"{self.hub.url}/{TYPE_PREFIXES[repo_type]}{repo_id}"
        try:
            self.hub.create_repo(repo_type, repo_id)
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            self._send_json({"error": err.message, "url": url}, status=err.status, headers=headers)
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def route_delete_repo(self):
        payload = self._json()
        self._require_token()
        key = (payload.get("type") or "model", f"{payload.get('organization') or USERNAME}/{payload['name']}")
        with self.hub._lock:
            self.hub.get_repo(*key)
            del self.hub.repos[key]
        self._send_json({})

    def route_repo_info(self, kind, ns, name, rev="main"):
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    pointer_size = entry.tree_json(path)["lfs"]["pointerSize"]
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": pointer_size}
            siblings.append(sibling)
        info = {"id": repo.repo_id, "modelId": repo.repo_id, "author": ns, "sha": commit.oid}
        info.update(lastModified=commit.date, createdAt=repo.created_at, private=False, disabled=False)
        self._send_json({**info, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def route_tree(self, kind, ns, name, rev, path=""):
        files = self._repo(kind, ns, name).resolve(rev).files
        path = path.strip("/")
        if path and path not in _folders(files):
            raise HubError(404, f"Folder not found: {path}", "EntryNotFound")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        below = [p for p in sorted(files.keys() | _folders(files)) if p.startswith(prefix)]
        if not recursive:
            below = [p for p in below if "/" not in p[len(prefix) :]]
        entries = [_entry_json(p, files) for p in below]
        entries.sort(key=lambda e: (e["type"] != "directory", e["path"]))  # folders first, like the Hub
        self._send_json(entries)

    def route_paths_info(self, kind, ns, name, rev):
        files = self._repo(kind, ns, name).resolve(rev).files
        form = parse_qs(self._body().decode())
        entries = (_entry_json(p.strip("/"), files) for p in form.get("paths", []))
        self._send_json([e for e in entries if e is not None])

    def route_refs(self, kind, ns, name):
        repo = self._repo(kind, ns, name)
        branches = [
            {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": oid}
            for branch, oid in list(repo.branches.items())
        ]
        self._send_json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def route_create_branch(self, kind, ns, name, rev):
        payload = self._json()
        self._require_token()
        repo = self._repo(kind, ns, name)
        with self.hub._lock:
            if rev in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{rev}")
            repo.branches[rev] = repo.resolve(payload.get("startingPoint") or "main").oid
        self._send_json({})

    # -- uploads -----------------------------------------------------------------------------------------
    def route_preupload(self, kind, ns, name, rev):
        payload = self._json()
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "hub_server does not support pull requests (create_pr)")
        commit = self._repo(kind, ns, name).resolve(rev)
        answer = []
        for item in payload.get("files", []):
            path, mode = item["path"], "lfs" if _is_lfs_path(item["path"], item["size"]) else "regular"
            existing = commit.files.get(path)
            # The client compares this oid to its local one to skip unchanged files.
            oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.git_oid)
            answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answer, "commitOid": commit.oid})

    def route_lfs_batch(self, ns, name, prefix=None):
        payload = self._json()
        self._require_token()
        self._git_repo(ns, name, prefix)
        if payload.get("operation") != "upload":
            raise HubError(400, "hub_server only supports the LFS 'upload' operation")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size}
            if not self.hub.has_blob(oid, size):  # no "actions" => the client skips the upload
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs/{oid}", "expires_in": 3600},
                    "verify": {"href": f"{self.hub.url}/_lfs/{oid}/verify", "expires_in": 3600},
                }
            objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def route_lfs_upload(self, oid):
        sha256, size = self.hub.write_blob(self._iter_body())
        if sha256 != oid:
            os.remove(self.hub.blob_path(sha256))
            raise HubError(400, f"LFS upload content does not match its oid ({sha256} != {oid})")
        self._send_json({}, headers={"ETag": f'"{oid}"'})

    def route_lfs_verify(self, oid):
        payload = self._json()
        if not self.hub.has_blob(oid, payload.get("size")):
            raise HubError(404, f"LFS object {oid} not found")
        self._send_json({})

    def route_xet_token(self, **_):
        message = "hub_server does not speak Xet: set HF_HUB_DISABLE_XET=1 before importing huggingface_hub"
        raise HubError(501, message)

    def route_commit(self, kind, ns, name, rev):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        self._require_token()
        if self.query.get("create_pr"):
            raise HubError(400, "hub_server does not support pull requests (create_pr)")
        repo = self._repo(kind, ns, name)
        title, parent, ops = "", None, []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                title, parent = value.get("summary", ""), value.get("parentCommit")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')}")
                ops.append(("add", value["path"], self.hub.regular_file(base64.b64decode(value["content"]))))
            elif key == "lfsFile":
                ops.append(("add", value["path"], self.hub.lfs_file(value["oid"], value.get("size"))))
            elif key == "deletedFile":
                ops.append(("delete", value["path"]))
            elif key == "deletedFolder":
                ops.append(("delete_folder", value["path"]))
            else:
                raise HubError(400, f"hub_server does not support commit operation '{key}'")
        for op in ops:
            if op[1].startswith("/") or ".." in op[1].split("/"):
                raise HubError(400, f"Invalid path in repo: {op[1]}")
        commit = self.hub.commit(repo, rev, title, ops, parent=parent)
        url = f"{self.hub.url}/{TYPE_PREFIXES[repo.repo_type]}{repo.repo_id}/commit/{commit.oid}"
        answer = {"success": True, "commitOid": commit.oid, "commitUrl": url, "commitMessage": title}
        self._send_json({**answer, "hookOutput": "", "pullRequestUrl": None})

    # -- downloads ---------------------------------------------------------------------------------------
    def route_resolve(self, ns, name, rev, path, prefix=None):
        commit = self._git_repo(ns, name, prefix).resolve(rev)
        entry = commit.files.get(path)
        if entry is None:
            # X-Repo-Commit lets the client cache the non-existence of the file for this commit.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        # The client sends "Range: bytes=N-" to resume an interrupted download.
        start, end = 0, entry.size - 1
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if range_match:
            start, end = int(range_match.group(1)), min(int(range_match.group(2) or end), end)
            if start > end:
                range_error = f"Range not satisfiable: {self.headers['Range']}"
                raise HubError(416, range_error, headers={"Content-Range": f"bytes */{entry.size}"})
        self.send_response(206 if range_match else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("X-Repo-Commit", commit.oid)
        if entry.lfs:  # what the Hub sends alongside its redirect to the LFS CDN
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Size", str(entry.size))
        if range_match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{entry.size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(self.hub.blob_path(entry.sha256), "rb") as f:
            f.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = f.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
