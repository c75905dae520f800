"""The guest memory map: each region's GPA range, front-end address and fd offset.

SET_MEM_TABLE (vhost-user.rst, "Memory region description") gives per region
``guest_phys_addr``, ``memory_size``, ``userspace_addr`` (the front-end's
virtual address of the region: QEMU's, used again in SET_VRING_ADDR) and
``mmap_offset`` (where the region starts in the fd that comes with it). The
back-end maps ``memory_size`` bytes of the fd at ``mmap_offset`` and then
translates: GPA -> host pointer for descriptors, front-end address -> GPA for
the ring addresses.

The SVG draws three lanes (guest-physical, front-end virtual, fd offset) with
each region as a bar in every lane and a band joining them; small regions get
a minimum width so QEMU's 768 KiB low-RAM region stays visible next to the
255 MiB one. The table below it carries the exact numbers.
"""
from __future__ import annotations

from typing import Any, Mapping

from ._common import View, esc, field, fmt_hex, fmt_size, resolve, table, wrap

COLOURS = ("#3584e4", "#33d17a", "#f6d32d", "#ff7800", "#e01b24", "#9141ac",
           "#986a44", "#5e5c64")


def memory_regions(source: Any) -> list[Any]:
    """The regions of a memory object, memory table, back-end state or list, read now."""
    src = source
    for _ in range(5):
        if isinstance(src, (list, tuple)):
            return list(src)
        payload = field(src, "payload", default=None)
        if payload is not None and hasattr(payload, "regions"):
            return list(payload.regions)
        regions = field(src, "regions", default=None)
        if regions is not None:
            regions = regions() if callable(regions) else regions
            return list(regions.values() if isinstance(regions, Mapping) else regions)
        inner = field(src, "memory", "mem_table", "memory_table", "guest_memory", "mem",
                      default=None)
        if inner is not None:
            src = inner
            continue
        new = resolve(src, "snapshot", "state")
        if new is src:
            break
        src = new
    raise TypeError(f"cannot find memory regions in {type(source).__name__}")


def region_row(region: Any) -> dict:
    """The four spec fields of a region (plus its fd when the object knows it)."""
    return {
        "guest_phys_addr": int(field(region, "guest_phys_addr")),
        "memory_size": int(field(region, "memory_size")),
        "userspace_addr": int(field(region, "userspace_addr")),
        "mmap_offset": int(field(region, "mmap_offset")),
        "fd": field(region, "fd", default=None),
    }


class _Lane:
    """A linear scale from [lo, hi) to [x0, x1) pixels with a minimum bar width."""

    def __init__(self, lo: int, hi: int, x0: float, x1: float, min_w: float = 8.0):
        self.lo, self.hi, self.x0, self.x1, self.min_w = lo, max(hi, lo + 1), x0, x1, min_w

    def bar(self, start: int, size: int) -> tuple[float, float]:
        span = self.hi - self.lo
        a = self.x0 + (start - self.lo) / span * (self.x1 - self.x0)
        w = max(self.min_w, size / span * (self.x1 - self.x0))
        a = min(max(a, self.x0), self.x1 - self.min_w)
        return a, min(w, self.x1 - a)


LANES = (("guest-physical (GPA)", "guest_phys_addr"), ("front-end virtual", "userspace_addr"),
         ("offset in fd", "mmap_offset"))
LANE_Y = (20, 90, 160)
BAR_H = 16


def _lane_svg(rows: list[dict], key: str, label: str, y: int, x0: float, x1: float,
              parts: list[str]) -> tuple[_Lane, list[tuple[float, float]]]:
    """Draw one lane (axis, ends, a bar per region); returns its scale and bars."""
    lo = min((r[key] for r in rows), default=0) if key == "userspace_addr" else 0
    hi = max((r[key] + r["memory_size"] for r in rows), default=1)
    lane = _Lane(lo, hi, x0, x1)
    h = BAR_H
    parts.append(f"<text x='4' y='{y + 12}'>{esc(label)}</text>"
                 f"<line x1='{x0}' y1='{y + h}' x2='{x1}' y2='{y + h}' stroke='#999'/>"
                 f"<text x='{x0}' y='{y + h + 11}' fill='#666'>{esc(fmt_hex(lo))}</text>"
                 f"<text x='{x1}' y='{y + h + 11}' fill='#666' text-anchor='end'>"
                 f"{esc(fmt_hex(hi))}</text>")
    bars = []
    for i, r in enumerate(rows):
        a, w = lane.bar(r[key], r["memory_size"])
        bars.append((a, w))
        tip = (f"region {i}: {key} {fmt_hex(r[key])}, size {fmt_hex(r['memory_size'])} "
               f"({fmt_size(r['memory_size'])})")
        parts.append(f"<rect x='{a:.1f}' y='{y}' width='{w:.1f}' height='{h}' "
                     f"fill='{COLOURS[i % len(COLOURS)]}' stroke='#333' stroke-width='0.5'>"
                     f"<title>{esc(tip)}</title></rect>")
    return lane, bars


