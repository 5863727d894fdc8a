"""Through real proxies: the shipped nginx and HAProxy configs in front of the gateway.

Every proxy config used here is rendered from deploy/nginx/*.conf or deploy/haproxy/*.cfg with
only ports, paths and certificates substituted (see proxies.py), so what passes here is what we
ship. Two gateway setups behind each proxy:
- "tls": TLS on the gateway's agent and API ports; the proxy speaks grpcs / https to it, so the
  gateway's transport label (grpcs / wss) tells what the proxy used towards it;
- "cleartext": the proxy speaks h2c / HTTP/1.1; the gateway then labels agents grpc / ws.
The gateway only ever sees the proxy's connection, never the agent's: behind a TLS-terminating
proxy the label describes the proxy-to-gateway hop (docs/deploy.md says so).
"""

from __future__ import annotations

import json
import re
import time

import grpc
import pytest

from conftest import free_port, wait_for
from proxies import (
    UPSTREAM_HEALTH_SERVICE, GatewayPorts, GrpcUpstream, HAProxy, HttpUpstream, Nginx,
    expected_digest, grpc_health_check, haproxy_pem, https_download, https_get, nginx_location,
    render_haproxy, render_nginx,
)

FAST_BACKOFF = ["--backoff-initial", "500ms", "--backoff-max", "2s"]
MiB = 1024 * 1024


@pytest.fixture
def upstreams():
    h = HttpUpstream()
    g = GrpcUpstream()
    try:
        yield h, g
    finally:
        h.close()
        g.close()


def start_gateway(env, variant: str, extra: list[str] | None = None, name: str = "gateway"):
    """The gateway as the proxy's upstream: TLS on agent and API ports ("tls") or none."""
    extra = list(extra or [])
    if variant == "tls":
        extra += ["--api-tls-cert", env.certs["cert"], "--api-tls-key", env.certs["key"]]
        g = env.gateway(tls=True, cleartext=False, extra=extra, name=name)
    else:
        g = env.gateway(tls=False, cleartext=False, extra=extra, name=name)
    return g, GatewayPorts(agent=g.port, admin=g.admin_port, api=g.api_port)


class Front:
    """A started proxy and the URLs agents and users use through it."""

    def __init__(self, kind, proc, ca, port, clear_port=None):
        self.kind, self.proc, self.ca, self.port, self.clear_port = kind, proc, ca, port, clear_port

    def url(self, scheme: str) -> str:
        if scheme == "grpcs":
            return f"grpcs://localhost:{self.port}"
        if scheme == "wss":
            return f"wss://localhost:{self.port}/-/agent/"
        if scheme == "grpc":
            return f"grpc://127.0.0.1:{self.clear_port}"
        if scheme == "ws":
            return f"ws://127.0.0.1:{self.clear_port}/-/agent/"
        raise ValueError(scheme)

    def access_log(self) -> str:
        return self.proc.access_log()


def start_proxy(env, kind: str, variant: str, ports: GatewayPorts, timeouts: str | None = None,
                name: str | None = None) -> Front:
    port = free_port()
    if kind == "nginx":
        name = name or "nginx"
        logdir = env.tmp / name / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        conf = render_nginx(variant, ports, logdir, port, env.certs, timeouts=timeouts)
        return Front(kind, Nginx(env, conf, port, name=name), env.certs["ca"], port)
    name = name or "haproxy"
    clear = free_port()
    pem = haproxy_pem(env.certs, env.tmp / f"{name}.pem")
    cfg = render_haproxy(variant, ports, port, clear, env.certs, pem, timeouts=timeouts)
    return Front(kind, HAProxy(env, cfg, port, clear, name=name), env.certs["ca"], port, clear)


def start_agent(env, name: str, url: str, ups, extra: list[str] | None = None):
    http_up, grpc_up = ups
    tok = env.token_file(name)
    args = ["--upstream", http_up.url, "--grpc-upstream", grpc_up.url] + FAST_BACKOFF + (extra or [])
    return env.agent(url, tok, extra=args, name=f"agent-{name}")


