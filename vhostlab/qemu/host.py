"""One "host" of the lab: a vhostlab back-end in this process and a real QEMU driving it.

A live migration needs two hosts, each with its own back-end: QEMU's
vhost-user netdev connects (as a client) to the back-end's unix socket, and
the back-end maps that QEMU's guest RAM. :class:`VhostUserHost` pairs one
``vhostlab.backend.BackendServer`` (serving in a background thread, its
guest TX frames kept by a :class:`~.traffic.CaptureWire`) with one
:class:`~.launcher.QemuInstance` whose virtio-net is plugged into it.

The back-end's socket lives in a private (0700) directory named like the
launcher's work directories, so one left by a killed process is swept by
the next start. ``close()`` (also run by the garbage collector and at
interpreter exit) stops QEMU first, then the back-end, then removes the
directory; it is safe to call twice.

The module also reads the back-end's message trace the way the labs do:
:func:`ops_called` names the VhostOps QEMU invoked, message by message
(hw/virtio/vhost-user.c ``user_ops``), and :func:`vring_bases` pulls the
ring positions out of GET_VRING_BASE replies and SET_VRING_BASE requests.
"""
from __future__ import annotations

import os
import weakref
from typing import Iterable, Mapping

from vhostlab.backend import BackendServer, CaptureWire, TraceRecord
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND

from .guest import QTestVirtioNetGuest
from .launcher import (DEFAULT_RAM_SIZE, QemuInstance, close_each, make_workdir, started,
                       vhost_user_netdev)

__all__ = ["VhostUserHost", "MESSAGE_OPS", "ops_called", "vring_bases", "process_peak_rss"]

# Which VhostOps entry of QEMU's user_ops sends each vhost-user request
# (hw/virtio/vhost-user.c). Requests sent before SET_OWNER on a connection
# come from vhost_user_backend_init (the op vhost_backend_init): GET_FEATURES,
# GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS.
MESSAGE_OPS = {
    "GET_FEATURES": "vhost_get_features",
    "SET_FEATURES": "vhost_set_features",
    "SET_OWNER": "vhost_set_owner",
    "RESET_OWNER": "vhost_reset_device",
    "RESET_DEVICE": "vhost_reset_device",
    "SET_MEM_TABLE": "vhost_set_mem_table",
    "ADD_MEM_REG": "vhost_set_mem_table",      # with CONFIGURE_MEM_SLOTS, one region a message
    "REM_MEM_REG": "vhost_set_mem_table",
    "SET_LOG_BASE": "vhost_set_log_base",
    "SET_VRING_NUM": "vhost_set_vring_num",
    "SET_VRING_ADDR": "vhost_set_vring_addr",
    "SET_VRING_BASE": "vhost_set_vring_base",
    "GET_VRING_BASE": "vhost_get_vring_base",
    "SET_VRING_KICK": "vhost_set_vring_kick",
    "SET_VRING_CALL": "vhost_set_vring_call",
    "SET_VRING_ERR": "vhost_set_vring_err",     # an op added after the seed's list
    "SET_VRING_ENABLE": "vhost_set_vring_enable",
    "SET_VRING_ENDIAN": "vhost_set_vring_endian",
    "GET_PROTOCOL_FEATURES": "vhost_backend_init",
    "SET_PROTOCOL_FEATURES": "vhost_backend_init",
    "GET_QUEUE_NUM": "vhost_backend_init",
    "GET_MAX_MEM_SLOTS": "vhost_backend_init",
    "SET_BACKEND_REQ_FD": "vhost_backend_init",
    "SEND_RARP": "vhost_migration_done",
    "NET_SET_MTU": "vhost_net_set_mtu",
    "GET_CONFIG": "vhost_get_config",
    "SET_CONFIG": "vhost_set_config",
    "IOTLB_MSG": "vhost_send_device_iotlb_msg",
    "CREATE_CRYPTO_SESSION": "vhost_crypto_create_session",
    "CLOSE_CRYPTO_SESSION": "vhost_crypto_close_session",
    # With the STATUS protocol feature (QEMU 7.2 and later): vhost_user_dev_start
    # (the op vhost_dev_start, newer than the seed's list) adds DRIVER_OK at
    # start and clears the status at stop; vhost_user_set_features adds
    # FEATURES_OK, so right after SET_FEATURES they belong to vhost_set_features.
    "GET_STATUS": "vhost_dev_start",
    "SET_STATUS": "vhost_dev_start",
}
# Ops that send several messages in one call: consecutive messages are one call.
_MULTI_MESSAGE_OPS = {"vhost_backend_init", "vhost_set_mem_table", "vhost_dev_start"}
_STATUS_REQUESTS = ("GET_STATUS", "SET_STATUS")


