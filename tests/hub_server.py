"""A Hub-compatible HTTP server on loopback, for tests that push to and pull from "the Hub" without a network.

It answers the routes huggingface_hub 2.4 and transformers 5.24 use to create repos and branches, commit files and
download them (hf-conventions section 5.3), for model and dataset repos. Every commit is a full snapshot, so any
earlier commit stays loadable by its sha (revision pinning). Writes need the bearer token the server was made with;
every request is recorded (method, path, whether it was authorised) so tests can check what clients sent.

Use the `fake_hub` fixture, which also points this process's huggingface_hub clients at the server, or start a
`FakeHub` yourself and pass its `endpoint` as `HF_ENDPOINT` to a subprocess.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest


FAKE_TOKEN = "hf_fakeHubTokenForTests0123456789abcdef"
REPO_TYPES = {"models": "model", "datasets": "dataset"}
_REPO = r"(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)"


@dataclass
class FakeRepo:
    """A repo's commits (sha -> {path: bytes}), its branches (name -> sha) and visibility."""

    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, branch: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(f"{self.repo_id}/{branch}/{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        """The commit sha of a branch name or a full sha, or None."""
        return self.branches.get(revision) or (revision if revision in self.commits else None)


class FakeHub:
    """The server: repos in memory, one daemon thread, `endpoint` like ``http://127.0.0.1:PORT``."""

    def __init__(self, token: str = FAKE_TOKEN):
        self.token = token
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """What a revision of a repo holds."""
        repo = self.repos[(repo_type, repo_id)]
        return repo.commits[repo.resolve(revision)]


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            """Silent: the tests read `hub.requests` instead of a log."""

        # -- plumbing ------------------------------------------------------------------------------------------
        def _reply(self, status: int, body=b"", headers: dict | None = None, error_code: str | None = None):
            payload = json.dumps(body).encode() if not isinstance(body, bytes) else body
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/json" if not isinstance(body, bytes) else "application/octet-stream"
            )
            self.send_header("Content-Length", str(len(payload)))
            # One request per connection: a client's pooled keep-alive connection must not outlive the server and
            # reach a stopped hub's handler thread in a later test.
            self.send_header("Connection", "close")
            self.close_connection = True
            if error_code:
                self.send_header("X-Error-Code", error_code)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _error(self, status: int, code: str, message: str):
            self._reply(status, {"error": message}, error_code=code)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorised(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {hub.token}"

        def _record(self) -> str:
            path = urlsplit(self.path).path
            with hub.lock:
                hub.requests.append({"method": self.command, "path": path, "authorised": self._authorised()})
            return path

        def _repo(self, kind: str, repo_id: str) -> FakeRepo | None:
            return hub.repos.get((REPO_TYPES[kind], repo_id))

        # -- routes --------------------------------------------------------------------------------------------
        def do_POST(self):
            path = self._record()
            body = self._body()
            if path == "/api/validate-yaml":
                return self._reply(200, {"errors": [], "warnings": []})
            if not self._authorised():
                return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
            if path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            match = re.fullmatch(rf"/api/{_REPO}/(?P<action>preupload|commit|branch)/(?P<rev>.+)", path)
            if not match:
                return self._error(404, "NotFound", f"no route for POST {path}")
            repo = self._repo(match["kind"], match["repo"])
            if repo is None:
                return self._error(404, "RepoNotFound", f"Repository {match['repo']} not found")
            revision = unquote(match["rev"])
            if match["action"] == "branch":
                return self._create_branch(repo, revision, json.loads(body or b"{}"))
            if repo.resolve(revision) is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if match["action"] == "preupload":
                files = json.loads(body)["files"]
                modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                return self._reply(200, {"files": modes, "commitOid": repo.resolve(revision)})
            return self._commit(repo, revision, body)

        def _create_repo(self, request: dict):
            repo_id = f"{request['organization']}/{request['name']}"
            repo_type = request.get("type") or "model"
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            reply = {"url": f"{hub.endpoint}/{prefix}{repo_id}", "name": repo_id, "id": repo_id}
            with hub.lock:
                if (repo_type, repo_id) in hub.repos:
                    # The Hub names the existing repo's url in its 409 too; huggingface_hub's exist_ok reads it.
                    return self._reply(
                        409, {**reply, "error": "You already created this repo"}, error_code="RepoExists"
                    )
                repo = FakeRepo(
                    repo_id, repo_type, request.get("visibility") == "private" or bool(request.get("private"))
                )
                repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                hub.repos[(repo_type, repo_id)] = repo
            return self._reply(200, reply)

        def _create_branch(self, repo: FakeRepo, branch: str, request: dict):
            with hub.lock:
                if branch in repo.branches:
                    return self._error(409, "BranchExists", f"Reference {branch} already exists")
                start = repo.resolve(request.get("startingPoint") or "main")
                repo.branches[branch] = start
            return self._reply(200, {})

        def _commit(self, repo: FakeRepo, revision: str, body: bytes):
            operations = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            with hub.lock:
                files = dict(repo.commits[repo.resolve(revision)])
                for operation in operations:
                    value = operation["value"]
                    if operation["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif operation["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif operation["key"] != "header":
                        return self._error(400, "BadRequest", f"unsupported commit operation {operation['key']!r}")
                branch = revision if revision in repo.branches else None
                if branch is None:
                    return self._error(400, "BadRequest", "commits go to a branch, not a sha")
                sha = repo.commit(branch, files)
            return self._reply(
                200,
                {"commitUrl": f"{hub.endpoint}/{repo.repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None},
            )

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            path = self._record()
            if path == "/api/whoami-v2":
                if not self._authorised():
                    return self._error(401, "Unauthorized", "Invalid credentials")
                return self._reply(200, {"name": "user", "type": "user", "orgs": [], "auth": {"type": "access_token"}})
            match = re.fullmatch(rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path)
            if match:
                return self._info(match["kind"], match["repo"], unquote(match["rev"] or "main"))
            match = re.fullmatch(rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
            if match:
                return self._tree(match["kind"], match["repo"], unquote(match["rev"]), match["sub"] or "")
            match = re.fullmatch(
                r"/(?:(?P<kind>datasets)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path
            )
            if match:
                return self._resolve(
                    match["kind"] or "models", match["repo"], unquote(match["rev"]), unquote(match["file"])
                )
            return self._error(404, "NotFound", f"no route for GET {path}")

        def _snapshot(self, kind: str, repo_id: str, revision: str):
            repo = self._repo(kind, repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
                return None, None
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None, None
            return repo, sha

        def _info(self, kind: str, repo_id: str, revision: str):
            repo, sha = self._snapshot(kind, repo_id, revision)
            if repo is not None:
                siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.commits[sha].items())]
                self._reply(200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings, "tags": []})

        def _tree(self, kind: str, repo_id: str, revision: str, folder: str):
            repo, sha = self._snapshot(kind, repo_id, revision)
            if repo is not None:
                prefix = folder.rstrip("/") + "/" if folder else ""
                entries = [
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(repo.commits[sha].items())
                    if name.startswith(prefix)
                ]
                self._reply(200, entries)

        def _resolve(self, kind: str, repo_id: str, revision: str, name: str):
            repo, sha = self._snapshot(kind, repo_id, revision)
            if repo is None:
                return
            data = repo.commits[sha].get(name)
            if data is None:
                return self._error(404, "EntryNotFound", f"{name} does not exist at {revision}")
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            self._reply(200, data, headers={"ETag": etag, "X-Repo-Commit": sha})

    return Handler


def point_clients_at(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, cache_dir) -> None:
    """Points this process's huggingface_hub (and so transformers) at `hub`, with its token and a private cache.

    `HF_ENDPOINT`, `HF_HUB_OFFLINE` and the cache path are read when huggingface_hub is imported; these are the
    module attributes that hold them, the default `HfApi` whose bound methods (`create_repo`, `model_info`, ...)
    copied the endpoint, and transformers' shared `HfApi` (built on first use with the endpoint of that moment).
    """
    import transformers.utils.hub
    from huggingface_hub import constants, hf_api

    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # read at call time by some libraries (peft)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)
    monkeypatch.setenv("HF_TOKEN", hub.token)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running `FakeHub` that this process's Hub clients talk to (token set, cache under tmp_path)."""
    with FakeHub() as hub:
        point_clients_at(monkeypatch, hub, tmp_path / "hf-cache")
        yield hub
