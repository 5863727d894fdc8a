"""The reverse tunnel, end to end: callers at the gateway's API listener reach HTTP and gRPC
services that sit next to an agent, over each of the four agent transports.

Peers (tests/e2e/peers/): http_upstream.py (stdlib HTTP/1.1 server that streams large bodies
both ways and records client disconnects), grpc_upstream.py + echo.proto (grpcio server with
all four call shapes, an error method, a slow method, and 16 MiB message limits). The gRPC stubs
are generated at run time into the test's temporary directory.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import ingress_clients as ic

from conftest import free_port, wait_for

PEERS = Path(__file__).resolve().parent / "peers"
sys.path.insert(0, str(PEERS))
import http_upstream as pattern  # noqa: E402  (the shared byte pattern)

MiB = 1024 * 1024
BIG = 256 * MiB
RSS_CEILING_KIB = 150 * 1024
SCHEMES = ("grpc", "grpcs", "ws", "wss")
GRPC_MAX = 16 * MiB


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def wait_event(path: Path, timeout: float = 5.0, **match) -> dict:
    def find():
        for ev in read_events(path):
            if all(ev.get(k) == v for k, v in match.items()):
                return ev
        return None
    return wait_for(find, timeout=timeout, interval=0.05, what=f"event {match} in {path.name}")


class HttpUpstream:
    """peers/http_upstream.py in its own process, on one or more ports."""

    def __init__(self, env, name: str = "up", ports: int = 1):
        self.name = name
        self.ports = [free_port() for _ in range(ports)]
        self.events = env.tmp / f"{name}-events.jsonl"
        ready = env.tmp / f"{name}-ready.json"
        args = [sys.executable, PEERS / "http_upstream.py", "--name", name,
                "--events", self.events, "--ready", ready]
        for p in self.ports:
            args += ["--port", p]
        self.proc = env.spawn(args, name)
        wait_for(lambda: self._ready(ready), timeout=15, what=f"{name} listening")

    def _ready(self, ready: Path) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"{self.name} exited:\n{self.proc.output()}")
        return ready.exists()

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


_STUBS: dict = {}


def grpc_stubs(env):
    """Generates echo_pb2*.py into the test's temp dir and imports them (once per process)."""
    gen = env.tmp / "gen"
    gen.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PEERS}", f"--python_out={gen}",
                    f"--grpc_python_out={gen}", str(PEERS / "echo.proto")],
                   check=True, capture_output=True)
    if not _STUBS:
        sys.path.insert(0, str(gen))
        try:
            import echo_pb2
            import echo_pb2_grpc
        finally:
            sys.path.remove(str(gen))
        _STUBS.update(pb=echo_pb2, pbg=echo_pb2_grpc)
    return gen, _STUBS["pb"], _STUBS["pbg"]


class GrpcUpstream:
    """peers/grpc_upstream.py in its own process."""

    def __init__(self, env, name: str = "grpc-up"):
        self.gen, self.pb, self.pbg = grpc_stubs(env)
        self.port = free_port()
        self.events = env.tmp / f"{name}-events.jsonl"
        ready = env.tmp / f"{name}-ready.json"
        self.proc = env.spawn([sys.executable, PEERS / "grpc_upstream.py", "--port", self.port,
                               "--gen-dir", self.gen, "--events", self.events, "--ready", ready],
                              name)
        wait_for(lambda: ready.exists() or not self.proc.alive(), timeout=20,
                 what="grpc upstream listening")
        assert self.proc.alive(), self.proc.output()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_agent(env, g, scheme: str, name: str, upstreams: list[str] | None = None,
                grpc_upstream: str | None = None, extra: list[str] | None = None,
                token_file: Path | None = None, wait: bool = True, proc_name: str | None = None):
    """An agent for `name` on `scheme` (ws/wss pinned to WebSocket), registered at `g`."""
    tok = token_file or env.token_file(name)
    args = []
    if scheme.startswith("ws"):
        args += ["--transport", "websocket"]
    for u in upstreams or []:
        args += ["--upstream", u]
    if grpc_upstream:
        args += ["--grpc-upstream", grpc_upstream]
    args += extra or []
    p = env.agent(g.url(scheme, "/tunnel"), tok, extra=args, name=proc_name or f"agent-{name}")
    if wait:
        g.wait_agent(name, transport=scheme)
        wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 1, timeout=10,
                 what="a parked tunnel")
    return p, tok


