"""Delay and loss for the packets an iptables NFQUEUE rule hands to userspace: what `tc qdisc
... netem delay D loss P` does, for kernels built without sch_netem (this one: "Specified
qdisc kind is unknown"; its config has neither NET_SCH_NETEM nor NET_SCH_FQ, so no qdisc
can hold a packet for a time).

The packets stay in the kernel: this program only hears of each one (its id, no payload)
and gives its verdict later, ACCEPT once `delay` has passed or DROP at random with
probability `loss`. TCP on both ends sees a real slow, lossy link: a longer round trip,
retransmissions, its congestion control. Verdicts for packets that arrive together leave
together, in order, so the link delays without reordering, as netem does by default.

The netlink protocol (nfnetlink_queue, linux/netfilter/nfnetlink_queue.h) is spoken by
hand with `socket` and `struct`, so the tests need no C library or compiled module.

Run inside the network namespace whose rules queue the packets:
    ip netns exec NS python3 netem.py --queue 7 --delay-ms 100 --loss-pct 5
It prints `ready` once bound, then on SIGTERM a line `accepted N dropped M` and exits.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
SO_RCVBUFFORCE = 33


def attr(kind: int, payload: bytes) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind)
    return head + payload + b"\0" * (-len(payload) % 4)


def message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    # nfgenmsg: family AF_UNSPEC, version 0, the queue number big-endian.
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return struct.pack("=IHHII", 16 + len(body), kind, flags, 0, 0) + body


def packet_ids(data: bytes):
    """The packet ids in one datagram of netlink messages from the queue."""
    off = 0
    while off + 16 <= len(data):
        length, kind, _, _, _ = struct.unpack_from("=IHHII", data, off)
        if length < 16:
            return
        if kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", data, off + 16)
            if err != 0:
                raise OSError(-err, os.strerror(-err))
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + 20  # nlmsghdr + nfgenmsg
            while a + 4 <= off + length:
                alen, akind = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from("!I", data, a + 4)[0]
                a += (alen + 3) & ~3
        off += (length + 3) & ~3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--loss-pct", type=float, default=0.0)
    args = p.parse_args()
    delay, loss = args.delay_ms / 1000.0, args.loss_pct / 100.0

    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    s.bind((0, 0))
    cmd = struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0)
    for attrs in (attr(NFQA_CFG_CMD, cmd),
                  attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
                  attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536))):
        s.send(message(NFQNL_MSG_CONFIG, args.queue, attrs, NLM_F_REQUEST | NLM_F_ACK))
        list(packet_ids(s.recv(65536)))  # the ack; raises on an error
    s.setblocking(False)

    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    held: collections.deque[tuple[float, int]] = collections.deque()
    accepted = dropped = 0
    print("ready", flush=True)

    def verdict(pid: int, v: int):
        hdr = attr(NFQA_VERDICT_HDR, struct.pack("!II", v, pid))
        s.send(message(NFQNL_MSG_VERDICT, args.queue, hdr))

    while not stopping:
        now = time.monotonic()
        while held and held[0][0] <= now:
            verdict(held.popleft()[1], NF_ACCEPT)
            accepted += 1
        timeout = max(0.0, held[0][0] - now) if held else 0.2
        try:
            ready, _, _ = select.select([s], [], [], timeout)
        except InterruptedError:
            continue
        if not ready:
            continue
        while True:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                break
            except OSError as e:  # ENOBUFS: a burst outran the socket buffer; go on
                print(f"netem: {e}", file=sys.stderr, flush=True)
                break
            arrived = time.monotonic()
            for pid in packet_ids(data):
                if loss and random.random() < loss:
                    verdict(pid, NF_DROP)
                    dropped += 1
                else:
                    held.append((arrived + delay, pid))
    # Whatever is still held goes out now, so nothing hangs in the queue behind us.
    for _, pid in held:
        verdict(pid, NF_ACCEPT)
        accepted += 1
    print(f"accepted {accepted} dropped {dropped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
