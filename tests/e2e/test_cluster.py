"""Cluster mode: several gateway replicas behind one load balancer, sharing a Redis registry.

Setup (one cluster for the module, built once; the destructive tests run last: kill -9 of a
replica, then Redis stopped and started with the two survivors):
- a real redis-server from Debian on a random port, no persistence (`--save '' --appendonly no`),
  so a restarted Redis is empty and the replicas must rebuild the registry;
- three replicas (`agentgate server --redis ... --internal-listen/--internal-url
  --internal-secret-file`), one shared token store, the production defaults for the registry
  (ttl 5 min, refresh 4 min), so that nothing here passes only thanks to a fast refresh;
- HAProxy in front as the agents' load balancer: the SHIPPED deploy/haproxy/agentgate.cfg
  (rendered by proxies.render_haproxy: ports, paths and certificates substituted) with every
  `server` line repeated for the other two replicas; HAProxy's default `balance roundrobin`;
- 30 agents, each its own process and token, each with its own upstream path prefix on one
  Python HTTP server (so the echoed path proves which agent answered).

Transport choice: the agents connect with `wss://haproxy/-/agent/ --transport websocket`. In the
shipped config that is the route (backend agentgate_ws) where HAProxy balances *connections*:
after the upgrade the agent's whole HTTP/2 connection (session and tunnels) is a byte tunnel
to one replica. The shipped grpcs route (backend agentgate_grpc, HTTP/2 terminated at HAProxy)
balances every HTTP/2 *stream* on its own, so an agent's Register stream and its Tunnel/Connect
streams land on different replicas; test_grpcs_agents_through_shipped_h2_route checks that
route separately.

Users' requests go straight to each replica's tunnel API (not through HAProxy), so that the
test chooses which replica serves each request.
"""

from __future__ import annotations

import json
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ingress_clients as ic
from conftest import Env, keep_logs, wait_for
from test_tunnel import api_request
from cluster_helpers import (
    MiB, AgentUpstream, ApiClient, LoadThreads, Redis, Replica, cluster_agents, echo_ok,
    expected_sha256,
    internal_call, sign_call, start_haproxy_cluster, write_secret,
)

N_AGENTS = 30
N_REPLICAS = 3
AGENT_FLAGS = ["--pool-min-idle", "1", "--backoff-initial", "500ms", "--backoff-max", "2s"]
# The registry timing the replicas run with: the production defaults, spelled out.
REGISTRY_TTL_S = 300
REGISTRY_REFRESH_S = 240
REPLICA_FLAGS = ["--set", f'registry_ttl="{REGISTRY_TTL_S}s"',
                 "--set", f'registry_refresh_interval="{REGISTRY_REFRESH_S}s"']


class Cluster:
    def __init__(self, env: Env, upstream: AgentUpstream):
        self.env = env
        self.upstream = upstream
        self.names = [f"agent{i:02d}" for i in range(N_AGENTS)]
        # All tokens exist before the replicas open the shared token store.
        self.token_files = {n: env.token_file(n) for n in self.names}
        self.api_token = env.token("e2e-user", kind="api")
        self.redis = Redis(env)
        self.secret_file, self.secret = write_secret(env)
        self.replicas = [Replica(env, i + 1, self.redis, self.secret_file, REPLICA_FLAGS)
                         for i in range(N_REPLICAS)]
        self.haproxy = start_haproxy_cluster(env, self.replicas)
        self.agent_url = f"wss://localhost:{self.haproxy.port}/-/agent/"
        self.agents = {}
        for n in self.names:
            self.agents[n] = env.agent(
                self.agent_url, self.token_files[n],
                extra=["--upstream", upstream.url_for(n), "--transport", "websocket"] + AGENT_FLAGS,
                name=f"agent-{n}")
        self.client = ApiClient(self.api_token)
        wait_for(lambda: len(self.placement()) == N_AGENTS, timeout=60, interval=0.3,
                 what=f"all {N_AGENTS} agents connected to some replica")

    @property
    def alive_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.proc.alive()]

    def by_url(self, url: str) -> Replica:
        return next(r for r in self.replicas if r.internal_url == url)

    def placement(self) -> dict[str, Replica]:
        """agent name -> the (live) replica it is connected to, from each /api/v1/agents."""
        out = {}
        for r in self.alive_replicas:
            for a in r.agents():
                assert a["name"] not in out, f"{a['name']} listed on two replicas"
                out[a["name"]] = r
        return out

    def request(self, replica: Replica, agent: str, tag: str):
        """One tunnelled request; returns (ok, description)."""
        try:
            status, body = self.client.echo(replica.api_port, agent, tag)
        except Exception as e:  # noqa: BLE001 - any failure counts
            return False, f"{agent} via {replica.name}: {type(e).__name__}: {e}"
        return echo_ok(status, body, agent, tag), f"{agent} via {replica.name}: {status} {body[:200]!r}"


@pytest.fixture(scope="module")
def cluster():
    with tempfile.TemporaryDirectory(prefix="agentgate-e2e-cluster-") as d:
        env = Env(Path(d))
        upstream = AgentUpstream()
        try:
            yield Cluster(env, upstream)
        finally:
            env.close()
            upstream.close()
            keep_logs(d, "cluster")