def api_conn(g, timeout: float = 60.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", g.api_port, timeout=timeout)


def api_request(g, method: str, path: str, token: str | None, headers: dict | None = None,
                body=None, timeout: float = 30.0):
    """One request on the API listener; returns (status, headers, body)."""
    c = api_conn(g, timeout)
    try:
        h = dict(headers or {})
        if token is not None:
            h.setdefault("Authorization", f"Bearer {token}")
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


_SHA: dict[int, str] = {}


def pattern_sha256(n: int) -> str:
    if n not in _SHA:
        h = hashlib.sha256()
        for piece in pattern.pattern_chunks(n, MiB):
            h.update(piece)
        _SHA[n] = h.hexdigest()
    return _SHA[n]


class RssSampler(threading.Thread):
    """Samples VmRSS (KiB) of some processes every 50 ms; keeps the peak of each."""

    def __init__(self, procs: dict):
        super().__init__(daemon=True)
        self.procs = procs
        self.base = {k: p.rss_kib() for k, p in procs.items()}
        self.peak = dict(self.base)
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            for k, p in self.procs.items():
                try:
                    self.peak[k] = max(self.peak[k], p.rss_kib())
                except (OSError, RuntimeError):
                    pass
            self.halt.wait(0.05)

    def stop(self) -> dict:
        self.halt.set()
        self.join(5)
        return {k: (self.base[k], self.peak[k], self.peak[k] - self.base[k]) for k in self.procs}


def grpc_channel(g):
    return grpc.insecure_channel(
        f"127.0.0.1:{g.api_port}",
        options=[("grpc.max_send_message_length", GRPC_MAX),
                 ("grpc.max_receive_message_length", GRPC_MAX),
                 ("grpc.enable_retries", 0)])


def md(agent: str, token: str, *more) -> list:
    return [("agentgate-agent", agent), ("authorization", f"Bearer {token}"), *more]


# --------------------------------------------------------------------------------------------
# 1. Large streamed bodies both ways, on each transport, with bounded memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_bodies_stream_both_ways_with_bounded_memory(env, scheme):
    api = env.token("caller", kind="api")
    tok = env.token_file(f"big-{scheme}")
    g = env.gateway()
    up = HttpUpstream(env)
    agent, _ = start_agent(env, g, scheme, f"big-{scheme}", upstreams=[up.url], token_file=tok)
    base = f"/agents/big-{scheme}/proxy"

    # Warm up both processes (first tunnel use, allocator arenas) before the baseline.
    for _ in range(3):
        status, _, body = api_request(g, "GET", f"{base}/download?size={4 * MiB}", api)
        assert status == 200 and len(body) == 4 * MiB
    expected = pattern_sha256(BIG)
    # TLS transports download chunked and upload with Content-Length, cleartext ones the
    # other way round, so both framings cross both transport families (gRPC and WebSocket).
    chunked_down = scheme in ("grpcs", "wss")
    chunked_up = not chunked_down

    sampler = RssSampler({"gateway": g.proc, "agent": agent})
    sampler.start()
    try:
        # Download: read into a fixed buffer, hash as we go.
        t0 = time.monotonic()
        c = api_conn(g, timeout=120)
        c.request("GET", f"{base}/download?size={BIG}&chunked={int(chunked_down)}&id=down",
                  headers={"Authorization": f"Bearer {api}"})
        r = c.getresponse()
        assert r.status == 200, r.read(2000)
        if chunked_down:
            assert r.getheader("Content-Length") is None
        else:
            assert r.getheader("Content-Length") == str(BIG)
        h = hashlib.sha256()
        buf = bytearray(MiB)
        mv = memoryview(buf)
        got = 0
        while True:
            n = r.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
            got += n
        c.close()
        down_s = time.monotonic() - t0
        assert got == BIG, f"downloaded {got} bytes, want {BIG}"
        assert h.hexdigest() == expected, "downloaded bytes differ from the pattern"

        # Upload: a generator; nothing holds the body.
        t0 = time.monotonic()
        c = api_conn(g, timeout=120)
        headers = {"Authorization": f"Bearer {api}", "Content-Type": "application/octet-stream"}
        if not chunked_up:
            headers["Content-Length"] = str(BIG)
        c.request("POST", f"{base}/upload?id=up", body=pattern.pattern_chunks(BIG, MiB),
                  headers=headers, encode_chunked=chunked_up)
        r = c.getresponse()
        answer = r.read()
        c.close()
        up_s = time.monotonic() - t0
        assert r.status == 200, answer[:2000]
        res = json.loads(answer)
        assert res["bytes"] == BIG
        assert res["pattern_ok"] is True
        assert res["sha256"] == expected
    finally:
        mem = sampler.stop()
    print(f"\n[{scheme}] download {BIG / MiB:.0f} MiB in {down_s:.1f}s ({BIG / MiB / down_s:.0f} MiB/s, "
          f"{'chunked' if chunked_down else 'content-length'}); upload in {up_s:.1f}s "
          f"({BIG / MiB / up_s:.0f} MiB/s, {'chunked' if chunked_up else 'content-length'}); "
          + "; ".join(f"{k} RSS {b // 1024}->{p // 1024} MiB (+{d // 1024})" for k, (b, p, d) in mem.items()))
    for who, (b, p, d) in mem.items():
        assert d < RSS_CEILING_KIB, f"{who} RSS grew by {d // 1024} MiB ({b // 1024} -> {p // 1024} MiB)"
    assert g.metric_sum("agentgate_tunnel_bytes_total", direction="from_agent") >= BIG
    assert g.metric_sum("agentgate_tunnel_bytes_total", direction="to_agent") >= BIG


# --------------------------------------------------------------------------------------------
# 2. Many concurrent requests to one agent
# --------------------------------------------------------------------------------------------


def test_200_concurrent_requests_to_one_agent(env):
    api = env.token("caller", kind="api")
    tok = env.token_file("busy")
    g = env.gateway()
    up = HttpUpstream(env)
    start_agent(env, g, "grpc", "busy", upstreams=[up.url], token_file=tok)
    n = 200
    barrier = threading.Barrier(n, timeout=30)

    def one(i: int):
        c = api_conn(g, timeout=30)
        try:
            c.connect()
            barrier.wait()
            t0 = time.monotonic()
            # Each request stays 1 s at the upstream, so they overlap there.
            c.request("POST", f"/agents/busy/proxy/sleep?ms=1000&i={i}", body=f"body-{i}".encode(),
                      headers={"Authorization": f"Bearer {api}", "X-Req": str(i)})
            r = c.getresponse()
            body = r.read()
            return i, r.status, body, time.monotonic() - t0
        finally:
            c.close()

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=n) as ex:
        results = list(ex.map(one, range(n)))
    elapsed = time.monotonic() - t0
    failures = [(i, s, b[:200]) for i, s, b, _ in results if s != 200]
    assert not failures, f"{len(failures)} of {n} failed, first: {failures[:3]}"
    for i, _, body, _ in results:
        info = json.loads(body)
        assert info["target"] == f"/sleep?ms=1000&i={i}"
        assert info["body_len"] == len(f"body-{i}")
        assert [v for k, v in info["headers"] if k.lower() == "x-req"] == [str(i)]
    lat = sorted(d for *_, d in results)
    stats = json.loads(api_request(g, "GET", "/agents/busy/proxy/stats", api)[2])
    print(f"\n200 concurrent: all ok in {elapsed:.2f}s; latency p50 {lat[n // 2] * 1000:.0f} ms, "
          f"p99 {lat[int(n * 0.99)] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms (upstream holds "
          f"each 1 s); peak in flight at the upstream: {stats['peak']}")


