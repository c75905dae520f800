"""The lab notebooks: stored clean, shaped as DESIGN.md asks, and run top to bottom.

Every notebook is executed in a fresh kernel twice: with a real QEMU as the
front-end (VHOSTLAB_FRONTEND=qemu; skipped without QEMU unless
VHOSTLAB_REQUIRE_QEMU=1) and with the built-in front-end forced
(VHOSTLAB_FRONTEND=builtin). A cell that raises, including a failed
`assert` of the ground truth a learner reads, fails the test. Each run's
wall time is printed (run pytest with -s to see it); it is a measurement,
not an assertion.
"""
from __future__ import annotations

import pathlib
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

LABS = pathlib.Path(__file__).resolve().parents[2] / "labs"
NOTEBOOKS = sorted(p.name for p in LABS.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["00_welcome.ipynb", "01_two_backends.ipynb", "02_handshake.ipynb",
            "03_memory_table.ipynb", "04_virtqueues.ipynb", "05_numba_datapath.ipynb",
            "06_dirty_logging.ipynb", "07_live_migration.ipynb",
            "08_vhostops_reference.ipynb", "09_migration_sweep.ipynb"]

# The 35 ops of the seed's `typedef struct VhostOps`, in its order.
SEED_VHOST_OPS = """
vhost_backend_init vhost_backend_cleanup vhost_backend_memslots_limit vhost_net_set_backend
vhost_net_set_mtu vhost_scsi_set_endpoint vhost_scsi_clear_endpoint vhost_scsi_get_abi_version
vhost_set_log_base vhost_set_mem_table vhost_set_vring_addr vhost_set_vring_endian
vhost_set_vring_num vhost_set_vring_base vhost_get_vring_base vhost_set_vring_kick
vhost_set_vring_call vhost_set_vring_busyloop_timeout vhost_set_features vhost_get_features
vhost_set_owner vhost_reset_device vhost_get_vq_index vhost_set_vring_enable
vhost_requires_shm_log vhost_migration_done vhost_backend_can_merge vhost_vsock_set_guest_cid
vhost_vsock_set_running vhost_set_iotlb_callback vhost_send_device_iotlb_msg vhost_get_config
vhost_set_config vhost_crypto_create_session vhost_crypto_close_session
""".split()


def _read(name: str):
    return nbformat.read(str(LABS / name), as_version=4)


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def _markdown(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "markdown"]


def test_the_series_is_complete():
    assert NOTEBOOKS == EXPECTED
    readme = (LABS / "README.md").read_text()
    for name in EXPECTED:                     # the lab table lists every notebook
        assert f"({name})" in readme, f"labs/README.md does not list {name}"


@pytest.mark.parametrize("name", EXPECTED)
def test_stored_without_outputs_or_execution_counts(name):
    nb = _read(name)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} was committed with outputs"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"


@pytest.mark.parametrize("name", EXPECTED)
def test_shape_objectives_first_summary_and_exercises_last(name):
    nb = _read(name)
    md = _markdown(nb)
    assert nb.cells[0].cell_type == "markdown"
    assert "By the end of this notebook you can" in nb.cells[0].source
    assert any("**Predict" in m for m in md), f"{name} has no predict-then-run prompt"
    assert any(m.startswith("## Checkpoint") for m in md), f"{name} has no checkpoint"
    assert "## Summary" in md[-1] and "## Exercises" in md[-1], \
        f"{name}: Summary and Exercises must come last"
    sections = [line for m in md for line in m.splitlines() if line.startswith("## ")]
    assert len(sections) >= 5
    for i, src in enumerate(_code(nb)):
        assert len(src.splitlines()) <= 20, f"{name} code cell {i} is {len(src.splitlines())} lines"
    # the lab is opened first and everything it started is checked gone at the end
    assert _code(nb)[0].startswith("from vhostlab import labkit")
    assert "lab.leftovers() == []" in _code(nb)[-1]


def test_reference_notebook_calls_or_explains_all_35_ops():
    nb = _read("08_vhostops_reference.ipynb")
    code = "\n".join(_code(nb))
    prose = "\n".join(_markdown(nb))
    for op in SEED_VHOST_OPS:
        assert f'ref.op("{op}")' in code, f"08 does not record a call of {op}"
        assert re.search(rf"\bops\.{op}\(", code), f"08 does not call {op}"
        assert f"`{op}`" in prose, f"08 does not explain {op} in its prose"
    # the notebook itself checks, when run, that the recorder saw all 35
    assert "ref.covered()" in code


