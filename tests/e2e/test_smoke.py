"""A first end-to-end check: one gateway, one agent per transport, all registered."""

from conftest import http_get


def test_four_schemes_register_against_one_gateway(env):
    g = env.gateway(tls=True, cleartext=True)
    for scheme in ("grpc", "grpcs", "ws", "wss"):
        tok = env.token_file(f"smoke-{scheme}")
        extra = ["--transport", "websocket"] if scheme.startswith("ws") else []
        env.agent(g.url(scheme), tok, extra=extra, name=f"agent-{scheme}")
    for scheme in ("grpc", "grpcs", "ws", "wss"):
        a = g.wait_agent(f"smoke-{scheme}", transport=scheme)
        assert a["instance_id"] and a["version"].startswith("agentgate/")
    assert g.metric("agentgate_connections_accepted_total", transport="wss") >= 1
    status, _, _ = http_get(g.admin + "/readyz")
    assert status == 200
