"""gRPC backends behind the gateway: agents and CI runners calling services that live BEHIND
the gateway, over the agent port.

The gateway routes calls by service-name prefix (`--backend runner.jobs.v1.=URL`, or
`[[backends]]` in a TOML config file) to a backend: here a grpcio "job router" in the test
process (job_router.py: raw bytes, no codegen, every call recorded with its metadata and
whether it was cancelled). Callers are:
- grpcio clients holding an agent token (`authorization: Bearer ...`), straight to the agent
  port over grpc:// (cleartext h2c) and grpcs:// (TLS, test CA, name localhost);
- grpcio clients WITHOUT a token on an agent's local listener (`agentgate agent
  --local-listen`), whose calls go through the agent's own connection to the gateway, over each
  of the four agent transports;
- the same through the shipped nginx and HAProxy configs, and against two cluster replicas.

What must hold (the spec): all four call kinds with messages, metadata, trailers, status codes
and messages intact, gzip or not; the token never reaches the backend; the gateway adds
agentgate-agent-name, agentgate-transport and (only on a connection where an agent registered
a session) agentgate-agent-instance, after stripping whatever agentgate-* metadata the caller
sent; UNAUTHENTICATED without a valid token, UNIMPLEMENTED "no backend" for an unknown service,
UNAVAILABLE naming the backend (not its address) when it is down, RESOURCE_EXHAUSTED past
max_calls_per_agent, UNAVAILABLE (max_call_duration) when a call runs too long; a caller's
cancel reaches the backend within 5 s; agentgate_backend_calls_total counts the calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import ingress_clients as ic
import raw_h2
from cluster_helpers import Redis, Replica, write_secret
from conftest import BIN, free_port, wait_for
from job_router import ERROR_BIN, SERVICE, STATUS_DETAILS, JobRouter, method_path
from lifecycle_helpers import pump_bytes
from proxies import (
    GatewayPorts, HAProxy, Nginx, haproxy_pem, render_haproxy, render_nginx, wait_listening,
)

BACKEND = "runner.jobs.v1"
PREFIX = "runner.jobs.v1."
SCHEMES = ("grpc", "grpcs", "ws", "wss")
FAST_BACKOFF = ["--backoff-initial", "500ms", "--backoff-max", "2s"]
CALL_TIMEOUT = 20.0
FAIL_MESSAGE = "job 42 ünïcode 100% failed: see trailers"
ABSENT = object()
KiB = 1024
MiB = 1024 * KiB


# ---------------------------------------------------------------------------------------------
# Helpers.


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def backend_flag(url: str, prefix: str = PREFIX) -> list[str]:
    return ["--backend", f"{prefix}={url}"]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string (ASCII paths and URLs)


def write_config(env, backends: list[dict], name: str = "gateway.toml") -> Path:
    """A gateway config file with one [[backends]] table per dict."""
    lines = []
    for b in backends:
        lines.append("[[backends]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in b.items()]
        lines.append("")
    path = env.tmp / name
    path.write_text("\n".join(lines))
    return path


def backend_table(url: str, name: str = BACKEND, prefix: str = PREFIX, **extra) -> dict:
    return {"name": name, "services": [prefix], "url": url, **extra}


def channel_for(g, scheme: str) -> grpc.Channel:
    """grpcio straight to the gateway's agent port: h2c on the cleartext port, or TLS."""
    if scheme == "grpc":
        return ic.h2c_channel(g.clear_port or g.port)
    assert scheme == "grpcs"
    return ic.tls_channel(g.port, g.env.certs["ca"])


class Client:
    """Raw-bytes callables for the job router's methods on one channel, with fixed metadata."""

    def __init__(self, ch: grpc.Channel, md=(), service: str = SERVICE):
        self.ch = ch
        self.md = list(md)
        p = lambda m: method_path(m, service)  # noqa: E731
        self.get_job = ch.unary_unary(p("GetJob"))
        self.wait_job = ch.unary_stream(p("WaitJob"))
        self.upload = ch.stream_unary(p("Upload"))
        self.chat = ch.stream_stream(p("Chat"))
        self.fail = ch.unary_unary(p("Fail"))

    def get(self, payload: bytes, extra_md=(), timeout: float = CALL_TIMEOUT, **kw):
        return self.get_job.with_call(payload, metadata=self.md + list(extra_md), timeout=timeout, **kw)


def wait_job_request(**spec) -> bytes:
    return json.dumps(spec).encode()


def rpc_error(fn, *a, **kw) -> grpc.RpcError:
    """Runs a call that must fail; returns the error."""
    try:
        r = fn(*a, **kw)
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, tuple)):
            r = list(r)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"the call succeeded but should have failed: {r!r}"[:2000])


def exercise(cl: Client, router: JobRouter, compression=None, gzip_replies: bool = False,
             label: str = "") -> list:
    """Unary, server streaming (messages arriving one by one), client streaming, bidi in lock
    step, and an error with trailers; every result checked. Returns the backend's records of
    these calls."""
    n0 = len(router.calls)
    kw = {"compression": compression} if compression is not None else {}
    reply_md = [("x-respond-gzip", "1")] if gzip_replies else []
    what = f"[{label}] " if label else ""

    # A small call first (test_a_first_call_larger_than_the_pre_auth_budget_passes covers a
    # large first call on its own).
    assert cl.get(b"warm-up", **kw)[0] == b"job:warm-up", f"{what}first call"
    n0 += 1

    # Unary: bytes, request metadata (text and binary) and both kinds of response metadata.
    payload = b"\x00unary\xff" + (b"abc" * 100_000 if gzip_replies or compression else os.urandom(MiB))
    resp, call = cl.get(payload, reply_md + [("x-echo-tag", "t1"), ("x-echo-blob-bin", b"\x00\x01bin\xff")], **kw)
    assert resp == b"job:" + payload, f"{what}unary answer changed ({len(resp)} bytes)"
    assert ("x-backend-initial", "hello") in call.initial_metadata(), call.initial_metadata()
    tr = dict(call.trailing_metadata())
    assert tr.get("x-backend-saw") == "GetJob", tr
    assert tr.get("x-echo-tag") == "t1", tr
    assert tr.get("x-echo-blob-bin") == b"\x00\x01bin\xff", tr
    assert tr.get("x-backend-auth") == "absent", f"{what}the backend saw an authorization header"
    assert call.code() == grpc.StatusCode.OK

    # Server streaming: a long poll's answers must arrive as they are produced, not buffered.
    t0 = time.monotonic()
    times, got = [], []
    stream = cl.wait_job(wait_job_request(job="s", count=4, delay=0.4, first_now=True, pad=2000),
                         metadata=cl.md + reply_md, timeout=CALL_TIMEOUT, **kw)
    for m in stream:
        times.append(time.monotonic() - t0)
        got.append(m)
    assert got == [f"s:{i}".encode() + b"." * 2000 for i in range(4)], f"{what}{got!r}"[:500]
    assert times[-1] - times[0] >= 0.8, f"{what}streamed messages arrived together (buffered?): {times}"
    assert times[-1] >= 1.1, f"{what}stream took {times[-1]:.2f}s, the backend needs 1.2s: {times}"
    str_tr = dict(stream.trailing_metadata())
    assert str_tr.get("x-stream-count") == "4" and str_tr.get("x-backend-saw") == "WaitJob", str_tr
    assert ("x-backend-initial", "waiting") in stream.initial_metadata()

    # Client streaming.
    chunks = [os.urandom(16 * KiB + i) for i in range(40)]
    if compression is not None:
        chunks = [bytes([i]) * (32 * KiB) for i in range(40)]
    resp = cl.upload(iter(chunks), metadata=cl.md, timeout=CALL_TIMEOUT, **kw)
    info = json.loads(resp)
    assert info == {"chunks": 40, "bytes": sum(map(len, chunks)),
                    "sha256": hashlib.sha256(b"".join(chunks)).hexdigest()}, f"{what}{info}"

    # Bidi in lock step: each answer arrives before the next message is sent.
    q: queue.Queue = queue.Queue()

    def requests():
        while True:
            item = q.get(timeout=CALL_TIMEOUT)
            if item is None:
                return
            yield item

    q.put(b"m0")
    chat = cl.chat(requests(), metadata=cl.md, timeout=CALL_TIMEOUT, **kw)
    for i in range(10):
        assert next(chat) == f"echo:m{i}".encode(), what
        q.put(f"m{i + 1}".encode() if i < 9 else None)
    assert list(chat) == []
    assert ("x-backend-initial", "chat") in chat.initial_metadata()
    assert dict(chat.trailing_metadata()).get("x-backend-saw") == "Chat"

    # An error: code, message (percent-encoded on the wire) and trailers, binary ones included.
    err = rpc_error(cl.fail, json.dumps({"code": "FAILED_PRECONDITION", "message": FAIL_MESSAGE}).encode(),
                    metadata=cl.md, timeout=CALL_TIMEOUT, **kw)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, f"{what}{err}"
    assert err.details() == FAIL_MESSAGE, f"{what}{err.details()!r}"
    etr = dict(err.trailing_metadata() or ())
    assert etr.get("x-error-detail") == "job-failed", etr
    assert etr.get("x-error-bin") == ERROR_BIN, etr
    assert etr.get("grpc-status-details-bin") == STATUS_DETAILS, etr

    recs = router.calls[n0:]
    assert [r.method for r in recs] == ["GetJob", "WaitJob", "Upload", "Chat", "Fail"], recs
    for r in recs:
        assert r.wait_ended(5) and not r.cancelled, f"{what}backend saw {r.method} cancelled"
    return recs


