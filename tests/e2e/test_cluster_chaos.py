"""Faults while requests are in flight, on a three-replica cluster behind the shipped HAProxy
config (agents over wss through it, callers through its tunnel-API routes): a rolling restart
of every replica, a peer that accepts connections and never answers, and a slow link between
replicas. (kill -9 of a replica and a Redis restart under load are in test_cluster.py.)

Delay and loss with `tc netem` are not available here: this machine's kernel has no sch_netem
("Specified qdisc kind is unknown") and no modules to load. The slow link is a userspace proxy
that delays every chunk instead; loss is not simulated.
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import threading
import time

import pytest

from cluster_helpers import LoadThreads, echo_ok
from lifecycle_helpers import pump_bytes
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


class DelayProxy(LocalListener):
    """TCP proxy that holds every chunk `delay` seconds in each direction: a slow link."""

    def __init__(self, target_port: int, delay: float):
        self.delay, self.target = delay, target_port
        super().__init__(free_port())

    def accepted(self, conn):
        u = socket.create_connection(("127.0.0.1", self.target))
        for a, b in ((conn, u), (u, conn)):
            threading.Thread(target=pump_bytes, args=(a, b, self.delay), daemon=True).start()


def test_a_slow_link_between_replicas_slows_requests_and_fails_none(env):
    """Two replicas; the second one's internal API is reached only through a 150 ms-per-chunk
    delay (its internal_url points at the delaying proxy). Requests and a 4 MiB download for
    its agent through the first replica all succeed, each paying the delay."""
    from cluster_helpers import AgentUpstream, ApiClient, Redis, expected_sha256, write_secret
    from proxies import port_open

    redis = Redis(env)
    secret_file, _ = write_secret(env)
    upstream = AgentUpstream()
    try:
        def rep(name, listen, url):
            g = env.gateway(tls=False, cleartext=False, name=name, extra=[
                "--redis", redis.url, "--internal-listen", f"127.0.0.1:{listen}",
                "--internal-url", url, "--internal-secret-file", str(secret_file)])
            wait_for(lambda: port_open(listen), what=f"{name} internal API")
            return g
        p1 = free_port()
        r1 = rep("r1", p1, f"http://127.0.0.1:{p1}")
        p2 = free_port()
        slow = DelayProxy(p2, 0.15)
        r2 = rep("r2", p2, f"http://127.0.0.1:{slow.port}")
        env.agent(f"grpc://127.0.0.1:{r2.port}", env.token_file("far"), name="agent-far",
                  extra=["--upstream", upstream.url_for("far")])
        r2.wait_agent("far")
        client = ApiClient(env.token("caller", kind="api"))
        wait_for(lambda: echo_ok(*client.echo(r1.api_port, "far", "warm"), "far", "warm"),
                 timeout=20, what="r1 reaching the agent on r2 over the slow link")
        lat, failures = timed_echoes(client, r1.api_port, "far", 10, "slow")
        status, n, digest, secs = client.download(r1.api_port, "far", 4)
        print(f"over a 150 ms link: p50 {statistics.median(lat) * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms; 4 MiB in {secs:.1f}s")
        assert not failures, failures
        assert statistics.median(lat) > 0.3, "the requests did not cross the slow link"
        assert (status, n, digest) == (200, 4 * 1024 * 1024, expected_sha256(4))
        slow.close()
    finally:
        upstream.close()


class PacketLoss:
    """Drops a share of the TCP packets to and from one local port, at random, in a table of
    its own (nftables `numgen random`; this kernel has no `tc netem`, see docs/BENCHMARKS.md).
    Loss, not a closed port: TCP retransmits what is dropped, as on a lossy link."""

    TABLE = "agentgate_e2e_loss"

    def __init__(self, port: int, percent: int):
        rules = (f"table inet {self.TABLE} {{\n"
                 f"  chain out {{ type filter hook output priority 0; policy accept;\n"
                 f"    tcp dport {port} numgen random mod 100 < {percent} counter drop\n"
                 f"    tcp sport {port} numgen random mod 100 < {percent} counter drop\n"
                 f"  }}\n}}\n")
        try:
            r = subprocess.run(["nft", "-f", "-"], input=rules, capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("nft is not installed (Debian: nftables; .ci/run installs it)")
        if r.returncode != 0:
            pytest.skip(f"nftables cannot drop packets here: {r.stderr.strip()}")

    def dropped(self) -> int:
        out = subprocess.run(["nft", "list", "table", "inet", self.TABLE],
                             capture_output=True, text=True).stdout
        return sum(int(n) for n in re.findall(r"packets (\d+)", out))

    def close(self):
        subprocess.run(["nft", "delete", "table", "inet", self.TABLE], capture_output=True)


def test_a_lossy_link_between_replicas_fails_no_request(env):
    """Two replicas; 5% of the packets to and from the second one's internal port are dropped.
    Requests and a 4 MiB download for its agent through the first replica all succeed (TCP
    retransmits), slower at the tail."""
    from cluster_helpers import AgentUpstream, ApiClient, Redis, expected_sha256, write_secret
    from test_cluster_trust import replica

    redis = Redis(env)
    secret_file, _ = write_secret(env)
    upstream = AgentUpstream()
    loss = None
    try:
        r1 = replica(env, "r1", redis, secret_file)
        r2 = replica(env, "r2", redis, secret_file)
        env.agent(f"grpc://127.0.0.1:{r2.port}", env.token_file("far"), name="agent-far",
                  extra=["--upstream", upstream.url_for("far")])
        r2.wait_agent("far")
        client = ApiClient(env.token("caller", kind="api"))
        wait_for(lambda: echo_ok(*client.echo(r1.api_port, "far", "warm"), "far", "warm"),
                 timeout=20, what="r1 reaching the agent on r2")

        clean, failures = timed_echoes(client, r1.api_port, "far", 100, "clean")
        assert not failures, failures
        loss = PacketLoss(r2.internal_port, 5)
        lossy, failures = timed_echoes(client, r1.api_port, "far", 300, "lossy")
        status, n, digest, secs = client.download(r1.api_port, "far", 4)
        dropped = loss.dropped()
        print(f"5% loss on the internal link: {dropped} packets dropped; p50 "
              f"{lossy[len(lossy) // 2] * 1000:.1f} ms (clean {clean[len(clean) // 2] * 1000:.1f}), "
              f"p99 {lossy[int(len(lossy) * 0.99)] * 1000:.0f} ms "
              f"(clean {clean[int(len(clean) * 0.99)] * 1000:.0f}); 4 MiB in {secs:.2f}s")
        assert not failures, failures
        assert (status, n, digest) == (200, 4 * 1024 * 1024, expected_sha256(4))
        assert dropped > 0, "no packet was dropped: the link was not lossy"
    finally:
        if loss:
            loss.close()
        upstream.close()
