"""`vhostlab grade` on a real class: instructor solutions get full marks, the
released notebooks 0, deliberately broken submissions exactly the partial
marks they earned; loops, crashes and deleted cells cost only what they broke.

Every notebook runs in a real kernel, so this module costs about a minute.
"""
from __future__ import annotations

import copy
import csv
import os
import time
import uuid
from pathlib import Path

import psutil
import pytest

from vhostlab.exercises import grade as grade_mod
from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.ex_challenge import usable_qemu as _usable_qemu
from vhostlab.exercises.grade import Limits, find_submissions, grade_class, merge

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "labs" / "exercises" / "source"
RELEASE = ROOT / "labs" / "exercises" / "release"
READY = sorted(p.parent.name for p in SOURCE.glob("*/*.ipynb"))
# the challenge is graded against a real QEMU only (test_exercises_challenge covers
# the rest, a missing QEMU included)
READY = [n for n in READY if n != "challenge" or _usable_qemu()]


def source_nb(name: str):
    return nbg.read(SOURCE / name / f"{name}.ipynb")


def replaced(name: str, **cells: str):
    """The instructor's notebook with some solution cells rewritten."""
    nb = source_nb(name)
    for cell in nb.cells:
        if nbg.grade_id(cell) in cells:
            cell.source = cells.pop(nbg.grade_id(cell))
    assert not cells, f"no such cells: {cells}"
    return nb


def renamed(name: str, grade_id: str, new_id: str):
    nb = source_nb(name)
    for cell in nb.cells:
        if nbg.grade_id(cell) == grade_id:
            cell.metadata["nbgrader"]["grade_id"] = new_id
    return nb


def without(name: str, *grade_ids: str):
    nb = source_nb(name)
    nb.cells = [c for c in nb.cells if nbg.grade_id(c) not in grade_ids]
    return nb


VRING_STATE_NO_TRAILING_CHECK = '''\
def parse_vring_state(data):
    request, flags, size = parse_header(data)
    if request not in VRING_STATE_REQUESTS or size != 8 or len(data) < HEADER_SIZE + 8:
        raise ValueError("bad vring state")
    index, num = struct.unpack_from("<II", data, HEADER_SIZE)
    return request, index, num'''

WALK_WITHOUT_LOOP_CHECK = '''\
def walk_chain(desc, head, num):
    if not 0 <= head < num:
        raise ValueError("head")
    chain, index = [], head
    while True:
        d = desc[index]
        addr, length, flags, nxt = int(d["addr"]), int(d["len"]), int(d["flags"]), int(d["next"])
        if length == 0 or flags & VRING_DESC_F_INDIRECT:
            raise ValueError("descriptor")
        chain.append((addr, length, flags))
        if not flags & VRING_DESC_F_NEXT:
            return chain
        if nxt >= num:
            raise ValueError("next")
        index = nxt'''

REGION_WITHOUT_END_CHECK = '''\
def find_region(regions, gpa, length):
    if length <= 0:
        raise ValueError("length")
    for i, r in enumerate(regions):
        if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
            return i
    raise ValueError("nowhere")'''

USED_WITHOUT_IDX = '''\
def log_used(log, log_guest_addr, num, first, n):
    for i in range(first, first + n):
        log_write(log, log_guest_addr + 4 + 8 * (i % num), 8)'''

READ_THEN_CLEAR = '''\
def vhost_log_sync(log64):
    pages = []
    for w in range(len(log64)):
        bits = int(log64[w])
        log64[w] = 0
        pages += [w * 64 + b for b in range(64) if bits >> b & 1]
    return pages'''

NEED_EVENT = """\
def vring_need_event(event_idx, new_idx, old_idx):
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


"""
ONE_BUFFER_COUNT = """\
def place_frame(frame_len, hdr_len, buffer_sizes):
    left, lengths = hdr_len + frame_len, []
    for size in buffer_sizes:
        if left == 0:
            break
        lengths.append(min(size, left))
        left -= lengths[-1]
    return None if left else (1, lengths)"""

