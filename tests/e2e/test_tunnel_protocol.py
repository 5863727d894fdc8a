"""The tunnel protocol's two versions on the wire (docs/protocol.md section 4).

Version 2 streams carry requests one after another; version 1 streams (agents before 0.2) carry
one request each. The gateway must serve both. Two kinds of agent are used:

- raw agents written here with grpcio and the generated agentgate.v1 stubs, which speak the
  protocol message by message and assert what the gateway sends (independent of our agent's
  code);
- our agent, announcing version 2 (its default) or version 1 (`--tunnel-protocol 1`).

Callers are Python's http.client and curl.
"""

from __future__ import annotations

import http.client
import queue
import subprocess
import threading
import time

import grpc
import pytest

from conftest import wait_for
from ingress_clients import agentgate_stubs
from test_tunnel import HttpUpstream, api_request, start_agent, pattern_sha256, MiB


def tunnel_stubs(env):
    agentgate_stubs(env.tmp / "gen-agentgate")
    import importlib
    pb = importlib.import_module("agentgate.v1.tunnel_pb2")
    pbg = importlib.import_module("agentgate.v1.tunnel_pb2_grpc")
    return pb, pbg


class RawTunnel:
    """One Tunnel.Connect stream opened by hand: `send` queues agent messages, `recv` returns
    the gateway's next message (None once the gateway ended the stream)."""

    def __init__(self, pb, pbg, port: int, token: str, version: int, upstreams=("default",)):
        self.pb = pb
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.out: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        stub = pbg.TunnelStub(self.channel)
        desc = pb.Descriptor(instance_id="raw", http_upstreams=list(upstreams),
                             protocol_version=version)
        self.out.put(pb.AgentMessage(descriptor=desc))
        self.call = stub.Connect(self._outgoing(), metadata=[("authorization", f"Bearer {token}")])
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _outgoing(self):
        while True:
            m = self.out.get()
            if m is None:
                return
            yield m

    def _read(self):
        try:
            for m in self.call:
                self.inbox.put(m)
        except grpc.RpcError as e:
            self.inbox.put(e)
        self.inbox.put(None)

    def send(self, **kw):
        self.out.put(self.pb.AgentMessage(**kw))

    def recv(self, timeout: float = 10.0, skip_heartbeats: bool = True):
        while True:
            m = self.inbox.get(timeout=timeout)
            if isinstance(m, grpc.RpcError):
                raise AssertionError(f"tunnel stream failed: {m}")
            if m is not None and skip_heartbeats and m.WhichOneof("msg") == "heartbeat":
                continue
            return m

    def close(self):
        self.out.put(None)
        self.channel.close()


def caller(g, token, path, method="GET", body=None, results=None):
    """A caller in a thread: the result lands in `results` as (status, body)."""
    def run():
        results.put(api_request(g, method, path, token, body=body))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture
def raw(env):
    # Tokens first: the gateway reads the store at start.
    api = env.token("caller", kind="api")
    tok = env.token("raw")
    g = env.gateway(tls=False)
    pb, pbg = tunnel_stubs(env)
    return g, pb, pbg, api, tok


def test_version_1_agent_gets_one_request_per_stream(raw):
    """An agent that announces nothing (version 1) gets a head without version-2 fields, an
    EndOfRequest even for a bodiless GET, and the gateway ends the stream after the trailer."""
    g, pb, pbg, api, tok = raw
    t = RawTunnel(pb, pbg, g.port, tok, version=0)
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, what="the raw tunnel parked")
    results: queue.Queue = queue.Queue()
    caller(g, api, "/agents/raw/proxy/v1?x=1", results=results)
    head = t.recv()
    assert head.WhichOneof("msg") == "request_head", head
    h = head.request_head
    assert (h.method, h.path_and_query, h.upstream) == ("GET", "/v1?x=1", "default")
    assert h.protocol_version == 0 and not h.end_of_request, h
    end = t.recv()
    assert end.WhichOneof("msg") == "end_of_request", end
    t.send(response_head=pb.ResponseHead(status=200, headers=[pb.Header(name="x-raw", value=b"1")]))
    t.send(chunk=pb.Chunk(data=b"hello "))
    t.send(chunk=pb.Chunk(data=b"v1"))
    t.send(trailer=pb.Trailer())
    status, headers, body = results.get(timeout=10)
    assert (status, body, headers["x-raw"]) == (200, b"hello v1", "1")
    assert t.recv() is None, "the gateway ends a version-1 stream after the trailer"
    t.close()


