"""One port, four schemes: grpc, grpcs, ws and wss against one gateway process.

Every check here talks to a real `agentgate server` on 127.0.0.1: agents of our own, and
clients that are not ours (grpcio, grpcurl, websocat, the `websockets` library, raw sockets).
Refusals are checked three ways: what the client sees, the rejection counter by reason, and the
gateway's log line; and each refusal must leave already connected agents exactly as they were.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect as ws_connect

import ingress_clients as ic
from conftest import BIN, free_port, wait_for

SCHEMES = ("grpc", "grpcs", "ws", "wss")
REQUIRED_SERVICES = {"agentgate.v1.AgentSession", "agentgate.v1.Tunnel", "grpc.health.v1.Health"}
FAST_HANDSHAKE = ["--set", 'handshake_timeout="1s"']


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """Python stubs for proto/agentgate/v1, generated now (never committed)."""
    return ic.agentgate_stubs(tmp_path_factory.mktemp("agentgate-stubs"))


# ---------------------------------------------------------------------------------------------
# Helpers.

def glog(g) -> str:
    return ic.plain(g.proc.output())


def wait_log(proc_or_gw, pattern: str, timeout: float = 10.0, what: str | None = None) -> str:
    """Waits for a line matching `pattern` (regex) in the log (ANSI codes removed)."""
    proc = getattr(proc_or_gw, "proc", proc_or_gw)
    rx = re.compile(pattern)

    def find():
        for line in ic.plain(proc.output()).splitlines():
            if rx.search(line):
                return line
        return None

    return wait_for(find, timeout=timeout, what=what or f"log line /{pattern}/ in {proc.log_path.name}")


def rejected(g, reason: str) -> float:
    return g.metric("agentgate_connections_rejected_total", reason=reason)


def wait_rejected(g, reason: str, at_least: float, timeout: float = 5.0):
    wait_for(lambda: rejected(g, reason) >= at_least, timeout=timeout,
             what=f"agentgate_connections_rejected_total{{reason={reason}}} >= {at_least}")


def ws_upgraded(g):
    """A raw socket upgraded to the ws-tunnel WebSocket on the cleartext port: (socket, the
    response head and whatever followed it)."""
    sock = ic.connect(g.clear_port)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Protocol: ws-tunnel\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    return sock, head


def agent_cmd(server: str, token_file: Path | None, extra: list | None = None) -> list[str]:
    args = [str(BIN), "agent", "--server", server]
    if token_file is not None:
        args += ["--token-file", str(token_file)]
    return args + [str(a) for a in (extra or [])]


class Steady:
    """Agents connected before the refusals; they must come through untouched.

    Construct before the gateway starts (tokens are created now, so the gateway loads them at
    start-up), then call start(g)."""

    def __init__(self, env, tls: bool = True):
        self.env = env
        self.plan = {"steady-ws": ("ws", ["--transport", "websocket"])}
        if tls:
            self.plan["steady-grpcs"] = ("grpcs", [])
        self.tokens = {name: env.token_file(name) for name in self.plan}
        self.procs, self.before, self.g = {}, {}, None

    def start(self, g) -> "Steady":
        self.g = g
        for name, (scheme, extra) in self.plan.items():
            self.procs[name] = self.env.agent(g.url(scheme), self.tokens[name], extra=extra, name=name)
        for name, (scheme, _) in self.plan.items():
            self.before[name] = g.wait_agent(name, transport=scheme)
        for p in self.procs.values():
            wait_log(p, "connected and registered")
        return self

    def assert_undisturbed(self):
        now = {a["name"]: a for a in self.g.agents()}
        for name, was in self.before.items():
            assert name in now, f"{name} is no longer registered: {now}"
            for k in ("connection_id", "instance_id", "transport", "peer", "connected_since"):
                assert now[name][k] == was[k], f"{name}: {k} changed from {was[k]!r} to {now[name][k]!r}"
            p = self.procs[name]
            assert p.alive(), f"{name} exited:\n{p.output()[-2000:]}"
            out = ic.plain(p.output())
            assert out.count("connected and registered") == 1, f"{name} reconnected:\n{out[-3000:]}"
            for word in ("disconnected", "reconnecting", "rejected"):
                assert word not in out, f"{name} logged {word!r}:\n{out[-3000:]}"


def services_of_grpcurl(args: list) -> list[str]:
    r = ic.run([ic.grpcurl_path(), *args, "list"], timeout=20)
    assert r.returncode == 0, f"grpcurl {args} list failed: {r.stderr}"
    return sorted(r.stdout.split())


# ---------------------------------------------------------------------------------------------
# 1. Four schemes, one gateway.

def test_agents_register_over_all_four_schemes_and_metrics_agree(env):
    tokens = {scheme: env.token_file(f"four-{scheme}") for scheme in SCHEMES}
    g = env.gateway(tls=True, cleartext=True)
    assert g.clear_port and g.clear_port != g.port
    agents = {}
    for scheme in SCHEMES:
        extra = ["--transport", "websocket"] if scheme.startswith("ws") else []
        agents[scheme] = env.agent(g.url(scheme), tokens[scheme], extra=extra, name=f"agent-{scheme}")
    # grpc and ws share the cleartext port; grpcs and wss share the TLS port.
    assert {g.url(s).rsplit(":", 1)[1].rstrip("/") for s in ("grpc", "ws")} == {str(g.clear_port)}
    assert {g.url(s).rsplit(":", 1)[1].rstrip("/") for s in ("grpcs", "wss")} == {str(g.port)}

    for scheme in SCHEMES:
        a = g.wait_agent(f"four-{scheme}", transport=scheme)
        assert a["instance_id"] and a["version"].startswith("agentgate/")
        line = wait_log(agents[scheme], "connected and registered")
        assert f"transport={scheme}" in line, line
        # Registered on the first attempt: nothing refused, nothing retried.
        out = ic.plain(agents[scheme].output())
        assert "reconnecting" not in out and "rejected" not in out, out

    listed = g.agents()
    assert sorted(a["transport"] for a in listed) == sorted(SCHEMES), listed

    def agree():
        rows = {}
        for t in SCHEMES:
            rows[t] = (
                g.metric("agentgate_connections_open", transport=t),
                g.metric("agentgate_agents_connected", transport=t),
                sum(1 for a in g.agents() if a["transport"] == t),
            )
        return all(v == (1.0, 1.0, 1) for v in rows.values()) and rows

    rows = wait_for(agree, timeout=10, what="connections_open == agents_connected == listed, per transport")
    for t in SCHEMES:
        assert g.metric("agentgate_connections_accepted_total", transport=t) >= 1, rows
    for p in agents.values():
        assert p.alive()


def test_connection_ids_are_unique_across_the_two_listeners(env):
    """Registered.connection_id is "the gateway's id for the underlying connection (for
    correlating logs)"; two connections open at once must not share it."""
    clear_tok, tls_tok = env.token_file("ids-clear"), env.token_file("ids-tls")
    g = env.gateway(tls=True, cleartext=True)
    env.agent(g.url("grpc"), clear_tok, name="ids-clear")
    env.agent(g.url("grpcs"), tls_tok, name="ids-tls")
    a = g.wait_agent("ids-clear", transport="grpc")
    b = g.wait_agent("ids-tls", transport="grpcs")
    assert a["connection_id"] != b["connection_id"], (
        f"two open connections share connection_id {a['connection_id']}: {a} / {b}")


