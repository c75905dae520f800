"""After the switch-over: did the guest's network state survive the migration?

Two checks, both against real parts:

- The ring positions. ``GET_VRING_BASE`` stops a ring on the source and
  returns its ``last_avail_idx``; QEMU carries that number in the virtio
  device state and gives it to the destination's back-end in
  ``SET_VRING_BASE``. Both back-ends' traces must show the same number for
  every ring, or a frame would be delivered twice or never.
- The frames. The RX frames the source back-end wrote into the guest's
  buffers, which the guest had not read before the switch-over, must be
  in the destination's RAM: the resumed driver takes them off the used
  ring and reads each buffer through the destination's qtest, and the
  frame ledger compares them byte for byte with what was sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import GuestDriverError
from .guest import RX_QUEUE
from .host import VhostUserHost, vring_bases
from .traffic import FrameLedger, is_rarp

__all__ = ["VerifyReport", "verify_destination", "check_handoff"]

START_TIMEOUT = 10.0


@dataclass
class VerifyReport:
    """What the destination showed after the switch-over.

    ``handoff``: per vring index, what the source's GET_VRING_BASE returned
    and what the destination's SET_VRING_BASE carried. ``rx_expected``: RX
    frames the source back-end left unread in guest buffers; ``rx_found``:
    used entries the destination's RAM holds for them; ``rx_intact``: how
    many of those were, byte for byte, frames that were sent; ``rarp_frames``:
    announcements found among them and left out (``skip_rarp``).
    """

    handoff: dict = field(default_factory=dict)
    rx_expected: int = 0
    rx_found: int = 0
    rx_intact: int = 0
    driver_errors: list = field(default_factory=list)
    rarp_frames: int = 0

    @property
    def handoff_ok(self) -> bool:
        return bool(self.handoff) and all(h["ok"] for h in self.handoff.values())

    @property
    def ok(self) -> bool:
        return (self.handoff_ok and not self.driver_errors
                and self.rx_found == self.rx_expected == self.rx_intact)


def check_handoff(src: VhostUserHost, dst: VhostUserHost) -> dict:
    """Per vring: the source's GET_VRING_BASE reply against the destination's SET_VRING_BASE."""
    got = vring_bases(src.trace(), "GET_VRING_BASE")
    given = vring_bases(dst.trace(), "SET_VRING_BASE")
    return {index: {"get_vring_base": got.get(index), "set_vring_base": given.get(index),
                    "ok": index in got and got.get(index) == given.get(index)}
            for index in sorted(set(got) | set(given))}


def verify_destination(src: VhostUserHost, dst: VhostUserHost, guest_state: dict,
                       rx: FrameLedger, expected_rx: int, *,
                       skip_rarp: bool = False) -> VerifyReport:
    """Resume the driver on ``dst`` and check ring positions and the migrated RX frames.

    ``skip_rarp``: RARPs in the RX ring (a back-end that answers SEND_RARP
    toward the guest, as DPDK's does through testpmd) are counted in
    ``rarp_frames``, not checked. Frames read are entered in ``rx``; the driver is left in ``dst.guest``
    with its RX buffers posted again. Driver errors (a used ring the
    migration left inconsistent) are reported, not raised.
    """
    report = VerifyReport(rx_expected=expected_rx)
    dst.wait_started(START_TIMEOUT)
    report.handoff = check_handoff(src, dst)
    try:
        guest = dst.resume_guest(guest_state)
        ring = guest.ring_state(RX_QUEUE)
        report.rx_found = found = (ring.used_idx - ring.last_used_idx) & 0xFFFF
        for i, frame in enumerate(guest.receive()):
            if skip_rarp and is_rarp(frame):
                report.rarp_frames += 1
                report.rx_found -= i < found     # the announcement is not a migrated frame
                continue
            report.rx_intact += rx.arrive(frame)
    except GuestDriverError as exc:
        report.driver_errors.append(f"on the destination: {exc.message}")
    return report