# student -> (exercise, notebook factory, {grade_id: expected status})
BROKEN = {
    "never_signals": ("challenge", lambda: replaced(
        "challenge", should_signal=NEED_EVENT + "def should_signal(ring):\n    return False"),
        {"test_event_idx": "failed", "test_mrg_rxbuf": "passed"}),
    "always_signals": ("challenge", lambda: replaced(
        "challenge", should_signal=NEED_EVENT + "def should_signal(ring):\n    return True"),
        {"test_event_idx": "failed", "test_mrg_rxbuf": "passed"}),
    "one_buffer": ("challenge", lambda: replaced("challenge", place_frame=ONE_BUFFER_COUNT),
                   {"test_event_idx": "passed", "test_mrg_rxbuf": "failed"}),
    "loops_forever": ("descriptor_chain", lambda: replaced(
        "descriptor_chain", walk_chain=WALK_WITHOUT_LOOP_CHECK),
        {"test_walk_chain": "failed", "test_find_region": "passed",
         "test_read_frame": "failed"}),
    "straddles": ("descriptor_chain", lambda: replaced(
        "descriptor_chain", find_region=REGION_WITHOUT_END_CHECK),
        {"test_walk_chain": "passed", "test_find_region": "failed",
         "test_read_frame": "failed"}),
    "forgets_idx": ("dirty_log", lambda: replaced("dirty_log", log_used=USED_WITHOUT_IDX),
                    {"test_log_write": "passed", "test_log_used": "failed"}),
    "returns_slot": ("vring_base", lambda: replaced(
        "vring_base", get_vring_base="def get_vring_base(vring):\n    vring.stop()\n"
                                     "    return vring.last_avail_idx % vring.num"),
        # the slot equals the index until the ring wraps: the migration (under 256
        # frames a ring) passes, the unit test at index 300 does not
        {"test_get_vring_base": "failed", "test_set_vring_base": "passed",
         "test_migration": "passed"}),
    "wrong_frames": ("broken_migration", lambda: replaced(
        "broken_migration", lost_frames='lost_frames = ["RX #100000"]'),
        {"test_lost_frames": "failed", "test_bad_page": "passed",
         "test_first_wrong_message": "passed", "which_step_failed": "manual"}),
    "delegates": ("vhost_message", lambda: replaced(
        "vhost_message", parse_header="from vhostlab.protocol import peek_header\n"
                                      "def parse_header(data):\n"
                                      "    return tuple(peek_header(data))"),
        {"test_parse_header": "failed", "test_parse_vring_state": "passed"}),
    "clears_by_hand": ("log_base", lambda: replaced(
        "log_base", vhost_log_sync=READ_THEN_CLEAR),
        {"test_set_log_base": "passed", "test_vhost_log_sync": "passed",
         "test_log_sync_race": "failed", "test_migration": "passed"}),
    "trailing_bytes": ("vhost_message", lambda: replaced(
        "vhost_message", parse_vring_state=VRING_STATE_NO_TRAILING_CHECK),
        {"test_parse_header": "passed", "test_parse_vring_state": "failed"}),
    "exits": ("vhost_message", lambda: replaced(
        "vhost_message", parse_vring_state="import os\ndef parse_vring_state(data):\n"
                                           "    os._exit(3)"),
        {"test_parse_header": "passed", "test_parse_vring_state": "kernel_died"}),
    "segfaults": ("vhost_message", lambda: replaced(
        "vhost_message", parse_header="import ctypes\ndef parse_header(data):\n"
                                      "    return ctypes.string_at(0)"),
        {"test_parse_header": "kernel_died", "test_parse_vring_state": "kernel_died"}),
    "hogs_memory": ("vhost_message", lambda: replaced(
        "vhost_message", parse_vring_state="def parse_vring_state(data):\n"
                                           "    return bytearray(64 * 2**30)"),
        {"test_parse_header": "passed", "test_parse_vring_state": "failed"}),
    "deleted_a_test": ("vhost_message", lambda: without("vhost_message", "test_parse_header"),
                       {"test_parse_header": "missing", "test_parse_vring_state": "passed"}),
    "renamed_a_test": ("descriptor_chain", lambda: renamed(
        "descriptor_chain", "test_find_region", "my_test"),
        {"test_walk_chain": "passed", "test_find_region": "missing", "test_read_frame": "passed"}),
    "raises": ("vhost_message", lambda: replaced(
        "vhost_message", parse_header="def parse_header(data):\n    return {}['x']"),
        {"test_parse_header": "failed", "test_parse_vring_state": "failed"}),
}


