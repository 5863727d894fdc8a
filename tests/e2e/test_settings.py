"""Settings in layers, for both binaries: `agentgate config defaults`, the config file of the
gateway and of the agent, and the precedence of file, environment and flags. Files are read
back with Python's own TOML parser."""

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

from conftest import BIN, http_get, wait_for
from proxies import HttpUpstream

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def run(*args, env=None, check=True) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    full_env.update(env or {})
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=check, env=full_env)


def test_printed_defaults_are_a_config_file_that_changes_nothing(tmp_path):
    text = run("config", "defaults").stdout
    printed = tomllib.loads(text)
    f = tmp_path / "gateway.toml"
    f.write_text(text)
    effective_default = tomllib.loads(run("server", "--print-config").stdout)
    effective_with_file = tomllib.loads(run("server", "--config", f, "--print-config").stdout)
    assert effective_with_file == effective_default
    # Each setting that has a default is printed with it (the unset ones commented out).
    for key, value in printed.items():
        assert effective_default[key] == value, key
    assert set(effective_default) - set(printed) <= {"backends"}
    # Every setting is explained: a comment block right above each key.
    for m in re.finditer(r"^#?([a-z0-9_]+) =", text, re.M):
        before = text[: m.start()].rstrip("\n").splitlines()[-1]
        assert before.startswith("# ") or before == "#[[backends]]", m.group(1)


def test_the_docs_table_names_exactly_the_settings_of_the_code():
    text = run("config", "defaults").stdout
    code = set(re.findall(r"^#?([a-z0-9_]+) =", text, re.M))
    assert "#[[backends]]" in text
    code.add("backends")
    agent = set(re.findall(r"^#?([a-z0-9_]+) =", run("config", "defaults", "--for", "agent").stdout, re.M))
    doc = DOCS.read_text()
    gateway_part, rest = doc.split("### `[[backends]]`")
    backends_part = rest.split("## Agent settings")[0]
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", gateway_part + backends_part, re.M))
    assert code - documented == set(), "settings missing from docs/configuration.md"
    assert documented - code == set(), "docs/configuration.md names settings the code lacks"
    # The agent's settings are the flags of `agentgate agent`.
    help_text = run("agent", "--help").stdout
    for name in agent:
        assert "--" + name.replace("_", "-").removesuffix("s") in help_text or \
            "--" + name.replace("_", "-") in help_text, name


