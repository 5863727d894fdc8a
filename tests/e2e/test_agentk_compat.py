"""Existing agentk fleets connect unchanged: the gateway accepts what agentk's client stack sends.

The clients here are not ours:
- `peers/agentk_like/main.go`, built now from Debian's grpc-go 1.33 and nhooyr.io/websocket
  (GOPATH mode, offline), dialing each scheme the way agentk's `constructKasConnection` does:
  gzip on every call, the whole URL as `:authority` on ws/wss, no ALPN on wss, `dns:` with
  round_robin on grpc/grpcs, keepalive 55 s, agentk's User-Agent and upgrade headers;
- Python grpcio with gzip compression and `grpc.default_authority` set to a full `wss://` URL,
  through a websocat `ws-tunnel` bridge;
- a raw HTTP/2 client (`raw_h2.py`, on the `h2` library) for what no stack sends on purpose.

Each capability is checked end to end: health, AgentSession.Register and a Tunnel.Connect
stream that serves a real tunnelled request from the tunnel API.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

import ingress_clients as ic
import raw_h2
from conftest import BIN, ROOT, free_port, wait_for
from test_tunnel import api_request, start_agent, HttpUpstream

SCHEMES = ("grpc", "grpcs", "ws", "wss")
GO_SRC = Path(__file__).parent / "peers" / "agentk_like" / "main.go"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SERVING = b"\x08\x01"  # HealthCheckResponse{status: SERVING}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def agentk_like(tmp_path_factory) -> Path:
    """The Go client, built from Debian's packaged Go libraries with no network."""
    missing = [t for t in ("go", "protoc", "protoc-gen-go") if shutil.which(t) is None]
    assert not missing, (
        f"{missing} not installed: apt-get install golang-go golang-google-grpc-dev "
        "golang-nhooyr-websocket-dev golang-golang-x-net-dev golang-goprotobuf-dev protobuf-compiler"
    )
    gopath = tmp_path_factory.mktemp("gopath")
    pb = gopath / "src" / "agentgatepb"
    app = gopath / "src" / "agentk_like"
    pb.mkdir(parents=True)
    app.mkdir(parents=True)
    maps = ",".join(f"Magentgate/v1/{p}.proto=agentgatepb" for p in ("agent", "tunnel"))
    subprocess.run(["protoc", f"--go_out=plugins=grpc,paths=source_relative,{maps}:{pb}",
                    "agentgate/v1/agent.proto", "agentgate/v1/tunnel.proto"],
                   cwd=ROOT / "proto", check=True, capture_output=True)
    for f in (pb / "agentgate" / "v1").glob("*.go"):
        f.rename(pb / f.name)
    shutil.copy(GO_SRC, app / "main.go")
    out = gopath / "agentk_like"
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{gopath}:/usr/share/gocode",
               GOCACHE=str(gopath / "cache"), GOFLAGS="", GOPROXY="off", CGO_ENABLED="0")
    r = subprocess.run(["go", "build", "-o", str(out), "."], cwd=app, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"go build failed:\n{r.stdout}\n{r.stderr}"
    return out


def events(proc) -> list[dict]:
    out = []
    for line in proc.output().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def run_go(env, binary: Path, url: str, token_file: Path, *more, name="agentk-like"):
    args = [binary, "-url", url, "-token-file", token_file, "-ca", env.certs["ca"], *more]
    return env.spawn(args, name)


def expected_body(method: str, path: str, request_bytes: int) -> bytes:
    line = f"agentk-like served {method} {path} after {request_bytes} request bytes\n"
    return (line * 2000).encode()


# --------------------------------------------------------------------------------------------
# The agentk-like Go client on every scheme
# --------------------------------------------------------------------------------------------


def kas_token_file(env, name: str) -> Path:
    """A token as GitLab issues them to agentk, imported into the store unchanged: the agent
    keeps the token file it used with kas."""
    path = env.tmp / f"{name}.glagent-token"
    path.write_text("glagent-" + os.urandom(24).hex() + "\n")
    ic.run([BIN, "token", "create", "--name", name, "--tokens", env.tokens, "--from-file", path]).check_returncode()
    return path


@pytest.mark.parametrize("scheme", SCHEMES)
def test_agentk_like_client_registers_and_serves_tunnelled_requests(env, agentk_like, scheme):
    tok = kas_token_file(env, "edge-go")
    api = env.token("ci", kind="api", agents=["edge-go"])
    g = env.gateway()
    url = g.url(scheme, "/-/kubernetes-agent/")
    p = run_go(env, agentk_like, url, tok, "-tunnels", "2", "-header", "X-Kas-Extra: from-kas-header")
    rec = g.wait_agent("edge-go", transport=scheme)
    assert rec["version"] == "gitlab-agent/v17.0.0"

    # A download of 8 MiB to the agent: grpc-go answers the DATA with bandwidth-probe PINGs,
    # which the PING policy must not count as a flood.
    body = os.urandom(8 * MiB)
    status, headers, got = api_request(g, "POST", "/agents/edge-go/proxy/upload?kind=big", api, body=body)
    assert status == 200, got[:300]
    assert headers["x-served-by"] == "agentk-like"
    assert got == expected_body("POST", "/upload?kind=big", len(body))

    status, _, got = api_request(g, "GET", "/agents/edge-go/proxy/small", api)
    assert status == 200, got[:300]
    assert got == expected_body("GET", "/small", 0)

    assert p.wait(30) == 0, p.output()[-2000:]
    evs = events(p)
    steps = {e["step"]: e for e in evs}
    assert steps["health"]["status"] == "SERVING"
    assert steps["register"]["agent"] == "edge-go"
    assert steps["register"]["transport"] == scheme
    assert sum(1 for e in evs if e["step"] == "tunnel_done") == 2
    # The gateway decoded gzip-compressed calls on this transport, and punished no PING.
    assert g.metric("agentgate_rpcs_total", method=HEALTH_CHECK, status="OK", transport=scheme) >= 1
    assert g.metric("agentgate_rpcs_total", method="/agentgate.v1.Tunnel/Connect", status="OK",
                    transport=scheme) >= 2
    assert "too_many_pings" not in ic.plain(g.proc.output())


def test_agentk_like_round_robin_connections_share_one_token(env, agentk_like):
    """agentk's round_robin opens one connection per resolved address: several sessions of one
    agent from one process, each with its own parked tunnels, all served."""
    tok = env.token_file("edge-rr")
    api = env.token("ci", kind="api", agents=["edge-rr"])
    g = env.gateway()
    p = run_go(env, agentk_like, g.url("grpc"), tok, "-connections", "3", "-tunnels", "1")
    wait_for(lambda: len([a for a in g.agents() if a["name"] == "edge-rr"]) == 3, timeout=20,
             what="three sessions of edge-rr")
    conns = {a["connection_id"] for a in g.agents() if a["name"] == "edge-rr"}
    assert len(conns) == 3
    for i in range(3):
        status, _, got = api_request(g, "GET", f"/agents/edge-rr/proxy/rr/{i}", api)
        assert status == 200, got[:300]
        assert got == expected_body("GET", f"/rr/{i}", 0)
    assert p.wait(30) == 0, p.output()[-2000:]


def test_agentk_like_without_compression_and_with_wrong_token(env, agentk_like):
    """The same client with gzip off still works (older agents), and a wrong token gets one
    clear UNAUTHENTICATED sentence, not a transport error."""
    tok = env.token_file("edge-plain")
    bad = env.tmp / "bad.token"
    bad.write_text("not-a-real-token\n")
    g = env.gateway()
    p = run_go(env, agentk_like, g.url("wss", "/"), tok, "-compressor", "", name="plain")
    assert p.wait(30) == 0, p.output()[-2000:]
    assert {e["step"] for e in events(p)} >= {"health", "register", "done"}
    p = run_go(env, agentk_like, g.url("wss", "/"), bad, name="bad-token")
    assert p.wait(30) == 1
    reg = [e for e in events(p) if e["step"] == "register"][0]
    assert reg["code"] == "Unauthenticated", reg
    assert "invalid agent token" in reg["error"], reg


# --------------------------------------------------------------------------------------------
# Python grpcio: gzip, and a whole URL as :authority through a ws-tunnel bridge
# --------------------------------------------------------------------------------------------


def tunnel_stubs(stubs):
    import importlib

    return (importlib.import_module("agentgate.v1.tunnel_pb2"),
            importlib.import_module("agentgate.v1.tunnel_pb2_grpc"))


def serve_one_tunnel(ch, stubs, token: str, result: dict):
    """A grpcio agent on one Tunnel.Connect stream, compressing what it sends: parks, answers
    the request it gets with an echo of it, and returns when the gateway ends the stream."""
    tunnel_pb2, tunnel_pb2_grpc = tunnel_stubs(stubs)
    outbox: queue.Queue = queue.Queue()

    def requests():
        yield tunnel_pb2.AgentMessage(descriptor=tunnel_pb2.Descriptor(
            instance_id="grpcio-agent", http_upstreams=["default"]))
        while True:
            m = outbox.get()
            if m is None:
                return
            yield m

    call = tunnel_pb2_grpc.TunnelStub(ch).Connect(
        requests(), metadata=[("authorization", f"Bearer {token}")],
        compression=grpc.Compression.Gzip)
    head, received = None, b""
    try:
        for msg in call:
            kind = msg.WhichOneof("msg")
            if kind == "heartbeat":
                outbox.put(tunnel_pb2.AgentMessage(heartbeat=msg.heartbeat))
            elif kind == "request_head":
                head = msg.request_head
            elif kind == "chunk":
                received += msg.chunk.data
            elif kind == "end_of_request":
                text = f"grpcio served {head.method} {head.path_and_query} {len(received)}\n" * 500
                outbox.put(tunnel_pb2.AgentMessage(response_head=tunnel_pb2.ResponseHead(
                    status=201, headers=[tunnel_pb2.Header(name="x-agent", value=b"grpcio")])))
                data = text.encode()
                for off in range(0, len(data), 16384):
                    outbox.put(tunnel_pb2.AgentMessage(chunk=tunnel_pb2.Chunk(data=data[off:off + 16384])))
                outbox.put(tunnel_pb2.AgentMessage(trailer=tunnel_pb2.Trailer()))
        result["ok"] = True
    except grpc.RpcError as e:
        result["error"] = f"{e.code()}: {e.details()}"
    finally:
        outbox.put(None)
        result["received"] = received


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_grpcio_gzip_with_url_authority_through_ws_tunnel_bridge(env, scheme):
    stubs = ic.agentgate_stubs(env.tmp / "stubs")
    agent_pb2, agent_pb2_grpc = stubs
    token = env.token("edge-py")
    api = env.token("ci", kind="api", agents=["edge-py"])
    g = env.gateway()
    ws_url = g.url(scheme, "/-/kubernetes-agent/")
    local = free_port()
    bridge = ic.websocat_bridge_args(local, ws_url)
    if scheme == "wss":
        bridge.insert(1, "--insecure")  # websocat has no CA option; the gateway's TLS is what we test elsewhere
    env.spawn(bridge, "websocat")
    wait_for(lambda: ic.connect(local).close() is None, what="websocat listening")
    ch = grpc.insecure_channel(f"127.0.0.1:{local}", options=ic.CHANNEL_OPTIONS + [
        ("grpc.default_authority", "wss://kas.example.com/-/kubernetes-agent/"),
        ("grpc.default_compression_algorithm", grpc.Compression.Gzip),
    ])
    # Health and Register, both gzip-compressed.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10,
                                                compression=grpc.Compression.Gzip)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    md = [("authorization", f"Bearer {token}")]
    session = agent_pb2_grpc.AgentSessionStub(ch).Register(
        agent_pb2.RegisterRequest(instance_id="py-1", version="grpcio", hostname="pytest"),
        metadata=md, compression=grpc.Compression.Gzip)
    first = next(session)
    assert first.registered.agent_name == "edge-py"
    assert first.registered.transport == scheme

    result: dict = {}
    t = threading.Thread(target=serve_one_tunnel, args=(ch, stubs, token, result), daemon=True)
    t.start()
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, what="grpcio tunnel parked")
    body = os.urandom(300 * 1024)
    status, headers, got = api_request(g, "PUT", "/agents/edge-py/proxy/put/it", api, body=body)
    assert status == 201, got[:300]
    assert headers["x-agent"] == "grpcio"
    assert got == f"grpcio served PUT /put/it {len(body)}\n".encode() * 500
    t.join(10)
    assert result.get("ok"), result
    assert result["received"] == body
    session.cancel()
    ch.close()


