"""Helpers for test_proxies.py: the SHIPPED nginx and HAProxy configs rendered for one test,
the proxies started and stopped as real processes, and small upstreams for agents to reach.

Rendering substitutes only addresses, ports, file paths and certificate names (each
substitution must match, so a reshaped shipped file fails loudly instead of silently testing
something else). The only other changes are the explicit test-time overrides a test asks for
(`timeouts=`), applied on top of the shipped text.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import ROOT, free_port, wait_for

DEPLOY = ROOT / "deploy"
NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY_BIN = shutil.which("haproxy") or "/usr/sbin/haproxy"

# The example host/ports/paths used in the shipped files.
SHIPPED_AGENT_PORT = "8150"
SHIPPED_ADMIN_PORT = "8151"
SHIPPED_API_PORT = "8154"
SHIPPED_GATEWAY_NAME = "gateway.internal"


def sub(text: str, pattern: str, repl, what: str) -> str:
    new, n = re.subn(pattern, repl, text, flags=re.M)
    assert n >= 1, f"the shipped config no longer contains {what} (pattern {pattern!r})"
    return new


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port_closed(port: int, timeout: float = 10.0):
    wait_for(lambda: not port_open(port), timeout=timeout, what=f"port {port} closed")


def wait_listening(proc, ports: list[int], what: str, diagnostics=lambda: "", timeout: float = 10.0):
    """Waits until every port accepts; fails at once (with the logs) if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"{what} exited:\n{proc.output()[-3000:]}\n{diagnostics()[-3000:]}")
        if all(port_open(p) for p in ports):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not listening on {ports} after {timeout}s:\n{proc.output()[-3000:]}")


class GatewayPorts:
    """Where the proxy should send traffic: the agent port (TLS or cleartext), admin, API."""

    def __init__(self, agent: int, admin: int, api: int):
        self.agent, self.admin, self.api = agent, admin, api


# ----------------------------------------------------------------------------------- nginx


def render_nginx(variant: str, gw: GatewayPorts, logdir: Path, port: int, certs: dict,
                 timeouts: str | None = None) -> str:
    """deploy/nginx/agentgate.conf (variant "cleartext") or agentgate-tls-upstream.conf ("tls")
    with the test's ports, certificates and log directory. `timeouts` (e.g. "3s") overrides the
    stream idle timeouts on top of the shipped values."""
    name = {"cleartext": "agentgate.conf", "tls": "agentgate-tls-upstream.conf"}[variant]
    text = (DEPLOY / "nginx" / name).read_text()
    text = sub(text, r"^(\s*)listen 443 ssl http2;", rf"\1listen 127.0.0.1:{port} ssl http2;",
               "the TLS+HTTP/2 listen line")
    text = sub(text, r"/etc/ssl/agentgate/fullchain\.pem", str(certs["cert"]), "ssl_certificate")
    text = sub(text, r"/etc/ssl/agentgate/privkey\.pem", str(certs["key"]), "ssl_certificate_key")
    text = sub(text, r"/var/log/nginx/", f"{logdir}/", "log paths")
    text = sub(text, rf"\b[\d.]+:{SHIPPED_AGENT_PORT}\b", f"127.0.0.1:{gw.agent}", "the agent port upstream")
    text = sub(text, rf"\b[\d.]+:{SHIPPED_API_PORT}\b", f"127.0.0.1:{gw.api}", "the API upstream")
    if variant == "tls":
        text = sub(text, r"/etc/ssl/agentgate/gateway-ca\.pem", str(certs["ca"]), "the gateway CA")
        text = sub(text, re.escape(SHIPPED_GATEWAY_NAME), "gateway.test", "the gateway TLS name")
    if timeouts:
        text = sub(text,
                   r"^(\s*)(grpc_read_timeout|grpc_send_timeout|client_body_timeout|proxy_read_timeout|"
                   r"proxy_send_timeout|send_timeout)\s+[^;]+;",
                   rf"\1\2 {timeouts};", "the stream timeouts")
    return text


