"""A local HTTP server that speaks the part of the Hugging Face Hub API that uploads use.

The real `huggingface_hub` client (HfApi.create_repo / create_branch / create_commit, the Git
LFS "basic" transfer) is pointed at it, so the tests exercise the client's real requests. The
endpoints, as huggingface_hub 1.x-2.x calls them:

    POST /api/repos/create                          {name, organization, visibility?}: 200 {url}, 409 if it exists
    POST /api/models/{repo}/branch/{branch}         create a branch from main; 409 if it exists
    POST /api/validate-yaml                         {content, repoType}: the README.md metadata
    POST /api/models/{repo}/preupload/{rev}         {files: [{path, sample, size}]} -> uploadMode lfs|regular, oid
    POST /{repo}.git/info/lfs/objects/batch         Git LFS batch API (operation upload, basic transfer)
    PUT  /lfs/{repo}/{oid}?sig=...                  the object's bytes to a pre-signed URL (no token), sha256-checked
    POST /lfs/{repo}/verify                         {oid, size}
    POST /api/models/{repo}/commit/{rev}            ndjson: header, file (base64), lfsFile; ?create_pr=1

Errors are answered as huggingface.co answers them: no or wrong token 401, a repository the
token cannot see 404 with `X-Error-Code: RepoNotFound`, an unknown branch 404 with
`X-Error-Code: RevisionNotFound`. Uploaded content is kept per branch and per pull request, so a
test reads back exactly what arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub stores any file above 10 MB in LFS


@dataclass
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # the whole tree after this commit


@dataclass
class PullRequest:
    num: int
    target: str  # the branch it is opened against
    commit: Commit


@dataclass
class Repo:
    repo_id: str
    owner_token: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)  # oldest first
    pulls: list[PullRequest] = field(default_factory=list)

    def head(self, branch: str) -> Commit:
        return self.branches[branch][-1]


@dataclass
class SeenRequest:
    method: str
    path: str
    authorization: str | None
    query: dict


@dataclass
class UploadHub:
    tokens: set[str] = field(default_factory=set)  # tokens the server accepts
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    requests: list[SeenRequest] = field(default_factory=list)
    url: str = ""

    def start(self) -> str:
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        return self.url

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def add_repo(self, repo_id: str, owner_token: str, files: dict[str, bytes] | None = None) -> Repo:
        repo = Repo(repo_id, owner_token, private=True)
        repo.branches["main"] = [Commit(_oid(repo_id), "initial commit", "", dict(files or {}))]
        self.repos[repo_id] = repo
        return repo

    def seen(self, kind: str) -> list[SeenRequest]:
        return [r for r in self.requests if kind in r.path]


def _oid(*parts: object) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()


def _sign(oid: str) -> str:
    return hashlib.sha256(b"test-server-secret" + oid.encode()).hexdigest()[:16]


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


_CREATE = re.compile(r"^/api/repos/create$")
_BRANCH = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)$")
_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")
_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_PUT = re.compile(r"^/lfs/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$")
_LFS_VERIFY = re.compile(r"^/lfs/(?P<repo>[^/]+/[^/]+)/verify$")


class _Handler(BaseHTTPRequestHandler):
    hub: UploadHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # ---- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: object = None, headers: dict | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self._send(status, {"error": message}, headers)

    def _token(self) -> str | None:
        """The request's valid token; answers 401 (and returns None) when there is none."""
        sent = self.headers.get("Authorization")
        if sent is None:
            self._error(401, "Invalid username or password.")
            return None
        token = sent.removeprefix("Bearer ")
        if token not in self.hub.tokens:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        return token

    def _repo(self, repo_id: str, token: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or repo.owner_token != token:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    # ---- routes --------------------------------------------------------------------------------
    def do_PUT(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        body = self._body()
        self.hub.requests.append(SeenRequest(self.command, path, self.headers.get("Authorization"), query))
        with self.hub._lock:
            if path == "/api/validate-yaml" and self.command == "POST":
                return self._validate_yaml(json.loads(body))
            for pattern, method, handler in (
                (_CREATE, "POST", self._create), (_BRANCH, "POST", self._branch),
                (_PREUPLOAD, "POST", self._preupload), (_COMMIT, "POST", self._commit),
                (_BATCH, "POST", self._batch), (_LFS_PUT, "PUT", self._lfs_put),
                (_LFS_VERIFY, "POST", self._lfs_verify),
            ):
                match = pattern.match(path)
                if match and self.command == method:
                    if handler == self._lfs_put:  # a pre-signed URL, as S3's: no token, a signature
                        return handler(None, body, query, **match.groupdict())
                    token = self._token()
                    if token is None:
                        return None
                    return handler(token, body, query, **match.groupdict())
        self._error(404, f"no route {self.command} {path}")

    def _validate_yaml(self, payload: dict) -> None:
        text = payload.get("content", "")
        if text.startswith("---"):
            end = text.find("\n---", 3)
            try:
                meta = yaml.safe_load(text[3:end]) if end > 0 else None
            except yaml.YAMLError as e:
                return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
            if end < 0 or not isinstance(meta, dict):
                return self._send(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
        self._send(200, {"errors": [], "warnings": []})

    def _create(self, token: str, body: bytes, query: dict) -> None:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        if repo_id in self.hub.repos:
            # huggingface.co answers 409 with the existing repository's url, which the client returns.
            return self._send(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        repo = self.hub.add_repo(repo_id, token)
        repo.private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _branch(self, token: str, body: bytes, query: dict, repo: str, branch: str) -> None:
        r = self._repo(repo, token)
        if r is None:
            return
        if branch in r.branches:
            return self._error(409, f"Reference refs/heads/{branch} already exists")
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        r.branches[branch] = [r.head(start)]
        self._send(200, {})

    def _preupload(self, token: str, body: bytes, query: dict, repo: str, rev: str) -> None:
        r = self._repo(repo, token)
        if r is None:
            return
        if rev not in r.branches:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        existing = r.head(rev).files
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_MIN_SIZE
            old = existing.get(f["path"])
            oid = None if old is None else (hashlib.sha256(old).hexdigest() if lfs else _git_blob_oid(old))
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": oid})
        self._send(200, {"files": files, "commitOid": r.head(rev).oid})

    def _batch(self, token: str, body: bytes, query: dict, repo: str) -> None:
        if self._repo(repo, token) is None:
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:  # already stored objects need no upload
                signed = f"{self.hub.url}/lfs/{repo}/{obj['oid']}?sig={_sign(obj['oid'])}"
                entry["actions"] = {"upload": {"href": signed},
                                    "verify": {"href": f"{self.hub.url}/lfs/{repo}/verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, token: None, body: bytes, query: dict, repo: str, oid: str) -> None:
        if query.get("sig") != [_sign(oid)]:
            return self._error(403, "bad signature")
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "content does not match its sha256 oid")
        self.hub.lfs[oid] = body
        self._send(200, {})

    def _lfs_verify(self, token: str, body: bytes, query: dict, repo: str) -> None:
        payload = json.loads(body)
        stored = self.hub.lfs.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            return self._error(404, "object not found")
        self._send(200, {})

    def _commit(self, token: str, body: bytes, query: dict, repo: str, rev: str) -> None:
        r = self._repo(repo, token)
        if r is None:
            return
        if rev not in r.branches:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files = dict(r.head(rev).files)
        for item in lines:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.hub.lfs[value["oid"]]
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        commit = Commit(_oid(repo, rev, header, sorted(files), len(r.pulls)), header["summary"],
                        header.get("description", ""), files)
        pr_url = None
        if query.get("create_pr") == ["1"]:
            num = len(r.pulls) + 1
            r.pulls.append(PullRequest(num, rev, commit))
            pr_url = f"{self.hub.url}/{repo}/discussions/{num}"
        else:
            r.branches[rev].append(commit)
        self._send(200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}", "commitOid": commit.oid,
                         "pullRequestUrl": pr_url, "success": True})
