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
from test_cluster_trust import api_get, replicas_sharing_an_agent


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
        r1, r2, api = replicas_sharing_an_agent(env, Via, secret_file, up, "/before")
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


def test_sentinels_over_tls_with_their_own_password(env, tmp_path):
    """rediss+sentinel://: TLS to the Sentinel and to the master (one private CA, redis_ca_cert),
    the master's password in the URL and the Sentinel's own from redis_sentinel_password_file.
    Replicas find each other's agents through the master the Sentinel names; neither password
    shows in a log; a replica without the Sentinel's password is refused at start with a
    sentence."""
    from conftest import BIN, make_certs
    from proxies import port_open

    pki = make_certs(tmp_path / "redis-pki")
    tls = (f"tls-cert-file {pki['cert']}\ntls-key-file {pki['key']}\n"
           f"tls-ca-cert-file {pki['ca']}\ntls-auth-clients no\n")
    master_pw, sentinel_pw = "master-s3cret-pw", "sentinel-s3cret-pw"
    master_port, sentinel_port = free_port(), free_port()
    (tmp_path / "master.conf").write_text(
        f"port 0\ntls-port {master_port}\nbind 127.0.0.1\n{tls}save \"\"\nappendonly no\n"
        f"dir {tmp_path}\nrequirepass {master_pw}\n")
    master = env.spawn(["redis-server", str(tmp_path / "master.conf")], "redis-master-tls")
    wait_for(lambda: port_open(master_port), what="the master over TLS")
    (tmp_path / "sentinel.conf").write_text(
        f"port 0\ntls-port {sentinel_port}\nbind 127.0.0.1\n{tls}tls-replication yes\n"
        f"dir {tmp_path}\nrequirepass {sentinel_pw}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        f"sentinel auth-pass mymaster {master_pw}\n")
    sentinel = env.spawn(["redis-server", str(tmp_path / "sentinel.conf"), "--sentinel"],
                         "sentinel-tls")

    def named_master():
        out = subprocess.run(
            ["redis-cli", "--tls", "--cacert", str(pki["ca"]), "-p", str(sentinel_port),
             "--no-auth-warning", "-a", sentinel_pw,
             "SENTINEL", "get-master-addr-by-name", "mymaster"],
            capture_output=True, text=True, timeout=10).stdout.split()
        return len(out) == 2 and out[1] == str(master_port)
    wait_for(named_master, timeout=20, what="the Sentinel over TLS naming the master")

    pw_file = tmp_path / "sentinel.password"
    pw_file.write_text(sentinel_pw + "\n")

    class Via:
        url = f"rediss+sentinel://:{master_pw}@127.0.0.1:{sentinel_port}/mymaster/0"

    secret_file, _ = write_secret(env)
    settings = ["--set", f'redis_ca_cert="{pki["ca"]}"', "--set", "redis_required_at_start=true",
                "--set", "redis_startup_timeout=\"4s\""]
    up = HttpUpstream("behind-tls-sentinel")
    try:
        with_pw = [*settings, "--set", f'redis_sentinel_password_file="{pw_file}"']
        r1, r2, api = replicas_sharing_an_agent(env, Via, secret_file, up, "/via-tls-sentinel",
                                                extra=with_pw)
        for g in (r1, r2):
            out = g.proc.output()
            assert master_pw not in out and sentinel_pw not in out, out[-2000:]
            assert g.metric_sum("agentgate_redis_ops_total", outcome="ok") > 0

        # Without the Sentinel's password there is no master to find: refused at start.
        r = subprocess.run(
            [str(BIN), "server", "--tokens", str(env.tokens), "--redis", Via.url,
             "--internal-secret-file", str(secret_file), "--listen", f"127.0.0.1:{free_port()}",
             "--cleartext-listen", f"127.0.0.1:{free_port()}",
             "--admin-listen", f"127.0.0.1:{free_port()}",
             "--api-listen", f"127.0.0.1:{free_port()}",
             "--internal-listen", f"127.0.0.1:{free_port()}", *settings],
            capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, r.stderr
        print("without the Sentinel's password:", r.stderr.strip().splitlines()[-1])
        assert "redis" in r.stderr.lower(), r.stderr
        assert master_pw not in r.stderr and sentinel_pw not in r.stderr, r.stderr
        assert master.alive() and sentinel.alive()
    finally:
        up.close()
