"""What the exercises graded by a live migration share.

A learner's bug may stall or break the migration the grader runs: that must
come back as a failed summary the question explains, not as an exception out
of a back-end thread. A migration that fails with the reference answers is
the environment's fault, and says so instead of blaming the learner.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["MIGRATION_WAIT_S", "usable_qemu", "summary_of", "frames_outcome",
           "reference_must_migrate"]

# How long the built-in migration waits for frames a wrong answer lost
# (the default is 10 s; a check that fails should fail quickly).
MIGRATION_WAIT_S = 3.0


def usable_qemu() -> str | None:
    """The QEMU an exercise migrates with or serves, or None (none usable here)."""
    from vhostlab.qemu.launcher import find_qemu
    info = find_qemu()
    return info.path if info is not None and info.usable else None


def summary_of(run: Callable[[], dict]) -> dict:
    """``run()``'s migration summary, or a failed summary naming what it raised."""
    try:
        return run()
    except Exception as exc:  # a learner bug can stall or break the migration
        return {"integrity": "failed", "error": f"{type(exc).__name__}: {exc}",
                "frames": {"lost": None, "duplicated": None, "corrupted": None}}


def frames_outcome(summary: dict) -> dict:
    """What a question reads of a summary: integrity, the error, and the frames
    lost, duplicated and corrupted."""
    frames = summary.get("frames", {})
    return {"integrity": summary.get("integrity"), "lost": frames.get("lost"),
            "duplicated": frames.get("duplicated"), "corrupted": frames.get("corrupted"),
            "error": summary.get("error")}


def reference_must_migrate(summary: dict, frontend: str = "built-in") -> None:
    """RuntimeError when the reference answers' migration did not come out intact."""
    if summary.get("integrity") != "ok":
        raise RuntimeError(f"the {frontend} migration fails even with the reference answers: "
                           f"{summary.get('error') or summary.get('frames')}")
