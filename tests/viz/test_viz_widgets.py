"""Widgets: they work with no front-end, refresh live, and leave no thread behind."""
from __future__ import annotations

import gc
import threading
import time

import pytest

from vhostlab.backend.trace import MessageTrace
from vhostlab.protocol import TO_BACKEND, Message, Request, VringState
from vhostlab.viz import LiveView, RoundSlider, Stepper, TraceView, progress
from vhostlab.viz.widgets import WIDGET_VIEW, _close_tree


def _viz_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("vhostlab-liveview") or isinstance(t, threading.Timer)]


@pytest.fixture(autouse=True)
def no_threads_left():
    yield
    gc.collect()
    deadline = time.monotonic() + 2.0
    while _viz_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _viz_threads(), f"threads left running: {_viz_threads()}"


def _send(trace: MessageTrace, msg: Message) -> None:
    trace.record(TO_BACKEND, msg.request.name, msg.fields(), msg.to_bytes(), nfds=len(msg.fds))


def test_live_view_refreshes_at_least_five_times_a_second_while_work_runs():
    trace = MessageTrace()
    stop = threading.Event()

    def work():  # messages arrive while the migration-like worker runs
        n = 0
        while not stop.wait(0.02):
            n += 1
            _send(trace, Message.make(Request.SET_VRING_NUM, VringState(0, n)))

    worker = threading.Thread(target=work)
    worker.start()
    view = LiveView([TraceView(trace, limit=5)], until=worker)
    first = view.refreshes                   # the one drawn at construction
    try:
        time.sleep(1.0)
        counted = view.refreshes - first
    finally:
        stop.set()
        worker.join()
    assert view.wait(5.0), "refresh thread did not stop after the worker ended"
    assert counted >= 5, f"only {counted} refreshes in 1 s"
    # The last redraw came after the worker's last message.
    last = trace.records()[-1].fields["payload"]["num"]
    assert f"num = {last}<" in view._panes[0].value
    assert f"num = {last}<" in view._repr_mimebundle_()["text/html"]


def test_live_view_thread_ends_when_closed_stopped_or_out_of_time():
    view = LiveView([TraceView(MessageTrace())], interval=0.05)
    assert view.running
    thread = view._thread
    view.close()                             # closes its widgets too
    assert not thread.is_alive()
    del view
    gc.collect()

    with LiveView([TraceView(MessageTrace())], interval=0.05) as view:
        assert view.running
    assert not view.running

    view = LiveView([TraceView(MessageTrace())], interval=0.05, max_seconds=0.2)
    assert view.wait(5.0)                    # nobody stopped it: max_seconds did
    view.close()


def test_a_displayed_live_view_is_kept_by_its_widgets_until_closed():
    view = LiveView([TraceView(MessageTrace())], interval=0.05)
    thread, box = view._thread, view.widget  # what the front-end holds: the widgets
    del view
    gc.collect()
    assert thread.is_alive()                 # still on screen, still updating
    box.children[0].children[0].click()      # the learner presses "Stop updating"
    thread.join(2.0)
    assert not thread.is_alive()
    _close_tree(box)


def test_stepper_issues_calls_in_order_and_redraws_views():
    trace = MessageTrace()
    calls = []

    def call(request, payload=None):
        def step():
            calls.append(request.name)
            _send(trace, Message.make(request, payload))
            return request.name
        return step

    def failing():
        raise RuntimeError("back-end said no: <b>bold</b>")

    stepper = Stepper([("vhost_set_owner", call(Request.SET_OWNER)),
                       ("broken", failing),
                       ("vhost_set_vring_num", call(Request.SET_VRING_NUM, VringState(0, 256)))],
                      views=[TraceView(trace)])
    assert stepper._next.description == "Next: vhost_set_owner"
    assert stepper.step() == "SET_OWNER"
    assert "SET_OWNER" in stepper._area.value               # views redrawn after the step
    assert stepper.step() is None and stepper.position == 1  # the error keeps its place
    assert "back-end said no: &lt;b&gt;" in stepper._status.value
    stepper.steps[1] = ("vhost_get_features", call(Request.GET_FEATURES))
    stepper.run_all()
    assert calls == ["SET_OWNER", "GET_FEATURES", "SET_VRING_NUM"]
    assert stepper.done and stepper._next.disabled
    assert "num = 256" in stepper._area.value
    bundle = stepper._repr_mimebundle_()
    assert WIDGET_VIEW in bundle and "SET_VRING_NUM" in bundle["text/html"]


def test_round_slider_follows_new_rounds():
    rounds = [{"round": 1, "pages_copied": 32, "log_bitmap": bytes([0xFF] * 4)}]
    slider = RoundSlider({"rounds": rounds})
    assert (slider._slider.value, slider._slider.max) == (1, 1)
    rounds.append({"round": 2, "pages_copied": 8, "log_bitmap": bytes([0x01, 0, 0, 0])})
    slider.refresh()
    assert (slider._slider.value, slider._slider.max) == (2, 2)
    assert "1</b> of 32 pages dirty" in slider._image.value
    slider._slider.value = 1
    assert "32</b> of 32 pages dirty" in slider._image.value
    assert "round 1 of 2" in slider._repr_mimebundle_()["text/html"]


def test_progress_shows_only_for_slow_blocks(capsys):
    with progress("Quick step", delay=0.3):
        pass
    assert capsys.readouterr().err == ""
    with progress("Compiling kernels", delay=0.1):
        time.sleep(0.4)
    err = capsys.readouterr().err
    assert "Compiling kernels..." in err and "Compiling kernels: done in" in err
