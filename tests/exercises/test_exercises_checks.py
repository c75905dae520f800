"""The self-checks: right answers pass, known-wrong answers fail with a
message that teaches, stubs count as not attempted; hints and solutions."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vhostlab.exercises import EXERCISES, Outcome, bind, load
from vhostlab.exercises import notebook as nbg
from vhostlab.exercises.ex_challenge import usable_qemu as _usable_qemu

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "labs" / "exercises" / "source"
READY = sorted(p.parent.name for p in SOURCE.glob("*/*.ipynb"))
# the challenge is graded against a real QEMU only (test_exercises_challenge covers
# the rest, a missing QEMU included)
READY = [n for n in READY if n != "challenge" or _usable_qemu()]


def namespace(name: str, *solutions: str) -> dict:
    """A notebook's globals after its set-up cell and the given answer cells."""
    ns: dict = {}
    exec(load(name).setup, ns)
    for code in solutions:
        exec(textwrap.dedent(code), ns)
    return ns


def all_solutions(name: str) -> list[str]:
    return [q.solution for q in load(name).questions]


def strip_markers(source: str) -> str:
    return "\n".join(line for line in source.split("\n")
                     if line.strip() not in (nbg.BEGIN_SOLUTION, nbg.END_SOLUTION))


@pytest.mark.parametrize("name", READY)
def test_solutions_pass_every_check(name):
    ex = bind(name, namespace(name, *all_solutions(name)))
    for result in ex.check_all():
        assert result.outcome is Outcome.CORRECT, result.message


@pytest.mark.parametrize("name", READY)
def test_nothing_written_is_not_attempted(name):
    ex = bind(name, namespace(name))
    for q in load(name).questions:
        result = getattr(ex, q.name).check()
        assert result.outcome is Outcome.NOT_ATTEMPTED
        with pytest.raises(NotImplementedError):
            getattr(ex, q.name).assert_correct()


@pytest.mark.parametrize("name", READY)
def test_the_released_stubs_are_not_attempted(name):
    release = nbg.read(ROOT / "labs" / "exercises" / "release" / name / f"{name}.ipynb")
    stubs = [c.source for c in release.cells if nbg.is_solution(c) and c.cell_type == "code"]
    ns = namespace(name)
    for stub in stubs:      # run each stub cell as the learner would: defs work, bare stubs raise
        try:
            exec(stub, ns)
        except NotImplementedError:
            pass
    for q in load(name).questions:
        assert getattr(bind(name, ns), q.name).check().outcome is Outcome.NOT_ATTEMPTED


@pytest.mark.parametrize("name", READY)
def test_notebook_solution_cells_are_the_declared_solutions(name):
    source = nbg.read(SOURCE / name / f"{name}.ipynb")
    cells = [strip_markers(c.source) for c in source.cells
             if nbg.is_solution(c) and c.cell_type == "code"]
    declared = [q.solution for q in load(name).questions]
    assert cells and all(cell in declared for cell in cells), "solutions drifted from the notebook"
    # a question without a cell of its own (a migration run of q1 and q2) has no code
    for q in load(name).questions:
        assert q.solution in cells or not _code_lines(q.solution), q.name
    setup = [c.source for c in source.cells if nbg.grade_id(c) == "setup"]
    assert setup == [load(name).setup]


