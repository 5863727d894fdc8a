"""Cluster mode on a Redis that fails over: a master, a replica and a Redis Sentinel (Debian's
redis-server in its three roles). The gateways are given only the Sentinel
(`redis+sentinel://HOST:PORT/MASTER`); the master is killed; the Sentinel promotes the replica;
the gateways follow it without a restart, and a caller reaches an agent on the other replica
through the new master's registry."""

import subprocess
import time

from cluster_helpers import Redis, write_secret
from conftest import free_port, wait_for
from proxies import HttpUpstream
from test_cluster_trust import api_get, pin_agent, replica


class Sentinel:
    """redis-server --sentinel watching `master` under the name `mymaster`, quorum 1."""

    def __init__(self, env, master: Redis):
        self.port = free_port()
        conf = env.tmp / "sentinel.conf"  # the Sentinel rewrites its own file
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {env.tmp}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 1000\n"
            "sentinel failover-timeout mymaster 5000\n")
        self.proc = env.spawn(["redis-server", conf, "--sentinel"], "sentinel")

    def cli(self, *args) -> str:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *map(str, args)],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def master_port(self) -> int | None:
        out = self.cli("SENTINEL", "get-master-addr-by-name", "mymaster").split()
        return int(out[1]) if len(out) == 2 else None


def test_a_redis_failover_is_followed_through_the_sentinel(env):
    master = Redis(env, "redis-master")
    standby = Redis(env, "redis-replica", extra=("--replicaof", "127.0.0.1", master.port))
    wait_for(lambda: "master_link_status:up" in standby.cli("INFO", "replication"), timeout=15,
             what="the replica in sync")
    sentinel = Sentinel(env, master)
    wait_for(lambda: sentinel.master_port() == master.port, timeout=15, what="the Sentinel up")
    wait_for(lambda: "num-slaves" in sentinel.cli("SENTINEL", "master", "mymaster")
             and sentinel.cli("SENTINEL", "replicas", "mymaster") != "", timeout=20,
             what="the Sentinel knowing the replica")

    class Via:
        url = f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster/0"

    secret_file, _ = write_secret(env)
    up = HttpUpstream("behind-sentinel")
    try:
        r1 = replica(env, "r1", Via, secret_file)
        r2 = replica(env, "r2", Via, secret_file)
        api = pin_agent(env, r2, up)
        wait_for(lambda: api_get(r1, api, "pinned", "/before")[0] == 200, timeout=20,
                 what="r1 reaching the agent on r2 through the master's registry")
        assert master.cli("HLEN", "agentgate:agent:pinned") == "1"

        # The master dies; the Sentinel promotes the replica.
        master.proc.stop(timeout=5)
        t0 = time.monotonic()
        wait_for(lambda: sentinel.master_port() == standby.port, timeout=30,
                 what="the Sentinel promoting the replica")
        promoted = time.monotonic() - t0

        # A second agent registers on r2 after the failover: its entry must land in the new
        # master, and r1 must find it there (no restart of either gateway).
        env.agent(f"grpc://127.0.0.1:{r2.port}", env.token_file("after"), name="agent-after",
                  extra=["--upstream", up.url])
        r2.wait_agent("after")
        wait_for(lambda: standby.cli("HLEN", "agentgate:agent:after") == "1", timeout=30,
                 what="the new agent's entry in the promoted master")
        wait_for(lambda: api_get(r1, api, "after", "/after")[0] == 200, timeout=30,
                 what="r1 reaching an agent registered after the failover")
        assert api_get(r1, api, "pinned", "/still")[0] == 200
        followed = time.monotonic() - t0
        print(f"Sentinel promoted the replica {promoted:.1f} s after the master died; "
              f"the gateways served through the new master {followed:.1f} s after it")
        for g in (r1, r2):
            assert g.proc.alive()
            assert g.metric_sum("agentgate_redis_ops_total", outcome="ok") > 0
    finally:
        up.close()
