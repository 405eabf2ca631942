"""A local stand-in for the Hugging Face hub's file endpoints, enough for hf_hub_download:
HEAD/GET /{repo}/resolve/{revision}/{file} with ETag, X-Repo-Commit, Range requests, and the
hub's error headers (X-Error-Code GatedRepo / RepoNotFound / EntryNotFound, 401 for a bad
token). It can drop a connection half-way through a file once, to test resuming."""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Hub:
    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated: set[str] = field(default_factory=set)  # repos needing an approved token
    approved: set[str] = field(default_factory=set)  # tokens with access to gated repos
    valid_tokens: set[str] = field(default_factory=set)
    drop_once: set[str] = field(default_factory=set)  # file names cut short on first GET
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, Range

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output clean
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _error(self, status, code=None, message=None):
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if message:
                    self.send_header("X-Error-Message", message)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body):
                hub.log.append((self.command, self.path, self.headers.get("Range")))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
                if not m:
                    return self._error(404)
                repo, _, name = m.groups()
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ") if auth else None
                if token is not None and token not in hub.valid_tokens:
                    return self._error(401, message="Invalid credentials in Authorization header")
                if repo not in hub.repos:
                    return self._error(404, "RepoNotFound")
                if repo in hub.gated and token not in hub.approved:
                    return self._error(401 if token is None else 403, "GatedRepo")
                data = hub.repos[repo].get(name)
                if data is None:
                    return self._error(404, "EntryNotFound")
                start = 0
                rng = self.headers.get("Range")
                if rng and (r := re.match(r"bytes=(\d+)-", rng)):
                    start = int(r.group(1))
                self.send_response(206 if start else 200)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                if name in hub.drop_once and not start:
                    hub.drop_once.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)  # the connection drops half-way
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
