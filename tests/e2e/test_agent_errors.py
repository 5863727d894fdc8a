"""An agent pointed the wrong way says what happened and what to do, in one sentence, without
rustls's or tungstenite's internal names: a CA certificate served as the gateway's own (what
`openssl req -x509` makes), a CA the agent was not given, TLS URLs against a cleartext port and
cleartext URLs against a TLS port."""

from __future__ import annotations

import subprocess

import pytest

from conftest import wait_for


def ca_only_cert(d):
    """A self-signed CA:TRUE certificate for localhost, as `openssl req -x509` makes it."""
    d.mkdir(parents=True, exist_ok=True)
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    return cert, key


def agent_says(env, url, extra=(), ca=True, name="agent") -> str:
    tf = env.token_file(name)
    a = env.agent(url, tf, extra=["--transport", "websocket" if url.startswith("ws") else "grpc",
                                   *extra], name=name, ca=ca)
    return wait_for(lambda: next((line for line in a.output().splitlines()
                                  if "cannot connect" in line), None),
                    timeout=15, what=f"{name}'s reason")


def assert_plain(line: str):
    for internal in ("CaUsedAsEndEntity", "BadSignature", "UnknownIssuer", "httparse", "Custom {",
                     "kind:", "OtherError"):
        assert internal not in line, line


@pytest.fixture
def gw(env):
    return env.gateway(tls=True, cleartext=True)


def test_a_ca_certificate_served_as_the_gateways_own(env):
    cert, key = ca_only_cert(env.tmp / "ca-only")
    # The conftest gateway serves env.certs' files: put the CA-only pair there.
    env.certs["cert"].write_bytes(cert.read_bytes())
    env.certs["key"].write_bytes(key.read_bytes())
    g = env.gateway(tls=True, cleartext=False)
    line = agent_says(env, g.url("grpcs"), extra=["--ca-cert", str(cert)], ca=False)
    assert "CA certificate as its own" in line and "openssl req -x509" in line, line
    assert_plain(line)


def test_no_ca_given(env, gw):
    line = agent_says(env, gw.url("grpcs"), ca=False)
    assert "not signed by a CA this agent trusts" in line and "--ca-cert" in line, line
    assert_plain(line)


def test_ws_against_the_tls_port(env, gw):
    line = agent_says(env, f"ws://127.0.0.1:{gw.port}/agent")
    assert "did not answer plain HTTP" in line and "wss://" in line, line
    assert_plain(line)


def test_grpc_against_the_tls_port(env, gw):
    line = agent_says(env, f"grpc://127.0.0.1:{gw.port}")
    assert "answered HTTP/2 without TLS" in line and "grpcs://" in line, line
    assert_plain(line)


def test_grpcs_against_the_cleartext_port(env, gw):
    line = agent_says(env, f"grpcs://localhost:{gw.clear_port}")
    assert "TLS handshake" in line and "cleartext, use grpc://" in line, line
    assert_plain(line)


@pytest.mark.parametrize("scheme", ["grpc", "ws"])
def test_an_agent_pointed_at_the_tunnel_api_port_is_told_which_port_is_the_agents(env, gw, scheme):
    """The tunnel API port speaks HTTP/2 and HTTP/1.1 too, so an agent pointed at it got
    somewhere: it was told its call lacked `agentgate-agent` metadata (gRPC), or 404 "no such
    route" (WebSocket). It is told the port is the API's and to use the agent port."""
    line = agent_says(env, f"{scheme}://127.0.0.1:{gw.api_port}/agent")
    assert "tunnel API port" in line and "agent port" in line and "--server" in line, line
    assert "agentgate-agent" not in line, line
    assert_plain(line)


def test_agent_check_reports_each_step_and_its_exit_status(env):
    """`agent --check`: the name, the connection (transport, and why not direct), each upstream;
    exit 0 when all pass. A wrong token and a closed upstream each fail their step in plain
    words, and the exit status says so. Nothing stays connected afterwards."""
    from conftest import BIN, free_port
    from proxies import HttpUpstream

    # The token exists before the gateway reads its store: a check has no backoff to wait out
    # the store's re-read.
    good = env.token_file("checked-edge")
    g = env.gateway(tls=True, cleartext=False)
    up = HttpUpstream(tag="checked")
    try:
        r = subprocess.run([str(BIN), "agent", "--check", "--server", g.url("wss", "/-/agent/"),
                            "--token-file", str(good), "--ca-cert", str(env.certs["ca"]),
                            "--upstream", up.url], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
        out = r.stdout
        assert "ok      resolve localhost" in out, out
        assert 'registered as "checked-edge" over grpcs' in out, out
        assert "upstream default" in out and "accepts TCP connections" in out, out
        assert "all 3 checks passed" in out, out
        wait_for(lambda: all(a["name"] != "checked-edge" for a in g.agents()), timeout=10,
                 what="the check's session to end")

        bad = env.tmp / "wrong-token"
        bad.write_text("agt_this-is-not-a-token-at-all-xxxxxxxxxx\n")
        closed = free_port()
        r = subprocess.run([str(BIN), "agent", "--check", "--server", g.url("grpcs"),
                            "--token-file", str(bad), "--ca-cert", str(env.certs["ca"]),
                            "--upstream", f"http://127.0.0.1:{closed}"], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        connect = next(ln for ln in lines if "connect to grpcs://" in ln)
        assert connect.strip().startswith("FAILED") and "token" in connect.lower(), connect
        upstream = next(ln for ln in lines if "upstream default" in ln)
        assert upstream.strip().startswith("FAILED") and "502" in upstream, upstream
        assert "2 of 3 checks failed" in r.stderr, r.stderr
        assert_plain(r.stdout)
    finally:
        up.close()


def test_a_gateway_that_is_down_is_one_line_per_attempt_not_a_failed_probe_and_a_fallback(env):
    """A wss:// agent (auto mode: it probes direct gRPC first) whose gateway is not listening:
    the WebSocket fallback would dial the same address, so the agent says once per attempt that
    nothing listens, without a line about a failed HTTP/2 probe."""
    from conftest import free_port

    port = free_port()
    tf = env.token_file("lonely")
    a = env.agent(f"wss://localhost:{port}/", tf, extra=["--backoff-initial", "200ms", "--backoff-max", "400ms"],
                  name="lonely")
    wait_for(lambda: a.output().count("cannot connect") >= 3, timeout=15, what="three attempts")
    out = a.output()
    assert "direct gRPC probe failed" not in out, out[-2000:]
    assert "falling back" not in out
    line = next(line for line in out.splitlines() if "cannot connect" in line)
    assert f"cannot connect to localhost:{port}" in line or f"127.0.0.1:{port}" in line, line