def api_headers(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


def echo_through(front: Front, agent: str, api_token: str, timeout: float = 15.0) -> dict:
    status, _, body = https_get(front.port, f"/agents/{agent}/proxy/echo?from=proxy", front.ca,
                                api_headers(api_token), timeout=timeout)
    assert status == 200, (status, body[:500])
    return json.loads(body)


def grpc_through(front: Front, agent: str | None, api_token: str, clear: bool = False) -> str:
    md = [("authorization", f"Bearer {api_token}")]
    if agent:
        md.append(("agentgate-agent", agent))
    if clear:
        return grpc_health_check(f"127.0.0.1:{front.clear_port}", UPSTREAM_HEALTH_SERVICE, md, None)
    return grpc_health_check(f"localhost:{front.port}", UPSTREAM_HEALTH_SERVICE, md, front.ca)


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("variant", ["tls", "cleartext"])
@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_agents_and_tunnels_through_proxy(env, upstreams, kind, variant):
    g, ports = start_gateway(env, variant)
    front = start_proxy(env, kind, variant, ports)
    api = env.token("user", kind="api")

    if variant == "tls":
        # Many tunnels on one agent connection: more concurrent streams than nginx (128) or
        # HAProxy (100) allow by default; the shipped configs raise the limit (512).
        start_agent(env, "a-many", front.url("grpcs"), upstreams, ["--pool-min-idle", "200"])
        wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 200, timeout=20,
                 what="200 parked tunnels of one agent through the proxy")

    # What the gateway sees is the proxy's hop: grpcs/wss with TLS upstream, grpc/ws without.
    label = {"grpcs": "grpcs", "wss": "wss"} if variant == "tls" else {"grpcs": "grpc", "wss": "ws"}
    start_agent(env, "a-grpcs", front.url("grpcs"), upstreams)
    start_agent(env, "a-wss", front.url("wss"), upstreams, ["--transport", "websocket"])
    # auto with a wss URL: the direct-gRPC probe works through this proxy, so it moves to gRPC.
    auto = start_agent(env, "a-auto", front.url("wss"), upstreams)
    agents = {"a-grpcs": label["grpcs"], "a-wss": label["wss"], "a-auto": label["grpcs"]}
    if kind == "haproxy":
        # The cleartext bind takes h2c (grpc://) and HTTP/1.1 upgrades (ws://) on one port.
        start_agent(env, "a-grpc", front.url("grpc"), upstreams)
        start_agent(env, "a-ws", front.url("ws"), upstreams, ["--transport", "websocket"])
        agents.update({"a-grpc": label["grpcs"], "a-ws": label["wss"]})
    for name, transport in agents.items():
        g.wait_agent(name, transport=transport)

    for name in agents:
        echo = echo_through(front, name, api)
        assert echo["path"] == "/echo?from=proxy"
        assert echo["headers"].get("x-forwarded-proto") == "https", echo["headers"]
        assert "authorization" not in echo["headers"]
        # gRPC with agentgate-agent metadata goes to the tunnel API, then to the agent's upstream.
        assert grpc_through(front, name, api) == "SERVING"
    # Without agentgate-agent the same call is the gateway's own health service, which does not
    # know the upstream's service name: that is what proves the metadata does the routing.
    with pytest.raises(grpc.RpcError) as e:
        grpc_through(front, None, api)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value
    if kind == "haproxy":
        assert grpc_through(front, "a-grpc", api, clear=True) == "SERVING"

    # One access-log line per RPC for gRPC agents. A Tunnel/Connect stream carries requests one
    # after another (protocol version 2), so the proxy logs it when it ends: stopping an agent
    # ends its streams and its session.
    auto.stop()
    wait_for(lambda: "/agentgate.v1.Tunnel/Connect" in front.access_log(), timeout=20,
             what="Tunnel/Connect in the proxy's access log")
    assert re.search(r"POST /agentgate\.v1\.Tunnel/Connect HTTP/2\.0", front.access_log())

    if variant == "tls":
        # Large streaming downloads through agents that are connected via the proxy, fetched
        # through the proxy as well: 256 MiB over the grpcs agent, 64 MiB over the wss one.
        for name, mib in (("a-grpcs", 256), ("a-wss", 64)):
            status, n, digest, secs = https_download(
                front.port, f"/agents/{name}/proxy/big/{mib}", env.certs["ca"], api_headers(api),
                timeout=120)
            print(f"{kind}: {mib} MiB via {name} in {secs:.1f}s ({mib / secs:.0f} MiB/s)")
            assert status == 200
            assert n == mib * MiB
            assert digest == expected_digest(mib)


