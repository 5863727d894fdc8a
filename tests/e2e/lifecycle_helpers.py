"""Helpers for test_lifecycle.py: an HTTP upstream that streams a known byte pattern, a client
that downloads through the tunnel API and checks every byte, a TCP proxy that can swallow
direct-gRPC connections, an HTTP/1.1-only TLS server, and small launchers for tinyproxy and
nginx with throw-away configurations.

Nothing here is agentgate code: the Python standard library, tinyproxy and nginx.
"""

from __future__ import annotations

import datetime as dt
import http.client
import re
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import free_port, wait_for

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# The byte at offset i of every /bytes/N body is i % 251 (a prime, so chunk boundaries never
# line up with the period and a dropped or repeated chunk shows).
PERIOD = 251
CHUNK = 64 * 1024
_PATTERN = bytes(range(PERIOD)) * (CHUNK // PERIOD + 2)


def pattern_at(offset: int, size: int) -> bytes:
    """`size` (<= CHUNK) bytes of the pattern starting at `offset`."""
    start = offset % PERIOD
    return _PATTERN[start:start + size]


def plain(text: str) -> str:
    """Log text without ANSI colour codes."""
    return ANSI.sub("", text)


_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z\s")


def log_events(text: str, message: str) -> list[tuple[float, str]]:
    """(unix time, line) of every log line containing `message`, from agentgate's text log."""
    out = []
    for line in plain(text).splitlines():
        if message not in line:
            continue
        m = _TS.match(line)
        if not m:
            continue
        ts = m.group(1)
        if "." in ts:
            head, frac = ts.split(".")
            ts = f"{head}.{frac[:6]}"
            t = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%f")
        else:
            t = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S")
        out.append((t.replace(tzinfo=dt.timezone.utc).timestamp(), line))
    return out


NO_PROXY_ENV = {"HTTPS_PROXY": "", "HTTP_PROXY": "", "https_proxy": "", "http_proxy": "",
                "NO_PROXY": "", "no_proxy": ""}


# ---------------------------------------------------------------------------------------------
# The upstream.


def pump_bytes(src: socket.socket, dst: socket.socket, delay: float = 0.0):
    """Copies src to dst until either side ends, holding each chunk `delay` seconds (a slow
    link), then shuts both down."""
    try:
        while True:
            b = src.recv(262144)
            if not b:
                break
            if delay:
                time.sleep(delay)
            dst.sendall(b)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _PatternHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        self.server.requests += 1
        if self.path.startswith("/bytes/"):
            n = int(self.path[len("/bytes/"):].split("?")[0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent = 0
            try:
                while sent < n:
                    size = min(CHUNK, n - sent)
                    self.wfile.write(pattern_at(sent, size))
                    sent += size
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            return
        if self.path.startswith("/sleep/"):
            time.sleep(float(self.path[len("/sleep/"):].split("?")[0]))
        body = b"hello from the lifecycle upstream\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


    def do_HEAD(self):  # noqa: N802
        """The head GET /bytes/N would have."""
        self.server.requests += 1
        n = int(self.path[len("/bytes/"):].split("?")[0]) if self.path.startswith("/bytes/") else 0
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()

    def do_POST(self):  # noqa: N802
        """Reads the whole body (Content-Length), then answers with its length."""
        self.server.requests += 1
        left = int(self.headers.get("Content-Length") or 0)
        got = 0
        while left:
            b = self.rfile.read(min(CHUNK, left))
            if not b:
                self.close_connection = True
                return
            got += len(b)
            left -= len(b)
        if self.path.startswith("/sleep/"):
            time.sleep(float(self.path[len("/sleep/"):].split("?")[0]))
        body = f"{got}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class PatternServer:
    """ThreadingHTTPServer on 127.0.0.1: GET /bytes/N streams N pattern bytes (HEAD: its head);
    GET /sleep/S
    answers after S seconds; POST reads the body and answers its length (after S seconds to
    /sleep/S); GET / says hello."""

    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _PatternHandler)
        self.httpd.daemon_threads = True
        self.httpd.requests = 0
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------------------------
# The downloading client.

class Download:
    """One GET through the tunnel API, read at an optional pace, every byte checked.

    Fields after run(): status, got (body bytes), intact (all N bytes, pattern right), error,
    t_start, t_head, t_first_byte, t_end (time.monotonic())."""

    def __init__(self, api_port: int, path: str, token: str, expect: int,
                 rate: float | None = None, timeout: float = 60.0):
        self.api_port, self.path, self.token = api_port, path, token
        self.expect, self.rate, self.timeout = expect, rate, timeout
        self.status = None
        self.got = 0
        self.bad_offset = None
        self.error = None
        self.t_start = self.t_head = self.t_first_byte = self.t_end = None
        self.thread = None

    @property
    def intact(self) -> bool:
        return self.status == 200 and self.got == self.expect and self.bad_offset is None \
            and self.error is None

    @property
    def started_body(self) -> bool:
        return self.t_first_byte is not None

    def run(self):
        self.t_start = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=self.timeout)
        try:
            conn.request("GET", self.path, headers={"Authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            self.status = resp.status
            self.t_head = time.monotonic()
            if resp.status != 200:
                resp.read()
                return
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                if self.t_first_byte is None:
                    self.t_first_byte = time.monotonic()
                if self.bad_offset is None and chunk != pattern_at(self.got, len(chunk)):
                    self.bad_offset = self.got
                self.got += len(chunk)
                if self.rate:
                    ahead = self.got / self.rate - (time.monotonic() - self.t_first_byte)
                    if ahead > 0:
                        time.sleep(ahead)
        except Exception as e:  # noqa: BLE001 - recorded and judged by the test
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.t_end = time.monotonic()
            conn.close()

    def start(self) -> "Download":
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"download {self.path} still running after {timeout}s"

    def describe(self) -> str:
        return (f"status={self.status} got={self.got}/{self.expect} bad_offset={self.bad_offset} "
                f"error={self.error}")


def api_get(api_port: int, path: str, token: str, timeout: float = 10.0):
    """(status, body) of a GET through the tunnel API (no proxy from the environment)."""
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def get_and_leave(api_port: int, path: str, token: str, after: float = 0.5):
    """A GET through the tunnel API whose caller hangs up `after` seconds, before any answer
    (the path must take longer than that to answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=after)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        conn.getresponse()
        raise AssertionError(f"{path} was answered within {after} s")
    except TimeoutError:
        pass
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# A TCP proxy that forwards HTTP/1.1 (WebSocket) connections and, while `swallow_h2` is set,
# accepts direct HTTP/2 connections (the h2c preface) and never answers them.

H2_PREFACE_START = b"PRI "


class SniffProxy:
    def __init__(self, target_port: int, swallow_h2: bool = True):
        self.target = ("127.0.0.1", target_port)
        self.swallow_h2 = swallow_h2
        self.h2_swallowed = 0
        self.h2_forwarded = 0
        self.h1_forwarded = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stopped = False
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(128)
        self.port = self.lsock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _track(self, s: socket.socket):
        with self._lock:
            self._socks.append(s)

    def _accept(self):
        while not self._stopped:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            self._track(c)
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c: socket.socket):
        try:
            first = b""
            while len(first) < len(H2_PREFACE_START):
                b = c.recv(64)
                if not b:
                    c.close()
                    return
                first += b
            is_h2 = first.startswith(H2_PREFACE_START)
            if is_h2 and self.swallow_h2:
                with self._lock:
                    self.h2_swallowed += 1
                # Accept everything, answer nothing, until the client gives up.
                while c.recv(65536):
                    pass
                c.close()
                return
            with self._lock:
                if is_h2:
                    self.h2_forwarded += 1
                else:
                    self.h1_forwarded += 1
            u = socket.create_connection(self.target)
            self._track(u)
            u.sendall(first)
            threading.Thread(target=pump_bytes, args=(u, c), daemon=True).start()
            pump_bytes(c, u)
        except OSError:
            c.close()


    def close(self):
        self._stopped = True
        self.lsock.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------
# A TLS server that offers only http/1.1 by ALPN and answers HTTP/1.1 (never an upgrade).

class _H1Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def setup(self):
        super().setup()
        try:
            self.connection.do_handshake()
            self.server.handshakes.append(self.connection.selected_alpn_protocol())
        except (ssl.SSLError, OSError) as e:
            self.server.handshake_errors.append(str(e))
            raise

    def do_GET(self):  # noqa: N802
        self.server.requests.append((self.path, dict(self.headers)))
        body = b"plain HTTP/1.1 here\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class H1TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.handshakes: list = []
        self.handshake_errors: list = []
        self.requests: list = []
        super().__init__(("127.0.0.1", 0), _H1Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def get_request(self):
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        pass

    def close(self):
        self.shutdown()
        self.server_close()


# ---------------------------------------------------------------------------------------------
# tinyproxy and nginx with minimal configurations.

class TinyProxy:
    """tinyproxy in the foreground on 127.0.0.1 with its own config, log and pid file."""

    def __init__(self, env, connect_ports: list[int], basic_auth: tuple[str, str] | None = None,
                 name: str = "tinyproxy"):
        self.port = free_port()
        d = env.tmp / name
        d.mkdir(exist_ok=True)
        self.log_path = d / "tinyproxy.log"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 600",
            "Allow 127.0.0.1",
            f'LogFile "{self.log_path}"',
            "LogLevel Info",
            f'PidFile "{d / "tinyproxy.pid"}"',
            "MaxClients 200",
        ]
        lines += [f"ConnectPort {p}" for p in connect_ports]
        if basic_auth:
            lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
        conf = d / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = env.spawn(["tinyproxy", "-d", "-c", conf], name)
        wait_for(self._listening, timeout=10, what="tinyproxy listening")

    def _listening(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"tinyproxy exited:\n{self.proc.output()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connect_requests(self, target: str) -> list[str]:
        """Log lines of CONNECT requests to `target` (host:port)."""
        return [ln for ln in self.log().splitlines() if f"CONNECT {target} " in ln and "Request" in ln]


def proxy_connect_status(proxy_port: int, target: str, credentials: str | None) -> str:
    """The status line an HTTP proxy answers to CONNECT `target` (optionally with Basic
    credentials 'user:pass'): an independent look at what the agent should report."""
    import base64
    req = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if credentials:
        req += f"Proxy-Authorization: Basic {base64.b64encode(credentials.encode()).decode()}\r\n"
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=5) as s:
        s.sendall((req + "\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            b = s.recv(1024)
            if not b:
                break
            head += b
    return head.split(b"\r\n")[0].decode(errors="replace").strip()


def start_nginx_h1_tls_front(env, cert: Path, key: Path, backend_port: int, name: str = "nginx"):
    """nginx with TLS and NO http2 on a fresh port, passing WebSocket upgrades to
    127.0.0.1:backend_port. Returns (proc, port)."""
    port = free_port()
    d = env.tmp / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/logs/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
""")
    proc = env.spawn(["nginx", "-p", d, "-c", conf, "-e", d / "logs" / "error.log"], name)

    def up():
        if not proc.alive():
            raise AssertionError(f"nginx exited:\n{proc.output()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(up, timeout=10, what="nginx listening")
    return proc, port