def test_gateway_errors_name_the_setting_and_its_layer(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('listen = "127.0.0.1:1"\nshutdown_gracee = "5s"\n')
    out = run("server", "--config", f, check=False)
    assert out.returncode != 0
    assert 'unknown setting "shutdown_gracee"' in out.stderr and str(f) in out.stderr, out.stderr
    assert "`agentgate config defaults` lists" in out.stderr, out.stderr
    assert "panicked" not in out.stderr and "Error {" not in out.stderr
    # The agent's settings are listed by another command: the hint names it.
    a = tmp_path / "a.toml"
    a.write_text("bogus_key = 1\n")
    out = run("agent", "--config", a, "--server", "grpc://127.0.0.1:1", check=False)
    assert out.returncode != 0 and "`agentgate config defaults --for agent` lists" in out.stderr, out.stderr

    out = run("server", "--print-config", env={"AGENTGATE_MAX_CONNECTIONS": "lots"}, check=False)
    assert out.returncode != 0
    assert '"max_connections"' in out.stderr and "AGENTGATE_MAX_CONNECTIONS" in out.stderr, out.stderr

    out = run("server", "--set", "shutdown_grace=soon", "--print-config", check=False)
    assert out.returncode != 0 and "--set" in out.stderr and "shutdown_grace" in out.stderr

    out = run("server", "--config", tmp_path / "nope.toml", check=False)
    assert out.returncode != 0 and "cannot read config file" in out.stderr


def test_gateway_precedence_file_env_set_flags(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('max_connections = 11\nshutdown_grace = "11s"\nauth_timeout = "11s"\n'
                 'tunnel_wait = "11s"\ninternal_peers = ["10.0.0.0/8"]\n')
    env = {"AGENTGATE_SHUTDOWN_GRACE": "22s", "AGENTGATE_AUTH_TIMEOUT": "22s",
           "AGENTGATE_TUNNEL_WAIT": "22s", "AGENTGATE_INTERNAL_PEERS": "gw-1.internal, gw-2.internal"}
    out = run("server", "--config", f, "--set", "auth_timeout=33s", "--set", "tunnel_wait=33s",
              "--listen", "127.0.0.1:4444", "--print-config", env=env)
    c = tomllib.loads(out.stdout)
    assert c["max_connections"] == 11            # file
    assert c["shutdown_grace"] == "22s"          # env over file
    assert c["auth_timeout"] == "33s"            # --set over env
    assert c["internal_peers"] == ["gw-1.internal", "gw-2.internal"]  # a list from `a,b`
    assert c["listen"] == "127.0.0.1:4444"       # a flag over all


def test_an_agent_configured_by_its_file_alone_serves_requests_and_env_and_flags_win(env, tmp_path):
    """The agent's whole configuration in a TOML file; the environment and a flag override
    single settings of it, as `config defaults --for agent` says."""
    one, two = HttpUpstream("from-file"), HttpUpstream("from-env")
    try:
        g = env.gateway(tls=False)
        api = env.token("ops", kind="api")
        token_file = env.token_file("filed")
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            f'server = "{g.url("grpc")}"\n'
            f'token_file = "{token_file}"\n'
            f'upstreams = ["{one.url}"]\n'
            'pool_min_idle = 3\n'
            'keepalive_interval = "30s"\n')
        a = env.spawn([BIN, "agent", "--config", cfg], "agent-file")
        g.wait_agent("filed")
        # pool_min_idle = 3 from the file (the default is 2).
        wait_for(lambda: g.metric_total("agentgate_tunnels_parked") == 3, what="three parked tunnels")
        status, _, body = http_get(f"{g.api}/agents/filed/proxy/who",
                                   headers={"Authorization": f"Bearer {api}"})
        assert status == 200 and json.loads(body)["server"] == "from-file", body
        a.stop()

        # The environment beats the file; a flag beats the environment.
        a = env.spawn([BIN, "agent", "--config", cfg], "agent-env",
                      env={"AGENTGATE_AGENT_UPSTREAM": two.url})
        wait_for(lambda: _serves(g, api, "from-env"), what="the upstream from the environment")
        a.stop()
        a = env.spawn([BIN, "agent", "--config", cfg, "--upstream", one.url], "agent-flag",
                      env={"AGENTGATE_AGENT_UPSTREAM": two.url})
        wait_for(lambda: _serves(g, api, "from-file"), what="the upstream from the flag")
        a.stop()

        # A wrong key in the agent's file is refused with its name and the file.
        cfg.write_text(cfg.read_text() + "pool_minidle = 2\n")
        out = run("agent", "--config", cfg, check=False)
        assert out.returncode != 0 and 'unknown setting "pool_minidle"' in out.stderr, out.stderr
        assert str(cfg) in out.stderr
    finally:
        one.close()
        two.close()


def test_agent_worker_threads_from_file_env_and_flag(env, tmp_path):
    """`worker_threads` sizes the agent's runtime, which says how many workers it runs in its
    start line; one worker serves requests from a client we did not write (curl)."""
    up = HttpUpstream("one-worker")
    try:
        g = env.gateway(tls=False)
        api = env.token("ops", kind="api")
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'server = "{g.url("grpc")}"\n'
                       f'token_file = "{env.token_file("filed")}"\n'
                       f'upstreams = ["{up.url}"]\n'
                       'worker_threads = 1\n')
        a = env.spawn([BIN, "agent", "--config", cfg], "agent-one-worker")
        g.wait_agent("filed")
        assert re.search(r"agent starting.*worker_threads=1\b", a.output()), a.output()
        out = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {api}",
                              f"{g.api}/agents/filed/proxy/who"],
                             capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(out.stdout)["server"] == "one-worker", out.stdout
        a.stop()

        # The environment beats the file, a flag beats the environment.
        a = env.spawn([BIN, "agent", "--config", cfg], "agent-env-workers",
                      env={"AGENTGATE_AGENT_WORKER_THREADS": "3"})
        wait_for(lambda: "agent starting" in a.output(), what="the agent's start line")
        assert re.search(r"agent starting.*worker_threads=3\b", a.output()), a.output()
        a.stop()
        a = env.spawn([BIN, "agent", "--config", cfg, "--worker-threads", "2"], "agent-flag-workers",
                      env={"AGENTGATE_AGENT_WORKER_THREADS": "3"})
        wait_for(lambda: "agent starting" in a.output(), what="the agent's start line")
        assert re.search(r"agent starting.*worker_threads=2\b", a.output()), a.output()
        a.stop()

        # Zero is refused with the setting's name, not a panic.
        cfg.write_text(cfg.read_text().replace("worker_threads = 1", "worker_threads = 0"))
        out = run("agent", "--config", cfg, check=False)
        assert out.returncode != 0 and "worker_threads" in out.stderr, out.stderr
        assert "panicked" not in out.stderr, out.stderr
        # So is a TOKIO_WORKER_THREADS that is not a number (tokio itself would panic on it).
        out = run("server", "--print-config", env={"TOKIO_WORKER_THREADS": "lots"}, check=False)
        assert out.returncode == 2 and "TOKIO_WORKER_THREADS must be a number" in out.stderr, out.stderr
        assert "panicked" not in out.stderr, out.stderr
    finally:
        up.close()