def test_version_2_agent_serves_requests_one_after_another_on_one_stream(raw):
    g, pb, pbg, api, tok = raw
    t = RawTunnel(pb, pbg, g.port, tok, version=2)
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, what="the raw tunnel parked")
    results: queue.Queue = queue.Queue()

    # 1. A bodiless GET is one message; the whole answer fits in the response head.
    caller(g, api, "/agents/raw/proxy/a", results=results)
    h = t.recv().request_head
    assert (h.method, h.path_and_query, h.protocol_version, h.end_of_request) == ("GET", "/a", 2, True)
    t.send(response_head=pb.ResponseHead(status=201, body=b"whole answer", end_of_response=True))
    status, _, body = results.get(timeout=10)
    assert (status, body) == (201, b"whole answer")

    # 2. A POST with a body on the same stream: chunks, EndOfRequest; a streamed answer.
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, what="the stream parked again")
    caller(g, api, "/agents/raw/proxy/b", method="POST", body=b"x" * 100_000, results=results)
    h = t.recv().request_head
    assert (h.method, h.end_of_request) == ("POST", False), h
    got = b""
    while True:
        m = t.recv()
        kind = m.WhichOneof("msg")
        if kind == "chunk":
            got += m.chunk.data
        else:
            assert kind == "end_of_request", m
            break
    assert got == b"x" * 100_000
    t.send(response_head=pb.ResponseHead(status=200, body=b"first "))
    t.send(chunk=pb.Chunk(data=b"second"))
    t.send(trailer=pb.Trailer())
    status, _, body = results.get(timeout=10)
    assert (status, body) == (200, b"first second")

    # 3. An error is the end of an answer too; the stream stays usable.
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, what="the stream parked again")
    caller(g, api, "/agents/raw/proxy/c", results=results)
    assert t.recv().request_head.path_and_query == "/c"
    t.send(error=pb.TunnelError(code=pb.TunnelError.CODE_UPSTREAM_UNAVAILABLE, message="refused"))
    status, _, body = results.get(timeout=10)
    assert status == 502 and b"refused" in body, (status, body)

    # 4. Heartbeats reach the parked stream between requests and are answered.
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, what="the stream parked again")
    caller(g, api, "/agents/raw/proxy/d", results=results)
    assert t.recv().request_head.path_and_query == "/d"
    t.send(response_head=pb.ResponseHead(status=204, end_of_response=True))
    assert results.get(timeout=10)[0] == 204
    assert g.metric("agentgate_tunnel_streams_opened_total") == 1, "one stream carried all four"
    t.close()


def test_version_2_caller_going_away_ends_the_stream(raw):
    """Cancellation in version 2 is the same signal as in version 1: the gateway ends the
    stream before the answer is complete."""
    g, pb, pbg, api, tok = raw
    t = RawTunnel(pb, pbg, g.port, tok, version=2)
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, what="the raw tunnel parked")
    c = http.client.HTTPConnection("127.0.0.1", g.api_port, timeout=10)
    c.request("GET", "/agents/raw/proxy/slow", headers={"Authorization": f"Bearer {api}"})
    assert t.recv().request_head.path_and_query == "/slow"
    t.send(response_head=pb.ResponseHead(status=200, body=b"part"))
    r = c.getresponse()
    assert r.read(4) == b"part"
    c.close()  # the caller goes away mid-answer
    assert t.recv(timeout=10) is None, "the gateway ended the stream: cancelled"
    t.close()


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("scheme", ["grpc", "ws"])
def test_our_agent_on_either_version(env, scheme, version):
    """Our agent announcing version 1 behaves as agents before 0.2 did; with version 2 a
    hundred keep-alive requests reuse a handful of streams. Bodies both ways stay intact."""
    up = HttpUpstream(env)
    g = env.gateway(tls=False)
    api = env.token("caller", kind="api")
    start_agent(env, g, scheme, "ver", upstreams=[up.url], extra=["--tunnel-protocol", str(version)])
    opened0 = g.metric("agentgate_tunnel_streams_opened_total")
    c = http.client.HTTPConnection("127.0.0.1", g.api_port, timeout=30)
    for i in range(100):
        c.request("GET", f"/agents/ver/proxy/inspect?i={i}", headers={"Authorization": f"Bearer {api}"})
        r = c.getresponse()
        body = r.read()
        assert r.status == 200 and f"i={i}".encode() in body, (r.status, body[:200])
    c.close()
    opened = g.metric("agentgate_tunnel_streams_opened_total") - opened0
    if version == 1:
        assert opened >= 100, f"version 1 opens a stream per request, saw {opened}"
    else:
        assert opened <= 10, f"version 2 reuses streams, yet {opened} were opened for 100 requests"
    size = 8 * MiB
    status, _, body = api_request(g, "GET", f"/agents/ver/proxy/download?size={size}", api, timeout=60)
    import hashlib
    assert status == 200 and hashlib.sha256(body).hexdigest() == pattern_sha256(size)
    # curl, a caller we did not write, uploads through the same agent.
    out = subprocess.run(["curl", "-sS", "-m", "30", "-H", f"Authorization: Bearer {api}",
                          "--data-binary", "@-", f"http://127.0.0.1:{g.api_port}/agents/ver/proxy/inspect"],
                         input=b"y" * MiB, capture_output=True, check=True)
    assert b'"body_len": 1048576' in out.stdout, out.stdout[:300]


def test_surplus_streams_close_after_a_burst(env):
    """After a burst of 20 concurrent requests the pool grows; with a 1 s idle lifetime the
    surplus closes again although the gateway's heartbeats keep coming every 0.3 s."""
    up = HttpUpstream(env)
    g = env.gateway(tls=False, extra=["--set", 'stream_heartbeat_interval="300ms"'])
    api = env.token("caller", kind="api")
    start_agent(env, g, "grpc", "burst", upstreams=[up.url], extra=["--pool-idle-lifetime", "1s"])
    results: queue.Queue = queue.Queue()
    threads = [caller(g, api, "/agents/burst/proxy/sleep?ms=300", results=results) for _ in range(20)]
    for t in threads:
        t.join(30)
    statuses = [results.get(timeout=1)[0] for _ in range(20)]
    assert statuses == [200] * 20, statuses
    peak = g.metric("agentgate_tunnels_parked")
    assert peak > 2, f"the pool grew during the burst (parked {peak})"
    wait_for(lambda: g.metric("agentgate_tunnels_parked") <= 2, timeout=15,
             what="the surplus streams closed (back to the 2 kept idle)")
    time.sleep(0.5)
    assert api_request(g, "GET", "/agents/burst/proxy/inspect", api)[0] == 200