class RequestLoop(LoadThreads):
    """Tunnelled requests over (replica, agent) pairs until stopped."""

    def __init__(self, cluster: Cluster, pairs: list[tuple[Replica, str]], threads: int = 4):
        self.cluster = cluster
        self.pairs = pairs
        super().__init__(threads)

    def one(self, i: int) -> tuple[bool, str]:
        replica, agent = self.pairs[i % len(self.pairs)]
        return self.cluster.request(replica, agent, f"loop{i}")


def all_pairs_ok(cluster: Cluster, pairs, tag: str) -> list[str]:
    """Sends one request per (replica, agent) pair concurrently; returns the failures."""
    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(lambda p: cluster.request(p[0], p[1], tag), pairs))
    return [what for ok, what in results if not ok]


# ------------------------------------------------------------------------------------ tests


def test_agents_spread_over_replicas_and_every_replica_reaches_every_agent(cluster):
    """30 agents spread over three replicas by HAProxy; every replica's API reaches every agent
    (90 combinations, each answered by that agent's upstream); 256 MiB streamed across replicas."""
    place = cluster.placement()
    per_replica = {r.name: sorted(n for n, p in place.items() if p is r) for r in cluster.replicas}
    print("agents per replica:", {k: len(v) for k, v in per_replica.items()})
    for r in cluster.replicas:
        assert per_replica[r.name], f"HAProxy gave {r.name} no agent: {per_replica}"

    # The registry says where each agent is: one field, the replica's internal URL.
    for n, r in place.items():
        fields = cluster.redis.hgetall(f"agentgate:agent:{n}")
        assert list(fields) == [r.internal_url], (n, fields, r.internal_url)
    assert sorted(cluster.redis.hgetall("agentgate:replicas")) == sorted(
        r.internal_url for r in cluster.replicas)

    forwards_before = {r.name: r.forwards("ok") for r in cluster.replicas}
    pairs = [(r, n) for r in cluster.replicas for n in cluster.names]
    assert len(pairs) == 90
    failures = all_pairs_ok(cluster, pairs, "matrix")
    assert not failures, "\n".join(failures)
    # Each replica forwarded exactly the requests for agents held elsewhere.
    for r in cluster.replicas:
        remote = N_AGENTS - len(per_replica[r.name])
        assert r.forwards("ok") - forwards_before[r.name] == remote, r.name

    # One large streaming transfer across replicas, verified by byte count and digest.
    agent = per_replica["replica1"][0]
    mib = 256
    status, n, digest, secs = cluster.client.download(cluster.replicas[1].api_port, agent, mib)
    print(f"{mib} MiB from {agent} (replica1) via replica2: {secs:.1f}s ({mib / secs:.0f} MiB/s)")
    assert status == 200
    assert n == mib * MiB
    assert digest == expected_sha256(mib)


def test_an_error_at_the_agents_replica_reaches_the_caller_whole(cluster):
    """An error made on the replica that holds the agent (an upstream name the agent does not
    have) crosses to the replica the caller asked, with its status and its whole sentence."""
    place = cluster.placement()
    agent, home = next(iter(place.items()))
    other = next(r for r in cluster.replicas if r is not home)
    before = other.forwards("peer_error")
    status, body = cluster.client.get(other.api_port, f"/agents/{agent}/upstreams/nope/x")
    text = body.decode()
    assert status == 404, (status, text)
    assert f'agent "{agent}"' in text and 'no HTTP upstream named "nope"' in text, text
    assert "(it has: default)" in text, text
    assert other.forwards("peer_error") == before + 1, "the error came from the other replica"


def test_cluster_scope_lists_every_agent_with_its_replica(cluster):
    """/api/v1/agents?scope=cluster on any replica lists all 30 agents, each with its replica."""
    place = cluster.placement()
    for r in cluster.replicas:
        listed = cluster_agents(r.admin)
        names = sorted(a["name"] for a in listed)
        assert names == sorted(cluster.names), (r.name, names)
        for a in listed:
            assert a["replica"] == place[a["name"]].internal_url, (r.name, a)
    # Without scope=cluster a replica lists only its own agents.
    own = {a["name"] for a in cluster.replicas[0].agents()}
    assert own == {n for n, p in place.items() if p is cluster.replicas[0]}


