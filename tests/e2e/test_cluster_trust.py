"""Cluster mode you can trust (issue 16): what a party that sees or writes internal traffic,
or writes to Redis, can and cannot do.

- A client we did not write (PyJWT for the token, Python's `h2` for HTTP/2 with trailers)
  speaks the internal protocol from docs/cluster.md: a correct call is served, and a replayed,
  re-targeted, head-swapped or body-swapped one is refused, with the swapped body never
  reaching the agent's upstream whole.
- A foreign URL planted in Redis under an agent's key receives nothing from a replica with an
  allowlist; a replica without one sends it a token that opens no other replica.
- With TLS (and client certificates) on the internal port, cleartext is refused and replicas
  still serve each other's agents.
- Start-up errors name what is wrong.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

import raw_h2
from cluster_helpers import Redis, body_mac, head_digest, internal_call, sign_call, write_secret
from conftest import BIN, free_port, make_certs, wait_for
from proxies import HttpUpstream, port_open


class Recorder:
    """An upstream that records every request it read whole: (method, path, body)."""

    def __init__(self, tag: str):
        rec = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                if len(body) < n:
                    return  # the client went away before the body was whole
                with rec.lock:
                    rec.seen.append((self.command, self.path, body))
                out = json.dumps({"tag": tag, "path": self.path, "len": len(body)}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = do_PUT = _any

        self.lock = threading.Lock()
        self.seen: list = []
        self.server = HttpUpstream(tag, handler=H)
        self.url = self.server.url

    def close(self):
        self.server.close()


def replica(env, name, redis, secret_file, scheme="http", extra=()):
    port = free_port()
    url = f"{scheme}://127.0.0.1:{port}"
    g = env.gateway(tls=False, cleartext=False, name=name, extra=[
        "--redis", redis.url, "--internal-listen", f"127.0.0.1:{port}", "--internal-url", url,
        "--internal-secret-file", str(secret_file), *extra])
    wait_for(lambda: port_open(port), timeout=10, what=f"{name} internal API")
    g.internal_port, g.internal_url = port, url
    return g


def replicas_sharing_an_agent(env, redis, secret_file, upstream, path, extra=()):
    """Replicas r1 and r2 on `redis`, agent `pinned` on r2 in front of `upstream`; returns
    (r1, r2, an API token) once r1 reaches the agent at `path` through the registry."""
    r1 = replica(env, "r1", redis, secret_file, extra=extra)
    r2 = replica(env, "r2", redis, secret_file, extra=extra)
    api = pin_agent(env, r2, upstream)
    wait_for(lambda: api_get(r1, api, "pinned", path)[0] == 200, timeout=20,
             what="r1 reaching the agent on r2 through the registry")
    return r1, r2, api


def api_get(g, token, agent, path):
    import urllib.request
    req = urllib.request.Request(f"{g.api}/agents/{agent}/proxy{path}",
                                 headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def pin_agent(env, r2, rec) -> str:
    """Agent `pinned` connected to replica r2 with `rec` as its upstream; returns an API
    token for callers."""
    env.agent(f"grpc://127.0.0.1:{r2.port}", env.token_file("pinned"), name="agent-pinned",
              extra=["--upstream", rec.url])
    r2.wait_agent("pinned")
    return env.token("caller", kind="api")


@pytest.fixture
def pair(env):
    """Two replicas sharing Redis; agent `pinned` connected straight to the second one."""
    redis = Redis(env)
    secret_file, secret = write_secret(env)
    rec = Recorder("pinned-upstream")
    r1 = replica(env, "r1", redis, secret_file)
    r2 = replica(env, "r2", redis, secret_file)
    api = pin_agent(env, r2, rec)
    wait_for(lambda: api_get(r1, api, "pinned", "/warm")[0] == 200, timeout=20,
             what="r1 reaching the agent on r2")
    try:
        yield redis, secret, r1, r2, rec, api
    finally:
        rec.close()


def reserve(r, secret, agent="pinned"):
    path = f"/internal/v1/agents/{agent}/reserve?wait_ms=3000"
    status, body = internal_call(r.internal_port, "POST", path,
                                 sign_call(secret, r.internal_url, "POST", path, agent=agent))
    assert status == 200, (status, body)
    return int(body)


def release(r, secret, rid):
    path = f"/internal/v1/reservations/{rid}/release"
    status, _ = internal_call(r.internal_port, "POST", path, sign_call(secret, r.internal_url, "POST", path))
    assert status == 204


def forwarded_request(r, secret, rid, body_chunks, mac_over=None, agent="pinned",
                      signed_path="/upload?n=1", sent_path="/upload?n=1", route=None):
    """The /request call as another replica sends it, through reservation `rid` or on the
    one-call `route`; returns the raw HTTP/2 answer."""
    path = route or f"/internal/v1/reservations/{rid}/request"
    body = b"".join(body_chunks)
    head = [("agentgate-request-kind", "1"), ("agentgate-upstream", "default"),
            ("agentgate-path", signed_path), ("agentgate-timeout-ms", "0"),
            ("content-type", "text/plain"), ("content-length", str(len(body)))]
    jti = "e2e" + str(time.monotonic_ns())
    token = sign_call(secret, r.internal_url, "POST", path, agent=agent, hd=head_digest(head), jti=jti)
    sent_head = [(k, sent_path if k == "agentgate-path" else v) for k, v in head]
    c = raw_h2.RawH2(r.internal_port)
    try:
        sid = c.request(path, sent_head + [("agentgate-internal-token", token)], body=None,
                        end=False, grpc=False, authority=f"127.0.0.1:{r.internal_port}")
        for chunk in body_chunks:
            c.conn.send_data(sid, chunk, end_stream=False)
            c.flush()
            time.sleep(0.05)
        mac = body_mac(secret, jti, mac_over if mac_over is not None else body)
        c.conn.send_headers(sid, [("agentgate-body-mac", mac)], end_stream=True)
        c.flush()
        c.pump(lambda: c.answers[sid].ended, timeout=15)
        return c.answers[sid]
    finally:
        c.close()


def test_a_foreign_client_speaks_the_internal_protocol_and_every_tampered_call_is_refused(pair):
    redis, secret, r1, r2, rec, api = pair
    rejected0 = r2.metric_total("agentgate_internal_rejected_total")

    # As documented: served, the body reaches the agent's upstream whole.
    a = forwarded_request(r2, secret, reserve(r2, secret), [b"hello ", b"from a foreign replica"])
    assert a.headers.get(":status") == "200", a
    assert json.loads(a.data)["len"] == len(b"hello from a foreign replica")
    assert ("POST", "/upload?n=1", b"hello from a foreign replica") in rec.seen

    # Body swapped in flight (the MAC is over the original): the last bytes are held back, the
    # request is aborted, and the upstream never reads the swapped body whole.
    before = len(rec.seen)
    a = forwarded_request(r2, secret, reserve(r2, secret), [b"EVIL!! ", b"swapped in flight!!!!!"],
                          mac_over=b"hello from a foreign replica")
    assert a.headers.get(":status") != "200" or a.reset is not None or b"tag" not in a.data, a
    time.sleep(1)
    assert len(rec.seen) == before, rec.seen[before:]
    wait_for(lambda: r2.metric("agentgate_internal_rejected_total", reason="body_mac") >= 1,
             timeout=10, what="the body MAC refusal counted")

    # Head swapped (the token names /upload, the call asks for /admin): 401, and the
    # reservation it did not get to use goes back.
    rid = reserve(r2, secret)
    a = forwarded_request(r2, secret, rid, [b"x"], sent_path="/admin")
    assert a.headers.get(":status") == "401" and b"another request head" in a.data, a
    release(r2, secret, rid)

    # A token for another agent cannot claim this agent's reservation.
    a = forwarded_request(r2, secret, reserve(r2, secret), [b"x"], agent="someone-else")
    assert a.headers.get(":status") == "401", a
    # Replayed: the same signed reserve call twice.
    path = "/internal/v1/agents/pinned/reserve?wait_ms=100"
    t = sign_call(secret, r2.internal_url, "POST", path, agent="pinned")
    status, body = internal_call(r2.internal_port, "POST", path, t)
    assert status == 200
    release(r2, secret, int(body))
    status, body = internal_call(r2.internal_port, "POST", path, t)
    assert status == 401 and b"already used" in body, body
    # Re-targeted: a token for r1 presented to r2.
    t = sign_call(secret, r1.internal_url, "POST", path, agent="pinned")
    status, body = internal_call(r2.internal_port, "POST", path, t)
    assert status == 401 and b"another replica" in body, body
    assert r2.metric_total("agentgate_internal_rejected_total") - rejected0 >= 5
    # Nothing above hurt the agent: callers through either replica are served.
    assert api_get(r1, api, "pinned", "/after")[0] == 200
    assert api_get(r2, api, "pinned", "/after")[0] == 200


def test_a_request_without_a_body_crosses_in_one_call_and_one_with_a_body_reserves_first(pair):
    """docs/cluster.md, the routes: a GET for the agent on the other replica is sent there in
    one call (no reservation), a POST with a body reserves a tunnel first; both reach the
    upstream whole. A foreign client on the one-call route is served, and refused when its
    token names another agent than the path or is replayed."""
    redis, secret, r1, r2, rec, api = pair

    def sent(route):
        return r1.metric("agentgate_forwards_sent_total", route=route)

    direct0, reserved0 = sent("direct"), sent("reserved")
    for i in range(3):
        status, body = api_get(r1, api, "pinned", f"/one-call-{i}")
        assert status == 200 and json.loads(body)["path"] == f"/one-call-{i}", (status, body)
    assert (sent("direct") - direct0, sent("reserved") - reserved0) == (3, 0)

    import urllib.request
    req = urllib.request.Request(f"{r1.api}/agents/pinned/proxy/with-body", data=b"b" * 5000,
                                 headers={"authorization": f"Bearer {api}"}, method="POST")
    with urllib.request.urlopen(req, timeout=20) as resp:
        assert json.loads(resp.read())["len"] == 5000
    assert (sent("direct") - direct0, sent("reserved") - reserved0) == (3, 1)
    assert ("GET", "/one-call-0", b"") in rec.seen and ("POST", "/with-body", b"b" * 5000) in rec.seen

    # A client we did not write, on the one-call route.
    route = "/internal/v1/agents/pinned/request"
    a = forwarded_request(r2, secret, None, [], signed_path="/foreign", sent_path="/foreign",
                          route=route)
    assert a.headers.get(":status") == "200", a
    assert a.headers.get("agentgate-internal-route") == "agent-request", a.headers
    assert ("POST", "/foreign", b"") in rec.seen
    wrong0 = r2.metric("agentgate_internal_rejected_total", reason="wrong_route")
    a = forwarded_request(r2, secret, None, [], agent="someone-else", route=route)
    assert a.headers.get(":status") == "401", a
    assert r2.metric("agentgate_internal_rejected_total", reason="wrong_route") == wrong0 + 1
    # An agent this replica does not hold: the sender is told to wait for it elsewhere.
    a = forwarded_request(r2, secret, None, [], agent="elsewhere",
                          route="/internal/v1/agents/elsewhere/request")
    assert a.headers.get("agentgate-forward-error") == "not_connected", a.headers
    assert json.loads(a.data)["outcome"] == "not_connected", a.data


class FakeReplica:
    """Something that wrote its own URL into Redis: an HTTP/2 (h2c) server, on Python's `h2`,
    that records the path and token of every call reaching it and answers 404."""

    def __init__(self):
        import h2.config
        import h2.connection
        import h2.events

        self.calls: list = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

        def serve(conn):
            h = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h.initiate_connection()
            conn.sendall(h.data_to_send())
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    for ev in h.receive_data(data):
                        if isinstance(ev, h2.events.RequestReceived):
                            hs = {k.decode() if isinstance(k, bytes) else k:
                                  v.decode() if isinstance(v, bytes) else v for k, v in ev.headers}
                            self.calls.append((hs.get(":path"), hs.get("agentgate-internal-token")))
                            h.send_headers(ev.stream_id, [(":status", "404"), ("content-length", "0")],
                                           end_stream=True)
                    conn.sendall(h.data_to_send())
            except OSError:
                return
            finally:
                conn.close()

        def accept():
            while True:
                try:
                    c, _ = self.sock.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(c,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def close(self):
        self.sock.close()


def test_a_foreign_url_planted_in_redis_receives_nothing_from_an_allowlisting_replica(env):
    redis = Redis(env)
    secret_file, secret = write_secret(env)
    rec, fake = Recorder("pinned-upstream"), FakeReplica()
    try:
        p1, p2 = free_port(), free_port()
        urls = [f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"]
        allow = ["--set", f"internal_peers={json.dumps(urls)}"]

        def rep(name, port, extra):
            g = env.gateway(tls=False, cleartext=False, name=name, extra=[
                "--redis", redis.url, "--internal-listen", f"127.0.0.1:{port}",
                "--internal-url", f"http://127.0.0.1:{port}", "--internal-secret-file",
                str(secret_file), *extra])
            g.internal_port, g.internal_url = port, f"http://127.0.0.1:{port}"
            return g
        r1, r2 = rep("r1", p1, allow), rep("r2", p2, allow)
        open_one = rep("r3-no-allowlist", free_port(), [])
        api = pin_agent(env, r2, rec)
        wait_for(lambda: redis.hgetall("agentgate:agent:pinned"), what="the agent in Redis")
        # Planted: the fake's URL under the agent's key, never expiring, like a replica's field.
        redis.cli("HSET", "agentgate:agent:pinned", fake.url, str(int(time.time() * 1000) + 3_600_000))

        for i in range(5):
            status, body = api_get(r1, api, "pinned", f"/via-r1-{i}")
            assert status == 200, (status, body)
        assert fake.calls == [], "the allowlisting replica sent the planted URL a call"
        assert r1.metric("agentgate_cluster_peers_refused_total") >= 1
        assert "matches no internal_peers entry" in r1.proc.output()

        # Without an allowlist the planted URL does get a call, but its token opens nothing else.
        wait_for(lambda: api_get(open_one, api, "pinned", "/via-r3")[0] == 200 and fake.calls,
                 timeout=20, what="the replica without an allowlist calling the planted URL")
        stolen_path, stolen = fake.calls[0]
        status, body = internal_call(r2.internal_port, "POST", stolen_path, stolen)
        assert status == 401 and b"another replica" in body, (status, body)
        assert "internal_peers is empty" in open_one.proc.output()
    finally:
        rec.close()
        fake.close()


def test_a_peer_without_the_one_call_route_gets_a_reservation_and_its_404_is_not_an_answer(env):
    """A replica of an older version answers the one-call route with 404 and no
    `agentgate-internal-route` header (the fake stands in for it): the sender reserves first
    instead, and that 404 never reaches the caller as if the agent's upstream had said it."""
    redis = Redis(env)
    secret_file, _ = write_secret(env)
    fake = FakeReplica()
    try:
        env.token("ghost")  # a known agent, connected nowhere but (says Redis) at the fake
        api = env.token("caller", kind="api")
        r1 = replica(env, "r1", redis, secret_file)
        redis.cli("HSET", "agentgate:agent:ghost", fake.url, str(int(time.time() * 1000) + 3_600_000))
        status, body = api_get(r1, api, "ghost", "/x")
        assert status == 503 and b"not connected" in body, (status, body)
        paths = [p for p, _ in fake.calls]
        assert paths[:2] == ["/internal/v1/agents/ghost/request",
                             "/internal/v1/agents/ghost/reserve?wait_ms=10000"], paths
    finally:
        fake.close()