# --------------------------------------------------------------------------------------------
# Bad input: unknown encodings, corrupt gzip, odd :authority values
# --------------------------------------------------------------------------------------------


def gateway_with_steady_agent(env, **kw):
    """A gateway with one of our own agents and an HTTP upstream behind it, to show that
    refusals harm no one else. Returns (gateway, API token)."""
    api = env.token("ci-steady", kind="api", agents=["steady"])
    tok = env.token_file("steady")
    g = env.gateway(**kw)
    up = HttpUpstream(env)
    start_agent(env, g, "grpc", "steady", upstreams=[up.url], token_file=tok)
    g.steady_upstream = up
    return g, api


def assert_steady_serves(g, api):
    status, _, body = api_request(g, "GET", "/agents/steady/proxy/download?size=1000", api)
    assert status == 200 and len(body) == 1000, (status, body[:200])


def test_unknown_encoding_is_unimplemented_naming_what_is_accepted(env):
    g, api = gateway_with_steady_agent(env, tls=False)
    # grpcio's deflate: a real client sending an encoding the gateway does not decode.
    ch = ic.h2c_channel(g.port)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5,
                                             compression=grpc.Compression.Deflate)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "gzip" in e.value.details() and "deflate" in e.value.details(), e.value.details()
    # The same connection still works uncompressed.
    assert ic.health_check(ch) == "SERVING"
    # And on the wire: the status (in trailers after the headers), with grpc-accept-encoding.
    c = raw_h2.RawH2(g.port)
    a = c.wait(c.request(HEALTH_CHECK, [("grpc-encoding", "br")], raw_h2.grpc_frame(b"")))
    assert a.grpc_status == "12", a
    assert "gzip" in a.headers.get("grpc-accept-encoding", ""), a
    c.close()
    assert g.metric("agentgate_connections_rejected_total", reason="unsupported_encoding") >= 2
    assert "agent call refused: agentgate: request messages are compressed with" in ic.plain(g.proc.output())
    assert_steady_serves(g, api)