def test_internal_api_requires_a_signed_token(cluster):
    """Internal API calls without a token, or with one that is garbage, signed with another
    secret, expired, for another replica, for another method or path, or used a second time,
    get 401 and are counted by reason; tokens minted here with PyJWT from the documented
    claims list agents and reserve and release a tunnel."""
    r = cluster.replicas[0]
    agent = next(n for n, p in cluster.placement().items() if p is r)
    reserve = f"/internal/v1/agents/{agent}/reserve?wait_ms=2000"
    listing = "/internal/v1/agents"
    before = r.metric_total("agentgate_internal_rejected_total")
    now = int(time.time())
    aud = r.internal_url

    def good(method, path, **kw):
        return sign_call(cluster.secret, aud, method, path, agent=agent if "reserve" in path else "", **kw)

    replayed = {listing: good("GET", listing), reserve: good("POST", reserve)}
    for method, path in (("GET", listing), ("POST", reserve)):
        status, body = internal_call(r.internal_port, method, path, replayed[path])
        assert status == 200, (path, status, body)
        if path == reserve:
            internal_call(r.internal_port, "POST", f"/internal/v1/reservations/{int(body)}/release",
                          good("POST", f"/internal/v1/reservations/{int(body)}/release"))
    bad = {
        "no token": lambda m, p: None,
        "garbage": lambda m, p: "not-a-jwt",
        "wrong secret": lambda m, p: sign_call(b"a-different-secret-of-32-bytes!!", aud, m, p),
        "expired": lambda m, p: good(m, p, iat=now - 120, exp=now - 60),
        "other replica": lambda m, p: sign_call(cluster.secret, "http://127.0.0.1:1", m, p),
        "other path": lambda m, p: good(m, "/internal/v1/agents/someone-else/reserve?wait_ms=1"),
        "other method": lambda m, p: good("PUT", p),
        "replayed": lambda m, p: replayed[p],
    }
    reasons = {}
    for what, token in bad.items():
        for method, path in (("POST", reserve), ("GET", listing)):
            status, body = internal_call(r.internal_port, method, path, token(method, path))
            assert status == 401, (what, path, status, body)
            reasons[what] = body.decode().strip()
    assert r.metric_total("agentgate_internal_rejected_total") - before == 2 * len(bad)
    assert "replayed" in reasons["replayed"] and "another replica" in reasons["other replica"], reasons
    assert r.metric("agentgate_internal_rejected_total", reason="replayed") >= 2
    assert r.metric("agentgate_internal_rejected_total", reason="wrong_route") >= 4
    assert "internal API call refused" in r.proc.output()
    # The agent still works after the reservation was released.
    ok, what = cluster.request(r, agent, "after-release")
    assert ok, what
    # Anyone who reaches the port can cause a refusal line: they share the budget of lines a
    # client without credentials may cause (20,000 lines in 0.28 s before).
    import subprocess

    lines_before = r.proc.output().count("internal API call refused")
    t0 = time.monotonic()
    subprocess.run(["h2load", "-n", "3000", "-c", "10", "-m", "10", f"http://127.0.0.1:{r.internal_port}{listing}"],
                   capture_output=True, timeout=60, check=True)
    took = time.monotonic() - t0
    time.sleep(1.2)
    lines = r.proc.output().count("internal API call refused") - lines_before
    assert r.metric("agentgate_internal_rejected_total", reason="missing") >= 3000
    assert lines <= 20 * (took + 3), f"{lines} lines for 3,000 refused calls in {took:.1f}s"