# ---------------------------------------------------------------------------------------------
# 2. Clients that are not ours get the same answers on every transport.

def test_foreign_clients_get_the_same_answers_on_every_transport(env):
    g = env.gateway(tls=True, cleartext=True)
    ca = env.certs["ca"]
    answers = {}

    def ask(ch: grpc.Channel):
        with ch:
            return (
                ic.health_check(ch),
                ic.health_check(ch, "agentgate.v1.AgentSession"),
                ic.health_check(ch, "agentgate.v1.Tunnel"),
                [s for s in ic.reflection_services(ch, "v1alpha") if not s.startswith("grpc.reflection")],
                [s for s in ic.reflection_services(ch, "v1") if not s.startswith("grpc.reflection")],
            )

    answers["grpc (h2c)"] = ask(ic.h2c_channel(g.clear_port))
    answers["grpcs (TLS h2)"] = ask(ic.tls_channel(g.port, ca))
    ref = answers["grpc (h2c)"]
    assert ref[:3] == ("SERVING", "SERVING", "SERVING"), ref
    assert REQUIRED_SERVICES <= set(ref[3]) and REQUIRED_SERVICES <= set(ref[4]), ref
    # Both reflection versions are served (the full list includes the reflection service).
    with ic.h2c_channel(g.clear_port) as ch:
        assert "grpc.reflection.v1alpha.ServerReflection" in ic.reflection_services(ch, "v1alpha")
        assert "grpc.reflection.v1.ServerReflection" in ic.reflection_services(ch, "v1")

    # grpcurl (reflection v1alpha) over h2c and over TLS with the test CA.
    plain_list = services_of_grpcurl(["-plaintext", f"127.0.0.1:{g.clear_port}"])
    tls_list = services_of_grpcurl(["-cacert", ca, f"localhost:{g.port}"])
    assert REQUIRED_SERVICES <= set(plain_list), plain_list
    assert plain_list == tls_list

    # websocat carries each TCP connection as a ws-tunnel WebSocket; a plaintext gRPC client
    # then talks HTTP/2 inside it. wss: websocat (native-tls/OpenSSL) trusts SSL_CERT_FILE.
    bridges = {}
    for scheme, url, wenv in (
        ("ws", f"ws://127.0.0.1:{g.clear_port}/", None),
        ("wss", f"wss://localhost:{g.port}/", {"SSL_CERT_FILE": str(ca), "SSL_CERT_DIR": "/nonexistent"}),
    ):
        port = free_port()
        bridges[scheme] = (port, env.spawn(ic.websocat_bridge_args(port, url), f"websocat-{scheme}", env=wenv))
    for scheme, (port, proc) in bridges.items():
        def via_bridge(port=port, proc=proc):
            assert proc.alive(), proc.output()
            return ask(ic.h2c_channel(port))
        answers[f"{scheme} (websocat)"] = wait_for(via_bridge, timeout=15, interval=0.2,
                                                   what=f"health through websocat {scheme}")
        assert services_of_grpcurl(["-plaintext", f"127.0.0.1:{port}"]) == plain_list
    for k, v in answers.items():
        assert v == ref, f"{k} answered {v}, h2c answered {ref}"

    # The gateway really saw those calls arrive over ws and wss (an OK call is logged at debug
    # only; the metric counts every call).
    for t in ("ws", "wss"):
        assert g.metric("agentgate_connections_accepted_total", transport=t) >= 1
        assert g.metric("agentgate_rpcs_total", method="/grpc.health.v1.Health/Check",
                        status="OK", transport=t) >= 1