def _write_class(root: Path) -> None:
    for name in READY:
        nbg.write(source_nb(name), root / "instructor" / f"{name}.ipynb")
        nbg.write(nbg.read(RELEASE / name / f"{name}.ipynb"), root / "fresh" / f"{name}.ipynb")
    for student, (name, make, _) in BROKEN.items():
        if name in READY:
            nbg.write(make(), root / student / f"{name}.ipynb")
    # nbgrader's layout: submitted/<student>/<assignment>/<notebook>.ipynb
    nbg.write(source_nb("vhost_message"), root / "nested" / "vhost_message" / "vhost_message.ipynb")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("class")
    _write_class(root / "submitted")
    out = root / "out" / "grades.csv"
    rows = grade_class(root / "submitted", SOURCE, out,
                       Limits(cell_timeout=120, notebook_timeout=300), jobs=2)
    return rows, out


def _by(rows, student, exercise=None):
    return {r.grade_id: r for r in rows
            if r.student == student and (exercise is None or r.exercise == exercise)}


def test_instructor_solutions_get_full_marks(graded):
    rows, _ = graded
    mine = [r for r in rows if r.student == "instructor"]
    assert {r.exercise for r in mine} == set(READY)
    bad = [(r.exercise, r.grade_id, r.status, r.message) for r in mine
           if r.status not in ("passed", "manual")]
    assert not bad
    auto = [r for r in mine if r.status != "manual"]
    assert sum(r.points for r in auto) == sum(r.max_points for r in auto) > 0
    # written answers wait for the instructor: worth points, scored by hand
    assert sum(r.max_points for r in mine if r.status == "manual") > 0


def test_released_notebooks_get_zero(graded):
    rows, _ = graded
    mine = [r for r in rows if r.student == "fresh"]
    assert mine and sum(r.points for r in mine) == 0
    assert {r.status for r in mine} <= {"not_attempted", "manual"}


@pytest.mark.parametrize("student", sorted(BROKEN))
def test_broken_submissions_get_the_marks_they_earned(graded, student):
    name, _, want = BROKEN[student]
    if name not in READY:
        pytest.skip(f"{name} is not written yet")
    rows = _by(graded[0], student, name)
    got = {gid: r.status for gid, r in rows.items() if gid in want}
    assert got == want, {gid: rows[gid].message for gid in rows}
    for r in rows.values():
        assert r.points == (r.max_points if r.status == "passed" else 0)


def test_nbgrader_layout_and_missing_exercises(graded):
    rows, _ = graded
    nested = [r for r in rows if r.student == "nested"]
    assert {r.status for r in nested if r.exercise == "vhost_message"} == {"passed"}
    assert {r.status for r in nested if r.exercise != "vhost_message"} <= {"not_submitted"}


