"""The tunnel API's access log: one line per request once it is over, naming the token, the
agent, the upstream, method, path, status, bytes each way, duration, outcome and who ended it;
a caller that goes away is `caller_aborted`; a revoked API token ends the request in flight."""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import threading
import time

from conftest import BIN, wait_for
from lifecycle_helpers import Download, PatternServer, api_get, get_and_leave, plain


def access_lines(g) -> list[str]:
    return [line for line in plain(g.proc.output()).splitlines() if "agentgate::access" in line]


def field(line: str, name: str) -> str:
    m = re.search(rf'\b{name}=("?)([^" ]*)\1', line)
    assert m, f"no {name} in {line}"
    return m.group(2)


def setup(env):
    up = PatternServer()
    api = env.token("ci-caller", kind="api")
    g = env.gateway(tls=False, cleartext=False)
    env.agent(g.url("grpc"), env.token_file("logged-edge"), extra=["--upstream", up.url], name="agent")
    g.wait_agent("logged-edge")
    return up, api, g


def test_a_whole_request_and_a_caller_abort_each_get_a_line(env):
    up, api, g = setup(env)
    try:
        status, body = api_get(g.api_port, "/agents/logged-edge/proxy/bytes/1000?x=1", api)
        assert (status, len(body)) == (200, 1000)
        line = wait_for(lambda: next(iter(access_lines(g)), None), timeout=5, what="an access line")
        assert field(line, "outcome") == "ok" and field(line, "ended_by") == "upstream", line
        assert field(line, "status") == "200" and field(line, "bytes_out") == "1000", line
        assert field(line, "token_name") == "ci-caller" and field(line, "agent") == "logged-edge", line
        assert field(line, "method") == "GET" and field(line, "path") == "/bytes/1000?x=1", line
        assert field(line, "upstream") == "default" and field(line, "kind") == "http", line
        assert field(line, "transport") == "grpc", line
        assert api not in plain(g.proc.output()), "the token itself must never be logged"

        # A caller that reads a little of a 64 MiB answer and hangs up.
        conn = http.client.HTTPConnection("127.0.0.1", g.api_port, timeout=10)
        conn.request("GET", "/agents/logged-edge/proxy/bytes/67108864",
                     headers={"Authorization": f"Bearer {api}"})
        r = conn.getresponse()
        assert r.status == 200
        r.read(65536)
        conn.sock.close()
        conn.close()
        aborted = wait_for(lambda: next((x for x in access_lines(g) if "caller_aborted" in x), None),
                           timeout=10, what="the abort's access line")
        assert field(aborted, "ended_by") == "caller", aborted
        assert int(field(aborted, "bytes_out")) < 67108864, aborted
        assert g.metric("agentgate_tunnel_requests_total", kind="http", outcome="caller_aborted") >= 1
        assert g.metric("agentgate_tunnel_requests_total", kind="http", outcome="ok", transport="grpc") >= 1
        assert g.metric("agentgate_tunnel_bytes_total", direction="from_agent", transport="grpc") >= 1000
        # The histograms of the wait for a tunnel and of registration.
        assert g.metric("agentgate_tunnel_wait_seconds_count", outcome="got") >= 2
        assert g.metric("agentgate_registration_duration_seconds_count", transport="grpc") >= 1
        assert g.metric("agentgate_registration_duration_seconds_bucket", transport="grpc", le="+Inf") >= 1
    finally:
        up.close()


def test_a_caller_gone_before_the_answer_gets_a_line_and_frees_the_tunnel_at_once(env):
    """A caller that hangs up before any answer still gets its line (status 499, as nginx logs
    it); one that hangs up mid-upload ends the request at the agent at once, instead of the
    agent waiting for the rest of the body until its upstream timeout (60 s) with the tunnel
    held."""
    up, api, g = setup(env)
    try:
        # Gone while the upstream takes its time over the answer.
        get_and_leave(g.api_port, "/agents/logged-edge/proxy/sleep/3", api)
        line = wait_for(lambda: next((x for x in access_lines(g) if "/sleep/3" in x), None), timeout=10,
                        what="the access line of the request whose caller went before the answer")
        assert field(line, "outcome") == "caller_aborted" and field(line, "ended_by") == "caller", line
        assert field(line, "status") == "499", line
        # The agent had the request: the line names its connection ("none" only when no agent
        # got the request).
        assert field(line, "transport") == "grpc", line

        # Gone mid-upload: 3 MiB of a declared 10 MB.
        t0 = time.monotonic()
        s = socket.create_connection(("127.0.0.1", g.api_port), timeout=10)
        s.sendall((f"POST /agents/logged-edge/proxy/upload HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {api}\r\nContent-Length: 10000000\r\n\r\n").encode())
        s.sendall(b"u" * (3 * 1024 * 1024))
        s.close()
        line = wait_for(lambda: next((x for x in access_lines(g) if "/upload" in x), None), timeout=20,
                        what="the access line of the abandoned upload")
        took = time.monotonic() - t0
        assert field(line, "outcome") == "caller_aborted" and field(line, "ended_by") == "caller", line
        assert field(line, "transport") == "grpc", line
        assert took < 10, f"the abandoned upload ended only after {took:.1f}s: {line}"
        assert g.metric("agentgate_tunnel_requests_total", kind="http", outcome="caller_aborted",
                        transport="grpc") == 2
        assert "broke off" in plain(g.proc.output())
        status, body = api_get(g.api_port, "/agents/logged-edge/proxy/bytes/10", api)
        assert status == 200 and len(body) == 10
    finally:
        up.close()


