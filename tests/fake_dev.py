"""A stand-in for `profiles dev` that tests of .ci/smoke_dev.py start as a checkout's scripts/dev.

It starts one "engine" (a sleeping process in its own session whose command line holds FAKE_MARKER),
prints a banner, answers the smoke's PUT and GET in memory, and on SIGINT exits, stopping its engine
only when FAKE_STOPS_ENGINE=1. With FAKE_SILENT=1 it never prints the banner and never serves.
"""

from __future__ import annotations

import argparse
import base64
import email.parser
import email.policy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PROFILES: dict[str, dict[str, Any]] = {}


class FakeApi(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the smoke echoes every line, and this stand-in's requests are not the point."""

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/healthz":
            self._answer(200, {"status": "ok"})
        elif path.removeprefix("/v1/profiles/") in PROFILES:
            self._answer(200, PROFILES[path.removeprefix("/v1/profiles/")])
        else:
            self._answer(404, {"title": "not found"})

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        form = email.parser.BytesParser(policy=email.policy.default).parsebytes(head + body)
        parts = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
        metadata, image = (parts[name].get_payload(decode=True) for name in ("metadata", "image"))
        assert isinstance(metadata, bytes) and isinstance(image, bytes)
        user = self.path.removeprefix("/v1/profiles/")
        PROFILES[user] = {"metadata": json.loads(metadata), "image": {"data": base64.b64encode(image).decode()}}
        self._answer(202, {"version": 1})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    engine = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", os.environ["FAKE_MARKER"]], start_new_session=True
    )
    if os.environ.get("FAKE_SILENT") == "1":
        time.sleep(120)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), FakeApi)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"API         http://127.0.0.1:{args.port}", flush=True)
    stop.wait()
    print("stopping", flush=True)
    server.shutdown()
    server.server_close()
    if os.environ.get("FAKE_STOPS_ENGINE") == "1":
        engine.kill()
        engine.wait()


if __name__ == "__main__":
    main()
