"""The same VhostOps against two back-ends: vhostlab's and DPDK's, side by side.

A learner who has watched vhostlab's back-end answer can check what was
learned against a back-end nobody here wrote: DPDK's lib/vhost, as
``dpdk-testpmd`` serves it (``vhostlab.backend.dpdk``). Both are driven the
same way, by the built-in front-end through a recording relay (so both
traces are read the same way), with the same guest and the same frames:

1. ``vhost_dev_init``: what each offers (GET_FEATURES, GET_PROTOCOL_FEATURES,
   GET_QUEUE_NUM) and how many memory regions it takes;
2. ``vhost_net_start``, then ``vhost_log_global_start``;
3. N frames transmitted; each back-end returns them to the guest's RX ring
   (vhostlab's through a loopback wire, testpmd by io forwarding), writing
   RX buffers and used rings, which it must log;
4. ``vhost_log_sync``: the pages each marked; ``vhost_dev_stop``: what each
   answers to GET_VRING_BASE.

The rows differ where the two implementations differ, and that is the
lesson: feature sets are each back-end's own choice, the ring positions and
the frames are the protocol's and must agree.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from vhostlab.frontend.dpdk_side import BACKENDS
from vhostlab.protocol import TO_BACKEND, Feature, ProtocolFeature, feature_names

__all__ = ["BackendAnswers", "BackendComparison", "compare_backends", "BACKENDS"]



@dataclass
class BackendAnswers:
    """What one back-end answered to the same calls."""

    backend: str
    features: int = 0
    protocol_features: int = 0
    queue_num: int | None = None
    memory_slots: int = 0
    vring_bases: dict = field(default_factory=dict)
    frames_sent: int = 0
    frames_back: int = 0
    frames_intact: int = 0
    pages_logged: tuple = ()
    requests: tuple = ()
    error: str | None = None

    def row(self, what: str) -> str:
        """One cell of the side-by-side table, as text."""
        if self.error:
            return f"({self.error})"
        if what == "features offered":
            return ", ".join(feature_names(self.features, Feature))
        if what == "protocol features offered":
            return ", ".join(feature_names(self.protocol_features, ProtocolFeature))
        if what == "GET_QUEUE_NUM":
            return "not asked (no MQ)" if self.queue_num is None else str(self.queue_num)
        if what == "memory slots":
            how = ("CONFIGURE_MEM_SLOTS offered, not used by this front-end"
                   if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS
                   else "no CONFIGURE_MEM_SLOTS")
            return f"{self.memory_slots} ({how}: one SET_MEM_TABLE, 8 fds at most)"
        if what == "frames back intact":
            return f"{self.frames_intact} of {self.frames_sent}"
        if what == "pages logged":
            pages = [hex(p) for p in self.pages_logged]
            return f"{len(pages)}: {', '.join(pages[:12])}{' ...' if len(pages) > 12 else ''}"
        if what == "GET_VRING_BASE":
            return ", ".join(f"vring {i}: {n}" for i, n in sorted(self.vring_bases.items()))
        raise KeyError(what)


ROWS = ("features offered", "protocol features offered", "GET_QUEUE_NUM", "memory slots",
        "frames back intact", "pages logged", "GET_VRING_BASE")


@dataclass
class BackendComparison:
    """Both back-ends' answers; prints as a table, draws as HTML in a notebook."""

    answers: tuple[BackendAnswers, ...]

    def __getitem__(self, backend: str) -> BackendAnswers:
        return next(a for a in self.answers if a.backend == backend)

    def differences(self) -> list[str]:
        """The rows where the back-ends answered differently."""
        return [r for r in ROWS if len({a.row(r) for a in self.answers}) > 1]

    def shown(self) -> list[tuple[str, list[str]]]:
        """The rows as a learner reads them: the feature bits both offer once,
        then in each column only what that back-end offers and the other does not."""
        if len(self.answers) < 2 or any(a.error for a in self.answers):
            return [(r, [a.row(r) for a in self.answers]) for r in ROWS]
        out = []
        for name, attr, flags in (("features", "features", Feature),
                                  ("protocol features", "protocol_features", ProtocolFeature)):
            both = -1
            for a in self.answers:
                both &= getattr(a, attr)
            out.append((f"{name} both offer",
                        [", ".join(feature_names(both, flags))] * len(self.answers)))
            out.append((f"{name} offered, only here",
                        [", ".join(feature_names(getattr(a, attr) & ~both, flags)) or "none"
                         for a in self.answers]))
        out += [(r, [a.row(r) for a in self.answers]) for r in ROWS[2:]]
        return out

    def __str__(self) -> str:
        rows = self.shown()
        width = max(len(r) for r, _ in rows)
        lines = [f"{'':{width}}  " + "  |  ".join(a.backend for a in self.answers)]
        lines += [f"{r:{width}}  " + "  |  ".join(cells) for r, cells in rows]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from vhostlab.viz._common import esc, table, wrap
        rows = [[esc(r)] + [esc(c) for c in cells] for r, cells in self.shown()]
        return wrap(table(["asked", *(a.backend for a in self.answers)], rows),
                    title="The same calls, two back-ends", view="compare-backends")