def test_tls_and_client_certificates_on_the_internal_port(env):
    pki = make_certs(env.tmp / "internal-pki", eku="serverAuth,clientAuth")
    redis = Redis(env)
    secret_file, secret = write_secret(env)
    rec = Recorder("pinned-upstream")
    tls = ["--set", f'internal_tls_cert="{pki["cert"]}"', "--set", f'internal_tls_key="{pki["key"]}"',
           "--set", f'internal_ca_cert="{pki["ca"]}"', "--set", "internal_require_client_cert=true"]
    try:
        r1 = replica(env, "r1", redis, secret_file, scheme="https", extra=tls)
        r2 = replica(env, "r2", redis, secret_file, scheme="https", extra=tls)
        api = pin_agent(env, r2, rec)
        wait_for(lambda: api_get(r1, api, "pinned", "/over-mtls")[0] == 200, timeout=20,
                 what="r1 reaching the agent on r2 over mutual TLS")
        assert r1.metric("agentgate_forwards_total", outcome="ok") >= 1

        # Cleartext HTTP/1.1 to the internal port gets no HTTP answer.
        with socket.create_connection(("127.0.0.1", r1.internal_port), timeout=5) as s:
            s.sendall(b"GET /internal/v1/agents HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                got = s.recv(100)
            except (ConnectionResetError, socket.timeout):
                got = b""
        assert not got.startswith(b"HTTP/"), got
        # TLS without a client certificate: refused at the handshake (TLS 1.3 reports it on
        # the first read).
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with socket.create_connection(("127.0.0.1", r1.internal_port), timeout=5) as s, \
                    ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                t.sendall(b"GET /internal/v1/agents HTTP/1.1\r\nHost: x\r\n\r\n")
                if not t.recv(100):
                    raise ConnectionResetError("closed")
        # With a client certificate, a call still needs a signed token.
        ctx.load_cert_chain(str(pki["cert"]), str(pki["key"]))
        with socket.create_connection(("127.0.0.1", r1.internal_port), timeout=5) as s, \
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(b"GET /internal/v1/agents HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = t.recv(200)
        assert answer.startswith(b"HTTP/1.1 401"), answer
    finally:
        rec.close()


@pytest.mark.parametrize("extra,words", [
    (["--internal-url", "grpc://127.0.0.1:8155"], "must be http://"),
    (["--internal-url", "https://127.0.0.1:8155"], "has no certificate"),
    (["--set", 'internal_peers=["bad host!"]'], "neither a CIDR"),
    (["--set", 'internal_peers=["https://*.svc:99999"]'], "neither a CIDR"),
    (["--set", 'internal_peers=["ftp://gw-*.internal"]'], "neither a CIDR"),
    (["--set", "internal_require_client_cert=true"], "internal_require_client_cert needs"),
    (["--set", "redis_required_at_start=true", "--set", 'redis_startup_timeout="1s"'],
     "Redis did not answer"),
], ids=["grpc-scheme", "https-without-cert", "bad-allowlist", "bad-allowlist-port", "bad-allowlist-scheme",
        "mtls-without-ca", "redis-required"])
def test_bad_cluster_settings_stop_the_start_with_a_sentence(env, extra, words):
    secret_file, _ = write_secret(env)
    dead = free_port()
    r = subprocess.run([str(BIN), "server", "--listen", f"127.0.0.1:{free_port()}",
                        "--admin-listen", f"127.0.0.1:{free_port()}", "--api-listen",
                        f"127.0.0.1:{free_port()}", "--tokens", str(env.tokens),
                        "--redis", f"redis://127.0.0.1:{dead}/0", "--internal-listen",
                        f"127.0.0.1:{free_port()}", "--internal-secret-file", str(secret_file),
                        *extra], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stderr
    assert words in r.stderr, r.stderr
    assert "panicked" not in r.stderr


def test_a_wrong_redis_password_is_said_at_once_and_in_one_sentence(env):
    """Redis answers, and refuses the password: with redis_required_at_start the gateway
    waited the whole redis_startup_timeout and said "Redis did not answer (... - AuthenticationFailed)".
    It now stops at once with a sentence. And a running replica's refused calls are one
    sentence too, not the library's list of every pipelined command."""
    redis = Redis(env)
    assert redis.cli("CONFIG", "SET", "requirepass", "right-password") == "OK"
    secret_file, _ = write_secret(env)
    base = [str(BIN), "server", "--listen", f"127.0.0.1:{free_port()}", "--admin-listen",
            f"127.0.0.1:{free_port()}", "--api-listen", f"127.0.0.1:{free_port()}", "--tokens",
            str(env.tokens), "--internal-listen", f"127.0.0.1:{free_port()}",
            "--internal-secret-file", str(secret_file)]
    t0 = time.monotonic()
    r = subprocess.run(base + ["--redis", f"redis://:wrong@127.0.0.1:{redis.port}/0",
                               "--set", "redis_required_at_start=true", "--set", 'redis_startup_timeout="20s"'],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and time.monotonic() - t0 < 10, (time.monotonic() - t0, r.stderr)
    assert "Redis refused the password" in r.stderr, r.stderr
    for internal in ("AuthenticationFailed", "Pipeline failure", "did not answer"):
        assert internal not in r.stderr, r.stderr
    # Without a password at all: NOAUTH on each call, in one sentence.
    g = env.gateway(tls=False, extra=["--redis", f"redis://127.0.0.1:{redis.port}/0",
                                      "--internal-listen", f"127.0.0.1:{free_port()}",
                                      "--internal-secret-file", str(secret_file)])
    wait_for(lambda: "Redis refused the call: NOAUTH" in g.proc.output(), timeout=15,
             what="the refusal in the log")
    line = next(x for x in g.proc.output().splitlines() if "NOAUTH" in x)
    assert "check the password" in line and "Pipeline failure" not in line, line


def test_a_short_secret_stops_the_start_with_a_sentence(env):
    short = env.tmp / "short-secret"
    short.write_text("only-16-bytes!!!\n")
    r = subprocess.run([str(BIN), "server", "--tokens", str(env.tokens), "--redis",
                        "redis://127.0.0.1:1/0", "--internal-secret-file", str(short),
                        "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "at least 32" in r.stderr, r.stderr


def test_redis_as_operators_run_it_tls_and_an_acl_user(env, tmp_path):
    """rediss:// with a private CA (redis_ca_cert) and an ACL user with a password in the URL:
    replicas register and reach each other's agents, and the password never shows in a log."""
    pki = make_certs(tmp_path / "redis-pki")
    port = free_port()
    password = "s3cret-redis-password"
    conf = tmp_path / "redis.conf"
    conf.write_text(
        f"port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {pki['cert']}\n"
        f"tls-key-file {pki['key']}\ntls-ca-cert-file {pki['ca']}\ntls-auth-clients no\n"
        f"save \"\"\nappendonly no\ndir {tmp_path}\nuser default off\n"
        f"user agentgate on >{password} ~agentgate:* +@all\n")
    srv = env.spawn(["redis-server", str(conf)], "redis-tls")
    wait_for(lambda: port_open(port), what="redis over TLS")

    class TlsRedis:
        url = f"rediss://agentgate:{password}@localhost:{port}/0"
    secret_file, _ = write_secret(env)
    rec = Recorder("pinned-upstream")
    try:
        ca = ["--set", f'redis_ca_cert="{pki["ca"]}"', "--set", "redis_required_at_start=true"]
        r1, r2, api = replicas_sharing_an_agent(env, TlsRedis, secret_file, rec, "/via-rediss",
                                                extra=ca)
        for g in (r1, r2):
            assert g.metric("agentgate_redis_ops_total", op="lookup", outcome="ok") + \
                g.metric("agentgate_registry_writes_total") > 0
            assert password not in g.proc.output()
        assert srv.alive()
    finally:
        rec.close()
