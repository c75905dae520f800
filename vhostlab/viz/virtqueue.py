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

from vhostlab.ring.layout import (VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT,
                                  VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY,
                                  VringCopy)

from ._common import View, as_int, esc, field, fmt_hex, resolve, table, wrap

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])

CHAIN_COLOURS = ("#dbeafe", "#dcfce7", "#fef9c3", "#fde2e2", "#ede9fe", "#cffafe",
                 "#fce7f3", "#e7e5e4")


@dataclass(frozen=True)
class RingSnapshot(VringCopy):
    """One split ring at one moment, as plain values and numpy copies.

    ``last_avail_idx`` is the device's counter (None if the source is the
    driver's view); ``last_used_idx`` is the driver's (None if the source is
    the device's view). ``desc`` has the fields addr, len, flags, next;
    ``used_ring`` has id, len. ``in_flight``: the heads of the chains the
    driver has given the device and not taken back (None if the source does
    not say).
    """

    last_avail_idx: int | None = None
    last_used_idx: int | None = None
    index: int | None = None
    gpas: dict | None = None
    error: str | None = None
    in_flight: tuple[int, ...] | None = None


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
    in_flight = _in_flight(src)
    return RingSnapshot(
        num=as_int(num) if num is not None else len(desc), desc=desc,
        avail_flags=a_flags, avail_idx=(a_idx or 0) & 0xFFFF, avail_ring=a_ring,
        used_flags=u_flags, used_idx=(u_idx or 0) & 0xFFFF, used_ring=u_ring,
        last_avail_idx=None if last_avail is None else as_int(last_avail) & 0xFFFF,
        last_used_idx=None if last_used is None else as_int(last_used) & 0xFFFF,
        index=index, gpas=_gpas(src, st), in_flight=in_flight,
        error=_ring_error(st, index) if st is not None else _ring_error(src, index))


def _in_flight(src: Any) -> tuple[int, ...] | None:
    """The driver's in-flight heads: a tuple of them, or the keys of a head -> buffer dict."""
    value = field(src, "in_flight", "inflight", default=None)
    if isinstance(value, dict):
        value = value.keys()
    if value is None or callable(value) or isinstance(value, (str, bytes)):
        return None
    try:
        return tuple(sorted(int(v) for v in value))
    except (TypeError, ValueError):
        return None


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


def _window(end: int, count: int) -> list[int]:
    """The ``count`` ring positions (u16 counters) just before ``end``, oldest first."""
    return [(end - count + k) & 0xFFFF for k in range(max(0, count))]


def _state_windows(snap: RingSnapshot, recent: int) -> list[tuple[str, list[int]]]:
    """(state, heads) in claiming order, read from the rings' indices."""
    num = max(1, snap.num)

    def avail(positions: list[int]) -> list[int]:
        return [int(snap.avail_ring[p % num]) for p in positions if p % num < len(snap.avail_ring)]

    a, u, la, lu = snap.avail_idx, snap.used_idx, snap.last_avail_idx, snap.last_used_idx
    out: list[tuple[str, list[int]]] = []
    if lu is not None and _pending(lu, u) <= num:
        # virtio 2.7.8: the used ring from the driver's last_used_idx to used.idx
        out.append(("used, not reaped", [int(snap.used_ring[p % num]["id"]) for p in
                                         _window(u, _pending(lu, u)) if p % num < len(
                                             snap.used_ring)]))
    if la is not None and _pending(la, a) <= num:
        out.append(("pending", avail(_window(a, _pending(la, a)))))
    if la is not None and _pending(u, la) <= num:
        # taken and not yet returned (the back-ends here return chains in order)
        out.append(("taken by the device", avail(_window(la, _pending(u, la)))))
    if snap.in_flight is not None:
        out.append(("in flight", list(snap.in_flight)))
    elif la is None and _pending(u, a) <= num:
        out.append(("in flight", avail(_window(a, _pending(u, a)))))
    out.append(("recently used", avail(_window(a, min(recent, num, a)))[::-1]))
    return out


