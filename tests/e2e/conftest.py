"""Shared fixtures for agentgate's end-to-end tests.

Every test starts real processes (the agentgate binary, and where needed nginx, haproxy,
redis-server, Python grpcio peers) on 127.0.0.1, on ports picked at run time, and stops them
all at the end. Nothing here mocks what a user would meet.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("AGENTGATE_BIN", ROOT / "target" / "debug" / "agentgate"))


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


# Ports are handed out from below the kernel's ephemeral range, one after another from a random
# start. Asking the kernel for port 0 returned an ephemeral port, and any outgoing connection
# (a proxy's, a client's) could take that same port as its source before the gateway bound it:
# CI failed once on exactly that ("Address already in use").
_EPHEMERAL_LOW = _ephemeral_range()[0]
_PORT_FLOOR = 10000 if _EPHEMERAL_LOW > 12000 else 1024
_next_port = _PORT_FLOOR + random.randrange(max(1, _EPHEMERAL_LOW - _PORT_FLOOR))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, not in the kernel's ephemeral range (so no
    outgoing connection takes it meanwhile) and not handed out before by this test run."""
    global _next_port
    span = _EPHEMERAL_LOW - _PORT_FLOOR
    for _ in range(span):
        port = _next_port
        _next_port = _PORT_FLOOR + (_next_port - _PORT_FLOOR + 1) % span
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free TCP port below the ephemeral range")


