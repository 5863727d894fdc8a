"""Revoking a token bites on what it already authenticated: `agentgate token revoke` while an
agent is connected (idle, or with a request in flight) and while a runner holds a long poll to
a gateway-side backend. The gateway checks its token file every `token_check_interval`."""

from __future__ import annotations

import subprocess
import threading
import time

import grpc

import ingress_clients as ic
from conftest import BIN, http_get, wait_for
from job_router import JobRouter, method_path
from lifecycle_helpers import Download, PatternServer, api_get


def api_post(api_port: int, path: str, token: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=20)
    try:
        conn.request("POST", path, body=b"x", headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()

# token_check_interval is 2 s by default; what it authenticated must end within this.
BOUND = 6.0


def revoke(env, name: str) -> None:
    out = subprocess.run([str(BIN), "token", "revoke", name, "--tokens", str(env.tokens)],
                         capture_output=True, text=True, timeout=20, check=True)
    assert "revoked" in out.stdout, out.stdout


def test_revoked_agent_is_cut_off_idle_and_busy(env):
    up = PatternServer()
    try:
        api = env.token("caller", kind="api")
        g = env.gateway(tls=False, cleartext=False)
        idle_tf, busy_tf = env.token_file("idle-edge"), env.token_file("busy-edge")
        agents = [env.agent(g.url("grpc"), tf, extra=["--upstream", up.url], name=f"agent-{name}")
                  for name, tf in (("idle", idle_tf), ("busy", busy_tf))]
        g.wait_agent("idle-edge")
        g.wait_agent("busy-edge")
        assert api_get(g.api_port, "/agents/idle-edge/proxy/", api)[0] == 200
        # A slow download through the busy agent stays in flight across the revocation.
        size = 8 * 1024 * 1024
        dl = Download(g.api_port, f"/agents/busy-edge/proxy/bytes/{size}", api, size, rate=2e6)
        t = threading.Thread(target=dl.run, daemon=True)
        t.start()
        wait_for(lambda: dl.got > 0, timeout=10, what="the download started")
        # And a request the upstream answers 3 s later, as a POST (never sent twice).
        slow: list = []
        st = threading.Thread(target=lambda: slow.append(
            api_post(g.api_port, "/agents/busy-edge/proxy/sleep/3", api)), daemon=True)
        st.start()
        time.sleep(0.3)

        for name in ("idle-edge", "busy-edge"):
            revoke(env, name)
        revoked_at = time.monotonic()

        def gone():
            names = {a["name"] for a in g.agents()}
            return not names & {"idle-edge", "busy-edge"}
        wait_for(gone, timeout=BOUND, interval=0.1, what="both revoked agents' sessions ended")
        assert time.monotonic() - revoked_at < BOUND
        for name in ("idle-edge", "busy-edge"):
            status, body = api_get(g.api_port, f"/agents/{name}/proxy/", api)
            assert status in (404, 503), (name, status, body)
        log = g.proc.output()
        assert "ending session: its token was revoked" in log, log[-3000:]
        assert "token revoked or expired: ending the sessions" in log
        assert g.metric("agentgate_connections_rejected_total", reason="token_revoked") >= 2
        # Each agent is told why its session ended (the status reaches it before the connection
        # is cut), and is refused when it comes back.
        for proc in agents:
            wait_for(lambda: "this agent's token was revoked" in proc.output(), timeout=15,
                     what="the agent logs the gateway's reason for ending its session")
            wait_for(lambda: "the gateway rejected the agent token" in proc.output(), timeout=15,
                     what="the agent logs why it cannot come back")
        # Requests in flight finish (docs/operations.md): the connection gets a GOAWAY, not a cut.
        t.join(timeout=30)
        assert dl.intact, dl.describe()
        st.join(timeout=30)
        assert slow and slow[0][0] == 200, slow
        assert "panicked" not in log
    finally:
        up.close()


def test_revoked_runner_long_poll_ends_unauthenticated(env):
    router = JobRouter()
    try:
        tok = env.token("runner-r")
        keep = env.token("runner-k")
        g = env.gateway(tls=False, cleartext=False,
                        extra=["--backend", f"runner.jobs.v1.={router.url}"])
        ch = ic.h2c_channel(g.port)
        wait = ch.unary_stream(method_path("WaitJob"))
        poll = wait(b'{"job": "never", "delay": 60}', metadata=[("authorization", f"Bearer {tok}")],
                    timeout=60)
        other = wait(b'{"job": "never", "delay": 60}', metadata=[("authorization", f"Bearer {keep}")],
                     timeout=60)
        wait_for(lambda: len(router.calls_to("WaitJob")) == 2, timeout=10, what="both long polls reached the backend")
        revoke(env, "runner-r")
        t0 = time.monotonic()
        try:
            next(poll)
            raise AssertionError("the revoked runner's long poll answered")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (e.code(), e.details())
            assert "revoked" in e.details(), e.details()
        assert time.monotonic() - t0 < BOUND
        # The backend saw its call cancelled; the other runner's poll is untouched.
        rec = [r for r in router.calls_to("WaitJob") if r.values("agentgate-agent-name") == ["runner-r"]][0]
        assert rec.wait_ended(5) and rec.cancelled, rec
        kept = [r for r in router.calls_to("WaitJob") if r.values("agentgate-agent-name") == ["runner-k"]][0]
        assert not kept.wait_ended(0.5), f"the other runner's long poll ended too: {kept}"
        other.cancel()
        status, _, text = http_get(g.admin + "/metrics")
        assert 'outcome="revoked"' in text.decode(), text.decode()[-2000:]
        ch.close()
    finally:
        router.stop()


def test_rotation_runbook_new_token_in_the_file_then_revoke_the_old_by_id(env):
    """docs/operations.md, rotating a token: create a second token for the agent, write it into the
    agent's token file, revoke the first by id. The agent, which re-reads a changed token file
    before each connection, comes back on the new token without a restart."""
    g = env.gateway(tls=False, cleartext=False)
    tf = env.token_file("rotating")
    a = env.agent(g.url("grpc"), tf, extra=["--backoff-initial", "200ms", "--backoff-max", "1s"],
                  name="agent-rotating")
    before = g.wait_agent("rotating")
    listed = subprocess.run([str(BIN), "token", "list", "--tokens", str(env.tokens)],
                            capture_output=True, text=True, check=True).stdout
    old_id = next(line.split()[0] for line in listed.splitlines() if "rotating" in line)
    tf.write_text(env.token("rotating") + "\n")
    revoke(env, old_id)

    def back_on_new_connection():
        for agent in g.agents():
            if agent["name"] == "rotating" and agent["connection_id"] != before["connection_id"]:
                return agent
        return None
    wait_for(back_on_new_connection, timeout=15, interval=0.2,
             what="the agent back on its new token")
    assert a.alive()
    assert "token file changed" in a.output(), a.output()[-2000:]


def test_an_expiring_token_ends_its_session_when_it_expires(env):
    g = env.gateway(tls=False, cleartext=False)
    tf = env.tmp / "short-lived.token"
    out = subprocess.run([str(BIN), "token", "create", "--name", "short-lived", "--expires-in", "4s",
                          "--tokens", str(env.tokens)], capture_output=True, text=True, check=True, timeout=20)
    tf.write_text(out.stdout.strip() + "\n")
    listed = subprocess.run([str(BIN), "token", "list", "--tokens", str(env.tokens)],
                            capture_output=True, text=True, check=True).stdout
    assert "never" not in next(line for line in listed.splitlines() if "short-lived" in line), listed
    a = env.agent(g.url("grpc"), tf, extra=["--backoff-initial", "200ms", "--backoff-max", "1s"],
                  name="agent-short-lived")
    g.wait_agent("short-lived")
    t0 = time.monotonic()
    wait_for(lambda: not any(x["name"] == "short-lived" for x in g.agents()), timeout=4 + BOUND,
             interval=0.2, what="the session ended at expiry")
    assert time.monotonic() - t0 > 1.0, "it ended long before its expiry"
    # The session's end says "expired", not "revoked" (the agent logs the gateway's reason).
    wait_for(lambda: "this agent's token expired; give the agent a new token" in a.output(), timeout=10,
             what="the agent told its token expired")
    assert "ending session: its token expired" in g.proc.output()
    assert g.metric("agentgate_connections_rejected_total", reason="token_expired") == 1
    assert g.metric("agentgate_connections_rejected_total", reason="token_revoked") == 0
    assert "(expired)" in subprocess.run([str(BIN), "token", "list", "--tokens", str(env.tokens)],
                                         capture_output=True, text=True, check=True).stdout


def test_a_token_created_while_the_gateway_runs_works_on_its_first_call(env):
    """`agentgate token create`, then curl with the new token at once: no window in which the
    gateway still calls it invalid (it used to re-read its store at most every 250 ms)."""
    up = PatternServer()
    try:
        g = env.gateway(tls=False, cleartext=False)
        env.agent(g.url("grpc"), env.token_file("fresh-edge"), extra=["--upstream", up.url],
                  name="agent-fresh")
        g.wait_agent("fresh-edge")
        url = f"http://127.0.0.1:{g.api_port}/agents/fresh-edge/proxy/"
        for i in range(5):
            # A refused call right before, so the gateway has just looked at its store.
            assert http_get(url, headers={"authorization": "Bearer not-a-token"})[0] == 401
            token = env.token(f"caller-{i}", kind="api")
            r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                "-H", f"Authorization: Bearer {token}", url],
                               capture_output=True, text=True, timeout=30)
            assert r.stdout == "200", (i, r.stdout, r.stderr)
    finally:
        up.close()


