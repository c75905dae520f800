"""Widgets inside a real kernel with no front-end attached (nbclient, as in CI).

Constructing and displaying them must neither raise nor block, and the saved
outputs must carry the static HTML, which is what nbconvert and GitHub show.
"""
from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient
from nbconvert import HTMLExporter

CELLS = [
    """import threading, time
from vhostlab.backend.trace import MessageTrace
from vhostlab.protocol import Message, Request, VringState
from vhostlab.viz import LiveView, RoundSlider, Stepper, TraceView, progress
trace = MessageTrace()
def send(num):
    m = Message.make(Request.SET_VRING_NUM, VringState(0, num))
    trace.record("front-end to back-end", m.request.name, m.fields(), m.to_bytes())""",
    """with progress("Compiling kernels", delay=0.2):
    time.sleep(0.6)""",
    """with progress("Quick step", delay=0.5):
    pass""",
    """stepper = Stepper([("set num 0x123", lambda: send(0x123))], views=[TraceView(trace)])
stepper.step()
stepper""",
    """worker = threading.Thread(target=lambda: [send(n) or time.sleep(0.05) for n in range(0x200, 0x20a)])
worker.start()
live = LiveView([TraceView(trace, limit=3)], until=worker)
live.show()""",
    """live.wait(10)
print("refreshes", live.refreshes, "running", live.running)""",
    """RoundSlider([{"round": 1, "pages_copied": 16, "log_bitmap": bytes([0x0f, 0])}])""",
]


@pytest.fixture(scope="module")
def executed():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    client = NotebookClient(nb, timeout=60, kernel_name="python3",
                            resources={"metadata": {"path": "."}})
    client.execute()
    return nb


def _outputs(nb, i):
    return nb.cells[i].outputs


def test_progress_bar_becomes_a_done_line_and_quick_blocks_leave_nothing(executed):
    slow = _outputs(executed, 1)
    assert len(slow) == 1 and slow[0].output_type == "display_data"
    assert slow[0]["data"]["text/plain"].startswith("Compiling kernels: done in")
    assert _outputs(executed, 2) == []


def test_widgets_carry_their_static_html(executed):
    stepper = _outputs(executed, 3)[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in stepper
    assert "num = 291<" in stepper["text/html"] and "1 of 1 done" in stepper["text/html"]
    live = _outputs(executed, 4)[0]["data"]
    # show() + wait(): the saved output holds the final picture, not the first.
    assert "num = 521<" in live["text/html"]
    printed = "".join(o.get("text", "") for o in _outputs(executed, 5))
    assert "running False" in printed
    refreshes = int(printed.split()[1])
    assert refreshes >= 2
    slider = _outputs(executed, 6)[0]["data"]
    assert "4</b> of 16 pages dirty" in slider["text/html"]


def test_nbconvert_html_shows_the_views_with_or_without_widget_state(executed):
    # nbclient saves the widget state: nbconvert then embeds the widgets (their
    # HTML values inside a JSON script, with "</" written as "<\\/").
    assert "widgets" in executed.metadata
    page, _ = HTMLExporter().from_notebook_node(executed)
    page = page.replace("<\\/", "</")
    assert "4</b> of 16 pages dirty" in page
    assert "Compiling kernels: done in" in page
    # Without the state (a notebook saved with no widget manager, GitHub's
    # preview), nbconvert falls back to the static text/html.
    bare = nbformat.from_dict(executed)
    del bare.metadata["widgets"]
    page, _ = HTMLExporter().from_notebook_node(bare)
    assert "num = 521<" in page and "num = 291<" in page
    assert "4</b> of 16 pages dirty" in page


def test_every_cell_ran(executed):
    assert [c.get("execution_count") for c in executed.cells] == list(range(1, len(CELLS) + 1))
