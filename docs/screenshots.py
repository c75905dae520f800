"""Regenerate the README's screenshots: labs run and rendered in JupyterLab, in headless Chromium.

    .venv/bin/python docs/screenshots.py                      # writes docs/img/*.png
    .venv/bin/python docs/screenshots.py --frontend builtin   # without QEMU

It drives the browser with the same harness as the browser test
(``tests/browser/lab_browser.py``): needs the kit's venv with the test extras
(``make install``: JupyterLab, playwright, Pillow, psutil) and a Chromium,
Debian's ``chromium`` package or any Chrome named by ``--chromium`` or
``$VHOSTLAB_BROWSER``. It is a developer tool, not part of the kit; it takes
about a minute.

What it does, end to end:

1. copy the labs into a temporary directory and serve them with JupyterLab on
   a free loopback port (the harness's :class:`JupyterLab`);
2. open each lab in headless Chromium and pick Run > Run All Cells, as a
   learner would (the front-end is the labs' choice: QEMU when installed);
   stop if a cell fails, a widget is not drawn or the page logs an error;
3. do what a learner would (move a slider), and screenshot the cell that draws
   the view, cropped to its interesting part;
4. quantize each PNG to a small palette and write it to ``docs/img/``.

JupyterLab, its kernels and Chromium are stopped whatever happens, and the
temporary directory goes with them.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "browser"))
import lab_browser  # noqa: E402  (the shared JupyterLab + Chromium harness)


@dataclass(frozen=True)
class Shot:
    """One screenshot of a lab: the code cell whose source contains ``cell``.

    ``until``: a JavaScript expression (``out`` is the cell's output area)
    naming the element where the crop ends, or None for the whole cell.
    ``focus`` and ``keys``: an element of the output to focus (CSS selector)
    and the keys to press on it first, as a learner would. ``colors``: the
    palette size the PNG is quantized to, or 0 to keep every colour exact
    (small legend swatches would otherwise merge into their neighbours).
    """
    lab: str
    cell: str
    png: str
    until: str | None = None
    focus: str | None = None
    keys: tuple[str, ...] = ()
    colors: int = 96


SHOTS = (
    # The TX ring of the lab's front-end's guest (with QEMU: read over qtest):
    # both rings with their pointers, the chains, the top of the table.
    Shot("04_virtqueues", "dev.vring_view(1)", "vring-view.png",
         until="[...out.querySelectorAll('table')].pop().rows[6]"),
    # A packed TX ring of 16 after 23 frames: each slot says who wrote it (A/U)
    # and in which lap (the wrap counter), with both sides' positions.
    Shot("04_virtqueues", "packed_dev.vring_view(1)", "packed-ring.png",
         until="out.querySelectorAll('table')[1]"),
    # The live migration view as it stopped: the rounds, and the newest sync's
    # dirty pages by labelled bands.
    Shot("07_live_migration", "mig.watch()", "migration-dashboard.png", colors=0),
    # The dirty-page map of one log sync: guest RAM in labelled bands, a cell
    # per page, the vhost log beside QEMU's own bitmap (the player opens at
    # the busiest sync).
    Shot("07_live_migration", "player = viz.DirtyRoundPlayer(rounds)", "dirty-bitmap.png",
         colors=0),
    # The same with logging broken, its slider moved to the end: vhost_log_put's
    # final sync, the pages that differ at the destination in their own colour.
    Shot("07_live_migration", "bad_rounds = bad.dirty_rounds()", "dirty-bitmap-broken.png",
         until="out.querySelectorAll('li')[3]",
         focus=".widget-slider .noUi-handle", keys=("End",), colors=0),
)
TALL = 3000                     # window height while shooting: room for any one cell

# After a learner's keys: make the last cell the active one again, so that
# the shot's cell is drawn unselected (no blue bar, no cell toolbar).
DESELECT = """() => {
  const notebook = window.jupyterapp.shell.currentWidget.content;
  document.activeElement?.blur();
  notebook.activeCellIndex = notebook.widgets.length - 1; notebook.mode = 'command';
}"""
# The rectangle to capture: the cell, from its top to the bottom of ``until``
# (or of the cell), once it is drawn; null while it is still loading.
RECT = """(cell, until) => {
  const out = cell.querySelector('.jp-OutputArea');
  if (!out || !out.children.length || out.textContent.includes('Loading widget')) return null;
  if ([...out.querySelectorAll('img')].some(i => !i.complete)) return null;
  const scroller = cell.closest('.jp-WindowedPanel-outer') || cell.parentElement;
  cell.scrollIntoView({block: 'start'});
  scroller.scrollTop = Math.max(0, scroller.scrollTop - 10);
  const r = cell.getBoundingClientRect(), view = scroller.getBoundingClientRect();
  const end = until ? (new Function('out', 'return ' + until))(out) : null;
  const bottom = end ? end.getBoundingClientRect().bottom : r.bottom;
  return {x: r.left, y: r.top, width: r.width,
          height: Math.min(bottom, view.bottom) - r.top};
}"""


def act(page: lab_browser.LabPage, cell, shot: Shot) -> None:
    """Focus the shot's element and press its keys, as a learner would."""
    if not shot.focus:
        return
    target = cell.locator(shot.focus).first
    target.focus()
    for key in shot.keys:
        page.page.keyboard.press(key)
    page.page.evaluate(DESELECT)


def screenshot(page: lab_browser.LabPage, shot: Shot, timeout: float = 60.0) -> bytes:
    """A PNG of the shot's rectangle, once the cell has rendered and held still for 1 s."""
    cell = page.cell(shot.cell)
    act(page, cell, shot)
    size = page.page.viewport_size
    page.page.set_viewport_size({"width": size["width"], "height": TALL})
    try:
        deadline, last, still = time.monotonic() + timeout, None, 0
        while still < 4:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{shot.lab}: {shot.cell!r} did not render in {timeout:.0f} s")
            rect = cell.evaluate(RECT, shot.until)
            still = still + 1 if rect and rect == last else 0
            last = rect
            page.page.wait_for_timeout(250)
        pad = 6
        clip = {"x": max(0, rect["x"] - pad), "y": max(0, rect["y"] - pad),
                "width": rect["width"] + 2 * pad, "height": rect["height"] + 2 * pad}
        return page.page.screenshot(clip=clip)
    finally:
        page.page.set_viewport_size(size)


def take_all(lab: lab_browser.JupyterLab, chromium: str | None) -> dict[str, bytes]:
    """Run each lab and screenshot its shots; fail on anything a learner would see go wrong."""
    pngs = {}
    with lab_browser.Browser(chromium) as browser:
        for name in dict.fromkeys(shot.lab for shot in SHOTS):
            page = browser.open(lab, f"{name}.ipynb")
            try:
                result = page.run_all()
                problems = page.problems(result)
                if problems:
                    raise RuntimeError(f"{name}:\n  " + "\n  ".join(problems))
                print(f"ran {name} in {result.seconds:.0f} s", flush=True)
                for shot in (s for s in SHOTS if s.lab == name):
                    pngs[shot.png] = screenshot(page, shot)
            finally:
                page.close()
                lab.shutdown_kernels()
    return pngs


def shrink(png: bytes, colors: int) -> bytes:
    """Quantize a screenshot to a small palette PNG (flat UI colours, no dither);
    with ``colors`` 0, keep every colour and only recompress."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if not colors:
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
        return out.getvalue()
    small = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.NONE)
    out = io.BytesIO()
    small.save(out, format="PNG", optimize=True)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img",
                        help="where the PNGs go (default: docs/img)")
    parser.add_argument("--frontend", choices=("auto", "qemu", "builtin"),
                        help="the labs' front-end (VHOSTLAB_FRONTEND; default: the labs' choice)")
    parser.add_argument("--chromium", help="the Chromium binary (default: $VHOSTLAB_BROWSER, "
                        "Debian's chromium, or one on PATH)")
    args = parser.parse_args()
    if args.chromium:
        os.environ["VHOSTLAB_BROWSER"] = args.chromium
    reason = lab_browser.missing()
    if reason:
        sys.exit(reason)
    env = {"VHOSTLAB_FRONTEND": args.frontend} if args.frontend else {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhostlab-shots-") as tmp:
        scratch = Path(tmp)
        root = lab_browser.copy_labs(ROOT / "labs", scratch / "labs")
        with lab_browser.JupyterLab(root, scratch / "jupyterlab", env=env) as lab:
            pngs = take_all(lab, lab_browser.find_chromium())
    args.out.mkdir(parents=True, exist_ok=True)
    for shot in SHOTS:
        data = shrink(pngs[shot.png], shot.colors)
        (args.out / shot.png).write_bytes(data)
        w, h = Image.open(io.BytesIO(data)).size
        print(f"{args.out / shot.png}: {w}x{h}, {len(data) // 1024} KiB")
    print(f"done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
