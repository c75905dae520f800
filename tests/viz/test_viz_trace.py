"""The message trace table, drawn from real protocol messages and a real trace."""
from __future__ import annotations

import html
import re

from vhostlab.backend.trace import MessageTrace
from vhostlab.protocol import (ConfigSpace, Feature, LogArea, MemoryRegion, MemoryTable,
                               Message, Request, U64, parse_message)
from vhostlab.protocol.recorded import QEMU_7_2_SEQUENCE
from vhostlab.viz import TraceView
from vhostlab.viz._common import hexdump
from vhostlab.protocol import TO_BACKEND, TO_FRONTEND

QEMU_REGIONS = ((0x0, 0xC0000, 0x0), (0xE0000, 0x10000, 0xE0000),
                (0x100000, 0xFF00000, 0x100000))
HOSTILE = b"<script>alert('x')</script>"


def _record(trace: MessageTrace, direction: str, msg: Message, error: str | None = None):
    """Record a message the way the back-end does: parsed back from its bytes."""
    parsed = parse_message(msg.to_bytes(), msg.fds)
    trace.record(direction, parsed.request.name, parsed.fields(), msg.to_bytes(),
                 nfds=len(msg.fds), error=error)


def _text(page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def test_trace_table_shows_each_message_in_order_with_decoded_fields():
    trace = MessageTrace()
    table = MemoryTable(tuple(MemoryRegion(gpa, size, 0x7F0000000000 + off, off)
                              for gpa, size, off in QEMU_REGIONS))
    _record(trace, TO_BACKEND, Message.make(Request.GET_FEATURES))
    _record(trace, TO_FRONTEND, Message.make_reply(
        Request.GET_FEATURES, int(Feature.VHOST_F_LOG_ALL)))
    _record(trace, TO_BACKEND, Message.make(Request.SET_MEM_TABLE, table, fds=(10, 11, 12),
                                      need_reply=True))
    _record(trace, TO_BACKEND, Message.make(Request.SET_LOG_BASE, LogArea(8192, 0), fds=(13,)))
    page = TraceView(trace).to_html()
    text = _text(page)
    order = [text.index(name) for name in ("GET_FEATURES", "SET_MEM_TABLE", "SET_LOG_BASE")]
    assert order == sorted(order)
    assert "VHOST_F_LOG_ALL" in text                       # feature names decoded
    assert "guest_phys_addr=0x100000" in text and "memory_size=0xff00000" in text
    assert "mmap_size = 0x2000" in text                     # SET_LOG_BASE's 8192
    assert "3 fds" in text and "1 fd" in text               # fd counts beside the bytes
    assert "front-end \u2192 back-end" in text and "back-end \u2192 front-end" in text
    assert "(reply)" in text and "need_reply" in text
    assert "4 messages" in text


def test_raw_bytes_are_a_hex_dump_in_details():
    msg = Message.make(Request.SET_FEATURES, int(Feature.VHOST_F_LOG_ALL) | 1 << 32)
    page = TraceView([msg]).to_html()
    dump = hexdump(msg.to_bytes())
    assert "<details>" in page and f"{len(msg.to_bytes())} bytes" in page
    assert html.escape(dump) in page
    # header: request 2, flags 1, size 8; then bit 26 and bit 32 of the u64
    assert "02 00 00 00 01 00 00 00 08 00 00 00 00 00 00 04" in dump
    assert "01 00 00 00" in dump.splitlines()[1]


def test_hostile_text_is_escaped_everywhere():
    """Bytes a front-end sent and an error naming them must not become markup."""
    trace = MessageTrace()
    msg = Message.make(Request.SET_CONFIG, ConfigSpace(0, len(HOSTILE), 0, HOSTILE))
    _record(trace, TO_BACKEND, msg, error=HOSTILE.decode())
    page = TraceView(trace).to_html()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page                      # the error, escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/sc" in page  # hex dump ASCII column


def test_recorded_qemu_sequence_shows_the_migration_steps():
    page = TraceView(QEMU_7_2_SEQUENCE, limit=0).to_html()
    text = _text(page)
    steps = [text.index("SET_LOG_BASE"), text.index("VHOST_F_LOG_ALL", text.index(
        "SET_LOG_BASE")), text.index("GET_VRING_BASE")]
    assert steps == sorted(steps)
    assert "back-end \u2192 front-end" in text


def test_limit_and_filter_and_live_reread():
    trace = MessageTrace()
    view = TraceView(trace, limit=2, requests={"SET_VRING_NUM", "GET_VRING_BASE"})
    assert "0 messages" in _text(view.to_html())
    for num in (64, 128, 256):
        _record(trace, TO_BACKEND, Message.make(Request.SET_VRING_NUM, _vring_state(0, num)))
    _record(trace, TO_BACKEND, Message.make(Request.SET_OWNER))
    text = _text(view.to_html())                         # the same view, read again
    assert "3 messages" in text and "1 earlier messages not shown" in text
    assert "num = 128" in text and "num = 256" in text and "num = 64" not in text
    assert "SET_OWNER" not in text


def _vring_state(index: int, num: int):
    from vhostlab.protocol import VringState
    return VringState(index, num)


def test_u64_payload_and_view_rows():
    rows = TraceView([Message.make(Request.SET_VRING_CALL, U64(0x101))]).rows()
    assert rows[0]["request"] == "SET_VRING_CALL"
    assert rows[0]["fields"]["payload"]["nofd"] is True