def test_redis_writes_stay_flat_while_tunnels_churn(cluster):
    """2000 tunnelled requests (each consumes a tunnel, the agent opens a replacement) must not
    write to Redis per tunnel or per request: HSET calls (INFO commandstats) stay within what
    the periodic refresh writes (one per agent per refresh interval) plus one per agent."""
    n_requests = 2000
    pairs = [(r, n) for r in cluster.replicas for n in cluster.names]
    stats0 = cluster.redis.commandstats()
    writes0 = sum(r.metric("agentgate_registry_writes_total") for r in cluster.replicas)
    parked0 = sum(r.metric_sum("agentgate_tunnel_requests_total", outcome="ok") for r in cluster.replicas)
    t0 = time.monotonic()
    with ThreadPoolExecutor(12) as ex:
        results = list(ex.map(lambda i: cluster.request(pairs[i % len(pairs)][0],
                                                        pairs[i % len(pairs)][1], f"churn{i}"),
                              range(n_requests)))
    elapsed = time.monotonic() - t0
    failures = [what for ok, what in results if not ok]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])
    stats1 = cluster.redis.commandstats()
    writes1 = sum(r.metric("agentgate_registry_writes_total") for r in cluster.replicas)
    served = sum(r.metric_sum("agentgate_tunnel_requests_total", outcome="ok")
                 for r in cluster.replicas) - parked0
    hset = stats1.get("hset", 0) - stats0.get("hset", 0)
    writes = {c: stats1.get(c, 0) - stats0.get(c, 0)
              for c in ("hset", "hdel", "pexpire", "expire", "incr") if stats1.get(c, 0) != stats0.get(c, 0)}
    minutes = elapsed / 60
    print(f"{n_requests} requests ({served:.0f} tunnels used) in {elapsed:.1f}s: "
          f"Redis writes {writes}, registry writes {writes1 - writes0:.0f}, "
          f"HSET per agent per minute {hset / N_AGENTS / max(minutes, 1e-9):.2f}")
    assert served >= n_requests  # every request consumed a tunnel (churn really happened)
    # Only the periodic refresh may write (one HSET per agent and per replica each refresh
    # interval), plus one write per agent as slack: nothing that grows with the request count.
    bound = (N_AGENTS + N_REPLICAS) * (int(elapsed // REGISTRY_REFRESH_S) + 1) + N_AGENTS
    assert hset <= bound, f"{hset} HSET for {n_requests} requests (bound {bound})"
    assert writes1 - writes0 <= bound


def test_cross_replica_latency(cluster):
    """Prints median latency via the agent's own replica vs via another replica."""
    place = cluster.placement()
    own = cluster.replicas[0]
    other = cluster.replicas[1]
    agent = next(n for n, p in place.items() if p is own)
    results = {}
    for label, r in (("own replica", own), ("other replica", other)):
        for i in range(10):  # warm up the keep-alive and internal connections
            assert cluster.request(r, agent, f"warm{i}")[0]
        lat = []
        for i in range(200):
            t0 = time.perf_counter()
            ok, what = cluster.request(r, agent, f"lat{i}")
            lat.append(time.perf_counter() - t0)
            assert ok, what
        lat.sort()
        results[label] = (statistics.median(lat) * 1000, lat[int(len(lat) * 0.9)] * 1000)
    added = results["other replica"][0] - results["own replica"][0]
    print("LATENCY " + ", ".join(f"{k}: median {m:.2f} ms p90 {p:.2f} ms" for k, (m, p) in results.items())
          + f"; cross-replica adds {added:.2f} ms (median)")


def test_callers_that_stop_reading_do_not_hold_up_a_replicas_other_requests(cluster):
    """One connection from a replica to a peer carries every request it relays there. Callers
    at replica 2 that stop reading large answers from agents at replica 1 filled that
    connection's window (4 MiB, 2 MiB a stream), and every other request from replica 2 to
    replica 1's agents waited. Now each stalled answer holds only its own stream's window."""
    place = cluster.placement()
    own, other = cluster.replicas[0], cluster.replicas[1]
    agents = [n for n, p in place.items() if p is own]
    assert agents, place
    stalled = []
    try:
        for i in range(6):
            stalled.append(ic.unread_get(other.api_port, f"/agents/{agents[0]}/proxy/big/64", cluster.api_token))
        time.sleep(2)  # the answers fill every window on the way that they may
        for i in range(6):
            t0 = time.monotonic()
            ok, what = cluster.request(other, agents[i % len(agents)], f"past-stalled{i}")
            assert ok, what
            assert time.monotonic() - t0 < 2, f"request {i} took {time.monotonic() - t0:.1f}s"
    finally:
        for s in stalled:
            s.close()


def test_many_bodiless_requests_through_another_replica_all_succeed(cluster):
    """h2load through one replica to an agent at another (the one-call route for requests
    without a body). The agent's replica answered before the sender's body-MAC trailer
    arrived and reset the stream; under concurrency its HTTP/2 server had forgotten the reset
    stream when the trailer came, took it for a protocol error and closed the connection
    between the replicas with every request on it: 1-10 % of requests failed with 502."""
    import shutil
    import subprocess

    if not shutil.which("h2load"):
        pytest.fail("h2load is missing: apt-get install nghttp2-client (.ci/run installs it)")
    place = cluster.placement()
    own, other = cluster.replicas[0], cluster.replicas[1]
    agent = next(n for n, p in place.items() if p is own)
    # A large download beside them on the same connection between the replicas, as in the
    # probe that found it: the trailers wait behind its data.
    download = subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-H", f"authorization: Bearer {cluster.api_token}",
                                 f"http://127.0.0.1:{other.api_port}/agents/{agent}/proxy/big/150"])
    try:
        out = subprocess.run(["h2load", "-c", "16", "-m", "4", "-D", "6",
                              "-H", f"authorization: Bearer {cluster.api_token}",
                              f"http://127.0.0.1:{other.api_port}/agents/{agent}/proxy/echo"],
                             capture_output=True, text=True, timeout=60).stdout
    finally:
        download.kill()
    codes = next(x for x in out.splitlines() if x.startswith("status codes:"))
    done = next(x for x in out.splitlines() if x.startswith("requests:"))
    print(f"\n{done}\n{codes}")
    assert int(done.split()[1]) > 100 and " 0 failed, 0 errored, 0 timeout" in done, (done, codes)
    assert " 0 3xx, 0 4xx, 0 5xx" in codes, (done, codes)


def test_kill_9_of_one_replica(cluster):
    """kill -9 of one replica: its agents reconnect through HAProxy (backoff 500 ms..2 s) and are
    served through both survivors within 10 s (issue 16's bound); requests to the other agents, through both
    survivors' APIs (local and forwarded), never fail meanwhile. The registry keeps the default
    TTL (5 min), so the dead replica's entries stay in Redis: survivors must skip it fast
    (connection refused) rather than wait for the TTL."""
    place = cluster.placement()
    victim = cluster.replicas[2]
    survivors = [r for r in cluster.replicas if r is not victim]
    moved = sorted(n for n, p in place.items() if p is victim)
    stayed = sorted(n for n, p in place.items() if p is not victim)
    assert moved and stayed
    bound = 10.0

    steady_pairs = [(r, n) for n in stayed for r in survivors]  # local and remote
    with RequestLoop(cluster, steady_pairs) as loop:
        time.sleep(0.5)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(timeout=5)
        t_kill = time.monotonic()
        pending = {(r, n) for n in moved for r in survivors}

        def moved_agents_served():
            for pair in list(pending):
                if cluster.request(pair[0], pair[1], "after-kill")[0]:
                    pending.discard(pair)
            return not pending

        try:
            wait_for(moved_agents_served, timeout=bound, interval=0.2,
                     what="the killed replica's agents to be served through the survivors")
        except AssertionError as e:
            raise AssertionError(f"{e}; still failing: {sorted((r.name, n) for r, n in pending)}")
        recovered = time.monotonic() - t_kill
        time.sleep(1)
    print(f"kill -9 {victim.name}: its {len(moved)} agents served via both survivors after "
          f"{recovered:.1f}s; {loop.ok} requests to the other agents meanwhile")
    assert not loop.failures, f"{len(loop.failures)} failures:\n" + "\n".join(loop.failures[:20])
    assert loop.ok > 20
    # Every agent is connected to a survivor, and every survivor reaches every agent.
    place = cluster.placement()
    assert sorted(place) == sorted(cluster.names)
    failures = all_pairs_ok(cluster, [(r, n) for r in survivors for n in cluster.names], "final")
    assert not failures, "\n".join(failures)


