"""Split-ring layout, EVENT_IDX arithmetic, numpy views, exports."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostlab.memory import GuestMemory
from vhostlab.ring import (VRING_DESC_DTYPE, VRING_STATE_DTYPE, VRING_USED_ELEM_DTYPE,
                           vring_layout, vring_need_event, vring_need_event_py, vring_size,
                           vring_views)


@pytest.mark.parametrize("num", [1, 2, 64, 256, 1024, 32768])
def test_vring_size_is_linux_vring_size(num):
    # Linux include/uapi/linux/virtio_ring.h, written out independently:
    # ((16 * num + 2 * (3 + num) + align - 1) & ~(align - 1)) + 2 * 3 + 8 * num
    expected = ((16 * num + 2 * (3 + num) + 4095) & ~4095) + 6 + 8 * num
    assert vring_size(num) == expected


def test_legacy_layout_of_qemus_256_entry_ring():
    layout = vring_layout(0x10000, 256)
    assert layout.desc == 0x10000
    assert layout.avail == 0x10000 + 4096
    assert layout.used == 0x12000                    # aligned to 4096
    assert layout.size == 10246
    assert vring_layout(0, 256, align=64).used == 4096 + 6 + 512 + 58


def test_dtypes_match_the_spec_structs():
    assert VRING_DESC_DTYPE.itemsize == 16
    assert [VRING_DESC_DTYPE.fields[f][1] for f in ("addr", "len", "flags", "next")] == \
        [0, 8, 12, 14]
    assert VRING_USED_ELEM_DTYPE.itemsize == 8
    assert all(VRING_STATE_DTYPE.fields[f][0] == np.int64 for f in VRING_STATE_DTYPE.names)


@pytest.mark.parametrize("event, new, old, expected", [
    (0, 1, 0, True),            # the index moved past event
    (1, 1, 0, False),           # ... not yet
    (5, 10, 3, True),
    (10, 10, 3, False),
    (2, 3, 3, False),           # no movement, no event
    (0xFFFF, 0, 0xFFFE, True),  # across the 16-bit wrap
    (0, 0, 0xFFFE, False),
])
def test_vring_need_event_spec_cases(event, new, old, expected):
    assert vring_need_event_py(event, new, old) is expected
    assert vring_need_event(event, new, old) is expected


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_vring_need_event_kernel_equals_twin_and_means_event_in_old_new(event, new, old):
    got = vring_need_event(event, new, old)
    assert got == vring_need_event_py(event, new, old)
    passed = {(old + k) & 0xFFFF for k in range((new - old) & 0xFFFF)}
    assert got == (event in passed)


def test_views_read_and_write_guest_memory():
    with GuestMemory.allocate(1 << 20, layout="flat") as mem:
        layout = vring_layout(0x4000, 8)
        v = vring_views(mem, 8, layout.desc, layout.avail, layout.used)
        v.desc[3] = (0x1234, 99, 3, 5)
        v.avail_idx[0] = 7
        v.used_ring[2] = (6, 1500)
        v.avail_event[0] = 0xABCD
        v.used_event[0] = 0x1122
        assert mem.read(0x4000 + 48, 16) == \
            (0x1234).to_bytes(8, "little") + (99).to_bytes(4, "little") + b"\x03\x00\x05\x00"
        assert mem.read(layout.avail + 2, 2) == b"\x07\x00"
        assert mem.read(layout.avail + 4 + 16, 2) == b"\x22\x11"
        assert mem.read(layout.used + 4 + 16, 8) == (6).to_bytes(4, "little") + \
            (1500).to_bytes(4, "little")
        assert mem.read(layout.used + 4 + 64, 2) == b"\xcd\xab"
        del v


@pytest.mark.parametrize("module", ["vhostlab.memory", "vhostlab.dirtylog", "vhostlab.ring",
                                    "vhostlab.ring.atomics", "vhostlab.ring.layout",
                                    "vhostlab.ring.errors", "vhostlab.ring.virtqueue",
                                    "vhostlab.ring.driver", "vhostlab.ring.arena",
                                    "vhostlab.bench"])
def test_all_names_exist_and_packages_reexport_their_modules(module):
    mod = importlib.import_module(module)
    assert len(set(mod.__all__)) == len(mod.__all__)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name}"
    if module == "vhostlab.ring":
        for sub in ("atomics", "layout", "errors", "virtqueue", "driver", "arena", "tx",
                    "rx", "log"):
            for name in importlib.import_module(f"vhostlab.ring.{sub}").__all__:
                assert name in mod.__all__, f"vhostlab.ring does not re-export {sub}.{name}"


def test_kernel_cache_stamp_follows_the_files_it_is_built_from(tmp_path, monkeypatch):
    """numba stamps a cached kernel with its own file only; depends_on folds
    the helper files in, so editing a helper makes the cache stale."""
    from numba import njit
    from vhostlab.ring.cache import depends_on
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "dp_helper_mod.py").write_text("X = 1\n")
    (tmp_path / "dp_kernel_mod.py").write_text("def f(x):\n    return x + 1\n")
    helper = importlib.import_module("dp_helper_mod")
    kernel_mod = importlib.import_module("dp_kernel_mod")

    def stamp_with(helper_source: str) -> str:
        (tmp_path / "dp_helper_mod.py").write_text(helper_source)
        dispatcher = njit(cache=True)(kernel_mod.f)
        plain = dispatcher._cache._cache_file._source_stamp
        depends_on(dispatcher, helper)
        assert dispatcher._cache._cache_file._source_stamp != plain
        return dispatcher._cache._cache_file._source_stamp

    assert stamp_with("X = 1\n") == stamp_with("X = 1\n")
    assert stamp_with("X = 1\n") != stamp_with("X = 2\n")