def test_a_revoked_api_token_ends_its_request_in_flight(env):
    up, api, g = setup(env)
    try:
        size = 64 * 1024 * 1024
        dl = Download(g.api_port, f"/agents/logged-edge/proxy/bytes/{size}", api, size, rate=1e6)
        t = threading.Thread(target=dl.run, daemon=True)
        t.start()
        wait_for(lambda: dl.got > 0, timeout=10, what="the download started")
        subprocess.run([str(BIN), "token", "revoke", "ci-caller", "--tokens", str(env.tokens)],
                       check=True, capture_output=True, timeout=20)
        t.join(timeout=15)
        assert not t.is_alive(), "the download went on after its token was revoked"
        assert not dl.intact and dl.got < size, (dl.got, dl.error)
        line = wait_for(lambda: next((x for x in access_lines(g) if "revoked" in x), None),
                        timeout=5, what="the revoked request's access line")
        assert field(line, "ended_by") == "gateway", line
        assert "its API token was revoked" in g.proc.output()
        assert api_get(g.api_port, "/agents/logged-edge/proxy/", api)[0] == 401
    finally:
        up.close()


def test_a_grpc_call_the_gateway_answers_itself_logs_its_grpc_status(env):
    """A gRPC tunnel call that no agent served (its agent is not connected) gets UNAVAILABLE
    from the gateway; the access line names that status (14), not "-"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    api = env.token("grpc-caller", kind="api")
    env.token_file("away-edge")
    g = env.gateway(tls=False, cleartext=False, extra=["--set", 'agent_reconnect_wait="200ms"'])
    with grpc.insecure_channel(f"127.0.0.1:{g.api_port}") as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=10,
                metadata=[("agentgate-agent", "away-edge"), ("authorization", f"Bearer {api}")])
            raise AssertionError("the call succeeded without its agent")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
    line = wait_for(lambda: next((x for x in access_lines(g) if "away-edge" in x), None), timeout=5,
                    what="the access line")
    assert field(line, "outcome") == "not_connected", line
    assert field(line, "grpc_status") == "14", line


def test_answers_that_end_with_trailers_or_have_no_body_are_logged_whole(env):
    """A gRPC answer ends with trailers, after which servers stop polling it; an answer to
    HEAD has no body at all. Both were logged `caller_aborted` by the caller (17,112 successful
    h2load calls in one probe run). Now `ok`, ended by the upstream."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from proxies import UPSTREAM_HEALTH_SERVICE, GrpcUpstream

    up, grpc_up = PatternServer(), GrpcUpstream()
    try:
        api = env.token("whole-caller", kind="api")
        g = env.gateway(tls=False, cleartext=False)
        env.agent(g.url("grpc"), env.token_file("whole-edge"),
                  extra=["--upstream", up.url, "--grpc-upstream", grpc_up.url], name="agent")
        g.wait_agent("whole-edge")
        with grpc.insecure_channel(f"127.0.0.1:{g.api_port}") as ch:
            for _ in range(3):
                r = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=UPSTREAM_HEALTH_SERVICE), timeout=10,
                    metadata=[("agentgate-agent", "whole-edge"), ("authorization", f"Bearer {api}")])
                assert r.status == health_pb2.HealthCheckResponse.SERVING
        conn = http.client.HTTPConnection("127.0.0.1", g.api_port, timeout=10)
        conn.request("HEAD", "/agents/whole-edge/proxy/bytes/1000", headers={"Authorization": f"Bearer {api}"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-length") == "1000"
        r.read()
        conn.close()
        lines = wait_for(lambda: (lambda x: x if len(x) >= 4 else None)(access_lines(g)), timeout=10,
                         what="four access lines")
        grpc_lines = [x for x in lines if field(x, "kind") == "grpc"]
        assert len(grpc_lines) == 3, lines
        for line in grpc_lines:
            assert field(line, "outcome") == "ok" and field(line, "ended_by") == "upstream", line
            assert field(line, "grpc_status") == "0", line
        head = next(x for x in lines if field(x, "method") == "HEAD")
        assert field(head, "outcome") == "ok" and field(head, "status") == "200", head
        assert g.metric_sum("agentgate_tunnel_requests_total", outcome="caller_aborted") == 0
    finally:
        up.close()
        grpc_up.close()