def assert_identity(rec, name: str, transport: str, instance=ABSENT, token: str | None = None):
    """What the gateway adds and removes, as the backend saw it."""
    assert rec.values("agentgate-agent-name") == [name], f"agentgate-agent-name: {rec}"
    assert rec.values("agentgate-transport") == [transport], f"agentgate-transport: {rec}"
    inst = rec.values("agentgate-agent-instance")
    if instance is ABSENT:
        assert inst == [], (f"agentgate-agent-instance {inst} on a {name!r} call that came over no "
                            f"connection where {name!r} registered a session: {rec}")
    else:
        assert inst == [instance], f"agentgate-agent-instance should be {instance!r}: {rec}"
    assert not rec.values("authorization"), f"the token reached the backend: {rec}"
    ours = {"agentgate-agent-name", "agentgate-transport", "agentgate-agent-instance"}
    stray = sorted(k for k in rec.keys() if k.startswith("agentgate-") and k not in ours)
    assert not stray, f"caller's agentgate-* metadata not stripped: {stray}: {rec}"
    if token:
        for k, v in rec.metadata:
            text = v.decode(errors="replace") if isinstance(v, bytes) else v
            assert token not in text, f"the token reached the backend in {k}"


def backend_calls(g, backend: str = BACKEND) -> dict[str, float]:
    """agentgate_backend_calls_total for one backend, by outcome."""
    out: dict[str, float] = {}
    for m in re.finditer(r"^agentgate_backend_calls_total\{([^}]*)\} (\S+)$", g.metrics_text(), re.M):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))
        if labels.get("backend") == backend:
            key = labels.get("outcome", "")
            out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def total_backend_calls(g, backend: str = BACKEND) -> float:
    return sum(backend_calls(g, backend).values())


def token_of(path: Path) -> str:
    return path.read_text().strip()


def start_sidecar(env, url: str, token_file: Path, name: str, scheme: str, extra=()):
    """An agent with a local listener; returns (process, local port)."""
    lp = free_port()
    args = ["--local-listen", f"127.0.0.1:{lp}", "--instance-id", f"{name}-instance"] + FAST_BACKOFF
    if scheme.startswith("ws"):
        args += ["--transport", "websocket"]
    p = env.agent(url, token_file, extra=args + list(extra), name=f"agent-{name}")
    return p, lp


def ready_sidecar(g, proc, lp: int, name: str, transport: str) -> dict:
    """Waits until the agent is registered and its local listener answers a first call
    (a call made between the two may still race with the agent's own start-up)."""
    listed = g.wait_agent(name, transport=transport)
    wait_listening(proc, [lp], f"{name}'s local listener")

    def first():
        with ic.h2c_channel(lp) as ch:
            return Client(ch).get(b"hello", timeout=5)[0] == b"job:hello"
    wait_for(first, timeout=10, interval=0.2, what=f"a first call through {name}'s local listener")
    return listed


def cancel_reaches_backend(cl: Client, router: JobRouter, label: str, quiet: bool = False) -> float:
    """A long poll cancelled by the caller: the backend's handler sees the RPC cancelled within
    5 s. Returns the delay. `quiet`: the backend sends no headers before the cancel (the answer
    has not begun)."""
    n_before = len(router.calls_to("WaitJob"))
    it = cl.wait_job(wait_job_request(job="poll", delay=60, quiet=quiet), metadata=cl.md, timeout=90)
    rec = router.wait_calls("WaitJob", n_before + 1, timeout=10)[-1]
    time.sleep(0.3)
    assert not rec.ended.is_set(), f"[{label}] the long poll ended by itself: {rec}"
    t0 = time.monotonic()
    it.cancel()
    assert rec.wait_ended(5), f"[{label}] the backend did not see the cancel within 5 s"
    took = time.monotonic() - t0
    assert rec.cancelled, rec
    err = rpc_error(lambda: next(it))
    assert err.code() == grpc.StatusCode.CANCELLED, err
    print(f"\n[{label}] backend saw the cancel after {took * 1000:.0f} ms")
    return took