# --------------------------------------------------------------------------------------------
# 3. Twenty agents at once
# --------------------------------------------------------------------------------------------


def test_20_agents_each_reach_their_own_upstream(env):
    n = 20
    api = env.token("caller", kind="api")
    toks = [env.token_file(f"fleet-{i:02d}") for i in range(n)]
    g = env.gateway()
    up = HttpUpstream(env, name="fleet-up", ports=n)
    for i in range(n):
        scheme = SCHEMES[i % 4]
        start_agent(env, g, scheme, f"fleet-{i:02d}", upstreams=[f"http://127.0.0.1:{up.ports[i]}"],
                    token_file=toks[i], wait=False)
    for i in range(n):
        g.wait_agent(f"fleet-{i:02d}", transport=SCHEMES[i % 4], timeout=30)
    listed = {a["name"]: a["transport"] for a in g.agents()}
    assert {k: v for k, v in listed.items() if k.startswith("fleet-")} == \
        {f"fleet-{i:02d}": SCHEMES[i % 4] for i in range(n)}

    def one(i: int):
        return i, api_request(g, "GET", f"/agents/fleet-{i:02d}/proxy/inspect?who={i}", api)

    with ThreadPoolExecutor(max_workers=n) as ex:
        results = list(ex.map(one, range(n)))
    for i, (status, _, body) in results:
        assert status == 200, (i, body[:300])
        info = json.loads(body)
        assert info["port"] == up.ports[i], f"fleet-{i:02d} reached port {info['port']}"
        assert info["target"] == f"/inspect?who={i}"


# --------------------------------------------------------------------------------------------
# 4. gRPC through the tunnel, grpcio at both ends
# --------------------------------------------------------------------------------------------


class GrpcSetup:
    def __init__(self, env, scheme, gateway_extra: list[str] | None = None):
        self.env = env
        self.api = env.token("caller", kind="api")
        tok = env.token_file("rpc")
        self.g = env.gateway(extra=gateway_extra)
        self.up = GrpcUpstream(env)
        self.pb, self.pbg = self.up.pb, self.up.pbg
        self.agent, _ = start_agent(env, self.g, scheme, "rpc", grpc_upstream=self.up.url,
                                    token_file=tok)
        self.channel = grpc_channel(self.g)
        self.stub = self.pbg.EchoStub(self.channel)
        self.meta = md("rpc", self.api, ("x-client-meta", "hello"))
        self.scheme = scheme


@pytest.fixture(scope="module", params=["grpc", "wss"])
def rpc(request):
    """One gateway, gRPC upstream and agent per transport, shared by the gRPC tests."""
    import tempfile

    from conftest import Env
    with tempfile.TemporaryDirectory(prefix="agentgate-e2e-rpc-") as d:
        env = Env(Path(d))
        try:
            s = GrpcSetup(env, request.param)
            yield s
            s.channel.close()
        finally:
            env.close()


def test_grpc_unary_and_metadata(rpc):
    pb = rpc.pb
    t0 = time.monotonic()
    reply, call = rpc.stub.Unary.with_call(pb.EchoRequest(payload=b"\x00ping\xff", text="héllo"),
                                           metadata=rpc.meta, timeout=10)
    unary_ms = (time.monotonic() - t0) * 1000
    assert reply.payload == b"\x00ping\xff" and reply.text == "héllo"
    assert reply.metadata["x-client-meta"] == "hello"
    assert "authorization" not in reply.metadata, "the API token reached the upstream"
    assert "agentgate-agent" not in reply.metadata
    assert ("x-echo-header", "unary") in call.initial_metadata()
    assert ("x-echo-trailer", "unary-done") in call.trailing_metadata()
    assert call.code() == grpc.StatusCode.OK
    t0 = time.monotonic()
    for i in range(50):
        assert rpc.stub.Unary(pb.EchoRequest(text=str(i)), metadata=rpc.meta, timeout=10).text == str(i)
    print(f"\n[{rpc.scheme}] first gRPC unary {unary_ms:.1f} ms; then "
          f"{(time.monotonic() - t0) * 1000 / 50:.1f} ms per sequential unary call")


