"""A small HTTP proxy in front of an S3 server (moto), with the faults a test switches on:

- `strip_conditions`: drop `If-None-Match` / `If-Match` from requests, like S3-compatible
  servers that ignore conditional writes;
- `cut(predicate, times)`: send the headers of matching responses with their full length,
  then only half the body, and close the connection (a read that fails half way);
- `fail(predicate, times)`: close the connection of matching requests without an answer;
- `down`: close every connection without an answer (an endpoint that went away);
- `delay`: seconds every request waits before it is forwarded (a distant endpoint).

Every request is recorded (method, path and whether it carried If-None-Match), so a test can
count who wrote what.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Predicate = Callable[[str, str], bool]  # (method, path) -> does the fault apply?

_HOP = {"host", "connection", "transfer-encoding", "expect", "keep-alive", "content-length"}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    conditional: bool  # carried If-None-Match when it arrived


class S3Proxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.strip_conditions = False
        self.down = False
        self.delay = 0.0
        self.seen: list[Seen] = []
        self._faults: list[list] = []  # [kind, predicate, times left]
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def cut(self, predicate: Predicate, times: int = 1) -> None:
        with self._lock:
            self._faults.append(["cut", predicate, times])

    def fail(self, predicate: Predicate, times: int = 1) -> None:
        with self._lock:
            self._faults.append(["fail", predicate, times])

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()
        self.down = False

    def requests(self, method: str, path_part: str = "") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.method == method and path_part in s.path]

    def _fault(self, method: str, path: str) -> str | None:
        with self._lock:
            for fault in self._faults:
                kind, predicate, times = fault
                if times > 0 and predicate(method, path):
                    fault[2] -= 1
                    return str(kind)
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(proxy: S3Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _hang_up(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _forward(self) -> None:
            body = self._body()
            conditional = "If-None-Match" in self.headers
            with proxy._lock:
                proxy.seen.append(Seen(self.command, self.path, conditional))
            fault = proxy._fault(self.command, self.path)
            if proxy.delay:
                time.sleep(proxy.delay)
            if proxy.down or fault == "fail":
                self._hang_up()
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            if proxy.strip_conditions:
                conditions = ("if-none-match", "if-match")
                headers = {k: v for k, v in headers.items() if k.lower() not in conditions}
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
            finally:
                upstream.close()
            self.send_response(response.status, response.reason)
            for key, value in response.getheaders():
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))  # HEAD: the object's
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault == "cut" and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self._hang_up()
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    return Handler
