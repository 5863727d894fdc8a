"""Reloading without a restart: SIGHUP and changed certificate files give new TLS handshakes
the new certificate, while established agent connections keep their session and the process
stays up. The agent survives SIGHUP too."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time

from conftest import wait_for


def not_after(cert) -> int:
    """The certificate's notAfter in Unix seconds, as openssl reads it."""
    import email.utils
    out = subprocess.run(["openssl", "x509", "-enddate", "-noout", "-in", str(cert)], check=True,
                         capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    return int(email.utils.parsedate_to_datetime(out.replace(" GMT", " +0000")).timestamp())


def leaf_signed_by_test_ca(pki, out_dir, cn: str, days: int = 2) -> tuple:
    """A second server certificate from the test CA (same names), in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key, csr, cert = out_dir / "server.key", out_dir / "server.csr", out_dir / "server.pem"
    run = lambda *a: subprocess.run([str(x) for x in a], check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    run("openssl", "x509", "-req", "-in", csr, "-CA", pki / "ca.pem", "-CAkey", pki / "ca.key",
        "-CAcreateserial", "-out", cert, "-days", str(days), "-extfile", pki / "ext.cnf")
    return cert, key


def served_cert_der(port: int, ca) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return s.getpeercert(binary_form=True)


def pem_der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text().split("-----END CERTIFICATE-----")[0]
                                    + "-----END CERTIFICATE-----\n")


def swap_in(src_cert, src_key, dst_cert, dst_key):
    # Key first, then certificate, each by rename: what a renewal hook does.
    for src, dst in ((src_key, dst_key), (src_cert, dst_cert)):
        tmp = dst.with_suffix(".new")
        shutil.copy(src, tmp)
        tmp.replace(dst)


def keep_original(env):
    """The test CA's directory, and a copy of the first server certificate (the served files
    are then replaced in place)."""
    pki = env.certs["ca"].parent
    orig = env.tmp / "original-server.pem"
    shutil.copy(env.certs["cert"], orig)
    return pki, orig


def test_sighup_serves_the_new_certificate_and_keeps_agents(env):
    pki, orig = keep_original(env)
    cert, key = env.certs["cert"], env.certs["key"]  # the files the gateway serves
    g = env.gateway(tls=True, cleartext=False, extra=["--set", 'certificate_check_interval="0s"'])
    tf = env.token_file("steady")
    env.agent(g.url("grpcs"), tf, name="agent-steady")
    before = g.wait_agent("steady", transport="grpcs")
    assert served_cert_der(g.port, env.certs["ca"]) == pem_der(orig)
    expiry = "agentgate_certificate_expiry_timestamp_seconds"
    assert g.metric(expiry, listener="agent port") == not_after(orig)

    new_cert, new_key = leaf_signed_by_test_ca(pki, env.tmp / "renewed", "renewed", days=30)
    swap_in(new_cert, new_key, cert, key)
    # Without SIGHUP (checks off) the old certificate is still served.
    assert served_cert_der(g.port, env.certs["ca"]) == pem_der(orig)
    g.proc.p.send_signal(signal.SIGHUP)
    wait_for(lambda: served_cert_der(g.port, env.certs["ca"]) == pem_der(new_cert), timeout=5,
             what="the renewed certificate served after SIGHUP")
    assert g.proc.alive(), "SIGHUP must not stop the gateway"
    after = g.wait_agent("steady", transport="grpcs")
    assert after["connection_id"] == before["connection_id"], (before, after)
    out = g.proc.output()
    assert "SIGHUP received" in out and "certificate reloaded" in out, out[-2000:]
    assert g.metric("agentgate_certificate_reloads_total", listener="agent port", result="ok") == 1
    # The expiry gauge follows the certificate now served: 30 days instead of 2.
    assert g.metric(expiry, listener="agent port") == not_after(new_cert) > not_after(orig)


def test_changed_files_reload_by_themselves_and_a_broken_pair_keeps_the_old(env):
    pki, orig = keep_original(env)
    cert, key = env.certs["cert"], env.certs["key"]
    g = env.gateway(tls=True, cleartext=False, extra=["--set", 'certificate_check_interval="1s"'])
    # A key that does not match the certificate: refused, the old pair stays.
    stray_cert, stray_key = leaf_signed_by_test_ca(pki, env.tmp / "stray", "stray")
    swap_in(orig, stray_key, cert, key)
    wait_for(lambda: g.metric("agentgate_certificate_reloads_total", listener="agent port",
                              result="failed") >= 1, timeout=6, what="the broken pair refused")
    assert served_cert_der(g.port, env.certs["ca"]) == pem_der(orig)
    assert "still serving the previous one" in g.proc.output()
    # The matching pair: served within the check interval, no signal needed.
    swap_in(stray_cert, stray_key, cert, key)
    wait_for(lambda: served_cert_der(g.port, env.certs["ca"]) == pem_der(stray_cert), timeout=6,
             what="the new pair served after the file check")
    assert g.proc.alive()


def test_agent_survives_sighup(env):
    g = env.gateway(tls=False, cleartext=False)
    tf = env.token_file("hup-agent")
    a = env.agent(g.url("grpc"), tf, name="agent-hup")
    before = g.wait_agent("hup-agent")
    a.p.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert a.alive(), f"SIGHUP stopped the agent:\n{a.output()[-2000:]}"
    assert "SIGHUP" in a.output()
    after = g.wait_agent("hup-agent")
    assert after["connection_id"] == before["connection_id"]



def test_the_agent_picks_up_a_changed_ca_bundle(env):
    """An agent given the wrong CA keeps failing; once its --ca-cert file holds the right one,
    its next attempt connects, without a restart."""
    g = env.gateway(tls=True, cleartext=False)
    wrong = env.tmp / "wrong-ca"
    wrong.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", str(wrong / "k.pem"), "-out", str(wrong / "ca.pem"), "-days", "2",
                    "-subj", "/CN=some other CA"], check=True, capture_output=True)
    bundle = env.tmp / "agent-ca.pem"
    shutil.copy(wrong / "ca.pem", bundle)
    a = env.agent(g.url("grpcs"), env.token_file("ca-watcher"), ca=False,
                  extra=["--ca-cert", str(bundle), "--backoff-initial", "200ms", "--backoff-max", "500ms"],
                  name="agent-ca-watcher")
    wait_for(lambda: "not signed by a CA this agent trusts" in a.output(), timeout=10,
             what="the agent refusing the gateway's certificate")
    tmp = bundle.with_suffix(".new")
    shutil.copy(env.certs["ca"], tmp)
    tmp.replace(bundle)
    g.wait_agent("ca-watcher", transport="grpcs")
    assert "CA bundle changed" in a.output()
    assert a.alive()
