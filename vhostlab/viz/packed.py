"""A packed virtqueue: one descriptor ring, two event areas, and four positions.

Virtio 1.1+ section 2.8: there is no avail ring and no used ring. The driver
writes a descriptor into the next slot of the one ring and makes it
available by writing its flags last, with AVAIL equal to the driver's wrap
counter and USED the opposite. The device marks a chain used by writing back
one descriptor, in the slot where the chain began, with AVAIL and USED both
equal to the device's wrap counter. Each side's wrap counter flips whenever
its position passes the end of the ring, so a slot's two flag bits say which
lap wrote it, and who: that is what the view shows in every slot.

Positions (each an index into the ring plus a wrap counter):

    driver  next_avail   the slot it fills next         (its avail wrap counter)
            next_used    the slot it reaps next         (its used wrap counter)
    device  last_avail_idx  the slot it takes next      (avail wrap counter)
            last_used_idx   the slot it writes back next (used wrap counter)

The device's pair is what GET_VRING_BASE / SET_VRING_BASE carry for a packed
ring (``vhostlab.ring.packed_layout``): a split ring's one number is not
enough, because the same index means a different thing on alternate laps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from vhostlab.ring.layout import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from vhostlab.ring.packed_layout import (VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED,
                                         PackedRingSnapshot, packed_ring_copy, slot_state,
                                         waiting_for_device)

from ._common import esc, fmt_hex, table, wrap
from .virtqueue import VirtqueueView

__all__ = ["PackedRingSnapshot", "PackedVirtqueueView", "packed_ring_copy", "packed_view",
           "slot_state", "waiting_for_device"]

_EVENT_FLAGS = {0: "ENABLE", 1: "DISABLE", 2: "DESC"}


def _flag_names(flags: int) -> str:
    names = [n for bit, n in ((VRING_DESC_F_NEXT, "NEXT"), (VRING_DESC_F_WRITE, "WRITE"),
                              (VRING_DESC_F_INDIRECT, "INDIRECT"),
                              (VRING_PACKED_DESC_F_AVAIL, "AVAIL"),
                              (VRING_PACKED_DESC_F_USED, "USED")) if flags & bit]
    return "|".join(names) or "0"


@dataclass(eq=False, repr=False)
class PackedVirtqueueView(VirtqueueView):
    """The descriptor ring of one packed virtqueue, slot by slot, with both sides'
    positions and wrap counters; the event areas; the descriptors in use.

    ``source``: a PackedRingSnapshot, or a zero-argument callable returning
    one (read at every render). The ring is drawn ``ring_columns`` slots a
    row; rows with no position and no descriptor of the current laps fold.
    """

    source: Any = None

    def snapshot(self) -> PackedRingSnapshot:
        src = self.source
        return src() if callable(src) else src

    def to_html(self) -> str:
        snap = self.snapshot()
        title = self.title or (f"packed virtqueue {snap.index}" if snap.index is not None
                               else "packed virtqueue")
        return wrap(self._packed_summary(snap) + self._packed_ring(snap)
                    + self._packed_desc_table(snap), title, view="packed-virtqueue")

    @staticmethod
    def _packed_summary(snap: PackedRingSnapshot) -> str:
        facts = [f"num {snap.num}"]
        if snap.device is not None:
            d = snap.device
            facts.append(f"device: last_avail_idx {d.last_avail_idx} (wrap {d.avail_wrap_counter}),"
                         f" last_used_idx {d.last_used_idx} (wrap {d.used_wrap_counter})")
            facts.append(f"{len(waiting_for_device(snap))} descriptors waiting for the device")
        if snap.driver is not None:
            d = snap.driver
            facts.append(f"driver: next_avail {d.last_avail_idx} (wrap {d.avail_wrap_counter}),"
                         f" next_used {d.last_used_idx} (wrap {d.used_wrap_counter})")
        for name, (off_wrap, flags) in (("driver area", snap.driver_event),
                                        ("device area", snap.device_event)):
            how = _EVENT_FLAGS.get(flags & 3, str(flags & 3))
            extra = (f" at {off_wrap & 0x7FFF} wrap {off_wrap >> 15}" if flags & 3 == 2 else "")
            facts.append(f"{name} {how}{extra}")
        if snap.gpas:
            facts.append(", ".join(f"{k} @ {fmt_hex(v)}" for k, v in snap.gpas.items()))
        err = f"<div class='bad'>ring broken: {esc(snap.error)}</div>" if snap.error else ""
        return f"<div>{esc('; '.join(facts))}</div>{err}"

    def _packed_ring(self, snap: PackedRingSnapshot) -> str:
        num = min(snap.num, len(snap.desc), 1024)
        if num <= 0:
            return ""
        marks: dict[int, list[str]] = {}

        def mark(pos: int, text: str) -> None:
            marks.setdefault(pos % snap.num, []).append(text)

        if snap.device is not None:
            mark(snap.device.last_avail_idx, f"device takes (w{snap.device.avail_wrap_counter})")
            mark(snap.device.last_used_idx, f"device writes (w{snap.device.used_wrap_counter})")
        if snap.driver is not None:
            mark(snap.driver.last_avail_idx, f"driver fills (w{snap.driver.avail_wrap_counter})")
            mark(snap.driver.last_used_idx, f"driver reaps (w{snap.driver.used_wrap_counter})")
        waiting = set(waiting_for_device(snap))
        cells, keep = [], set(marks) | waiting
        for k in range(num):
            d = snap.desc[k]
            flags = int(d["flags"])
            state, lap = slot_state(flags)
            blank = not (int(d["addr"]) or int(d["len"]) or flags)
            colour = "#1a5fb4" if state == "available" else "#26a269"
            text = ("\u00b7" if blank else
                    f"<b style='color:{colour}'>{'A' if state == 'available' else 'U'}{lap}</b>"
                    f"<div class='muted'>id {int(d['id'])}</div>")
            tip = (f"slot {k}: {state} (lap {lap}), id {int(d['id'])}, addr "
                   f"{fmt_hex(int(d['addr']))}, len {int(d['len'])}, flags {_flag_names(flags)}")
            cells.append((text, tip, blank))
            if not blank and state == "used" and snap.driver is not None and \
                    lap == snap.driver.used_wrap_counter:
                keep.add(k)
        return self._ring_grid(cells, marks, waiting, keep,
                               "descriptor ring: A = made available by the driver, U = "
                               "written back used by the device, with the wrap counter of the "
                               "lap that wrote it; shaded: waiting for the device") + \
            "<div class='muted'>\u25b2 each side's next slot and its wrap counter (w0/w1). " \
            "A slot is available to the device when AVAIL = its wrap counter and USED is " \
            "not; used for the driver when AVAIL = USED = its wrap counter.</div>"

    def _packed_desc_table(self, snap: PackedRingSnapshot) -> str:
        waiting = waiting_for_device(snap)
        shown = sorted(set(waiting) | set(range(min(snap.num, len(snap.desc)))))
        rows, classes = [], []
        for k in shown[:self.max_desc]:
            d = snap.desc[k]
            flags = int(d["flags"])
            if not (int(d["addr"]) or int(d["len"]) or flags):
                continue
            state, lap = slot_state(flags)
            rows.append([str(k), esc(fmt_hex(int(d["addr"]))), str(int(d["len"])),
                         str(int(d["id"])), esc(_flag_names(flags)),
                         esc(f"{state}, lap {lap}" + (", waiting" if k in waiting else ""))])
            classes.append("" if k in waiting else "muted")
        return table(["slot", "addr", "len", "id", "flags", "state"], rows,
                     caption="descriptor ring, slot by slot (written slots)",
                     row_classes=classes)


def packed_view(read: Callable[[], PackedRingSnapshot], title: str | None = None) -> \
        PackedVirtqueueView:
    """A PackedVirtqueueView that reads ``read()`` at every render."""
    return PackedVirtqueueView(source=read, title=title)
