"""Status codes the ring kernels return, and the named errors Python raises.

A kernel cannot raise, so when a guest breaks a rule it records what it saw in
the ring's state (``status``, ``err_head``, ``err_index``, ``err_table``,
``err_value``, ``err_limit``) and returns the status code. The ring is then
broken, like a virtio device that sets DEVICE_NEEDS_RESET: every later call
returns the same code without touching guest memory, until the front-end
resets the ring (SET_VRING_BASE after GET_VRING_BASE, or a device reset).
:func:`ring_error` turns the recorded state into one of the exceptions below;
the table ``ERRORS`` says which, and how to word it.

What the error fields hold, by code:

* descriptor errors: ``err_head`` the chain's head, ``err_index`` the
  descriptor's index in its table, ``err_table`` the GPA of the indirect table
  it sits in (-1: the ring's own table), ``err_value`` the bad value,
  ``err_limit`` the limit it broke;
* E_AVAIL_IDX: ``err_index`` last_avail_idx, ``err_value`` avail->idx,
  ``err_limit`` the queue size;
* E_HEAD: ``err_index`` the avail ring slot, ``err_value`` the head;
* E_RING_*: ``err_index`` 0, 1, 2 for the descriptor table, avail and used
  ring, ``err_value`` its GPA, ``err_limit`` its size or alignment.
"""
from __future__ import annotations

from ..errors import VhostlabError

__all__ = [
    "RING_OK", "E_AVAIL_IDX", "E_HEAD", "E_NEXT", "E_LOOP", "E_INDIRECT_NESTED",
    "E_INDIRECT_NEXT", "E_INDIRECT_LEN", "E_INDIRECT_ALIGN", "E_ZERO_LEN",
    "E_BUF_ADDR", "E_CHAIN_LEN", "E_CHAIN_SHORT", "E_FRAME_TOO_BIG",
    "E_DIRECTION", "E_RING_NUM", "E_RING_ADDR", "E_RING_ALIGN", "E_LOG_RANGE",
    "E_ARENA", "E_PACKED_FLAGS", "E_PACKED_ID", "ERRORS",
    "RingError", "DescriptorFlagsError", "AvailIndexError", "DescriptorIndexError", "DescriptorLoopError",
    "IndirectDescriptorError", "ZeroLengthBufferError", "BufferAddressError",
    "ChainLengthError", "DescriptorDirectionError", "RingConfigError",
    "RingAddressError", "RingLogError", "ring_error",
]

RING_OK = 0
E_AVAIL_IDX = 1
E_HEAD = 2
E_NEXT = 3
E_LOOP = 4
E_INDIRECT_NESTED = 5
E_INDIRECT_NEXT = 6
E_INDIRECT_LEN = 7
E_INDIRECT_ALIGN = 8
E_ZERO_LEN = 9
E_BUF_ADDR = 10
E_CHAIN_LEN = 11
E_CHAIN_SHORT = 12
E_FRAME_TOO_BIG = 13
E_DIRECTION = 14
E_RING_NUM = 15
E_RING_ADDR = 16
E_RING_ALIGN = 17
E_LOG_RANGE = 18
# The caller's arguments are inconsistent (a frame's offset/length outside the
# arena, nframes past the arrays, hdr_len out of range): a bug in the calling
# code, not the guest's doing. The ring is not broken.
E_ARENA = 19
# Packed rings (2.8) only: a descriptor inside a chain that is not available
# in the lap the device is in (its AVAIL/USED pair says otherwise), and a
# buffer id that is not below the queue size.
E_PACKED_FLAGS = 20
E_PACKED_ID = 21


class RingError(VhostlabError):
    """A virtqueue is broken: its guest (or front-end) broke a rule.

    Attributes: ``queue`` (index), ``queue_name``, ``code``, ``head``,
    ``index``, ``table``, ``field``, ``value``, ``limit`` (None where they do
    not apply), and ``frames``: how many frames the burst completed before the
    bad chain (they are in the arena and in the used ring).
    """

    def __init__(self, message: str, *, queue: int = -1, queue_name: str = "",
                 code: int = 0, head=None, index=None, table=None, field: str = "",
                 value=None, limit=None) -> None:
        super().__init__(message, what=f"queue {queue}" if queue >= 0 else None,
                         field=field or None, value=value, limit=limit)
        self.queue, self.queue_name, self.code = queue, queue_name, code
        self.head, self.index, self.table = head, index, table
        self.field = field
        self.frames = 0

    def render(self) -> str:
        """The sentence :func:`ring_error` wrote: it already names the queue,
        the descriptor, the field, the value and the limit."""
        return self.reason


class AvailIndexError(RingError):
    """avail->idx ran more than the queue size ahead of last_avail_idx."""


class DescriptorIndexError(RingError):
    """A head or next index is not below the size of its table."""


class DescriptorLoopError(RingError):
    """A chain is longer than its table: the guest built a loop."""


class IndirectDescriptorError(RingError):
    """A malformed indirect descriptor (nested, with NEXT, bad len or addr)."""


class ZeroLengthBufferError(RingError):
    """A descriptor with len 0."""


class BufferAddressError(RingError):
    """A buffer (or indirect table) outside guest memory, leaving its region
    or straddling two."""


class ChainLengthError(RingError):
    """A chain's byte count is impossible: past u32, shorter than the
    virtio-net header, or larger than the frame arena."""


class DescriptorFlagsError(RingError):
    """A packed ring's chain holds a descriptor whose AVAIL/USED flags do not
    make it available in the device's current lap (2.8.1, 2.8.21.1)."""


