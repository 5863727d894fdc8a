"""Helpers for test_cluster.py: a real redis-server, gateway replicas in cluster mode, the
shipped HAProxy config extended to several replicas, an upstream that tells agents apart,
HS256 signing for the internal API, and a small keep-alive HTTP client for the tunnel API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import free_port, http_get, wait_for
from proxies import GatewayPorts, HAProxy, haproxy_pem, port_open, render_haproxy, wait_port_closed

MiB = 1024 * 1024


# ----------------------------------------------------------------------------------- Redis


class Redis:
    """redis-server from Debian on its own port and directory, no persistence."""

    def __init__(self, env, name: str = "redis", extra: tuple = ()):
        self.env = env
        self.name = name
        self.extra = [str(a) for a in extra]
        self.port = free_port()
        self.dir = env.tmp / name
        self.dir.mkdir(exist_ok=True)
        self.proc = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.starts += 1
        self.proc = self.env.spawn(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
             "--protected-mode", "no", *self.extra],
            f"{self.name}-{self.starts}")
        wait_for(lambda: self._ping(), timeout=10, what="redis PING")

    def _ping(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"redis-server exited:\n{self.proc.output()[-2000:]}")
        return self.cli("PING") == "PONG"

    def stop(self):
        """SIGTERM, as a service manager stops it; waits until the port is closed."""
        self.proc.stop(signal.SIGTERM)
        wait_port_closed(self.port)

    def cli(self, *args) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *[str(a) for a in args]],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def hgetall(self, key: str) -> dict:
        lines = self.cli("HGETALL", key).splitlines()
        return dict(zip(lines[0::2], lines[1::2]))

    def keys(self, pattern: str) -> list[str]:
        return sorted(x for x in self.cli("--scan", "--pattern", pattern).splitlines() if x)

    def commandstats(self) -> dict[str, int]:
        """{'hset': calls, ...} from INFO commandstats."""
        out = {}
        for m in re.finditer(r"^cmdstat_([a-z|_-]+):calls=(\d+)", self.cli("INFO", "commandstats"), re.M):
            out[m.group(1)] = int(m.group(2))
        return out


# --------------------------------------------------------------------------------- replicas


class Replica:
    """One gateway replica in cluster mode (cleartext agent port: HAProxy terminates TLS)."""

    def __init__(self, env, index: int, redis: Redis, secret_file: Path, extra: list[str],
                 internal_port: int | None = None):
        """`internal_port`: a crashed replica's, to start its successor at the same URL."""
        self.index = index
        self.name = f"replica{index}"
        self.internal_port = internal_port or free_port()
        self.internal_url = f"http://127.0.0.1:{self.internal_port}"
        args = ["--redis", redis.url,
                "--internal-listen", f"127.0.0.1:{self.internal_port}",
                "--internal-url", self.internal_url,
                "--internal-secret-file", str(secret_file)] + list(extra)
        self.gw = env.gateway(tls=False, cleartext=False, extra=args, name=self.name)
        wait_for(lambda: port_open(self.internal_port), timeout=10, what=f"{self.name} internal API")

    def __getattr__(self, item):  # port, admin_port, api_port, proc, agents(), metric(), ...
        return getattr(self.gw, item)

    def agent_names(self) -> set[str]:
        return {a["name"] for a in self.gw.agents()}

    def forwards(self, outcome: str = "ok") -> float:
        return self.gw.metric("agentgate_forwards_total", outcome=outcome)


def write_secret(env, name: str = "internal-secret") -> tuple[Path, bytes]:
    secret = hashlib.sha256(env.tmp.name.encode() + b"cluster").hexdigest().encode()
    path = env.tmp / name
    path.write_bytes(secret + b"\n")
    return path, secret


# --------------------------------------------------------------------------------- HAProxy