def test_grpc_server_streaming(rpc):
    got = list(rpc.stub.ServerStream(rpc.pb.StreamRequest(count=200, payload=b"s" * 10000),
                                     metadata=rpc.meta, timeout=20))
    assert [r.index for r in got] == list(range(200))
    assert all(r.payload == b"s" * 10000 for r in got)


def test_grpc_client_streaming(rpc):
    pb = rpc.pb
    parts = [os.urandom(1000 + i) for i in range(50)]
    reply = rpc.stub.ClientStream(
        iter(pb.EchoRequest(payload=p, text=str(i)) for i, p in enumerate(parts)),
        metadata=rpc.meta, timeout=20)
    assert reply.count == 50
    assert reply.total_bytes == sum(map(len, parts))
    assert reply.sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert reply.text == ",".join(str(i) for i in range(50))


def test_grpc_bidi_streaming_in_lock_step(rpc):
    """Each reply must arrive before the next request is sent: nothing waits for half-close."""
    import queue
    pb = rpc.pb
    q: queue.Queue = queue.Queue()

    def requests():
        while True:
            item = q.get(timeout=20)
            if item is None:
                return
            yield item

    q.put(pb.EchoRequest(text="m0", payload=b"0"))
    responses = rpc.stub.Bidi(requests(), metadata=rpc.meta, timeout=20)
    for i in range(20):
        r = next(responses)
        assert (r.index, r.text, r.payload) == (i, f"M{i}", str(i).encode())
        q.put(pb.EchoRequest(text=f"m{i + 1}", payload=str(i + 1).encode()) if i < 19 else None)
    assert list(responses) == []


