"""Faults while requests are in flight, on a three-replica cluster behind the shipped HAProxy
config (agents over wss through it, callers through its tunnel-API routes): a rolling restart
of every replica, a peer that accepts connections and never answers, and a delayed, then
lossy, link between two replicas on hosts of their own (network namespaces and veth pairs).
(kill -9 of a replica and a Redis restart under load are in test_cluster.py.)

This kernel has no sch_netem (`tc qdisc add ... netem` says "Specified qdisc kind is
unknown"), so the link's router hands the packets to netem.py through NFQUEUE, which delays
and drops them as netem would.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

from cluster_helpers import LoadThreads, echo_ok
from conftest import free_port, wait_for
from test_cluster import Cluster  # noqa: F401  (the three-replica setup)
from test_cluster import cluster  # noqa: F401  pytest fixture


class CallerLoop(LoadThreads):
    """Callers through HAProxy's API route, one keep-alive connection per thread."""

    def __init__(self, cluster, names, threads: int = 4):
        self.cluster, self.names = cluster, names
        super().__init__(threads)

    def one(self, i: int) -> tuple[bool, str]:
        agent, tag = self.names[i % len(self.names)], f"roll{i}"
        try:
            status, body = self.cluster.client.echo(self.cluster.haproxy.clear_port, agent, tag)
            return echo_ok(status, body, agent, tag), f"{agent}: {status} {body[:160]!r}"
        except Exception as e:  # noqa: BLE001
            return False, f"{agent}: {type(e).__name__}: {e}"


def test_rolling_restart_of_every_replica_fails_no_request(cluster):  # noqa: F811
    """Each replica in turn gets SIGTERM (drain: GOAWAY to agents, requests in flight finish),
    then starts again on the same ports; the next one goes once HAProxy has it back. Callers
    send idempotent GETs to every agent all along: none may fail. What makes it hold: HAProxy
    leaves a replica whose /readyz says 503 and resends what could not be sent to it; agents
    move to another replica at the GOAWAY; a request for an agent between two connections
    waits for it (agent_reconnect_wait)."""
    names = cluster.names
    t0 = time.monotonic()
    moves = []
    with CallerLoop(cluster, names) as loop:
        time.sleep(1)
        for r in cluster.replicas:
            held = {a["name"] for a in r.agents()}
            t = time.monotonic()
            r.restart()
            restarted = time.monotonic() - t
            # Back in HAProxy's rotation (rise 2 x inter 1 s) before the next one drains.
            time.sleep(2.5)
            wait_for(lambda: sorted(cluster.placement()) == sorted(names), timeout=20,
                     what="every agent connected somewhere after restarting " + r.name)
            moves.append((r.name, len(held), restarted, time.monotonic() - t))
        time.sleep(1)
    took = time.monotonic() - t0
    print(f"rolling restart of {len(cluster.replicas)} replicas in {took:.1f}s "
          f"({', '.join(f'{n}: {k} agents moved, stop+start {a:.1f}s, all placed {b:.1f}s' for n, k, a, b in moves)}); "
          f"{loop.ok} requests, {len(loop.failures)} failed")
    assert not loop.failures, f"{len(loop.failures)} failures:\n" + "\n".join(loop.failures[:20])
    assert loop.ok > 100
    assert sum(m[1] for m in moves) > 0, "no replica held an agent: nothing was tested"


