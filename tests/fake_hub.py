"""A small in-process HTTP server answering the Hub endpoints `huggingface_hub` uses to create a repo and commit.

Only what an upload needs: repo creation, YAML validation, preupload (every file "regular", with the stored
file's git oid so unchanged files are skipped), NDJSON commits with base64 content, repo info, and a stored file's
download (`resolve`), as the publishing tool reads the card already on the Hub. Unknown
requests are recorded and answered 404, so a test sees when the client needs something new.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.unknown: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict | list | None = None):
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):  # noqa: N802
                path = self.path.split("?")[0]
                body = self._body()
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                    private = request.get("private") or request.get("visibility") == "private"
                    hub.repos.setdefault(repo_id, {"files": {}, "commits": [], "private": bool(private)})
                    return self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id, "id": repo_id})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                parts = path.split("/")
                if len(parts) >= 7 and parts[1] == "api" and parts[2] in ("models", "spaces"):
                    repo_id, action = f"{parts[3]}/{parts[4]}", parts[5]
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [
                            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                             "oid": git_oid(repo["files"][f["path"]]) if f["path"] in repo["files"] else None}
                            for f in files]})
                    if action == "commit":
                        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                        header = next(line["value"] for line in lines if line["key"] == "header")
                        for line in lines:
                            if line["key"] == "file":
                                repo["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                            elif line["key"] in ("deletedFile",):
                                repo["files"].pop(line["value"]["path"], None)
                            elif line["key"] != "header":
                                hub.unknown.append(f"commit line {line['key']}")
                        oid = hashlib.sha1(json.dumps([len(repo["commits"]), header["summary"]]).encode()).hexdigest()
                        repo["commits"].append({"oid": oid, "summary": header["summary"],
                                                "paths": [line["value"]["path"] for line in lines if line["key"] == "file"]})
                        return self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}",
                                                "commitOid": oid})
                hub.unknown.append(f"POST {self.path}")
                return self._send(404, {"error": "unknown endpoint"})

            def _resolve(self, with_body: bool) -> bool:
                """[/spaces]/{org}/{name}/resolve/{revision}/{file}: a stored file's bytes, with the headers
                `hf_hub_download` reads (commit, etag, size); a missing one is 404 EntryNotFound."""
                parts = self.path.split("?")[0].split("/")
                if len(parts) > 1 and parts[1] in ("spaces", "datasets"):  # /spaces/{org}/{name}/resolve/...
                    parts = parts[:1] + parts[2:]
                if not (len(parts) >= 6 and parts[3] == "resolve"):
                    return False
                repo = hub.repos.get(f"{parts[1]}/{parts[2]}")
                content = None if repo is None else repo["files"].get("/".join(parts[5:]))
                if content is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound" if repo is None else "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                self.send_response(200)
                self.send_header("X-Repo-Commit", repo["commits"][-1]["oid"] if repo["commits"] else "0" * 40)
                self.send_header("ETag", f'"{git_oid(content)}"')
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if with_body:
                    self.wfile.write(content)
                return True

            def do_HEAD(self):  # noqa: N802
                if not self._resolve(with_body=False):
                    hub.unknown.append(f"HEAD {self.path}")
                    self.send_response(404)
                    self.end_headers()

            def do_GET(self):  # noqa: N802
                if self._resolve(with_body=True):
                    return
                parts = self.path.split("?")[0].split("/")
                if len(parts) >= 5 and parts[1] == "api" and parts[2] in ("models", "spaces"):
                    repo_id = f"{parts[3]}/{parts[4]}"
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"})
                    sha = repo["commits"][-1]["oid"] if repo["commits"] else "0" * 40
                    return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": bool(repo["private"]),
                                            "siblings": [{"rfilename": name} for name in sorted(repo["files"])]})
                hub.unknown.append(f"GET {self.path}")
                return self._send(404, {"error": "unknown endpoint"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def edit(self, repo_id: str, path: str, content: bytes) -> None:
        """A commit made elsewhere (the Hub's web editor, another machine) that writes one file."""
        repo = self.repos[repo_id]
        repo["files"][path] = content
        oid = hashlib.sha1(json.dumps([len(repo["commits"]), "edit " + path]).encode()).hexdigest()
        repo["commits"].append({"oid": oid, "summary": f"Update {path}", "paths": [path]})

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