def test_a_flushed_registry_is_written_again_within_seconds(cluster):
    """FLUSHALL (or an eviction) empties the registry without breaking a connection: every
    cross-replica request got 503 "not connected" for up to 4 minutes (the next refresh), and
    nothing said why. Each replica now looks every 5 s whether Redis still lists it."""
    pairs = [(r, n) for n, p in cluster.placement().items() for r in cluster.alive_replicas if r is not p]
    assert not all_pairs_ok(cluster, pairs[:6], "before-flush")
    assert cluster.redis.cli("FLUSHALL") == "OK"
    t0 = time.monotonic()
    wait_for(lambda: not all_pairs_ok(cluster, pairs[:6], "after-flush"), timeout=20, interval=0.5,
             what="cross-replica requests served again after FLUSHALL")
    print(f"\nserved again {time.monotonic() - t0:.1f} s after FLUSHALL")
    assert any("no longer lists this replica" in r.proc.output() for r in cluster.alive_replicas)


def test_redis_stop_and_start(cluster):
    """Redis stopped (SIGTERM) for ~3 s and started again, empty, on the same port: local requests
    never fail; remote ones fail at once with 503 naming the registry while Redis is down, and
    work again within 20 s after it returns; the registry is rebuilt (HGETALL shows every agent
    at its replica again). Runs after the kill -9 test, so with the two surviving replicas, and
    with the default registry refresh interval (4 min): nothing but noticing Redis come back
    can rebuild the registry within the bound (with a refresh interval of 2 s it passes)."""
    place = cluster.placement()
    reps = cluster.alive_replicas
    local_pairs = [(p, n) for n, p in place.items()]
    # Remote: every agent via the next replica over.
    remote_pairs = [(reps[(reps.index(p) + 1) % len(reps)], n) for n, p in place.items()]
    assert not all_pairs_ok(cluster, remote_pairs, "before")
    errors0 = {r.name: r.metric("agentgate_redis_ops_total", op="lookup", outcome="error") for r in reps}

    with RequestLoop(cluster, local_pairs) as loop:
        time.sleep(0.5)
        cluster.redis.stop()
        t_down = time.monotonic()
        # Remote routing fails fast with a clear error while Redis is down.
        one_per_replica = {r.name: (r, n) for r, n in remote_pairs}.values()
        for r, n in one_per_replica:
            t0 = time.monotonic()
            status, body = cluster.client.echo(r.api_port, n, "down")
            assert status == 503, (r.name, n, status, body)
            assert b"registry" in body, body
            assert time.monotonic() - t0 < 5, "remote request during the outage took too long"
        for r in reps:
            assert r.metric("agentgate_redis_ops_total", op="lookup", outcome="error") > errors0[r.name], (
                r.name, [ln for ln in r.metrics_text().splitlines() if "redis" in ln])
            assert r.metric("agentgate_tunnel_requests_total", outcome="cluster_unavailable") >= 1
        time.sleep(max(0.0, 3 - (time.monotonic() - t_down)))

        cluster.redis.start()
        t_up = time.monotonic()
        pending = set(remote_pairs)

        def all_remote_recovered():
            for pair in list(pending):
                if cluster.request(pair[0], pair[1], "up")[0]:
                    pending.discard(pair)
            return not pending

        not_recovered = None
        try:
            wait_for(all_remote_recovered, timeout=20, interval=0.2,
                     what="remote routing to recover after Redis came back")
        except AssertionError as e:
            not_recovered = (f"{e}; still failing: {sorted((r.name, n) for r, n in pending)}; "
                             f"registry now: {cluster.redis.keys('agentgate:*')}")
        recovered = time.monotonic() - t_up
        time.sleep(0.5)
    print(f"Redis down {t_up - t_down:.1f}s; remote routing back "
          f"{'never' if not_recovered else f'{recovered:.1f}s'} after restart; "
          f"{loop.ok} local requests, {len(loop.failures)} failed, during the event")
    assert not loop.failures, f"{len(loop.failures)} local failures:\n" + "\n".join(loop.failures[:20])
    assert loop.ok > 20
    assert not_recovered is None, not_recovered

    # The registry was rebuilt from the replicas' local state.
    for n, r in place.items():
        assert list(cluster.redis.hgetall(f"agentgate:agent:{n}")) == [r.internal_url], n
    assert sorted(cluster.redis.hgetall("agentgate:replicas")) == sorted(r.internal_url for r in reps)


