"""A local HTTP server that speaks the part of the Hugging Face Hub API `snapshot_download` uses.

The real `huggingface_hub` client is pointed at it with HF_ENDPOINT, so the tests exercise the
client's real requests, headers, cache writes and error parsing, with no network. Endpoints:

    GET  /api/models/{repo}/revision/{rev}   repository info (commit sha, file list)
    GET  /api/models/{repo}/tree/{rev}       recursive file listing (oid, size, lfs)
    HEAD /{repo}/resolve/{rev}/{file}        file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}        file content

Access errors are answered the way huggingface.co answers them: a missing or private repository
gives 401 with `X-Error-Code: RepoNotFound`, a gated one 401 with `X-Error-Code: GatedRepo`, an
unknown revision 404 with `X-Error-Code: RevisionNotFound`, and a wrong token 401 with
`X-Error-Message: Invalid credentials in Authorization header`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    branches: tuple[str, ...] = ("main",)
    access: str = "public"  # "public" | "gated" | "private"
    token: str | None = None  # the token that unlocks a gated or private repo
    outage_status: int | None = None  # answer every request about this repo with this status

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, **kwargs) -> "HubRepo":
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        return cls(repo_id=repo_id, files=files, **kwargs)


@dataclass
class SeenRequest:
    method: str
    path: str
    authorization: str | None


@dataclass
class HubServer:
    repos: dict[str, HubRepo] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)

    def add_folder(self, repo_id: str, folder: Path, **kwargs) -> HubRepo:
        """Serve `folder`'s files as the repository `repo_id` (kwargs: HubRepo fields)."""
        repo = HubRepo.from_folder(repo_id, folder, **kwargs)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def requests_for(self, repo_id: str) -> list[SeenRequest]:
        return [r for r in self.requests if f"/{repo_id}/" in r.path]

    def downloaded_files(self, repo_id: str) -> list[str]:
        """Files of `repo_id` whose content was requested (GET), not just their metadata (HEAD)."""
        return sorted({r.path.split("/resolve/", 1)[1].split("/", 1)[1]
                       for r in self.requests_for(repo_id) if r.method == "GET" and "/resolve/" in r.path})


_API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<op>revision|tree)/(?P<rev>[^/]+)/?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(SeenRequest(self.command, path, self.headers.get("Authorization")))
        api, resolve = _API.match(path), _RESOLVE.match(path)
        match = api or resolve
        if match is None:
            return self._error(404, None, "Not found")
        repo = self.hub.repos.get(match["repo"])
        if repo is not None and repo.outage_status is not None:
            return self._error(repo.outage_status, None, "Service unavailable")
        if not self._authorized(repo, match["repo"]):
            return
        if match["rev"] not in (*repo.branches, repo.commit):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
        if api and api["op"] == "revision":
            siblings = [{"rfilename": name} for name in repo.files]
            return self._json({"id": repo.repo_id, "sha": repo.commit, "siblings": siblings,
                               "private": repo.access == "private", "gated": repo.access == "gated"}, body)
        if api:
            return self._json([self._tree_entry(name, data) for name, data in repo.files.items()], body)
        data = repo.files.get(resolve["file"])
        if data is None:
            return self._error(404, "EntryNotFound", f"{resolve['file']} does not exist", repo.commit)
        self.send_response(200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{self._etag(resolve["file"], data)}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _authorized(self, repo: HubRepo | None, repo_id: str) -> bool:
        sent = self.headers.get("Authorization")
        if sent is not None and (repo is None or sent != f"Bearer {repo.token}"):
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        if repo is None or (repo.access == "private" and sent is None):
            self._error(401, "RepoNotFound", "Repository not found")
            return False
        if repo.access == "gated" and sent is None:
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                        "access to it and be authenticated to access it. Please log in.")
            return False
        return True

    @staticmethod
    def _etag(name: str, data: bytes) -> str:
        # Large (LFS) files are addressed by sha256 on the Hub, small ones by their git blob id.
        return hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _git_blob_oid(data)

    @staticmethod
    def _tree_entry(name: str, data: bytes) -> dict:
        entry = {"type": "file", "path": name, "size": len(data), "oid": _git_blob_oid(data)}
        if name.endswith(".safetensors"):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _json(self, payload: object, body: bool) -> None:
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