def tunnel_connects_finished(g) -> float:
    """Tunnel/Connect RPCs the gateway has seen end, whatever their status."""
    total = 0.0
    for m in re.finditer(r'^agentgate_rpcs_total\{([^}]*)\} (\S+)$', g.metrics_text(), re.M):
        if 'method="/agentgate.v1.Tunnel/Connect"' in m.group(1):
            total += float(m.group(2))
    return total


def direct_echo(env, g, agent: str, api: str, timeout: float = 10.0):
    """A request straight to the gateway's (TLS) API: measures the tunnel, not the proxy."""
    t0 = time.monotonic()
    status, _, body = https_get(g.api_port, f"/agents/{agent}/proxy/echo", env.certs["ca"],
                                api_headers(api), timeout=timeout)
    return status, body, time.monotonic() - t0


def conn_ids(g) -> dict:
    return {a["name"]: a["connection_id"] for a in g.agents()}


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_idle_agents_survive_short_proxy_timeouts(env, upstreams, kind):
    """Proxy stream-idle timeouts lowered to 3 s (a test-only override on the shipped config);
    the gateway heartbeats every 1 s. Agents stay on the same connection and their parked
    tunnels stay usable through 10 s of idleness. A control stack, identical except for a
    heartbeat slower than the timeout, shows that the lowered timeouts do cut idle streams."""
    timeout_s, idle_s = 3, 10
    g, ports = start_gateway(env, "tls", ["--set", 'stream_heartbeat_interval="1s"'])
    gc, ports_c = start_gateway(env, "tls", ["--set", 'stream_heartbeat_interval="60s"'],
                                name="gateway-control")
    front = start_proxy(env, kind, "tls", ports, timeouts=f"{timeout_s}s")
    front_c = start_proxy(env, kind, "tls", ports_c, timeouts=f"{timeout_s}s", name=f"{kind}-control")
    api = env.token("user", kind="api")
    stacks = {"i": (g, front), "c": (gc, front_c)}
    procs = {}
    for s, (_, f) in stacks.items():
        procs[f"{s}-grpcs"] = start_agent(env, f"{s}-grpcs", f.url("grpcs"), upstreams)
        procs[f"{s}-wss"] = start_agent(env, f"{s}-wss", f.url("wss"), upstreams,
                                        ["--transport", "websocket"])
    for s, (gw, _) in stacks.items():
        gw.wait_agent(f"{s}-grpcs", "grpcs")
        gw.wait_agent(f"{s}-wss", "wss")
        for t in ("grpcs", "wss"):  # warm up: the pool replaces the used tunnel
            status, body, _ = direct_echo(env, gw, f"{s}-{t}", api)
            assert status == 200, body
    # Settle: the replacement tunnels are parked and the used ones have ended.
    wait_for(lambda: g.metric("agentgate_tunnels_parked") >= 4, timeout=5, what="tunnels parked")
    time.sleep(0.5)
    before_ids = conn_ids(g)
    before_ended = tunnel_connects_finished(g)
    before_log = front.access_log().count("/agentgate.v1.")

    time.sleep(idle_s)

    # Nothing ended on the heartbeat stack: same sessions, no tunnel stream closed or replaced.
    assert conn_ids(g) == before_ids, (before_ids, g.agents())
    assert tunnel_connects_finished(g) == before_ended
    assert front.access_log().count("/agentgate.v1.") == before_log, front.access_log()[-2000:]
    for t in ("grpcs", "wss"):
        status, body, secs = direct_echo(env, g, f"i-{t}", api)
        assert status == 200, body
        assert secs < 1.0, f"request through i-{t} after idling took {secs:.2f}s"
        out = procs[f"i-{t}"].output()
        # connection_id is the proxy's connection to the gateway (HAProxy multiplexes agents
        # onto shared ones), so also ask the agent: one registration, never disconnected.
        assert out.count("connected and registered") == 1 and "disconnected" not in out, out[-2000:]
    assert conn_ids(g) == before_ids

    # Control: with heartbeats slower than the proxy timeout, the same idleness cut the streams.
    for t in ("grpcs", "wss"):
        out = procs[f"c-{t}"].output()
        assert "disconnected" in out and out.count("connected and registered") >= 2, out[-2000:]


