"""Pages of guest RAM between two memories: what QEMU's RAM migration does, in miniature.

The built-in migration copies the pages its dirty bitmap names from the
source's memfd RAM to the destination's, and at switch-over compares the two
page for page (the kit's integrity check). Only pages inside a RAM region
count: the gaps of the pc layout are not RAM.
"""
from __future__ import annotations

import numpy as np

from vhostlab.memory import TARGET_PAGE_SIZE, GuestMemory

__all__ = ["ram_pages", "copy_pages", "compare_pages"]


def ram_pages(memory: GuestMemory) -> np.ndarray:
    """Every page number inside a RAM region (the gaps of the pc layout are not RAM)."""
    parts = [np.arange(r.guest_phys_addr // TARGET_PAGE_SIZE,
                       (r.guest_phys_addr + r.memory_size) // TARGET_PAGE_SIZE,
                       dtype=np.int64) for r in memory.regions]
    return np.unique(np.concatenate(parts))


def _runs(memory: GuestMemory, pages: np.ndarray):
    """(gpa, length) of maximal runs of ``pages`` that stay inside one region."""
    pages = np.unique(np.asarray(pages, dtype=np.int64))
    for r in memory.regions:
        first = r.guest_phys_addr // TARGET_PAGE_SIZE
        end = (r.guest_phys_addr + r.memory_size) // TARGET_PAGE_SIZE
        mine = pages[(pages >= first) & (pages < end)]
        if not mine.size:
            continue
        breaks = np.flatnonzero(np.diff(mine) != 1) + 1
        for run in np.split(mine, breaks):
            yield int(run[0]) * TARGET_PAGE_SIZE, int(run.size) * TARGET_PAGE_SIZE


def copy_pages(src: GuestMemory, dst: GuestMemory, pages: np.ndarray) -> int:
    """Copy the given pages of guest RAM from ``src`` to ``dst``; returns pages copied."""
    copied = 0
    for gpa, length in _runs(src, pages):
        dst.view(gpa, length)[:] = src.view(gpa, length)
        copied += length // TARGET_PAGE_SIZE
    return copied


def compare_pages(a: GuestMemory, b: GuestMemory, pages: np.ndarray) -> np.ndarray:
    """Page numbers among ``pages`` whose contents differ between ``a`` and ``b``."""
    bad = []
    for gpa, length in _runs(a, pages):
        va = a.view(gpa, length).reshape(-1, TARGET_PAGE_SIZE)
        vb = b.view(gpa, length).reshape(-1, TARGET_PAGE_SIZE)
        diff = np.flatnonzero((va != vb).any(axis=1))
        bad.append(diff + gpa // TARGET_PAGE_SIZE)
        del va, vb
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)