def render_haproxy_cluster(replicas: list[Replica], port: int, clear_port: int, certs: dict,
                           pem: Path) -> str:
    """The shipped deploy/haproxy/agentgate.cfg (cleartext to the gateways) rendered for the
    first replica by proxies.render_haproxy, then extended to all replicas: every `server`
    line is repeated once per replica with that replica's ports. The balancing algorithm is
    whatever the shipped file says (today nothing: HAProxy's default, roundrobin)."""
    first = replicas[0]
    text = render_haproxy("cleartext", GatewayPorts(first.port, first.admin_port, first.api_port),
                          port, clear_port, certs, pem)
    out = []
    n_servers = 0
    for line in text.splitlines():
        out.append(line)
        m = re.match(r"^(\s*)server (gateway1|api1) (.*)$", line)
        if m:
            n_servers += 1
            indent, name, rest = m.groups()
            for r in replicas[1:]:
                new = rest.replace(f"127.0.0.1:{first.port}", f"127.0.0.1:{r.port}")
                new = new.replace(f"127.0.0.1:{first.api_port}", f"127.0.0.1:{r.api_port}")
                new = new.replace(f"port {first.admin_port}", f"port {r.admin_port}")
                out.append(f"{indent}server {name[:-1]}{r.index} {new}")
    assert n_servers == 4, f"expected 4 server lines in the shipped config, found {n_servers}"
    return "\n".join(out) + "\n"


def start_haproxy_cluster(env, replicas: list[Replica], name: str = "haproxy") -> HAProxy:
    port, clear = free_port(), free_port()
    pem = haproxy_pem(env.certs, env.tmp / f"{name}.pem")
    cfg = render_haproxy_cluster(replicas, port, clear, env.certs, pem)
    return HAProxy(env, cfg, port, clear, name=name)


# -------------------------------------------------------------------------------- upstream

_BLOCK = hashlib.sha256(b"agentgate-cluster").digest() * (MiB // 32)  # 1 MiB


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are separate writes: no 40 ms delayed-ACK stall

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        # Agents' upstream URLs are http://127.0.0.1:PORT/agent/NAME, so the path names the agent.
        parts = self.path.split("?")[0].split("/")
        if len(parts) >= 5 and parts[3] == "big":
            mib = int(parts[4])
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(mib * MiB))
            self.end_headers()
            for _ in range(mib):
                self.wfile.write(_BLOCK)
            return
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class AgentUpstream:
    """One HTTP/1.1 server for every agent; each agent's --upstream has its own path prefix."""

    def __init__(self):
        self.port = free_port()
        self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        self.srv.daemon_threads = True
        self.srv.request_queue_size = 256
        self.t = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.t.start()

    def url_for(self, agent: str) -> str:
        return f"http://127.0.0.1:{self.port}/agent/{agent}"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def expected_sha256(mib: int) -> str:
    h = hashlib.sha256()
    for _ in range(mib):
        h.update(_BLOCK)
    return h.hexdigest()


# ---------------------------------------------------------------------------- internal JWT
# The internal API's tokens, minted with PyJWT (a client we did not write) from the wire format
# in docs/cluster.md: HS256 over iss, aud (the target replica's internal URL), iat, exp, jti,
# htm (method), htu (path and query), agent, hd (the forwarded head's digest, "" otherwise).


def sign_call(secret: bytes, aud: str, method: str, path: str, agent: str = "", hd: str = "",
              iss: str = "http://e2e-test", iat: int | None = None, exp: int | None = None,
              jti: str | None = None) -> str:
    import jwt  # PyJWT

    now = int(time.time())
    iat = now if iat is None else iat
    claims = {"iss": iss, "aud": aud, "iat": iat, "exp": now + 5 if exp is None else exp,
              "jti": jti or os.urandom(16).hex(), "htm": method, "htu": path, "agent": agent,
              "hd": hd}
    return jwt.encode(claims, secret, algorithm="HS256")


UNBOUND_HEADERS = {"agentgate-internal-token", "host", "te", "connection", "keep-alive",
                   "proxy-connection", "transfer-encoding", "upgrade"}


def head_digest(headers: list[tuple[str, str]]) -> str:
    """SHA-256 over "name:value\n" for every header but the unbound ones, names sorted (values
    of one name in their order), as docs/cluster.md gives it."""
    h = hashlib.sha256()
    names = sorted({k.lower() for k, _ in headers} - UNBOUND_HEADERS)
    for name in names:
        for k, v in headers:
            if k.lower() == name:
                h.update(f"{name}:{v}\n".encode())
    return h.hexdigest()


