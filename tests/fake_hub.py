"""A local stand-in for the Hugging Face Hub API, for tests: the calls huggingface_hub 2.4's
HfApi makes for create_repo, repo_info, README metadata validation, preupload, commit and
list_repo_tree. It listens on 127.0.0.1 only and keeps repos in memory, with their commit
history. Files are "regular" uploads (base64 in the commit), except those ending in one of
`lfs_suffixes`, which go through the LFS batch API (basic transfer: a PUT of the content, a
verify call, an lfsFile entry in the commit) and are listed with their LFS pointer, as the
hub lists them. The client uses LFS only with xet off (HF_HUB_DISABLE_XET): there is no fake
xet storage.

Tokens: `tokens` may write, `read_only` may only read; anything else is rejected with 401 as
the hub does. `fail()` injects errors (optionally after applying the request, like a lost
response). `requests` lists (method, path) of every call; headers are never recorded.

    python tests/fake_hub.py --port 8765 --token hf_xxx   # for trying the workflow by hand
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+)"


def git_blob_id(data):
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data):
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n".encode()


@dataclass
class Repo:
    repo_id: str
    private: bool
    # oldest first: (commit id, message, {path: bytes}, [paths sent in that commit])
    commits: list = field(default_factory=list)

    @property
    def files(self):
        return self.commits[-1][2] if self.commits else {}

    @property
    def sha(self):
        return self.commits[-1][0] if self.commits else "0" * 40

    def at(self, revision):
        if revision in ("main", self.sha):
            return self.files
        for oid, _, files, _ in self.commits:
            if oid == revision:
                return files
        return None


@dataclass
class Fault:
    method: str
    pattern: str
    status: int
    times: int
    apply: bool


class FakeHub:
    def __init__(self, tokens=("hf_fake_write",), read_only=(), lfs_suffixes=()):
        self.tokens, self.read_only = set(tokens), set(read_only)
        self.lfs_suffixes = tuple(lfs_suffixes)
        self.lfs_objects = {}  # sha256 -> content uploaded through the LFS batch API
        self.repos = {}
        self.requests = []
        self.faults = []
        self.lock = threading.Lock()
        self.server = None

    # --- control -----------------------------------------------------------------------

    def start(self, port=0):
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, method, pattern, status, times=1, apply=False):
        """Answer the next `times` requests matching `method` and the path regex `pattern`
        with `status`; with apply=True the request takes effect first (a lost response)."""
        self.faults.append(Fault(method, pattern, status, times, apply))

    def add_repo(self, repo_id, private):
        self.repos[repo_id] = Repo(repo_id, private)
        return self.repos[repo_id]

    def is_lfs(self, path):
        return bool(self.lfs_suffixes) and path.endswith(self.lfs_suffixes)

    def calls(self, method, pattern):
        return [p for m, p in self.requests if m == method and re.search(pattern, p)]


def _error(status, message, code=None):
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return status, {"error": message}, headers


class _Handler(BaseHTTPRequestHandler):
    """Each endpoint returns (status, JSON body, headers); _dispatch sends it, or an injected fault."""

    hub: FakeHub

    def log_message(self, *args):  # quiet: nothing about requests is printed
        pass

    def _send(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _auth(self, write):
        """None if allowed, else the error answer."""
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            return _error(401, "You must be authenticated to access this resource")
        if token not in self.hub.tokens | self.hub.read_only:
            return _error(401, "Invalid credentials in Authorization header")
        if write and token not in self.hub.tokens:
            return _error(403, "You don't have the rights to write to this repo")
        return None

    def _repo(self, repo_id, write=False):
        """(repo, None) or (None, error answer)."""
        repo = self.hub.repos.get(repo_id)
        if repo is not None and (repo.private or write):
            denied = self._auth(write)
            if denied:
                return None, denied
        if repo is None:
            return None, _error(404, "Repository not found", code="RepoNotFound")
        return repo, None

    def _dispatch(self, method):
        split = urlsplit(self.path)
        self.hub.requests.append((method, split.path))
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer ") and auth[7:] not in self.hub.tokens | self.hub.read_only:
            # like the hub: a bad token fails every call, even one that needs no token
            return self._send(*_error(401, "Invalid credentials in Authorization header"))
        with self.hub.lock:
            fault = next(
                (f for f in self.hub.faults if f.times > 0 and f.method == method and re.search(f.pattern, split.path)),
                None,
            )
            if fault:
                fault.times -= 1
            answer = None if fault and not fault.apply else self._route(method, split.path, split.query, body)
        if fault:
            answer = _error(fault.status, f"fake hub: injected HTTP {fault.status}")
        self._send(*answer)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _route(self, method, path, query, body):
        routes = [
            ("GET", r"^/api/whoami-v2$", self.whoami),
            ("POST", r"^/api/repos/create$", self.create_repo),
            ("POST", r"^/api/validate-yaml$", self.validate_yaml),
            ("POST", rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$", self.preupload),
            ("POST", rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$", self.commit),
            ("GET", rf"^/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", self.tree),
            ("GET", rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$", self.info),
            ("POST", rf"^/{REPO}\.git/info/lfs/objects/batch$", self.lfs_batch),
            ("PUT", r"^/lfs/(?P<oid>[0-9a-f]{64})$", self.lfs_put),
            ("POST", r"^/lfs/verify$", self.lfs_verify),
        ]
        for verb, pattern, handler in routes:
            match = re.match(pattern, path)
            if verb == method and match:
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                return handler(body, query=parse_qs(query), **args)
        return _error(404, f"fake hub: no route for {method} {path}")

    # --- endpoints ---------------------------------------------------------------------

    def whoami(self, body, query):
        denied = self._auth(write=False)
        return denied or (200, {"type": "user", "name": "user"}, {})

    def create_repo(self, body, query):
        denied = self._auth(write=True)
        if denied:
            return denied
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        if repo_id in self.hub.repos:
            status, body, headers = _error(409, "You already created this model repo")
            return status, {**body, "url": f"{self.hub.url}/{repo_id}"}, headers
        # like the hub: public unless asked otherwise
        self.hub.add_repo(repo_id, private=payload.get("visibility") == "private")
        return 200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id}, None

    def validate_yaml(self, body, query):
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": str(err)}]}, None
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "metadata must be a mapping"}]}, None
        return 200, {"warnings": []}, None

    def info(self, body, query, repo, rev="main"):
        found, denied = self._repo(repo)
        if denied:
            return denied
        files = found.at(rev)
        if files is None:
            return _error(404, "Revision not found", code="RevisionNotFound")
        sha = found.sha if rev == "main" else rev
        return (
            200,
            {"id": repo, "private": found.private, "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]},
            None,
        )

    def preupload(self, body, query, repo, rev):
        found, denied = self._repo(repo, write=True)
        if denied:
            return denied
        files = found.at(rev) or {}
        def oid(path):  # what the client compares its file with: sha256 for LFS, the blob id otherwise
            if path not in files:
                return None
            return hashlib.sha256(files[path]).hexdigest() if self.hub.is_lfs(path) else git_blob_id(files[path])

        answer = [
            {
                "path": entry["path"],
                "uploadMode": "lfs" if self.hub.is_lfs(entry["path"]) else "regular",
                "shouldIgnore": False,
                "oid": oid(entry["path"]),
            }
            for entry in json.loads(body)["files"]
        ]
        return 200, {"files": answer, "commitOid": found.sha}, None

    def commit(self, body, query, repo, rev):
        found, denied = self._repo(repo, write=True)
        if denied:
            return denied
        files, message, sent = dict(found.files), "", []
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                sent.append(value["path"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs_objects:
                    return 400, {"error": f"fake hub: LFS object of {value['path']} was never uploaded"}, None
                files[value["path"]] = self.hub.lfs_objects[value["oid"]]
                sent.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                return 400, {"error": f"fake hub: {key} is not supported"}, None
        oid = hashlib.sha1(f"{found.sha}\n{message}\n{len(found.commits)}".encode()).hexdigest()
        found.commits.append((oid, message, files, sent))
        return 200, {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}, None

    def tree(self, body, query, repo, rev, sub=""):
        found, denied = self._repo(repo)
        if denied:
            return denied
        files = found.at(rev)
        if files is None:
            return _error(404, "Revision not found", code="RevisionNotFound")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = sub.strip("/") + "/" if sub else ""
        entries, folders = [], set()
        for path in sorted(p for p in files if p.startswith(prefix)):
            parts = path[len(prefix) :].split("/")
            folders.update(prefix + "/".join(parts[:d]) for d in range(1, len(parts)) if recursive or d == 1)
            if recursive or len(parts) == 1:
                data = files[path]
                entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
                if self.hub.is_lfs(path):  # the hub lists the pointer's blob id and the content's sha256
                    pointer = lfs_pointer(data)
                    entry["oid"] = git_blob_id(pointer)
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}
                entries.append(entry)
        entries += [{"type": "directory", "path": f, "size": 0, "oid": "0" * 40} for f in sorted(folders)]
        return 200, entries, None


    # --- LFS (basic transfer) -------------------------------------------------------------

    def lfs_batch(self, body, query, repo):
        found, denied = self._repo(repo, write=True)
        if denied:
            return denied
        objects = []
        for obj in json.loads(body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_objects:  # already stored: no actions, no upload
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs/verify"},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}, None

    def lfs_put(self, body, query, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            return _error(400, "fake hub: LFS content does not match its oid")
        self.hub.lfs_objects[oid] = body
        return 200, {}, None

    def lfs_verify(self, body, query):
        obj = json.loads(body)
        stored = self.hub.lfs_objects.get(obj["oid"])
        if stored is None or len(stored) != obj["size"]:
            return _error(404, "fake hub: LFS object not found")
        return 200, {}, None


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", action="append", required=True, help="a token allowed to write")
    args = parser.parse_args()
    hub = FakeHub(tokens=args.token).start(args.port)
    print(f"fake hub on {hub.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