class LocalListener:
    """A TCP listener on 127.0.0.1 whose accepted connections go to `accepted(conn)`, in a
    thread of its own, until `close()`."""

    def __init__(self, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def accepted(self, conn: socket.socket):
        raise NotImplementedError

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted(c)

    def close(self):
        self.sock.close()


class Tarpit(LocalListener):
    """Accepts TCP connections and never answers: a peer whose process hangs."""

    def __init__(self):
        self.count = 0
        self.conns = []
        super().__init__()

    def accepted(self, conn):
        self.count += 1
        self.conns.append(conn)

    def close(self):
        super().close()
        for c in self.conns:
            c.close()


def test_a_hanging_peer_costs_no_request_its_time_and_is_skipped(cluster):  # noqa: F811
    """A URL of a peer that accepts and never answers, listed under an agent's key next to the
    agent's real replica: requests through another replica are answered by the real one at
    once (the reservation race does not wait for the slowest peer), the hanging peer is marked
    down once its connection misses PINGs for internal_call_timeout (3 s), and then skipped."""
    place = cluster.placement()
    agent, home = next(iter(place.items()))
    via = next(r for r in cluster.alive_replicas if r is not home)
    tarpit = Tarpit()
    try:
        url = f"http://127.0.0.1:{tarpit.port}"
        cluster.redis.cli("HSET", f"agentgate:agent:{agent}", url, str(int(time.time() * 1000) + 600_000))
        failures0 = via.metric("agentgate_cluster_peer_failures_total")
        lat = []
        for i in range(20):
            t = time.monotonic()
            ok, what = cluster.request(via, agent, f"tarpit{i}")
            lat.append(time.monotonic() - t)
            assert ok, what
        print(f"with a hanging peer listed: p50 {statistics.median(lat) * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms; the peer got {tarpit.count} connections")
        assert max(lat) < 1.5, f"a request waited for the hanging peer: {max(lat):.2f}s"
        wait_for(lambda: via.metric("agentgate_cluster_peer_failures_total") > failures0, timeout=10,
                 what="the hanging peer counted as failed")
        accepted = tarpit.count
        for i in range(10):
            assert cluster.request(via, agent, f"skipped{i}")[0]
        assert tarpit.count == accepted, "a peer marked down was called again"
    finally:
        cluster.redis.cli("HDEL", f"agentgate:agent:{agent}", f"http://127.0.0.1:{tarpit.port}")
        tarpit.close()


def timed_echoes(client, port: int, agent: str, n: int, tag: str):
    """`n` echo requests for `agent` one after another through the API at `port`: their
    latencies, sorted, and the failures (status, start of the body)."""
    lat, failures = [], []
    for i in range(n):
        t = time.monotonic()
        status, body = client.echo(port, agent, f"{tag}{i}")
        lat.append(time.monotonic() - t)
        if not echo_ok(status, body, agent, f"{tag}{i}"):
            failures.append((status, body[:200]))
    return sorted(lat), failures


def test_delay_and_loss_on_the_link_between_replicas_fail_no_request(env):
    """Two replicas; the second runs on a host of its own (network namespaces joined through a
    router namespace by veth pairs, netns_link.py). On the router, the packets of its internal
    API are first delayed 50 ms each way, then 5% of them are dropped (netem.py; this kernel
    has no sch_netem for `tc netem`). Requests and a 4 MiB download for its agent through the
    first replica all succeed, the delayed ones paying at least the added round trip."""
    from cluster_helpers import AgentUpstream, ApiClient, Redis, expected_sha256, write_secret
    from netns_link import RoutedHost
    from proxies import port_open
    from test_cluster_trust import replica

    far = RoutedHost("agc")
    upstream = AgentUpstream()
    try:
        redis = Redis(env, extra=("--bind", "127.0.0.1", far.near_ip))
        secret_file, _ = write_secret(env)
        r1 = replica(env, "r1", redis, secret_file)
        p2 = free_port()
        r2 = env.gateway(tls=False, cleartext=False, name="r2", host=far.host_ip, wrap=far.wrap,
                         extra=["--redis", f"redis://{far.near_ip}:{redis.port}/0",
                                "--internal-listen", f"{far.host_ip}:{p2}",
                                "--internal-url", f"http://{far.host_ip}:{p2}",
                                "--internal-secret-file", str(secret_file)])
        wait_for(lambda: port_open(p2, far.host_ip), what="r2's internal API across the router")
        env.agent(f"grpc://{far.host_ip}:{r2.port}", env.token_file("far"), name="agent-far",
                  extra=["--upstream", upstream.url_for("far")])
        r2.wait_agent("far")
        client = ApiClient(env.token("caller", kind="api"))
        wait_for(lambda: echo_ok(*client.echo(r1.api_port, "far", "warm"), "far", "warm"),
                 timeout=20, what="r1 reaching the agent on r2")
        clean, failures = timed_echoes(client, r1.api_port, "far", 100, "clean")
        assert not failures, failures

        with far.impair(p2, delay_ms=50) as delayed_counts:
            delayed, failures = timed_echoes(client, r1.api_port, "far", 20, "slow")
            downloads = [client.download(r1.api_port, "far", 4) for _ in range(2)]
        assert not failures, failures
        for status, n, digest, _ in downloads:
            assert (status, n, digest) == (200, 4 * 1024 * 1024, expected_sha256(4))
        # The reference: a caller across the same delayed link, straight to the far replica.
        with far.impair(r2.api_port, delay_ms=50):
            across = ApiClient(client.token).download(r2.api_port, "far", 4, host=far.host_ip)
        assert across[:3] == (200, 4 * 1024 * 1024, expected_sha256(4))
        assert statistics.median(delayed) >= 0.1, "the requests did not cross the delayed link"

        with far.impair(p2, loss_pct=5) as lossy_counts:
            lossy, failures = timed_echoes(client, r1.api_port, "far", 300, "lossy")
            status, n, digest, secs_lossy = client.download(r1.api_port, "far", 4)
        assert not failures, failures
        assert (status, n, digest) == (200, 4 * 1024 * 1024, expected_sha256(4))

        def pct(lat, q):
            return lat[min(len(lat) - 1, int(len(lat) * q))] * 1000
        print(f"clean: p50 {pct(clean, .5):.1f} ms, p99 {pct(clean, .99):.0f} ms; "
              f"+50 ms each way: p50 {pct(delayed, .5):.0f} ms, 4 MiB in "
              f"{downloads[0][3]:.2f}s then {downloads[1][3]:.2f}s (a caller across the link "
              f"straight to r2: {across[3]:.2f}s; {delayed_counts['accepted']} packets delayed); "
              f"5% loss: p50 {pct(lossy, .5):.1f} ms, p99 {pct(lossy, .99):.0f} ms, "
              f"4 MiB in {secs_lossy:.2f}s ({lossy_counts['dropped']} of "
              f"{lossy_counts['dropped'] + lossy_counts['accepted']} packets dropped)")
        assert delayed_counts["accepted"] > 0
        assert lossy_counts["dropped"] > 0, "no packet was dropped: the link was not lossy"
    finally:
        upstream.close()
        env.close()
        far.close()
