"""A raw HTTP/2 client for tests that must send what well-behaved clients never do.

Built on the `h2` protocol library (not a gRPC stack), over a plain socket or TLS, with
header validation switched off so that a test can send a URL as `:authority`, an empty one,
unknown encodings or corrupt message bodies exactly as written.
"""

from __future__ import annotations

import gzip
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions


def grpc_frame(payload: bytes, compressed: bool = False) -> bytes:
    """One gRPC length-prefixed message."""
    return struct.pack(">BI", 1 if compressed else 0, len(payload)) + payload


def gzip_frame(payload: bytes) -> bytes:
    return grpc_frame(gzip.compress(payload), compressed=True)


@dataclass
class Answer:
    """What came back on one stream."""

    headers: dict = field(default_factory=dict)
    trailers: dict = field(default_factory=dict)
    data: bytes = b""
    reset: int | None = None
    ended: bool = False

    @property
    def grpc_status(self) -> str | None:
        return self.trailers.get("grpc-status") or self.headers.get("grpc-status")

    @property
    def grpc_message(self) -> str:
        from urllib.parse import unquote

        return unquote(self.trailers.get("grpc-message") or self.headers.get("grpc-message") or "")


class RawH2:
    """One HTTP/2 connection, driven by hand."""

    def __init__(self, port: int, host: str = "127.0.0.1", tls_ctx: ssl.SSLContext | None = None,
                 server_hostname: str = "localhost", timeout: float = 10.0, source: str | None = None):
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        if tls_ctx is not None:
            sock = tls_ctx.wrap_socket(sock, server_hostname=server_hostname)
        self.sock = sock
        cfg = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                        normalize_outbound_headers=False, validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.conn.initiate_connection()
        self.answers: dict[int, Answer] = {}
        self.closed = False
        self.goaway: tuple[int, bytes] | None = None  # (error code, debug data) of a GOAWAY
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, headers: list[tuple[str, str]] | None = None, body: bytes | None = None,
                authority: str | None = "localhost", method: str = "POST", scheme: str = "http",
                end: bool = True, grpc: bool = True) -> int:
        """Opens a stream; returns its id. `authority=None` leaves :authority out."""
        sid = self.conn.get_next_available_stream_id()
        hs = [(":method", method), (":scheme", scheme), (":path", path)]
        if authority is not None:
            hs.append((":authority", authority))
        if grpc:
            hs += [("content-type", "application/grpc"), ("te", "trailers")]
        hs += headers or []
        self.conn.send_headers(sid, hs, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.answers[sid] = Answer()
        self.flush()
        return sid

    def pump(self, until, timeout: float = 10.0) -> bool:
        """Reads and handles events until `until()` is true, the connection closes, or time
        runs out. Returns until()'s last value."""
        deadline = time.monotonic() + timeout
        while not until() and not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                break
            except (ConnectionResetError, ssl.SSLError, OSError):
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            for ev in self.conn.receive_data(chunk):
                self._on(ev)
            self.flush()
        return bool(until())

    def _on(self, ev):
        sid = getattr(ev, "stream_id", None)
        a = self.answers.get(sid) if sid else None
        if isinstance(ev, h2.events.ResponseReceived) and a:
            a.headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                         for k, v in ev.headers}
        elif isinstance(ev, h2.events.TrailersReceived) and a:
            a.trailers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                          for k, v in ev.headers}
        elif isinstance(ev, h2.events.DataReceived):
            if a:
                a.data += ev.data
            self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.StreamEnded) and a:
            a.ended = True
        elif isinstance(ev, h2.events.StreamReset) and a:
            a.reset = ev.error_code
            a.ended = True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = (int(ev.error_code), ev.additional_data or b"")
            self.closed = True

    def finish(self, sids):
        """Ends our side of streams the server already answered (a request sent with
        `end=False` otherwise stays open on our side and counts against the stream limit)."""
        for sid in sids:
            try:
                self.conn.end_stream(sid)
            except h2.exceptions.StreamClosedError:
                pass
            except h2.exceptions.ProtocolError:
                pass
        self.flush()

    def wait(self, sid: int, timeout: float = 10.0) -> Answer:
        self.pump(lambda: self.answers[sid].ended, timeout)
        return self.answers[sid]

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class DeafClient:
    """A client whose HTTP/2 state never hears the server: it opens streams whatever the server
    said (a GOAWAY, say), and reads the server's frames straight off the socket, for what
    python-h2 refuses to look at (frames after a GOAWAY). Header blocks are decoded in order,
    so HPACK stays in step; CONTINUATION frames are not handled. It acknowledges PINGs, as
    every HTTP/2 stack does (`acked_pings` counts them), unless `ack_pings` is false."""

    def __init__(self, port: int, host: str = "127.0.0.1", ack_pings: bool = True):
        import hpack

        self.ack_pings = ack_pings
        self.acked_pings = 0
        self.sock = socket.create_connection((host, port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.decoder = hpack.Decoder()
        self.buf = b""
        self.goaway: tuple[int, int, bytes] | None = None  # (last stream, error code, debug)
        self.status: dict[int, str] = {}  # stream -> grpc-status of a trailers-only answer

    def request(self, path: str, headers: list[tuple[str, str]] = (), body: bytes | None = None,
                send: bool = True) -> int:
        """Opens a stream; `send=False` keeps its bytes for the next request's write."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "localhost"), ("content-type", "application/grpc"),
                                     ("te", "trailers"), *headers], end_stream=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        if send:
            self.sock.sendall(self.conn.data_to_send())
        return sid

    def read(self, until, timeout: float) -> str:
        """Reads frames until `until()` holds ("done"), the server closes ("closed") or time
        runs out ("timeout")."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return "timeout"
            except OSError:
                return "closed"
            if not chunk:
                return "closed"
            self.buf += chunk
            while len(self.buf) >= 9:
                length = int.from_bytes(self.buf[:3], "big")
                if len(self.buf) < 9 + length:
                    break
                kind, flags = self.buf[3], self.buf[4]
                sid = int.from_bytes(self.buf[5:9], "big") & 0x7FFF_FFFF
                payload, self.buf = self.buf[9:9 + length], self.buf[9 + length:]
                self._on(kind, flags, sid, payload)
        return "done"

    def _on(self, kind: int, flags: int, sid: int, payload: bytes):
        if kind == 0x1:  # HEADERS
            if flags & 0x8:  # PADDED
                payload = payload[1:len(payload) - payload[0]]
            if flags & 0x20:  # PRIORITY
                payload = payload[5:]
            fields = dict(self.decoder.decode(payload))
            if "grpc-status" in fields:
                self.status[sid] = fields["grpc-status"]
        elif kind == 0x7:  # GOAWAY
            self.goaway = (int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF,
                           int.from_bytes(payload[4:8], "big"), payload[8:])
        elif kind == 0x6 and not flags & 0x1 and self.ack_pings:  # PING, not an ACK
            self.sock.sendall(b"\x00\x00\x08\x06\x01\x00\x00\x00\x00" + payload)
            self.acked_pings += 1

    def close(self):
        self.sock.close()


class RefusingBackend:
    """A gRPC backend on the `h2` library that does not process its first call: it refuses the
    stream (RST_STREAM REFUSED_STREAM), or goes away below it (GOAWAY with last stream 0, then
    closes the connection). Every later call is answered OK with its request message echoed.
    `seen` lists each call's (connection number, stream id, what happened)."""

    def __init__(self, first: str):
        import threading

        assert first in ("refuse", "goaway")
        self.first = first
        self.seen: list[tuple[int, int, str]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns += 1
                n = self._conns
            threading.Thread(target=self._serve, args=(sock, n), daemon=True).start()

    def _serve(self, sock: socket.socket, n: int):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        bodies[ev.stream_id] = b""
                        with self._lock:
                            first = not self.seen
                            what = self.first if first else "answered"
                            self.seen.append((n, ev.stream_id, what))
                        if what == "refuse":
                            conn.reset_stream(ev.stream_id, error_code=h2.errors.ErrorCodes.REFUSED_STREAM)
                            bodies.pop(ev.stream_id)
                        elif what == "goaway":
                            conn.close_connection(error_code=0, last_stream_id=0)
                            sock.sendall(conn.data_to_send())
                            return
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                        if ev.stream_id in bodies:
                            bodies[ev.stream_id] += ev.data
                    elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id in bodies:
                        sid = ev.stream_id
                        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
                        conn.send_data(sid, bodies.pop(sid))
                        conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            sock.close()

    def close(self):
        self.listener.close()
