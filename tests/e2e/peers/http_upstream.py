#!/usr/bin/env python3
"""A test HTTP/1.1 upstream for agentgate's tunnel tests (stdlib only).

Run: python3 http_upstream.py --port P [--port P2 ...] --name NAME --events FILE [--ready FILE]

Endpoints (any method unless noted):
  /inspect...            JSON: name, the local port the request arrived on, method, raw request
                         target, raw header list (order and duplicates kept), body length.
  GET /download?size=N[&chunked=1][&id=X]
                         N bytes of the shared test pattern (see `pattern_block`), streamed in
                         256 KiB writes with Content-Length (or chunked). If the client goes away
                         before the end, a `client_disconnected` event is written to --events.
  POST /upload[?id=X]    Reads the body as it comes (Content-Length or chunked), checks it
                         against the pattern at every offset, and answers JSON: bytes, sha256,
                         pattern_ok, chunked.
  /sleep?ms=N            Sleeps N ms then answers like /inspect (to overlap concurrent requests).
  /hang[?id=X]           Never answers; writes `hang_closed` to --events when the client goes.
  GET /many-headers?n=N  An answer with N headers X-Many-i (and the body "ok").
  GET /drip?pieces=N&every_ms=M&size=S[&id=X]
                         A chunked answer of N pieces of S bytes, one every M ms (a watch, or a
                         log that is followed): `drip_complete` when all went out.

Every request also appends a `request` event. Events are JSON lines, flushed at once.
The process tracks the number of requests in flight and reports the peak in /stats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import socket
import sys
import threading
import time
import http.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

# The standard library's HTTP server refuses more than 100 request headers (431); the tunnel
# tests send more.
http.client._MAXHEADERS = 1000  # noqa: SLF001

PATTERN_SEED = 20240611
# Not a power of two, so that a reordered or repeated chunk of any usual size is detected.
PATTERN_LEN = 1024 * 1024 + 13
WRITE_SIZE = 256 * 1024


def pattern_block() -> bytes:
    """The pattern's period; the stream at offset o is block[o % len(block)]."""
    return random.Random(PATTERN_SEED).randbytes(PATTERN_LEN)


_BLOCK = pattern_block()
_BLOCK2 = memoryview(_BLOCK + _BLOCK)


def pattern_slice(offset: int, n: int) -> memoryview:
    """The pattern bytes [offset, offset+n) with n <= PATTERN_LEN."""
    o = offset % PATTERN_LEN
    return _BLOCK2[o:o + n]


def pattern_chunks(total: int, size: int = WRITE_SIZE):
    """Yields the pattern's first `total` bytes in pieces of at most `size` (<= PATTERN_LEN)."""
    off = 0
    while off < total:
        n = min(size, total - off)
        yield pattern_slice(off, n)
        off += n


