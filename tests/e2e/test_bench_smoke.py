"""A small smoke run of every benchmark scenario: it runs, prints its table, and writes JSON
that parses with a sample for every scenario and transport. Timing is never asserted here;
the numbers live in docs/BENCHMARKS.md."""

import json
import shutil
import subprocess
from pathlib import Path

from conftest import BIN

SCENARIOS = {"idle", "burst", "latency", "throughput", "storm"}
TRANSPORTS = ["grpc", "grpcs", "ws", "wss"]


def test_bench_all_scenarios_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [str(BIN), "bench", "all", "--agents", "3", "--requests", "16", "--mib", "2",
         "--settle-secs", "1", "--transports", ",".join(TRANSPORTS), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| scenario | metric |" in run.stdout
    doc = json.loads(out.read_text())
    seen = {(s["scenario"], s["transport"]) for s in doc["samples"]}
    for scenario in SCENARIOS:
        for t in TRANSPORTS:
            assert (scenario, t) in seen, f"no {scenario} sample for {t}"
    for column in ("direct", "control"):
        assert ("latency", column) in seen and ("throughput", column) in seen, column
    failed = [s for s in doc["samples"] if s["metric"] == "failed requests" and s["value"] != 0]
    assert not failed, failed
    for s in doc["samples"]:
        assert s["value"] == s["value"], f"NaN in {s}"  # noqa: PLR0124 - NaN check


def test_bench_control_scenario_smoke(tmp_path):
    """`bench control`: the bare tonic tunnel next to direct gRPC, both through real bytes."""
    out = tmp_path / "control.json"
    run = subprocess.run(
        [str(BIN), "bench", "control", "--requests", "16", "--mib", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "control/grpc" in run.stdout
    doc = json.loads(out.read_text())
    columns = {(s["scenario"], s["metric"], s["transport"]) for s in doc["samples"]}
    for t in ("direct", "control", "grpc"):
        assert ("throughput", "download", t) in columns, t
    assert ("latency", "CPU per request, concurrency 1", "control") in columns
    assert not any(s["transport"] in ("grpcs", "ws", "wss") for s in doc["samples"])


def test_bench_hostile_smoke(tmp_path):
    """`bench hostile` with a few agents and connections: every attack runs, the gateway sheds
    the connections that must be shed, and no legitimate request fails."""
    out = tmp_path / "hostile.json"
    run = subprocess.run(
        [str(BIN), "bench", "hostile", "--agents", "5", "--hostile", "60", "--attack-secs", "8",
         "--gateway-set", 'auth_timeout="3s"', "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| attack | legit failed |" in run.stdout
    rows = json.loads(out.read_text())
    assert len(rows) == 16, [r["attack"] for r in rows]
    for r in rows:
        assert r["legit_failed"] == 0, r
        assert r["legit_ok"] > 0, r
        assert r["opened"] == 60, r
    by = {r["attack"]: r for r in rows}
    # The gateway ends every attack by itself within the run: deadlines (the 3 s auth deadline
    # here, the 5 s handshake deadline), limits, and protocol errors.
    for name, r in by.items():
        assert r["shed"] == 60, (name, r)


def test_bench_keepalive_scenario_smoke(tmp_path):
    """`bench keepalive`: every column (direct, the bench's own TCP relay, the control tunnel,
    agentgate) served keep-alive requests at both connection counts without a failure (the
    bench itself fails on any)."""
    out = tmp_path / "keepalive.json"
    run = subprocess.run(
        [str(BIN), "bench", "keepalive", "--rounds", "1", "--keepalive-secs", "0.5",
         "--transports", "grpc,wss", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "req/s, 50 conn., ratio to direct" in run.stdout
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"direct", "relay", "control", "grpc", "wss"}, set(cells)
    for column, by_conns in cells.items():
        assert set(by_conns) == {"1", "50"}, (column, by_conns)
        for c in by_conns.values():
            assert c["req_per_s"] > 0, (column, c)


def test_bench_unary_scenario_smoke(tmp_path):
    """`bench unary`: h2load's Health/Check calls succeed on the agent port and on the bare
    tonic server."""
    out = tmp_path / "unary.json"
    run = subprocess.run(
        [str(BIN), "bench", "unary", "--rounds", "1", "--keepalive-secs", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"bare tonic", "agentgate"}, set(cells)
    for column, levels in cells.items():
        assert len(levels) == 2, (column, levels)
        for c in levels.values():
            assert c["calls_per_s"] > 0 and c["cpu_us"] > 0, (column, c)


def test_bench_backends_scenario_smoke(tmp_path):
    """`bench backends`: unary calls succeed straight to the bench backend, through nginx's
    grpc_pass (the reference hop) and through the gateway, against the hyper backend and
    against the grpc-go one built offline from Debian's packages (or say why not); every agent
    holds its long poll open through the gateway while it is measured."""
    out = tmp_path / "backends.json"
    run = subprocess.run(
        [str(BIN), "bench", "backends", "--agents", "30", "--rounds", "1", "--keepalive-secs", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    go_here = shutil.which("go") and Path("/usr/share/gocode/src/google.golang.org/grpc").is_dir()
    if go_here:
        assert "Ok" in report["unary_grpc_go"], report["unary_grpc_go"]
        tables = [report["unary"], report["unary_grpc_go"]["Ok"]]
        assert "Unary calls to a grpc-go backend" in run.stdout, run.stdout
    else:
        assert "not measured" in report["unary_grpc_go"]["Err"], report["unary_grpc_go"]
        tables = [report["unary"]]
    for unary in tables:
        assert set(unary) == {
            "direct to the backend", "through nginx grpc_pass", "through agentgate"}, unary
        for column, levels in unary.items():
            assert len(levels) == 2, (column, levels)
            for c in levels.values():
                assert c["calls_per_s"] > 0 and c["cpu_us"] > 0, (column, c)
        for hop in ("through agentgate", "through nginx grpc_pass"):
            through = unary[hop]
            assert all(c["hop_cpu_us"] > 0 for c in through.values()), (hop, through)
    polls = report["long_polls"]
    assert polls["agents"] == 30 and polls["open_long_polls"] >= 30, polls