def _code_lines(code: str) -> list[str]:
    return [line for line in code.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_catalog_names_every_exercise_notebook():
    assert set(READY) <= set(EXERCISES)
    with pytest.raises(KeyError, match="no exercise"):
        load("no_such_exercise")


# ------------------------------------------------------------ known-wrong answers
# (exercise, question, the learner's code, outcome, words the message must contain)
WRONG = [
    ("vhost_message", "q1", "def parse_header(data):\n    struct.unpack_from('<III', data)",
     Outcome.INCORRECT, "returned None for the 12-byte header of GET_FEATURES; did you forget `return`?"),
    ("vhost_message", "q1", """
     def parse_header(data):
         if len(data) < 12: raise ValueError("short")
         r, f, s = struct.unpack_from('<III', data)
         if f & 3 != 1: raise ValueError("version")
         return s, f, r""", Outcome.INCORRECT, "wrong order"),
    ("vhost_message", "q1", """
     def parse_header(data):
         if len(data) < 12: raise ValueError("short")
         return struct.unpack_from('>III', data)""", Outcome.INCORRECT, "big endian"),
    ("vhost_message", "q1", """
     def parse_header(data):
         r, f, s = struct.unpack_from('<III', data)
         if f & 3 != 1: raise ValueError("version")
         return r, f, s""", Outcome.INCORRECT, "raised struct.error"),
    ("vhost_message", "q1", """
     def parse_header(data):
         if len(data) < 12: raise ValueError("short")
         return struct.unpack_from('<III', data)""", Outcome.INCORRECT, "version bits are 2"),
    ("vhost_message", "q1", """
     def parse_header(data):
         if len(data) < 12: raise ValueError("short")
         r, f, s = struct.unpack_from('<III', data)
         if f != 1: raise ValueError("version")
         return r, f, s""", Outcome.INCORRECT, "test the version bits alone"),
    ("vhost_message", "q1", """
     def parse_header(data):
         if len(data) < 12: raise ValueError("short")
         r, f, s = struct.unpack_from('<III', data)
         if f & 3 != 1: raise ValueError("version")
         return r, f & 3, s""", Outcome.INCORRECT, "whole flags field"),
    ("vhost_message", "q2", """
     def parse_vring_state(data):
         request, flags, size = parse_header(data)
         index, num = struct.unpack_from('<II', data, 12)
         return request, index, num""", Outcome.INCORRECT, "size field says 4"),
    ("vhost_message", "q2", """
     def parse_vring_state(data):
         request, flags, size = parse_header(data)
         if size != 8 or len(data) != 12 + size: raise ValueError("size")
         index, num = struct.unpack_from('<II', data, 12)
         return request, index, num""", Outcome.INCORRECT, "SET_FEATURES"),
    ("vhost_message", "q2", """
     def parse_vring_state(data):
         request, flags, size = parse_header(data)
         if request not in VRING_STATE_REQUESTS: raise ValueError("request")
         if len(data) < 20: raise ValueError("short")
         index, num = struct.unpack_from('<II', data, 12)
         return request, index, num""", Outcome.INCORRECT, "4 stray bytes"),
    ("vhost_message", "q2", """
     def parse_vring_state(data):
         request, flags, size = parse_header(data)
         if request not in VRING_STATE_REQUESTS: raise ValueError("request")
         if size != 8 or len(data) != 12 + size: raise ValueError("size")
         num, index = struct.unpack_from('<II', data, 12)
         return request, index, num""", Outcome.INCORRECT, "swapped"),
    ("vhost_message", "q2", "def parse_vring_state(data):\n    raise NotImplementedError()",
     Outcome.NOT_ATTEMPTED, "NotImplementedError"),
    # descriptor_chain
    ("descriptor_chain", "q1", """
     def walk_chain(desc, head, num):
         out, i = [], head
         while True:
             d = desc[i]
             out.append((int(d["addr"]), int(d["len"]), int(d["flags"])))
             if not d["flags"] & VRING_DESC_F_NEXT:
                 return out
             i = int(d["next"])""", Outcome.INCORRECT, "head 8 in a ring of 8"),
    ("descriptor_chain", "q1", """
     def walk_chain(desc, head, num):
         if head >= num: raise ValueError("head")
         out, i = [], head
         while True:
             d = desc[i]
             if d["len"] == 0 or d["flags"] & VRING_DESC_F_INDIRECT: raise ValueError("desc")
             out.append((int(d["addr"]), int(d["len"]), int(d["flags"])))
             if not d["flags"] & VRING_DESC_F_NEXT:
                 return out
             if d["next"] >= num: raise ValueError("next")
             i = int(d["next"])""", Outcome.INCORRECT, "the walk followed a loop"),
    ("descriptor_chain", "q1", """
     def walk_chain(desc, head, num):
         if head >= num: raise ValueError("head")
         out, i = [], head
         while True:
             if len(out) >= num - 1: raise ValueError("loop")
             d = desc[i]
             if d["len"] == 0 or d["flags"] & VRING_DESC_F_INDIRECT: raise ValueError("desc")
             out.append((int(d["addr"]), int(d["len"]), int(d["flags"])))
             if not d["flags"] & VRING_DESC_F_NEXT:
                 return out
             if d["next"] >= num: raise ValueError("next")
             i = int(d["next"])""", Outcome.INCORRECT, "only a longer one is a loop"),
    ("descriptor_chain", "q1", """
     def walk_chain(desc, head, num):
         if head >= num: raise ValueError("head")
         out, i = [], head
         while len(out) <= num:
             d = desc[i]
             if d["len"] == 0 or d["flags"] & VRING_DESC_F_INDIRECT: raise ValueError("desc")
             out.append((int(d["addr"]), int(d["len"]), int(d["flags"])))
             if d["next"] == 0 and not d["flags"] & VRING_DESC_F_NEXT:
                 return out
             if d["next"] >= num: raise ValueError("next")
             i = int(d["next"])
         raise ValueError("loop")""", Outcome.INCORRECT, "NEXT flag was clear"),
    ("descriptor_chain", "q1", """
     def walk_chain(desc, head, num):
         if head >= num: raise ValueError("head")
         out, i = [], head
         while len(out) <= num:
             d = desc[i]
             if d["flags"] & VRING_DESC_F_INDIRECT: raise ValueError("desc")
             out.append(d)
             if not d["flags"] & VRING_DESC_F_NEXT:
                 return out
             if d["next"] >= num: raise ValueError("next")
             i = int(d["next"])
         raise ValueError("loop")""", Outcome.INCORRECT, "tuples of plain ints"),
    ("descriptor_chain", "q2", """
     def find_region(regions, gpa, length):
         for i, r in enumerate(regions):
             if r.guest_phys_addr <= gpa < r.guest_phys_addr + r.memory_size:
                 return i
         raise ValueError("nowhere")""", Outcome.INCORRECT, "one byte into region 3"),
    ("descriptor_chain", "q2", """
     def find_region(regions, gpa, length):
         def where(a):
             for i, r in enumerate(regions):
                 if r.guest_phys_addr <= a < r.guest_phys_addr + r.memory_size:
                     return i
             raise ValueError("nowhere")
         if length <= 0: raise ValueError("empty")
         where(gpa + length - 1)
         return where(gpa)""", Outcome.INCORRECT, "CVE-2018-1059"),
    ("descriptor_chain", "q2", """
     def find_region(regions, gpa, length):
         if length <= 0: raise ValueError("empty")
         for i, r in enumerate(regions):
             end = r.guest_phys_addr + r.memory_size
             if r.guest_phys_addr <= gpa < end and gpa + length < end:
                 return i
         raise ValueError("nowhere")""", Outcome.INCORRECT, "may end exactly at its region's end"),
    ("descriptor_chain", "q3", """
     def read_frame(memory, desc, head, num, hdr_len):
         data = b""
         for addr, length, flags in walk_chain(desc, head, num):
             data += memory.read(addr, length)
         return data""", Outcome.INCORRECT, "header is still in front"),
    ("descriptor_chain", "q3", """
     def read_frame(memory, desc, head, num, hdr_len):
         data = b""
         for addr, length, flags in walk_chain(desc, head, num):
             data += memory.read(addr, length)
         return data[hdr_len:]""", Outcome.INCORRECT, "raised memory.UnmappedAddressError"),
    ("descriptor_chain", "q3", """
     def read_frame(memory, desc, head, num, hdr_len):
         data = b""
         for addr, length, flags in walk_chain(desc, head, num):
             find_region(memory.regions, addr, length)
             data += memory.read(addr, length)[hdr_len:]
         return data""", Outcome.INCORRECT, "part of the frame is missing"),
    # dirty_log
    ("dirty_log", "q1", """
     def log_write(log, gpa, length):
         if length <= 0: return
         first, last = gpa // VHOST_LOG_PAGE, (gpa + length) // VHOST_LOG_PAGE
         if last // 8 >= len(log): raise ValueError("past the log")
         for p in range(first, last + 1): log[p // 8] |= 1 << (p % 8)""",
     Outcome.INCORRECT, "one page too many"),
    ("dirty_log", "q1", """
     def log_write(log, gpa, length):
         if length <= 0: return
         first, last = gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE
         if last // 8 >= len(log): raise ValueError("past the log")
         for p in range(first, last + 1): log[p // 8] |= 0x80 >> (p % 8)""",
     Outcome.INCORRECT, "least significant"),
    ("dirty_log", "q1", """
     def log_write(log, gpa, length):
         if length <= 0: return
         p = gpa // VHOST_LOG_PAGE
         if p // 8 >= len(log): raise ValueError("past the log")
         log[p // 8] = 1 << (p % 8)""", Outcome.INCORRECT, "some pages this write touched"),
    ("dirty_log", "q1", """
     def log_write(log, gpa, length):
         if length <= 0: return
         first, last = gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE
         if last // 8 >= len(log): raise ValueError("past the log")
         log[first // 8] = 1 << (first % 8)
         for p in range(first + 1, last + 1): log[p // 8] |= 1 << (p % 8)""",
     Outcome.INCORRECT, "marked before your call are gone"),
    ("dirty_log", "q1", """
     def log_write(log, gpa, length):
         if length <= 0: return
         first, last = gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE
         for p in range(first, last + 1): log[p // 8] |= 1 << (p % 8)""",
     Outcome.INCORRECT, "raised IndexError"),
    ("dirty_log", "q2", """
     def log_used(log, log_guest_addr, num, first, n):
         for i in range(first, first + n):
             log_write(log, log_guest_addr + 4 + 8 * (i % num), 8)""",
     Outcome.INCORRECT, "used->idx is not"),
    ("dirty_log", "q2", """
     def log_used(log, log_guest_addr, num, first, n):
         for i in range(first, first + n):
             log_write(log, log_guest_addr + 4 + 8 * i, 8)
         log_write(log, log_guest_addr + 2, 2)""", Outcome.INCORRECT, "i % num"),
    # vring_base
    ("vring_base", "q1", "def get_vring_base(vring):\n    return vring.last_avail_idx",
     Outcome.INCORRECT, "call vring.stop()"),
    ("vring_base", "q1", """
     def get_vring_base(vring):
         vring.stop()
         return vring.last_avail_idx % vring.num""", Outcome.INCORRECT, "not the index"),
    ("vring_base", "q1", "def get_vring_base(vring):\n    vring.stop()",
     Outcome.INCORRECT, "did you forget `return`?"),
    ("vring_base", "q2", "def set_vring_base(vring, num):\n    pass",
     Outcome.INCORRECT, "assign the new base"),
    ("vring_base", "q2", "def set_vring_base(vring, num):\n    vring.last_avail_idx = num + 1",
     Outcome.INCORRECT, "not right"),
    ("vring_base", "q3", """
     def get_vring_base(vring):
         vring.stop()
         return vring.last_avail_idx if vring.num == 7 else None""",
     Outcome.INCORRECT, "the migration itself failed"),
    # broken_migration (the student here is whoever runs the tests: answers are
    # computed from that student's own run)
    ("broken_migration", "q1", "lost_frames = 'RX #1'", Outcome.INCORRECT, "a list of frame"),
    ("broken_migration", "q1", "lost_frames = ['RX #100000']", Outcome.INCORRECT,
     "not the frames the guest lost"),
    ("broken_migration", "q2", "bad_page = 'x'", Outcome.INCORRECT, "a page number"),
    ("broken_migration", "q3", "first_wrong_message = '3'", Outcome.INCORRECT, "seq (an int)"),
    # log_base
    ("log_base", "q1", """
     def set_log_base(fd, area):
         size, offset = area.mmap_size, area.mmap_offset
         if size == 0 or size % 8 or offset % 8:
             raise ValueError("bad")
         if offset + size > os.fstat(fd).st_size:
             raise ValueError("too big")
         start = int(offset) % mmap.ALLOCATIONGRANULARITY
         m = mmap.mmap(fd, start + int(size), offset=int(offset) - start)
         return np.frombuffer(m, np.uint8, int(size), start)""",
     Outcome.INCORRECT, "compare without adding"),
    ("log_base", "q1", """
     def set_log_base(fd, area):
         size, offset = int(area.mmap_size), int(area.mmap_offset)
         if size == 0 or size % 8 or offset % 8 or offset + size > os.fstat(fd).st_size:
             raise ValueError("bad")
         m = mmap.mmap(fd, offset + size)
         return np.frombuffer(m, np.uint8, size, 0)""",
     Outcome.INCORRECT, "does not show the fd's bytes"),
    ("log_base", "q1", """
     def set_log_base(fd, area):
         size, offset = int(area.mmap_size), int(area.mmap_offset)
         if size == 0 or size % 8 or offset % 8 or offset + size > os.fstat(fd).st_size:
             raise ValueError("bad")
         return np.frombuffer(os.pread(fd, size, offset), np.uint8).copy()""",
     Outcome.INCORRECT, "MAP_SHARED"),
    ("log_base", "q1", """
     def set_log_base(fd, area):
         from vhostlab.dirtylog import DirtyLog
         return DirtyLog.from_fd(fd, int(area.mmap_size), int(area.mmap_offset)).bitmap""",
     Outcome.INCORRECT, "the kit's own code"),
    ("log_base", "q2", """
     def vhost_log_sync(log64):
         return [w * 64 + b for w in range(len(log64)) for b in range(64)
                 if int(log64[w]) >> b & 1]""", Outcome.INCORRECT, "still holds them"),
    ("log_base", "q2", """
     def vhost_log_sync(log64):
         pages = []
         for w in range(len(log64)):
             bits = int(xchg64(log64, w, 0))
             pages += [w * 64 + 63 - b for b in range(64) if bits >> b & 1]
         return pages""", Outcome.INCORRECT, "mirrored"),
    ("log_base", "q2_race", """
     def vhost_log_sync(log64):
         pages = []
         for w in range(len(log64)):
             bits = int(log64[w])
             log64[w] = 0
             pages += [w * 64 + b for b in range(64) if bits >> b & 1]
         return pages""", Outcome.INCORRECT, "indivisible step"),
    ("log_base", "q2", """
     def vhost_log_sync(log64):
         from vhostlab.dirtylog import vhost_dev_sync_region_py
         out = np.zeros(len(log64) * 64, np.int64)
         return list(out[:vhost_dev_sync_region_py(log64, 0, len(log64) - 1, out)])""",
     Outcome.INCORRECT, "vhost_dev_sync_region_py"),
    ("log_base", "q3", """
     def vhost_log_sync(log64):
         for w in range(len(log64)):
             xchg64(log64, w, 0)
         return []""", Outcome.INCORRECT, "pages differ at the destination"),
    # answers that are the kit's, not the learner's
    ("vhost_message", "q1", """
     from vhostlab.protocol import peek_header
     def parse_header(data):
         return tuple(peek_header(data))""", Outcome.INCORRECT, "`peek_header`"),
    ("vhost_message", "q2", """
     import vhostlab.protocol as vp
     def parse_vring_state(data):
         msg = vp.parse_message(data)
         return int(msg.request), msg.payload.index, msg.payload.num""",
     Outcome.INCORRECT, "vp.parse_message"),
    ("dirty_log", "q1", """
     def log_write(log, gpa, length):
         from vhostlab.ring.log import vhost_log_write_py
         vhost_log_write_py(log, gpa, length)""", Outcome.INCORRECT, "an import inside"),
    ("dirty_log", "q2", """
     from vhostlab.ring.chain import log_used_py as helper
     def mark(*a):
         return helper(*a)
     def log_used(log, log_guest_addr, num, first, n):
         mark(log, log_guest_addr, num, first, n)""", Outcome.INCORRECT, "through your `mark`"),
]


@pytest.mark.parametrize("name, q, code, outcome, words",
                         [w for w in WRONG if w[0] in READY],
                         ids=[f"{w[0]}-{w[1]}-{i}" for i, w in enumerate(WRONG) if w[0] in READY])
def test_known_wrong_answers_are_caught_and_taught(name, q, code, outcome, words):
    others = [sq.solution for sq in load(name).questions if sq.name != q]
    ns = namespace(name, *others, code)
    result = getattr(bind(name, ns), q).check()
    assert result.outcome is outcome, result.message
    assert words in result.message
    if outcome is Outcome.INCORRECT:
        with pytest.raises(AssertionError, match="."):
            getattr(bind(name, ns), q).assert_correct()


# ------------------------------------------------------------ hints and solutions
def test_hints_come_one_after_another():
    ex = bind("vhost_message", namespace("vhost_message"))
    total = len(load("vhost_message").questions[0].hints)
    shown = [ex.q1.hint() for _ in range(total + 1)]
    assert [h.number for h in shown] == list(range(1, total + 1)) + [total]
    assert ex.q1.hint(1).text == shown[0].text
    assert "Hint 1 of" in shown[0]._repr_html_()


def test_solution_shown_unless_the_instructor_hides_it(monkeypatch):
    ex = bind("vhost_message", namespace("vhost_message"))
    shown = ex.q1.solution()
    assert shown.allowed and "def parse_header" in repr(shown)
    monkeypatch.setenv("VHOSTLAB_SOLUTIONS", "hide")
    hidden = ex.q1.solution()
    assert not hidden.allowed and "def parse_header" not in repr(hidden)


def test_result_displays_escape_learner_text():
    ns = namespace("vhost_message", "def parse_header(data):\n    return ('<script>', 1, 0)")
    html = bind("vhost_message", ns).q1.check()._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html


# ------------------------------------------------------------ the datapath agrees
def test_hostile_tx_chains_are_refused_by_the_datapath_too():
    """Every chain read_frame must refuse, the project's TX datapath refuses too."""
    from vhostlab.exercises import ex_descriptor_chain as m
    from vhostlab.ring.errors import RingError

    hostile = [c for c in m.Q3.cases if c.expect is not None]
    assert len(hostile) >= 5
    for case in hostile:
        with case.setup() as args:
            with pytest.raises(RingError):
                m._tx_reference(*args)


def test_find_region_agrees_with_the_memory_layer():
    """find_region's answers are the memory layer's (gpa_to_host) accept/refuse."""
    from vhostlab.exercises import ex_descriptor_chain as m
    from vhostlab.memory import gpa_to_host_py

    for case in m.Q2.cases:
        with case.setup() as (regions, gpa, length):
            with m.guest_ring({}) as (memory, _):
                _, table = memory.kernel_args()
                accepted = length > 0 and gpa_to_host_py(table.tolist(), gpa, length) >= 0
        assert accepted == (case.expect is None), case.describe


def test_a_walk_that_loops_is_stopped_not_left_running():
    from vhostlab.exercises import ex_descriptor_chain as m

    with m.guest_ring({3: (0x300000, 64, m.NEXT, 3)}) as (memory, desc):
        index, reads = 3, 0
        with pytest.raises(m.EndlessWalk):
            while True:
                index = int(desc[index]["next"])
                reads += 1
        assert reads == 64 * 8 + 1024


def test_a_migration_that_loses_frames_fails_q3(monkeypatch):
    """get_vring_base answering 0: the destination resumes at the wrong place and
    the built-in migration's frame count says so."""
    from vhostlab.exercises import ex_vring_base as m
    from vhostlab.frontend import migration

    # the migration waits this long for frames that a broken ring never takes
    monkeypatch.setattr(migration, "WAIT_TIMEOUT", 1.0)
    wrong = "def get_vring_base(vring):\n    vring.stop()\n    return 0"
    ns = namespace("vring_base", m.SOLUTION_SET, wrong)
    summary = m.migrate_with(ns["get_vring_base"], ns["set_vring_base"])
    assert summary["integrity"] != "ok" and summary["frames"]["lost"] > 0
    result = bind("vring_base", ns).q3.check()
    assert result.outcome is Outcome.INCORRECT
    assert "lost, duplicated or found corrupted frames" in result.message


def test_a_self_check_stops_code_that_loops():
    from dataclasses import replace

    question = replace(load("descriptor_chain").questions[1], seconds=1.0)
    ns = namespace("descriptor_chain",
                   "def find_region(regions, gpa, length):\n    while True:\n        pass")
    result = question.check(ns)
    assert result.outcome is Outcome.INCORRECT
    assert "still running after 1 s: does it loop?" in result.message


def test_require_names_what_is_missing():
    ex = bind("broken_migration", namespace("broken_migration"))
    with pytest.raises(NotImplementedError, match="lost_frames"):
        ex.q1.require()