def _drive(backend: str, socket_path: str, frames: int, workdir: str) -> BackendAnswers:
    """Run the calls against the back-end behind ``socket_path``; collect its answers."""
    from vhostlab.backend.relay import VhostUserRelay
    from vhostlab.frontend import BuiltinVirtioNetGuest, VhostDev, VhostOps, make_frame
    from vhostlab.frontend.frames import TX
    from vhostlab.frontend.guest import RX_QUEUE
    out = BackendAnswers(backend)
    relay = VhostUserRelay(os.path.join(workdir, f"{backend}-relay.sock"), socket_path).start()
    guest = BuiltinVirtioNetGuest()
    dev = None
    try:
        ops = VhostOps.connect(relay.listen_path)
        dev = VhostDev(ops)
        dev.vhost_dev_init()
        out.features = ops.features
        replies = {r.request: r.fields.get("payload", {}) for r in relay.trace.records()
                   if r.direction != TO_BACKEND}
        out.protocol_features = int(replies.get("GET_PROTOCOL_FEATURES", {}).get("value", 0))
        if "GET_QUEUE_NUM" in replies:
            out.queue_num = int(replies["GET_QUEUE_NUM"]["value"])
        out.memory_slots = ops.vhost_backend_memslots_limit()
        guest.negotiate(dev.features)
        dev.vhost_net_start(guest)
        guest.post_rx_buffers()
        dev.vhost_log_global_start()
        dev.vhost_log_sync()                       # start from a clean log
        sent = [make_frame(TX, i, 64 + 23 * i) for i in range(frames)]
        out.frames_sent = guest.transmit(sent)
        got: list[bytes] = []
        deadline = time.monotonic() + 10.0
        while len(got) < out.frames_sent and time.monotonic() < deadline:
            guest.wait_call(RX_QUEUE, 0.1)
            got += guest.receive()
        out.frames_back = len(got)
        out.frames_intact = sum(1 for a, b in zip(got, sent) if a == b)
        out.pages_logged = tuple(int(p) for p in dev.vhost_log_sync())
        out.vring_bases = dev.vhost_dev_stop(guest)
        out.requests = tuple(r.request for r in relay.trace.records() if r.direction == TO_BACKEND)
    finally:
        if dev is not None:
            try:
                dev.vhost_dev_cleanup()
            except Exception:          # the back-end may be gone already: clean up the rest
                pass
        guest.close()
        relay.close()
    return out


def compare_backends(frames: int = 16) -> BackendComparison:
    """Drive vhostlab's back-end and DPDK's the same way; return both answers.

    Without a usable testpmd the DPDK column says why, and the comparison
    still shows vhostlab's answers.
    """
    from vhostlab.backend import BackendServer
    from vhostlab.backend.dpdk import DpdkError, DpdkVhostBackend, find_testpmd
    workdir = tempfile.mkdtemp(prefix="vhostlab-compare-")
    os.chmod(workdir, 0o700)
    answers = []
    try:
        with BackendServer(os.path.join(workdir, "vhostlab.sock"), wire="loopback") as srv:
            answers.append(_drive("vhostlab", srv.socket_path, frames, workdir))
        if not find_testpmd():
            answers.append(BackendAnswers("dpdk", error="no dpdk-testpmd here"))
        else:
            try:
                with DpdkVhostBackend(os.path.join(workdir, "dpdk.sock")) as dpdk:
                    answers.append(_drive("dpdk", dpdk.socket_path, frames, workdir))
            except DpdkError as err:
                answers.append(BackendAnswers("dpdk", error=f"testpmd did not start: {err.reason[:80]}"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return BackendComparison(tuple(answers))