def ops_called(*traces: Iterable[TraceRecord]) -> list[str]:
    """The VhostOps QEMU invoked, in time order, as seen in back-end message traces.

    Each argument is one back-end's trace (e.g. source and destination);
    only front-end requests (TO_BACKEND) count. A request that no op of the
    seed's table sends appears as ``(NAME)``.
    """
    tagged = [(rec.time, n, rec) for n, trace in enumerate(traces) for rec in trace
              if rec.direction == TO_BACKEND and not rec.error]
    out: list[str] = []
    last: dict[int, str] = {}               # the op of each trace's previous request
    owned: set[tuple[int, int]] = set()
    for _, n, rec in sorted(tagged, key=lambda t: (t[0], t[1], t[2].seq)):
        key = (n, rec.connection)
        if rec.request == "SET_OWNER":
            owned.add(key)
        if key not in owned and (rec.request == "GET_FEATURES"
                                 or MESSAGE_OPS.get(rec.request) == "vhost_backend_init"):
            op = "vhost_backend_init"
        elif rec.request in _STATUS_REQUESTS and last.get(n) == "vhost_set_features":
            op = "vhost_set_features"
        else:
            op = MESSAGE_OPS.get(rec.request, f"({rec.request})")
        merge = last.get(n) == op and (op in _MULTI_MESSAGE_OPS or rec.request in _STATUS_REQUESTS)
        last[n] = op
        if merge:
            continue
        out.append(op)
    return out


def vring_bases(records: Iterable[TraceRecord], request: str) -> dict[int, int]:
    """Ring positions by vring index: the last GET_VRING_BASE reply or SET_VRING_BASE seen.

    ``request`` is "GET_VRING_BASE" (the back-end's replies: last_avail_idx
    when it stopped) or "SET_VRING_BASE" (what the front-end told it).
    """
    want = TO_FRONTEND if request == "GET_VRING_BASE" else TO_BACKEND
    bases: dict[int, int] = {}
    for rec in records:
        if rec.request == request and rec.direction == want and not rec.error:
            payload = rec.fields.get("payload") or {}
            if "index" in payload and "num" in payload:
                bases[int(payload["index"])] = int(payload["num"])
    return bases


def _vm_hwm(pid: int | None) -> int:
    """Peak resident set (VmHWM) of process ``pid`` in bytes; 0 if it is gone."""
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_peak_rss() -> int:
    """This process' peak resident set size in bytes."""
    return _vm_hwm(os.getpid())


class _HostParts:
    """What a host owns, closed by a finalizer that holds no reference to the host."""

    def __init__(self) -> None:
        self.qemu: QemuInstance | None = None
        self.server: BackendServer | None = None
        self.workdir: str | None = None
        self.qemu_peak_rss = 0

    def close_qemu(self) -> None:
        if self.qemu is not None:
            self.qemu_peak_rss = max(self.qemu_peak_rss, _vm_hwm(self.qemu.pid)
                                     if self.qemu.alive() else 0)
            self.qemu.close()

    def close_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    def close(self) -> None:
        close_each(self.close_qemu, self.close_server, workdir=self.workdir)
        self.workdir = None