def _serves(g, api: str, tag: str) -> bool:
    status, _, body = http_get(f"{g.api}/agents/filed/proxy/who",
                               headers={"Authorization": f"Bearer {api}"})
    return status == 200 and json.loads(body)["server"] == tag


def test_help_shows_the_defaults_of_the_settings():
    server = run("server", "--help").stdout
    assert re.search(r"--listen <LISTEN>\s+Agent port.*\[default: 127\.0\.0\.1:8150\]", server)
    agent = run("agent", "--help").stdout
    assert re.search(r"--pool-max <POOL_MAX>\s+.*\[default: 500\]", agent)
    assert re.search(r"--keepalive-interval <KEEPALIVE_INTERVAL>\s+.*\[default: 55s\]", agent)
    # Grouped by what they are for.
    for heading in ("Gateway:", "Upstreams (services next to the agent):", "Tunnel pool:"):
        assert heading in agent


def test_print_config_shows_the_name_a_backend_is_known_by():
    """--print-config is the effective configuration: a backend given no name shows the one
    logs and metrics use (its first prefix without the dot)."""
    printed = tomllib.loads(run("server", "--backend", "runner.jobs.v1.=http://127.0.0.1:9",
                                "--set", 'backends=[{services=["b.v1."], url="http://127.0.0.1:8"}]',
                                "--print-config").stdout)
    assert sorted(b["name"] for b in printed["backends"]) == ["b.v1", "runner.jobs.v1"], printed["backends"]


def test_output_to_a_closed_pipe_or_a_full_disk_is_not_a_panic(tmp_path):
    """`agentgate completions bash | head -2` panicked (the reader went first), and so did
    `config defaults > /dev/full`. A reader that went away wanted no more: exit 0, quietly; a
    write that fails otherwise is an error with a sentence."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTGATE_")}
    env["RUST_BACKTRACE"] = "1"
    for args in (["completions", "bash"], ["config", "defaults"], ["man", "--help"]):
        p = subprocess.Popen([str(BIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        p.stdout.read(16)
        p.stdout.close()  # the reader goes first
        err = p.stderr.read().decode()
        assert p.wait(timeout=20) == 0 and "panicked" not in err, (args, err)
    with open("/dev/full", "w") as full:
        out = subprocess.run([str(BIN), "config", "defaults"], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=20, env=env)
    assert out.returncode == 2 and "panicked" not in out.stderr, out.stderr
    assert "cannot write to standard output: No space left on device" in out.stderr, out.stderr