def _execute(name: str, frontend: str, monkeypatch, backend: str = "vhostlab") -> float:
    monkeypatch.setenv("VHOSTLAB_FRONTEND", frontend)
    monkeypatch.setenv("VHOSTLAB_BACKEND", backend)
    nb = _read(name)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(LABS)}})
    start = time.monotonic()
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{name} with VHOSTLAB_FRONTEND={frontend} VHOSTLAB_BACKEND={backend}:"
                    f"\n{exc}", pytrace=False)
    elapsed = time.monotonic() - start
    print(f"\n{name} [{frontend}, {backend}] ran in {elapsed:.1f} s")
    first = next(c for c in nb.cells if c.cell_type == "code").outputs
    shown = "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in first)
    who = "a real QEMU" if frontend == "qemu" else "the built-in Python front-end"
    assert who in shown, f"{name}: the lab did not say it runs on {who}: {shown!r}"
    whose = "the back-end is DPDK's" if backend == "dpdk" else "the back-end is vhostlab's"
    assert whose in shown, f"{name}: the lab did not say {whose!r}: {shown!r}"
    return elapsed


@pytest.mark.parametrize("name", EXPECTED)
def test_runs_top_to_bottom_builtin(name, monkeypatch):
    _execute(name, "builtin", monkeypatch)


@pytest.mark.qemu
@pytest.mark.parametrize("name", EXPECTED)
def test_runs_top_to_bottom_qemu(name, requires_qemu, monkeypatch):
    monkeypatch.setenv("VHOSTLAB_QEMU", requires_qemu)
    _execute(name, "qemu", monkeypatch)


# The labs that run on DPDK's vhost back-end too (VHOSTLAB_BACKEND=dpdk): the
# VhostOps one at a time, the rings, the dirty log and the migration.
ON_DPDK = ["02_handshake.ipynb", "03_memory_table.ipynb", "04_virtqueues.ipynb",
           "06_dirty_logging.ipynb", "07_live_migration.ipynb"]


@pytest.mark.parametrize("name", ON_DPDK)
def test_runs_top_to_bottom_on_dpdk_builtin(name, requires_dpdk, monkeypatch):
    monkeypatch.setenv("VHOSTLAB_DPDK", requires_dpdk)
    _execute(name, "builtin", monkeypatch, backend="dpdk")


@pytest.mark.qemu
@pytest.mark.parametrize("name", ON_DPDK)
def test_runs_top_to_bottom_on_dpdk_qemu(name, requires_qemu, requires_dpdk, monkeypatch):
    monkeypatch.setenv("VHOSTLAB_QEMU", requires_qemu)
    monkeypatch.setenv("VHOSTLAB_DPDK", requires_dpdk)
    _execute(name, "qemu", monkeypatch, backend="dpdk")


# Labs whose predictions learners write down (issue 13).
PREDICTING = ["02_handshake.ipynb", "03_memory_table.ipynb", "04_virtqueues.ipynb",
              "05_numba_datapath.ipynb", "06_dirty_logging.ipynb", "07_live_migration.ipynb",
              "08_vhostops_reference.ipynb", "09_migration_sweep.ipynb"]
SELF_CHECKED = {"00_welcome.ipynb": "lab00", "01_two_backends.ipynb": "lab01",
                "02_handshake.ipynb": "lab02", "06_dirty_logging.ipynb": "lab06",
                "07_live_migration.ipynb": "lab07",
                "03_memory_table.ipynb": "lab03", "04_virtqueues.ipynb": "lab04",
                "05_numba_datapath.ipynb": "lab05", "08_vhostops_reference.ipynb": "lab08",
                "09_migration_sweep.ipynb": "lab09"}


@pytest.mark.parametrize("name", PREDICTING)
def test_predictions_are_written_then_compared(name):
    cells = _read(name).cells
    asked = [i for i, c in enumerate(cells) if "prediction" in c.metadata.get("tags", [])]
    assert len(asked) >= 2, f"{name}: fewer than two prediction cells"
    for n, i in enumerate(asked):
        assert cells[i].cell_type == "code" and "my_prediction = None" in cells[i].source
        until = asked[n + 1] if n + 1 < len(asked) else len(cells)
        answered = [c for c in cells[i + 1:until] if "compare_prediction(my_prediction" in c.source]
        assert answered, f"{name}: the prediction in cell {i} is never compared with the run"


@pytest.mark.parametrize("name", sorted(SELF_CHECKED))
def test_self_checked_exercises_end_the_lab(name):
    from vhostlab.exercises import load
    code = _code(_read(name))
    lab = SELF_CHECKED[name]
    binds = [i for i, src in enumerate(code) if f'bind("{lab}", globals())' in src]
    assert binds, f"{name} does not bind its self-check {lab}"
    checks = code[binds[0] + 1:-1]
    asked = {q.name for q in load(lab).questions}
    assert {f"ex.{q}.check()" for q in asked} <= {line for c in checks for line in c.splitlines()}
    for q in load(lab).questions:       # the answer is not in the cell that asks for it
        assert not any(q.solution in c for c in checks)