def test_csv_and_feedback(graded):
    rows, out = graded
    with open(out, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["student", "exercise", "grade_id", "points", "max_points", "status",
                              "seconds", "peak_mib"]
    assert len(table) == len(rows)
    first = table[0]
    assert first["student"] == rows[0].student and float(first["max_points"]) == rows[0].max_points
    feedback = out.parent / "feedback"
    students = {r.student for r in rows}
    assert {p.stem for p in feedback.glob("*.md")} == students
    text = (feedback / "trailing_bytes.md").read_text()
    assert "test_parse_vring_state" in text and "followed by 4 stray bytes" in text
    assert "assert_correct" not in text, "feedback must not show the hidden tests' source"


# ------------------------------------------------------------ time limits
LOOPS = "def parse_vring_state(data):\n    while True:\n        pass"


@pytest.fixture
def tagged(monkeypatch):
    """A tag in the environment that every runner and kernel this test starts inherits."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv("VHOSTLAB_TEST_TAG", tag)
    return tag


def _left_over(tag: str) -> list[psutil.Process]:
    """Live processes (not this one) carrying `tag`: runners or kernels that survived."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("VHOSTLAB_TEST_TAG") == tag \
                    and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def test_a_loop_is_cut_off_by_the_cell_time_limit(tmp_path, tagged):
    nbg.write(replaced("vhost_message", parse_vring_state=LOOPS),
              tmp_path / "subs" / "looper" / "vhost_message.ipynb")
    rows = grade_class(tmp_path / "subs", SOURCE, tmp_path / "grades.csv",
                       Limits(cell_timeout=5, notebook_timeout=120), only={"vhost_message"})
    assert {r.grade_id: r.status for r in rows} == {
        "test_parse_header": "passed", "test_parse_vring_state": "timeout"}
    assert not _left_over(tagged)


# A loop that swallows every exception, the self-check's own time limit included:
# only the notebook time limit stops it.
LOOPS_STUBBORNLY = """\
import time
def parse_vring_state(data):
    while True:
        try:
            time.sleep(0.2)
        except Exception:
            pass"""


def test_the_notebook_time_limit_stops_everything(tmp_path, tagged):
    nbg.write(replaced("vhost_message", parse_vring_state=LOOPS_STUBBORNLY),
              tmp_path / "subs" / "looper" / "vhost_message.ipynb")
    rows = grade_class(tmp_path / "subs", SOURCE, tmp_path / "grades.csv",
                       Limits(cell_timeout=600, notebook_timeout=15), only={"vhost_message"})
    status = {r.grade_id: r.status for r in rows}
    assert status == {"test_parse_header": "passed", "test_parse_vring_state": "timeout"}
    assert "notebook time limit (15 s)" in rows[1].message
    time.sleep(0.5)
    assert not _left_over(tagged)


# ------------------------------------------------------------ matching and merging
def test_merge_takes_tests_from_the_source_and_answers_from_the_learner():
    source = source_nb("vhost_message")
    student = nbg.read(RELEASE / "vhost_message" / "vhost_message.ipynb")
    tampered = copy.deepcopy(student)
    for cell in tampered.cells:
        if nbg.grade_id(cell) == "test_parse_header":
            cell.source = "pass  # the learner emptied the test"
        if nbg.grade_id(cell) == "parse_header":
            cell.source = "def parse_header(data):\n    return 'mine'"
    extra = copy.deepcopy(tampered.cells[1])
    extra.source, extra["id"] = "helper = 1", "learner-added"
    extra.metadata["nbgrader"] = {"grade": True, "grade_id": "fake", "points": 99}
    tampered.cells.insert(3, extra)
    merged, missing = merge(source, tampered)
    by_id = {nbg.grade_id(c): c for c in merged.cells if nbg.grade_id(c)}
    assert by_id["test_parse_header"].source == next(
        c.source for c in source.cells if nbg.grade_id(c) == "test_parse_header")
    assert nbg.BEGIN_HIDDEN_TESTS in by_id["test_parse_header"].source
    assert by_id["parse_header"].source.endswith("return 'mine'")
    added = [c for c in merged.cells if c.source == "helper = 1"]
    assert len(added) == 1 and "nbgrader" not in added[0].metadata, "added cells earn nothing"
    order = [c.get("id") for c in merged.cells]
    assert order.index("learner-added") == order.index(tampered.cells[2]["id"]) + 1
    assert missing == set()


def test_find_submissions_flat_nested_and_not_submitted(tmp_path):
    nbg.write(source_nb("vhost_message"), tmp_path / "ann" / "vhost_message.ipynb")
    nbg.write(source_nb("vhost_message"), tmp_path / "bob" / "vhost_message" / "vhost_message.ipynb")
    nbg.write(source_nb("vhost_message"), tmp_path / "bob" / "unknown.ipynb")
    (tmp_path / "cyd").mkdir()
    subs, warnings = find_submissions(tmp_path, SOURCE)
    got = {(s.student, s.exercise): s.path is not None for s in subs}
    assert got[("ann", "vhost_message")] and got[("bob", "vhost_message")]
    assert got[("cyd", "vhost_message")] is False
    assert len(warnings) == 1 and "unknown.ipynb" in warnings[0]


def test_command_line(tmp_path, capsys):
    nbg.write(nbg.read(RELEASE / "vhost_message" / "vhost_message.ipynb"),
              tmp_path / "subs" / "ann" / "vhost_message.ipynb")
    out = tmp_path / "grades.csv"
    code = grade_mod.main([str(tmp_path / "subs"), "--source", str(SOURCE), "--out", str(out),
                           "--exercise", "vhost_message", "--cell-timeout", "60"])
    assert code == 0 and out.exists() and (tmp_path / "feedback" / "ann.md").exists()
    assert grade_mod.main([str(tmp_path / "nope"), "--source", str(SOURCE)]) == 2
