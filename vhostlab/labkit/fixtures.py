"""Fixtures of single labs: what one notebook needs and the others do not.

``OpReference`` records what each VhostOps call did (lab 08), ``TxRing`` is a
TX virtqueue full of frames for racing the kernels (lab 05), and ``llvm_ir``
shows the IR numba made of a kernel (lab 05). ``Lab`` hands out the first two
(``lab.op_reference()``, ``lab.tx_ring()``) and stops them with the lab.
"""
from __future__ import annotations

from vhostlab.protocol import TO_BACKEND

from .base import LabSetupError, wait_until

__all__ = ["OpReference", "TxRing", "llvm_ir"]


def llvm_ir(kernel) -> str:
    """The LLVM IR numba generates for ``kernel`` (a numba dispatcher called at least once).

    numba cannot show the IR of code it loaded from its on-disk cache, so the
    same Python source is compiled once more, uncached, for the signatures the
    kernel was called with (a second or two for a ring kernel).
    """
    import numba
    fresh = numba.njit(nogil=True)(kernel.py_func)
    for sig in kernel.signatures:
        fresh.compile(sig)
    return "\n".join(fresh.inspect_llvm(sig) for sig in fresh.signatures)


class OpReference:
    """What each VhostOps call did: the messages it sent, its local answer, or its error.

    One ``with ref.op(name):`` block per call, calling that op. An op
    vhost-user lacks (``NotSupportedByVhostUser``, naming the kernel ioctl),
    one whose protocol feature was not negotiated (``ProtocolFeatureMissing``)
    and one the back-end refused (``BackendReplyError``) are recorded as what
    happened, and not raised further. ``outcomes``: op -> {kind, detail}.
    """

    def __init__(self, ops, backend):
        self.ops, self.backend = ops, backend
        self.outcomes: dict[str, dict] = {}

    def op(self, name: str) -> "_OpCall":
        return _OpCall(self, name)

    def covered(self) -> set[str]:
        return set(self.outcomes)

    def rows(self) -> list[dict]:
        """One dict per recorded op (op, kind, detail), in the seed's order."""
        from vhostlab.frontend import VHOST_OPS_TABLE
        order = {o.name: i for i, o in enumerate(VHOST_OPS_TABLE)}
        return [dict(op=n, **self.outcomes[n]) for n in sorted(self.outcomes, key=order.get)]

    def _repr_html_(self) -> str:
        from vhostlab.viz.opoutcomes import op_outcomes_html
        return op_outcomes_html(self.rows())


class _OpCall:
    def __init__(self, ref: OpReference, name: str):
        self.ref, self.name = ref, name

    def _new(self) -> list:
        return [r for r in self.ref.backend.trace.records() if r.seq > self.seq]

    def __enter__(self) -> "_OpCall":
        self.seq = max((r.seq for r in self.ref.backend.trace.records()), default=0)
        self.ncalled = len(self.ref.ops.ops_called)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        from vhostlab.frontend import (BackendReplyError, NotSupportedByVhostUser,
                                       ProtocolFeatureMissing, op_info)
        called = self.ref.ops.ops_called[self.ncalled:]
        if self.name not in called:
            raise LabSetupError(f"the block for {self.name} called {called or 'no op'}")
        info = op_info(self.name)
        if info.messages and not info.local and exc is None:
            wait_until(self._new, 1.0)          # the back-end's thread records what it got
        sent = ", ".join(r.request for r in self._new() if r.direction == TO_BACKEND)
        if isinstance(exc, NotSupportedByVhostUser):
            kind, detail = "kernel only", f"ioctl {exc.kernel_ioctl}: {exc.reason}"
        elif isinstance(exc, ProtocolFeatureMissing):
            kind, detail = "needs a protocol feature", f"{exc.request} needs {exc.feature}"
        elif isinstance(exc, BackendReplyError):
            kind, detail = "refused by the back-end", f"{sent}: {exc}"
        elif exc is not None:
            return False
        else:
            kind, detail = ("message", sent) if sent else ("local", f"no message: {info.note}")
        self.ref.outcomes[self.name] = {"kind": kind, "detail": detail}
        return True


class TxRing:
    """A TX virtqueue in its own guest memory, full of frames, for racing the kernels.

    ``vq``: the device side (``vhostlab.ring.Virtqueue``); ``driver``: the
    guest side, which posted ``frames`` chains of a ``hdr_len``-byte
    virtio-net header and ``frame_bytes`` bytes. ``rewind()`` makes the same
    chains available again, so the Python twin and the numba kernel take the
    very same descriptors.
    """

    RING_GPA, BUF_GPA = 0x100000, 0x200000

    def __init__(self, frames: int, frame_bytes: int, hdr_len: int):
        from vhostlab.memory import GuestMemory
        from vhostlab.ring import Virtqueue, VirtqueueDriver
        num = 1 << max(frames - 1, 1).bit_length()
        self.memory = GuestMemory.allocate(8 << 20, layout="flat")
        self.driver = VirtqueueDriver(self.memory, num, self.RING_GPA)
        self.frames = [bytes([i & 0xFF]) * frame_bytes for i in range(frames)]
        stride = (hdr_len + frame_bytes + 63) // 64 * 64
        for i, frame in enumerate(self.frames):
            gpa = self.BUF_GPA + i * stride
            self.memory.write(gpa, bytes(hdr_len) + frame)
            self.driver.add_buffer([(gpa, hdr_len + len(frame), False)])
        self.driver.publish()
        self.vq = Virtqueue(1, "tx")
        self.vq.set_num(num)
        self.vq.set_addr(self.driver.desc_gpa, self.driver.avail_gpa, self.driver.used_gpa,
                         memory=self.memory)
        self.vq.set_base(0)

    def used(self):
        """A copy of the used ring's elements."""
        return self.driver.views.used_ring.copy()

    def rewind(self) -> None:
        """Forget what the device did: used ring zeroed, last_avail_idx back to 0."""
        self.memory.write(self.driver.used_gpa, bytes(4 + 8 * self.driver.num))
        self.vq.set_base(0)

    def close(self) -> None:
        self.driver = None                      # its views keep guest memory mapped
        self.memory.close()