@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_agents_come_back_after_proxy_restart(env, upstreams, kind):
    bound = 20.0
    g, ports = start_gateway(env, "tls")
    front = start_proxy(env, kind, "tls", ports)
    api = env.token("user", kind="api")
    start_agent(env, "r-grpcs", front.url("grpcs"), upstreams)
    start_agent(env, "r-wss", front.url("wss"), upstreams, ["--transport", "websocket"])
    g.wait_agent("r-grpcs", "grpcs")
    g.wait_agent("r-wss", "wss")
    for name in ("r-grpcs", "r-wss"):
        echo_through(front, name, api)
    before = conn_ids(g)

    front.proc.stop()
    # The gateway sees the proxy's connections go, so the sessions end.
    wait_for(lambda: not g.agents(), timeout=10, what="sessions ended with the proxy")
    time.sleep(2)  # agents retry against a closed port meanwhile (backoff 500ms..2s)
    t0 = time.monotonic()
    front.proc.start()

    def back(name):
        def ok():
            a = {x["name"]: x for x in g.agents()}.get(name)
            if not a or a["connection_id"] == before[name]:
                return False
            echo_through(front, name, api, timeout=5)
            return True
        return ok
    for name in ("r-grpcs", "r-wss"):
        wait_for(back(name), timeout=bound, interval=0.2, what=f"{name} back after the restart")
    elapsed = time.monotonic() - t0
    print(f"{kind}: agents back and serving {elapsed:.1f}s after the restart")
    assert elapsed < bound
    assert {a["name"]: a["transport"] for a in g.agents()} == {"r-grpcs": "grpcs", "r-wss": "wss"}



@pytest.mark.parametrize("kind", ["nginx", "haproxy"])
def test_agents_follow_proxy_reload(env, upstreams, kind):
    """A configuration reload (nginx: SIGHUP; HAProxy master-worker: SIGUSR2), the way operators
    apply config changes. The old nginx worker / HAProxy process sends GOAWAY on the agents'
    HTTP/2 connections and keeps them only until their streams end; no new stream may start on
    them. An agent must notice and move to a fresh connection (through the new worker) by
    itself, so requests keep working within the same bound as after a restart."""
    bound = 15.0
    g, ports = start_gateway(env, "tls", ["--set", 'tunnel_wait="2s"'])
    front = start_proxy(env, kind, "tls", ports)
    api = env.token("user", kind="api")
    agent = start_agent(env, "l-grpcs", front.url("grpcs"), upstreams)
    start_agent(env, "l-wss", front.url("wss"), upstreams, ["--transport", "websocket"])
    g.wait_agent("l-grpcs", "grpcs")
    g.wait_agent("l-wss", "wss")
    for name in ("l-grpcs", "l-wss"):
        echo_through(front, name, api)
    before = conn_ids(g)

    front.proc.reload()
    t0 = time.monotonic()
    statuses = []
    while time.monotonic() - t0 < bound:
        status, _, _ = https_get(front.port, "/agents/l-grpcs/proxy/echo", front.ca,
                                 api_headers(api), timeout=10)
        statuses.append(status)
        # Moved: registered again (connection_id alone is the proxy's connection to the gateway).
        if status == 200 and agent.output().count("connected and registered") >= 2:
            break
        time.sleep(0.5)
    else:
        lines = [ln for ln in agent.output().splitlines() if "WARN" in ln or "connect" in ln]
        raise AssertionError(
            f"{bound}s after the {kind} reload the grpcs agent has not registered again "
            f"(gateway connection {conn_ids(g).get('l-grpcs')}, before: {before['l-grpcs']}); "
            f"request statuses since "
            f"the reload: {statuses}; agent log:\n" + "\n".join(lines[-8:]))
    # The WebSocket agent is untouched by the reload (its upgraded connection stays on the
    # old worker until it ends) and keeps serving.
    echo_through(front, "l-wss", api)