def descriptor_states(snap: RingSnapshot, recent: int = 16) -> dict[int, tuple[str, int, int]]:
    """Descriptors in use or recently used: index -> (state, head, position in the chain).

    In use: chains returned and not reaped (used ring, last_used_idx to
    used.idx), waiting for the device (avail ring, last_avail_idx to
    avail.idx), taken by the device and not returned (avail ring, used.idx
    to last_avail_idx), or in flight as the driver says. Recently used: the
    chains of the last ``recent`` avail entries. The dict is in that order
    (the most interesting first). A chain walk stops at a descriptor
    already claimed or out of range, so the work stays within ``num`` steps
    in all, whatever the guest wrote.
    """
    num = min(snap.num, len(snap.desc))
    out: dict[int, tuple[str, int, int]] = {}
    if num <= 0:
        return out
    for state, heads in _state_windows(snap, recent):
        for head in heads:
            i, pos = head, 0
            while 0 <= i < num and i not in out:
                out[i] = (state, head, pos)
                if not int(snap.desc[i]["flags"]) & VRING_DESC_F_NEXT:
                    break
                i, pos = int(snap.desc[i]["next"]), pos + 1
    return out


@dataclass(eq=False, repr=False)
class VirtqueueView(View):
    """Descriptor table, chains, avail and used rings of one split virtqueue.

    ``source``: the ring's memory (the ring layer's VringViews, a guest
    driver's ring state, a back-end's ring view) or a zero-argument callable
    returning one; ``state``: the device's ring state record (last_avail_idx,
    errors) if ``source`` lacks it; ``memory``: the guest memory to map the
    ring from when ``source`` is the device's state (a Virtqueue, a
    back-end's VringSnapshot). All are read at every render.

    Sized for a notebook: the rings are drawn ``ring_columns`` slots a row,
    and only the rows that hold a pointer or a recent entry (all of them
    with ``ring_window=False``); the descriptor table lists the descriptors
    in use or recently used (see ``descriptor_states``), at most
    ``max_desc``, and says how many it leaves out. ``max_chains`` caps the
    chains drawn (and what counts as recent).
    """

    source: Any
    state: Any = None
    memory: Any = None
    title: str | None = None
    max_desc: int = 32
    max_chains: int = 16
    ring_columns: int = 16
    ring_window: bool = True

    def snapshot(self) -> RingSnapshot:
        """The ring as it is now."""
        return ring_snapshot(self.source, self.state, self.memory)

    def chains(self, snap: RingSnapshot) -> list[dict]:
        """The chains of the latest avail entries, newest last, marked pending or taken.

        An entry whose head a later entry reuses is given no chain and
        ``reused`` True: the driver got the chain back and reused its
        descriptors, which now hold the later chain (normal, not a problem;
        the view lists such entries on one line).
        """
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
        out, newer = [], set()
        for k in range(1, count + 1):           # newest first: a newer chain wins a descriptor
            slot_idx = (end - k) & 0xFFFF
            head = int(snap.avail_ring[slot_idx % num]) if slot_idx % num < len(
                snap.avail_ring) else -1
            pending = None
            if snap.last_avail_idx is not None:
                pending = _pending(snap.last_avail_idx, slot_idx) < _pending(
                    snap.last_avail_idx, snap.avail_idx)
            if head in newer:
                # The driver got this chain back and reused its head in a later
                # entry: the table now holds the later chain, not this one.
                out.append({"avail_idx": slot_idx, "head": head, "chain": [],
                            "problem": None, "reused": True, "pending": pending})
                continue
            chain, problem = walk_chain(snap.desc, head, num)
            newer.update(chain)
            out.append({"avail_idx": slot_idx, "head": head, "chain": chain,
                        "problem": problem, "reused": False, "pending": pending})
        return out[::-1]

    def to_html(self) -> str:
        snap = self.snapshot()
        chains = self.chains(snap)
        title = self.title or (f"virtqueue {snap.index}" if snap.index is not None
                               else "virtqueue")
        return wrap(self._summary(snap) + self._rings_html(snap) + self._chains_svg(chains)
                    + self._chain_list(chains) + self._desc_table(snap), title,
                    view="virtqueue")

    def _summary(self, snap: RingSnapshot) -> str:
        facts = [f"num {snap.num}", f"avail.idx {snap.avail_idx}", f"used.idx {snap.used_idx}"]
        if snap.last_avail_idx is not None:
            facts.append(f"last_avail_idx {snap.last_avail_idx} "
                         f"({_pending(snap.last_avail_idx, snap.avail_idx)} waiting for the "
                         f"device)")
        if snap.last_used_idx is not None:
            facts.append(f"last_used_idx {snap.last_used_idx} "
                         f"(the driver's; {_pending(snap.last_used_idx, snap.used_idx)} not "
                         "yet reaped)")
        if snap.in_flight is not None:
            facts.append(f"{len(snap.in_flight)} chains in flight")
        if snap.avail_flags & VRING_AVAIL_F_NO_INTERRUPT:
            facts.append("avail.flags NO_INTERRUPT")
        if snap.used_flags & VRING_USED_F_NO_NOTIFY:
            facts.append("used.flags NO_NOTIFY")
        if snap.gpas:
            facts.append(", ".join(f"{k} @ {fmt_hex(v)}" for k, v in snap.gpas.items()))
        err = f"<div class='bad'>ring broken: {esc(snap.error)}</div>" if snap.error else ""
        return f"<div>{esc('; '.join(facts))}</div>{err}"

    def _ring_grid(self, cells: list[tuple[str, str, bool]], marks: dict[int, list[str]],
                   shade: set[int], keep: set[int], caption: str) -> str:
        """``cells``: (HTML, tooltip, is zero) per slot; rows without a slot in
        ``keep`` fold into one line (unless ``ring_window`` is off)."""
        cols, num = max(1, self.ring_columns), len(cells)
        head = "<tr><th>slot</th>" + "".join(f"<th>+{c}</th>" for c in range(min(cols, num)))
        rows, folded = [head + "</tr>"], []

        def fold() -> None:
            if folded:
                first, last = folded[0], min(folded[-1] + cols, num) - 1
                zero = all(cells[k][2] for k in range(first, last + 1))
                rows.append(f"<tr class='muted'><td colspan='{min(cols, num) + 1}'>\u22ef slots "
                            f"{first}\u2013{last} not shown: no pointer and no recent entry"
                            f"{', all 0' if zero else ''}</td></tr>")
                folded.clear()

        for start in range(0, num, cols):
            slots = range(start, min(start + cols, num))
            if self.ring_window and not keep.intersection(slots):
                folded.append(start)
                continue
            fold()
            tds = []
            for slot in slots:
                ptr = "".join(f"<div class='ptr'>\u25b2 {esc(m)}</div>"
                              for m in marks.get(slot, []))
                bg = " style='background:#fff3cd'" if slot in shade else ""
                tds.append(f"<td title='{esc(cells[slot][1])}'{bg}>{cells[slot][0]}{ptr}</td>")
            rows.append(f"<tr><th>{start}</th>{''.join(tds)}</tr>")
        fold()
        return f"<table class='ring'><caption>{esc(caption)}</caption>{''.join(rows)}</table>"

    def _rings_html(self, snap: RingSnapshot) -> str:
        num = min(snap.num, len(snap.avail_ring), len(snap.used_ring), 1024)   # slots drawn
        if num <= 0:
            return ""
        ring, recent = snap.num, min(self.max_chains, num)                       # the modulus
        a, u, la, lu = snap.avail_idx, snap.used_idx, snap.last_avail_idx, snap.last_used_idx
        amarks: dict[int, list[str]] = {a % ring: ["avail.idx"]}
        shade: set[int] = set()
        akeep = {p % ring for p in _window(a, min(recent, a))}
        if la is not None:
            amarks.setdefault(la % ring, []).append("last_avail_idx")
            shade = {p % ring for p in _window(a, min(_pending(la, a), ring))}
        acells = [(str(int(h)), f"avail.ring[{k}] = {int(h)}", not int(h))
                  for k, h in enumerate(snap.avail_ring[:num])]
        avail = self._ring_grid(acells, amarks, shade, akeep | set(amarks) | shade,
                                "avail ring: the head of a chain per slot; shaded: published, "
                                "waiting for the device")
        umarks: dict[int, list[str]] = {u % ring: ["used.idx"]}
        ushade: set[int] = set()
        if lu is not None:
            umarks.setdefault(lu % ring, []).append("last_used_idx")
            ushade = {p % ring for p in _window(u, min(_pending(lu, u), ring))}
        ukeep = {p % ring for p in _window(u, min(recent, u))} | set(umarks) | ushade
        ucells = [(f"{int(e['id'])}<div class='muted'>{int(e['len'])}</div>",
                   f"used.ring[{k}] = {{id {int(e['id'])}, len {int(e['len'])}}}",
                   not (int(e["id"]) or int(e["len"])))
                  for k, e in enumerate(snap.used_ring[:num])]
        used = self._ring_grid(ucells, umarks, ushade, ukeep,
                               "used ring: id (the chain's head) above len per slot; shaded: "
                               "returned, not yet reaped by the driver")
        return avail + used + self._pointer_legend(snap)

    @staticmethod
    def _pointer_legend(snap: RingSnapshot) -> str:
        said = ["avail.idx: the slot the driver fills next"]
        if snap.last_avail_idx is not None:
            said.append("last_avail_idx: the slot the device takes next (what GET_VRING_BASE "
                        "returns)")
        said.append("used.idx: the slot the device fills next")
        if snap.last_used_idx is not None:
            said.append("last_used_idx: the entry the driver reaps next")
        return f"<div class='muted'>\u25b2 {esc('; '.join(said))}</div>"

    def _chains_svg(self, chains: list[dict]) -> str:
        chains = [c for c in chains if not c.get("reused")]
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
        reused = [c["avail_idx"] for c in chains if c.get("reused")]
        for c in chains:
            if c.get("reused"):
                continue
            order = " \u2192 ".join(str(d) for d in c["chain"])
            state = "" if c["pending"] is None else (" (pending)" if c["pending"] else " (taken)")
            bad = f" <span class='bad'>{esc(c['problem'])}</span>" if c["problem"] else ""
            items.append(f"<li>avail[{c['avail_idx']}] head {c['head']}: {esc(order)}"
                         f"{esc(state)}{bad}</li>")
        if reused:
            items.append(f"<li class='muted'>{esc(_index_ranges('avail', reused))}: not drawn; "
                         "the driver got these chains back and reused their heads in later "
                         "entries, so the descriptors now hold the later chains</li>")
        return f"<div>chains:<ul>{''.join(items)}</ul></div>" if items else ""

    def _desc_table(self, snap: RingSnapshot) -> str:
        states = descriptor_states(snap, self.max_chains)
        n = min(snap.num, len(snap.desc))
        shown = sorted(list(states)[:max(0, self.max_desc)])
        rows: list[list[str]] = []
        classes: list[str] = []

        def gap(first: int, last: int) -> None:
            if first <= last:
                rows.append(["\u22ef", "", "", "", "", esc(f"{first}\u2013{last} not shown"), ""])
                classes.append("muted")

        prev = -1
        for i in shown:
            gap(prev + 1, i - 1)
            d, (state, head, pos) = snap.desc[i], states[i]
            colour = CHAIN_COLOURS[head % len(CHAIN_COLOURS)]
            rows.append([f"<span style='background:{colour}'>{i}</span>",
                         esc(fmt_hex(int(d["addr"]))), str(int(d["len"])),
                         esc(desc_flags(int(d["flags"]))), str(int(d["next"])),
                         esc(f"head {head}, #{pos + 1}"), esc(state)])
            classes.append("muted" if state == "recently used" else "")
            prev = i
        gap(prev + 1, n - 1)
        notes = [f"{n - len(states)} unused descriptors not shown"]
        if len(states) > len(shown):
            notes.append(f"{len(states) - len(shown)} more in use or recently used not shown "
                         f"(max_desc {self.max_desc})")
        return table(["desc", "addr", "len", "flags", "next", "chain", "state"], rows,
                     caption="descriptor table: in use or recently used",
                     row_classes=classes) + \
            f"<div class='muted'>{esc('; '.join(notes))}</div>"


def _index_ranges(name: str, indices: list[int]) -> str:
    """``avail[7], avail[9]..avail[15]``: runs of consecutive indices, shortened."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{name}[{a}]" if a == b else f"{name}[{a}]..{name}[{b}]"
                     for a, b in runs)
