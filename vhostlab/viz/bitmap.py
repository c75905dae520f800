"""A raw dirty log as an image, one pixel per 4 KiB page (``LogBitmapView``).

For reading a migration, use ``DirtyBitmapView`` (dirtymap.py): bands,
zoom, the log beside the guest's own writes. This one draws any log as it
is now, and the live rounds while a migration runs.

The vhost log (vhost-user.rst, "Migration"): "The log is a bitmap; bit
``page % 8`` of byte ``page // 8`` is set when the back-end wrote page
``page = guest_phys_addr // 4096``". Rows are 256 pages wide, so one row of
the image is 1 MiB of guest RAM and a 256 MiB guest (65536 pages) is a 256x256
image. Larger guests are binned (one pixel = several pages, said in the
caption) so the picture stays small.

Colours, per migration round: white-grey = never dirtied, grey = dirtied in an
earlier round but not this one, yellow to dark red = dirtied this round, the
darker the more rounds have dirtied it so far (hot pages keep coming back,
which is why pre-copy needs a stop-and-copy at the end).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from vhostlab.protocol.constants import VHOST_LOG_PAGE

from ._common import View, esc, field, fmt_size, resolve, rounds_of, wrap
from .png import data_uri, rgb_png

ROW_PAGES = 256
MAX_ROWS = 256

NEVER = (244, 244, 244)
EARLIER = (190, 190, 190)
PADDING = (255, 255, 255)


#: Logs of more pages than this (16 GiB of guest RAM) are first reduced at the
#: byte level, so that drawing a hostile 256 MiB log never unpacks 2**31 bools.
MAX_UNPACKED_PAGES = 1 << 22
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _raw(bitmap: Any) -> np.ndarray:
    if isinstance(bitmap, np.ndarray):
        return np.ascontiguousarray(bitmap).view(np.uint8).ravel()
    return np.frombuffer(bytes(bitmap), dtype=np.uint8)


def page_bits(bitmap: Any, pages: int | None = None) -> np.ndarray:
    """Unpack a vhost log bitmap into one bool per page (bit page%8 of byte page//8)."""
    bits = np.unpackbits(_raw(bitmap), bitorder="little").astype(bool)
    if pages is not None:
        bits = bits[:pages] if pages <= bits.size else np.pad(bits, (0, pages - bits.size))
    return bits


def _cells(bitmap: Any, pages: int | None) -> tuple[np.ndarray, int]:
    """One bool per page, or per group of pages for very large logs: (bits, pages per bool)."""
    raw = _raw(bitmap)
    if raw.size * 8 <= MAX_UNPACKED_PAGES:
        return page_bits(raw, pages), 1
    group = -(-raw.size * 8 // MAX_UNPACKED_PAGES // 8)       # bytes per bool
    padded = np.pad(raw, (0, (-raw.size) % group))
    return padded.reshape(-1, group).any(axis=1), 8 * group


def popcount(bitmap: Any) -> int:
    """How many pages a bitmap marks."""
    return int(_POPCOUNT[_raw(bitmap)].sum(dtype=np.int64))


_RAW = (bytes, bytearray, memoryview, np.ndarray)


def _bitmap_of(item: Any, name: str = "log_bitmap") -> Any:
    """The bitmap inside a round snapshot, a dirty log (or its snapshot), a
    back-end (or its state snapshot, via its ``log``), or a raw bitmap; None
    when there is no log yet."""
    for _ in range(4):
        if item is None or isinstance(item, _RAW):
            return item
        item = resolve(item, "snapshot")
        if item is None or isinstance(item, _RAW):
            return item
        item = field(item, name, "bitmap", "log", "dirty_bitmap", default=None)
    raise TypeError(f"cannot find a dirty bitmap in {type(item).__name__}")


def dirty_counts(bitmaps: Sequence[Any], pages: int | None = None,
                 name: str = "log_bitmap") -> np.ndarray:
    """How many of ``bitmaps`` (or round snapshots) mark each page (uint16 per page;
    per group of pages for logs beyond MAX_UNPACKED_PAGES)."""
    bits = [_cells(_bitmap_of(b, name), None)[0] for b in bitmaps]
    n = pages if pages is not None else max((b.size for b in bits), default=0)
    counts = np.zeros(n, dtype=np.uint16)
    for b in bits:
        m = min(n, b.size)
        counts[:m] += b[:m]
    return counts


def _bin(values: np.ndarray, factor: int) -> np.ndarray:
    """Combine ``factor`` consecutive pages into one pixel (max of the group)."""
    if factor == 1:
        return values
    pad = (-values.size) % factor
    return np.pad(values, (0, pad)).reshape(-1, factor).max(axis=1)


def bitmap_rgb(current: np.ndarray, counts: np.ndarray | None = None,
               width: int = ROW_PAGES, max_rows: int = MAX_ROWS) -> tuple[np.ndarray, int]:
    """Colour pages into an (H, width, 3) image; returns it and pages per pixel.

    ``current`` marks the pages dirty now (this round); ``counts`` how many
    rounds so far dirtied each page (defaults to ``current``).
    """
    from matplotlib import colormaps

    current = np.asarray(current, dtype=bool)
    counts = current.astype(np.uint16) if counts is None else np.asarray(counts)
    factor = max(1, -(-current.size // (width * max_rows)))
    cur = _bin(current, factor)
    cnt = _bin(counts[:current.size], factor).astype(np.int64)
    top = max(1, int(cnt.max(initial=0)))
    cmap = colormaps["YlOrRd"]
    # Count 1 is a clear orange-yellow, the highest count is dark red.
    shade = 0.35 + 0.65 * (np.clip(cnt, 1, top) - 1) / max(1, top - 1)
    colours = (cmap(shade)[:, :3] * 255).round().astype(np.uint8)
    rgb = np.empty((cur.size, 3), dtype=np.uint8)
    rgb[:] = NEVER
    rgb[cnt > 0] = EARLIER
    rgb[cur] = colours[cur]
    rows = max(1, -(-cur.size // width))
    image = np.empty((rows * width, 3), dtype=np.uint8)
    image[:] = PADDING
    image[:cur.size] = rgb
    return image.reshape(rows, width, 3), factor


def dirty_ranges(bits: np.ndarray, limit: int = 8,
                 page: int = VHOST_LOG_PAGE) -> list[tuple[int, int]]:
    """The first ``limit`` runs of dirty pages as (first GPA, last GPA) pairs
    (``page``: bytes per bool, larger for binned logs)."""
    b = np.concatenate(([False], np.asarray(bits, dtype=bool), [False]))
    edges = np.flatnonzero(np.diff(b.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    return [(int(s) * page, int(e) * page - 1) for s, e in zip(starts[:limit], ends[:limit])]


@dataclass(eq=False, repr=False)
class LogBitmapView(View):
    """The dirty log as an image, for one bitmap or one round of a migration.

    ``source`` is a dirty log (anything with ``snapshot()`` returning the
    bitmap), a back-end (its state snapshot's ``log``), a bitmap (bytes or
    numpy uint8), a sequence of per-round snapshots, or a migration object
    holding them (``snapshots``); it is read again at every render. ``round`` picks a round (0-based index,
    default: the last); colours count the rounds up to it that dirtied each
    page. ``bitmap`` names the round snapshots' field to draw: "log_bitmap"
    (what the back-end marked in the vhost log) or, say, "guest_bitmap".
    """

    source: Any
    round: int | None = None
    pages: int | None = None
    title: str | None = None
    scale: int = 2
    bitmap: str = "log_bitmap"

    def _rounds(self, src: Any) -> list[Any] | None:
        """The round snapshots, or None when ``src`` is one log or bitmap."""
        if isinstance(src, _RAW):
            return None
        if isinstance(src, (list, tuple)):
            return list(src)
        rounds = rounds_of(src)
        missing = object()
        if not rounds and field(src, "log_bitmap", "bitmap", "log", default=missing) \
                is not missing:
            return None                      # a log (or the place one will be)
        return rounds

    def data(self) -> dict:
        """Read the source now: page bits (``per`` pages each), counts, totals, label."""
        src = resolve(self.source, "snapshot")
        rounds = self._rounds(src)
        if rounds is None:
            bitmap = _bitmap_of(src)
            label = "dirty log now" if bitmap is not None else "no dirty log yet"
            bitmap = b"" if bitmap is None else bitmap
            bits, per = _cells(bitmap, self.pages)
            return self._result(bitmap, bits, per, bits.astype(np.uint16), label)
        if not rounds:
            bits = np.zeros(self.pages or 0, dtype=bool)
            return self._result(b"", bits, 1, bits.astype(np.uint16), "no rounds yet")
        r = len(rounds) - 1 if self.round is None else min(max(self.round, 0), len(rounds) - 1)
        bitmap = _bitmap_of(rounds[r], self.bitmap)
        bits, per = _cells(bitmap, self.pages)
        counts = dirty_counts(rounds[:r + 1], bits.size, self.bitmap)
        label = f"round {r + 1}"
        if not isinstance(rounds[r], _RAW):
            number = field(rounds[r], "round", "number", "dirty_sync_count", default=r + 1)
            label = f"round {number}"
            phase = field(rounds[r], "phase", "status", default=None)
            label += f" ({phase})" if phase else ""
        return self._result(bitmap, bits, per, counts, label, r, len(rounds))

    def _result(self, bitmap: Any, bits: np.ndarray, per: int, counts: np.ndarray,
                label: str, r: int | None = None, nrounds: int = 0) -> dict:
        total = bits.size if per == 1 else _raw(bitmap).size * 8
        return {"bits": bits, "per": per, "counts": counts, "label": label, "round": r,
                "rounds": nrounds, "pages": total,
                "dirty": int(bits.sum()) if per == 1 else popcount(bitmap)}

    def png(self) -> bytes:
        """The image alone: one pixel per page (or per bin of pages)."""
        d = self.data()
        rgb, _ = bitmap_rgb(d["bits"], d["counts"])
        return rgb_png(rgb)

    def to_html(self) -> str:
        d = self.data()
        rgb, factor = bitmap_rgb(d["bits"], d["counts"])
        factor *= d["per"]
        h, w, _ = rgb.shape
        img = (f"<img src='{data_uri(rgb_png(rgb))}' width='{w * self.scale}' "
               f"height='{h * self.scale}' style='image-rendering: pixelated; "
               f"border: 1px solid #999' alt='dirty bitmap, {esc(d['label'])}'>")
        per_px = "1 page" if factor == 1 else f"{factor} pages"
        legend = self._legend(int(d["counts"].max(initial=0)))
        found = dirty_ranges(d["bits"], 9, VHOST_LOG_PAGE * d["per"])
        ranges = ", ".join(f"{a:#x}-{b:#x}" for a, b in found[:8])
        more = " ..." if len(found) > 8 else ""
        caption = (f"<div>{esc(d['label'])}: <b>{d['dirty']}</b> of {d['pages']} pages dirty "
                   f"({esc(fmt_size(d['dirty'] * VHOST_LOG_PAGE))}); 1 pixel = {per_px} of "
                   f"4 KiB, one row = {esc(fmt_size(w * factor * VHOST_LOG_PAGE))} of guest "
                   f"RAM</div><div class='muted'>dirty GPA ranges: {esc(ranges or 'none')}"
                   f"{more}</div>")
        return wrap(f"{caption}{img}{legend}", self.title, view="log-bitmap")

    @staticmethod
    def _legend(top: int) -> str:
        from matplotlib import colormaps

        def swatch(rgb: tuple, text: str) -> str:
            colour = "#%02x%02x%02x" % tuple(int(c) for c in rgb)
            return (f"<span style='display:inline-block;width:10px;height:10px;"
                    f"background:{colour};border:1px solid #999'></span> {esc(text)} ")

        cmap = colormaps["YlOrRd"]
        items = [swatch(NEVER, "never dirtied"), swatch(EARLIER, "dirtied earlier")]
        for n in sorted({1, top} if top > 1 else {1}):
            shade = 0.35 + 0.65 * (n - 1) / max(1, top - 1)
            items.append(swatch(tuple(c * 255 for c in cmap(shade)[:3]),
                                f"dirty now, {n} round{'s' if n > 1 else ''}"))
        return f"<div class='muted'>{''.join(items)}</div>"