class DescriptorDirectionError(RingError):
    """A device-writable buffer where the device only reads (TX), or a
    device-readable one where it only writes (RX)."""


class RingConfigError(RingError):
    """The front-end configured the ring with impossible values."""


class RingAddressError(RingError):
    """The descriptor table, avail or used ring is not mapped or misaligned."""


class RingLogError(RingError):
    """A dirty-log write would fall past the end of the log."""


_RINGS = ("descriptor table", "avail ring", "used ring")

# code -> (exception, field, message template). Templates see: where, head,
# index, table, value, limit, ring, ahead, last.
ERRORS = {
    E_AVAIL_IDX: (AvailIndexError, "avail.idx",
                  "avail.idx = {value} runs {ahead} entries ahead of "
                  "last_avail_idx {index}; at most the queue size {limit} may be"),
    E_HEAD: (DescriptorIndexError, "avail.ring",
             "avail.ring[{index}] = {value}: a head index must be < the queue size {limit}"),
    E_NEXT: (DescriptorIndexError, "next",
             "{where}: next = {value}, must be < {limit} (the size of its table)"),
    E_LOOP: (DescriptorLoopError, "next",
             "{where}: the chain runs past {limit} descriptors (its table's size): a loop"),
    E_INDIRECT_NESTED: (IndirectDescriptorError, "flags",
                        "{where}: flags = {value:#x}: INDIRECT inside an indirect table"),
    E_INDIRECT_NEXT: (IndirectDescriptorError, "flags",
                      "{where}: flags = {value:#x}: INDIRECT together with NEXT"),
    E_INDIRECT_LEN: (IndirectDescriptorError, "len",
                     "{where}: indirect table len = {value}, must be a non-zero "
                     "multiple of 16 and at most {limit}"),
    E_INDIRECT_ALIGN: (IndirectDescriptorError, "addr",
                       "{where}: indirect table addr = {value:#x}, must be "
                       "{limit}-byte aligned"),
    E_ZERO_LEN: (ZeroLengthBufferError, "len",
                 "{where}: len = 0; zero-length buffers are refused"),
    E_BUF_ADDR: (BufferAddressError, "addr",
                 "{where}: addr = {value:#x}, len = {limit:#x}: the buffer does not "
                 "lie inside one mapped region"),
    E_CHAIN_LEN: (ChainLengthError, "len",
                  "{where}: the chain's lengths add up to {value}, past {limit} (u32)"),
    E_CHAIN_SHORT: (ChainLengthError, "len",
                    "{where}: the chain holds {value} bytes, fewer than the "
                    "{limit}-byte virtio-net header"),
    E_FRAME_TOO_BIG: (ChainLengthError, "len",
                      "{where}: the frame is at least {value} bytes, more than the "
                      "frame arena's {limit}"),
    E_DIRECTION: (DescriptorDirectionError, "flags",
                  "{where}: flags = {value:#x}: {direction}"),
    E_PACKED_FLAGS: (DescriptorFlagsError, "flags",
                     "{where}: flags = {value:#x}: AVAIL/USED do not make it available "
                     "with wrap counter {limit}, yet the chain runs on to it"),
    E_PACKED_ID: (DescriptorIndexError, "id",
                  "{where}: buffer id = {value}, must be < the queue size {limit}"),
    E_RING_NUM: (RingConfigError, "num",
                 "queue size num = {value}: must be a power of 2 from 1 to {limit}"),
    E_RING_ADDR: (RingAddressError, "addr",
                  "{ring} at gpa {value:#x} ({limit} bytes) does not lie inside one "
                  "mapped region"),
    E_RING_ALIGN: (RingAddressError, "addr",
                   "{ring} at gpa {value:#x} must be {limit}-byte aligned"),
    E_LOG_RANGE: (RingLogError, "log",
                  "{where}: logging a write at gpa {value:#x} needs the dirty log to "
                  "cover page {page}, but it holds {limit} bytes ({pages} pages)"),
}


def _where(head: int, index: int, table: int) -> str:
    if index < 0:
        return "used ring"
    if table >= 0:
        return (f"indirect descriptor {index} of the table at gpa {table:#x} "
                f"(chain head {head})")
    return f"descriptor {index} (chain head {head})"


def ring_error(state, queue: int = -1, queue_name: str = "") -> RingError:
    """The exception for the error recorded in a ring state record."""
    code = int(state["status"])
    head, index, table = (int(state["err_head"]), int(state["err_index"]),
                          int(state["err_table"]))
    value, limit = int(state["err_value"]), int(state["err_limit"])
    if code in (E_BUF_ADDR, E_INDIRECT_ALIGN, E_LOG_RANGE, E_RING_ADDR, E_RING_ALIGN):
        value &= (1 << 64) - 1          # addresses were kept as int64
    cls, field, template = ERRORS.get(code, (RingError, "", "unknown status {code}"))
    text = template.format(
        where=_where(head, index, table), head=head, index=index, table=table,
        value=value, limit=limit, code=code,
        ring=_RINGS[index] if 0 <= index < 3 else "ring",
        ahead=(value - index) & 0xFFFF, page=value // 4096, pages=limit * 8,
        direction=("a device-writable buffer in a chain the device only reads"
                   if limit == 0 else
                   "a device-readable buffer in a chain the device only writes"))
    name = f"queue {queue}" + (f" ({queue_name})" if queue_name else "")
    err = cls(f"{name}: {text}", queue=queue, queue_name=queue_name, code=code,
              head=head if head >= 0 else None, index=index,
              table=table if table >= 0 else None, field=field, value=value,
              limit=limit)
    return err