def test_corrupt_gzip_fails_that_call_only(env):
    g, api = gateway_with_steady_agent(env, tls=False)
    before = g.metric("agentgate_rpcs_total", method=HEALTH_CHECK, status="INTERNAL", transport="grpc")
    c = raw_h2.RawH2(g.port)
    bad = c.request(HEALTH_CHECK, [("grpc-encoding", "gzip")],
                    raw_h2.grpc_frame(b"this is not gzip at all", compressed=True))
    good = c.request(HEALTH_CHECK, [("grpc-encoding", "gzip")], raw_h2.gzip_frame(b""))
    a, b = c.wait(bad), c.wait(good)
    assert a.grpc_status in ("13", "3"), a
    assert "decompress" in a.grpc_message.lower(), a.grpc_message
    assert b.grpc_status == "0" and b.data == raw_h2.grpc_frame(SERVING), b
    # The connection survives: one more call on it.
    again = c.wait(c.request(HEALTH_CHECK, body=raw_h2.grpc_frame(b"")))
    assert again.grpc_status == "0", again
    assert not c.closed
    c.close()
    wait_for(lambda: g.metric("agentgate_rpcs_total", method=HEALTH_CHECK, status="INTERNAL",
                              transport="grpc") >= before + 1, what="INTERNAL counted")
    assert "status=\"INTERNAL\"" in ic.plain(g.proc.output())
    assert_steady_serves(g, api)