def wait_for(pred, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    """Polls `pred` until it returns a truthy value; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the predicate may fail while things start
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def http_get(url: str, headers: dict | None = None, timeout: float = 10.0):
    """GET returning (status, headers, body bytes); HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def curl_through_tunnel(api_port: int, token: str, agent: str, path: str) -> dict:
    """GET `path` of `agent`'s default upstream through the tunnel API at `api_port` with
    curl (a client we did not write); the upstream's JSON answer."""
    r = subprocess.run(["curl", "-sS", "-H", f"Authorization: Bearer {token}",
                        f"http://127.0.0.1:{api_port}/agents/{agent}/proxy{path}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class Proc:
    """A child process whose output goes to a log file; killed (and reaped) on stop()."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, cwd=None):
        self.args = [str(a) for a in args]
        self.log_path = log_path
        self.log = open(log_path, "ab")
        full_env = dict(os.environ)
        full_env.setdefault("AGENTGATE_LOG", "info")
        if env:
            full_env.update(env)
        self.p = subprocess.Popen(
            self.args, stdout=self.log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig):
        if self.alive():
            os.kill(self.p.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.p.wait(timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0):
        if self.alive():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=5)
        self.log.close()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.p.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


class Env:
    """A per-test workspace: temp dir, process registry, token store, certificates."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.tokens = tmp / "tokens.json"
        # An empty store, as `agentgate token create` would leave it: the gateway refuses to
        # start on a missing one, and tests create their tokens after it started.
        self.tokens.write_text('{"version": 1, "tokens": []}\n')
        self._certs = None

    def spawn(self, args, name: str, env=None, cwd=None) -> Proc:
        p = Proc(args, self.tmp / f"{name}.log", env=env, cwd=cwd)
        self.procs.append(p)
        return p

    def token(self, name: str, kind: str = "agent", agents: list[str] | None = None) -> str:
        args = [BIN, "token", "create", "--name", name, "--tokens", self.tokens, "--kind", kind]
        for a in agents or []:
            args += ["--agent", a]
        out = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def token_file(self, name: str, kind: str = "agent") -> Path:
        path = self.tmp / f"token-{name}-{kind}.txt"
        path.write_text(self.token(name, kind) + "\n")
        return path

    @property
    def certs(self) -> dict:
        """A private CA and a server certificate it signs, valid for localhost, 127.0.0.1
        and gateway.test. Keys: ca, cert, key (paths)."""
        if self._certs is None:
            self._certs = make_certs(self.tmp / "pki")
        return self._certs

    def gateway(self, tls: bool = True, cleartext: bool = True, extra: list[str] | None = None,
                name: str = "gateway", env=None, host: str = "127.0.0.1",
                wrap: list[str] | None = None) -> "Gateway":
        """`host`: the address every listener binds; `wrap`: a command prefix, such as
        `ip netns exec NS` to run the gateway in a network namespace."""
        return Gateway(self, tls=tls, cleartext=cleartext, extra=extra or [], name=name,
                       env_vars=env, host=host, wrap=wrap or [])

    def agent(self, server: str, token_file: Path | None = None, extra: list[str] | None = None,
              name: str = "agent", env=None, ca: bool = True) -> Proc:
        args = [BIN, "agent", "--server", server]
        if token_file is not None:
            args += ["--token-file", token_file]
        if ca and server.split(":")[0] in ("grpcs", "wss"):
            args += ["--ca-cert", self.certs["ca"]]
        args += extra or []
        return self.spawn(args, name, env=env)

    def close(self):
        for p in reversed(self.procs):
            p.stop()


class Gateway:
    """`agentgate server` with TLS on its agent port and (optionally) a cleartext agent port."""

    def __init__(self, env: Env, tls: bool, cleartext: bool, extra: list[str], name: str,
                 env_vars=None, host: str = "127.0.0.1", wrap: list[str] = ()):
        self.env = env
        self.host = host
        self.port = free_port()
        self.clear_port = free_port() if cleartext and tls else None
        self.admin_port = free_port()
        self.api_port = free_port()
        self.tls = tls
        args = [
            *wrap, BIN, "server",
            "--listen", f"{host}:{self.port}",
            "--admin-listen", f"{host}:{self.admin_port}",
            "--api-listen", f"{host}:{self.api_port}",
            "--tokens", env.tokens,
        ]
        if tls:
            args += ["--tls-cert", env.certs["cert"], "--tls-key", env.certs["key"]]
        if self.clear_port:
            args += ["--cleartext-listen", f"{host}:{self.clear_port}"]
        args += extra
        self.args, self.env_vars, self.name, self.starts = args, env_vars, name, 1
        self.proc = env.spawn(args, name, env=env_vars)
        wait_for(lambda: self.healthy(), what=f"{name} /healthz")

    def restart(self, sig=signal.SIGTERM, timeout: float = 60.0):
        """Stops the process (SIGTERM drains) and starts it again on the same ports."""
        self.proc.stop(sig, timeout=timeout)
        self.starts += 1
        self.proc = self.env.spawn(self.args, f"{self.name}-start{self.starts}", env=self.env_vars)
        wait_for(lambda: self.healthy(), what=f"{self.name} /healthz after restart")

    # Agent URLs for each scheme.
    def url(self, scheme: str, path: str = "/") -> str:
        if scheme in ("grpcs", "wss"):
            assert self.tls
            host = f"localhost:{self.port}"
        else:
            host = f"{self.host}:{self.clear_port or self.port}"
        return f"{scheme}://{host}{path if scheme.startswith('ws') else ''}"

    @property
    def admin(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def healthy(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"gateway exited:\n{self.proc.output()[-3000:]}")
        return http_get(self.admin + "/healthz", timeout=2)[0] == 200

    def agents(self) -> list[dict]:
        status, _, body = http_get(self.admin + "/api/v1/agents")
        assert status == 200
        return json.loads(body)

    def wait_agent(self, name: str, transport: str | None = None, timeout: float = 20.0) -> dict:
        def find():
            for a in self.agents():
                if a["name"] == name and (transport is None or a["transport"] == transport):
                    return a
            return None
        return wait_for(find, timeout=timeout, what=f"agent {name} ({transport}) registered")

    def metrics_text(self) -> str:
        return http_get(self.admin + "/metrics")[2].decode()

    def metric_sum(self, name: str, **labels) -> float:
        """The sum of every series of a family that has these labels (others may differ)."""
        pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
        total = 0.0
        for m in pat.finditer(self.metrics_text()):
            lbl = (m.group(1) or "").strip("{}").split(",")
            if all(f'{k}="{v}"' in lbl for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def metric_total(self, name: str) -> float:
        """The sum of every series of a family."""
        pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
        return sum(float(m.group(2)) for m in pat.finditer(self.metrics_text()))

    def metric(self, name: str, **labels) -> float:
        """Value of one series (0 if absent)."""
        text = self.metrics_text()
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
        for m in pat.finditer(text):
            lbl = (m.group(1) or "").strip("{}")
            if all(f'{k}="{v}"' in lbl.split(",") for k, v in labels.items()) or (not labels and not lbl):
                return float(m.group(2))
        _ = want
        return 0.0


def make_certs(d: Path, eku: str = "serverAuth") -> dict:
    """CA + server certificate with openssl (SANs: localhost, 127.0.0.1, gateway.test);
    `eku="serverAuth,clientAuth"` makes one a replica can also present as a client."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca = d / "ca.key", d / "ca.pem"
    key, csr, cert = d / "server.key", d / "server.csr", d / "server.pem"
    ext = d / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:gateway.test\n"
                   "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={eku}\n")
    run = lambda *a: subprocess.run([str(x) for x in a], check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=agentgate test CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext)
    return {"ca": ca, "cert": cert, "key": key}


def keep_logs(d, name: str):
    """With AGENTGATE_E2E_KEEP_LOGS=DIR, copies a test's workspace `d` (its logs) there."""
    keep = os.environ.get("AGENTGATE_E2E_KEEP_LOGS")
    if keep:
        import shutil
        dest = Path(keep) / name.split(" ")[0].replace("/", "_")
        shutil.copytree(d, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock"))


@pytest.fixture
def env():
    with tempfile.TemporaryDirectory(prefix="agentgate-e2e-") as d:
        e = Env(Path(d))
        try:
            yield e
        finally:
            e.close()
            keep_logs(d, os.environ.get("PYTEST_CURRENT_TEST", "test"))
