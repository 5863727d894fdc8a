"""Two more front ends, with their shipped configs rendered as test_proxies.py does:

- Caddy (Debian's 2.6) carrying h2c (grpc://) and WebSocket (ws://) agents on ONE cleartext
  port, which nginx 1.22 cannot, and grpcs:// and wss:// on its TLS site;
- HAProxy in TCP mode passing TLS through to the gateway, the "load balancer in TCP mode":
  the gateway terminates TLS, so agents see its own certificate and it labels them grpcs/wss.

Callers are clients we did not write: grpcio, grpcurl, curl and Python's http.client.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import grpc
import pytest

import ingress_clients as ic
from conftest import free_port, wait_for
from proxies import (
    HAPROXY_SOURCE, UPSTREAM_HEALTH_SERVICE, Caddy, GatewayPorts, GrpcUpstream, HAProxy,
    HttpUpstream, grpc_health_check, https_get, render_caddy, render_haproxy_tcp,
)

FAST_BACKOFF = ["--backoff-initial", "500ms", "--backoff-max", "2s"]


@pytest.fixture
def upstreams():
    h, g = HttpUpstream(tag="behind-front-end"), GrpcUpstream()
    try:
        yield h, g
    finally:
        h.close()
        g.close()


def agent(env, name, url, ups, extra=()):
    http_up, grpc_up = ups
    return env.agent(url, env.token_file(name), name=f"agent-{name}",
                     extra=["--upstream", http_up.url, "--grpc-upstream", grpc_up.url,
                            *FAST_BACKOFF, *extra])


def test_caddy_carries_h2c_and_websocket_agents_on_one_port(env, upstreams):
    g = env.gateway(tls=False, cleartext=False)
    ports = GatewayPorts(agent=g.port, admin=g.admin_port, api=g.api_port)
    tls_port, clear_port = free_port(), free_port()
    caddy = Caddy(env, render_caddy(ports, tls_port, clear_port, env.certs), tls_port, clear_port)
    api = env.token("caller", kind="api")

    clear = f"127.0.0.1:{clear_port}"
    agent(env, "c-grpc", f"grpc://{clear}", upstreams)
    agent(env, "c-ws", f"ws://{clear}/-/agent/", upstreams, ["--transport", "websocket"])
    # auto on a ws:// URL: the direct-gRPC probe goes through the same Caddy port and wins.
    agent(env, "c-auto", f"ws://{clear}/-/agent/", upstreams)
    agent(env, "c-grpcs", f"grpcs://localhost:{tls_port}", upstreams)
    agent(env, "c-wss", f"wss://localhost:{tls_port}/-/agent/", upstreams, ["--transport", "websocket"])
    # Caddy speaks h2c or HTTP/1.1 to the cleartext gateway, whatever the agent used.
    expected = {"c-grpc": "grpc", "c-ws": "ws", "c-auto": "grpc", "c-grpcs": "grpc", "c-wss": "ws"}
    for name, transport in expected.items():
        g.wait_agent(name, transport=transport, timeout=30)

    for name in expected:
        status, _, body = https_get(tls_port, f"/agents/{name}/proxy/via-caddy?n=1", env.certs["ca"],
                                    {"authorization": f"Bearer {api}"})
        assert status == 200, (name, status, body[:300])
        echo = json.loads(body)
        assert echo["server"] == "behind-front-end" and echo["path"] == "/via-caddy?n=1"
        assert "authorization" not in echo["headers"]
        # grpcio through Caddy's TLS site and its cleartext port: metadata picks the tunnel API.
        md = [("authorization", f"Bearer {api}"), ("agentgate-agent", name)]
        assert grpc_health_check(f"localhost:{tls_port}", UPSTREAM_HEALTH_SERVICE, md,
                                 env.certs["ca"]) == "SERVING"
        assert grpc_health_check(clear, UPSTREAM_HEALTH_SERVICE, md, None) == "SERVING"
    # Without agentgate-agent the call is the gateway's own health service (NOT_FOUND for the
    # upstream's name): the metadata, not the path, did the routing.
    with pytest.raises(grpc.RpcError) as e:
        grpc_health_check(clear, UPSTREAM_HEALTH_SERVICE, [("authorization", f"Bearer {api}")], None)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # curl, HTTP/1.1 on the cleartext port, which h2c shares.
    r = subprocess.run(["curl", "-sS", "--http1.1", "-H", f"Authorization: Bearer {api}",
                        f"http://{clear}/agents/c-ws/proxy/curl"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/curl", (r.stdout, r.stderr)
    assert caddy.proc.alive()


def test_haproxy_in_tcp_mode_passes_tls_through_to_the_gateway(env, upstreams):
    g = env.gateway(tls=True, cleartext=False,
                    extra=["--api-tls-cert", env.certs["cert"], "--api-tls-key", env.certs["key"],
                           "--set", f"proxy_protocol_from={HAPROXY_SOURCE}"])
    ports = GatewayPorts(agent=g.port, admin=g.admin_port, api=g.api_port)
    port, api_port = free_port(), free_port()
    hap = HAProxy(env, render_haproxy_tcp(ports, port, api_port), port, api_port, name="haproxy-tcp")
    api = env.token("caller", kind="api")

    agent(env, "t-grpcs", f"grpcs://localhost:{port}", upstreams)
    agent(env, "t-wss", f"wss://localhost:{port}/-/agent/", upstreams, ["--transport", "websocket"])
    agent(env, "t-auto", f"wss://localhost:{port}/-/agent/", upstreams)
    # The gateway terminated TLS itself: it labels agents with their real transports, and
    # from HAProxy's PROXY header it knows their own address, not HAProxy's.
    for name, transport in {"t-grpcs": "grpcs", "t-wss": "wss", "t-auto": "grpcs"}.items():
        rec = g.wait_agent(name, transport=transport, timeout=30)
        assert rec["peer"].startswith("127.0.0.1:"), rec

    # What a client sees through HAProxy is the gateway's own certificate.
    ctx = ssl.create_default_context(cafile=str(env.certs["ca"]))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="localhost") as t:
        through = t.getpeercert(binary_form=True)
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="localhost") as t:
        assert t.getpeercert(binary_form=True) == through

    # grpcurl through the passthrough: the gateway's own health service, over TLS.
    r = ic.run([ic.grpcurl_path(), "-cacert", str(env.certs["ca"]), f"localhost:{port}",
                "grpc.health.v1.Health/Check"], timeout=20)
    assert r.returncode == 0 and "SERVING" in r.stdout, (r.stdout, r.stderr)
    # The tunnel API on its own passthrough frontend: curl and grpcio.
    for name in ("t-grpcs", "t-wss", "t-auto"):
        r = subprocess.run(["curl", "-sS", "--cacert", str(env.certs["ca"]), "-H",
                            f"Authorization: Bearer {api}",
                            f"https://localhost:{api_port}/agents/{name}/proxy/tcp-mode"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["path"] == "/tcp-mode"
        md = [("authorization", f"Bearer {api}"), ("agentgate-agent", name)]
        assert grpc_health_check(f"localhost:{api_port}", UPSTREAM_HEALTH_SERVICE, md,
                                 env.certs["ca"]) == "SERVING"
    # The tunnel API's access log names each caller, from HAProxy's PROXY header.
    access = [line for line in g.proc.output().splitlines() if "/tcp-mode" in line and "tunnel request" in line]
    assert access and all("caller=127.0.0.1:" in line for line in access), access[:3]
    wait_for(lambda: "agentgate_agents/agentgate_agent_port/gateway1" in hap.access_log()
             or "agentgate_agents agentgate_agent_port/gateway1" in hap.access_log(),
             timeout=15, what="HAProxy's tcplog line for an agent connection")
    # The health checks ask /readyz on the admin port: none is a TLS handshake cut short on
    # the agent port, counted and logged every 5 s (they were, with check-send-proxy).
    before = g.metric("agentgate_connections_rejected_total", reason="tls_error")
    lines = g.proc.output().count("TLS handshake failed")
    time.sleep(6)
    assert g.metric("agentgate_connections_rejected_total", reason="tls_error") == before
    assert g.proc.output().count("TLS handshake failed") == lines


@pytest.mark.parametrize("proxy_header", ["send-proxy-v2", "send-proxy"])
def test_haproxy_proxy_protocol_gives_each_client_its_own_address(env, upstreams, proxy_header):
    """HAProxy's PROXY header (version 2 as shipped, and version 1): the per-source limit
    counts each client behind HAProxy, not HAProxy; a connection from HAProxy's address
    without a header is refused, and a header from anyone else is not believed."""
    g = env.gateway(tls=True, cleartext=False, extra=[
        "--set", f"proxy_protocol_from=[\"{HAPROXY_SOURCE}\"]",
        "--set", "max_connections_per_source=2"])
    ports = GatewayPorts(agent=g.port, admin=g.admin_port, api=g.api_port)
    port, api_port = free_port(), free_port()
    HAProxy(env, render_haproxy_tcp(ports, port, api_port, proxy_header), port, api_port,
            name=f"haproxy-{proxy_header}")
    ctx = ssl.create_default_context(cafile=str(env.certs["ca"]))
    ctx.set_alpn_protocols(["h2"])

    def tls_through_haproxy(source: str):
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        try:
            return ctx.wrap_socket(s, server_hostname="localhost")
        except (ssl.SSLError, OSError):
            s.close()
            return None

    refused_before = g.metric("agentgate_connections_rejected_total", reason="source_over_limit")
    held = [tls_through_haproxy("127.0.0.5") for _ in range(2)]
    assert all(held), "two connections from one client are within the limit"
    assert tls_through_haproxy("127.0.0.5") is None, "the third from the same client is over it"
    wait_for(lambda: g.metric("agentgate_connections_rejected_total", reason="source_over_limit")
             == refused_before + 1, what="the refusal counted")
    other = tls_through_haproxy("127.0.0.6")
    assert other is not None, "another client behind the same HAProxy is not"
    for t in [*held, other]:
        t.close()

    # An agent through HAProxy registers under its own address.
    agent(env, "pp-agent", f"grpcs://localhost:{port}", upstreams)
    assert g.wait_agent("pp-agent", transport="grpcs", timeout=30)["peer"].startswith("127.0.0.1:")

    # From HAProxy's address but without a header (something else on that host): refused.
    raw = socket.create_connection(("127.0.0.1", g.port), timeout=5,
                                   source_address=(HAPROXY_SOURCE, 0))
    raw.settimeout(10)
    raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32))  # a TLS ClientHello's start
    try:
        assert raw.recv(100) == b"", "closed without an answer"
    except ConnectionResetError:
        pass  # closed with our unread bytes still queued: a reset, as good
    raw.close()
    wait_for(lambda: g.metric("agentgate_connections_rejected_total", reason="proxy_header") >= 1,
             what="proxy_header counted")
    # A header from an address not listed is not believed: it is just bad input there.
    spoof = socket.create_connection(("127.0.0.1", g.port), timeout=5)
    spoof.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 443\r\n")
    spoof.settimeout(5)
    while spoof.recv(100):  # the gateway answers with a TLS alert at most, then closes
        pass
    spoof.close()
    wait_for(lambda: g.metric("agentgate_connections_rejected_total", reason="tls_error") >= 1,
             what="the spoofed header refused as a failed TLS handshake")
    assert all(not a["peer"].startswith("203.0.113.9") for a in g.agents())