@pytest.mark.parametrize("authority", ["wss://kas.example.com/-/kubernetes-agent/", "", "kas.example.com",
                                       "passthrough:///ws://127.0.0.1:1/"])
def test_agent_port_accepts_any_authority_a_real_client_sends(env, authority):
    g = env.gateway()
    for port, tls in ((g.clear_port, None), (g.port, ic.client_tls_context(env.certs["ca"], ["h2"]))):
        c = raw_h2.RawH2(port, tls_ctx=tls)
        a = c.wait(c.request(HEALTH_CHECK, body=raw_h2.grpc_frame(b""), authority=authority))
        assert a.reset is None and a.grpc_status == "0", (port, a)
        assert a.data == raw_h2.grpc_frame(SERVING)
        c.close()


def test_api_port_keeps_strict_authority(env):
    g, api = gateway_with_steady_agent(env)
    c = raw_h2.RawH2(g.api_port)
    a = c.wait(c.request("/agents/steady/proxy/download?size=10", [("authorization", f"Bearer {api}")],
                         authority="wss://kas.example.com/x/", method="GET", grpc=False))
    assert a.headers.get(":status") == "400", a
    assert b"is not a host or host:port" in a.data, a.data
    ok = c.wait(c.request("/agents/steady/proxy/download?size=10", [("authorization", f"Bearer {api}")],
                          authority=f"127.0.0.1:{g.api_port}", method="GET", grpc=False))
    assert ok.headers.get(":status") == "200" and len(ok.data) == 10, ok
    c.close()