@pytest.mark.parametrize("scheme", ["grpc", "ws"])
def test_a_grpc_call_whose_agent_goes_away_mid_answer_ends_unavailable(env, scheme):
    """An answer under way when the agent's connection breaks (its process is killed here):
    the caller got a reset, which gRPC clients report as INTERNAL and do not retry. Cut between
    two messages, as here, the call ends with UNAVAILABLE and a sentence, and the access line
    says `broken`."""
    import queue

    s = GrpcSetup(env, scheme)
    try:
        q: queue.Queue = queue.Queue()

        def requests():
            while (item := q.get(timeout=30)) is not None:
                yield item

        q.put(s.pb.EchoRequest(text="m0"))
        responses = s.stub.Bidi(requests(), metadata=s.meta, timeout=30)
        assert next(responses).text == "M0"
        s.agent.send_signal(signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as ei:
            next(responses)
        q.put(None)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
        assert "broke off the call mid-answer" in (ei.value.details() or ""), ei.value.details()
        line = wait_for(lambda: next((x for x in ic.plain(s.g.proc.output()).splitlines()
                                      if "agentgate::access" in x and "Bidi" in x), None),
                        timeout=5, what="the access line")
        assert 'outcome="broken"' in line, line
    finally:
        s.channel.close()


def test_a_grpc_answer_still_streaming_when_the_shutdown_grace_ends_gets_unavailable(env):
    """A streaming call through the tunnel API that outlasts `shutdown_grace`: when the grace
    ends the gateway ends it with UNAVAILABLE and a sentence (a status gRPC clients may retry
    elsewhere), the access line says `shutdown` (not that the caller went away), and the
    gateway exits cleanly."""
    import queue

    s = GrpcSetup(env, "grpc", gateway_extra=["--set", 'shutdown_grace="2s"'])
    try:
        q: queue.Queue = queue.Queue()

        def requests():
            i = 0
            while q.empty():
                yield s.pb.EchoRequest(text=f"m{i}")
                i += 1
                time.sleep(0.2)

        responses = s.stub.Bidi(requests(), metadata=s.meta, timeout=30)
        assert next(responses).text == "M0"
        t0 = time.monotonic()
        s.g.proc.send_signal(signal.SIGTERM)
        answered = 1
        with pytest.raises(grpc.RpcError) as ei:
            for _ in responses:
                answered += 1
        ended_after = time.monotonic() - t0
        q.put(None)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
        assert "grace period ended before the answer did; retry the request" in \
            (ei.value.details() or ""), ei.value.details()
        assert answered >= 5, f"the call stopped being served during the grace ({answered} answers)"
        assert 1.5 <= ended_after <= 5, f"ended {ended_after:.1f} s after SIGTERM (grace 2 s)"
        assert s.g.proc.wait(timeout=10) == 0, ic.plain(s.g.proc.output())[-2000:]
        line = next((x for x in ic.plain(s.g.proc.output()).splitlines()
                     if "agentgate::access" in x and "Bidi" in x), None)
        assert line and 'outcome="shutdown"' in line, line
    finally:
        s.channel.close()


def test_grpc_error_status_message_trailers_and_details_preserved(rpc):
    pb = rpc.pb
    message = "widget ünïcode 100% broken: see details"
    with pytest.raises(grpc.RpcError) as ei:
        rpc.stub.Fail(pb.FailRequest(code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                                     message=message), metadata=rpc.meta, timeout=10)
    err = ei.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert err.details() == message
    trailers = dict(err.trailing_metadata())
    assert trailers.get("x-error-reason") == "widget-missing"
    assert trailers.get("x-error-bin") == b"\x00\x01\xfe\xff"
    details = pb.ErrorDetails.FromString(trailers["grpc-status-details-bin"])
    assert (details.code, details.message, list(details.hints)) == \
        (9, message, ["check the widget", "then retry"])


def test_grpc_error_after_messages_preserved(rpc):
    """An error that arrives in real trailers, after some messages."""
    message = "stream broke at 3 — ünïcode 50%"
    got = []
    with pytest.raises(grpc.RpcError) as ei:
        for r in rpc.stub.ServerStream(rpc.pb.StreamRequest(count=10, payload=b"p", fail_after=3,
                                                            fail_message=message),
                                       metadata=rpc.meta, timeout=10):
            got.append(r.index)
    assert got == [0, 1, 2]
    assert ei.value.code() == grpc.StatusCode.ABORTED, ei.value
    assert ei.value.details() == message
    assert ("x-error-reason", "stream-broke") in ei.value.trailing_metadata()


def test_grpc_4mib_messages_both_ways(rpc):
    big = os.urandom(4 * MiB)
    t0 = time.monotonic()
    reply = rpc.stub.Unary(rpc.pb.EchoRequest(payload=big), metadata=rpc.meta, timeout=30)
    took = time.monotonic() - t0
    assert reply.total_bytes == len(big) and reply.sha256 == hashlib.sha256(big).hexdigest()
    assert reply.payload == big
    print(f"\n[{rpc.scheme}] 4 MiB gRPC echo (4 MiB each way) in {took * 1000:.0f} ms")


def test_grpc_deadline_exceeded_promptly_and_upstream_cancelled(rpc):
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        rpc.stub.Slow(rpc.pb.SlowRequest(millis=15000, id="deadline"), metadata=rpc.meta,
                      timeout=1.0)
    took = time.monotonic() - t0
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ei.value
    assert took < 3.0, f"DEADLINE_EXCEEDED after {took:.1f}s for a 1s deadline"
    wait_event(rpc.up.events, event="slow_cancelled", id="deadline", timeout=5)
    print(f"\n[{rpc.scheme}] DEADLINE_EXCEEDED after {took * 1000:.0f} ms (1 s deadline)")


def test_grpc_metadata_a_grpc_server_would_reject_is_refused_at_the_gateway(rpc):
    """The agent carries every caller's calls to its gRPC upstream over one connection, and a
    gRPC C-core server that read one malformed `grpc-timeout` there failed later calls of
    OTHER callers that carry a deadline (20 of 20 once). Such a call, or a `-bin` value that is
    not base64, is refused with INVALID_ARGUMENT and never forwarded; other callers' calls
    with deadlines pass."""
    import raw_h2

    request = rpc.pb.EchoRequest(text="poison").SerializeToString()
    for bad, says in (([("grpc-timeout", "abc")], "is not a gRPC deadline"),
                      ([("x-trace-bin", "not base64!")], "is not base64")):
        c = raw_h2.RawH2(rpc.g.api_port)
        try:
            sid = c.request("/agentgate.test.Echo/Unary", headers=rpc.meta + bad,
                            body=raw_h2.grpc_frame(request))
            a = c.wait(sid)
        finally:
            c.close()
        assert a.grpc_status == "3" and says in a.grpc_message, (a.headers, a.trailers)
    for i in range(20):
        assert rpc.stub.Unary(rpc.pb.EchoRequest(text=str(i)), metadata=rpc.meta, timeout=5).text == str(i)


def test_grpc_caller_cancel_reaches_upstream(rpc):
    """No deadline anywhere: only the tunnel can tell the upstream that the caller left."""
    fut = rpc.stub.Slow.future(rpc.pb.SlowRequest(millis=15000, id="cancel"), metadata=rpc.meta)
    wait_event(rpc.up.events, event="slow_started", id="cancel", timeout=10)
    t_cancel = time.time()
    assert fut.cancel()
    ev = wait_event(rpc.up.events, event="slow_cancelled", id="cancel", timeout=5)
    assert not [e for e in read_events(rpc.up.events)
                if e["event"] == "slow_completed" and e.get("id") == "cancel"]
    print(f"\n[{rpc.scheme}] upstream saw the cancel {(ev['t'] - t_cancel) * 1000:.0f} ms after "
          "the caller cancelled")


# --------------------------------------------------------------------------------------------
# 5. A client that goes away mid-download cancels the upstream request
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["grpc", "ws"])
def test_client_disconnect_mid_download_cancels_upstream(env, scheme):
    api = env.token("caller", kind="api")
    tok = env.token_file("dl")
    g = env.gateway()
    up = HttpUpstream(env)
    agent, _ = start_agent(env, g, scheme, "dl", upstreams=[up.url], token_file=tok)
    huge = 64 * 1024 * MiB  # far more than will ever be read
    s = socket.create_connection(("127.0.0.1", g.api_port), timeout=10)
    s.sendall((f"GET /agents/dl/proxy/download?size={huge}&id=gone HTTP/1.1\r\n"
               f"Host: 127.0.0.1\r\nAuthorization: Bearer {api}\r\n\r\n").encode())
    first = s.recv(MiB)
    assert first.startswith(b"HTTP/1.1 200 "), first[:300]
    got = len(first)
    while got < 8 * MiB:
        data = s.recv(MiB)
        assert data, "connection closed early"
        got += len(data)
    t_close = time.time()
    s.close()
    ev = wait_event(up.events, event="client_disconnected", id="gone", timeout=5)
    assert ev["sent"] < huge
    print(f"\n[{scheme}] client read {got // MiB} MiB then closed; upstream saw the disconnect "
          f"{(ev['t'] - t_close) * 1000:.0f} ms later after sending {ev['sent'] // MiB} MiB")
    # The agent reports it, and the tunnel keeps serving.
    try:
        wait_for(lambda: "tunnel request not completed" in agent.output(), timeout=5,
                 what="agent logs the unfinished request")
    except AssertionError:
        raise AssertionError("agent did not log the cancelled request:\n" + agent.output()[-3000:])
    status, _, body = api_request(g, "GET", "/agents/dl/proxy/inspect", api)
    assert status == 200, body


