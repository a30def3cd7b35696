"""A small in-memory stand-in for the Hugging Face Hub's HTTP API, enough for huggingface_hub to create a repo,
commit files (regular uploads, no LFS/Xet) and download them again. Tests point HF_ENDPOINT at it.

    python tests/fake_hub.py PORT      # serve on 127.0.0.1:PORT until killed
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
import time

from fastapi import FastAPI, Request, Response
from huggingface_hub import ModelCard
from fastapi.responses import JSONResponse


def create_app() -> FastAPI:
    app = FastAPI()
    repos: dict[str, dict] = {}

    def repo_or_404(repo_id: str):
        repo = repos.get(repo_id)
        if repo is None:
            return None, JSONResponse({"error": "Repository not found"}, status_code=404,
                                      headers={"X-Error-Code": "RepoNotFound"})  # fmt: skip
        return repo, None

    @app.get("/api/whoami-v2")
    def whoami():
        return {"type": "user", "name": "tester", "orgs": [], "auth": {"accessToken": {"role": "write"}}}

    @app.post("/api/repos/create")
    async def create(request: Request):
        body = await request.json()
        repo_id = f"{body.get('organization') or 'tester'}/{body['name']}"
        if repo_id in repos:
            return JSONResponse({"error": "You already created this model repo", "url": f"/{repo_id}"}, status_code=409)
        repos[repo_id] = {"files": {}, "sha": hashlib.sha1(repo_id.encode()).hexdigest(), "branches": {"main"},
                          "private": body.get("visibility") == "private" or bool(body.get("private"))}
        return {"url": f"{request.base_url}{repo_id}", "name": repo_id}

    @app.post("/api/validate-yaml")
    def validate_yaml():
        return {"errors": [], "warnings": []}

    @app.post("/api/models/{ns}/{name}/preupload/{revision}")
    async def preupload(ns: str, name: str, revision: str, request: Request):
        body = await request.json()
        stored = repos.get(f"{ns}/{name}", {}).get("files", {})
        # as the Hub: the oid of a file already on the branch, which the client compares to skip unchanged files
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_oid(stored[f["path"]]) if f["path"] in stored else None} for f in body["files"]]
        return {"files": files}

    @app.post("/api/models/{ns}/{name}/branch/{branch}")
    def create_branch(ns: str, name: str, branch: str):
        repo, error = repo_or_404(f"{ns}/{name}")
        if error:
            return error
        if branch in repo["branches"]:
            return JSONResponse({"error": "Reference already exists"}, status_code=409)
        repo["branches"].add(branch)  # branches share one file set here: enough to check that a commit names one
        return {}

    @app.post("/api/models/{ns}/{name}/commit/{revision}")
    async def commit(ns: str, name: str, revision: str, request: Request):
        repo, error = repo_or_404(f"{ns}/{name}")
        if error:
            return error
        if revision not in repo["branches"]:  # as the Hub: a commit goes to an existing branch
            return JSONResponse({"error": f"Invalid rev id: {revision}"}, status_code=404,
                                headers={"X-Error-Code": "RevisionNotFound"})  # fmt: skip
        for line in (await request.body()).decode().splitlines():
            entry = json.loads(line)
            if entry["key"] == "file":
                value = entry["value"]
                repo["files"][value["path"]] = base64.b64decode(value["content"])
            elif entry["key"] in ("deletedFile", "deletedFolder"):
                path = entry["value"]["path"]
                repo["files"] = {p: c for p, c in repo["files"].items() if p != path and not p.startswith(path + "/")}
            elif entry["key"] == "lfsFile":
                return JSONResponse({"error": "LFS uploads are not supported here"}, status_code=400)
        repo["sha"] = hashlib.sha1(f"{repo['sha']}{time.time_ns()}".encode()).hexdigest()
        return {"commitUrl": f"{request.base_url}{ns}/{name}/commit/{repo['sha']}", "commitOid": repo["sha"],
                "pullRequestUrl": None}  # fmt: skip

    def info(repo_id: str, repo: dict) -> dict:
        siblings = [{"rfilename": path, "size": len(content)} for path, content in sorted(repo["files"].items())]
        readme = repo["files"].get("README.md")
        card_data = ModelCard(readme.decode()).data.to_dict() if readme else None  # as the Hub: the card's metadata
        return {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "siblings": siblings, "private": repo["private"],
                "tags": [], "lastModified": "2026-01-01T00:00:00.000Z", "cardData": card_data}  # fmt: skip

    @app.get("/api/models/{ns}/{name}")
    def model_info(ns: str, name: str):
        repo, error = repo_or_404(f"{ns}/{name}")
        return error or info(f"{ns}/{name}", repo)

    @app.get("/api/models/{ns}/{name}/revision/{revision}")
    def model_info_revision(ns: str, name: str, revision: str):
        return model_info(ns, name)

    @app.get("/api/models/{ns}/{name}/tree/{revision}")
    @app.get("/api/models/{ns}/{name}/tree/{revision}/{path:path}")
    def tree(ns: str, name: str, revision: str, path: str = ""):
        repo, error = repo_or_404(f"{ns}/{name}")
        if error:
            return error
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries = [{"type": "file", "path": p, "size": len(c), "oid": hashlib.sha1(c).hexdigest()}
                   for p, c in sorted(repo["files"].items()) if p.startswith(prefix)]  # fmt: skip
        if prefix and not entries:
            return JSONResponse({"error": "not found"}, status_code=404, headers={"X-Error-Code": "EntryNotFound"})
        return entries

    @app.api_route("/{ns}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(ns: str, name: str, revision: str, path: str, request: Request):
        repo, error = repo_or_404(f"{ns}/{name}")
        if error:
            return error
        content = repo["files"].get(path)
        headers = {"X-Repo-Commit": repo["sha"]}
        if content is None:
            return Response(status_code=404, headers={**headers, "X-Error-Code": "EntryNotFound"})
        headers.update({"ETag": f'"{hashlib.sha256(content).hexdigest()}"', "Content-Length": str(len(content))})
        return Response(content=b"" if request.method == "HEAD" else content, headers=headers,
                        media_type="application/octet-stream")  # fmt: skip

    app.state.repos = repos
    return app


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """Runs the app with uvicorn in a daemon thread on 127.0.0.1."""

    def __init__(self, port: int):
        import uvicorn

        self.port = port
        self.app = create_app()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("fake hub did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


if __name__ == "__main__":
    with FakeHub(int(sys.argv[1])):
        while True:
            time.sleep(3600)