class VhostUserHost:
    """A vhostlab back-end (in-process, background thread) and a QEMU plugged into it.

    ``incoming=True`` makes QEMU a migration destination (``-incoming``, see
    :attr:`migration_uri`). ``reconnect`` (seconds) lets QEMU reconnect to a
    restarted back-end. ``break_logging`` makes the back-end skip dirty
    logging (the demo's negative control). ``handlers`` (request -> handler)
    replace the back-end's own, as ``BackendServer(handlers=...)``. Use as a context manager, or
    ``start()`` / ``close()``.
    """

    def __init__(self, name: str, *, ram_size: int = DEFAULT_RAM_SIZE, incoming: bool = False,
                 break_logging: bool = False, reconnect: int | None = None,
                 qemu: str | None = None, timeout: float = 10.0,
                 handlers: Mapping | None = None):
        self.name, self.ram_size, self.incoming = name, ram_size, incoming
        self.handlers = handlers
        self.break_logging, self.reconnect = break_logging, reconnect
        self.qemu_path, self.timeout = qemu, timeout
        self.wire = CaptureWire()
        self.guest: QTestVirtioNetGuest | None = None
        self._own = _HostParts()
        self._finalizer = weakref.finalize(self, self._own.close)

    # -- pieces -----------------------------------------------------------------
    @property
    def socket_path(self) -> str:
        """The back-end's unix socket (in a private directory made on first use)."""
        if self._own.workdir is None:
            self._own.workdir = make_workdir(self.name, closed=not self._finalizer.alive)
        return os.path.join(self._own.workdir, "vhost-user.sock")

    @property
    def server(self) -> BackendServer:
        return started(self._own.server, f"{self.name}: the back-end")

    @property
    def qemu(self) -> QemuInstance:
        return started(self._own.qemu, f"{self.name}: QEMU")

    @property
    def migration_uri(self) -> str:
        return self.qemu.migration_uri

    def start_backend(self) -> BackendServer:
        """Start (or, after ``stop_backend``, restart) the back-end on :attr:`socket_path`."""
        if self._own.server is not None and self._own.server.running:
            raise RuntimeError(f"{self.name}: the back-end is already running")
        self._own.server = BackendServer(self.socket_path, wire=self.wire,
                                         break_logging=self.break_logging,
                                         handlers=self.handlers).start()
        return self._own.server

    def stop_backend(self) -> None:
        """Stop the back-end (QEMU sees its vhost-user connection close)."""
        self._own.close_server()

    def start_qemu(self) -> QemuInstance:
        """Start QEMU with its NIC on the back-end (which must be listening)."""
        if self._own.qemu is not None and self._own.qemu.alive():
            raise RuntimeError(f"{self.name}: QEMU is already running (close_qemu() first)")
        netdev = vhost_user_netdev(self.socket_path, reconnect=self.reconnect)
        self._own.qemu = QemuInstance(netdev, ram_size=self.ram_size, incoming=self.incoming,
                                      qemu=self.qemu_path, name=self.name,
                                      timeout=self.timeout)
        self._own.qemu.start()
        return self._own.qemu

    def start(self) -> "VhostUserHost":
        """Back-end first (QEMU connects to it while starting), then QEMU."""
        try:
            self.start_backend()
            self.start_qemu()
        except BaseException:
            self.close()
            raise
        return self

    def init_guest(self, **kwargs) -> QTestVirtioNetGuest:
        """Initialise the virtio-net driver over qtest (DRIVER_OK starts the vhost device)."""
        self.guest = self.qemu.guest(**kwargs)
        return self.guest

    def resume_guest(self, state: dict) -> QTestVirtioNetGuest:
        """Adopt a migrated driver (``QTestVirtioNetGuest.export_state()`` of the source)."""
        self.guest = QTestVirtioNetGuest.resume(self.qemu.qtest, state)
        return self.guest

    # -- observations -------------------------------------------------------------
    def counters(self) -> dict:
        """The back-end's counters (frames, bytes, pages logged, messages, errors)."""
        return dict(self.server.snapshot(trace=False).counters)

    def trace(self, since: int = 0) -> tuple[TraceRecord, ...]:
        """Every message the back-end saw and sent (its bounded trace), after seq ``since``."""
        return self.server.trace.records(since=since)

    @property
    def tracing(self) -> bool:
        """Whether there is a back-end whose trace :meth:`trace` reads."""
        return self._own.server is not None

    def wait_started(self, timeout: float) -> bool:
        """Wait until the back-end runs every ring (RESUME can come before the
        destination's vhost_dev_start has finished); False if it did not in time."""
        return self.server.wait_for(lambda s: bool(s.vrings) and all(v.started for v in s.vrings),
                                    timeout)

    def qemu_peak_rss(self) -> int:
        """QEMU's peak resident set in bytes (remembered after it stopped)."""
        q = self._own.qemu
        if q is not None and q.alive():
            self._own.qemu_peak_rss = max(self._own.qemu_peak_rss, _vm_hwm(q.pid))
        return self._own.qemu_peak_rss

    # -- life cycle -----------------------------------------------------------------
    def close_qemu(self) -> None:
        """Stop QEMU only (its peak RSS is remembered)."""
        self._own.close_qemu()

    def close(self) -> None:
        """Stop QEMU, then the back-end; remove the socket directory. Idempotent."""
        if self._finalizer.alive:
            self._finalizer()

    def __enter__(self) -> "VhostUserHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<VhostUserHost {self.name} backend={self._own.server is not None} "
                f"qemu={self._own.qemu!r}>")
