"""The dirty bitmap, drawn for reading: one sync of the log, page by page, by band.

A :class:`~vhostlab.dirtylog.DirtyRound` says which pages one sync found:
the ones the back-end marked in the vhost log (which the sync took with an
atomic exchange per 64-page word and cleared), the ones the guest wrote
(QEMU's own bitmap), and, after a broken run, the ones that differ at the
destination. This view draws guest RAM as its bands (RX ring, RX buffers,
TX ring, TX buffers, the guest's working set, the rest), zoomed to the
64-page words where something is dirty: one row is one word of the log
(``vhost_log_chunk_t``, the unit ``vhost_dev_sync_region`` exchanges), one
cell one 4 KiB page, with a wider gap every 8 pages (one byte of the log).
Clean words in between are folded into a thin gap.

The picture is a PNG whose cell colours are exact, so a test (or a learner
with a colour picker) can count them: each colour that means a dirty page
is listed in the legend with ``data-dirty-color``. :class:`DirtyRoundPlayer`
adds a Play control and a slider over the rounds (ipywidgets); without a
widget front-end it shows every round's picture, one under the other.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np

from vhostlab.dirtylog import VHOST_LOG_BITS, DirtyRound, GuestBand
from vhostlab.protocol.constants import VHOST_LOG_PAGE

from ._common import View, esc, fmt_size, table, wrap
from .png import data_uri

PITCH, FILL = 10, 9                    # px per page cell, of which coloured
BYTE_GAP = 2                           # extra px between bytes of the log (8 pages)
LABEL_W, RIGHT_W = 170, 110
GRID_W = VHOST_LOG_BITS * PITCH + (VHOST_LOG_BITS // 8 - 1) * BYTE_GAP
WIDTH = LABEL_W + GRID_W + RIGHT_W
BAND_MIN_H, BAND_SEP, FOLD_H = 30, 8, 8
MAX_ROWS = 48                          # words shown per band; the rest is said in words

#: Colours of dirty pages (exact pixel colours in the PNG), and of the rest.
LOG, GUEST, BOTH, MISMATCH = "#f59f00", "#1c7ed6", "#9c36b5", "#e03131"
CLEAN, EARLIER, OUTSIDE, TAKEN = "#e9ecef", "#c5cad0", "#ffffff", "#495057"
BG, TEXT = "#ffffff", "#343a40"
DIRTY_COLOURS = {
    LOG: "the back-end wrote it (vhost log only)",
    GUEST: "the guest wrote it (QEMU's own bitmap only)",
    BOTH: "in both",
    MISMATCH: "differs at the destination",
}


def _rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)


def _band_table(snap: DirtyRound) -> list[GuestBand]:
    """The snapshot's bands in GPA order, with 'rest of RAM' for pages outside them."""
    return sorted(snap.bands, key=lambda b: b.first_page)


def _interesting(snaps: Sequence[DirtyRound]) -> np.ndarray:
    parts = [np.zeros(0, np.int64)]
    for s in snaps:
        parts += [s.log_pages, s.guest_pages, s.mismatched_pages]
    return np.unique(np.concatenate(parts))


