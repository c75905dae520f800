"""The QEMU demo's narration: every seed step shows the messages QEMU sent, and
a message the story expects but never saw is said out loud, not dropped."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from vhostlab.backend.trace import MessageTrace
from vhostlab.qemu.demo import _QemuNarrator
from vhostlab.qemu.migration import MigrationConfig, ProgressEvent
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND


def _records(*items):
    """TraceRecords as a back-end would make them: (direction, request, payload)."""
    trace = MessageTrace()
    for direction, request, payload in items:
        trace.record(direction, request, {"payload": payload, "flags": 1}, b"")
    return trace.records()


SOURCE_START = [(TO_BACKEND, "SET_VRING_NUM", {"index": 0, "num": 256}),
                (TO_BACKEND, "SET_VRING_NUM", {"index": 1, "num": 256})]
LOGGING = [(TO_BACKEND, "SET_LOG_BASE", {"mmap_size": 4096, "mmap_offset": 0}),
           (TO_FRONTEND, "SET_LOG_BASE", {"value": 0}),
           (TO_BACKEND, "SET_FEATURES", {"value": 1 << 26 | 1 << 30}),
           (TO_BACKEND, "SET_VRING_ADDR", {"index": 0, "flags": 1, "log": True}),
           (TO_BACKEND, "SET_VRING_ADDR", {"index": 1, "flags": 1, "log": True})]
STOP = [(TO_BACKEND, "GET_VRING_BASE", {"index": 0, "num": 0}),
        (TO_FRONTEND, "GET_VRING_BASE", {"index": 0, "num": 7}),
        (TO_BACKEND, "GET_VRING_BASE", {"index": 1, "num": 0}),
        (TO_FRONTEND, "GET_VRING_BASE", {"index": 1, "num": 3}),
        (TO_BACKEND, "SET_STATUS", {"value": 0})]
DEST = [(TO_BACKEND, "SET_VRING_BASE", {"index": 0, "num": 7}),
        (TO_BACKEND, "SET_VRING_BASE", {"index": 1, "num": 3})]


def _narrate(source, destination, version=(10, 0, 13)):
    lines: list[str] = []
    n = _QemuNarrator(lines.append, MigrationConfig(), version)
    n(ProgressEvent("messages", "source", _records(*source)))
    n(ProgressEvent("messages", "destination", _records(*destination)))
    return n, lines


def test_a_complete_story_reports_nothing_missing_and_names_the_stop():
    n, lines = _narrate(SOURCE_START + LOGGING + STOP, DEST)
    missing = n.finish(completed=False)
    assert missing == [] and not [l for l in lines if "not seen" in l or "not narrated" in l]
    text = "\n".join(lines)
    assert "The stop as QEMU sent it: GET_VRING_BASE, GET_VRING_BASE, SET_STATUS 0" in text
    assert "QEMU 8.1" in text and "vhost_reset_status" in text


def test_a_step_qemu_never_sent_is_said_out_loud():
    no_log_base = [r for r in LOGGING if r[1] != "SET_LOG_BASE"]
    n, lines = _narrate(SOURCE_START + no_log_base + STOP, DEST[:1])
    missing = n.finish(completed=True)
    assert missing == ["SET_LOG_BASE", "SET_VRING_BASE 1", "dirty sync"]
    text = "\n".join(lines)
    assert "not seen: seed step 1 expects SET_LOG_BASE, but back-end A (source)" in text
    assert "not seen: seed step 3 expects SET_VRING_BASE 1, but back-end B" in text
    assert "no dirty-bitmap sync" in text


def test_a_set_features_the_relay_rewrote_is_narrated_in_step_2_with_what_changed():
    """The DPDK negative control: QEMU sent LOG_ALL, the relay took it out. The
    step is QEMU's, so it is narrated where the seed puts it, with the change."""
    sent = {"value": 1 << 26 | 1 << 30, "names": ["VHOST_F_LOG_ALL", "PROTOCOL_FEATURES"]}
    passed = {"value": 1 << 30, "names": ["PROTOCOL_FEATURES"]}
    trace = MessageTrace()
    for direction, request, payload in SOURCE_START + LOGGING + STOP:
        fields = {"payload": payload, "flags": 1}
        if request == "SET_FEATURES":
            fields = {"payload": passed, "flags": 1, "rewritten_from": sent}
        trace.record(direction, request, fields, b"")
    lines: list[str] = []
    n = _QemuNarrator(lines.append, MigrationConfig(), (10, 0, 13))
    n(ProgressEvent("messages", "source", trace.records()))
    n(ProgressEvent("messages", "destination", _records(*DEST)))
    assert n.finish(completed=False) == []
    text = "\n".join(lines)
    step2 = text[text.index("Seed step 2"):text.index("Seed step 3")]
    assert ("-> SET_FEATURES {names=[PROTOCOL_FEATURES]} "
            "[the relay took VHOST_F_LOG_ALL out on the way]") in step2
    assert "not seen" not in text


def test_a_record_that_reached_the_narrator_but_was_not_narrated_is_shown_late():
    # SET_VRING_BASE arriving before the source stopped is not narrated in place.
    n, lines = _narrate(SOURCE_START + LOGGING, DEST)
    n(ProgressEvent("messages", "source", _records(*STOP)))
    n.finish(completed=False)
    late = [l for l in lines if "not narrated above" in l]
    assert len(late) == 2 and all("SET_VRING_BASE" in l for l in late)


def _sections(text: str) -> dict[int, str]:
    parts = re.split(r"\nSeed step (\d):", text)
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_demo_prints_under_each_seed_step_the_messages_qemu_sent(requires_qemu):
    env = dict(os.environ, VHOSTLAB_QEMU=requires_qemu)
    out = subprocess.run([sys.executable, "-m", "vhostlab", "demo", "--frontend", "qemu"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    steps = _sections(out.stdout)
    assert sorted(steps) == [1, 2, 3], out.stdout
    assert "-> SET_LOG_BASE {mmap_size=" in steps[1]
    assert re.search(r"-> SET_FEATURES \{names=\[[^]]*VHOST_F_LOG_ALL", steps[2])
    assert len(re.findall(r"-> SET_VRING_ADDR \{index=\d, flags=1,.*log=true", steps[2])) == 2
    assert "dirty sync" in steps[2]
    assert len(re.findall(r"<- GET_VRING_BASE \{index=\d, num=\d+\}", steps[3])) == 2
    assert len(re.findall(r"\[back-end B\] -> SET_VRING_BASE", steps[3])) == 2
    assert "The stop as QEMU sent it:" in steps[3] and "The seed's vhost_dev_stop:" in steps[3]
    assert "not seen" not in out.stdout and "not narrated" not in out.stdout
