"""Per-device Python overrides of the call decision and the RX placement
(backend.overrides): a device without them runs the kernels' path untouched; a
device with them asks the override at every used-ring update / frame."""
from __future__ import annotations

import pytest

from vhostlab.backend import overrides as overrides_module
from vhostlab.backend.overrides import (RingOverrides, reference_place_frame,
                                        reference_should_signal)
from vhostlab.qemu.host import VhostUserHost

EVENT_IDX, MRG_RXBUF = 1 << 29, 1 << 15


def _frames(n: int, size: int) -> list[bytes]:
    return [bytes([i]) * size for i in range(n)]


def _serve(qemu: str, overrides, features: int, sizes=(60, 300, 1514)):
    host = VhostUserHost("overrides", qemu=qemu)
    try:
        host.start_backend()
        host.server.device.overrides = overrides
        host.start_qemu()
        guest = host.init_guest(features=features)
        guest.post_rx_buffers(size=128 if features & MRG_RXBUF else None)
        sent = [f for n in sizes for f in _frames(1, n)]
        host.server.inject(sent)
        got = []
        for _ in range(50):
            got += guest.receive(timeout=0.2)
            if len(got) >= len(sent):
                break
        return got, sent, host.counters()
    finally:
        host.close()


def test_default_path_never_asks_an_override(requires_qemu, monkeypatch):
    def spy(*a, **k):
        raise AssertionError("the override path ran on a device without overrides")
    monkeypatch.setattr(overrides_module, "decide_call", spy)
    monkeypatch.setattr(overrides_module, "rx_burst_placed", spy)
    got, sent, counters = _serve(requires_qemu, None, EVENT_IDX | MRG_RXBUF)
    assert got == sent and counters["calls"] > 0


def test_overrides_are_asked_and_decide(requires_qemu):
    asked = {"signal": 0, "place": 0}

    def should_signal(ring):
        asked["signal"] += 1
        return reference_should_signal(ring)

    def place_frame(frame_len, hdr_len, sizes):
        asked["place"] += 1
        return reference_place_frame(frame_len, hdr_len, sizes)

    hooks = RingOverrides(should_signal=should_signal, place_frame=place_frame)
    got, sent, counters = _serve(requires_qemu, hooks, EVENT_IDX | MRG_RXBUF)
    assert got == sent
    assert asked["signal"] == len(hooks.decisions) > 0 and asked["place"] >= len(sent)
    assert all(g == w for _, g, w in hooks.decisions) and not hooks.errors
    # a ring whose call fd QEMU has not set (yet) takes a decision but makes no call
    assert 0 < counters["calls"] <= hooks.calls()[0]


def test_an_override_that_never_signals_makes_no_call(requires_qemu):
    hooks = RingOverrides(should_signal=lambda ring: False)
    _serve(requires_qemu, hooks, EVENT_IDX, sizes=(60,))
    assert hooks.calls()[0] == 0 < hooks.calls()[1]


@pytest.mark.parametrize("frame_len, sizes, want", [
    (60, [1536], (1, [72])), (300, [128, 128, 128], (3, [128, 128, 56])),
    (1000, [128, 128], None)])
def test_reference_placement(frame_len, sizes, want):
    assert reference_place_frame(frame_len, 12, sizes) == want
