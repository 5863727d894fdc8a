"""The Debian package, as an operator meets it: built with cargo-deb (scripts/build-deb),
installed with `dpkg -i`, its units checked with `systemd-analyze verify`, and the packaged
binary run with the command line, user and limits of its own units, serving one tunnelled
request from a curl caller to a Python upstream.

No systemd runs as PID 1 on the test machines, so the test starts each unit's ExecStart
itself, as the unit's User, with the unit's LimitNOFILE (as far as the machine's hard limit
allows) and the agent unit's EnvironmentFile format. The package is purged at the end.

These tests install a system package, so they run only as root with dpkg and cargo-deb, and
only when CI is set or AGENTGATE_TEST_PACKAGE=1 (never by surprise on a developer's machine).
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, Proc, curl_through_tunnel, free_port, http_get, wait_for
from proxies import HttpUpstream

WANTED = os.environ.get("CI") or os.environ.get("AGENTGATE_TEST_PACKAGE") == "1"
UNITS = Path("/usr/lib/systemd/system")

pytestmark = pytest.mark.skipif(
    not WANTED, reason="installs a system package: set AGENTGATE_TEST_PACKAGE=1 (CI does)"
)


def _require_tools():
    missing = [t for t in ("dpkg", "systemd-analyze", "cargo-deb", "curl", "setpriv")
               if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    if missing:
        # Wanted but impossible is a failure, not a skip: CI must install these (.ci/run).
        pytest.fail(f"the package tests need {', '.join(missing)}")


def unit_directives(unit: Path) -> dict[str, list[str]]:
    """Key=value lines of a unit file, every value of repeated keys, comments dropped."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def environment_file(path: Path) -> dict[str, str]:
    """systemd's EnvironmentFile= format: KEY=VALUE lines, # comments."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip().strip('"')
    return env


def as_unit_user(unit: dict[str, list[str]], argv: list[str]) -> list[str]:
    """argv run as the unit's User/Group with its LimitNOFILE, capped at the hard limit."""
    user, group = unit["User"][0], unit["Group"][0]
    want = int(unit["LimitNOFILE"][0])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = min(want, hard)
    return ["prlimit", f"--nofile={nofile}:{nofile}", "--",
            "setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--"] + argv