# ---------------------------------------------------------------------------------------------
# 3. Refusals: counted, logged, and harmless to connected agents.

def test_bad_agent_tokens_are_refused_unauthenticated(env, stubs):
    revoked_tok = env.token("soon-revoked")
    steady = Steady(env)
    g = env.gateway(tls=True, cleartext=True)
    steady.start(g)
    ca = env.certs["ca"]
    before = rejected(g, "unauthenticated")
    refusals = 0
    for label, make in (("h2c", lambda: ic.h2c_channel(g.clear_port)),
                        ("tls", lambda: ic.tls_channel(g.port, ca))):
        for token, want in (("not-a-real-token", "invalid agent token"),
                            (None, "missing agent token")):
            with make() as ch:
                with pytest.raises(grpc.RpcError) as ei:
                    ic.register(ch, stubs, token)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED, (label, ei.value)
            assert want in ei.value.details(), (label, ei.value.details())
            refusals += 1
    assert "authorization: Bearer" in ei.value.details()  # says what to send
    wait_rejected(g, "unauthenticated", before + refusals)
    wait_log(g, r"agent call refused: invalid agent token.*reason=\"?unauthenticated")
    wait_log(g, r"agent call refused: missing agent token.*reason=\"?unauthenticated")

    # Revoked while the gateway runs: accepted before, refused shortly after.
    with ic.h2c_channel(g.clear_port) as ch:
        ev = ic.register(ch, stubs, revoked_tok)
        assert ev.registered.agent_name == "soon-revoked"
        r = subprocess.run([str(BIN), "token", "revoke", "soon-revoked", "--tokens", str(env.tokens)],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        t0 = time.monotonic()
        refused = None
        while time.monotonic() - t0 < 2.0:
            try:
                ic.register(ch, stubs, revoked_tok)
            except grpc.RpcError as e:
                refused = e
                break
            time.sleep(0.05)
        took = time.monotonic() - t0
    assert refused is not None, "revoked token still accepted 2 s after `token revoke`"
    print(f"revoked token refused {took:.2f}s after `token revoke` returned")
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in refused.details(), refused.details()
    assert took < 1.5, f"the store was re-read only after {took:.2f}s"
    wait_rejected(g, "unauthenticated", before + refusals + 1)
    steady.assert_undisturbed()


def test_malformed_and_oversized_messages_get_a_sentence_and_the_right_code(env, stubs):
    """tonic's codec errors reach a foreign client (grpcio) as gRPC's codes for the case and a
    sentence, not as INTERNAL with library text."""
    tok = env.token("codec-errors")
    g = env.gateway(tls=False)
    agent_pb2, _ = stubs
    md = [("authorization", f"Bearer {tok}")]
    with ic.h2c_channel(g.port) as ch:
        register_raw = ch.unary_stream("/agentgate.v1.AgentSession/Register")
        # Over the session service's 16 KiB message limit.
        big = agent_pb2.RegisterRequest(instance_id="x", hostname="h" * 20_000).SerializeToString()
        with pytest.raises(grpc.RpcError) as ei:
            next(register_raw(big, metadata=md, timeout=5))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
        assert "agentgate: a request message of" in ei.value.details() and "limit of 16384 bytes" in ei.value.details(), \
            ei.value.details()
        # Not protobuf at all.
        with pytest.raises(grpc.RpcError) as ei:
            next(register_raw(b"\xff\xff\xff\xff", metadata=md, timeout=5))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
        assert "agentgate: a request message is not what this method takes" in ei.value.details(), ei.value.details()
    # The metric records what the client got.
    method = "/agentgate.v1.AgentSession/Register"
    assert g.metric("agentgate_rpcs_total", method=method, status="RESOURCE_EXHAUSTED", transport="grpc") == 1
    assert g.metric("agentgate_rpcs_total", method=method, status="INVALID_ARGUMENT", transport="grpc") == 1


def test_oversized_metadata_is_resource_exhausted_with_a_sentence(env):
    """A gRPC call whose metadata is over the agent port's header list limit (16 KiB) gets
    RESOURCE_EXHAUSTED saying so (HTTP/2's bare 431 reached gRPC clients as UNKNOWN without a
    word); the connection and its other calls go on. HTTP/2 answers it before any service sees
    it, and the gateway still counts and logs it."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    g = env.gateway(tls=False)
    series = dict(name="agentgate_oversized_request_headers_total", answer="resource_exhausted")
    assert g.metric(**series) == 0
    with ic.h2c_channel(g.port) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Check(health_pb2.HealthCheckRequest(), metadata=[("x-big", "v" * 20_000)], timeout=5)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
        assert "metadata is larger than this server accepts" in ei.value.details(), ei.value.details()
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert g.metric(**series) == 1
    assert g.metric("agentgate_oversized_request_headers_total", answer="http_431") == 0
    wait_for(lambda: "refused a request whose headers (metadata) are larger than the listener accepts; "
             "the caller was answered RESOURCE_EXHAUSTED" in g.proc.output(), timeout=5, what="the log line")


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_an_oversized_reflection_request_is_resource_exhausted(env, version):
    """A reflection request over max_message_size_reflection ends the call RESOURCE_EXHAUSTED
    (tonic-reflection's own handling ended it OK with no answer: an empty success)."""
    # grpcio ships v1alpha stubs only; v1's messages are the same on the wire.
    pb = reflection_pb2
    g = env.gateway(tls=False)
    with ic.h2c_channel(g.port) as ch:
        info = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                request_serializer=pb.ServerReflectionRequest.SerializeToString,
                                response_deserializer=pb.ServerReflectionResponse.FromString)
        big = pb.ServerReflectionRequest(file_containing_symbol="x" * 100_000)
        with pytest.raises(grpc.RpcError) as ei:
            list(info(iter([big]), timeout=5))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ei.value
        # A request within the limit still gets its answer.
        small = pb.ServerReflectionRequest(list_services="")
        answers = list(info(iter([small]), timeout=5))
        assert answers and answers[0].HasField("list_services_response"), answers


def test_registration_fields_cannot_forge_log_lines(env, stubs):
    """What an agent says about itself is remote input: an instance id with control characters
    is refused; a version or hostname with a newline or terminal escapes is shown with those
    characters replaced, so a token holder cannot write a line of its own into the log."""
    tok = env.token("forger")
    g = env.gateway(tls=False)
    agent_pb2, agent_pb2_grpc = stubs
    md = [("authorization", f"Bearer {tok}")]
    with ic.h2c_channel(g.port) as ch:
        stub = agent_pb2_grpc.AgentSessionStub(ch)
        bad = agent_pb2.RegisterRequest(instance_id="i1\nFAKE instance line", version="x", hostname="x")
        with pytest.raises(grpc.RpcError) as ei:
            next(stub.Register(bad, metadata=md, timeout=5))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value
        assert "control characters" in ei.value.details(), ei.value.details()
        forged = agent_pb2.RegisterRequest(instance_id="i2", version="1\nFAKE version line\x1b[31m",
                                           hostname="h\r\nFAKE hostname line")
        it = stub.Register(forged, metadata=md, timeout=5)
        next(it)
        listed = next(a for a in g.agents() if a["instance_id"] == "i2")
        it.cancel()
    assert "\n" not in listed["version"] and "\n" not in listed["hostname"], listed
    wait_log(g, r"agent registered.*instance=i2")
    raw = g.proc.output()
    assert not [x for x in raw.splitlines() if x.startswith("FAKE")], raw[-2000:]
    assert "line\x1b[31m" not in raw


def test_websocket_refusals(env):
    steady = Steady(env)
    g = env.gateway(tls=True, cleartext=True)
    steady.start(g)
    ca = env.certs["ca"]
    tls_ctx = ic.client_tls_context(ca)

    # Upgrades without ws-tunnel: HTTP 400 naming the subprotocol, on both ports.
    before = rejected(g, "bad_subprotocol")
    cases = [(g.clear_port, None, None), (g.clear_port, "chat, superchat", None),
             (g.port, None, tls_ctx), (g.port, "wrong", tls_ctx)]
    for port, proto, ctx in cases:
        status, head, body = ic.ws_upgrade_raw(port, proto, ctx)
        assert status == 400, (port, proto, head, body)
        assert b"ws-tunnel" in body, body
    wait_rejected(g, "bad_subprotocol", before + len(cases))
    assert rejected(g, "bad_subprotocol") == before + len(cases)
    wait_log(g, r"connection refused: .*ws-tunnel.*offered: none.*reason=bad_subprotocol")
    wait_log(g, r"connection refused: .*ws-tunnel.*offered: \"wrong\".*reason=bad_subprotocol")

    # The `websockets` library sees the same refusal.
    with pytest.raises(Exception) as ei:
        ws_connect(f"ws://127.0.0.1:{g.clear_port}/", subprotocols=["not-ws-tunnel"], open_timeout=5,
                   proxy=None).close()
    assert "400" in str(ei.value), ei.value

    # A text frame inside an accepted ws-tunnel WebSocket: close 1002, connection gone.
    def open_ws(transport):
        return g.metric("agentgate_connections_open", transport=transport)

    baseline = {"ws": open_ws("ws"), "wss": open_ws("wss")}
    assert baseline == {"ws": 1.0, "wss": 0.0}, baseline  # steady-ws only
    violations = rejected(g, "ws_protocol_error")
    for url, ctx in ((f"ws://127.0.0.1:{g.clear_port}/tunnel", None), (f"wss://localhost:{g.port}/", tls_ctx)):
        transport = url.split(":")[0]
        with ws_connect(url, subprotocols=["ws-tunnel"], ssl=ctx, open_timeout=5, proxy=None) as ws:
            assert ws.subprotocol == "ws-tunnel"
            ws.send("hello, I am text")
            got = []
            with pytest.raises(ConnectionClosedError) as ei:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    # The gateway's HTTP/2 server may speak first (SETTINGS, as binary).
                    got.append(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            assert all(isinstance(m, bytes) for m in got), got
            assert ei.value.rcvd is not None, (url, ei.value)
            assert ei.value.rcvd.code == 1002, (url, ei.value.rcvd)
            assert "text" in ei.value.rcvd.reason, ei.value.rcvd
        # The gateway closed its side: the connection is no longer counted as open.
        wait_for(lambda: open_ws(transport) == baseline[transport], timeout=5,
                 what=f"the {transport} connection that sent text is closed on the gateway")
        wait_log(g, rf"connection closed conn=\d+ transport={transport} ")
    wait_rejected(g, "ws_protocol_error", violations + 2)
    wait_log(g, r"closing connection: text message on ws-tunnel.*reason=ws_protocol_error")

    # A client that goes away without a close frame (killed, or a proxy dropping an idle
    # connection) has not broken the protocol.
    sock, head = ws_upgraded(g)
    sock.close()
    wait_for(lambda: open_ws("ws") == baseline["ws"], timeout=5, what="the abruptly closed ws connection gone")
    time.sleep(0.3)
    assert rejected(g, "ws_protocol_error") == violations + 2, "an abrupt close counted as a violation"

    # An unmasked frame from a client (RFC 6455 forbids it): close 1002 naming it.
    sock, head = ws_upgraded(g)
    assert head.startswith(b"HTTP/1.1 101"), head
    rest = head.split(b"\r\n\r\n", 1)[1]
    sock.sendall(b"\x82\x02hi")
    data, _ = ic.read_until_closed(sock, timeout=5)
    sock.close()
    data = rest + data
    frames = []
    while len(data) >= 2:
        n = data[1] & 0x7F
        off = 2
        if n == 126:
            n, off = int.from_bytes(data[2:4], "big"), 4
        frames.append((data[0] & 0x0F, data[off:off + n]))
        data = data[off + n:]
    closes = [p for op, p in frames if op == 0x8]
    assert closes and int.from_bytes(closes[0][:2], "big") == 1002, frames
    assert b"mask" in closes[0][2:].lower(), closes
    wait_rejected(g, "ws_protocol_error", violations + 3)

    # Something other than HTTP/2 inside the WebSocket (TLS inside it, as kas once had agents
    # do), or after TLS that agreed on h2: counted, logged with what was sent, closed.
    before = rejected(g, "bad_preface")
    with ws_connect(f"ws://127.0.0.1:{g.clear_port}/tunnel", subprotocols=["ws-tunnel"], open_timeout=5,
                    proxy=None) as ws:
        ws.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40))
        with pytest.raises(ConnectionClosedError):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                ws.recv(timeout=max(0.1, deadline - time.monotonic()))
    wait_log(g, r"closing connection: inside the WebSocket, the client's first bytes \(16 03 01 02 00 01 00 01\) "
                r"are not the HTTP/2 preface \(a TLS handshake: TLS inside the WebSocket")
    h2ctx = ic.client_tls_context(ca, ["h2"])
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as raw:
        s = h2ctx.wrap_socket(raw, server_hostname="localhost")
        assert s.selected_alpn_protocol() == "h2"
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ic.read_until_closed(s, timeout=5)
    wait_log(g, r"closing connection: after TLS that agreed on HTTP/2 \(ALPN h2\), the client's first bytes "
                r"\(47 45 54 20 2f 20 48 54\) are not the HTTP/2 preface \(an HTTP/1.1 request")
    # HTTP/2 after TLS that did not agree on it (no ALPN h2 offered): named as such.
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as raw:
        s = ic.client_tls_context(ca, ["http/1.1"]).wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer, _ = ic.read_until_closed(s, timeout=5)
    assert answer.startswith(b"HTTP/1.1 400") and b"did not offer it in TLS (ALPN h2)" in answer, answer
    wait_rejected(g, "bad_preface", before + 3)

    # A text frame that is not UTF-8: close 1007, counted and logged like any text message.
    sock, head = ws_upgraded(g)
    mask = b"\x01\x02\x03\x04"
    payload = b"\xff\xfe not utf-8"
    sock.sendall(b"\x81" + bytes([0x80 | len(payload)]) + mask
                 + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    data, _ = ic.read_until_closed(sock, timeout=5)
    sock.close()
    assert b"\x88" in head.split(b"\r\n\r\n", 1)[1] + data, data  # a close frame came
    wait_rejected(g, "ws_protocol_error", violations + 4)
    wait_log(g, r"closing connection: a text message or close reason that is not UTF-8")

    # A PING flood: each PING costs a pong, and a peer that does not read would have them
    # queue without end. Past 10 in a second: close 1008 naming it.
    with ws_connect(f"ws://127.0.0.1:{g.clear_port}/tunnel", subprotocols=["ws-tunnel"], open_timeout=5,
                    proxy=None) as ws:
        with pytest.raises(ConnectionClosedError) as ei:
            for i in range(50):
                ws.ping(str(i))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        # The close frame may be lost to the TCP reset (the client's PINGs were still unread
        # when the gateway closed); when it arrives, it names the flood. The log always does.
        if ei.value.rcvd is not None:
            assert ei.value.rcvd.code == 1008, ei.value
            assert "PING flood" in ei.value.rcvd.reason, ei.value.rcvd
    wait_rejected(g, "ws_protocol_error", violations + 5)
    wait_log(g, r"closing connection: WebSocket PING flood: more than 10 in one second")

    # A close frame whose status code RFC 6455 does not allow (999): answered with 1002,
    # counted and logged (it was taken for a clean close). A fresh second of the
    # pre-authentication log budget first: the cases above spent this one's.
    time.sleep(1.1)
    sock, head = ws_upgraded(g)
    payload = (999).to_bytes(2, "big") + b"bye"
    sock.sendall(b"\x88" + bytes([0x80 | len(payload)]) + mask
                 + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    data, _ = ic.read_until_closed(sock, timeout=5)
    sock.close()
    data = head.split(b"\r\n\r\n", 1)[1] + data
    frames = []  # (opcode, payload): the server's SETTINGS come first, in a binary message
    while len(data) >= 2 and data[1] < 126:
        frames.append((data[0] & 0x0F, data[2:2 + data[1]]))
        data = data[2 + data[1]:]
    closes = [p for op, p in frames if op == 0x8]
    assert closes and int.from_bytes(closes[0][:2], "big") == 1002, frames
    wait_rejected(g, "ws_protocol_error", violations + 6)
    wait_log(g, r"closing connection: a close frame with a status code RFC 6455 does not allow")
    steady.assert_undisturbed()


def test_plain_http1_requests_get_an_http_answer_saying_what_the_port_serves(env):
    """curl, a health checker on the wrong port, or a gRPC client behind a proxy that turned
    HTTP/2 into HTTP/1.1: each gets an HTTP answer with a sentence (not an empty reply), a
    reject reason of its own and a log line, on the cleartext and the TLS port."""
    steady = Steady(env)
    g = env.gateway(tls=True, cleartext=True)
    steady.start(g)
    ca = str(env.certs["ca"])
    base = {r: rejected(g, r) for r in ("not_an_upgrade", "grpc_over_http1", "ws_upgrade_error")}

    def curl(url: str, *args: str) -> tuple[int, str]:
        r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", ca, "--max-time", "10",
                            "-o", "-", "-w", "\n%{http_code}", *args, url],
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        body, _, code = r.stdout.rpartition("\n")
        return int(code), body

    for url in (f"http://127.0.0.1:{g.clear_port}/", f"https://localhost:{g.port}/healthz"):
        code, body = curl(url)
        assert code == 426 and "this is an agent port" in body and "/healthz" in body, (url, code, body)
        # A gRPC call as a downgrading proxy would send it.
        code, body = curl(url.rsplit("/", 1)[0] + "/agentgate.v1.Tunnel/Connect", "-X", "POST",
                          "-H", "content-type: application/grpc", "-H", "te: trailers",
                          "--data-binary", "@/dev/null")
        assert code == 505 and "gRPC needs HTTP/2" in body and "ws://" in body, (url, code, body)
    # An upgrade a proxy stripped of `Connection: upgrade`.
    code, body = curl(f"http://127.0.0.1:{g.clear_port}/", "-H", "Upgrade: websocket",
                      "-H", "Connection: keep-alive", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                      "-H", "Sec-WebSocket-Version: 13")
    assert code == 400 and "Connection: Upgrade" in body, (code, body)
    # An upgrade a proxy stripped of its Upgrade and Connection headers (a forward proxy, as
    # tinyproxy does with ws://): the answer says a proxy removed them.
    code, body = curl(f"http://127.0.0.1:{g.clear_port}/", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                      "-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Protocol: ws-tunnel")
    assert code == 426 and "without its Upgrade header: a proxy in between removed it" in body, (code, body)
    # An upgrade over HTTP/1.0 (a proxy without proxy_http_version 1.1), and one with a body:
    # tungstenite refused both later, and the connection closed without an answer.
    upgrade = ["-H", "Upgrade: websocket", "-H", "Connection: Upgrade", "-H", "Sec-WebSocket-Version: 13",
               "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "-H", "Sec-WebSocket-Protocol: ws-tunnel"]
    code, body = curl(f"http://127.0.0.1:{g.clear_port}/", "--http1.0", *upgrade)
    assert code == 400 and "needs HTTP/1.1" in body and "proxy_http_version 1.1" in body, (code, body)
    code, body = curl(f"https://localhost:{g.port}/", "-X", "GET", "--data-binary", "hello", *upgrade)
    assert code == 400 and "has no body" in body, (code, body)

    wait_rejected(g, "not_an_upgrade", base["not_an_upgrade"] + 2)
    wait_rejected(g, "grpc_over_http1", base["grpc_over_http1"] + 2)
    wait_rejected(g, "ws_upgrade_error", base["ws_upgrade_error"] + 3)
    wait_log(g, r"connection refused: agentgate: this gRPC call arrived over HTTP/1.1.*reason=grpc_over_http1")
    wait_log(g, r"connection refused: agentgate: this is an agent port.*reason=not_an_upgrade")
    steady.assert_undisturbed()


def test_garbage_and_silent_clients_are_cut_off(env):
    steady = Steady(env)
    g = env.gateway(tls=True, cleartext=True, extra=FAST_HANDSHAKE)
    steady.start(g)
    base = {r: rejected(g, r) for r in ("bad_preface", "sniff_timeout", "tls_timeout", "tls_error")}

    # Random bytes on the cleartext port: closed at once.
    s = ic.connect(g.clear_port)
    s.sendall(b"\x8f\x01\xfe\x00random bytes, not a preface\x00\xff" * 2)
    data, took = ic.read_until_closed(s, timeout=3)
    s.close()
    assert data == b"", data
    wait_rejected(g, "bad_preface", base["bad_preface"] + 1)
    wait_log(g, r"connection refused: first bytes .*reason=bad_preface")

    # Plain HTTP on the TLS port: not a ClientHello, a TLS error, also counted.
    s = ic.connect(g.port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    ic.read_until_closed(s, timeout=3)
    s.close()
    wait_rejected(g, "tls_error", base["tls_error"] + 1)
    wait_log(g, r"connection refused: the client did not speak TLS \(cleartext HTTP or gRPC sent to a TLS port\?\).*reason=tls_error")

    # Silent clients on both ports, at the same time: closed at the 1 s deadline.
    results = {}

    def silent(label, port):
        sock = ic.connect(port)
        try:
            results[label] = ic.read_until_closed(sock, timeout=6)
        except AssertionError as e:
            results[label] = e
        finally:
            sock.close()

    threads = [threading.Thread(target=silent, args=(lbl, p)) for lbl, p in
               (("cleartext", g.clear_port), ("tls", g.port))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for label in ("cleartext", "tls"):
        r = results.get(label)
        assert isinstance(r, tuple), f"{label}: {r}"
        data, took = r
        print(f"silent {label} client closed after {took:.2f}s")
        assert data == b"", (label, data)
        assert 0.8 <= took <= 3.0, f"silent {label} client closed after {took:.2f}s (deadline 1s)"
    wait_rejected(g, "sniff_timeout", base["sniff_timeout"] + 1)
    wait_rejected(g, "tls_timeout", base["tls_timeout"] + 1)
    assert rejected(g, "sniff_timeout") == base["sniff_timeout"] + 1
    assert rejected(g, "tls_timeout") == base["tls_timeout"] + 1
    wait_log(g, r"connection refused: no HTTP/2 preface or HTTP/1.1 request within 1s.*reason=sniff_timeout")
    wait_log(g, r"connection refused: TLS handshake not finished within 1s.*reason=tls_timeout")
    steady.assert_undisturbed()


def test_agent_refuses_unknown_url_schemes(env):
    tok = env.token_file("schemeless")
    for url in ("https://127.0.0.1:1", "http://127.0.0.1:1/", "tcp://127.0.0.1:1", "unix:///tmp/gw.sock"):
        _assert_refused_listing_schemes(url, tok)


def test_agent_refuses_a_server_address_without_scheme(env):
    """`--server gateway.example:8150` (the likeliest slip) is "anything else" too: the
    message must say which schemes are accepted."""
    tok = env.token_file("schemeless")
    for url in ("127.0.0.1:8150", "gateway.test:8150"):
        _assert_refused_listing_schemes(url, tok)


def _assert_refused_listing_schemes(url: str, tok: Path):
    r = subprocess.run(agent_cmd(url, tok), capture_output=True, text=True, timeout=20)
    out = ic.plain(r.stdout + r.stderr)
    assert r.returncode != 0, (url, out)
    for scheme in ("grpc://", "grpcs://", "ws://", "wss://"):
        assert scheme in out, f"{url}: message does not list {scheme}:\n{out}"


def test_agent_with_invalid_token_backs_off(env):
    g = env.gateway(tls=False, cleartext=False)
    bad = env.tmp / "bad-token.txt"
    bad.write_text("agt_this_token_does_not_exist\n")
    before = rejected(g, "unauthenticated")
    p = env.agent(g.url("grpc"), bad, extra=["--backoff-initial", "1s"], name="bad-agent")
    wait_log(p, "rejected the agent token")
    time.sleep(4.0)
    assert p.alive(), f"agent gave up instead of backing off:\n{p.output()[-2000:]}"
    out = ic.plain(p.output())
    attempts = out.count("rejected the agent token")
    print(f"invalid-token agent: {attempts} attempts in ~4 s")
    assert 1 <= attempts <= 6, f"{attempts} attempts in ~4 s:\n{out[-4000:]}"
    line = next(line for line in out.splitlines() if "rejected the agent token" in line)
    assert "invalid agent token" in line and ("ERROR" in line or "WARN" in line), line
    assert "reconnecting after backoff" in out
    assert rejected(g, "unauthenticated") >= before + attempts
    assert not [a for a in g.agents() if a["name"] == "bad-agent"]


# ---------------------------------------------------------------------------------------------
# 4. TLS variants for grpcs and wss agents.

def test_tls_variants(env):
    g = env.gateway(tls=True, cleartext=False)
    ca = str(env.certs["ca"])
    ws = ["--transport", "websocket"]
    ip_url = {"grpcs": f"grpcs://127.0.0.1:{g.port}", "wss": f"wss://127.0.0.1:{g.port}/"}
    good, bad = {}, {}
    for scheme in ("grpcs", "wss"):
        tx = ws if scheme == "wss" else []
        good[f"ca-{scheme}"] = env.spawn(
            agent_cmd(g.url(scheme), env.token_file(f"ca-{scheme}"), ["--ca-cert", ca, *tx]), f"ca-{scheme}")
        good[f"sni-{scheme}"] = env.spawn(
            agent_cmd(ip_url[scheme], env.token_file(f"sni-{scheme}"),
                      ["--ca-cert", ca, "--tls-server-name", "gateway.test", *tx]), f"sni-{scheme}")
        good[f"insecure-{scheme}"] = env.spawn(
            agent_cmd(g.url(scheme), env.token_file(f"insecure-{scheme}"), ["--insecure-skip-tls-verify", *tx]),
            f"insecure-{scheme}")
        # Negatives: system roots only; and a server name the certificate does not carry
        # (proves --tls-server-name is what gets verified).
        bad[f"sysroots-{scheme}"] = env.spawn(
            agent_cmd(g.url(scheme), env.token_file(f"sysroots-{scheme}"), tx), f"sysroots-{scheme}")
        bad[f"wrongname-{scheme}"] = env.spawn(
            agent_cmd(ip_url[scheme], env.token_file(f"wrongname-{scheme}"),
                      ["--ca-cert", ca, "--tls-server-name", "wrong.test", *tx]), f"wrongname-{scheme}")

    for name in good:
        g.wait_agent(name, transport=name.rsplit("-", 1)[1])
    for scheme in ("grpcs", "wss"):
        out = ic.plain(good[f"insecure-{scheme}"].output())
        assert "--insecure-skip-tls-verify" in out and "NOT verified" in out, out
        assert "WARN" in next(line for line in out.splitlines() if "NOT verified" in line)
        assert "NOT verified" not in ic.plain(good[f"ca-{scheme}"].output())

    for name, p in bad.items():
        line = wait_log(p, r"(?i)certificate|UnknownIssuer|NotValidForName", timeout=15,
                        what=f"{name} reports a certificate error")
        print(f"{name}: {line[-200:]}")
        assert "cannot connect" in line or "ERROR" in line or "WARN" in line, line
    wanted = {"sysroots-grpcs": r"(?i)unknown ?issuer|not trusted|certificate",
              "wrongname-grpcs": r"(?i)not ?valid ?for ?name|name|certificate"}
    for name, pat in wanted.items():
        assert re.search(pat, ic.plain(bad[name].output())), bad[name].output()[-2000:]
    names = {a["name"] for a in g.agents()}
    assert not names & set(bad), f"agents with a certificate error registered: {names & set(bad)}"
    assert names >= set(good)
    assert rejected(g, "tls_error") >= 1
    for p in bad.values():
        assert p.alive()
        assert "connected and registered" not in ic.plain(p.output())


# ---------------------------------------------------------------------------------------------
# 5. max_connections.

def _open_checked_channel(port: int, ca=None) -> grpc.Channel:
    ch = ic.tls_channel(port, ca) if ca else ic.h2c_channel(port)
    assert ic.health_check(ch) == "SERVING"
    return ch


def test_max_connections_refuses_the_fourth(env):
    steady = Steady(env, tls=False)  # one ws agent: one connection
    g = env.gateway(tls=False, cleartext=False, extra=["--set", "max_connections=3"])
    steady.start(g)
    chans = [_open_checked_channel(g.port) for _ in range(2)]
    try:
        total = lambda: sum(g.metric("agentgate_connections_open", transport=t) for t in SCHEMES)  # noqa: E731
        wait_for(lambda: total() == 3, timeout=5, what="3 connections open")
        before = rejected(g, "over_limit")

        # The 4th: dropped without a byte, counted and logged.
        s = ic.connect(g.port)
        s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data, took = ic.read_until_closed(s, timeout=3)
        s.close()
        assert data == b""
        wait_rejected(g, "over_limit", before + 1)
        wait_log(g, r"connection refused: too many open connections.*max_connections=3")
        assert "over_limit" in next(line for line in glog(g).splitlines() if "too many open connections" in line)
        # A 4th gRPC client fails the same way.
        with ic.h2c_channel(g.port) as ch4:
            with pytest.raises(grpc.RpcError) as ei:
                ic.health_check(ch4, timeout=3)
            assert ei.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert rejected(g, "over_limit") >= before + 2

        # The three keep working.
        for ch in chans:
            assert ic.health_check(ch) == "SERVING"
        steady.assert_undisturbed()
        assert g.proc.alive()

        # Closing one frees a slot.
        chans.pop().close()
        wait_for(lambda: total() == 2, timeout=5, what="a slot freed")
        chans.append(_open_checked_channel(g.port))
    finally:
        for ch in chans:
            ch.close()


def test_max_connections_counts_both_agent_ports_together(env):
    """max_connections is "agent connections open at once" for the process (sized against its
    open-file cap), so the TLS port and the cleartext port share it."""
    g = env.gateway(tls=True, cleartext=True, extra=["--set", "max_connections=3"])
    ca = env.certs["ca"]
    chans = [_open_checked_channel(g.clear_port), _open_checked_channel(g.clear_port),
             _open_checked_channel(g.port, ca)]
    try:
        total = lambda: sum(g.metric("agentgate_connections_open", transport=t) for t in SCHEMES)  # noqa: E731
        wait_for(lambda: total() == 3, timeout=5, what="3 connections open")
        before = rejected(g, "over_limit")
        with ic.tls_channel(g.port, ca) as ch4:
            try:
                status = ic.health_check(ch4, timeout=3)
            except grpc.RpcError as e:
                status = e.code()
            open_now = {t: g.metric("agentgate_connections_open", transport=t) for t in SCHEMES}
        assert status != "SERVING", (
            f"a 4th connection was served with max_connections=3; open now: {open_now}")
        assert rejected(g, "over_limit") >= before + 1
    finally:
        for ch in chans:
            ch.close()