def test_kas_only_methods_get_a_sentence_and_no_metric_label(env):
    """agentk's calls to kas's own services are answered UNIMPLEMENTED with a sentence naming
    what this port serves; unknown paths are labelled `other`, so /metrics does not grow."""
    g = env.gateway(tls=False)
    c = raw_h2.RawH2(g.port)
    a = c.wait(c.request("/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect", body=raw_h2.grpc_frame(b"")))
    assert a.grpc_status == "12", a
    assert "agent port does not serve service" in a.grpc_message and "agentgate.v1.Tunnel" in a.grpc_message, a
    assert "no backend" in a.grpc_message, a
    c.close()
    size_before = len(g.metrics_text())
    for conn in range(25):  # 12 a connection: below the refusals that close one
        c = raw_h2.RawH2(g.port)
        for i in range(12):
            sid = c.request(f"/random.Service{conn}-{i}/Method{os.urandom(4).hex()}", body=raw_h2.grpc_frame(b""))
            assert c.wait(sid).grpc_status == "12"
        assert not c.closed
        c.close()
    text = g.metrics_text()
    assert "random.Service" not in text
    assert len(text) - size_before < 600, "unknown methods must not create series"
    assert g.metric("agentgate_rpcs_total", method="other", status="UNIMPLEMENTED", transport="grpc") >= 301
    assert g.metric("agentgate_connections_rejected_total", reason="unknown_method") >= 301


def test_answers_on_the_agent_port_leave_the_clients_hpack_table_empty(env):
    """The gateway's answer headers use no HPACK dynamic table (third_party/h2, patch 5): a
    client's decoder holds no entries after many calls, every answer still decodes whole,
    and a foreign gRPC stack (grpcio) is served on the same gateway as before."""
    g = env.gateway(tls=False)
    c = raw_h2.RawH2(g.port)
    for _ in range(5):
        a = c.wait(c.request(HEALTH_CHECK, body=raw_h2.grpc_frame(b"")))
        assert a.grpc_status == "0" and a.data == raw_h2.grpc_frame(SERVING), a
        assert a.headers.get("content-type") == "application/grpc", a
    table = c.conn.decoder.header_table
    assert len(table.dynamic_entries) == 0, list(table.dynamic_entries)
    c.close()
    assert ic.health_check(ic.h2c_channel(g.port)) == "SERVING"
