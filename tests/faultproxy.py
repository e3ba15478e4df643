"""A fault-injecting HTTP reverse proxy for S3-protocol tests: it sits on loopback in front of a real S3 server
(moto's) and, for a configurable share of the requests of chosen kinds, answers an S3 error, resets the
connection or stalls, so that faults reach the job from outside (our code is never patched).

    proxy = FaultProxy("http://127.0.0.1:5000").start()     # proxy.endpoint: point AWS_ENDPOINT_URL here
    proxy.rules = [Rule("503", rate=0.05), Rule("reset", rate=0.05, kinds=("put",), path=r"/poses/")]
    ...
    proxy.injected  # Counter of (fault, kind) injected; proxy.requests: Counter of kinds seen

Faults: "503" (503 SlowDown with S3's XML error body), "500" (500 InternalError), "reset" (the request is
read, then the TCP connection is closed with RST, no response), "stall" (no response for `stall_s` seconds,
longer than the client's read timeout, then the connection is closed), "delay" (the request is answered
normally after `delay_s` seconds: a distant store's latency).
Request kinds: "list" (GET with list-type / a bucket listing), "get" (GET of an object), "put" (PUT of an
object), "head", "delete", "post", "other".
"""
from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("503", "500", "reset", "stall")
RULES = (*FAULTS, "delay")  # "delay" (latency) is a rule, not a failure
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "expect"}

ERROR_BODIES = {
    "503": (503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass
class Rule:
    """Inject `fault` into a share `rate` of the matching requests (kinds empty = any; path: a regex searched
    in the request path, None = any) after the first `after` of them; at most `limit` times when given."""

    fault: str
    rate: float = 1.0
    kinds: tuple[str, ...] = ()
    path: str | None = None
    limit: int | None = None
    stall_s: float | None = None  # this rule's stall (None: the proxy's `stall_s`)
    after: int = 0  # let the first `after` matching requests through
    delay_s: float = 0.03  # a "delay" rule's added latency
    used: int = 0
    seen: int = 0

    def __post_init__(self):
        if self.fault not in RULES:
            raise ValueError(f"fault {self.fault!r} not in {RULES}")

    def matches(self, kind: str, path: str) -> bool:
        return ((not self.kinds or kind in self.kinds) and (self.path is None or re.search(self.path, path))
                and (self.limit is None or self.used < self.limit))


def request_kind(method: str, target: str) -> str:
    parts = urlsplit(target)
    key = parts.path.lstrip("/").split("/", 1)
    has_key = len(key) == 2 and key[1] != ""
    if method == "GET":
        return "list" if "list-type" in parts.query or not has_key else "get"
    return {"PUT": "put", "HEAD": "head", "DELETE": "delete", "POST": "post"}.get(method, "other")


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0, stall_s: float = 6.0):
        target = urlsplit(upstream)
        self.upstream_host, self.upstream_port = target.hostname, target.port or 80
        self.rules: list[Rule] = []
        self.stall_s = stall_s
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.injected: Counter = Counter()
        self.requests: Counter = Counter()
        self.log: list[tuple[str, str, str]] = []  # (fault, method, path) of every injection
        self.server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True, name="faultproxy").start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def healthy(self) -> None:
        """No more faults from now on."""
        with self.lock:
            self.rules = []

    def choose(self, kind: str, path: str) -> Rule | None:
        with self.lock:
            self.requests[kind] += 1
            for rule in self.rules:
                if not rule.matches(kind, path):
                    continue
                rule.seen += 1
                if rule.seen > rule.after and self.random.random() < rule.rate:
                    rule.used += 1
                    self.injected[(rule.fault, kind)] += 1
                    return rule
        return None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # injected resets end handlers with socket errors
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _handle(self):
        proxy = self.owner
        body = self._body()
        kind = request_kind(self.command, self.path)
        rule = proxy.choose(kind, urlsplit(self.path).path)
        if rule is not None:
            with proxy.lock:
                proxy.log.append((rule.fault, self.command, self.path))
            if rule.fault != "delay":
                return self._inject(rule)
            time.sleep(rule.delay_s)
        upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_HEADERS and name.lower() != "content-length":
                    self.send_header(name, value)
            if self.command == "HEAD":
                self.send_header("Content-Length", response.getheader("Content-Length", "0"))
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()

    def _inject(self, rule: Rule):
        fault = rule.fault
        if fault in ERROR_BODIES:
            status, reason, code, message = ERROR_BODIES[fault]
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f'<Resource>{urlsplit(self.path).path}</Resource><RequestId>faultproxy</RequestId></Error>'
                   ).encode()
            self.send_response_only(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        if fault == "stall":
            time.sleep(self.owner.stall_s if rule.stall_s is None else rule.stall_s)
        # reset (and the end of a stall): RST instead of an orderly close, no response at all
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _handle