def _marks_svg(lane: _Lane, marks: Mapping[str, int], y: int, parts: list[str]) -> None:
    """Pin named GPAs (ring addresses, say) above the guest-physical lane."""
    for name, gpa in marks.items():
        mx = lane.x0 + (int(gpa) - lane.lo) / (lane.hi - lane.lo) * (lane.x1 - lane.x0)
        mx = min(max(mx, lane.x0), lane.x1)
        parts.append(f"<line x1='{mx:.1f}' y1='{y - 4}' x2='{mx:.1f}' y2='{y + BAR_H}' "
                     f"stroke='#c01c28'><title>{esc(name)} {esc(fmt_hex(gpa))}</title>"
                     f"</line><text x='{mx:.1f}' y='{y - 6}' fill='#c01c28' "
                     f"text-anchor='middle'>{esc(name)}</text>")


def _lanes_svg(rows: list[dict], marks: Mapping[str, int], width: int = 720) -> str:
    """Three lanes, a bar per region in each, bands joining a region's bars."""
    x0, x1 = 150, width - 10
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='200' "
             f"font-family='monospace' font-size='10'>"]
    bars = []
    for (label, key), y in zip(LANES, LANE_Y):
        lane, lane_bars = _lane_svg(rows, key, label, y, x0, x1, parts)
        bars.append(lane_bars)
        if key == "guest_phys_addr":
            _marks_svg(lane, marks, y, parts)
    for i in range(len(rows)):
        colour = COLOURS[i % len(COLOURS)]
        for k in range(len(LANES) - 1):
            (a, w), (b, v) = bars[k][i], bars[k + 1][i]
            top, bot = LANE_Y[k] + BAR_H, LANE_Y[k + 1]
            parts.append(f"<polygon points='{a:.1f},{top} {a + w:.1f},{top} {b + v:.1f},{bot} "
                         f"{b:.1f},{bot}' fill='{colour}' fill-opacity='0.25'/>")
    parts.append("</svg>")
    return "".join(parts)


class MemoryMapView(View):
    """The memory table as lanes and a table, read from ``source`` at each render.

    ``source``: a guest memory object, a back-end (or its state snapshot), a
    SET_MEM_TABLE Message or its MemoryTable payload, or a list of regions.
    ``marks``: optional GPAs to pin on the guest-physical lane
    (``{"vq0 desc": 0x1000000}``).
    """

    def __init__(self, source: Any, marks: Mapping[str, int] | None = None,
                 title: str | None = "Guest memory map") -> None:
        self.source = source
        self.marks = dict(marks or {})
        self.title = title

    def rows(self) -> list[dict]:
        """The regions as dicts of the spec's fields, read now."""
        return [region_row(r) for r in memory_regions(self.source)]

    def _repr_svg_(self) -> str:
        return _lanes_svg(self.rows(), self.marks)

    def to_html(self) -> str:
        rows = self.rows()
        if not rows:
            return wrap("<div class='muted'>no memory table yet (no SET_MEM_TABLE)</div>",
                        self.title, view="memory-map")
        cells = []
        for i, r in enumerate(rows):
            swatch = (f"<span style='display:inline-block;width:10px;height:10px;"
                      f"background:{COLOURS[i % len(COLOURS)]}'></span> {i}")
            end = r["guest_phys_addr"] + r["memory_size"] - 1
            cells.append([swatch, esc(fmt_hex(r["guest_phys_addr"])), esc(fmt_hex(end)),
                          f"{esc(fmt_hex(r['memory_size']))} ({esc(fmt_size(r['memory_size']))})",
                          esc(fmt_hex(r["userspace_addr"])), esc(fmt_hex(r["mmap_offset"])),
                          "" if r["fd"] is None else esc(r["fd"])])
        headers = ["region", "guest_phys_addr", "last GPA", "memory_size", "userspace_addr",
                   "mmap_offset", "fd"]
        if all(r["fd"] is None for r in rows):
            headers.pop()
            cells = [c[:-1] for c in cells]
        total = sum(r["memory_size"] for r in rows)
        caption = f"{len(rows)} regions, {fmt_size(total)} of guest RAM"
        return wrap(_lanes_svg(rows, self.marks) + table(headers, cells, caption=caption),
                    self.title, view="memory-map")