class Events:
    def __init__(self, path: str | None):
        self.path = path
        self.lock = threading.Lock()

    def write(self, **ev):
        if not self.path:
            return
        ev["t"] = time.time()
        line = json.dumps(ev) + "\n"
        with self.lock:
            with open(self.path, "a") as f:
                f.write(line)
                f.flush()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.total = 0

    def enter(self):
        with self.lock:
            self.in_flight += 1
            self.total += 1
            self.peak = max(self.peak, self.in_flight)

    def leave(self):
        with self.lock:
            self.in_flight -= 1


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr, handler, name, events, stats):
        super().__init__(addr, handler)
        self.name = name
        self.events = events
        self.stats = stats


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, fmt, *args):  # quiet: the events file is the record
        pass

    # --- helpers -------------------------------------------------------------------------

    def _query(self) -> dict:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query, keep_blank_values=True).items()}

    def _json(self, obj, status: int = 200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Upstream-Name", self.server.name)
        self.end_headers()
        self.wfile.write(data)

    def _body_iter(self):
        """Yields the request body as it arrives (Content-Length or chunked)."""
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise ConnectionError("EOF in chunk size line")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers until an empty line.
                    while True:
                        t = self.rfile.readline(8192)
                        if t in (b"\r\n", b"\n", b""):
                            return
                left = size
                while left:
                    piece = self.rfile.read(min(left, 1024 * 1024))
                    if not piece:
                        raise ConnectionError("EOF in chunk")
                    left -= len(piece)
                    yield piece
                self.rfile.readline(16)  # CRLF after the chunk
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left:
                piece = self.rfile.read(min(left, 1024 * 1024))
                if not piece:
                    raise ConnectionError("EOF in body")
                left -= len(piece)
                yield piece

    def _inspect(self, body_len: int):
        local_port = self.connection.getsockname()[1]
        return {
            "name": self.server.name,
            "port": local_port,
            "method": self.command,
            "target": self.path,
            "version": self.request_version,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_len": body_len,
        }

    def _client_gone(self) -> bool:
        """True if the client closed its side (readable with no data, or an error)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # --- dispatch ------------------------------------------------------------------------

    def _handle(self):
        self.server.stats.enter()
        try:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            q = self._query()
            self.server.events.write(event="request", name=self.server.name, method=self.command,
                                     target=self.path, id=q.get("id"))
            if path == "/download":
                return self._download(q)
            if path == "/upload":
                return self._upload(q)
            if path == "/hang":
                return self._hang(q)
            if path == "/drip":
                return self._drip(q)
            if path == "/many-headers":
                n = int(q.get("n", "150"))
                self.send_response(200)
                for i in range(n):
                    self.send_header(f"X-Many-{i}", str(i))
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                return None
            if path == "/stats":
                s = self.server.stats
                return self._json({"peak": s.peak, "total": s.total, "in_flight": s.in_flight})
            if path == "/sleep":
                n = sum(len(p) for p in self._body_iter())
                time.sleep(int(q.get("ms", "100")) / 1000)
                return self._json(self._inspect(n))
            # /inspect and anything else
            n = sum(len(p) for p in self._body_iter())
            return self._json(self._inspect(n))
        finally:
            self.server.stats.leave()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle

    def _download(self, q):
        size = int(q.get("size", "0"))
        chunked = q.get("chunked") == "1"
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("X-Upstream-Name", self.server.name)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(size))
        self.end_headers()
        sent = 0
        try:
            for piece in pattern_chunks(size):
                if chunked:
                    self.wfile.write(b"%x\r\n" % len(piece))
                    self.wfile.write(piece)
                    self.wfile.write(b"\r\n")
                else:
                    self.wfile.write(piece)
                sent += len(piece)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, OSError) as e:
            self.server.events.write(event="client_disconnected", id=q.get("id"), sent=sent,
                                     size=size, error=type(e).__name__)
            self.close_connection = True
            return
        self.server.events.write(event="download_complete", id=q.get("id"), sent=sent)

    def _upload(self, q):
        h = hashlib.sha256()
        n = 0
        ok = True
        try:
            for piece in self._body_iter():
                # Check against the pattern at this offset, in periods' worth of pieces.
                mv = memoryview(piece)
                pos = 0
                while pos < len(mv):
                    k = min(len(mv) - pos, PATTERN_LEN)
                    if ok and mv[pos:pos + k].tobytes() != pattern_slice(n + pos, k).tobytes():
                        ok = False
                    pos += k
                h.update(piece)
                n += len(piece)
        except (ConnectionError, OSError) as e:
            self.server.events.write(event="upload_aborted", id=q.get("id"), received=n,
                                     error=type(e).__name__)
            self.close_connection = True
            return
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        self.server.events.write(event="upload_complete", id=q.get("id"), received=n, pattern_ok=ok)
        self._json({"bytes": n, "sha256": h.hexdigest(), "pattern_ok": ok, "chunked": chunked,
                    "content_length": self.headers.get("Content-Length")})

    def _drip(self, q):
        pieces, every, size = int(q.get("pieces", "3")), int(q.get("every_ms", "1000")), int(q.get("size", "10"))
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(pieces):
                if i:
                    time.sleep(every / 1000)
                piece = pattern_slice(i * size, size).tobytes()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError as e:
            self.server.events.write(event="client_disconnected", id=q.get("id"), error=type(e).__name__)
            self.close_connection = True
            return
        self.server.events.write(event="drip_complete", id=q.get("id"), pieces=pieces)

    def _hang(self, q):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self._client_gone():
                self.server.events.write(event="hang_closed", id=q.get("id"))
                self.close_connection = True
                return
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--name", default="upstream")
    ap.add_argument("--events")
    ap.add_argument("--ready", help="file written once every port listens")
    a = ap.parse_args()
    events, stats = Events(a.events), Stats()
    servers = []
    for p in a.port:
        s = Server(("127.0.0.1", p), Handler, a.name, events, stats)
        servers.append(s)
        threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    if a.ready:
        tmp = a.ready + ".tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "ports": a.port}))
        os.replace(tmp, a.ready)
    print(f"http upstream {a.name} listening on {a.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
