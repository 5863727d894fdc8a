"""The README's main command, `agentgate demo`: the whole product on embedded defaults.

It must print a row for every transport, keep serving what it printed (a curl command through
the tunnel, the admin port), and stop cleanly on SIGTERM, with no panic and no error line.
"""

import re
import signal

from conftest import BIN, free_port, http_get, wait_for

TRANSPORTS = ("grpc", "grpcs", "ws", "wss")


def test_the_demo_measures_every_transport_then_serves_what_it_printed(env):
    ports = {name: free_port() for name in ("listen", "cleartext", "admin", "api")}
    demo = env.spawn(
        [BIN, "demo",
         "--listen", f"127.0.0.1:{ports['listen']}",
         "--cleartext-listen", f"127.0.0.1:{ports['cleartext']}",
         "--admin-listen", f"127.0.0.1:{ports['admin']}",
         "--api-listen", f"127.0.0.1:{ports['api']}",
         "--requests", "20", "--download-mib", "4"],
        "demo",
    )
    wait_for(lambda: "curl http://127.0.0.1" in demo.output() or not demo.alive(),
             timeout=120, what="the demo's table and URLs")
    out = demo.output()
    assert demo.alive(), f"the demo exited:\n{out[-3000:]}"

    # One row per transport, each with a measured download rate and a ratio to direct.
    for t in ("direct (no tunnel)",) + TRANSPORTS:
        row = re.search(rf"^\| {re.escape(t)} \| 20 \|.*\| ([0-9.]+)x \|$", out, re.M)
        assert row, f"no row for {t}:\n{out[-3000:]}"
        assert float(row.group(1)) > 0

    # The printed curl command works: through the tunnel to the demo's upstream.
    m = re.search(r"curl -H 'authorization: Bearer (\S+)' (http://\S+/agents/demo-(\w+)/proxy/)",
                  out)
    assert m, out[-3000:]
    token, url = m.group(1), m.group(2)
    status, _, body = http_get(url, headers={"authorization": f"Bearer {token}"})
    assert status == 200, body
    # Without the token, the same URL is refused with a sentence, not a stack trace.
    status, _, body = http_get(url)
    assert status == 401 and b"API token" in body, (status, body)

    # The admin port lists one agent per transport.
    status, _, body = http_get(f"http://127.0.0.1:{ports['admin']}/api/v1/agents")
    assert status == 200
    listed = {a["name"]: a["transport"] for a in __import__("json").loads(body)}
    assert listed == {f"demo-{t}": t for t in TRANSPORTS}, listed

    demo.send_signal(signal.SIGTERM)
    assert demo.wait(timeout=30) == 0
    out = demo.output()
    assert "panicked" not in out and " ERROR " not in out, out[-3000:]
    assert "gateway stopped" in out