# --------------------------------------------------------------------------------------------
# 6. The error table
# --------------------------------------------------------------------------------------------


def _grpc_error(stub_call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as ei:
        stub_call(*args, **kw)
    return ei.value


def test_error_table(env):
    gen, pb, pbg = grpc_stubs(env)
    api = env.token("caller", kind="api")
    limited = env.token("limited", kind="api", agents=["someone-else"])
    agent_tok_text = env.token("not-an-api-token")
    tok_refused = env.token_file("refused")
    tok_slow = env.token_file("slowpoke")
    env.token_file("ghost")  # known, never connected
    closed = free_port()
    # A gRPC "upstream" that accepts TCP (kernel backlog) and never says a word.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent_port = silent.getsockname()[1]
    g = env.gateway()
    up = HttpUpstream(env)
    start_agent(env, g, "grpc", "refused", upstreams=[f"http://127.0.0.1:{closed}"],
                grpc_upstream=f"http://127.0.0.1:{closed}", token_file=tok_refused)
    start_agent(env, g, "ws", "slowpoke", upstreams=[f"{up.url}/hang"],
                grpc_upstream=f"http://127.0.0.1:{silent_port}", token_file=tok_slow,
                extra=["--upstream-response-timeout", "1s"])
    ch = grpc_channel(g)
    stub = pbg.EchoStub(ch)
    req = pb.EchoRequest(text="x")
    try:
        # Unknown agent.
        status, _, body = api_request(g, "GET", "/agents/nobody/proxy/", api)
        assert status == 404, body
        assert b"nobody" in body
        e = _grpc_error(stub.Unary, req, metadata=md("nobody", api), timeout=10)
        assert e.code() == grpc.StatusCode.NOT_FOUND, e

        # Known (a token exists) but not connected: 503 + Retry-After, promptly.
        t0 = time.monotonic()
        status, headers, body = api_request(g, "GET", "/agents/ghost/proxy/", api)
        assert status == 503, body
        assert headers.get("Retry-After", "").isdigit(), dict(headers)
        assert time.monotonic() - t0 < 5
        e = _grpc_error(stub.Unary, req, metadata=md("ghost", api), timeout=10)
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e

        # Upstream refused: 502 with the agent's reason naming the upstream, never its address
        # (that stays in the agent's log); UNAVAILABLE with the same sentence.
        status, _, body = api_request(g, "GET", "/agents/refused/proxy/x", api)
        assert status == 502, body
        text = body.decode()
        assert "default upstream" in text and "refused" in text.lower(), text
        assert f"{closed}" not in text and "127.0.0.1" not in text, text
        print(f"\n502 body: {text.strip()}")
        e = _grpc_error(stub.Unary, req, metadata=md("refused", api), timeout=10)
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        assert "grpc upstream" in e.details() and "refused" in e.details().lower(), e.details()
        assert f"{closed}" not in e.details(), e.details()
        agent_log = next(p for p in env.procs if "refused" in " ".join(map(str, p.p.args))).output()
        assert f"127.0.0.1:{closed}" in agent_log, "the agent's own log names the address"

        # Upstream timed out: 504 after the agent's --upstream-response-timeout; the upstream
        # sees its request dropped. gRPC: DEADLINE_EXCEEDED at the caller's deadline.
        t0 = time.monotonic()
        status, _, body = api_request(g, "GET", "/agents/slowpoke/proxy/?id=t504", api)
        took = time.monotonic() - t0
        assert status == 504, body
        assert b"did not answer" in body, body
        assert took < 5, f"504 after {took:.1f}s with a 1s response timeout"
        wait_event(up.events, event="hang_closed", id="t504", timeout=5)
        t0 = time.monotonic()
        e = _grpc_error(stub.Unary, req, metadata=md("slowpoke", api), timeout=1.0)
        took_grpc = time.monotonic() - t0
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
        assert took_grpc < 3

        # API token missing, invalid, or of the wrong kind: 401 / UNAUTHENTICATED.
        for bad in (None, "not-a-token", agent_tok_text):
            status, headers, body = api_request(g, "GET", "/agents/refused/proxy/", bad)
            assert status == 401, (bad, body)
            assert "Bearer" in headers.get("WWW-Authenticate", "")
        e = _grpc_error(stub.Unary, req, metadata=[("agentgate-agent", "refused")], timeout=10)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        e = _grpc_error(stub.Unary, req, metadata=md("refused", "not-a-token"), timeout=10)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e

        # API token limited to another agent: 403 / PERMISSION_DENIED.
        status, _, body = api_request(g, "GET", "/agents/refused/proxy/", limited)
        assert status == 403, body
        e = _grpc_error(stub.Unary, req, metadata=md("refused", limited), timeout=10)
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e

        # Unknown upstream name: 404.
        status, _, body = api_request(g, "GET", "/agents/refused/upstreams/nope/x", api)
        assert status == 404, body
        assert b"nope" in body
    finally:
        ch.close()
        silent.close()
    print(f"\n504 after {took * 1000:.0f} ms (1 s response timeout); gRPC DEADLINE_EXCEEDED "
          f"after {took_grpc * 1000:.0f} ms (1 s deadline)")


# --------------------------------------------------------------------------------------------
# 7. An agent that restarts is reachable again
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_agent_restart_is_reachable_again(env, sig):
    api = env.token("caller", kind="api")
    tok = env.token_file("phoenix")
    g = env.gateway()
    up = HttpUpstream(env)
    first, _ = start_agent(env, g, "grpc", "phoenix", upstreams=[up.url], token_file=tok,
                           proc_name="agent-1")
    status, _, _ = api_request(g, "GET", "/agents/phoenix/proxy/inspect", api)
    assert status == 200
    old_id = g.wait_agent("phoenix")["instance_id"]
    first.stop(sig)
    wait_for(lambda: not any(a["name"] == "phoenix" for a in g.agents()), timeout=10,
             what="agent gone from /api/v1/agents")
    status, headers, body = api_request(g, "GET", "/agents/phoenix/proxy/inspect", api)
    assert status == 503 and "Retry-After" in headers, (status, body)
    start_agent(env, g, "grpc", "phoenix", upstreams=[up.url], token_file=tok, proc_name="agent-2")
    assert g.wait_agent("phoenix")["instance_id"] != old_id
    for i in range(10):
        status, _, body = api_request(g, "GET", f"/agents/phoenix/proxy/inspect?after={i}", api)
        assert status == 200, (i, body)
        assert json.loads(body)["target"] == f"/inspect?after={i}"


def test_a_get_whose_agent_dies_under_it_gets_503_after_the_reconnect_wait(env):
    """A GET in flight when its agent is killed is retried on another tunnel (GETs are
    idempotent), but the agent went with its tunnels: the retry waits as long as for any agent
    connected nowhere (agent_reconnect_wait, 2 s), not tunnel_wait (10 s, for a busy agent
    that is connected), then 503 not_connected, and the access line says the agent answered
    nothing (transport none)."""
    api = env.token("caller", kind="api")
    g = env.gateway()
    up = HttpUpstream(env)
    agent, _ = start_agent(env, g, "grpc", "doomed", upstreams=[up.url])
    got: list = []
    t = threading.Thread(target=lambda: got.append(api_request(g, "GET", "/agents/doomed/proxy/hang?id=d", api)),
                         daemon=True)
    t.start()
    wait_event(up.events, timeout=10, event="request", method="GET")
    time.sleep(0.2)
    t0 = time.monotonic()
    agent.send_signal(signal.SIGKILL)
    t.join(20)
    took = time.monotonic() - t0
    assert got, "no answer"
    status, headers, body = got[0]
    assert status == 503, (status, body[:300])
    assert b"is not connected" in body, body[:300]
    assert took < 5, f"503 came {took:.1f} s after the agent died (agent_reconnect_wait is 2 s)"


# --------------------------------------------------------------------------------------------
# 8. Headers and query strings
# --------------------------------------------------------------------------------------------


def _raw_request(port: int, head: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    """Sends a hand-written HTTP/1.1 request; returns status, headers (lower-case), body."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(head.encode() + body)
        f = s.makefile("rb")
        status = int(f.readline().split()[1])
        headers: dict = {}
        while True:
            line = f.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, v = line.decode().split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        if "content-length" in headers:
            data = f.read(int(headers["content-length"][0]))
        else:
            data = b""
            while True:
                size = int(f.readline().split(b";")[0], 16)
                if size == 0:
                    break
                data += f.read(size)
                f.readline()
        return status, headers, data
    finally:
        s.close()


def test_forwarding_headers_hop_by_hop_token_and_query(env):
    api = env.token("caller", kind="api")
    tok = env.token_file("hdr")
    g = env.gateway()
    up = HttpUpstream(env)
    start_agent(env, g, "grpc", "hdr", upstreams=[up.url], token_file=tok)
    query = "a=1&b=x%20y&c=%2F%3F%26&empty=&a=2&utf=%C3%A9&plus=1+2"
    head = (f"GET /agents/hdr/proxy/inspect/deep/path?{query} HTTP/1.1\r\n"
            f"Host: api.example.test:{g.api_port}\r\n"
            f"Authorization: Bearer {api}\r\n"
            "Connection: keep-alive, X-Private-Hop\r\n"
            "X-Private-Hop: secret\r\n"
            "Keep-Alive: timeout=5\r\n"
            "TE: trailers, deflate\r\n"
            "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            "X-Custom: kept\r\n"
            "X-Forwarded-For: 203.0.113.7\r\n"
            "X-Forwarded-For: 198.51.100.2\r\n"
            "\r\n")
    status, _, body = _raw_request(g.api_port, head)
    assert status == 200, body
    info = json.loads(body)
    assert info["target"] == f"/inspect/deep/path?{query}"
    seen = {}
    for k, v in info["headers"]:
        seen.setdefault(k.lower(), []).append(v)
    assert seen.get("x-custom") == ["kept"]
    # Every hop the caller's line(s) named, then the caller (the second line was lost).
    assert seen.get("x-forwarded-for") == ["203.0.113.7, 198.51.100.2, 127.0.0.1"]
    assert seen.get("x-forwarded-proto") == ["http"]
    assert seen.get("x-forwarded-host") == [f"api.example.test:{g.api_port}"]
    for hop in ("connection", "keep-alive", "te", "x-private-hop", "proxy-authorization",
                "authorization", "agentgate-token"):
        assert hop not in seen, f"{hop} reached the upstream: {seen[hop]}"
    assert not any(api in v for vs in seen.values() for v in vs), "the API token reached the upstream"

    # With the token in agentgate-token, the caller's own Authorization goes through untouched.
    status, _, body = api_request(g, "GET", "/agents/hdr/proxy/inspect", None,
                                  headers={"agentgate-token": api,
                                           "Authorization": "Basic dXNlcjpwYXNz"})
    assert status == 200, body
    seen = {k.lower(): v for k, v in json.loads(body)["headers"]}
    assert seen.get("authorization") == "Basic dXNlcjpwYXNz"
    assert "agentgate-token" not in seen

    # Transfer-Encoding is this hop's framing: the client's codings are not forwarded as such,
    # and the body arrives intact.
    payload = b"0123456789" * 1000
    chunked = b"".join(b"%x\r\n" % len(payload[i:i + 3000]) + payload[i:i + 3000] + b"\r\n"
                       for i in range(0, len(payload), 3000)) + b"0\r\n\r\n"
    head = ("POST /agents/hdr/proxy/inspect HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{g.api_port}\r\n"
            f"Authorization: Bearer {api}\r\n"
            "Transfer-Encoding: gzip, chunked\r\n"
            "\r\n")
    status, _, body = _raw_request(g.api_port, head, chunked)
    assert status == 200, body
    info = json.loads(body)
    seen = {}
    for k, v in info["headers"]:
        seen.setdefault(k.lower(), []).append(v)
    assert info["body_len"] == len(payload)
    assert seen.get("transfer-encoding", ["chunked"]) == ["chunked"], seen
    assert "gzip" not in json.dumps(seen)

    # An upgrade the tunnel does not carry (it reached the upstream as a plain GET), and a
    # gRPC call over HTTP/1.1 (its status, in trailers, cannot come back): a sentence each,
    # and nothing reaches the upstream.
    before = len(read_events(up.events))
    status, _, body = _raw_request(g.api_port, "GET /agents/hdr/proxy/ws HTTP/1.1\r\nHost: x\r\n"
                                   f"Authorization: Bearer {api}\r\nUpgrade: websocket\r\n"
                                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                   "Sec-WebSocket-Version: 13\r\n\r\n")
    assert status == 501 and b"does not carry protocol upgrades" in body, (status, body)
    status, _, body = _raw_request(g.api_port, "POST /agentgate.test.Echo/Unary HTTP/1.1\r\nHost: x\r\n"
                                   f"Authorization: Bearer {api}\r\nagentgate-agent: hdr\r\n"
                                   "Content-Type: application/grpc\r\nContent-Length: 5\r\n\r\n",
                                   b"\x00\x00\x00\x00\x00")
    assert status == 505 and b"gRPC needs HTTP/2" in body, (status, body)
    assert len(read_events(up.events)) == before

    # 150 headers each way over HTTP/1.1 (hyper's default limit of 100 gave the caller 431, and
    # an upstream's answer with more failed inside the agent: 502 "failed before answering").
    many = "".join(f"X-Many-{i}: {i}\r\n" for i in range(150))
    status, _, body = _raw_request(g.api_port, "GET /agents/hdr/proxy/inspect HTTP/1.1\r\nHost: x\r\n"
                                   f"Authorization: Bearer {api}\r\n{many}\r\n")
    assert status == 200, (status, body[:300])
    assert sum(1 for k, _ in json.loads(body)["headers"] if k.lower().startswith("x-many-")) == 150
    status, headers, body = _raw_request(g.api_port, "GET /agents/hdr/proxy/many-headers?n=150 HTTP/1.1\r\n"
                                         f"Host: x\r\nAuthorization: Bearer {api}\r\n\r\n")
    assert status == 200 and body == b"ok", (status, body[:300])
    assert sum(1 for k in headers if k.startswith("x-many-")) == 150
