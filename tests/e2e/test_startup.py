"""What the gateway checks at start, so a misconfiguration fails early with a sentence instead
of running badly: a token store that is not there, an open-file limit too low for
max_connections."""

from __future__ import annotations

import resource
import subprocess

from conftest import BIN, free_port, wait_for


def server_args(env, tokens) -> list[str]:
    return [str(BIN), "server", "--listen", f"127.0.0.1:{free_port()}",
            "--admin-listen", f"127.0.0.1:{free_port()}", "--api-listen", f"127.0.0.1:{free_port()}",
            "--tokens", str(tokens)]


def test_a_missing_token_store_stops_the_gateway_unless_allowed(env):
    typo = env.tmp / "tokns.json"
    out = subprocess.run(server_args(env, typo), capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    err = out.stderr
    assert "does not exist" in err and "token create" in err and str(typo) in err, err
    assert "panicked" not in err and "Error {" not in err, err
    # Asked for: it starts, and says every agent is refused until a token exists.
    log = env.tmp / "allowed.log"
    with open(log, "w") as f:
        p = subprocess.Popen(server_args(env, typo) + ["--set", "tokens_may_be_missing=true"],
                             stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "holds no tokens" in log.read_text(), timeout=10,
                 what="the warning about an empty store")
        assert p.poll() is None, log.read_text()[-2000:]
    finally:
        p.terminate()
        p.wait(timeout=20)

def test_bad_certificate_files_are_named_in_words_once(env):
    """Each TLS file problem is one sentence saying what is wrong, never a library's debug text
    (a byte list, `KeyMismatch`) and never the same cause twice."""
    tokens = env.tmp / "tokens.json"
    subprocess.run([str(BIN), "token", "create", "--name", "x", "--tokens", str(tokens)],
                   check=True, capture_output=True)
    other_key = env.tmp / "other.key"
    subprocess.run(["openssl", "genrsa", "-out", str(other_key), "2048"], check=True, capture_output=True)
    half = env.tmp / "half.crt"
    half.write_bytes(open(env.certs["cert"], "rb").read()[:300])
    not_pem = env.tmp / "not-pem.key"
    not_pem.write_text("not a key\n")
    cases = [
        (env.certs["cert"], other_key, "the private key does not belong to the certificate"),
        (env.tmp / "nope.crt", env.certs["key"], "cannot read certificates from"),
        (half, env.certs["key"], "a PEM section has no END line"),
        (env.certs["cert"], not_pem, "holds no private key in PEM format"),
    ]
    for cert, key, want in cases:
        out = subprocess.run(server_args(env, tokens) + ["--tls-cert", str(cert), "--tls-key", str(key)],
                             capture_output=True, text=True, timeout=20)
        err = out.stderr
        assert out.returncode != 0 and want in err, (want, err)
        for debug in ("KeyMismatch", "[45, 45", "Error {", "no items found", "I/O error"):
            assert debug not in err, (debug, err)
        assert err.count("No such file") <= 1, err


def test_a_low_open_file_limit_is_raised_or_named(env):
    """Started under a soft limit of 256 with a hard limit of 4096: the gateway raises the soft
    limit to the hard one; with max_connections above what that allows, it says what to set."""

    def limited():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    p = subprocess.Popen(server_args(env, env.tokens) + ["--set", "max_connections=18000"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=limited)
    try:
        def raised():
            if p.poll() is not None:
                raise AssertionError(f"the gateway exited ({p.returncode}): {p.stdout.read()[-2000:]}")
            return open(f"/proc/{p.pid}/limits").read().count("4096") >= 2

        wait_for(raised, timeout=20, what="the soft limit raised to the hard one")
        limits = [line for line in open(f"/proc/{p.pid}/limits") if line.startswith("Max open files")]
        assert limits and limits[0].split()[3:5] == ["4096", "4096"], limits
    finally:
        p.terminate()
        out = p.communicate(timeout=20)[0]
    assert "LimitNOFILE=19024" in out and "max_connections" in out, out[-2000:]


def test_a_bad_log_filter_is_an_error_not_a_silent_info(env):
    out = subprocess.run([str(BIN), "--log", "agentgate=verbose", "server", "--tokens", str(env.tokens)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out
    assert "is not a log filter" in out.stderr and "agentgate=verbose" in out.stderr, out.stderr


def test_a_fatal_error_in_json_logging_is_one_json_line(env):
    import json
    import re
    out = subprocess.run([str(BIN), "--log-format", "json", "server", "--tokens", str(env.tmp / "no.json")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 2, out
    last = json.loads(out.stderr.strip().splitlines()[-1])
    assert last["level"] == "ERROR" and "does not exist" in last["message"], last
    # Stamped like the log's other JSON lines.
    first = json.loads(out.stderr.strip().splitlines()[0])
    assert {"timestamp", "level", "message", "target"} <= set(first) & set(last), (first, last)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", last["timestamp"]), last


def test_an_unknown_agentgate_variable_is_named(env):
    import os
    out = subprocess.run([str(BIN), "server", "--tokens", str(env.tokens), "--print-config"],
                         capture_output=True, text=True, timeout=20,
                         env={**os.environ, "AGENTGATE_MAX_CONECTIONS": "5"})
    assert out.returncode == 0, out
    assert "AGENTGATE_MAX_CONECTIONS" in out.stderr and "unknown setting" in out.stderr, out.stderr


def test_the_agent_outlives_a_closed_log_pipe(env):
    """An agent whose stderr reader goes away keeps running (a panic used to end it with 101)."""
    import os
    import time
    g = env.gateway(tls=False, cleartext=False)
    bad = env.tmp / "bad.token"
    bad.write_text("aga_not-a-real-token\n")  # refused: the agent logs on every attempt
    r, w = os.pipe()
    p = subprocess.Popen([str(BIN), "agent", "--server", g.url("grpc"), "--token-file", str(bad),
                          "--backoff-initial", "50ms", "--backoff-max", "100ms"],
                         stdout=subprocess.DEVNULL, stderr=w)
    os.close(w)
    try:
        assert os.read(r, 200), "the agent logs"
        os.close(r)
        time.sleep(2)
        assert p.poll() is None, f"the agent exited with {p.returncode} once its stderr closed"
    finally:
        p.terminate()
        assert p.wait(timeout=10) == 0


def test_the_agents_health_and_metrics_endpoint(env):
    """`agent --metrics-listen`: /healthz while it runs, /readyz 200 only while registered (with
    the transport), /metrics with the connected gauge; the gateway gone turns readiness off."""
    from conftest import http_get
    g = env.gateway(tls=True, cleartext=False)
    port = free_port()
    env.agent(g.url("wss", "/agent"), env.token_file("probed"),
              extra=["--metrics-listen", f"127.0.0.1:{port}", "--transport", "websocket",
                     "--backoff-initial", "200ms", "--backoff-max", "500ms"], name="agent-probed")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: http_get(base + "/readyz", timeout=2)[0] == 200, timeout=15, what="the agent ready")
    assert b"wss" in http_get(base + "/readyz")[2]
    assert http_get(base + "/healthz")[0] == 200
    text = http_get(base + "/metrics")[2].decode()
    assert 'agentgate_agent_connected{transport="wss"} 1' in text, text
    assert 'agentgate_agent_connected{transport="grpc"} 0' in text, text
    g.proc.stop()
    wait_for(lambda: http_get(base + "/readyz", timeout=2)[0] == 503, timeout=15,
             what="readiness off once the gateway is gone")
    assert http_get(base + "/healthz")[0] == 200
    text = http_get(base + "/metrics")[2].decode()
    assert 'agentgate_agent_connected{transport="wss"} 0' in text, text
    assert "agentgate_agent_disconnects_total 1" in text, text


def test_a_full_file_table_turns_readiness_off_and_is_counted(env):
    """Under a hard limit of 96 open files, 120 idle connections to the agent port exhaust the
    table: accepts fail, /readyz says why with 503, the failures are counted and logged at most
    about once a second; once the connections are gone, the gateway is ready again."""
    import socket
    import time
    from conftest import http_get

    def limited():
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    admin, port = free_port(), free_port()
    log = env.tmp / "full.log"
    with open(log, "w") as f:
        p = subprocess.Popen([str(BIN), "server", "--listen", f"127.0.0.1:{port}",
                              "--admin-listen", f"127.0.0.1:{admin}", "--api-listen", f"127.0.0.1:{free_port()}",
                              "--tokens", str(env.tokens), "--set", 'handshake_timeout="30s"',
                              "--set", "max_handshakes_per_source=1000"],
                             stdout=f, stderr=subprocess.STDOUT, preexec_fn=limited)
    socks = []
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200, timeout=10,
                 what="ready")
        for _ in range(120):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            socks.append(s)
        time.sleep(1.5)
        # Make room for the probes' own connections: close every agent-port socket (closing
        # only some lets the gateway accept more of them from the listen backlog), then ask at
        # once, well within the 5 s that a failed accept keeps readiness off.
        for s in socks:
            s.close()
        socks.clear()
        status, _, body = http_get(f"http://127.0.0.1:{admin}/readyz", timeout=5)
        assert status == 503 and b"Too many open files" in body, (status, body)
        metrics = http_get(f"http://127.0.0.1:{admin}/metrics", timeout=5)[2].decode()
        errors = float(next(line.split()[1] for line in metrics.splitlines()
                            if line.startswith("agentgate_accept_errors_total ")))
        assert errors > 0, metrics[-500:]
        lines = [x for x in log.read_text().splitlines() if "accept failed" in x]
        assert 1 <= len(lines) <= 4, f"{len(lines)} accept-failure lines in ~2 s"
        wait_for(lambda: http_get(f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200, timeout=15,
                 what="ready again once the connections are gone")
        assert p.poll() is None
    finally:
        for s in socks:
            s.close()
        p.terminate()
        p.wait(timeout=20)