def nginx_location(rendered: str, prefix: str) -> str:
    """The text of one `location PREFIX { ... }` block of a rendered config (no nested braces)."""
    m = re.search(r"^\s*location " + re.escape(prefix) + r" \{.*?^\s*\}\n", rendered, re.M | re.S)
    assert m, f"no location {prefix} in the shipped config"
    return m.group(0)


class Nginx:
    """nginx with its own prefix, pid, error log and temp paths; the shipped file is included
    by a minimal, test-only main config."""

    def __init__(self, env, server_conf: str, port: int, name: str = "nginx", extra: str = ""):
        self.env = env
        self.name = name
        self.port = port
        self.dir = env.tmp / name
        self.dir.mkdir(exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.server_file = self.dir / "agentgate.conf"
        self.server_file.write_text(server_conf)
        user = "user root;\n" if os.geteuid() == 0 else ""
        d = self.dir
        self.main_file = d / "nginx.conf"
        self.main_file.write_text(f"""# test-only wrapper around the shipped server block
{user}daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    access_log off;
    include {self.server_file};
{extra}
}}
""")
        self.proc = None
        self.start()

    def start(self):
        self.proc = self.env.spawn([NGINX_BIN, "-p", f"{self.dir}/", "-c", self.main_file,
                                    "-e", self.dir / "error.log"], self.name)
        wait_listening(self.proc, [self.port], "nginx", self.error_log)

    def stop(self):
        self.proc.stop()
        wait_port_closed(self.port)

    def restart(self):
        self.stop()
        self.start()

    def reload(self):
        """`nginx -s reload`: new workers with the config, old ones finish gracefully."""
        self.proc.send_signal(signal.SIGHUP)

    def error_log(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def access_log(self) -> str:
        p = self.dir / "logs" / "agentgate-access.log"
        return p.read_text(errors="replace") if p.exists() else ""


# --------------------------------------------------------------------------------- HAProxy


def render_haproxy(variant: str, gw: GatewayPorts, port: int, clear_port: int, certs: dict,
                   pem: Path, timeouts: str | None = None) -> str:
    """deploy/haproxy/agentgate.cfg ("cleartext") or agentgate-tls-upstream.cfg ("tls") with the
    test's ports and certificates. `timeouts` overrides timeout client/server/tunnel."""
    name = {"cleartext": "agentgate.cfg", "tls": "agentgate-tls-upstream.cfg"}[variant]
    text = (DEPLOY / "haproxy" / name).read_text()
    text = sub(text, r"^(\s*)bind :443 ssl crt /etc/haproxy/certs/agentgate\.pem",
               rf"\1bind 127.0.0.1:{port} ssl crt {pem}", "the TLS bind")
    text = sub(text, r"^(\s*)bind :80\b", rf"\1bind 127.0.0.1:{clear_port}", "the cleartext bind")
    text = sub(text, rf"\b[\d.]+:{SHIPPED_AGENT_PORT}\b", f"127.0.0.1:{gw.agent}", "the agent port server")
    text = sub(text, rf"\b[\d.]+:{SHIPPED_API_PORT}\b", f"127.0.0.1:{gw.api}", "the API server")
    text = sub(text, rf"\bport {SHIPPED_ADMIN_PORT}\b", f"port {gw.admin}", "the health-check port")
    if variant == "tls":
        text = sub(text, r"/etc/haproxy/agentgate-gateway-ca\.pem", str(certs["ca"]), "the gateway CA")
        text = sub(text, re.escape(SHIPPED_GATEWAY_NAME), "gateway.test", "the gateway TLS name")
    if timeouts:
        text = sub(text, r"^(\s*)timeout (client|server|tunnel)\s+\S+", rf"\1timeout \2 {timeouts}",
                   "timeout client/server/tunnel")
    return text


class HAProxy:
    """haproxy in master-worker mode (-W, as under systemd) in the foreground (-db); its log
    (stdout) lands in the process log."""

    def __init__(self, env, cfg: str, port: int, clear_port: int, name: str = "haproxy"):
        self.env = env
        self.name = name
        self.port, self.clear_port = port, clear_port
        self.file = env.tmp / f"{name}.cfg"
        self.file.write_text(cfg)
        self.proc = None
        self.start()

    def start(self):
        self.proc = self.env.spawn([HAPROXY_BIN, "-W", "-db", "-f", self.file], self.name)
        wait_listening(self.proc, [self.port, self.clear_port], "haproxy")

    def stop(self):
        self.proc.stop()
        wait_port_closed(self.port)

    def restart(self):
        self.stop()
        self.start()

    def reload(self):
        """Master-worker reload (what `systemctl reload haproxy` does): a new worker takes the
        listeners, the old one soft-stops."""
        self.proc.send_signal(signal.SIGUSR2)

    def access_log(self) -> str:
        return self.proc.output()


def haproxy_pem(certs: dict, path: Path) -> Path:
    path.write_text(Path(certs["cert"]).read_text() + Path(certs["key"]).read_text())
    return path


# ----------------------------------------------------------------------------------- Caddy

CADDY_BIN = shutil.which("caddy") or "/usr/bin/caddy"


def render_caddy(gw: GatewayPorts, tls_port: int, clear_port: int, certs: dict) -> str:
    """deploy/caddy/Caddyfile with the test's ports and certificate; the admin endpoint off
    (several Caddy processes would share its default port)."""
    text = (DEPLOY / "caddy" / "Caddyfile").read_text()
    text = sub(text, r"^\{\n", "{\n\tadmin off\n", "the global options block")
    text = sub(text, r"^agents\.example\.com \{", f"https://localhost:{tls_port} {{", "the TLS site")
    text = sub(text, r"^http://:8080 \{", f"http://:{clear_port} {{", "the cleartext site")
    text = sub(text, r"/etc/caddy/agentgate/fullchain\.pem", str(certs["cert"]), "the certificate")
    text = sub(text, r"/etc/caddy/agentgate/privkey\.pem", str(certs["key"]), "the key")
    text = sub(text, rf"127\.0\.0\.1:{SHIPPED_AGENT_PORT}\b", f"127.0.0.1:{gw.agent}", "the agent port")
    text = sub(text, rf"127\.0\.0\.1:{SHIPPED_API_PORT}\b", f"127.0.0.1:{gw.api}", "the API port")
    return text


class Caddy:
    """`caddy run` on a rendered Caddyfile, with its data and config dirs in the test's."""

    def __init__(self, env, caddyfile: str, port: int, clear_port: int, name: str = "caddy"):
        self.env, self.name, self.port, self.clear_port = env, name, port, clear_port
        self.dir = env.tmp / name
        self.dir.mkdir(exist_ok=True)
        self.file = self.dir / "Caddyfile"
        self.file.write_text(caddyfile)
        home = {"HOME": str(self.dir), "XDG_DATA_HOME": str(self.dir / "data"),
                "XDG_CONFIG_HOME": str(self.dir / "config")}
        self.proc = env.spawn([CADDY_BIN, "run", "--config", self.file, "--adapter", "caddyfile"],
                              name, env=home)
        wait_listening(self.proc, [port, clear_port], "caddy")

    def access_log(self) -> str:
        return self.proc.output()


# HAProxy's address towards the gateway in the TCP-mode tests: the gateway reads PROXY
# headers from it only (proxy_protocol_from), while the tests' direct clients use 127.0.0.1.
HAPROXY_SOURCE = "127.0.0.2"


def render_haproxy_tcp(gw: GatewayPorts, port: int, api_port: int,
                       proxy_header: str = "send-proxy-v2") -> str:
    """deploy/haproxy/agentgate-tcp-passthrough.cfg with the test's ports, HAProxy connecting
    to the agent port from HAPROXY_SOURCE; `proxy_header` swaps the shipped `send-proxy-v2`
    (for `send-proxy`, version 1)."""
    text = (DEPLOY / "haproxy" / "agentgate-tcp-passthrough.cfg").read_text()
    text = sub(text, r"^(\s*)bind :443$", rf"\1bind 127.0.0.1:{port}", "the agents' bind")
    text = sub(text, r"^(\s*)bind :8443$", rf"\1bind 127.0.0.1:{api_port}", "the API bind")
    text = sub(text, rf"^(\s*server gateway1 )127\.0\.0\.1:{SHIPPED_AGENT_PORT}(.*) send-proxy-v2(.*)$",
               rf"\g<1>127.0.0.1:{gw.agent}\2 {proxy_header}\3 source {HAPROXY_SOURCE}",
               "the agent port server with send-proxy-v2")
    text = sub(text, rf"^(\s*server gateway1 )127\.0\.0\.1:{SHIPPED_API_PORT}(.*) send-proxy-v2(.*)$",
               rf"\g<1>127.0.0.1:{gw.api}\2 {proxy_header}\3 source {HAPROXY_SOURCE}",
               "the API server with send-proxy-v2")
    # The health checks go to the admin port's /readyz.
    text = sub(text, r" check port 8151 ", f" check port {gw.admin} ", "the health checks' admin port")
    return text


# ------------------------------------------------------------------------------- upstreams

BLOCK = hashlib.sha256(b"agentgate").digest() * (1024 * 1024 // 32)  # 1 MiB, deterministic


def expected_digest(mib: int) -> str:
    h = hashlib.sha256()
    for _ in range(mib):
        h.update(BLOCK)
    return h.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        if self.path.startswith("/big/"):
            mib = int(self.path.split("/")[2])
            self.send_response(200)
            self.send_header("content-type", "application/octet-stream")
            self.send_header("content-length", str(mib * len(BLOCK)))
            self.end_headers()
            for _ in range(mib):
                self.wfile.write(BLOCK)
            return
        body = json.dumps({
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "server": self.server.tag,
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HttpUpstream:
    """An HTTP/1.1 server in a thread: /big/N streams N MiB, anything else echoes as JSON
    (or whatever `handler` does)."""

    def __init__(self, tag: str = "upstream", handler=None):
        self.port = free_port()
        self.srv = ThreadingHTTPServer(("127.0.0.1", self.port), handler or _Handler)
        self.srv.daemon_threads = True
        self.srv.tag = tag
        self.t = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.t.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


UPSTREAM_HEALTH_SERVICE = "agentgate.e2e.upstream"


class GrpcUpstream:
    """A grpcio server with the standard health service; only it knows UPSTREAM_HEALTH_SERVICE
    (the gateway's own health service answers NOT_FOUND for it)."""

    def __init__(self):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        h = health.HealthServicer()
        h.set(UPSTREAM_HEALTH_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(h, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.stop(0)


# ---------------------------------------------------------------------------------- clients


def tls_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def https_get(port: int, path: str, ca: Path, headers: dict | None = None, timeout: float = 15.0):
    """GET over TLS to localhost:port; returns (status, headers, body)."""
    c = http.client.HTTPSConnection("localhost", port, context=tls_context(ca), timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def https_download(port: int, path: str, ca: Path, headers: dict, timeout: float = 60.0):
    """Streams a download; returns (status, bytes, sha256 hex, seconds)."""
    t0 = time.monotonic()
    c = http.client.HTTPSConnection("localhost", port, context=tls_context(ca), timeout=timeout)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = r.read(1024 * 1024)
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
        return r.status, n, h.hexdigest(), time.monotonic() - t0
    finally:
        c.close()


def grpc_health_check(target: str, service: str, metadata: list, ca: Path | None, timeout: float = 10.0):
    """Health/Check through `target` (host:port); TLS with `ca` if given. Returns the status
    name, or raises grpc.RpcError."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    if ca is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        ch = grpc.secure_channel(target, creds)
    else:
        ch = grpc.insecure_channel(target)
    try:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata,
                          timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    finally:
        ch.close()