def test_grpcs_agents_through_shipped_h2_route(env):
    """grpcs:// agents through the shipped config's HTTP/2 route (backend agentgate_grpc, TLS and
    HTTP/2 terminated at HAProxy), the config extended to three replicas like the WebSocket
    route above: every agent must be reachable from every replica, request after request.

    HAProxy balances each HTTP/2 stream on its own there, so an agent's session (Register) and
    its tunnels (Tunnel/Connect) can land on different replicas. tunnel_wait is lowered to 2 s
    only to keep a failing request short; with working routing a tunnel is ready within ms."""
    upstream = AgentUpstream()
    try:
        names = [f"h2agent{i}" for i in range(4)]
        toks = {n: env.token_file(n) for n in names}
        api = env.token("e2e-user", kind="api")
        redis = Redis(env)
        secret_file, _ = write_secret(env)
        reps = [Replica(env, i + 1, redis, secret_file, ["--set", 'tunnel_wait="2s"'])
                for i in range(N_REPLICAS)]
        hp = start_haproxy_cluster(env, reps)
        for n in names:
            env.agent(f"grpcs://localhost:{hp.port}", toks[n],
                      extra=["--upstream", upstream.url_for(n)] + AGENT_FLAGS, name=f"agent-{n}")

        def connected():
            return sorted(a["name"] for r in reps for a in r.agents()) == names
        wait_for(connected, timeout=30, what="the grpcs agents registered")
        time.sleep(1)  # let each agent park its tunnels
        where = {a["name"]: r.name for r in reps for a in r.agents()}
        parked = {r.name: r.metric("agentgate_tunnels_parked") for r in reps}
        print("sessions:", where, "parked tunnels per replica:", parked)

        client = ApiClient(api)
        failures, total = [], 0
        for rnd in range(5):
            for n in names:
                for r in reps:
                    total += 1
                    t0 = time.monotonic()
                    status, body = client.echo(r.api_port, n, f"h2-{rnd}")
                    if not echo_ok(status, body, n, f"h2-{rnd}"):
                        failures.append(f"{n} (session on {where[n]}) via {r.name}: {status} "
                                        f"{body[:120]!r} after {time.monotonic() - t0:.1f}s")
            if len(failures) >= 3:
                break
        assert not failures, f"{len(failures)} of {total} requests failed:\n" + "\n".join(failures)
    finally:
        upstream.close()


def agent_across_two_replicas(env, upstream: AgentUpstream, name: str, flags: list[str]):
    """Redis, two replicas with `flags`, and agent `name` connected to the second, reachable
    through the first. Returns (redis, here, there, the agent's process, API token, client)."""
    tok = env.token_file(name)
    api_token = env.token(f"{name}-user", kind="api")
    redis = Redis(env)
    secret_file, _ = write_secret(env)
    here, there = (Replica(env, i, redis, secret_file, flags) for i in (1, 2))
    agent = env.agent(f"grpc://127.0.0.1:{there.port}", tok,
                      extra=["--upstream", upstream.url_for(name)] + AGENT_FLAGS, name=f"agent-{name}")
    client = ApiClient(api_token)
    wait_for(lambda: client.echo(here.api_port, name, "before")[0] == 200, timeout=20,
             what="the agent reachable through the other replica")
    return redis, here, there, agent, api_token, client


def crash(replica, agent) -> None:
    """kill -9 of a replica and its agent together (a host lost whole)."""
    replica.proc.send_signal(signal.SIGKILL)
    agent.send_signal(signal.SIGKILL)
    replica.proc.wait(timeout=5)


def test_an_interactive_grpc_stream_through_another_replica_answers_each_message(env):
    """A bidi call in lock step (send one message, wait for its answer) through a replica other
    than the agent's. The agent's replica passed the forwarded body on one frame late (so that
    a tampered body never arrives whole), so the first message waited for the second, which
    the client sends only after the answer: the call hung until its deadline, and grpcurl's
    reflection (a bidi stream) with it. Without a declared length the frames go on as they
    come; the body's end still waits for its MAC."""
    import queue

    import grpc

    from test_tunnel import GrpcUpstream

    up = GrpcUpstream(env)
    tok = env.token_file("chatty")
    api_token = env.token("chatty-user", kind="api")
    redis = Redis(env)
    secret_file, _ = write_secret(env)
    here, there = (Replica(env, i, redis, secret_file, REPLICA_FLAGS) for i in (1, 2))
    env.agent(f"grpc://127.0.0.1:{there.port}", tok, extra=["--grpc-upstream", up.url] + AGENT_FLAGS,
              name="agent-chatty")
    there.wait_agent("chatty")
    md = [("agentgate-agent", "chatty"), ("authorization", f"Bearer {api_token}")]
    with grpc.insecure_channel(f"127.0.0.1:{here.api_port}") as ch:
        stub = up.pbg.EchoStub(ch)
        q: queue.Queue = queue.Queue()

        def requests():
            while (item := q.get(timeout=20)) is not None:
                yield item
        wait_for(lambda: stub.Unary(up.pb.EchoRequest(text="x"), metadata=md, timeout=5).text == "x",
                 timeout=20, what="the agent reachable through the other replica")
        q.put(up.pb.EchoRequest(text="m0"))
        responses = stub.Bidi(requests(), metadata=md, timeout=15)
        for i in range(5):
            t0 = time.monotonic()
            assert next(responses).text == f"M{i}"
            assert time.monotonic() - t0 < 3, f"answer {i} took {time.monotonic() - t0:.1f}s"
            q.put(up.pb.EchoRequest(text=f"m{i + 1}") if i < 4 else None)
        assert list(responses) == []


