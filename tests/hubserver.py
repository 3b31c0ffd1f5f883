"""A local stand-in for the Hugging Face hub, enough for huggingface_hub's downloads (no network).

Serves model and dataset repos the way the hub's HTTP API does, so the installed huggingface_hub (1.x)
runs its real code path (snapshot_download, hf_hub_download) against it:

    GET  /api/{models|datasets}/{repo_id}[/revision/{rev}]     repo info: id, sha, siblings
    GET  /api/{models|datasets}/{repo_id}/tree/{rev}[/{path}]  file listing (path, size, oid, lfs)
    HEAD /{repo_id}/resolve/{rev}/{file}                        metadata: X-Repo-Commit, ETag,
    GET  /{repo_id}/resolve/{rev}/{file}                        X-Linked-Etag/-Size; Range -> 206
         /datasets/{repo_id}/resolve/{rev}/{file}               (the same for datasets)

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which
huggingface_hub turns into its typed exceptions. No Xet header or xetHash field is ever sent, so the
client always takes the plain HTTP download path.

Two ways to start it (both are context managers yielding a HubServer with .url and .requests):

    with HubServer([HubRepo("org/data", {"f.jsonl": b"..."}, repo_type="dataset")]) as hub: ...
    with hub_server({("model", "org/tiny"): folder}, token="hf_x", gated={("model", "org/tiny")}) as hub: ...

Gated repos: file downloads need ``Authorization: Bearer <token>`` (401 GatedRepo otherwise); repo
info and listings stay public, as on the real hub. ``truncate_once``: file names whose first full GET
sends half the body and drops the connection (the client then resumes with a Range request).
``hub.requests`` records every request (method, path, lower-cased headers, ...); tests read it to
check what the client sent (a token, a Range) and what it did not fetch again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

RepoKey = tuple[str, str]  # (repo_type, repo_id); repo_type is "model" or "dataset"

# Files the hub keeps in LFS: ETag is the sha256 of the content and HEAD adds X-Linked-Etag/-Size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".model", ".parquet", ".arrow", ".jsonl", ".gz", ".zst")
LFS_MIN_SIZE = 10 * 2**20


@dataclass
class HubFile:
    path: str
    data: bytes
    git_oid: str = ""  # sha1 of the git blob
    sha256: str = ""
    lfs: bool = False

    def __post_init__(self) -> None:
        self.git_oid = hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.lfs = self.path.endswith(LFS_SUFFIXES) or len(self.data) >= LFS_MIN_SIZE


@dataclass
class HubRepo:
    """One repo: ``files`` maps repo paths to bytes, or ``folder`` is read once at construction."""

    repo_id: str
    files: dict[str, bytes] | None = None
    repo_type: str = "model"
    gated: bool = False
    token: str | None = None
    folder: str | Path | None = None
    sha: str = field(default="", init=False)
    blobs: dict[str, HubFile] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.repo_type not in ("model", "dataset"):
            raise ValueError(f"repo_type must be 'model' or 'dataset', not {self.repo_type!r}")
        if self.gated and not self.token:
            raise ValueError(f"gated repo {self.repo_id} needs a token to check requests against")
        files = dict(self.files or {})
        if self.folder is not None:
            root = Path(self.folder)
            for local in sorted(p for p in root.rglob("*") if p.is_file()):
                rel = local.relative_to(root).as_posix()
                if not rel.startswith((".cache/", ".git/")):
                    files[rel] = local.read_bytes()
        self.blobs = {name: HubFile(name, data) for name, data in sorted(files.items())}
        digest = hashlib.sha1(f"{self.repo_type}/{self.repo_id}\n".encode())
        for f in self.blobs.values():
            digest.update(f"{f.path}\0{f.git_oid}\n".encode())
        self.sha = digest.hexdigest()


@dataclass
class Request:
    method: str
    path: str  # unquoted, without the query string
    headers: dict[str, str]  # names lower-cased
    query: dict[str, list[str]]
    kind: str = "other"  # info | tree | resolve | api | other
    file: str | None = None
    truncated: bool = False

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


class HubServer:
    """The server; a context manager that serves on 127.0.0.1 at an ephemeral port while open."""

    def __init__(self, repos: Iterable[HubRepo] = (), *, truncate_once: Iterable[str] = ()) -> None:
        self.repos: dict[RepoKey, HubRepo] = {(r.repo_type, r.repo_id): r for r in repos}
        self.truncate_once: set[str] = set(truncate_once)
        self.requests: list[Request] = []
        self.url = ""
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HubServer:
        handler = type("HubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def downloads(self, name: str | None = None) -> list[Request]:
        """GET /resolve requests (optionally for one repo file)."""
        return [r for r in self.requests if r.method == "GET" and r.kind == "resolve" and name in (None, r.file)]

    def take_truncation(self, name: str) -> bool:
        with self._lock:
            if name in self.truncate_once:
                self.truncate_once.discard(name)
                return True
            return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer  # set on the subclass made per server

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        split = urlsplit(self.path)
        request = Request(
            method=self.command,
            path=unquote(split.path),
            headers={k.lower(): v for k, v in self.headers.items()},
            query=parse_qs(split.query),
        )
        try:
            if request.path.startswith(("/api/models/", "/api/datasets/")):
                self._api(request, head)
            elif request.path.startswith("/api/"):  # e.g. /api/agent-harnesses, fetched once a day
                request.kind = "api"
                self._error(404, None, f"Unknown API route {request.path}", head)
            else:
                self._resolve(request, head)
        finally:
            self.hub.record(request)

    def _find_repo(self, repo_type: str, rest: str) -> tuple[HubRepo | None, str]:
        """The repo whose id starts ``rest`` (ids contain '/'), and what follows the id."""
        best = None
        for (rtype, rid), repo in self.hub.repos.items():
            if rtype == repo_type and (rest == rid or rest.startswith(rid + "/")):
                if best is None or len(rid) > len(best.repo_id):
                    best = repo
        if best is None:
            return None, rest
        return best, rest[len(best.repo_id) :].lstrip("/")

    def _revision_ok(self, repo: HubRepo, rev: str, head: bool) -> bool:
        if rev in ("main", repo.sha):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        return False

    # --- /api --------------------------------------------------------------------------------

    def _api(self, request: Request, head: bool) -> None:
        plural = request.path.split("/")[2]  # models | datasets
        repo_type = "model" if plural == "models" else "dataset"
        repo, rest = self._find_repo(repo_type, request.path[len(f"/api/{plural}/") :])
        request.kind = "api"
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
        elif rest == "" or rest.startswith("revision/"):
            request.kind = "info"
            rev = rest[len("revision/") :] if rest else "main"
            if self._revision_ok(repo, rev, head):
                self._json(
                    {
                        "_id": repo.sha[:24],
                        "id": repo.repo_id,
                        "sha": repo.sha,
                        "private": False,
                        "gated": "auto" if repo.gated else False,
                        "disabled": False,
                        "siblings": [{"rfilename": name} for name in repo.blobs],
                        "tags": [],
                    },
                    head,
                )
        elif rest.startswith("tree/"):
            request.kind = "tree"
            rev, _, sub = rest[len("tree/") :].partition("/")
            recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
            if self._revision_ok(repo, rev, head):
                self._json(_tree(repo, sub.strip("/"), recursive), head)
        else:
            self._error(404, None, f"Unknown API route {request.path}", head)

    # --- /resolve ----------------------------------------------------------------------------

    def _resolve(self, request: Request, head: bool) -> None:
        request.kind = "resolve"
        repo_type, rest = "model", request.path.lstrip("/")
        if rest.startswith("datasets/"):
            repo_type, rest = "dataset", rest[len("datasets/") :]
        repo, rest = self._find_repo(repo_type, rest)
        if repo is None or not rest.startswith("resolve/"):
            self._error(404, "RepoNotFound", "Repository not found", head)
            return
        rev, _, name = rest[len("resolve/") :].partition("/")
        request.file = name
        if not self._revision_ok(repo, rev, head):
            return
        if repo.gated and request.headers.get("authorization") != f"Bearer {repo.token}":
            self._error(
                401,
                "GatedRepo",
                f"Access to {repo_type} {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
                head,
            )
            return
        f = repo.blobs.get(name)
        if f is None:
            self._error(404, "EntryNotFound", f'{name} does not exist on "{rev}"', head, commit=repo.sha)
            return

        size = len(f.data)
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{f.sha256 if f.lfs else f.git_oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(size)

        start, end, status = 0, size - 1, 200
        rng = request.headers.get("range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes=") :].partition("-")
            start = int(first) if first else 0
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                self._send(416, {"Content-Range": f"bytes */{size}"}, b"", head)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = f.data[start : end + 1]
        headers["Content-Length"] = str(len(body))

        if not head and status == 200 and len(body) > 1 and self.hub.take_truncation(name):
            # Promise the whole file, send half, drop the connection: a download cut off mid-way.
            request.truncated = True
            self._send(200, headers, body[: len(body) // 2], head=False)
            time.sleep(0.2)  # let the client read what came before the connection drops
            self.close_connection = True
            return
        self._send(status, headers, body, head)

    # --- responses ---------------------------------------------------------------------------

    def _json(self, body, head: bool) -> None:
        data = json.dumps(body).encode()
        self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(data))}, data, head)

    def _error(self, status: int, code: str | None, message: str, head: bool, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, data, head)

    def _send(self, status: int, headers: dict[str, str], data: bytes, head: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not head and data:
            self.wfile.write(data)
            self.wfile.flush()


def _tree(repo: HubRepo, sub: str, recursive: bool) -> list[dict]:
    """The /tree listing: folders first, then files (with lfs for LFS files), as the hub sends it."""
    prefix = sub + "/" if sub else ""
    files: list[dict] = []
    folders: set[str] = set()
    for name, f in repo.blobs.items():
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        for depth in range(1, len(parts) if recursive else min(2, len(parts))):
            folders.add(prefix + "/".join(parts[:depth]))
        if not recursive and len(parts) > 1:
            continue
        item: dict = {"type": "file", "oid": f.git_oid, "size": len(f.data), "path": name}
        if f.lfs:
            item["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
        files.append(item)
    dirs = [
        {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
        for d in sorted(folders)
    ]
    return dirs + files


@contextlib.contextmanager
def hub_server(
    repos: dict[RepoKey, str | Path],
    *,
    token: str | None = None,
    gated: Iterable[RepoKey] = (),
    truncate_once: Iterable[str] = (),
) -> Iterator[HubServer]:
    """Serve local folders as repos: ``{(repo_type, repo_id): folder}`` (read once, at start)."""
    gated = set(gated)
    hub_repos = [
        HubRepo(repo_id, repo_type=repo_type, folder=folder, gated=(repo_type, repo_id) in gated, token=token)
        for (repo_type, repo_id), folder in repos.items()
    ]
    with HubServer(hub_repos, truncate_once=truncate_once) as hub:
        yield hub


def hub_env(endpoint: str, hf_home: Path | str, *, offline: bool = False, token: str | None = None,
            no_backoff: bool = False) -> dict[str, str]:
    """The environment of a fresh interpreter that talks to this stand-in hub (huggingface_hub reads HF_ENDPOINT
    and HF_HUB_OFFLINE at import, so every download test runs in its own process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),  # an empty cache: nothing leaks in from the user's
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        NO_PROXY="127.0.0.1,localhost",
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if token:
        env["HF_TOKEN"] = token
    if no_backoff:
        env["TEST_NO_BACKOFF"] = "1"
    return env


def run_download(code: str, args: list[str], env: dict[str, str]) -> tuple[int, dict]:
    """Run a download snippet in a fresh interpreter; it prints one JSON line last, which is returned."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("{"), f"rc={proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(last)
