"""The memory map, drawn from real memfd guest memory and a real SET_MEM_TABLE."""
from __future__ import annotations

import html
import re

import pytest

from vhostlab.memory import GuestMemory
from vhostlab.protocol import MemoryRegion, MemoryTable, Message, Request, parse_message
from vhostlab.viz import MemoryMapView

QEMU_PC = ((0x0, 0xC0000, 0x0), (0xE0000, 0x10000, 0xE0000))


def _text(page: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


@pytest.fixture
def memory():
    mem = GuestMemory.allocate(64 << 20)
    yield mem
    mem.close()


def _table_rows(page: str) -> list[list[str]]:
    body = page.split("<tbody>", 1)[1]
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<td>(.*?)</td>", tr, flags=re.S)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, flags=re.S)]


def test_regions_of_real_guest_memory(memory):
    page = MemoryMapView(memory).to_html()
    rows = _table_rows(page)
    assert len(rows) == 3
    for row, region in zip(rows, memory.regions):
        assert row[1] == f"{region.guest_phys_addr:#x}"
        assert row[2] == f"{region.guest_phys_addr + region.memory_size - 1:#x}"
        assert row[3].startswith(f"{region.memory_size:#x}")
        assert row[4] == f"{region.userspace_addr:#x}"
        assert row[5] == f"{region.mmap_offset:#x}"
    # QEMU's pc layout: the hole at 0xc0000-0xdffff, RAM again from 1 MiB
    assert [r[1] for r in rows] == ["0x0", "0xe0000", "0x100000"]
    # 64 MiB less the 192 KiB hole below 1 MiB (0xc0000-0xdffff, 0xf0000-0xfffff)
    assert "3 regions, 63.8 MiB of guest RAM" in _text(page)
    svg = MemoryMapView(memory)._repr_svg_()
    assert svg.count("<rect") == 9              # every region in each of three lanes
    assert svg.count("<polygon") == 6           # bands joining the lanes


def test_the_same_regions_from_the_set_mem_table_message(memory):
    table = MemoryTable(tuple(MemoryRegion(*r) for r, _fd in memory.memory_table()))
    fds = [fd for _r, fd in memory.memory_table()]
    msg = parse_message(Message.make(Request.SET_MEM_TABLE, table, fds=fds).to_bytes(), fds)
    assert _table_rows(MemoryMapView(msg).to_html()) == _table_rows(
        MemoryMapView(memory).to_html())


def test_view_rereads_after_add_region_and_marks_gpas(memory):
    view = MemoryMapView(memory, marks={"vq0 desc": 0x200000})
    assert len(_table_rows(view.to_html())) == 3
    memory.allocate_region(0x10000000, 0x100000)  # what ADD_MEM_REG would add
    page = view.to_html()
    rows = _table_rows(page)
    assert len(rows) == 4 and rows[3][1] == "0x10000000"
    assert "vq0 desc" in page and "0x200000" in page


def test_extreme_addresses_stay_inside_the_drawing():
    regions = [MemoryRegion(0, 0x1000, 0x7F0000000000, 0),
               MemoryRegion(0xFFFF_FFFF_FFFF_0000, 0x1000, 0xFFFF_FFFF_FFFF_0000, 0xFFFF_0000)]
    svg = MemoryMapView(regions)._repr_svg_()
    width = float(re.search(r"width='(\d+)'", svg).group(1))
    for x, w in re.findall(r"<rect x='([\d.]+)' y='\d+' width='([\d.]+)'", svg):
        assert 0 <= float(x) and float(x) + float(w) <= width
    assert "0xffffffffffff0000" in MemoryMapView(regions).to_html()


def test_no_table_yet():
    assert "no memory table yet" in MemoryMapView([]).to_html()