def test_flags_exist():
    """Cheap guard that the flags under test exist (fails fast with a clear message)."""
    server = subprocess.run([str(BIN), "server", "--help"], capture_output=True, text=True, timeout=30).stdout
    agent = subprocess.run([str(BIN), "agent", "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "--backend" in server, server
    assert "--local-listen" in agent, agent


# ---------------------------------------------------------------------------------------------
# 1. Straight to the agent port with an agent token.


@pytest.mark.parametrize("scheme", ["grpc", "grpcs"])
def test_all_call_kinds_with_agent_token(env, scheme):
    router = JobRouter()
    try:
        tok = env.token("ci-runner")
        g = env.gateway(extra=backend_flag(router.url))
        with channel_for(g, scheme) as ch:
            cl = Client(ch, bearer(tok))
            recs = exercise(cl, router, label=scheme)
            for r in recs:
                assert_identity(r, "ci-runner", scheme, ABSENT, token=tok)

            # Many calls at once on one connection.
            with ThreadPoolExecutor(16) as pool:
                outs = list(pool.map(lambda i: cl.get(f"c{i}".encode())[0], range(64)))
            assert outs == [f"job:c{i}".encode() for i in range(64)]
        assert len(router.calls_to("GetJob")) == 66  # the warm-up, the 1 MiB call, 64 at once
    finally:
        router.stop()


@pytest.mark.parametrize("scheme", ["grpc", "grpcs"])
def test_a_first_call_larger_than_the_pre_auth_budget_passes(env, scheme):
    """A runner's very first call on a fresh connection carries 3 MiB, past the 1 MiB
    pre-authentication budget: the gateway stops reading at the budget until the call's
    token is checked, then reads on. (Whether the old cut showed depended on scheduling; the
    unit test in crates/transport/src/pre_auth_budget.rs pins the stop at the budget.)"""
    router = JobRouter()
    try:
        tok = env.token("big-first")
        g = env.gateway(extra=backend_flag(router.url))
        payload = os.urandom(3 * MiB)
        with channel_for(g, scheme) as ch:
            resp, call = Client(ch, bearer(tok)).get(payload)
            assert resp == b"job:" + payload and call.code() == grpc.StatusCode.OK
        assert g.metric("agentgate_connections_rejected_total", reason="pre_auth_bytes") == 0
    finally:
        router.stop()


@pytest.mark.parametrize("scheme", ["grpc", "grpcs"])
def test_gzip_both_ways(env, scheme):
    """Requests gzip-compressed by the client, answers gzip-compressed by the backend."""
    router = JobRouter()
    try:
        tok = env.token("gz-runner")
        g = env.gateway(extra=backend_flag(router.url))
        with channel_for(g, scheme) as ch:
            cl = Client(ch, bearer(tok))
            recs = exercise(cl, router, compression=grpc.Compression.Gzip, gzip_replies=True,
                            label=f"{scheme}+gzip")
            for r in recs:
                assert_identity(r, "gz-runner", scheme, ABSENT, token=tok)
            # Compressed answers to an uncompressed request, and the reverse.
            big = b"0123456789" * 50_000
            assert cl.get(big, [("x-respond-gzip", "1")])[0] == b"job:" + big
            assert cl.get(big, compression=grpc.Compression.Gzip)[0] == b"job:" + big
            # The gateway never decodes a backend's messages: an encoding it does not decode
            # for its own services (deflate) passes to a backend that does.
            assert cl.get(big, compression=grpc.Compression.Deflate)[0] == b"job:" + big
    finally:
        router.stop()


@pytest.mark.parametrize("scheme", ["grpc", "grpcs"])
def test_identity_metadata_replaces_spoofed_values(env, scheme):
    router = JobRouter()
    try:
        tok = env.token("honest")
        g = env.gateway(extra=backend_flag(router.url))
        spoof = [
            ("agentgate-agent-name", "evil"),
            ("agentgate-agent-instance", "fake-instance"),
            ("agentgate-transport", "wss"),
            ("agentgate-agent", "someone-else"),
            ("agentgate-whatever", "x"),
            ("x-job-tag", "kept"),
            ("x-job-blob-bin", b"\x00\xffbin"),
        ]
        with channel_for(g, scheme) as ch:
            resp, call = Client(ch, bearer(tok)).get(b"who", spoof)
        assert resp == b"job:who"
        tr = dict(call.trailing_metadata())
        assert (tr["x-backend-agent"], tr["x-backend-transport"], tr["x-backend-instance"]) == \
            ("honest", scheme, "-"), tr
        rec = router.last("GetJob")
        assert_identity(rec, "honest", scheme, ABSENT, token=tok)
        assert rec.values("x-job-tag") == ["kept"], rec
        assert rec.values("x-job-blob-bin") == [b"\x00\xffbin"], rec
    finally:
        router.stop()


def test_missing_or_wrong_token_is_unauthenticated(env):
    router = JobRouter()
    try:
        tok = env.token("real")
        api = env.token("a-user", kind="api")
        g = env.gateway(extra=backend_flag(router.url))
        cases = {
            "no token": [],
            "wrong token": bearer("agt_not-a-real-token-0123456789"),
            "token of another scheme": [("authorization", f"Basic {tok}")],
            "bearer without a token": [("authorization", "Bearer")],
        }
        for what, md in cases.items():
            for scheme in ("grpc", "grpcs"):
                with channel_for(g, scheme) as ch:
                    err = rpc_error(Client(ch, md).get, b"x")
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, f"{what} over {scheme}: {err}"
                    # Streaming calls too.
                    err = rpc_error(Client(ch, md).wait_job, wait_job_request(count=1),
                                    metadata=md, timeout=CALL_TIMEOUT)
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, f"{what} over {scheme}: {err}"
        # An API token is for the tunnel API, not an agent's identity.
        with channel_for(g, "grpc") as ch:
            err = rpc_error(Client(ch, bearer(api)).get, b"x")
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
            assert "this is an API token (for the tunnel API), not an agent token" in err.details(), err
        assert router.calls == [], f"a refused call reached the backend: {router.calls}"
        # The real token still works on the same gateway.
        with channel_for(g, "grpc") as ch:
            assert Client(ch, bearer(tok)).get(b"ok")[0] == b"job:ok"
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 2. Routing and errors.


def test_routing_by_service_prefix(env):
    jobs = JobRouter(tag="jobs")
    arts = JobRouter(services=("runner.artifacts.v1.Store", "runner.artifacts.v1.Index"), tag="artifacts")
    try:
        tok = env.token("router-user")
        g = env.gateway(extra=backend_flag(jobs.url) + backend_flag(arts.url, "runner.artifacts.v1."))
        with channel_for(g, "grpc") as ch:
            assert Client(ch, bearer(tok)).get(b"j")[0] == b"job:j"
            assert Client(ch, bearer(tok), "runner.artifacts.v1.Store").get(b"a")[0] == b"job:a"
            assert Client(ch, bearer(tok), "runner.artifacts.v1.Index").get(b"i")[0] == b"job:i"
        assert [(c.service, c.method) for c in jobs.calls] == [(SERVICE, "GetJob")]
        assert [(c.service, c.method) for c in arts.calls] == [
            ("runner.artifacts.v1.Store", "GetJob"), ("runner.artifacts.v1.Index", "GetJob")]
        wait_for(lambda: total_backend_calls(g, "runner.artifacts.v1") >= 2 and
                 total_backend_calls(g, BACKEND) >= 1, timeout=5, what="per-backend metric series")
    finally:
        jobs.stop()
        arts.stop()


def test_unknown_service_is_unimplemented_no_backend(env):
    router = JobRouter(services=(SERVICE, "runner.jobs.v1beta.JobRouter", "other.v1.Thing"))
    try:
        tok = env.token("lost")
        g = env.gateway(extra=backend_flag(router.url))
        for scheme in ("grpc", "grpcs"):
            with channel_for(g, scheme) as ch:
                for service in ("other.v1.Thing", "runner.jobs.v1beta.JobRouter"):
                    err = rpc_error(Client(ch, bearer(tok), service).get, b"x")
                    assert err.code() == grpc.StatusCode.UNIMPLEMENTED, f"{service}: {err}"
                    assert service in (err.details() or ""), f"message does not name {service}: {err.details()!r}"
                    assert "no backend" in (err.details() or "").lower(), err.details()
                    assert f", {PREFIX}" in err.details(), f"a token holder is told what is served: {err.details()!r}"
                # Without a token the backends behind the gateway are not named, even on a
                # connection that carried token calls (a proxy may mix clients on one).
                err = rpc_error(Client(ch, [], "other.v1.Thing").get, b"x")
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
                assert "runner." not in err.details() and "agent token" in err.details(), err.details()
                # The gateway's own services are still its own.
                assert ic.health_check(ch) == "SERVING"
                assert Client(ch, bearer(tok)).get(b"x")[0] == b"job:x"
        assert {c.service for c in router.calls} == {SERVICE}
    finally:
        router.stop()


def test_backend_down_is_unavailable_naming_the_backend_not_its_address(env):
    port = free_port()
    tok = env.token("patient")
    g = env.gateway(extra=backend_flag(f"http://127.0.0.1:{port}"))
    before = total_backend_calls(g)
    for scheme in ("grpc", "grpcs"):
        with channel_for(g, scheme) as ch:
            t0 = time.monotonic()
            err = rpc_error(Client(ch, bearer(tok)).get, b"x", timeout=15)
            took = time.monotonic() - t0
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            details = err.details() or ""
            assert BACKEND in details, f"message does not name the backend: {details!r}"
            assert str(port) not in details and "127.0.0.1" not in details, \
                f"message leaks the backend's address: {details!r}"
            assert took < 10, f"UNAVAILABLE after {took:.1f}s for a refused connection"
            err = rpc_error(Client(ch, bearer(tok)).wait_job, wait_job_request(count=1),
                            metadata=bearer(tok), timeout=15)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    wait_for(lambda: total_backend_calls(g) >= before + 4, timeout=5,
             what="failed backend calls counted in agentgate_backend_calls_total")
    # The backend comes up: calls work again without restarting anything.
    router = JobRouter(port=port)
    try:
        with channel_for(g, "grpc") as ch:
            cl = Client(ch, bearer(tok))
            wait_for(lambda: cl.get(b"back", timeout=5)[0] == b"job:back", timeout=15, interval=0.5,
                     what="calls to succeed once the backend listens")
        assert_identity(router.last("GetJob"), "patient", "grpc", ABSENT, token=tok)
    finally:
        router.stop()


@pytest.mark.parametrize("first", ["refuse", "goaway"])
def test_a_call_the_backend_did_not_process_is_sent_again(env, first):
    """A backend that refuses a call's stream (REFUSED_STREAM) or goes away below it (GOAWAY,
    last stream 0: what a restarting server says to a call that crossed its GOAWAY) did not
    process the call; the gateway sends it again, and the caller never knows. The backend is
    python-h2, not a gRPC stack: the refusal is exactly what is written."""
    backend = raw_h2.RefusingBackend(first)
    try:
        tok = env.token("resent")
        g = env.gateway(tls=False, extra=backend_flag(backend.url))
        with channel_for(g, "grpc") as ch:
            resp, call = Client(ch, bearer(tok)).get(b"once more", timeout=10)
        assert resp == b"once more" and call.code() == grpc.StatusCode.OK
        # The second request is the first one again, on a new connection after a GOAWAY.
        assert [what for _, _, what in backend.seen] == [first, "answered"], backend.seen
        if first == "goaway":
            assert backend.seen[0][0] != backend.seen[1][0], backend.seen
        wait_for(lambda: backend_calls(g) == {"answered": 1.0}, timeout=5,
                 what="one call counted, answered")
    finally:
        backend.close()


def test_malformed_deadline_or_binary_metadata_is_refused_before_the_backend(env):
    """Metadata any gRPC server rejects never reaches the backend: every agent's calls share
    its connections, and gRPC C-core, once it has read a bad `grpc-timeout` or `-bin` value
    on a connection, fails later calls there that carry the same header, whoever sent them
    (the probe saw other agents' calls fail with INTERNAL for minutes). The caller gets
    INVALID_ARGUMENT naming the header; good calls on the same connection go on."""
    router = JobRouter()
    try:
        tok = env.token("sloppy")
        g = env.gateway(tls=False, extra=backend_flag(router.url))
        c = raw_h2.RawH2(g.port)
        path = method_path("GetJob")
        cases = [([("grpc-timeout", "abc")], "grpc-timeout"),
                 ([("grpc-timeout", "123456789S")], "grpc-timeout"),
                 ([("grpc-timeout", "-5S")], "grpc-timeout"),
                 ([("x-foo-bin", "!!!*not base64*")], '"x-foo-bin" ends in -bin'),
                 ([("x-foo-bin", "AAAA,@@@@")], '"x-foo-bin" ends in -bin')]
        for extra, named in cases:
            sid = c.request(path, bearer(tok) + extra, body=raw_h2.grpc_frame(b"bad"))
            a = c.wait(sid)
            assert a.grpc_status == "3", (extra, a.grpc_status, a.grpc_message)
            assert named in a.grpc_message, (extra, a.grpc_message)
        # Well-formed ones pass: padded or not. Values joined with commas on one line (which
        # C-core refuses) reach the backend as one line each.
        good = [("grpc-timeout", "20S"), ("x-foo-bin", "AAEC"), ("x-bar-bin", "AAE,AAECAw==")]
        sid = c.request(path, bearer(tok) + good, body=raw_h2.grpc_frame(b"good"))
        a = c.wait(sid)
        assert a.grpc_status == "0", (a.grpc_status, a.grpc_message)
        c.close()
        assert [r.messages_in for r in router.calls_to("GetJob")] == [1], "a malformed call reached the backend"
        rec = router.last("GetJob")
        assert rec.values("x-bar-bin") == [b"\x00\x01", b"\x00\x01\x02\x03"], rec.metadata
        # grpcio's own deadline and binary metadata, on another connection, are unharmed.
        with channel_for(g, "grpc") as ch:
            assert Client(ch, bearer(tok)).get(b"ok", [("x-foo-bin", b"\x00\x01")])[0] == b"job:ok"
        wait_for(lambda: backend_calls(g).get("invalid_metadata") == len(cases), timeout=5,
                 what="refusals counted as invalid_metadata")
    finally:
        router.stop()


def test_answer_metadata_over_the_limit_fails_that_call_only_with_a_sentence(env):
    """A backend whose trailers are over the 64 KiB the gateway passes on: the caller gets
    INTERNAL naming the size and the limit, and that the call ran (not UNAVAILABLE and "try
    again", as before). At 200 KiB h2 used to close the whole connection to the backend,
    failing every other call on it; another agent's long poll on it now goes on."""
    router = JobRouter()
    try:
        tok, other = env.token("chatty"), env.token("bystander")
        g = env.gateway(tls=False, extra=backend_flag(router.url))
        with channel_for(g, "grpc") as ch:
            polls = Client(ch, bearer(other)).wait_job(wait_job_request(job="p", delay=3), metadata=bearer(other),
                                                       timeout=30)
            router.wait_calls("WaitJob", 1)
            fail = Client(ch, bearer(tok)).fail
            for kib in (70, 200):
                spec = json.dumps({"code": "NOT_FOUND", "message": "no job", "pad_trailers": kib}).encode()
                err = rpc_error(fail, spec, metadata=bearer(tok), timeout=10)
                assert err.code() == grpc.StatusCode.INTERNAL, (kib, err)
                d = err.details() or ""
                assert "KiB of trailers, more than the 64 KiB" in d and "the call ran" in d, d
            # Under the limit, the trailers pass whole.
            spec = json.dumps({"code": "NOT_FOUND", "message": "no job", "pad_trailers": 5}).encode()
            err = rpc_error(fail, spec, metadata=bearer(tok), timeout=10)
            assert err.code() == grpc.StatusCode.NOT_FOUND, err
            assert len([k for k, _ in err.trailing_metadata() if k.startswith("x-pad-")]) == 5
            assert list(polls) == [b"p:0"]
        wait_for(lambda: backend_calls(g).get("oversized_answer") == 2, timeout=5,
                 what="two calls counted as oversized_answer")
    finally:
        router.stop()


def test_a_backend_url_of_the_wrong_kind_is_named_in_the_callers_status(env):
    """An http:// URL to an HTTP/1.1 server, an https:// URL to a cleartext gRPC server: the
    caller's UNAVAILABLE says which, and what to change, instead of h2's or rustls's words
    ("frame with invalid size", "InvalidContentType")."""
    import http.server

    h1 = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=h1.serve_forever, daemon=True).start()
    router = JobRouter(services=(SERVICE, "runner.tls.v1.JobRouter"))
    try:
        tok = env.token("misrouted")
        cfg = write_config(env, [
            backend_table(f"http://127.0.0.1:{h1.server_address[1]}", connect_timeout="5s"),
            backend_table(router.url.replace("http://", "https://"), name="runner.tls.v1",
                          prefix="runner.tls.v1.", connect_timeout="5s"),
        ])
        g = env.gateway(tls=False, extra=["--config", cfg])
        with channel_for(g, "grpc") as ch:
            # The HTTP/1.1 server answers 505 and closes: h2 reads the answer as a broken frame,
            # or meets the reset first; the hint is the same either way.
            for service, why in ((SERVICE, "in HTTP/2 (an HTTP/1.1 server?"),
                                 ("runner.tls.v1.JobRouter", "the server did not answer TLS; if this port is "
                                                             "cleartext, use an http:// URL")):
                err = rpc_error(Client(ch, bearer(tok), service).get, b"x", timeout=15)
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                assert why in (err.details() or ""), err.details()
        assert not router.calls
    finally:
        h1.shutdown()
        router.stop()


def test_tls_backend_with_ca_cert_and_server_name(env):
    services = (SERVICE, "runner.badname.v1.JobRouter", "runner.noca.v1.JobRouter")
    router = JobRouter(services=services, tls=env.certs)
    try:
        tok = env.token("tls-user")
        ca = env.certs["ca"]
        cfg = write_config(env, [
            backend_table(router.url, ca_cert=ca, tls_server_name="gateway.test", connect_timeout="5s"),
            backend_table(router.url, name="runner.badname.v1", prefix="runner.badname.v1.", ca_cert=ca,
                          tls_server_name="wrong.test"),
            backend_table(router.url, name="runner.noca.v1", prefix="runner.noca.v1."),
        ])
        g = env.gateway(extra=["--config", cfg])
        with channel_for(g, "grpcs") as ch:
            recs = exercise(Client(ch, bearer(tok)), router, label="tls backend")
            for r in recs:
                assert_identity(r, "tls-user", "grpcs", ABSENT, token=tok)
            for name, why in (("runner.badname.v1", "the backend's certificate does not carry the name in the "
                                                    "URL; set the backend's tls_server_name"),
                              ("runner.noca.v1", "the backend's certificate is not signed by a CA the gateway "
                                                 "trusts; set the backend's ca_cert")):
                err = rpc_error(Client(ch, bearer(tok), f"{name}.JobRouter").get, b"x", timeout=15)
                assert err.code() == grpc.StatusCode.UNAVAILABLE, f"{name}: {err}"
                assert name in (err.details() or "") and why in err.details(), err.details()
        assert {c.service for c in router.calls} == {SERVICE}
    finally:
        router.stop()


def test_max_calls_per_agent_from_config_file(env):
    router = JobRouter()
    try:
        tok_a, tok_b = env.token("busy"), env.token("other")
        cfg = write_config(env, [backend_table(router.url, connect_timeout="5s", max_calls_per_agent=1,
                                               max_call_duration="0s", max_calls_per_connection=100)])
        g = env.gateway(extra=["--config", cfg])
        with channel_for(g, "grpc") as ch1, channel_for(g, "grpcs") as ch2, channel_for(g, "grpc") as ch3:
            poll = Client(ch1, bearer(tok_a)).wait_job(wait_job_request(job="p", delay=60),
                                                       metadata=bearer(tok_a), timeout=90)
            rec = router.wait_calls("WaitJob", 1)[0]
            # A second call of the same agent name, even on another connection: refused.
            for call in (lambda: Client(ch2, bearer(tok_a)).get(b"x"),
                         lambda: Client(ch1, bearer(tok_a)).get(b"y"),
                         lambda: list(Client(ch2, bearer(tok_a)).wait_job(
                             wait_job_request(count=1), metadata=bearer(tok_a), timeout=CALL_TIMEOUT))):
                err = rpc_error(call)
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert not router.calls_to("GetJob"), "a call over the limit reached the backend"
            assert len(router.calls_to("WaitJob")) == 1
            # An agent calling in a loop over its limit does not write a line per refusal: at
            # most 10 a second, the rest counted in the next line's `suppressed`.
            t0 = time.monotonic()
            over = Client(ch2, bearer(tok_a)).get_job
            futures = [over.future(b"z", metadata=bearer(tok_a), timeout=CALL_TIMEOUT) for _ in range(300)]
            assert all(f.exception() is not None and f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                       for f in futures)
            seconds = time.monotonic() - t0
            lines = g.proc.output().count("backend call failed")
            assert lines <= 10 * (seconds + 2), f"{lines} lines for 303 refusals in {seconds:.1f}s"
            wait_for(lambda: backend_calls(g).get("limited") == 303, timeout=5, what="every refusal counted")
            # Another agent is not limited by it.
            assert Client(ch3, bearer(tok_b)).get(b"b")[0] == b"job:b"
            # The slot is freed when the long poll ends.
            poll.cancel()
            assert rec.wait_ended(5) and rec.cancelled
            cl = Client(ch2, bearer(tok_a))
            wait_for(lambda: cl.get(b"again", timeout=5)[0] == b"job:again", timeout=5, interval=0.2,
                     what="the agent's slot freed after its long poll was cancelled")
    finally:
        router.stop()


@pytest.mark.parametrize("scheme", ["grpc", "grpcs"])
def test_cancel_and_deadline_of_long_poll_reach_backend(env, scheme):
    router = JobRouter()
    try:
        tok = env.token("poller")
        g = env.gateway(extra=backend_flag(router.url))
        with channel_for(g, scheme) as ch:
            cl = Client(ch, bearer(tok))
            cancel_reaches_backend(cl, router, scheme)
            # The caller's deadline: DEADLINE_EXCEEDED promptly, and the backend sees it end.
            t0 = time.monotonic()
            err = rpc_error(cl.wait_job, wait_job_request(job="d", delay=60), metadata=cl.md, timeout=1.5)
            took = time.monotonic() - t0
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
            assert took < 4, f"DEADLINE_EXCEEDED after {took:.1f}s for a 1.5s deadline"
            rec = router.calls_to("WaitJob")[-1]
            assert rec.wait_ended(5), "the backend's long poll outlived the caller's deadline by 5 s"
            assert rec.cancelled
            # Client-streaming and bidi calls cancelled midway end at the backend too.
            q: queue.Queue = queue.Queue()
            chat = cl.chat(iter(q.get, None), metadata=cl.md, timeout=60)
            q.put(b"hi")
            assert next(chat) == b"echo:hi"
            crec = router.calls_to("Chat")[-1]
            chat.cancel()
            try:
                assert crec.wait_ended(5) and crec.cancelled, crec
            finally:
                q.put(None)  # only now: the client must not half-close before the cancel lands
    finally:
        router.stop()


def test_callers_that_stop_reading_their_answers_hold_only_their_own_calls(env):
    """Calls of all agents share the gateway's connection to a backend. Four callers that
    stopped reading a streamed answer (raw HTTP/2 clients that never read their socket) filled
    its window (5 MiB, 2 MiB a call), and every other agent's call on it hung until its
    deadline. Each answer now has only its own window (256 KiB), and the connection room for
    all of them: another agent's calls go through while the four stay stalled."""
    router = JobRouter()
    stalled = []
    try:
        g = env.gateway(tls=False, extra=backend_flag(router.url))
        tok, other = env.token("staller"), env.token("bystander")
        for _ in range(4):
            c = raw_h2.DeafClient(g.port)
            c.request(method_path("WaitJob"), headers=bearer(tok),
                      body=raw_h2.grpc_frame(wait_job_request(job="big", count=2000, pad=60000)))
            stalled.append(c)
        router.wait_calls("WaitJob", n=4, timeout=10)
        time.sleep(2)  # the backend fills every window it is given
        with channel_for(g, "grpc") as ch:
            cl = Client(ch, bearer(other))
            for i in range(5):
                t0 = time.monotonic()
                assert cl.get(f"q{i}".encode(), timeout=5)[0] == f"job:q{i}".encode()
                assert time.monotonic() - t0 < 2, f"call {i} took {time.monotonic() - t0:.1f}s"
            assert list(cl.wait_job(wait_job_request(job="s", count=3), metadata=cl.md,
                                    timeout=CALL_TIMEOUT)) == [b"s:0", b"s:1", b"s:2"]
    finally:
        for c in stalled:
            c.close()
        router.stop()


def test_max_call_duration_ends_call_and_cancels_backend(env):
    router = JobRouter()
    try:
        tok = env.token("slowpoke")
        cfg = write_config(env, [backend_table(router.url, max_call_duration="2s")])
        g = env.gateway(extra=["--config", cfg])
        with channel_for(g, "grpc") as ch:
            cl = Client(ch, bearer(tok))
            # Calls under the limit are untouched.
            assert cl.get(b"quick")[0] == b"job:quick"
            assert list(cl.wait_job(wait_job_request(job="short", count=3, delay=0.3),
                                    metadata=cl.md, timeout=CALL_TIMEOUT)) == [b"short:0", b"short:1", b"short:2"]
            # A call past it, even one streaming all along: the gateway ends it with UNAVAILABLE.
            t0 = time.monotonic()
            got = []
            with pytest.raises(grpc.RpcError) as ei:
                for m in cl.wait_job(wait_job_request(job="long", count=10, delay=0.8, first_now=True),
                                     metadata=cl.md, timeout=30):
                    got.append(m)
            took = time.monotonic() - t0
            err = ei.value
            expected = [f"long:{i}".encode() for i in range(10)]
            assert 2 <= len(got) <= 3 and got == expected[:len(got)], got
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert "max_call_duration" in (err.details() or ""), err.details()
            assert 1.8 <= took < 8, f"the call ended {took:.1f}s after it started (max_call_duration 2 s)"
            rec = router.calls_to("WaitJob")[-1]
            assert rec.wait_ended(5), "the backend did not see the call end within 5 s of the limit"
            assert rec.cancelled, rec
            # An idle long poll is cut the same way.
            t0 = time.monotonic()
            err = rpc_error(cl.wait_job, wait_job_request(job="idle", delay=60), metadata=cl.md, timeout=30)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert 1.8 <= time.monotonic() - t0 < 8
            assert router.calls_to("WaitJob")[-1].wait_ended(5)
    finally:
        router.stop()


def test_a_connection_without_a_session_is_told_to_move_before_max_age(env):
    """A runner that only calls backends has no agent session on its connection. When the
    connection nears `max_connection_age` it still gets a GOAWAY (debug data
    `max_connection_age`, at 80-95% of the age), so its next calls go to a new connection and a
    long poll in flight finishes within `max_connection_age_grace`. (It used to get no GOAWAY
    and be closed at age + grace, cutting whatever was in flight.)"""
    router = JobRouter()
    try:
        tok = env.token("runner")
        g = env.gateway(extra=backend_flag(router.url) + [
            "--set", 'max_connection_age="5s"', "--set", 'max_connection_age_grace="4s"'])
        port = g.clear_port or g.port
        # A raw client: one authenticated call, then it waits for what the gateway says.
        raw = raw_h2.DeafClient(port)
        t0 = time.monotonic()
        sid = raw.request(method_path("GetJob"), headers=bearer(tok), body=raw_h2.grpc_frame(b"raw"))
        assert raw.read(lambda: sid in raw.status, timeout=10) == "done" and raw.status[sid] == "0"
        raw.read(lambda: raw.goaway is not None, timeout=12)
        goaway_after = time.monotonic() - t0
        assert raw.goaway is not None, "no GOAWAY before the connection closed"
        _, code, debug = raw.goaway
        assert code == 0 and b"max_connection_age" in debug, raw.goaway
        assert 3.9 <= goaway_after <= 5.5, f"GOAWAY {goaway_after:.2f} s after connecting (age 5 s)"
        raw.close()

        # grpcio: back-to-back long polls of 2.5 s and a unary loop for three ages. Each poll
        # in flight at a drain point finishes well within the grace; none may fail.
        errors: list[str] = []
        done = {"polls": 0, "unary": 0}
        stop = time.monotonic() + 15
        with channel_for(g, "grpc") as ch:
            cl = Client(ch, bearer(tok))

            def polls():
                while time.monotonic() < stop:
                    try:
                        got = list(cl.wait_job(wait_job_request(job="lp", count=1, delay=2.5),
                                               metadata=cl.md, timeout=CALL_TIMEOUT))
                        assert got == [b"lp:0"], got
                        done["polls"] += 1
                    except grpc.RpcError as e:
                        errors.append(f"poll: {e.code()} {e.details()}")

            def unary():
                while time.monotonic() < stop:
                    try:
                        assert cl.get(b"u")[0] == b"job:u"
                        done["unary"] += 1
                    except grpc.RpcError as e:
                        errors.append(f"unary: {e.code()} {e.details()}")
                    time.sleep(0.2)

            threads = [threading.Thread(target=f, daemon=True) for f in (polls, polls, unary)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(40)
        print(f"\nsessionless runner across max_connection_age: {done}, errors: {errors[:3]}")
        assert not errors, errors
        assert done["polls"] >= 8 and done["unary"] >= 30, done
        assert "connection draining: it reached max_connection_age" in ic.plain(g.proc.output())
    finally:
        router.stop()


def test_keepalive_pings_keep_to_the_backends_ping_policy(env):
    """gRPC servers close a connection PINGed more often than they allow (ENHANCE_YOUR_CALM,
    "too_many_pings"), and every long poll on it with it; by default they allow one PING per
    5 minutes. The gateway PINGs a connection with calls once per `keepalive_interval`. Here
    the backend allows one per 3 s: at 4 s a silent long poll lives through five PINGs, at
    1 s the same backend cuts it (so the check can fail)."""
    policy = [("grpc.http2.min_ping_interval_without_data_ms", 3000),
              ("grpc.http2.max_ping_strikes", 2)]
    tok = env.token("patient")
    for interval, survives in (("4s", True), ("1s", False)):
        router = JobRouter(options=policy)
        try:
            cfg = write_config(env, [backend_table(router.url, keepalive_interval=interval)])
            g = env.gateway(extra=["--config", cfg])
            with channel_for(g, "grpc") as ch:
                cl = Client(ch, bearer(tok))
                t0 = time.monotonic()
                err = rpc_error(cl.wait_job, wait_job_request(job="quiet", delay=60),
                                metadata=cl.md, timeout=21)
                took = time.monotonic() - t0
            if survives:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (interval, err)
                assert took >= 20, took
            else:
                assert err.code() == grpc.StatusCode.UNAVAILABLE, (interval, err)
                assert took < 15, took
                assert "too_many_pings" not in (err.details() or ""), \
                    "the backend's GOAWAY text reached the caller"
        finally:
            router.stop()


def test_backend_calls_metric_grows(env):
    router = JobRouter()
    dead = free_port()
    try:
        tok = env.token("counted")
        g = env.gateway(extra=backend_flag(router.url) + backend_flag(f"http://127.0.0.1:{dead}", "runner.down.v1."))
        before = backend_calls(g)
        before_down = total_backend_calls(g, "runner.down.v1")
        with channel_for(g, "grpc") as ch:
            cl = Client(ch, bearer(tok))
            for i in range(3):
                cl.get(f"{i}".encode())
            list(cl.wait_job(wait_job_request(count=2), metadata=cl.md, timeout=CALL_TIMEOUT))
            cl.upload(iter([b"a", b"b"]), metadata=cl.md, timeout=CALL_TIMEOUT)
            rpc_error(cl.fail, json.dumps({"code": "NOT_FOUND", "message": "nope"}).encode(),
                      metadata=cl.md, timeout=CALL_TIMEOUT)
            for _ in range(2):
                err = rpc_error(Client(ch, bearer(tok), "runner.down.v1.JobRouter").get, b"x")
                assert err.code() == grpc.StatusCode.UNAVAILABLE
        want = sum(before.values()) + 6
        wait_for(lambda: total_backend_calls(g) >= want, timeout=5,
                 what=f"agentgate_backend_calls_total{{backend={BACKEND!r}}} summed over outcomes >= {want}")
        wait_for(lambda: total_backend_calls(g, "runner.down.v1") >= before_down + 2, timeout=5,
                 what="the down backend's calls counted")
        after = backend_calls(g)
        print("\nagentgate_backend_calls_total:", after, backend_calls(g, "runner.down.v1"))
        assert all(o for o in after), f"series without an outcome label: {after}"
        assert set(backend_calls(g, "runner.down.v1")), "no outcome series for the down backend"
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 3. The agent's local listener (sidecar), over every agent transport.


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sidecar_local_listener(env, scheme):
    router = JobRouter()
    try:
        name = f"side-{scheme}"
        tok_file = env.token_file(name)
        token = token_of(tok_file)
        g = env.gateway(extra=backend_flag(router.url))
        agent, lp = start_sidecar(env, g.url(scheme, "/agent"), tok_file, name, scheme)
        listed = ready_sidecar(g, agent, lp, name, scheme)
        instance = listed["instance_id"]
        assert instance == f"{name}-instance", listed
        n0 = len(router.calls)

        with ic.h2c_channel(lp) as ch:
            cl = Client(ch)  # no token at all
            recs = exercise(cl, router, label=f"sidecar {scheme}")
            recs_gz = exercise(cl, router, compression=grpc.Compression.Gzip, gzip_replies=True,
                               label=f"sidecar {scheme}+gzip")
            for r in router.calls[:n0] + recs + recs_gz:
                assert_identity(r, name, scheme, instance, token=token)

            # Spoofed identity from the local client is replaced too.
            _, call = cl.get(b"spoof", [("agentgate-agent-name", "evil"), ("agentgate-transport", "grpc"),
                                        ("agentgate-agent-instance", "fake"), ("agentgate-x", "y")])
            assert_identity(router.last("GetJob"), name, scheme, instance, token=token)
            tr = dict(call.trailing_metadata())
            assert (tr["x-backend-agent"], tr["x-backend-instance"]) == (name, instance), tr

            # Errors made at the gateway reach the local client as they are.
            err = rpc_error(Client(ch, service="other.v1.Thing").get, b"x")
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
            assert "no backend" in (err.details() or "").lower() and "other.v1.Thing" in err.details(), err

            # Concurrent calls share the agent's connection.
            with ThreadPoolExecutor(8) as pool:
                outs = list(pool.map(lambda i: cl.get(f"p{i}".encode())[0], range(32)))
            assert outs == [f"job:p{i}".encode() for i in range(32)]

            cancel_reaches_backend(cl, router, f"sidecar {scheme}")
        # Everything went through the one registered session of this agent.
        assert [a["connection_id"] for a in g.agents() if a["name"] == name] == [listed["connection_id"]]
        assert agent.alive(), agent.output()[-2000:]
    finally:
        router.stop()


def test_sidecar_keeps_the_agents_own_methods_and_reports_deadlines_and_cancels(env):
    """A local process may call backends through the agent, never the agent's own session:
    Register through the local listener would have replaced the agent's session and ended its
    parked tunnels. A deadline that passes is DEADLINE_EXCEEDED (not "could not be sent"), and
    a caller that cancels a long poll is counted as such."""
    import raw_h2

    router = JobRouter()
    try:
        name = "side-own"
        tok_file = env.token_file(name)
        g = env.gateway(extra=backend_flag(router.url))
        agent, lp = start_sidecar(env, g.url("grpc"), tok_file, name, "grpc")
        listed = ready_sidecar(g, agent, lp, name, "grpc")
        with ic.h2c_channel(lp) as ch:
            err = rpc_error(ch.unary_unary("/agentgate.v1.AgentSession/Register"), b"", timeout=5)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert "own method" in err.details() and "backends only" in err.details(), err.details()
            # Health and reflection: UNIMPLEMENTED, which grpc-go's client-side health check
            # takes as "no health service", not as unhealthy.
            err = rpc_error(ch.unary_unary("/grpc.health.v1.Health/Check"), b"", timeout=5)
            assert err.code() == grpc.StatusCode.UNIMPLEMENTED, err
            assert "backends only" in err.details(), err.details()
            err = rpc_error(ch.stream_stream("/agentgate.v1.Tunnel/Connect"), iter([b""]), timeout=5)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            # The session is the agent's, untouched; backend calls still pass.
            assert Client(ch).get(b"after")[0] == b"job:after"
            out = ic.plain(agent.output())
            assert "local call not passed on" in out, out[-2000:]

            # A caller that cancels a long poll before the answer began: counted, once the
            # backend saw the cancel.
            before = backend_calls(g).get("cancelled_by_caller", 0)
            cancel_reaches_backend(Client(ch), router, "sidecar", quiet=True)
            wait_for(lambda: backend_calls(g).get("cancelled_by_caller", 0) >= before + 1,
                     what="the cancelled long poll counted as cancelled_by_caller")
        agents = [a for a in g.agents() if a["name"] == name]
        assert [a["connection_id"] for a in agents] == [listed["connection_id"]], agents
        assert "agent retired the connection" not in ic.plain(g.proc.output())

        # A raw client that leaves the deadline to the server, to a backend that sends nothing
        # before its deadline: the sidecar's own timer (tonic's, on the head) ends the call
        # with DEADLINE_EXCEEDED, not UNAVAILABLE.
        c = raw_h2.RawH2(lp)
        try:
            t0 = time.monotonic()
            sid = c.request(method_path("WaitJob"), [("grpc-timeout", "1S")],
                            body=raw_h2.grpc_frame(wait_job_request(job="late", delay=30, quiet=True)))
            a = c.wait(sid, timeout=10)
            took = time.monotonic() - t0
        finally:
            c.close()
        status = (a.trailers or a.headers or {}).get("grpc-status")
        assert status == "4", a
        assert took < 5, f"DEADLINE_EXCEEDED after {took:.1f}s for a 1 s deadline"
        # Not gRPC at all (curl, a health checker): an HTTP answer saying what the port takes.
        out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_code}",
                              f"http://127.0.0.1:{lp}/healthz"], capture_output=True, text=True, timeout=10)
        assert out.stdout.endswith("\n415") and "gRPC calls" in out.stdout, out

        # The gateway refuses its own methods to any call carrying an instance claim (older
        # agents passed every method on).
        before = g.metric("agentgate_connections_rejected_total", reason="local_caller_own_method")
        with channel_for(g, "grpc") as gch:
            md = [("authorization", f"Bearer {token_of(tok_file)}"), ("agentgate-instance-claim", "x")]
            err = rpc_error(gch.unary_unary("/agentgate.v1.AgentSession/Register"), b"", metadata=md, timeout=5)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
        assert g.metric("agentgate_connections_rejected_total", reason="local_caller_own_method") == before + 1
    finally:
        router.stop()