def test_a_token_file_that_vanishes_keeps_the_loaded_tokens_and_says_so(env):
    """A non-atomic rewrite (or a mistaken `rm`) leaves no token file for a while: that is a
    failed reload, logged and shown by a gauge, not an empty store that revokes every session.
    The agent stays connected; the file's return clears the gauge."""
    g = env.gateway(tls=False, cleartext=False)
    tf = env.token_file("keeps-going")
    a = env.agent(g.url("grpc"), tf, name="agent-keeps-going")
    g.wait_agent("keeps-going")
    assert g.metric("agentgate_token_store_reload_failing") == 0
    aside = env.tmp / "tokens.json.aside"
    env.tokens.rename(aside)
    wait_for(lambda: g.metric("agentgate_token_store_reload_failing") == 1, timeout=BOUND,
             what="the failed reload shown")
    time.sleep(3)  # more token checks, none of which may empty the store
    assert any(x["name"] == "keeps-going" for x in g.agents()), g.agents()
    # A missing file is retried every 2 s, each retry a failure of its own.
    assert g.metric("agentgate_token_store_reload_failures_total") >= 1
    log = g.proc.output()
    assert "token store reload failed; keeping the previous one" in log and "does not exist" in log, log[-2000:]
    assert "ending session" not in log
    aside.rename(env.tokens)
    wait_for(lambda: g.metric("agentgate_token_store_reload_failing") == 0, timeout=BOUND,
             what="the gauge cleared once the file is back")
    assert a.alive() and any(x["name"] == "keeps-going" for x in g.agents())
