"""The packed ring view: slots read as the spec reads them (AVAIL/USED against a wrap
counter), from a ring written into real memfd guest memory."""
from __future__ import annotations

import numpy as np

from vhostlab.memory import GuestMemory
from vhostlab.ring.packed_layout import (VRING_PACKED_DESC_DTYPE, PackedVringBase,
                                         packed_avail_flags, packed_used_flags)
from vhostlab.viz.packed import (PackedVirtqueueView, packed_ring_copy, slot_state,
                                 waiting_for_device)

DESC, DRIVER, DEVICE = 0x200000, 0x200100, 0x200104


def _write(memory, num, slots):
    desc = np.zeros(num, VRING_PACKED_DESC_DTYPE)
    for k, (addr, length, ident, flags) in slots.items():
        desc[k] = (addr, length, ident, flags)
    memory.write(DESC, desc.tobytes())


def test_slots_are_read_against_each_side_s_wrap_counter():
    num = 8
    with GuestMemory.allocate(16 << 20) as memory:
        # Lap 1 (wrap 1) went round whole and came back used; on lap 2 (wrap 0)
        # the driver made slots 0-4 available and the device used 0-2.
        slots = {k: (0x300000 + 2048 * k, 1514, k, packed_used_flags(1)) for k in range(num)}
        slots.update({k: (0x300000 + 2048 * k, 1514, k, packed_avail_flags(0))
                      for k in range(5)})
        slots.update({k: (0, 60, k, packed_used_flags(0)) for k in range(3)})
        _write(memory, num, slots)
        memory.write(DEVICE, (1 << 16).to_bytes(4, "little"))       # flags DISABLE
        snap = packed_ring_copy(memory, num, {"desc": DESC, "driver": DRIVER, "device": DEVICE},
                                device=(3, 0, 3, 0), driver=(5, 0, 3, 0), index=1)
    assert snap.device == PackedVringBase(3, 0, 3, 0)
    assert [slot_state(int(d["flags"])) for d in snap.desc[:5]] == \
        [("used", 0)] * 3 + [("available", 0)] * 2
    assert slot_state(int(snap.desc[7]["flags"])) == ("used", 1)
    assert waiting_for_device(snap) == [3, 4]          # stops at slot 5: lap 1's used
    assert snap.device_event == (0, 1)
    html = PackedVirtqueueView(snap, title="<TX>").to_html()
    assert "device takes (w0)" in html and "driver fills (w0)" in html
    assert "2 descriptors waiting for the device" in html and "device area DISABLE" in html
    assert "<TX>" not in html and "&lt;TX&gt;" in html


def test_waiting_crosses_the_end_of_the_ring_and_flips_the_wrap_counter():
    num = 4
    with GuestMemory.allocate(16 << 20) as memory:
        # The device is at slot 2 of lap wrap 1; the driver filled 2, 3 (wrap 1) and,
        # past the end, 0 (wrap 0). Slot 1 still holds lap 1's used descriptor.
        _write(memory, num, {0: (0x300000, 64, 7, packed_avail_flags(0)),
                             1: (0, 64, 1, packed_used_flags(1)),
                             2: (0x301000, 64, 2, packed_avail_flags(1)),
                             3: (0x302000, 64, 3, packed_avail_flags(1))})
        snap = packed_ring_copy(memory, num, {"desc": DESC}, device=(2, 1, 2, 1))
    assert waiting_for_device(snap) == [2, 3, 0]