def test_agents_behind_haproxy_move_once_per_connection_age_not_in_a_loop(env, upstreams):
    """HAProxy carries many agents' calls on a few connections to the gateway. When one reached
    its drain point (`max_connection_age`), its agents were told to move, and HAProxy put their
    new Register back on that same connection (nothing had told it to stop using it), where
    they were told to move again: 256 registrations a second. The drain now also sends the
    connection a GOAWAY, and a session that begins on a connection already draining is not
    told to move at once."""
    g, ports = start_gateway(env, "tls", ["--set", 'max_connection_age="8s"',
                                          "--set", 'max_connection_age_grace="30s"'])
    front = start_proxy(env, "haproxy", "tls", ports)
    api = env.token("user", kind="api")
    agents = {f"age-{i}": start_agent(env, f"age-{i}", front.url("grpcs"), upstreams) for i in range(3)}
    for name in agents:
        g.wait_agent(name, "grpcs")
    time.sleep(20)  # two and a half connection ages
    counts = {name: a.output().count("connected and registered") for name, a in agents.items()}
    print(f"\nregistrations in 20 s of 8 s connection ages: {counts}")
    assert max(counts.values()) <= 12, counts
    for name in agents:
        echo_through(front, name, api)


def test_agents_behind_a_proxy_whose_gateway_is_down_are_told_so(env, upstreams):
    """nginx answers 502 when the gateway behind it is down. A gRPC agent logged tonic's
    decoding of nginx's HTML page ("invalid compression flag: 60 ... status: 502 Bad Gateway
    (INTERNAL)"), and an agent in auto mode took the 502 for a path without HTTP/2 and fell
    back to WebSocket. Now each says the proxy answered HTTP 502 and could not reach the
    gateway, and the auto agent does not fall back."""
    g, ports = start_gateway(env, "tls")
    front = start_proxy(env, "nginx", "tls", ports)
    g.proc.stop()

    def reason(agent):
        return wait_for(lambda: next((x for x in agent.output().splitlines() if "cannot connect" in x), None),
                        timeout=20, what="the agent's reason")
    for name, url in (("orphan-grpcs", front.url("grpcs")), ("orphan-auto", front.url("wss"))):
        agent = start_agent(env, name, url, upstreams)
        line = reason(agent)
        assert "answered HTTP 502 instead of taking the gRPC call" in line, line
        assert "could not reach the gateway" in line and "compression flag" not in line, line
        assert "falling back" not in agent.output(), agent.output()[-2000:]


@pytest.mark.parametrize("version", [1, 2])
def test_agent_survives_nginx_keepalive_requests_goaway(env, upstreams, version):
    """nginx sends GOAWAY after `keepalive_requests` streams on one client connection (default
    1000). The shipped config raises it, but it is still finite: lowered here to 20 (a test-only
    override). A version-1 agent uses a stream per request, so 40 requests one after another
    cross the limit; a version-2 agent reuses its streams, so only bursts of 25 concurrent
    requests that grow its pool of 15 do, and it learns of the GOAWAY from the frame itself. Every request must succeed, the agent moving to a fresh
    connection when told to go away."""
    g, ports = start_gateway(env, "tls")
    port = free_port()
    logdir = env.tmp / "nginx" / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    conf = render_nginx("tls", ports, logdir, port, env.certs)
    conf = re.sub(r"^(\s*)keepalive_requests\s+\d+;", r"\1keepalive_requests 20;", conf, flags=re.M)
    Nginx(env, conf, port)
    api = env.token("user", kind="api")
    # Version 2: 15 idle streams plus the session stay under the limit until a burst grows
    # the pool past it.
    extra = ["--tunnel-protocol", str(version)] + (["--pool-min-idle", "15"] if version == 2 else [])
    agent = start_agent(env, "k-grpcs", f"grpcs://localhost:{port}", upstreams, extra)
    g.wait_agent("k-grpcs", "grpcs")

    def one(i):
        status, _, body = https_get(g.api_port, "/agents/k-grpcs/proxy/echo", env.certs["ca"],
                                    api_headers(api), timeout=30)
        assert status == 200, (
            f"request {i + 1}: {status} {body[:200]!r}; registrations so far: "
            f"{agent.output().count('connected and registered')}; agent log:\n"
            + "\n".join(agent.output().splitlines()[-6:]))

    if version == 1:
        for i in range(40):
            one(i)
    else:
        from concurrent.futures import ThreadPoolExecutor
        for burst in range(3):
            with ThreadPoolExecutor(25) as pool:
                list(pool.map(one, range(burst * 25, burst * 25 + 25)))
    assert agent.output().count("connected and registered") >= 2