def body_mac(secret: bytes, jti: str, body: bytes) -> str:
    """The agentgate-body-mac trailer: HMAC-SHA256(secret, "agentgate-body-v1\n" jti "\n" sha256(body))."""
    return hmac.new(secret, b"agentgate-body-v1\n" + jti.encode() + b"\n" + hashlib.sha256(body).digest(),
                    hashlib.sha256).hexdigest()


def internal_call(port: int, method: str, path: str, token: str | None, timeout: float = 15.0):
    headers = {} if token is None else {"agentgate-internal-token": token}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# --------------------------------------------------------------------------- tunnel API client


class ApiClient:
    """Keep-alive HTTP/1.1 connections to several replicas' tunnel APIs, one per thread."""

    def __init__(self, token: str, timeout: float = 20.0):
        self.token = token
        self.timeout = timeout
        self.local = threading.local()

    def _conn(self, port: int) -> http.client.HTTPConnection:
        conns = getattr(self.local, "conns", None)
        if conns is None:
            conns = self.local.conns = {}
        c = conns.get(port)
        if c is None:
            c = conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
        return c

    def _drop(self, port: int):
        c = self.local.conns.pop(port, None)
        if c is not None:
            c.close()

    def get(self, port: int, path: str) -> tuple[int, bytes]:
        """GET on a replica's API; a dead keep-alive connection is retried once on a new one
        (only for failures before a response head arrived)."""
        for attempt in (0, 1):
            c = self._conn(port)
            try:
                c.request("GET", path, headers={"authorization": f"Bearer {self.token}"})
                r = c.getresponse()
                body = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self._drop(port)
                return r.status, body
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop(port)
                if attempt == 1:
                    raise e
        raise AssertionError("unreachable")

    def echo(self, port: int, agent: str, tag: str) -> tuple[int, bytes]:
        return self.get(port, f"/agents/{agent}/proxy/echo?tag={tag}")

    def download(self, port: int, agent: str, mib: int, timeout: float = 120.0,
                 host: str = "127.0.0.1"):
        """Streams /big/N from `agent`'s upstream; returns (status, bytes, sha256, seconds)."""
        t0 = time.monotonic()
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            c.request("GET", f"/agents/{agent}/proxy/big/{mib}",
                      headers={"authorization": f"Bearer {self.token}"})
            r = c.getresponse()
            h = hashlib.sha256()
            n = 0
            while True:
                chunk = r.read(MiB)
                if not chunk:
                    break
                n += len(chunk)
                h.update(chunk)
            return r.status, n, h.hexdigest(), time.monotonic() - t0
        finally:
            c.close()


def echo_ok(status: int, body: bytes, agent: str, tag: str) -> bool:
    """The response came from `agent`'s upstream (its path prefix) for this request."""
    if status != 200:
        return False
    try:
        path = json.loads(body)["path"]
    except (ValueError, KeyError):
        return False
    return path == f"/agent/{agent}/echo?tag={tag}"


def cluster_agents(admin: str) -> list[dict]:
    status, _, body = http_get(admin + "/api/v1/agents?scope=cluster", timeout=15)
    assert status == 200, (status, body[:500])
    return json.loads(body)


class LoadThreads:
    """Background threads that each call `one(i)` over and over (i: the thread's next
    number) until stopped, counting successes and keeping every failure with its time.
    Subclasses say what one request is; `with` starts and stops the threads."""

    def __init__(self, threads: int = 4):
        self.stop_ev = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True)
                        for i in range(threads)]

    def one(self, i: int) -> tuple[bool, str]:
        raise NotImplementedError

    def _run(self, offset: int, step: int):
        i = offset
        while not self.stop_ev.is_set():
            ok, what = self.one(i)
            i += step
            with self.lock:
                if ok:
                    self.ok += 1
                else:
                    self.failures.append(f"{time.strftime('%H:%M:%S')} {what}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_ev.set()
        for t in self.threads:
            t.join(timeout=30)