def test_sidecar_backend_down_and_gateway_gone(env):
    """Through the local listener, the gateway's UNAVAILABLE arrives unchanged; with the
    gateway stopped the local client gets UNAVAILABLE from the agent (not a hang until the
    caller's deadline)."""
    port = free_port()
    tok_file = env.token_file("side-down")
    g = env.gateway(extra=backend_flag(f"http://127.0.0.1:{port}"))
    agent, lp = start_sidecar(env, g.url("grpc"), tok_file, "side-down", "grpc")
    g.wait_agent("side-down", transport="grpc")
    wait_listening(agent, [lp], "side-down's local listener")
    with ic.h2c_channel(lp) as ch:
        def unavailable():
            e = rpc_error(Client(ch).get, b"x", timeout=5)
            return e.code() == grpc.StatusCode.UNAVAILABLE and BACKEND in (e.details() or "") and e
        err = wait_for(unavailable, timeout=10, interval=0.3, what="UNAVAILABLE naming the backend")
        assert str(port) not in err.details(), err.details()
        g.proc.stop()
        # The agent may hold a call for a while to ride out a reconnect, but it must answer
        # UNAVAILABLE itself, before the caller's own deadline (20 s) runs out.
        t0 = time.monotonic()
        err = rpc_error(Client(ch).get, b"x", timeout=20)
        took = time.monotonic() - t0
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert took < 18, f"UNAVAILABLE only after {took:.1f}s"


