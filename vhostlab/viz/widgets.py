"""Interactive views on top of the static ones (ipywidgets 8).

- ``Stepper``: one button that issues the next VhostOps call, then redraws the
  views (trace, rings) from the live objects.
- ``RoundSlider``: a slider over the rounds of a migration: the dirty bitmap
  of that round and its numbers.
- ``LiveView``: redraws views from a refresh thread (10 per second by
  default) while something else (a migration thread) runs, so the kernel
  stays free; it stops by itself when that thread ends.
- ``progress()``: ``with progress("Compiling kernels"):`` shows an
  indeterminate bar when the block takes more than a second;
- ``watch_migration()``: a LiveView of a migration running in a thread.

Every widget also carries a static ``text/html`` rendering in its display
bundle, so a notebook executed with no front-end attached (nbclient in CI,
nbconvert to HTML, GitHub's preview) still shows what the widget showed:
nbconvert falls back to ``text/html`` when no widget state was saved.
Constructing and displaying a widget never blocks and never needs a front-end.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Iterator, Sequence

from ._common import View, esc, rounds_of, table, wrap
from .bitmap import LogBitmapView
from .timeline import rounds_table, rows_of

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _in_kernel() -> bool:
    """True inside an IPython kernel (a notebook, Voila, nbclient), where widgets can live."""
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def _render(view: Any) -> str:
    """HTML of a view: a View, anything with _repr_html_, or a zero-argument callable."""
    if isinstance(view, View) or hasattr(view, "_repr_html_"):
        return view._repr_html_()
    if callable(view):
        return _render(view())
    return f"<pre>{esc(view)}</pre>"


class WidgetView:
    """An ipywidgets box plus its static HTML twin in one display bundle."""

    title = ""

    _box: Any = None    # the ipywidgets box a subclass builds in __init__

    @property
    def widget(self) -> Any:
        return self._box

    def to_html(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict:
        bundle = {"text/plain": f"<{type(self).__name__}: {self.title}>",
                  "text/html": self.to_html()}
        model_id = getattr(self.widget, "model_id", None)
        if model_id:
            bundle[WIDGET_VIEW] = {"version_major": 2, "version_minor": 0,
                                   "model_id": model_id}
        return bundle

    def close(self) -> None:
        """Close the widgets (their front-end views disappear)."""
        _close_tree(self.widget)


def _close_tree(widget: Any) -> None:
    """Close a widget and every widget inside it."""
    for child in list(getattr(widget, "children", ())):
        _close_tree(child)
    widget.close()


class Stepper(WidgetView):
    """Issue a list of calls one at a time, redrawing views after each.

    ``steps``: ``(label, callable)`` pairs, e.g. ``("vhost_set_owner",
    ops.vhost_set_owner)``; ``views``: objects with ``_repr_html_`` (a
    TraceView, a VirtqueueView...) drawn from their live sources after every
    step. A step that raises shows its error and stays the next step.
    """

    def __init__(self, steps: Sequence[tuple[str, Callable[[], Any]]],
                 views: Iterable[Any] = (), title: str = "Steps") -> None:
        import ipywidgets as w

        self.steps = [(str(label), fn) for label, fn in steps]
        self.views = list(views)
        self.title = title
        self.position = 0
        self.log: list[tuple[int, str, bool, str]] = []  # (step, label, ok, result or error)
        self._next = w.Button(button_style="primary", layout=w.Layout(width="auto"))
        self._rest = w.Button(description="Run the rest", layout=w.Layout(width="auto"))
        self._status = w.HTML()
        self._busy = w.HTML(layout=w.Layout(display="none"))
        self._area = w.HTML()
        # The buttons hold the stepper: displayed and not kept in a variable,
        # it lives as long as its widgets (until close()).
        self._next.on_click(lambda _b: self.step())
        self._rest.on_click(lambda _b: self.run_all())
        self._box = w.VBox([w.HTML(f"<b>{esc(title)}</b>"),
                            w.HBox([self._next, self._rest]), self._busy, self._status,
                            self._area])
        self.refresh()

    @property
    def done(self) -> bool:
        return self.position >= len(self.steps)

    def step(self) -> Any:
        """Issue the next call; returns its result (None when all steps are done)."""
        if self.done:
            return None
        label, fn = self.steps[self.position]
        try:
            with progress(label, pane=self._busy):
                result = fn()
        except Exception as exc:  # shown to the learner, the stepper stays usable
            self.log.append((self.position, label, False, f"{type(exc).__name__}: {exc}"))
            self.refresh()
            return None
        self.log.append((self.position, label, True, "" if result is None else repr(result)))
        self.position += 1
        self.refresh()
        return result

    def run_all(self) -> None:
        """Issue every remaining call, stopping at the first that fails."""
        while not self.done:
            before = self.position
            self.step()
            if self.position == before:
                break

    def _status_html(self) -> str:
        last = {step: (ok, text) for step, _label, ok, text in self.log}
        rows = []
        for i, (label, _fn) in enumerate(self.steps):
            mark = "\u2713" if i < self.position else ("\u25b6" if i == self.position else "")
            ok, text = last.get(i, (True, ""))
            note = esc(text[:200]) if ok else f"<span class='bad'>{esc(text[:300])}</span>"
            rows.append([mark, esc(label), note])
        return table(["", "call", "result"], rows, caption=f"{self.position} of "
                     f"{len(self.steps)} done")

    def refresh(self) -> None:
        """Redraw the status and the views from their sources."""
        if self.done:
            self._next.description, self._next.disabled = "All steps done", True
            self._rest.disabled = True
        else:
            self._next.description = f"Next: {self.steps[self.position][0]}"
            self._next.disabled = self._rest.disabled = False
        self._status.value = wrap(self._status_html())
        self._area.value = "".join(_render(v) for v in self.views)

    def to_html(self) -> str:
        return wrap(self._status_html(), self.title) + "".join(_render(v) for v in self.views)


class RoundSlider(WidgetView):
    """A slider over migration rounds: that round's dirty bitmap and numbers.

    ``source``: a migration object holding its round snapshots (read live,
    so rounds added while it runs appear after ``refresh()``) or a list of
    them; ``bitmap``: which bitmap of a round to draw (see LogBitmapView).
    """

    def __init__(self, source: Any, pages: int | None = None,
                 title: str = "Dirty pages, round by round",
                 bitmap: str = "log_bitmap") -> None:
        import ipywidgets as w

        self.source = source
        self.pages = pages
        self.bitmap = bitmap
        self.title = title
        self._slider = w.IntSlider(value=1, min=1, max=1, description="round",
                                   continuous_update=True)
        self._numbers = w.HTML()
        self._image = w.HTML()
        self._slider.observe(lambda _c: self._draw(), names="value")
        self._box = w.VBox([w.HTML(f"<b>{esc(title)}</b>"), self._slider, self._numbers,
                            self._image])
        self.refresh()

    def rounds(self) -> list[Any]:
        """The round snapshots, read from the source now."""
        return rounds_of(self.source)

    def refresh(self) -> None:
        """Re-read the rounds; follow the newest round if the slider was at the end."""
        n = len(self.rounds())
        at_end = self._slider.value >= self._slider.max
        self._slider.max = max(1, n)
        self._slider.disabled = n == 0
        if at_end:
            self._slider.value = max(1, n)
        self._draw()

    def _numbers_html(self, r: int, rounds: list[Any]) -> str:
        if not rounds:
            return "<div class='muted'>no rounds yet</div>"
        rows = rows_of(rounds)
        return rounds_table([rows[r - 1]], rows, explain=False)

    def _draw(self) -> None:
        rounds = self.rounds()
        r = min(self._slider.value, max(1, len(rounds)))
        self._numbers.value = wrap(self._numbers_html(r, rounds))
        self._image.value = LogBitmapView(rounds, round=r - 1, pages=self.pages,
                                            bitmap=self.bitmap).to_html()

    def to_html(self) -> str:
        rounds = self.rounds()
        r = min(self._slider.value, max(1, len(rounds)))
        return (wrap(self._numbers_html(r, rounds), f"{self.title} (round {r} of "
                     f"{len(rounds)})")
                + LogBitmapView(rounds, round=r - 1, pages=self.pages,
                                  bitmap=self.bitmap).to_html())


def _refresh_loop(ref: "weakref.ref[LiveView]", stop: threading.Event) -> None:
    """Body of a LiveView's refresh thread; holds the view only weakly."""
    while not stop.is_set():
        view = ref()
        if view is None:
            return
        deadline = time.monotonic() + view.interval
        finished = view._finished()
        view.refresh()
        if finished or time.monotonic() - view.started > view.max_seconds:
            stop.set()
            view._on_stopped()
            return
        del view
        stop.wait(max(0.0, deadline - time.monotonic()))