def test_a_caller_gone_mid_upload_through_another_replica_is_logged_as_its_own_doing(env):
    """A caller that uploads through the replica without the agent and hangs up mid-body:
    the request ends as it does on one replica (499, caller_aborted, ended by the caller), not
    as a broken link between the replicas (502 tunnel_broken blamed on the agent, and an
    unbudgeted warning per abort)."""
    import socket

    from lifecycle_helpers import PatternServer, get_and_leave

    up = PatternServer()
    try:
        tok = env.token_file("uploader")
        api_token = env.token("uploader-user", kind="api")
        redis = Redis(env)
        secret_file, _ = write_secret(env)
        here, there = (Replica(env, i, redis, secret_file, REPLICA_FLAGS) for i in (1, 2))
        env.agent(f"grpc://127.0.0.1:{there.port}", tok, extra=["--upstream", up.url] + AGENT_FLAGS,
                  name="agent-uploader")
        there.wait_agent("uploader")
        wait_for(lambda: api_request(here, "GET", "/agents/uploader/proxy/", api_token)[0] == 200,
                 timeout=20, what="the agent reachable through the other replica")
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", here.api_port), timeout=10)
            s.sendall((f"POST /agents/uploader/proxy/upload HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Bearer {api_token}\r\nContent-Length: 10000000\r\n\r\n").encode())
            s.sendall(b"u" * (2 * 1024 * 1024))
            time.sleep(0.3)
            s.close()
        lines = wait_for(lambda: (ls := [x for x in ic.plain(here.proc.output()).splitlines()
                                         if "agentgate::access" in x and "/upload" in x]) and len(ls) >= 3 and ls,
                         timeout=20, what="three access lines at the caller's replica")
        for line in lines:
            assert 'outcome="caller_aborted"' in line and 'ended_by="caller"' in line, line
            assert "status=499" in line and 'transport="replica"' in line, line
        assert here.metric("agentgate_forwards_total", outcome="caller_aborted") == 3
        assert not here.metric("agentgate_forwards_total", outcome="peer_failed")
        assert "forwarding to a peer replica failed" not in here.proc.output()
        # A GET (one call to the agent's replica) whose caller goes before the answer: the
        # agent had it, so the line says replica, not none.
        get_and_leave(here.api_port, "/agents/uploader/proxy/sleep/3", api_token)
        line = wait_for(lambda: next((x for x in ic.plain(here.proc.output()).splitlines()
                                      if "agentgate::access" in x and "/sleep/3" in x), None),
                        timeout=10, what="the access line of the GET whose caller went")
        assert 'outcome="caller_aborted"' in line and 'transport="replica"' in line, line
        # The agent serves the next request through the other replica.
        assert api_request(here, "GET", "/agents/uploader/proxy/", api_token)[0] == 200
    finally:
        up.close()


def test_a_crashed_replicas_field_in_the_replica_list_is_removed(env):
    """agentgate:replicas lists every live replica and never expires as a whole; a replica
    killed with -9 left its field there for good (pods that crash on new addresses grew it one
    field per crash). The survivors' refresh removes a field once it is past registry_ttl."""
    redis = Redis(env)
    secret_file, _ = write_secret(env)
    fast = ["--set", 'registry_ttl="3s"', "--set", 'registry_refresh_interval="1s"']
    survivor, victim = (Replica(env, i, redis, secret_file, fast) for i in (1, 2))
    wait_for(lambda: set(redis.hgetall("agentgate:replicas")) == {survivor.internal_url, victim.internal_url},
             timeout=10, what="both replicas listed")
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=5)
    wait_for(lambda: set(redis.hgetall("agentgate:replicas")) == {survivor.internal_url},
             timeout=15, what="the killed replica's field removed from agentgate:replicas")


def test_a_replica_with_another_secret_is_named_not_taken_for_a_busy_agent(env):
    """Two replicas whose internal secrets differ: the agent's replica refuses the other's
    signed calls (401, bad signature). The caller got 503 "connected but had no idle tunnel"
    (outcome no_idle_tunnel) in a millisecond, and only an INFO line said why. Now a 503 that
    names the refusal and what to check, outcome cluster_unavailable, and a warning."""
    upstream = AgentUpstream()
    try:
        tok = env.token_file("split")
        api_token = env.token("split-user", kind="api")
        redis = Redis(env)
        other_secret = env.tmp / "another-secret"
        other_secret.write_bytes(b"another-secret-of-at-least-32-bytes-for-this-test\n")
        here = Replica(env, 1, redis, write_secret(env)[0], REPLICA_FLAGS)
        there = Replica(env, 2, redis, other_secret, REPLICA_FLAGS)
        env.agent(f"grpc://127.0.0.1:{there.port}", tok,
                  extra=["--upstream", upstream.url_for("split")] + AGENT_FLAGS, name="agent-split")
        there.wait_agent("split")
        status, _, text = api_request(here, "GET", "/agents/split/proxy/echo", api_token)
        assert status == 503, (status, text[:300])
        assert b"refused this replica's call" in text and b"same internal secret" in text, text[:400]
        assert here.metric("agentgate_tunnel_requests_total", kind="http", outcome="cluster_unavailable",
                           transport="none") == 1
        assert here.forwards("refused") == 1
        assert "refused this replica's call" in here.proc.output()
    finally:
        upstream.close()