def test_the_local_listener_answers_a_client_that_does_not_speak_http2(env):
    """curl (HTTP/1.1) at the local listener got an HTTP/2 SETTINGS frame and a reset, which
    curl shows as "Received HTTP/0.9", and the agent said nothing. It now gets a 505 naming
    what the listener takes, and the agent a line; gRPC calls go on as before."""
    router = JobRouter()
    try:
        g = env.gateway(tls=False, extra=backend_flag(router.url))
        agent, lp = start_sidecar(env, g.url("grpc"), env.token_file("side-h1"), "side-h1", "grpc")
        ready_sidecar(g, agent, lp, "side-h1", "grpc")
        r = subprocess.run(["curl", "-sS", "--http1.1", "-o", "-", "-w", "\n%{http_code}",
                            f"http://127.0.0.1:{lp}/runner.jobs.v1.JobRouter/GetJob"],
                           capture_output=True, text=True, timeout=20)
        body, _, code = r.stdout.rpartition("\n")
        assert code == "505" and "takes gRPC calls over HTTP/2 without TLS" in body, (r.stdout, r.stderr)
        wait_for(lambda: "did not speak HTTP/2" in agent.output(), timeout=5, what="the agent's line")
        with ic.h2c_channel(lp) as ch:
            assert Client(ch).get(b"still", timeout=5)[0] == b"job:still"
    finally:
        router.stop()


