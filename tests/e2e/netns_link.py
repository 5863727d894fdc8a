"""A second host for a test, in network namespaces the test creates: a namespace for the host
and a router namespace between it and the test's own, joined by two veth pairs.

    test's namespace (198.18.N.1) --veth-- router (198.18.N.2 | 198.19.N.1) --veth-- host (198.19.N.2)

(198.18.0.0/15 is the range set aside for benchmarks, RFC 2544, so no real network collides.)

The router forwards between the two; `impair(port, ...)` makes it hand the TCP packets of one
port, both ways, to `netem.py` (NFQUEUE), which delays or drops them: a slow or lossy link that
TCP on both ends really crosses. The impairment sits on the router and not on an end because a
packet held on its sender's own output path still counts against the sender's socket (TCP
small queues), which would throttle a 100 ms link to a few packets per round trip; a
forwarded packet has left its sender.

Needs root (namespaces, iptables); skips the test with a reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

NETEM = Path(__file__).with_name("netem.py")


def _run(*args: str, ns: str | None = None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class RoutedHost:
    def __init__(self, tag: str):
        if os.geteuid() != 0:
            pytest.skip("network namespaces need root")
        for tool in ("ip", "iptables"):
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (Debian: iproute2, iptables; .ci/run installs them)")
        n = os.getpid() % 250 + 1  # the subnets: tests in parallel processes do not collide
        self.tag = f"{tag}{os.getpid() % 100000}"
        self.router, self.ns = f"{self.tag}r", f"{self.tag}h"
        self.near_ip, self.host_ip = f"198.18.{n}.1", f"198.19.{n}.2"
        self._outer = f"{self.tag}a"
        self._rules: list[list[str]] = []
        try:
            self._build(n)
        except RuntimeError as e:
            self.close()
            pytest.skip(f"cannot build the namespaces: {e}")

    def _build(self, n: int):
        _run("ip", "netns", "add", self.router)
        _run("ip", "netns", "add", self.ns)
        inner_r, inner_h, outer_r = f"{self.tag}b", f"{self.tag}c", f"{self.tag}d"
        _run("ip", "link", "add", self._outer, "type", "veth", "peer", "name", outer_r)
        _run("ip", "link", "set", outer_r, "netns", self.router)
        _run("ip", "link", "add", inner_r, "type", "veth", "peer", "name", inner_h)
        _run("ip", "link", "set", inner_r, "netns", self.router)
        _run("ip", "link", "set", inner_h, "netns", self.ns)
        _run("ip", "addr", "add", f"{self.near_ip}/30", "dev", self._outer)
        _run("ip", "link", "set", self._outer, "up")
        _run("ip", "route", "add", f"198.19.{n}.0/30", "via", f"198.18.{n}.2")
        for cmd in (["ip", "addr", "add", f"198.18.{n}.2/30", "dev", outer_r],
                    ["ip", "addr", "add", f"198.19.{n}.1/30", "dev", inner_r],
                    ["ip", "link", "set", outer_r, "up"], ["ip", "link", "set", inner_r, "up"],
                    ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
            _run(*cmd, ns=self.router)
        for cmd in (["ip", "addr", "add", f"{self.host_ip}/30", "dev", inner_h],
                    ["ip", "link", "set", inner_h, "up"], ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "default", "via", f"198.19.{n}.1"]):
            _run(*cmd, ns=self.ns)

    @property
    def wrap(self) -> list[str]:
        """The command prefix that runs a program on this host."""
        return ["ip", "netns", "exec", self.ns]

    @contextlib.contextmanager
    def impair(self, port: int, delay_ms: float = 0, loss_pct: float = 0):
        """While inside: the host's TCP port `port` (both directions) delayed by `delay_ms`
        each way and `loss_pct` percent of its packets dropped. Yields a dict that holds, after
        the block, `accepted` and `dropped` packet counts."""
        queue = 7
        rules = [["-p", "tcp", "--dport", str(port)], ["-p", "tcp", "--sport", str(port)]]
        for r in rules:
            _run("iptables", "-A", "FORWARD", *r, "-j", "NFQUEUE", "--queue-num", str(queue),
                 ns=self.router)
        netem = subprocess.Popen(
            ["ip", "netns", "exec", self.router, sys.executable, str(NETEM), "--queue", str(queue),
             "--delay-ms", str(delay_ms), "--loss-pct", str(loss_pct)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        counts: dict = {}
        try:
            first = netem.stdout.readline().strip()
            if first != "ready":
                raise RuntimeError(f"netem.py did not start: {first} {netem.stdout.read()}")
            yield counts
        finally:
            netem.send_signal(signal.SIGTERM)
            out, _ = netem.communicate(timeout=10)
            for r in rules:
                _run("iptables", "-D", "FORWARD", *r, "-j", "NFQUEUE", "--queue-num", str(queue),
                     ns=self.router)
            for line in out.splitlines():
                if line.startswith("accepted "):
                    _, a, _, d = line.split()
                    counts.update(accepted=int(a), dropped=int(d))

    def close(self):
        # Deleting a namespace deletes the veth ends inside it, and so their peers and the route.
        for ns in (self.ns, self.router):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self._outer], capture_output=True)