def test_a_crashed_replica_whose_agent_is_gone_too_is_skipped_not_called_per_request(env):
    """kill -9 of a replica AND its agent (a host lost whole): the replica's Redis entries stay
    until registry_ttl (5 min here). A request for that agent at the survivor, with a body or
    without, waits agent_reconnect_wait and then gets 503 not_connected, as for any agent
    connected nowhere. Before, it got 502 "client error (Connect)" without a body and an
    instant, false "connected but had no idle tunnel" with one, for the whole TTL, and every
    request cost a failed connect to the dead replica."""
    upstream = AgentUpstream()
    try:
        flags = REPLICA_FLAGS + ["--set", 'agent_reconnect_wait="2s"']
        _, survivor, victim, agent, api_token, _ = agent_across_two_replicas(env, upstream, "lost", flags)
        crash(victim, agent)
        for attempt, (method, body) in enumerate([("GET", None), ("POST", b"x" * 200_000)] * 3):
            t0 = time.monotonic()
            status, headers, text = api_request(survivor, method, "/agents/lost/proxy/echo", api_token,
                                                body=body)
            took = time.monotonic() - t0
            assert status == 503 and b"is not connected" in text, (attempt, method, status, text[:300])
            assert headers.get("Retry-After"), headers
            assert 1.8 < took < 6, (attempt, method, took)
        # One failed connect marked the dead replica down; the requests after it did not call it.
        assert survivor.metric("agentgate_cluster_peer_failures_total") <= 2
        log = survivor.proc.output()
        assert "client error (" not in log, "library error text in the log"
    finally:
        upstream.close()


def test_a_replica_restarted_at_the_same_url_removes_the_entries_its_predecessor_left(env):
    """kill -9 of a replica and its agent, then a new replica at the same internal URL: Redis
    still lists the agent there (until registry_ttl, 5 min). The first peer that asks the new
    replica for the agent hears "not here", and the new replica removes that field (it is
    older than the new process), so later lookups do not ask it again."""
    upstream = AgentUpstream()
    try:
        flags = REPLICA_FLAGS + ["--set", 'agent_reconnect_wait="1s"']
        redis, survivor, victim, agent, api_token, _ = agent_across_two_replicas(env, upstream, "left", flags)
        crash(victim, agent)
        assert victim.internal_url in redis.hgetall("agentgate:agent:left")
        successor = Replica(env, 3, redis, write_secret(env)[0], flags, internal_port=victim.internal_port)
        assert successor.internal_url == victim.internal_url
        status, _, text = api_request(survivor, "GET", "/agents/left/proxy/echo", api_token)
        assert status == 503 and b"is not connected" in text, (status, text[:300])
        wait_for(lambda: victim.internal_url not in redis.hgetall("agentgate:agent:left"), timeout=5,
                 what="the predecessor's registry field removed")
        assert "left by an earlier process" in successor.proc.output()
        # A field the new process writes itself stays: the agent comes back to it.
        agent = env.agent(f"grpc://127.0.0.1:{successor.port}", env.tmp / "token-left-agent.txt",
                          extra=["--upstream", upstream.url_for("left")] + AGENT_FLAGS, name="agent-left-2")
        wait_for(lambda: victim.internal_url in redis.hgetall("agentgate:agent:left"), timeout=20,
                 what="the agent registered at the new replica")
        status, _, text = api_request(survivor, "GET", "/agents/left/proxy/echo", api_token)
        assert status == 200, (status, text[:300])
    finally:
        upstream.close()


def test_a_frozen_redis_costs_a_remote_request_one_redis_timeout(env):
    """Redis stopped dead (SIGSTOP: connections open, nothing answers): a request for an agent
    at the other replica gets 503 naming the registry after one `redis_timeout` (1 s), not
    two (the lookup's retry is for a broken connection, not a silent Redis), in one wording;
    once Redis answers again, the request is served."""
    upstream = AgentUpstream()
    try:
        redis, here, _, _, api_token, client = agent_across_two_replicas(env, upstream, "far", REPLICA_FLAGS)
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                t0 = time.monotonic()
                status, _, text = api_request(here, "GET", "/agents/far/proxy/echo", api_token)
                took = time.monotonic() - t0
                assert status == 503 and b"Redis round trip timed out after 1s" in text, (status, text[:300])
                assert took < 1.8, f"{took:.2f}s for one Redis timeout of 1 s"
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: client.echo(here.api_port, "far", "after")[0] == 200, timeout=20,
                 what="the agent reachable again once Redis answers")
    finally:
        upstream.close()