def layout(snap: DirtyRound, context: Sequence[DirtyRound] = ()) -> list[dict]:
    """Blocks to draw: per band its name, pages, and the log words shown (sorted).

    A word is shown when a page of it, inside the band, is dirty in ``snap``
    or in any of ``context`` (so every frame of a player has the same rows).
    """
    pages = _interesting([snap, *context])
    blocks, inside = [], np.zeros(pages.size, dtype=bool)
    for band in _band_table(snap):
        end = band.first_page + band.n_pages
        mine = (pages >= band.first_page) & (pages < end)
        inside |= mine
        blocks.append({"name": band.name, "first": band.first_page, "end": end,
                       "words": np.unique(pages[mine] // VHOST_LOG_BITS)})
    rest = pages[~inside]
    blocks.append({"name": "rest of RAM", "first": 0, "end": snap.pages, "rest": True,
                   "words": np.unique(rest // VHOST_LOG_BITS)})
    return blocks


def _colours(snap: DirtyRound, context: Sequence[DirtyRound]) -> dict[int, str]:
    """page -> colour for every page that is not plain clean."""
    out = {int(p): EARLIER for p in _interesting(context)}
    log, guest = set(snap.log_pages.tolist()), set(snap.guest_pages.tolist())
    for p in log | guest:
        out[p] = BOTH if p in log and p in guest else (LOG if p in log else GUEST)
    for p in snap.mismatched_pages.tolist():
        out[int(p)] = MISMATCH
    return out


def _x(bit: int) -> int:
    return LABEL_W + bit * PITCH + (bit // 8) * BYTE_GAP


def _in_band(block: dict, bands: list[GuestBand], page: int) -> bool:
    if not block.get("rest"):
        return block["first"] <= page < block["end"]
    return not any(b.first_page <= page < b.first_page + b.n_pages for b in bands)


def _plan(blocks: list[dict]) -> tuple[list[dict], int]:
    """Vertical positions: each block's rows (word, y) and folds; total height."""
    y = 4
    for block in blocks:
        words = [int(w) for w in block["words"][:MAX_ROWS]]
        rows, folds, top = [], [], y
        for i, w in enumerate(words):
            if i and w != words[i - 1] + 1:
                folds.append((y, w - words[i - 1] - 1))
                y += FOLD_H
            rows.append((w, y))
            y += PITCH
        block.update(rows=rows, folds=folds, top=top,
                     more=max(0, len(block["words"]) - MAX_ROWS))
        y = max(y, top + BAND_MIN_H) + BAND_SEP
    return blocks, y


def render(snap: DirtyRound, context: Sequence[DirtyRound] = ()) -> tuple[bytes, list[dict]]:
    """The PNG (exact cell colours) and the blocks it shows."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    blocks, height = _plan(layout(snap, context))
    img = np.empty((height, WIDTH, 3), np.uint8)
    img[:] = _rgb(BG)
    colour_of = _colours(snap, context)
    taken = set(snap.words().tolist())
    bands = _band_table(snap)
    cache = {c: _rgb(c) for c in (LOG, GUEST, BOTH, MISMATCH, CLEAN, EARLIER, OUTSIDE, TAKEN)}
    for block in blocks:
        for word, y in block["rows"]:
            for bit in range(VHOST_LOG_BITS):
                page = word * VHOST_LOG_BITS + bit
                if not _in_band(block, bands, page):
                    continue              # another band's page: left blank here
                x = _x(bit)
                img[y:y + FILL, x:x + FILL] = cache[colour_of.get(page, CLEAN)]
            if word in taken:              # the sync's atomic exchange took this word
                x = LABEL_W + GRID_W + 4
                img[y + 1:y + FILL - 1, x:x + 4] = cache[TAKEN]
    fig = Figure(figsize=(WIDTH / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    fig.figimage(img, 0, 0, origin="upper", resize=False)

    def text(x: float, y: float, s: str, **kw: Any) -> None:
        fig.text(x / WIDTH, 1 - y / height, s, color=TEXT, va="top", ha="left",
                 family="DejaVu Sans", **kw)

    for block in blocks:
        top = block["top"]
        text(6, top, block["name"], fontsize=9, weight="bold")
        size = (block["end"] - block["first"]) * VHOST_LOG_PAGE
        sub = (f"GPA {block['first'] * VHOST_LOG_PAGE:#x}, {fmt_size(size)}"
               if not block.get("rest") else f"{fmt_size(size)} of guest RAM")
        text(6, top + 12, sub, fontsize=7)
        if not block["rows"]:
            text(LABEL_W, top + 2, "no dirty page here", fontsize=8, style="italic")
        for i, (word, y) in enumerate(block["rows"]):
            if i == 0 or (block["folds"] and any(fy + FOLD_H == y for fy, _n in block["folds"])):
                text(LABEL_W + GRID_W + 12, y - 1, f"{word * VHOST_LOG_BITS * VHOST_LOG_PAGE:#x}",
                     fontsize=7)
        for fy, n in block["folds"]:
            text(LABEL_W + 2, fy - 1, f"\u22ee {n} clean word{'s' if n > 1 else ''}",
                 fontsize=6)
        if block["more"]:
            text(6, top + 24, f"+{block['more']} more words", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, facecolor=BG)
    fig.clear()
    return buf.getvalue(), blocks


def _count(pages: np.ndarray, first: int, end: int) -> int:
    return int(((pages >= first) & (pages < end)).sum())


class DirtyBitmapView(View):
    """One :class:`~vhostlab.dirtylog.DirtyRound`, drawn as labelled bands of pages.

    ``context``: other rounds of the same run; their dirty words are shown
    too (same rows in every frame) and their pages drawn as "dirty in
    another round". ``title`` goes above the picture.
    """

    def __init__(self, snapshot: DirtyRound, context: Sequence[DirtyRound] = (),
                 title: str | None = None) -> None:
        if not isinstance(snapshot, DirtyRound):
            raise TypeError(f"DirtyBitmapView draws a DirtyRound, not {type(snapshot).__name__} "
                            "(a migration's dirty_rounds hold them)")
        self.snapshot = snapshot
        self.context = tuple(context)
        self.title = title

    def png(self) -> bytes:
        return render(self.snapshot, self.context)[0]

    def caption(self) -> str:
        s = self.snapshot
        when = f"at {s.sync_time:.2f} s after migrate"
        if s.round == 0:        # a look at the log, not a sync (DirtyRound's convention)
            head = (f"The vhost log as it is now, with no sync run on it yet: "
                    f"{s.log_pages.size} pages the back-end marked")
        elif s.final_sync:
            head = (f"Final sync (vhost_log_put, in vhost_dev_stop) {when}: it took "
                    f"{s.log_pages.size} pages the back-end had marked since the last sync")
        else:
            head = (f"Round {s.round}: vhost_log_sync {when} took and cleared "
                    f"{s.log_pages.size} pages the back-end marked in the vhost log")
        head += (f" ({s.words().size} of the log's 64-page words); QEMU's own bitmap held "
                 f"{s.guest_pages.size} pages the guest wrote; {s.both_pages.size} in both.")
        if s.mismatched:
            head += f" {len(s.mismatched)} pages differ at the destination."
        return head

    def _legend(self) -> str:
        items = []
        for colour, text in DIRTY_COLOURS.items():
            items.append(f"<span data-dirty-color='{colour}' style='display:inline-block;"
                         f"width:10px;height:10px;background:{colour}'></span> {esc(text)}")
        for colour, text in ((CLEAN, "clean"), (EARLIER, "dirty in another round, clean now"),
                             (TAKEN, "word taken by the sync's atomic exchange (64 pages = "
                                     "one u64 of the log)")):
            items.append(f"<span style='display:inline-block;width:10px;height:10px;"
                         f"background:{colour};border:1px solid #ccc'></span> {esc(text)}")
        return "<div>" + " &nbsp; ".join(items) + "</div>"

    def _bands_table(self, blocks: list[dict]) -> str:
        s = self.snapshot
        mism = s.mismatched_pages
        rows = []
        for b in blocks:
            if b.get("rest"):
                inside = [(g.first_page, g.first_page + g.n_pages) for g in s.bands]

                def n(pages: np.ndarray) -> int:
                    return int(sum(1 for p in pages.tolist()
                                   if not any(a <= p < e for a, e in inside)))
            else:
                def n(pages: np.ndarray, a=b["first"], e=b["end"]) -> int:
                    return _count(pages, a, e)
            rows.append([esc(b["name"]),
                         esc(f"{b['first'] * VHOST_LOG_PAGE:#x}") if not b.get("rest") else "",
                         str(b["end"] - b["first"]), str(n(s.log_pages)),
                         str(n(s.guest_pages)), str(n(s.both_pages)), str(n(mism))])
        return table(["band", "GPA", "pages", "vhost log", "guest", "both",
                      "differ at destination"], rows)

    def _mismatch_list(self) -> str:
        s = self.snapshot
        if not s.mismatched:
            return ""
        def items(ms) -> str:
            return "".join(f"<li>page {m.page:#x} (GPA {m.page * VHOST_LOG_PAGE:#x}): "
                           f"{esc(', '.join(m.frames) or 'no frame found there')}</li>"
                           for m in ms)
        shown, rest = s.mismatched[:6], s.mismatched[6:200]
        more = (f"<details><summary>{len(s.mismatched) - len(shown)} more pages</summary>"
                f"<ul>{items(rest)}</ul>"
                + (f"<div>... and {len(s.mismatched) - 206} more</div>"
                   if len(s.mismatched) > 206 else "") + "</details>") if rest else ""
        return (f"<div class='bad'>{len(s.mismatched)} pages differ at the destination; "
                f"the frames that lived in them:</div><ul>{items(shown)}</ul>{more}")

    def to_html(self) -> str:
        png, blocks = render(self.snapshot, self.context)
        from .png import decode_png
        h, w = decode_png(png).shape[:2]
        img = (f"<img data-role='dirty-map' src='{data_uri(png)}' width='{w}' height='{h}' "
               f"style='image-rendering: pixelated; max-width: none' "
               f"alt='dirty pages by band: {esc(self.caption())}'>")
        body = (f"<div>{esc(self.caption())}</div>{self._legend()}<div>{img}</div>"
                f"{self._mismatch_list()}{self._bands_table(blocks)}")
        if self.snapshot.note:
            body += f"<div class='muted'>{esc(self.snapshot.note)}</div>"
        return wrap(body, self.title, view="dirty-bitmap")


class NewestDirtyRoundView(View):
    """The newest sync of a running migration, redrawn as syncs arrive.

    ``rounds``: a callable that returns the migration's DirtyRounds so far
    (``lambda: migration.dirty_rounds``); a LiveView calls ``to_html()`` on
    every redraw, so the picture follows the syncs while QEMU copies RAM.
    """

    def __init__(self, rounds, title: str = "The dirty bitmap, newest sync") -> None:
        self.rounds = rounds
        self.title = title

    def to_html(self) -> str:
        rounds = [r for r in self.rounds() if isinstance(r, DirtyRound)]
        if not rounds:
            return wrap("<div class='muted'>no sync of the log yet: logging starts with "
                        "the migration (SET_LOG_BASE, then SET_FEATURES with "
                        "VHOST_F_LOG_ALL)</div>", self.title, view="dirty-bitmap")
        r = rounds[-1]
        label = "final sync (vhost_log_put)" if r.final_sync else f"round {r.round}"
        return DirtyBitmapView(r, rounds, title=f"{self.title}: {label}, {len(rounds)} so "
                               "far").to_html()


class DirtyRoundPlayer:
    """Play and a slider over a run's DirtyRounds; the static twin shows them all.

    ``rounds``: the DirtyRound list of a migration (``mig.dirty_rounds``).
    """

    title = "The dirty bitmap, sync by sync"

    def __init__(self, rounds: Sequence[DirtyRound], title: str | None = None,
                 interval_ms: int = 1200) -> None:
        self.rounds = [r for r in rounds if isinstance(r, DirtyRound)]
        if not self.rounds:
            raise ValueError("no DirtyRound to play (did the migration run?)")
        self.title = title or self.title
        self.interval_ms = interval_ms
        self._widget = None

    def view(self, i: int) -> DirtyBitmapView:
        r = self.rounds[i]
        label = "final sync (vhost_log_put)" if r.final_sync else f"round {r.round}"
        return DirtyBitmapView(r, self.rounds, title=f"{label}, {i + 1} of {len(self.rounds)}")

    def busiest(self) -> int:
        """The frame shown first: the sync with pages that differ at the destination
        (what a broken run is about), else the one with the most dirty pages."""
        broken = [i for i, r in enumerate(self.rounds) if r.mismatched]
        if broken:
            return broken[-1]
        sizes = [r.log_pages.size + r.guest_pages.size for r in self.rounds]
        return int(np.argmax(sizes))

    @property
    def widget(self) -> Any:
        if self._widget is None:
            import ipywidgets as w

            n, first = len(self.rounds), self.busiest()
            play = w.Play(value=first, min=0, max=n - 1, step=1, interval=self.interval_ms,
                          description="play")
            slider = w.IntSlider(value=first, min=0, max=n - 1, description="sync",
                                 readout=False)
            w.jslink((play, "value"), (slider, "value"))
            pane = w.HTML(self.view(first).to_html())
            slider.observe(lambda c: setattr(pane, "value", self.view(c["new"]).to_html()),
                           names="value")
            self._widget = w.VBox([w.HTML(f"<b>{esc(self.title)}</b>"),
                                   w.HBox([play, slider]), pane])
        return self._widget

    def to_html(self) -> str:
        return "".join(self.view(i).to_html() for i in range(len(self.rounds)))

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        from .widgets import WIDGET_VIEW, _in_kernel

        bundle = {"text/plain": f"<DirtyRoundPlayer: {len(self.rounds)} syncs>",
                  "text/html": self.to_html()}
        if _in_kernel():
            bundle[WIDGET_VIEW] = {"version_major": 2, "version_minor": 0,
                                   "model_id": self.widget.model_id}
        return bundle
