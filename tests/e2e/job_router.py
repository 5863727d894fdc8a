"""A "job router" gRPC backend for test_backends.py: the kind of service a CI runner or an agent
reaches THROUGH the gateway (`--backend runner.jobs.v1.=URL`).

No protoc, no generated code: a grpcio server with a generic handler for
`runner.jobs.v1.JobRouter` (or any other service names given), messages as raw bytes (identity
serializers), running in a thread pool inside the test process on a port from free_port().

Methods (requests are bytes; the streaming and failing ones take a small JSON object):
- GetJob (unary): answers b"job:" + request. Initial metadata `x-backend-initial: hello`;
  trailing metadata `x-backend-saw: GetJob`, `x-backend-agent` / `x-backend-transport` /
  `x-backend-instance` (what the agentgate-* metadata said, "-" if absent), `x-backend-auth`
  (present/absent), and every request metadata `x-echo-*` key echoed back (text and -bin).
  Metadata `x-respond-gzip: 1` makes the answer gzip-compressed.
- WaitJob (server streaming, a long poll): {"job": str, "count": int, "delay": seconds,
  "first_now": bool, "fail": {"code": NAME, "message": str}}: yields b"<job>:<i>" `count`
  times, waiting `delay` before each (not before the first with first_now). A call that ends
  early (client cancel, deadline, the gateway cutting it) is recorded as cancelled, and the
  wait ends at once.
- Upload (client streaming): answers JSON {"chunks", "bytes", "sha256"} of what arrived.
- Chat (bidi): answers every message m at once with b"echo:" + m.
- Fail (unary): {"code": NAME, "message": str}: ends with that status and message, and
  trailing metadata `x-error-detail: job-failed`, `x-error-bin: 00 01 fe ff` and
  `grpc-status-details-bin`.

Every call is recorded (CallRecord): the invocation metadata as received, the peer, start and
end times, and whether it was cancelled (it ended before the handler finished: seen through
context.add_callback, double-checked with context.is_active(); Upload and Chat wait 250 ms at
the end of their input to tell a half-close from a cancel, see _cancelled_at_end_of_input).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from conftest import free_port

SERVICE = "runner.jobs.v1.JobRouter"
METHODS = ("GetJob", "WaitJob", "Upload", "Chat", "Fail")
MAX_MSG = 16 * 1024 * 1024
ERROR_BIN = b"\x00\x01\xfe\xff"
STATUS_DETAILS = b"\x08\x05\x12\x0cjob-42-gone!"  # any bytes: the gateway must not parse them


def method_path(name: str, service: str = SERVICE) -> str:
    return f"/{service}/{name}"


class CallRecord:
    """What the backend saw of one call."""

    def __init__(self, service: str, method: str, context):
        self.service = service
        self.method = method
        self.metadata: list[tuple[str, object]] = list(context.invocation_metadata())
        self.peer = context.peer()
        self.started = time.monotonic()
        self.ended_at: float | None = None
        self.ended = threading.Event()      # the RPC terminated, for any reason
        self.completed = False              # the handler got to its normal end (or its abort)
        self.cancelled = False              # the RPC ended before the handler did
        self.messages_in = 0
        self._context = context

    # metadata ----------------------------------------------------------------------------
    def values(self, key: str) -> list:
        return [v for k, v in self.metadata if k == key]

    def get(self, key: str):
        v = self.values(key)
        return v[0] if v else None

    def keys(self) -> set[str]:
        return {k for k, _ in self.metadata}

    # lifecycle ---------------------------------------------------------------------------
    def _on_terminated(self):
        self.ended_at = time.monotonic()
        if not self.completed:
            self.cancelled = True
        self.ended.set()

    def finish(self):
        self.completed = True

    def wait_ended(self, timeout: float) -> bool:
        return self.ended.wait(timeout)

    def __repr__(self) -> str:
        return (f"CallRecord({self.service}/{self.method}, cancelled={self.cancelled}, "
                f"completed={self.completed}, metadata={self.metadata!r})")


def _status(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, name)


def _ascii_or(v, default="-"):
    if v is None or isinstance(v, bytes):
        return default
    return v if v else default


class JobRouter:
    """The backend. `services` are the gRPC service names it answers (all with the same
    methods); `tls` = {"cert": path, "key": path} serves TLS instead of h2c."""

    def __init__(self, services: tuple[str, ...] | list[str] = (SERVICE,), port: int | None = None,
                 tls: dict | None = None, tag: str = "job-router", options: list | None = None):
        self.services = tuple(services)
        self.tag = tag
        self.port = port or free_port()
        self.tls = tls
        self.calls: list[CallRecord] = []
        self._lock = threading.Condition()
        opts = [("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", MAX_MSG),
                ("grpc.max_receive_message_length", MAX_MSG)] + list(options or [])
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=opts)
        for svc in self.services:
            self.server.add_generic_rpc_handlers((self._handler(svc),))
        addr = f"127.0.0.1:{self.port}"
        if tls:
            creds = grpc.ssl_server_credentials(
                [(Path(tls["key"]).read_bytes(), Path(tls["cert"]).read_bytes())])
            bound = self.server.add_secure_port(addr, creds)
        else:
            bound = self.server.add_insecure_port(addr)
        assert bound == self.port, f"job router could not bind {addr} (got {bound})"
        self.server.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def stop(self, grace: float | None = None):
        self.server.stop(grace).wait(10)

    # records -----------------------------------------------------------------------------
    def _begin(self, service: str, method: str, context) -> CallRecord:
        rec = CallRecord(service, method, context)
        context.add_callback(rec._on_terminated)
        with self._lock:
            self.calls.append(rec)
            self._lock.notify_all()
        return rec

    def calls_to(self, method: str | None = None, service: str | None = None) -> list[CallRecord]:
        with self._lock:
            return [c for c in self.calls
                    if (method is None or c.method == method) and (service is None or c.service == service)]

    def wait_calls(self, method: str | None = None, n: int = 1, timeout: float = 10.0,
                   service: str | None = None) -> list[CallRecord]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                got = [c for c in self.calls
                       if (method is None or c.method == method) and (service is None or c.service == service)]
                if len(got) >= n:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.tag}: {len(got)} call(s) to {method or 'any method'} after {timeout}s, "
                        f"wanted {n}; all calls: {[(c.service, c.method) for c in self.calls]}")
                self._lock.wait(left)

    def last(self, method: str | None = None) -> CallRecord:
        got = self.calls_to(method)
        assert got, f"{self.tag}: no call to {method or 'any method'}"
        return got[-1]

    # handlers ----------------------------------------------------------------------------
    def _handler(self, service: str):
        return grpc.method_handlers_generic_handler(service, {
            "GetJob": grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: self._get_job(service, req, ctx)),
            "WaitJob": grpc.unary_stream_rpc_method_handler(
                lambda req, ctx: self._wait_job(service, req, ctx)),
            "Upload": grpc.stream_unary_rpc_method_handler(
                lambda it, ctx: self._upload(service, it, ctx)),
            "Chat": grpc.stream_stream_rpc_method_handler(
                lambda it, ctx: self._chat(service, it, ctx)),
            "Fail": grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: self._fail(service, req, ctx)),
        })

    @staticmethod
    def _identity_trailers(rec: CallRecord, method: str) -> list[tuple[str, object]]:
        out = [
            ("x-backend-saw", method),
            ("x-backend-agent", _ascii_or(rec.get("agentgate-agent-name"))),
            ("x-backend-transport", _ascii_or(rec.get("agentgate-transport"))),
            ("x-backend-instance", _ascii_or(rec.get("agentgate-agent-instance"))),
            ("x-backend-auth", "present" if rec.values("authorization") else "absent"),
        ]
        for k, v in rec.metadata:
            if k.startswith("x-echo-"):
                out.append((k, v))
        return out

    @staticmethod
    def _cancelled_at_end_of_input(rec: CallRecord, context) -> bool:
        """grpcio ends a cancelled call's request iterator like a half-close when the reset
        arrives before the cancellation is noticed. A real half-close leaves the call open
        (the status is ours to send); a cancel ends it within moments: wait for that."""
        if rec.ended.wait(0.25) or not context.is_active():
            return True
        return False

    def _get_job(self, service, request: bytes, context):
        rec = self._begin(service, "GetJob", context)
        rec.messages_in = 1
        if rec.get("x-respond-gzip") == "1":
            context.set_compression(grpc.Compression.Gzip)
        context.send_initial_metadata((("x-backend-initial", "hello"),))
        context.set_trailing_metadata(tuple(self._identity_trailers(rec, "GetJob")))
        rec.finish()
        return b"job:" + request

    def _wait_job(self, service, request: bytes, context):
        rec = self._begin(service, "WaitJob", context)
        rec.messages_in = 1
        spec = json.loads(request or b"{}")
        job = spec.get("job", "job")
        count = int(spec.get("count", 1))
        delay = float(spec.get("delay", 0))
        if rec.get("x-respond-gzip") == "1":
            context.set_compression(grpc.Compression.Gzip)
        if not spec.get("quiet"):  # quiet: no headers before the first message
            context.send_initial_metadata((("x-backend-initial", "waiting"),))
        for i in range(count):
            wait = 0.0 if (i == 0 and spec.get("first_now")) else delay
            if wait > 0 and rec.ended.wait(wait):
                return  # the call ended while we waited: recorded as cancelled by the callback
            if not context.is_active():
                if not rec.ended.is_set():
                    rec.cancelled = True
                return
            pad = spec.get("pad", 0)
            yield f"{job}:{i}".encode() + (b"." * int(pad))
        trailers = self._identity_trailers(rec, "WaitJob") + [("x-stream-count", str(count))]
        fail = spec.get("fail")
        if fail:
            trailers.append(("x-error-detail", "stream-failed"))
            context.set_trailing_metadata(tuple(trailers))
            rec.finish()
            context.abort(_status(fail["code"]), fail["message"])
        context.set_trailing_metadata(tuple(trailers))
        rec.finish()

    def _upload(self, service, request_iterator, context):
        rec = self._begin(service, "Upload", context)
        h = hashlib.sha256()
        n = total = 0
        for chunk in request_iterator:
            n += 1
            total += len(chunk)
            h.update(chunk)
            rec.messages_in = n
        if self._cancelled_at_end_of_input(rec, context):
            return b""
        context.set_trailing_metadata(tuple(self._identity_trailers(rec, "Upload")))
        rec.finish()
        return json.dumps({"chunks": n, "bytes": total, "sha256": h.hexdigest()}).encode()

    def _chat(self, service, request_iterator, context):
        rec = self._begin(service, "Chat", context)
        context.send_initial_metadata((("x-backend-initial", "chat"),))
        for msg in request_iterator:
            rec.messages_in += 1
            yield b"echo:" + msg
        if self._cancelled_at_end_of_input(rec, context):
            return
        context.set_trailing_metadata(tuple(self._identity_trailers(rec, "Chat")))
        rec.finish()

    def _fail(self, service, request: bytes, context):
        rec = self._begin(service, "Fail", context)
        spec = json.loads(request)
        # pad_trailers: that many more trailers of 1,000 bytes each.
        pad = tuple((f"x-pad-{i}", "v" * 1000) for i in range(int(spec.get("pad_trailers", 0))))
        context.set_trailing_metadata((
            ("x-error-detail", "job-failed"),
            ("x-error-bin", ERROR_BIN),
            ("grpc-status-details-bin", STATUS_DETAILS),
        ) + pad)
        rec.finish()
        context.abort(_status(spec["code"]), spec["message"])
