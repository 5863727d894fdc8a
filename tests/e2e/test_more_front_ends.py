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

import grpc
import pytest

import ingress_clients as ic
from conftest import free_port, wait_for
from proxies import (
    UPSTREAM_HEALTH_SERVICE, Caddy, GatewayPorts, GrpcUpstream, HAProxy, HttpUpstream,
    grpc_health_check, https_get, render_caddy, render_haproxy_tcp,
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
                    extra=["--api-tls-cert", env.certs["cert"], "--api-tls-key", env.certs["key"]])
    ports = GatewayPorts(agent=g.port, admin=g.admin_port, api=g.api_port)
    port, api_port = free_port(), free_port()
    hap = HAProxy(env, render_haproxy_tcp(ports, port, api_port), port, api_port, name="haproxy-tcp")
    api = env.token("caller", kind="api")

    agent(env, "t-grpcs", f"grpcs://localhost:{port}", upstreams)
    agent(env, "t-wss", f"wss://localhost:{port}/-/agent/", upstreams, ["--transport", "websocket"])
    agent(env, "t-auto", f"wss://localhost:{port}/-/agent/", upstreams)
    # The gateway terminated TLS itself: it labels agents with their real transports.
    for name, transport in {"t-grpcs": "grpcs", "t-wss": "wss", "t-auto": "grpcs"}.items():
        g.wait_agent(name, transport=transport, timeout=30)

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
    wait_for(lambda: "agentgate_agents/agentgate_agent_port/gateway1" in hap.access_log()
             or "agentgate_agents agentgate_agent_port/gateway1" in hap.access_log(),
             timeout=15, what="HAProxy's tcplog line for an agent connection")