@pytest.fixture(scope="module")
def installed():
    _require_tools()
    build = subprocess.run([str(ROOT / "scripts" / "build-deb"), "dev"], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, f"build-deb failed:\n{build.stderr[-4000:]}"
    deb = Path(build.stdout.strip().splitlines()[-1])
    if not deb.is_absolute():
        deb = ROOT / deb
    inst = subprocess.run(["dpkg", "-i", str(deb)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, f"dpkg -i failed:\n{inst.stdout}\n{inst.stderr}"
    yield deb
    subprocess.run(["dpkg", "--purge", "agentgate"], capture_output=True, text=True, timeout=300)


def test_the_package_installs_a_user_settings_docs_and_a_readable_empty_store(installed):
    pw = pwd.getpwnam("agentgate")
    assert pw.pw_shell in ("/usr/sbin/nologin", "/bin/false"), pw.pw_shell
    store = Path("/var/lib/agentgate/tokens.json")
    st = store.stat()
    assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
    assert st.st_mode & 0o777 == 0o640
    conf = Path("/etc/agentgate/gateway.toml").stat()
    assert conf.st_gid == grp.getgrnam("agentgate").gr_gid and conf.st_mode & 0o007 == 0
    for f in ["/usr/share/man/man1/agentgate-server.1.gz", "/usr/share/man/man1/agentgate-agent.1.gz",
              "/usr/share/bash-completion/completions/agentgate",
              "/usr/share/zsh/vendor-completions/_agentgate",
              "/usr/share/agentgate/deploy/nginx/agentgate.conf",
              "/usr/share/agentgate/deploy/haproxy/agentgate.cfg"]:
        assert Path(f).is_file(), f
    conffiles = subprocess.run(["dpkg-query", "--showformat=${Conffiles}", "--show", "agentgate"],
                               capture_output=True, text=True, check=True).stdout
    assert "/etc/agentgate/gateway.toml" in conffiles and "/etc/agentgate/agent.env" in conffiles
    version = subprocess.run(["/usr/bin/agentgate", "--version"], capture_output=True, text=True,
                             check=True).stdout
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    if head:
        assert f"(commit {head})" in version, version


def test_systemd_analyze_verifies_both_units_and_would_catch_a_broken_one(installed, tmp_path):
    units = [UNITS / "agentgate.service", UNITS / "agentgate-agent.service"]
    r = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", (r.stdout, r.stderr)
    # The same check on a unit with a mistake in it fails, so the pass above means something.
    broken = tmp_path / "agentgate-broken.service"
    broken.write_text(units[0].read_text().replace("ExecStart=/usr/bin/agentgate",
                                                   "ExecStart=usr/bin/agentgate"))
    r = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, "systemd-analyze verify accepted a relative ExecStart"


def test_the_units_carry_the_limits_an_operator_needs(installed):
    gw = unit_directives(UNITS / "agentgate.service")
    assert gw["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert gw["Restart"] == ["on-failure"]
    assert gw["NoNewPrivileges"] == ["yes"] and gw["ProtectSystem"] == ["strict"]
    assert gw["PrivateTmp"] == ["yes"] and gw["CapabilityBoundingSet"] == [""]
    # The stop timeout must outlast the drain the packaged settings ask for.
    settings = Path("/etc/agentgate/gateway.toml").read_text()
    assert 'shutdown_grace = "30s"' in settings
    assert int(gw["TimeoutStopSec"][0].rstrip("s")) > 30
    # Room for max_connections plus the API and internal listeners' sockets.
    assert "max_connections = 18000" in settings
    assert int(gw["LimitNOFILE"][0]) >= 18000 + 4096 + 4096
    enabled = Path("/etc/systemd/system/multi-user.target.wants/agentgate.service")
    assert enabled.is_symlink(), "the gateway unit is enabled at install"
    assert not Path("/etc/systemd/system/multi-user.target.wants/agentgate-agent.service").exists()


def test_the_packaged_units_serve_a_tunnelled_request(installed):
    gw_unit = unit_directives(UNITS / "agentgate.service")
    agent_unit = unit_directives(UNITS / "agentgate-agent.service")
    work = Path(tempfile.mkdtemp(prefix="agentgate-pkg-"))
    os.chmod(work, 0o755)
    procs: list[Proc] = []
    upstream = HttpUpstream(tag="packaged")
    try:
        # Tokens made by root in the packaged store: the gateway's user must still read it.
        store = "/var/lib/agentgate/tokens.json"
        agent_token = subprocess.run(
            ["/usr/bin/agentgate", "token", "create", "--tokens", store, "--name", "pkg-edge"],
            capture_output=True, text=True, check=True).stdout.strip()
        api_token = subprocess.run(
            ["/usr/bin/agentgate", "token", "create", "--tokens", store, "--name", "pkg-caller",
             "--kind", "api"], capture_output=True, text=True, check=True).stdout.strip()
        assert Path(store).stat().st_uid == pwd.getpwnam("agentgate").pw_uid

        # The unit's own command line; ports picked at run time by environment overrides,
        # as a drop-in's Environment= would set them.
        port, admin, api = free_port(), free_port(), free_port()
        gw_env = {"AGENTGATE_LISTEN": f"127.0.0.1:{port}",
                  "AGENTGATE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
                  "AGENTGATE_API_LISTEN": f"127.0.0.1:{api}"}
        gw = Proc(as_unit_user(gw_unit, shlex.split(gw_unit["ExecStart"][0])),
                  work / "gateway.log", env=gw_env)
        procs.append(gw)

        def healthy():
            assert gw.alive(), gw.output()[-3000:]
            return http_get(f"http://127.0.0.1:{admin}/healthz", timeout=2)[0] == 200
        wait_for(healthy, what="packaged gateway /healthz")

        # The agent unit: its EnvironmentFile format, with this test's values.
        token_file = work / "agent-token"
        token_file.write_text(agent_token + "\n")
        os.chown(token_file, 0, grp.getgrnam("agentgate").gr_gid)
        os.chmod(token_file, 0o640)
        env_file = work / "agent.env"
        packaged = environment_file(Path(agent_unit["EnvironmentFile"][0]))
        assert "AGENTGATE_SERVER" in packaged and "AGENTGATE_TOKEN_FILE" in packaged
        env_file.write_text(
            f"AGENTGATE_SERVER=ws://127.0.0.1:{port}/-/agent/\n"
            f"AGENTGATE_TOKEN_FILE={token_file}\n"
            f"AGENTGATE_AGENT_UPSTREAM={upstream.url}\n")
        agent = Proc(as_unit_user(agent_unit, shlex.split(agent_unit["ExecStart"][0])),
                     work / "agent.log", env=environment_file(env_file))
        procs.append(agent)

        def registered():
            assert agent.alive(), agent.output()[-3000:]
            status, _, body = http_get(f"http://127.0.0.1:{admin}/api/v1/agents", timeout=2)
            return status == 200 and b"pkg-edge" in body
        wait_for(registered, timeout=30, what="packaged agent registered")

        # install.md's check of a packaged agent: its user, its environment file, --check.
        check = subprocess.run(
            as_unit_user(agent_unit, ["sh", "-c", f"set -a; . {env_file}; exec /usr/bin/agentgate agent --check"]),
            capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "checks passed" in check.stdout, (check.stdout, check.stderr)

        # A caller we did not write: curl through the tunnel API.
        answer = curl_through_tunnel(api, api_token, "pkg-edge", "/hello?x=1")
        assert answer["server"] == "packaged" and answer["path"] == "/hello?x=1", answer

        # ExecReload's signal reloads and keeps the process.
        gw.send_signal(1)
        wait_for(lambda: "SIGHUP" in gw.output(), what="SIGHUP logged")
        assert gw.alive()
        status, _, body = http_get(f"http://127.0.0.1:{admin}/metrics")
        assert status == 200 and b'agentgate_build_info{version="' in body and b'commit="' in body
    finally:
        for p in reversed(procs):
            p.stop()
        upstream.close()
        shutil.rmtree(work, ignore_errors=True)
