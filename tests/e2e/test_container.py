"""The container image: deploy/container/Containerfile built with buildah (Debian's), its
settings checked (non-root user, entrypoint, no shell), and its filesystem run as the image's
user, serving one tunnelled request to a curl caller.

CI cannot pull a Rust base image, so the Containerfile's ROOTFS_FROM argument swaps its compile
stage for an image holding /rootfs, made by the same make-rootfs script from the test's own
binary; every later step is the Containerfile's. The image is run with chroot as its user
rather than with podman, whose runtime (crun) cannot set up cgroups or rlimits in this sandbox
(`cgroups in hybrid mode not supported`). Storage is private to the test and removed after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, Proc, curl_through_tunnel, free_port, http_get, wait_for
from proxies import HttpUpstream

WANTED = os.environ.get("CI") or os.environ.get("AGENTGATE_TEST_PACKAGE") == "1"
pytestmark = pytest.mark.skipif(
    not WANTED, reason="builds a container image as root: set AGENTGATE_TEST_PACKAGE=1 (CI does)"
)


class Buildah:
    def __init__(self, tmp: Path):
        self.base = ["buildah", "--storage-driver", "vfs", "--root", str(tmp / "storage"),
                     "--runroot", str(tmp / "run")]

    def __call__(self, *args: str, timeout: float = 600) -> str:
        r = subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"buildah {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r.stdout.strip()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("buildah") is None or shutil.which("chroot") is None:
        pytest.fail("the container tests need root, buildah and chroot (.ci/run installs buildah)")
    tmp = tmp_path_factory.mktemp("container")
    b = Buildah(tmp)
    rootfs = tmp / "rootfs"
    subprocess.run([str(ROOT / "deploy" / "container" / "make-rootfs"), str(BIN), str(rootfs)],
                   check=True, timeout=300)
    holder = b("from", "scratch")
    b("copy", holder, str(rootfs), "/rootfs")
    b("commit", "--quiet", holder, "localhost/agentgate-rootfs:e2e")
    b("rm", holder)
    b("bud", "--isolation", "chroot", "--quiet", "--build-arg",
      "ROOTFS_FROM=localhost/agentgate-rootfs:e2e", "-f", str(ROOT / "deploy/container/Containerfile"),
      "-t", "localhost/agentgate:e2e", str(ROOT))
    ctr = b("from", "localhost/agentgate:e2e")
    mnt = Path(b("mount", ctr))
    yield b, mnt
    b("umount", ctr)
    b("rm", ctr)
    subprocess.run(b.base + ["rmi", "--all", "--force"], capture_output=True, timeout=300)
    shutil.rmtree(tmp, ignore_errors=True)


def test_the_image_runs_as_a_non_root_user_with_no_shell(image):
    b, mnt = image
    cfg = json.loads(b("inspect", "--type", "image", "localhost/agentgate:e2e"))["OCIv1"]["config"]
    assert cfg["User"] == "65532:65532"
    assert cfg["Entrypoint"] == ["/usr/bin/agentgate"]
    assert cfg["Cmd"] == ["server", "--config", "/etc/agentgate/gateway.toml"]
    assert {"8150/tcp", "8151/tcp", "8154/tcp"} <= set(cfg["ExposedPorts"])
    for shell in ("bin/sh", "bin/bash", "usr/bin/sh", "usr/bin/apt"):
        assert not (mnt / shell).exists(), f"/{shell} in the image"
    assert (mnt / "etc/ssl/certs/ca-certificates.crt").is_file(), "no CA bundle for https upstreams"
    assert (mnt / "var/lib/agentgate").stat().st_uid == 65532


def test_the_image_serves_a_tunnelled_request(image, tmp_path):
    b, mnt = image
    cfg = json.loads(b("inspect", "--type", "image", "localhost/agentgate:e2e"))["OCIv1"]["config"]
    store = mnt / "var/lib/agentgate/tokens.json"
    store.write_text('{"version": 1, "tokens": []}\n')
    os.chown(store, 65532, 65532)

    def token(name, kind):
        return subprocess.run([str(BIN), "token", "create", "--tokens", str(store), "--name", name,
                               "--kind", kind], capture_output=True, text=True, check=True).stdout.strip()
    agent_token, api_token = token("boxed-edge", "agent"), token("boxed-caller", "api")

    port, admin, api = free_port(), free_port(), free_port()
    # The image's entrypoint and command, as its user, in its filesystem; ports from the
    # environment as `-e AGENTGATE_LISTEN=...` would set them.
    argv = ["chroot", "--userspec", cfg["User"], str(mnt)] + cfg["Entrypoint"] + cfg["Cmd"]
    env = {"AGENTGATE_LISTEN": f"127.0.0.1:{port}", "AGENTGATE_ADMIN_LISTEN": f"127.0.0.1:{admin}",
           "AGENTGATE_API_LISTEN": f"127.0.0.1:{api}"}
    upstream = HttpUpstream(tag="boxed")
    gw = Proc(argv, tmp_path / "gateway.log", env=env)
    token_file = tmp_path / "token"
    token_file.write_text(agent_token)
    agent = Proc([str(BIN), "agent", "--server", f"grpc://127.0.0.1:{port}", "--token-file",
                  str(token_file), "--upstream", upstream.url], tmp_path / "agent.log")
    try:
        def ready():
            assert gw.alive(), gw.output()[-3000:]
            return http_get(f"http://127.0.0.1:{admin}/readyz", timeout=2)[0] == 200
        wait_for(ready, what="the image's gateway /readyz")

        def registered():
            status, _, body = http_get(f"http://127.0.0.1:{admin}/api/v1/agents", timeout=2)
            return status == 200 and b"boxed-edge" in body
        wait_for(registered, timeout=30, what="agent registered with the image's gateway")
        answer = curl_through_tunnel(api, api_token, "boxed-edge", "/in-a-box")
        assert answer["server"] == "boxed" and answer["path"] == "/in-a-box", answer
    finally:
        agent.stop()
        gw.stop()
        upstream.close()