def test_http11_only_balancer_keeps_agents_on_wss(env, upstreams):
    """A TLS-terminating balancer that speaks only HTTP/1.1 (stand-in: an nginx server without
    http2, carrying the shipped WebSocket location): wss agents work; an agent in `auto` mode
    finds that direct gRPC fails there and falls back to wss."""
    g, ports = start_gateway(env, "cleartext")
    port, h1port = free_port(), free_port()
    logdir = env.tmp / "nginx" / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    rendered = render_nginx("cleartext", ports, logdir, port, env.certs)
    extra = f"""
    # test-only: an HTTP/1.1-only TLS-terminating balancer (no http2 on this listener, so ALPN
    # offers http/1.1 alone) carrying the shipped WebSocket location.
    server {{
        listen 127.0.0.1:{h1port} ssl;
        ssl_certificate     {env.certs['cert']};
        ssl_certificate_key {env.certs['key']};
        access_log {logdir}/h1-access.log agentgate;
{nginx_location(rendered, '/-/agent/')}
    }}
"""
    nginx = Nginx(env, rendered, port, extra=extra)
    front = Front("nginx", nginx, env.certs["ca"], port)
    api = env.token("user", kind="api")
    h1_url = f"wss://localhost:{h1port}/-/agent/"
    ws = start_agent(env, "h1-ws", h1_url, upstreams, ["--transport", "websocket"])
    auto = start_agent(env, "h1-auto", h1_url, upstreams)
    g.wait_agent("h1-ws", "ws")
    g.wait_agent("h1-auto", "ws")
    assert "direct gRPC probe failed" in auto.output(), auto.output()[-2000:]
    for name in ("h1-ws", "h1-auto"):
        echo = echo_through(front, name, api)
        assert echo["path"] == "/echo?from=proxy"
    assert {a["name"]: a["transport"] for a in g.agents()} == {"h1-ws": "ws", "h1-auto": "ws"}
    # Both WebSockets went through the HTTP/1.1-only server (nginx logs one when it ends).
    ws.stop()
    auto.stop()
    wait_for(lambda: (logdir / "h1-access.log").read_text().count('"GET /-/agent/ HTTP/1.1" 101') >= 2,
             timeout=5, what="both WebSockets in the HTTP/1.1-only server's access log")


def _directives(text: str, names: tuple) -> dict:
    out = {}
    for m in re.finditer(r"^\s*(" + "|".join(re.escape(n) for n in names) + r")\s+([^;#\n]+)", text, re.M):
        out.setdefault(m.group(1), set()).add(m.group(2).strip())
    return out


def test_shipped_variants_agree_on_limits_and_timeouts():
    """The cleartext and TLS-upstream variants must not drift apart on what keeps agents alive."""
    from proxies import DEPLOY
    nginx_names = ("grpc_read_timeout", "grpc_send_timeout", "client_body_timeout", "send_timeout",
                   "proxy_read_timeout", "proxy_send_timeout", "keepalive_timeout", "keepalive_requests",
                   "client_max_body_size", "http2_max_concurrent_streams", "proxy_buffering",
                   "proxy_request_buffering", "client_body_buffer_size", "grpc_buffer_size", "location")
    a = _directives((DEPLOY / "nginx/agentgate.conf").read_text(), nginx_names)
    b = _directives((DEPLOY / "nginx/agentgate-tls-upstream.conf").read_text(), nginx_names)
    assert a == b
    assert set(nginx_names) <= set(a), set(nginx_names) - set(a)
    hap_names = ("timeout", "maxconn", "tune.h2.max-concurrent-streams", "tune.h2.initial-window-size",
                 "use_backend", "acl", "bind")
    a = _directives((DEPLOY / "haproxy/agentgate.cfg").read_text(), hap_names)
    b = _directives((DEPLOY / "haproxy/agentgate-tls-upstream.cfg").read_text(), hap_names)
    assert a == b
    assert all(int(v) < 9000 for v in a["maxconn"]), a["maxconn"]