class LiveView(WidgetView):
    """Redraw views from a background thread while work runs elsewhere.

    ``views``: static views (``_repr_html_``, read from live objects) and
    widget views with ``refresh()`` (a RoundSlider). ``until``: a thread or
    a zero-argument callable; the loop stops (after one last redraw) when the
    thread has ended or the callable returns true. ``interval`` seconds
    between redraws (0.1: ten a second). ``max_seconds`` bounds the loop even
    if nobody stops it. The thread holds the LiveView only weakly (its
    widgets hold it while they are open): it ends when the LiveView is
    stopped, closed or collected; nothing busy-polls.
    """

    def __init__(self, views: Iterable[Any], until: Any = None, interval: float = 0.1,
                 max_seconds: float = 300.0, title: str = "Live", start: bool = True) -> None:
        import ipywidgets as w

        self.views = list(views)
        self.until = until
        self.interval = float(interval)
        self.max_seconds = float(max_seconds)
        self.title = title
        self.refreshes = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._status = w.HTML()
        self._stop_button = w.Button(description="Stop updating", layout=w.Layout(width="auto"))
        # The button holds the view, so a LiveView that is displayed and not
        # kept in a variable still updates; it ends with ``until``,
        # ``max_seconds``, the button, or close().
        self._stop_button.on_click(lambda _b: self.stop(join=False))
        self._panes = [v.widget if isinstance(v, WidgetView) else w.HTML() for v in self.views]
        self._box = w.VBox([w.HBox([self._stop_button, self._status]), *self._panes])
        self.refresh()
        if start:
            self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _finished(self) -> bool:
        until = self.until
        if until is None:
            return False
        if isinstance(until, threading.Thread):
            return not until.is_alive()
        try:
            return bool(until())
        except Exception:  # a broken predicate must not keep the thread alive
            return True

    def start(self) -> None:
        """Start the refresh thread (once)."""
        if self.running:
            return
        self._stop.clear()
        self.started = time.monotonic()
        self._thread = threading.Thread(target=_refresh_loop,
                                        args=(weakref.ref(self), self._stop),
                                        name="vhostlab-liveview", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        """Read every view's source now and redraw it (counts in ``refreshes``)."""
        with self._lock:
            for view, pane in zip(self.views, self._panes):
                if isinstance(view, WidgetView):
                    getattr(view, "refresh", lambda: None)()
                else:
                    html = _render(view)
                    if pane.value != html:
                        pane.value = html
            self.refreshes += 1
            state = "updating" if not self._stop.is_set() else "stopped"
            self._status.value = (f"<span style='color:#666'>{state}, "
                                  f"{self.refreshes} redraws</span>")

    def _on_stopped(self) -> None:
        self._stop_button.disabled = True
        self._status.value = f"<span style='color:#666'>stopped after {self.refreshes} redraws</span>"

    def show(self) -> None:
        """Display the live view, keeping a handle so that ``wait()`` and
        ``stop()`` can put the final picture into the saved (static) output."""
        from IPython.display import display

        self._handle = display(self, display_id=True)

    def _update_static(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None and threading.current_thread() is threading.main_thread():
            handle.update(self)

    def stop(self, join: bool = True, timeout: float = 5.0) -> None:
        """Stop the refresh thread; with ``join`` wait for it to end."""
        self._stop.set()
        thread = self._thread
        if join and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._on_stopped()
        self._update_static()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the refresh thread ends (for scripts and tests); True if it did."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if not self.running:
            self._update_static()
        return not self.running

    def close(self) -> None:
        """Stop the thread and close the widgets."""
        self.stop()
        super().close()

    def __enter__(self) -> "LiveView":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def to_html(self) -> str:
        parts = []
        for view in self.views:
            parts.append(view.to_html() if isinstance(view, WidgetView) else _render(view))
        return "".join(parts)


def watch_migration(migration: Any, until: Any, trace: Any = None, interval: float = 0.1,
                    max_seconds: float = 300.0) -> LiveView:
    """A LiveView of a running migration: its timeline, its rounds, its messages.

    ``migration``: the object holding the round snapshots (the built-in
    migration); ``until``: the thread running it (the view stops when it
    ends); ``trace``: a source of vhost-user messages to follow (a back-end,
    a front-end device), if any. Display the result, or call ``show()``.
    """
    from .dirtymap import NewestDirtyRoundView
    from .timeline import MigrationTimelineView
    from .trace import TraceView

    views: list[Any] = [MigrationTimelineView(migration)]
    if hasattr(migration, "dirty_rounds"):     # both front-ends keep a DirtyRound per sync
        views.append(NewestDirtyRoundView(lambda: list(migration.dirty_rounds)))
    else:
        views.append(RoundSlider(migration))
    if trace is not None:
        views.append(TraceView(trace, limit=8))
    return LiveView(views, until=until, interval=interval, max_seconds=max_seconds,
                    title="Live migration")


class _Progress:
    """The bar behind ``progress()``: revealed by a timer, closed at the end."""

    def __init__(self, label: str, pane: Any) -> None:
        self.label, self.bar, self.handle = label, pane, None
        self.shown = threading.Event()
        self.html = (f"<progress style='width:240px'></progress> "
                     f"<span>{esc(label)}\u2026</span>")

    def reveal(self) -> None:
        """Runs in the timer thread, so it lands in the cell that is running."""
        self.shown.set()
        if self.bar is None and _in_kernel():
            import ipywidgets as w
            from IPython.display import display

            self.bar = w.HTML(self.html)
            self.handle = display({"text/plain": f"{self.label}...", WIDGET_VIEW: {
                "version_major": 2, "version_minor": 0, "model_id": self.bar.model_id}},
                raw=True, display_id=True)
        elif self.bar is not None:
            self.bar.value = self.html
            self.bar.layout.display = ""
        else:
            print(f"{self.label}...", file=sys.stderr, flush=True)

    def finish(self, elapsed: float) -> None:
        done = f"{self.label}: done in {elapsed:.1f} s"
        if self.handle is not None:
            self.handle.update({"text/plain": done}, raw=True)
            self.bar.close()
        elif self.bar is not None:
            self.bar.layout.display = "none"
            self.bar.value = ""
        elif self.shown.is_set():
            print(done, file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress(label: str, delay: float = 1.0, pane: Any = None) -> Iterator[None]:
    """Show an indeterminate progress bar if the block takes more than ``delay`` s.

    A timer thread reveals the bar after ``delay`` seconds: in a kernel a
    widget (an HTML ``<progress>`` with no value, which browsers draw as
    indeterminate) displayed in the running cell; at exit it is replaced by
    one line saying how long the block took. A quick block leaves no output.
    ``pane``: an ipywidgets HTML to reveal instead of displaying a new one (a
    button callback's own output goes nowhere, so widgets pass their own
    pane). Outside a kernel the two lines go to stderr. The block itself runs
    undisturbed in the caller's thread::

        with progress("Compiling kernels"):
            vq.tx_burst(memory, arena)      # numba's first compile
    """
    start = time.monotonic()
    bar = _Progress(label, pane)
    timer = threading.Timer(delay, bar.reveal)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        bar.finish(time.monotonic() - start)
