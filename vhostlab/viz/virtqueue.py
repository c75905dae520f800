"""A split virtqueue: descriptor table with chains, avail ring, used ring.

Virtio 1.x section 2.7 (split virtqueues): the driver puts a chain of
descriptors (``addr, len, flags, next``; ``VRING_DESC_F_NEXT`` links them,
``VRING_DESC_F_WRITE`` marks device-writable buffers) in the table, writes
the head's index into ``avail.ring[avail.idx % num]`` and then bumps
``avail.idx``. The device takes heads from ``last_avail_idx`` (its own
counter, the number GET_VRING_BASE returns) up to ``avail.idx``, and returns
each chain as ``used.ring[used.idx % num] = {id, len}`` before bumping
``used.idx``.

The view reads a ring snapshot each time it renders: the ring layer's state,
a back-end's ring state view, or a guest driver's ring state; ``ring_snapshot``
turns any of them into one ``RingSnapshot``. All of it is guest-controlled:
chain walks are bounded by ``num`` and stop at an out-of-range ``next``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import View, as_int, esc, field, fmt_hex, resolve, table, wrap

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])

CHAIN_COLOURS = ("#dbeafe", "#dcfce7", "#fef9c3", "#fde2e2", "#ede9fe", "#cffafe",
                 "#fce7f3", "#e7e5e4")


@dataclass(frozen=True)
class RingSnapshot:
    """One split ring at one moment, as plain values and numpy copies.

    ``last_avail_idx`` is the device's counter (None if the source is the
    driver's view); ``last_used_idx`` is the driver's (None if the source is
    the device's view). ``desc`` has the fields addr, len, flags, next;
    ``used_ring`` has id, len.
    """

    num: int
    desc: np.ndarray
    avail_flags: int
    avail_idx: int
    avail_ring: np.ndarray
    used_flags: int
    used_idx: int
    used_ring: np.ndarray
    last_avail_idx: int | None = None
    last_used_idx: int | None = None
    index: int | None = None
    gpas: dict | None = None
    error: str | None = None


def _structured(arr: Any, dtype: np.dtype) -> np.ndarray:
    a = np.array(arr, copy=True)
    if a.dtype.names is None:
        a = np.ascontiguousarray(a).view(np.uint8).view(dtype)
    return a.ravel()


def _first(layers: list[Any], *names: str, array: bool = False) -> Any:
    """The first of ``names`` found in the layers (arrays only when ``array``)."""
    for layer in layers:
        if layer is None:
            continue
        value = field(layer, *names, default=None)
        if callable(value):  # a method such as tuple.index, not a field
            continue
        if value is None or (array and not isinstance(value, np.ndarray)):
            continue
        if not array and isinstance(value, np.ndarray) and value.size != 1:
            continue
        return value
    return None


def _named(layers: list[Any], name: str) -> np.ndarray | None:
    """A structured ``avail``/``used`` view with ``flags``, ``idx``, ``ring`` fields."""
    value = _first(layers, name, array=True)
    names = getattr(getattr(value, "dtype", None), "names", None) or ()
    return value if "idx" in names and "ring" in names else None


def _int0(value: Any) -> int:
    return 0 if value is None else as_int(value)


def _ring_error(state: Any, index: int | None) -> str | None:
    """Why the ring is broken, as text (None if it is not).

    A ring-layer state record carries ``status`` and the error fields (turned
    into the ring layer's named error); a Virtqueue or a back-end snapshot
    carries ``error`` (an exception or a string).
    """
    status = field(state, "status", default=None)
    if status is not None and not callable(status):
        if as_int(status) == 0:
            return None
        try:
            from vhostlab.ring.errors import ring_error
            return str(ring_error(state, -1 if index is None else index))
        except (ImportError, KeyError, ValueError, IndexError):
            return f"status {as_int(status)}"
    err = field(state, "error", default=None)
    return None if err in (None, False, "") or callable(err) else str(err)


def _record(value: Any) -> Any:
    """A ring state held as a 1-element structured array is its element."""
    if isinstance(value, np.ndarray) and value.dtype.names and value.shape == (1,):
        return value[0]
    return value


def _views_from_gpas(layers: list[Any], memory: Any) -> Any:
    """Map the ring at the GPAs the state names (None if it is not configured)."""
    from vhostlab.ring.layout import vring_views

    num, desc, avail, used = (_first(layers, k) for k in ("num", "desc", "avail", "used"))
    if not all(isinstance(v, (int, np.integer)) for v in (num, desc, avail, used)) or not num:
        return None
    return vring_views(memory, int(num), int(desc), int(avail), int(used))


def _array(layers: list[Any], names: tuple[str, ...], dtype: np.dtype | None) -> np.ndarray:
    """An array field (ndarray, or a tuple of tuples from a snapshot), copied."""
    for layer in layers:
        value = field(layer, *names, default=None) if layer is not None else None
        if isinstance(value, np.ndarray):
            return _structured(value, dtype) if dtype is not None else value.ravel().copy()
        if isinstance(value, (list, tuple)) and dtype is not None:
            return np.array([tuple(v) for v in value], dtype=dtype)
    return np.zeros(0, dtype or np.uint16)


def _ring_part(layers: list[Any], which: str, dtype: np.dtype | None) -> tuple:
    """(flags, idx, ring) of the avail or used ring; idx None if unknown."""
    named = _named(layers, which)
    if named is not None:
        return int(named["flags"]), int(named["idx"]), _array([{"r": named["ring"]}],
                                                               ("r",), dtype)
    idx = _first(layers, f"{which}_idx")
    return (_int0(_first(layers, f"{which}_flags")), None if idx is None else as_int(idx),
            _array(layers, (f"{which}_ring",), dtype))


def _gpas(src: Any, st: Any) -> dict | None:
    gpas = _first([src], "gpas")
    if gpas is not None:
        return gpas if isinstance(gpas, dict) else {
            k: int(field(gpas, k)) for k in ("desc", "avail", "used")
            if field(gpas, k, default=None) is not None}
    found = {k: _first([st, src], k, f"{k}_gpa") for k in ("desc", "avail", "used")}
    found = {k: as_int(v) for k, v in found.items()
             if isinstance(v, (int, np.integer)) or (isinstance(v, np.ndarray) and v.size == 1)}
    return found or None


def ring_snapshot(source: Any, state: Any = None, memory: Any = None) -> RingSnapshot:
    """Read a ring now and return a RingSnapshot.

    ``source``: the ring's memory (the ring layer's ``VringViews``, a
    VirtqueueDriver, a guest driver's ring state), or the device's side (a
    Virtqueue, a back-end's VringSnapshot) together with ``memory`` (a
    GuestMemory the ring is mapped from at the GPAs the state names);
    anything with ``snapshot()``, or a zero-argument callable, is called.
    ``state``: the device's ring state (last_avail_idx, errors) when
    ``source`` is the driver's side.
    """
    src = resolve(source, "snapshot")
    if isinstance(src, RingSnapshot):
        return src
    st = state if state is not None else field(src, "state", "vring_state", default=None)
    st = _record(st() if callable(st) else st)
    scal = [st, src]               # counters: the device's state first
    views = field(src, "views", default=None)
    if views is None and memory is not None:
        views = _views_from_gpas([st, src], memory)
    mem = [views, src]             # arrays live in guest memory
    desc = _array(mem, ("desc", "desc_table", "descriptors"), DESC_DTYPE)
    a_flags, a_idx, a_ring = _ring_part(mem + [st], "avail", None)
    u_flags, u_idx, u_ring = _ring_part(mem + [st], "used", USED_ELEM_DTYPE)
    num = _first(scal + [views], "num")
    index = _first(scal, "index", "queue", "queue_index")
    index = None if index is None else as_int(index)
    last_avail = _first(scal, "last_avail_idx")
    last_used = _first([src, views], "last_used_idx", "last_seen_used")
    return RingSnapshot(
        num=as_int(num) if num is not None else len(desc), desc=desc,
        avail_flags=a_flags, avail_idx=(a_idx or 0) & 0xFFFF, avail_ring=a_ring,
        used_flags=u_flags, used_idx=(u_idx or 0) & 0xFFFF, used_ring=u_ring,
        last_avail_idx=None if last_avail is None else as_int(last_avail) & 0xFFFF,
        last_used_idx=None if last_used is None else as_int(last_used) & 0xFFFF,
        index=index, gpas=_gpas(src, st),
        error=_ring_error(st, index) if st is not None else _ring_error(src, index))


def walk_chain(desc: np.ndarray, head: int, num: int) -> tuple[list[int], str | None]:
    """Follow ``next`` from ``head``; at most ``num`` descriptors (a longer chain loops).

    Returns the indices in chain order and a problem (None if the chain is
    well formed): head or next out of range, or a loop.
    """
    if not 0 <= head < min(num, len(desc)):
        return [], f"head {head} out of range (queue size {num})"
    chain, i = [], head
    while True:
        chain.append(i)
        flags, nxt = int(desc[i]["flags"]), int(desc[i]["next"])
        if not flags & VRING_DESC_F_NEXT:
            return chain, None
        if nxt >= min(num, len(desc)):
            return chain, f"next {nxt} out of range (queue size {num})"
        if len(chain) >= num:
            return chain, f"loop: chain longer than the queue size {num}"
        i = nxt


def desc_flags(flags: int) -> str:
    """``NEXT|WRITE`` etc. for a descriptor's flags."""
    names = [n for bit, n in ((VRING_DESC_F_NEXT, "NEXT"), (VRING_DESC_F_WRITE, "WRITE"),
                              (VRING_DESC_F_INDIRECT, "INDIRECT")) if flags & bit]
    rest = flags & ~7
    if rest:
        names.append(fmt_hex(rest))
    return "|".join(names) or "0"


def _pending(a: int, b: int) -> int:
    return (b - a) & 0xFFFF


class VirtqueueView(View):
    """Descriptor table, chains, avail and used rings of one split virtqueue.

    ``source``: the ring's memory (the ring layer's VringViews, a guest
    driver's ring state, a back-end's ring view) or a zero-argument callable
    returning one; ``state``: the device's ring state record (last_avail_idx,
    errors) if ``source`` lacks it; ``memory``: the guest memory to map the
    ring from when ``source`` is the device's state (a Virtqueue, a
    back-end's VringSnapshot). All are read at every render.
    ``max_desc`` caps the table rows, ``max_chains`` the chains drawn.
    """

    def __init__(self, source: Any, state: Any = None, memory: Any = None,
                 title: str | None = None, max_desc: int = 256, max_chains: int = 16,
                 ring_columns: int = 32) -> None:
        self.source = source
        self.state = state
        self.memory = memory
        self.title = title
        self.max_desc = max_desc
        self.max_chains = max_chains
        self.ring_columns = ring_columns

    def snapshot(self) -> RingSnapshot:
        """The ring as it is now."""
        return ring_snapshot(self.source, self.state, self.memory)

    def chains(self, snap: RingSnapshot) -> list[dict]:
        """The chains of the latest avail entries, newest last, marked pending or taken."""
        num = snap.num
        if num <= 0 or len(snap.avail_ring) == 0:
            return []
        # The last entries the driver published; avail.idx counts from 0 (or
        # from SET_VRING_BASE), so fewer than that were never written. When
        # more are waiting than fit, the ones the device takes next.
        count = min(num, self.max_chains, snap.avail_idx)
        end = snap.avail_idx
        if snap.last_avail_idx is not None:
            if min(_pending(snap.last_avail_idx, snap.avail_idx), num) > count:
                end = (snap.last_avail_idx + count) & 0xFFFF
        out = []
        for k in range(count, 0, -1):
            slot_idx = (end - k) & 0xFFFF
            head = int(snap.avail_ring[slot_idx % num]) if slot_idx % num < len(
                snap.avail_ring) else -1
            chain, problem = walk_chain(snap.desc, head, num)
            pending = None
            if snap.last_avail_idx is not None:
                pending = _pending(snap.last_avail_idx, slot_idx) < _pending(
                    snap.last_avail_idx, snap.avail_idx)
            out.append({"avail_idx": slot_idx, "head": head, "chain": chain,
                        "problem": problem, "pending": pending})
        return out

    def to_html(self) -> str:
        snap = self.snapshot()
        chains = self.chains(snap)
        title = self.title or (f"virtqueue {snap.index}" if snap.index is not None
                               else "virtqueue")
        return wrap(self._summary(snap) + self._rings_html(snap) + self._chains_svg(chains)
                    + self._chain_list(chains) + self._desc_table(snap, chains), title)

    def _summary(self, snap: RingSnapshot) -> str:
        facts = [f"num {snap.num}", f"avail.idx {snap.avail_idx}", f"used.idx {snap.used_idx}"]
        if snap.last_avail_idx is not None:
            facts.append(f"last_avail_idx {snap.last_avail_idx} "
                         f"({_pending(snap.last_avail_idx, snap.avail_idx)} waiting for the "
                         f"device)")
        if snap.last_used_idx is not None:
            facts.append(f"driver's last used {snap.last_used_idx} "
                         f"({_pending(snap.last_used_idx, snap.used_idx)} not yet reaped)")
        if snap.avail_flags & VRING_AVAIL_F_NO_INTERRUPT:
            facts.append("avail.flags NO_INTERRUPT")
        if snap.used_flags & VRING_USED_F_NO_NOTIFY:
            facts.append("used.flags NO_NOTIFY")
        if snap.gpas:
            facts.append(", ".join(f"{k} @ {fmt_hex(v)}" for k, v in snap.gpas.items()))
        err = f"<div class='bad'>ring broken: {esc(snap.error)}</div>" if snap.error else ""
        return f"<div>{esc('; '.join(facts))}</div>{err}"

    def _ring_grid(self, cells: list[str], marks: dict[int, list[str]], shade: set[int],
                   caption: str) -> str:
        cols = self.ring_columns
        rows = []
        for start in range(0, len(cells), cols):
            tds = []
            for slot in range(start, min(start + cols, len(cells))):
                ptr = "".join(f"<div class='ptr'>\u25bc {esc(m)}</div>" for m in marks.get(slot, []))
                bg = " style='background:#fff3cd'" if slot in shade else ""
                tds.append(f"<td title='slot {slot}'{bg}>{ptr}<span class='muted'>{slot}:</span>"
                           f" {cells[slot]}</td>")
            rows.append("<tr>" + "".join(tds) + "</tr>")
        return f"<table><caption>{esc(caption)}</caption>{''.join(rows)}</table>"

    def _rings_html(self, snap: RingSnapshot) -> str:
        num = min(snap.num, len(snap.avail_ring), len(snap.used_ring), 1024)
        if num <= 0:
            return ""
        amarks: dict[int, list[str]] = {}
        amarks.setdefault(snap.avail_idx % snap.num, []).append("avail.idx")
        shade: set[int] = set()
        if snap.last_avail_idx is not None:
            amarks.setdefault(snap.last_avail_idx % snap.num, []).append("last_avail_idx")
            n = _pending(snap.last_avail_idx, snap.avail_idx)
            shade = {(snap.last_avail_idx + k) % snap.num for k in range(min(n, snap.num))}
        acells = [str(int(h)) for h in snap.avail_ring[:num]]
        avail = self._ring_grid(acells, amarks, shade, "avail ring (head descriptor per slot; "
                                "shaded: waiting for the device)")
        umarks: dict[int, list[str]] = {snap.used_idx % snap.num: ["used.idx"]}
        ushade: set[int] = set()
        if snap.last_used_idx is not None:
            umarks.setdefault(snap.last_used_idx % snap.num, []).append("last_used_idx")
            n = _pending(snap.last_used_idx, snap.used_idx)
            ushade = {(snap.last_used_idx + k) % snap.num for k in range(min(n, snap.num))}
        ucells = [f"{int(e['id'])}/{int(e['len'])}" for e in snap.used_ring[:num]]
        used = self._ring_grid(ucells, umarks, ushade, "used ring (id/len per slot; shaded: "
                               "not yet reaped by the driver)")
        return avail + used

    def _chains_svg(self, chains: list[dict]) -> str:
        if not chains:
            return ""
        bw, bh, gap, maxlen = 52, 18, 22, 12
        longest = max(min(len(c["chain"]), maxlen) + (1 if c["problem"] else 0) * 4
                      for c in chains)
        width = 110 + max(1, longest) * (bw + gap)
        height = 8 + len(chains) * (bh + 8)
        parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
                 "font-family='monospace' font-size='10'><defs><marker id='vhl-arrow' "
                 "markerWidth='6' markerHeight='6' refX='5' refY='3' orient='auto'>"
                 "<path d='M0,0 L6,3 L0,6 z' fill='#555'/></marker></defs>"]
        for row, c in enumerate(chains):
            y = 4 + row * (bh + 8)
            state = "" if c["pending"] is None else (" pending" if c["pending"] else " taken")
            parts.append(f"<text x='2' y='{y + 13}'>avail[{c['avail_idx']}]{esc(state)}</text>")
            colour = CHAIN_COLOURS[c["head"] % len(CHAIN_COLOURS)] if c["head"] >= 0 else "#eee"
            for k, d in enumerate(c["chain"][:maxlen]):
                x = 110 + k * (bw + gap)
                parts.append(f"<rect x='{x}' y='{y}' width='{bw}' height='{bh}' fill='{colour}' "
                             f"stroke='#333'/><text x='{x + bw / 2}' y='{y + 13}' "
                             f"text-anchor='middle'>desc {d}</text>")
                if k:
                    parts.append(f"<line x1='{x - gap}' y1='{y + bh / 2}' x2='{x - 2}' "
                                 f"y2='{y + bh / 2}' stroke='#555' "
                                 "marker-end='url(#vhl-arrow)'/>")
            if c["problem"]:
                x = 110 + min(len(c["chain"]), maxlen) * (bw + gap)
                parts.append(f"<text x='{x}' y='{y + 13}' fill='#c01c28'>"
                             f"{esc(c['problem'])}</text>")
        parts.append("</svg>")
        return f"<div>{''.join(parts)}</div>"

    @staticmethod
    def _chain_list(chains: list[dict]) -> str:
        items = []
        for c in chains:
            order = " \u2192 ".join(str(d) for d in c["chain"])
            state = "" if c["pending"] is None else (" (pending)" if c["pending"] else " (taken)")
            bad = f" <span class='bad'>{esc(c['problem'])}</span>" if c["problem"] else ""
            items.append(f"<li>avail[{c['avail_idx']}] head {c['head']}: {esc(order)}"
                         f"{esc(state)}{bad}</li>")
        return f"<div>chains:<ul>{''.join(items)}</ul></div>" if items else ""

    def _desc_table(self, snap: RingSnapshot, chains: list[dict]) -> str:
        where: dict[int, tuple[int, int]] = {}
        for c in chains:
            for pos, d in enumerate(c["chain"]):
                where.setdefault(d, (c["head"], pos))
        rows, classes = [], []
        n = min(snap.num, len(snap.desc), self.max_desc)
        for i in range(n):
            d = snap.desc[i]
            flags = int(d["flags"])
            member = where.get(i)
            chain = "" if member is None else f"head {member[0]}, #{member[1] + 1}"
            style = "" if member is None else (
                f" style='background:{CHAIN_COLOURS[member[0] % len(CHAIN_COLOURS)]}'")
            rows.append([f"<span{style}>{i}</span>", esc(fmt_hex(int(d["addr"]))),
                         str(int(d["len"])), esc(desc_flags(flags)), str(int(d["next"])),
                         esc(chain)])
            classes.append("" if int(d["addr"]) or int(d["len"]) else "muted")
        more = ""
        if min(snap.num, len(snap.desc)) > n:
            more = f"<div class='muted'>{min(snap.num, len(snap.desc)) - n} more descriptors</div>"
        return table(["desc", "addr", "len", "flags", "next", "chain"], rows,
                     caption="descriptor table", row_classes=classes) + more