def test_a_sidecar_stream_cut_mid_answer_ends_unavailable_not_internal(env):
    """A long poll through the local listener that has had messages when the gateway dies
    (SIGKILL here): the caller got the reset of the agent's HTTP/2 server, INTERNAL "RST_STREAM
    with error code 2", which clients do not retry. Cut between two messages, it now ends with
    UNAVAILABLE and the agent's sentence."""
    router = JobRouter()
    try:
        g = env.gateway(tls=False, extra=backend_flag(router.url))
        agent, lp = start_sidecar(env, g.url("grpc"), env.token_file("side-cut"), "side-cut", "grpc")
        ready_sidecar(g, agent, lp, "side-cut", "grpc")
        with ic.h2c_channel(lp) as ch:
            stream = Client(ch).wait_job(wait_job_request(job="cut", count=5, delay=2, first_now=True),
                                         timeout=30)
            assert next(stream) == b"cut:0"
            g.proc.send_signal(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as ei:
                next(stream)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value
        assert "broke off the call mid-answer" in (ei.value.details() or ""), ei.value.details()
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 4. Through the shipped nginx and HAProxy configs.
#
# The shipped configs, rendered as they are: every gRPC call without `agentgate-agent` metadata
# goes to the agent port, whatever its service, so a backend needs no route of its own.
# WebSocket agents need nothing new: their whole HTTP/2 connection is inside the WebSocket.


def tls_gateway_for_proxy(env, router):
    extra = ["--api-tls-cert", env.certs["cert"], "--api-tls-key", env.certs["key"]] + backend_flag(router.url)
    g = env.gateway(tls=True, cleartext=False, extra=extra)
    return g, GatewayPorts(agent=g.port, admin=g.admin_port, api=g.api_port)


def proxied_identities(env, g, router, front_port: int, direct_name: str, direct_tok: str,
                       agents: dict[str, str]):
    """A direct token call through the proxy's TLS front, then the sidecars of the agents
    (name -> scheme, their URLs through the proxy)."""
    with ic.tls_channel(front_port, env.certs["ca"]) as ch:
        recs = exercise(Client(ch, bearer(direct_tok)), router, label=f"direct via :{front_port}")
    for r in recs:
        # The gateway sees the proxy's TLS hop (grpcs). No session was registered by this caller.
        assert_identity(r, direct_name, "grpcs", ABSENT, token=direct_tok)

    procs = {}
    for name, scheme in agents.items():
        tok_file = env.tmp / f"token-{name}-agent.txt"  # created before the gateway started
        assert tok_file.exists(), tok_file
        url = f"wss://localhost:{front_port}/-/agent/" if scheme == "wss" else f"grpcs://localhost:{front_port}"
        procs[name] = start_sidecar(env, url, tok_file, name, scheme)
    for name, scheme in agents.items():
        proc, lp = procs[name]
        listed = ready_sidecar(g, proc, lp, name, scheme)
        token = token_of(env.tmp / f"token-{name}-agent.txt")
        with ic.h2c_channel(lp) as ch:
            recs = exercise(Client(ch), router, label=f"sidecar {scheme} via proxy")
            cancel_reaches_backend(Client(ch), router, f"sidecar {scheme} via proxy")
        for r in recs:
            # The proxy terminates HTTP/2 and may carry a grpcs agent's call on another upstream
            # connection than its session's; the agent's instance claim, checked against the
            # sessions the gateway holds, still names the right instance.
            assert_identity(r, name, scheme, listed["instance_id"], token=token)


def test_through_nginx(env):
    router = JobRouter()
    try:
        direct = env.token("ci-nginx")
        for n in ("ng-wss", "ng-grpcs", "ng-grpcs-2"):
            env.token_file(n)
        g, ports = tls_gateway_for_proxy(env, router)
        port = free_port()
        logdir = env.tmp / "nginx" / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        conf = render_nginx("tls", ports, logdir, port, env.certs)
        nginx = Nginx(env, conf, port)
        proxied_identities(env, g, router, port, "ci-nginx", direct,
                           {"ng-wss": "wss", "ng-grpcs": "grpcs", "ng-grpcs-2": "grpcs"})
        assert "/runner.jobs.v1.JobRouter/GetJob" in nginx.access_log()
    finally:
        router.stop()


def test_through_haproxy(env):
    router = JobRouter()
    try:
        direct = env.token("ci-haproxy")
        for n in ("hp-wss", "hp-grpcs", "hp-grpcs-2"):
            env.token_file(n)
        g, ports = tls_gateway_for_proxy(env, router)
        port, clear = free_port(), free_port()
        pem = haproxy_pem(env.certs, env.tmp / "haproxy.pem")
        cfg = render_haproxy("tls", ports, port, clear, env.certs, pem)
        hp = HAProxy(env, cfg, port, clear)
        proxied_identities(env, g, router, port, "ci-haproxy", direct,
                           {"hp-wss": "wss", "hp-grpcs": "grpcs", "hp-grpcs-2": "grpcs"})
        assert "/runner.jobs.v1.JobRouter/GetJob" in hp.access_log()
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 5. Cluster: two replicas, both with the backend.


def test_cluster_replicas_each_forward_to_the_backend(env):
    router = JobRouter()
    try:
        direct = env.token("ci-cluster")
        tok_files = {i: env.token_file(f"cl-agent{i}") for i in (1, 2)}
        redis = Redis(env)
        secret_file, _ = write_secret(env)
        reps = [Replica(env, i, redis, secret_file, backend_flag(router.url)) for i in (1, 2)]
        for r in reps:
            with ic.h2c_channel(r.port) as ch:
                cl = Client(ch, bearer(direct))
                resp, call = cl.get(f"via-{r.name}".encode())
                assert resp == f"job:via-{r.name}".encode()
                assert_identity(router.last("GetJob"), "ci-cluster", "grpc", ABSENT, token=direct)
                assert list(cl.wait_job(wait_job_request(job=r.name, count=2, delay=0.1), metadata=cl.md,
                                        timeout=CALL_TIMEOUT)) == [f"{r.name}:0".encode(), f"{r.name}:1".encode()]
            wait_for(lambda: total_backend_calls(r) >= 2, timeout=5, what=f"{r.name} counted its calls")

        # A sidecar on each replica.
        for i, r in zip((1, 2), reps):
            name = f"cl-agent{i}"
            agent, lp = start_sidecar(env, f"grpc://127.0.0.1:{r.port}", tok_files[i], name, "grpc")
            listed = ready_sidecar(r.gw, agent, lp, name, "grpc")
            with ic.h2c_channel(lp) as ch:
                assert Client(ch).get(f"side-{i}".encode())[0] == f"job:side-{i}".encode()
            assert_identity(router.last("GetJob"), name, "grpc", listed["instance_id"],
                            token=token_of(tok_files[i]))
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 6. Whose instance: a session on a connection belongs to one agent.


def test_instance_only_with_the_session_of_the_same_agent(env):
    """agentgate-agent-instance says which registered instance of the agent made the call. On a
    connection where agent A registered a session (here: a grpcio client calling
    AgentSession/Register itself), A's calls carry A's instance; a call on that same connection
    with agent B's token is B's call, and must not be labelled with A's instance (a proxy that
    multiplexes several clients onto one connection to the gateway, like HAProxy, does this)."""
    router = JobRouter()
    try:
        tok_a, tok_b = env.token("sess-a"), env.token("sess-b")
        g = env.gateway(extra=backend_flag(router.url))
        stubs = ic.agentgate_stubs(env.tmp / "stubs")
        agent_pb2, agent_pb2_grpc = stubs
        with channel_for(g, "grpc") as ch:
            session = agent_pb2_grpc.AgentSessionStub(ch).Register(
                agent_pb2.RegisterRequest(instance_id="sess-a-instance", version="pytest/0", hostname="pytest"),
                metadata=bearer(tok_a), timeout=60)
            try:
                next(session)
                listed = g.wait_agent("sess-a", transport="grpc")
                assert listed["instance_id"] == "sess-a-instance", listed
                assert Client(ch, bearer(tok_a)).get(b"a")[0] == b"job:a"
                assert_identity(router.last("GetJob"), "sess-a", "grpc", "sess-a-instance", token=tok_a)
                assert Client(ch, bearer(tok_b)).get(b"b")[0] == b"job:b"
                assert_identity(router.last("GetJob"), "sess-b", "grpc", ABSENT, token=tok_b)
            finally:
                session.cancel()
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 7. The signed identity, checked with the recipe docs/backends.md gives backends.


def documented_verify():
    """The `verify` function of docs/backends.md, run as written."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "backends.md").read_text()
    m = re.search(r"```python\n(.*?def verify.*?)```", doc, re.S)
    assert m, "docs/backends.md lost its verification recipe"
    scope: dict = {}
    exec(textwrap.dedent(m.group(1)), scope)  # noqa: S102 - our own documentation
    return scope["verify"]


def test_signed_identity_verifies_with_the_documented_recipe(env):
    verify = documented_verify()
    router = JobRouter()
    try:
        secret = env.tmp / "identity.secret"
        secret.write_text("k" * 40 + "\n")
        tok = env.token("signer")
        cfg = write_config(env, [backend_table(router.url, signing_secret_file=str(secret))])
        g = env.gateway(extra=["--config", str(cfg)])
        forged = [("agentgate-identity-signature", "v1=" + "0" * 64),
                  ("agentgate-identity-timestamp", "1")]
        with channel_for(g, "grpc") as ch:
            assert Client(ch, bearer(tok)).get(b"s", forged)[0] == b"job:s"
        rec = router.last("GetJob")
        md = {k: v for k, v in rec.metadata if isinstance(v, str)}
        assert rec.values("agentgate-identity-signature") != ["v1=" + "0" * 64], rec
        assert len(rec.values("agentgate-identity-signature")) == 1, rec
        path = "/runner.jobs.v1.JobRouter/GetJob"
        key = ("k" * 40).encode()
        assert verify(md, path, key), rec
        assert not verify(md, path, b"x" * 40), "another secret must not verify"
        assert not verify(md, "/runner.jobs.v1.JobRouter/WaitJob", key), "another method"
        assert not verify({**md, "agentgate-agent-name": "someone-else"}, path, key), "another agent"
        assert not verify({**md, "agentgate-transport": "wss"}, path, key), "another transport"
    finally:
        router.stop()


def test_a_short_signing_secret_stops_the_gateway_with_a_sentence(env):
    secret = env.tmp / "short.secret"
    secret.write_text("too short\n")
    cfg = write_config(env, [backend_table("http://127.0.0.1:1", signing_secret_file=str(secret))])
    out = subprocess.run([str(BIN), "server", "--config", str(cfg), "--tokens", str(env.tokens),
                          "--listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
                          "--api-listen", f"127.0.0.1:{free_port()}"],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "fewer than 32 bytes" in out.stderr and "runner.jobs.v1" in out.stderr, out.stderr
    assert "panicked" not in out.stderr and "Error {" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------------------------
# 8. An instance claim is believed only for a session the same agent holds.


def test_an_instance_claim_counts_only_for_a_session_of_the_same_agent(env):
    router = JobRouter()
    try:
        tf = env.token_file("claimer")
        tok = token_of(tf)
        other = env.token("stranger")
        g = env.gateway(extra=backend_flag(router.url))
        proc, lp = start_sidecar(env, g.url("grpc"), tf, "claimer", "grpc")
        listed = ready_sidecar(g, proc, lp, "claimer", "grpc")
        instance = listed["instance_id"]
        with channel_for(g, "grpc") as ch:
            # The same agent's token, claiming its registered instance: the same principal.
            Client(ch, bearer(tok)).get(b"1", [("agentgate-instance-claim", instance)])
            assert_identity(router.last("GetJob"), "claimer", "grpc", instance, token=tok)
            # An instance nobody registered.
            Client(ch, bearer(tok)).get(b"2", [("agentgate-instance-claim", "made-up")])
            assert_identity(router.last("GetJob"), "claimer", "grpc", ABSENT, token=tok)
            # Another agent claiming this agent's instance.
            Client(ch, bearer(other)).get(b"3", [("agentgate-instance-claim", instance)])
            assert_identity(router.last("GetJob"), "stranger", "grpc", ABSENT, token=other)
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 9. Shutdown: a long poll still open when the grace is over ends with a status, not a reset.


def test_a_long_poll_open_at_shutdown_ends_unavailable_after_the_grace(env):
    router = JobRouter()
    try:
        tok = env.token("draining-runner")
        g = env.gateway(extra=backend_flag(router.url) + ["--set", 'shutdown_grace="2s"'])
        with channel_for(g, "grpc") as ch:
            poll = Client(ch, bearer(tok)).wait_job(wait_job_request(job="never", delay=60),
                                                    metadata=bearer(tok), timeout=30)
            wait_for(lambda: len(router.calls_to("WaitJob")) == 1, timeout=10, what="the long poll open")
            g.proc.p.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            e = rpc_error(lambda: list(poll))
            took = time.monotonic() - t0
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
        assert "shutting down" in e.details() and "call again" in e.details(), e.details()
        assert 1.5 < took < 6, f"ended after {took:.1f}s; the grace is 2 s"
        rec = router.calls_to("WaitJob")[0]
        assert rec.wait_ended(5) and rec.cancelled, rec
        g.proc.p.wait(timeout=10)
    finally:
        router.stop()


# ---------------------------------------------------------------------------------------------
# 7. A flood of refused calls through a proxy costs the real callers behind it nothing.


# What floods the proxy: calls with a wrong token (refused: max_refused_calls_before_auth), or
# health checks without one (answered, but max_streams_before_auth counts them).
FLOODS = {
    "bad_token": (["-H", "authorization: Bearer not-a-token-of-anyone"], method_path("GetJob"), "refused_calls"),
    "health_checks": ([], "/grpc.health.v1.Health/Check", "streams_before_auth"),
}


@pytest.mark.parametrize("flood_of", sorted(FLOODS))
@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_a_flood_through_a_proxy_fails_no_call(env, kind, flood_of):
    """The proxy carries everyone's calls on its few upstream connections. The gateway sends
    GOAWAY on a connection that carried too many calls without a valid token, and the proxy
    stops using it; cutting it off instead failed the next call the proxy had put on it: 0.3 to
    2% of the flood's calls (nginx: 502; HAProxy: reset), and a real caller's as well."""
    flags, path, reason = FLOODS[flood_of]
    router = JobRouter()
    try:
        good = env.token("flood-victim")
        g, ports = tls_gateway_for_proxy(env, router)
        port = free_port()
        if kind == "nginx":
            logdir = env.tmp / "nginx" / "logs"
            logdir.mkdir(parents=True, exist_ok=True)
            Nginx(env, render_nginx("tls", ports, logdir, port, env.certs), port)
        else:
            clear = free_port()
            pem = haproxy_pem(env.certs, env.tmp / "haproxy.pem")
            HAProxy(env, render_haproxy("tls", ports, port, clear, env.certs, pem), port, clear)
        body = env.tmp / "flood-body.bin"
        body.write_bytes(raw_h2.grpc_frame(b"flood"))
        flood = subprocess.Popen(
            ["h2load", "-D", "12", "-c", "8", "-m", "4",
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             *flags, "-d", str(body), f"https://localhost:{port}{path}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        failures, done = [], 0
        try:
            time.sleep(1)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                # A new client connection each time, as separate runners are.
                with ic.tls_channel(port, env.certs["ca"]) as ch:
                    try:
                        resp, _ = Client(ch, bearer(good)).get(b"real", timeout=10)
                        assert resp == b"job:real"
                        done += 1
                    except grpc.RpcError as e:
                        failures.append(f"{e.code().name}: {e.details()}")
        finally:
            out, _ = flood.communicate(timeout=30)
        refused = g.metric_sum("agentgate_connections_rejected_total", reason=reason)
        assert refused > 0, f"the flood never reached the limit ({reason}): {out[-1500:]}"
        assert done >= 20, (done, out[-1500:])
        assert not failures, f"{len(failures)} of {done + len(failures)} real calls failed: {failures[:5]}"
        # The flood's own calls are the sharper probe (tens of thousands of them): each must get
        # the gateway's answer (HTTP 200 and a grpc-status), none a proxy error or a reset.
        reqs = re.search(r"requests: (\d+) total.* (\d+) failed, (\d+) errored", out)
        codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        assert reqs and codes, out[-1500:]
        assert int(reqs.group(1)) > 10 * refused, f"too few flood calls to tell: {out[-1500:]}"
        assert (reqs.group(2), reqs.group(3), codes.group(4)) == ("0", "0", "0"), \
            f"the proxy failed flood calls on connections the gateway closed: {out[-1500:]}"
    finally:
        router.stop()


class FailoverTcp:
    """A TCP balancer in front of several agent ports: each connection goes to the first port
    that accepts it. Connections after the first wait `later_delay` seconds before that, as
    a balancer that notices a dead gateway only by its health checks."""

    def __init__(self, ports: list[int], later_delay: float):
        self.ports, self.later_delay, self.accepted = ports, later_delay, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

        def serve(client):
            if self.accepted > 1:
                time.sleep(self.later_delay)
            for p in self.ports:
                try:
                    upstream = socket.create_connection(("127.0.0.1", p), timeout=2)
                    break
                except OSError:
                    continue
            else:
                client.close()
                return
            upstream.settimeout(None)
            threading.Thread(target=pump_bytes, args=(client, upstream), daemon=True).start()
            pump_bytes(upstream, client)

        def accept():
            while True:
                try:
                    client, _ = self.listener.accept()
                except OSError:
                    return
                self.accepted += 1
                threading.Thread(target=serve, args=(client,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self):
        self.listener.close()


def test_sidecar_calls_wait_for_the_next_connection_when_the_gateway_goes_away(env):
    """An agent behind a TCP balancer with two gateways; the one it is connected to is stopped
    (SIGTERM: GOAWAY, then drain). Local calls made while the agent reconnects (the balancer
    takes 1.5 s to send it to the other gateway) wait for the new connection and succeed;
    before, they failed at once on the old one with "may or may not have reached the
    backend"."""
    router = JobRouter()
    lb = None
    try:
        tok_file = env.token_file("mover")
        g1 = env.gateway(tls=False, extra=backend_flag(router.url), name="gateway1")
        g2 = env.gateway(tls=False, extra=backend_flag(router.url), name="gateway2")
        lb = FailoverTcp([g1.port, g2.port], later_delay=1.5)
        agent, lp = start_sidecar(env, f"grpc://127.0.0.1:{lb.port}", tok_file, "mover", "grpc")
        ready_sidecar(g1, agent, lp, "mover", "grpc")
        g1.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        results = []
        with ic.h2c_channel(lp) as ch:
            cl = Client(ch)
            for i in range(3):
                t0 = time.monotonic()
                try:
                    resp, _ = cl.get(f"during-move-{i}".encode(), timeout=15)
                    results.append((resp, round(time.monotonic() - t0, 2)))
                except grpc.RpcError as e:
                    results.append((e.code().name, e.details()))
        assert [r[0] for r in results] == [f"job:during-move-{i}".encode() for i in range(3)], results
        g2.wait_agent("mover", transport="grpc")
    finally:
        router.stop()
        if lb:
            lb.close()
