"""What the labs draw: static views of the live state, and widgets on top.

Every view takes a live object of a lower layer (a back-end, a front-end
device, a ring, a dirty log, a migration) or its snapshot, and reads it again
each time it renders; a view never draws a copy the notebook made up.

Static views render as HTML (``_repr_html_``; SVG and PNG inside), so they
show in JupyterLab, Voila, nbconvert HTML and GitHub's notebook preview:

- ``TraceView``: the vhost-user messages (time, direction, request, decoded
  fields, raw bytes in a hex dump on demand);
- ``MemoryMapView``: the memory table (GPA, front-end address, mmap offset);
- ``VirtqueueView``: avail and used rings with their four pointers
  (avail.idx, last_avail_idx, used.idx, last_used_idx), the chains, and the
  descriptors in use or recently used (``descriptor_states``), sized for a
  notebook;
- ``DirtyBitmapView``: one sync of the dirty log (a ``DirtyRound``) as labelled
  bands of pages, zoomed to the dirty 64-page words, the vhost log beside the
  guest's own writes; ``DirtyRoundPlayer`` plays a run's syncs;
  ``NewestDirtyRoundView`` follows a running one (``watch_migration`` uses it);
- ``LogBitmapView``: any raw log as it is now, one pixel per 4 KiB page;
- ``MigrationTimelineView``: pages per round, bytes sent, the rounds sent
  with the guest stopped and the downtime;
- ``VhostOpsTableView``: each VhostOps op, its message and its ioctl;
- ``CallTimelineView``: the vhost.c functions a front-end entered, nested,
  with the messages each one sent.

Widgets (ipywidgets 8) for what needs interaction: ``Stepper``,
``RoundSlider``, ``LiveView`` (``watch_migration()`` builds one for a running
migration) and the ``progress()`` context manager. They
carry the static HTML too, so they degrade to it with no front-end attached.

Typical sources (each view reads them again whenever it renders)::

    TraceView(server)                  # a BackendServer: its message trace
    TraceView(ops)                     # a front-end's VhostOps: its own trace
    MemoryMapView(server)              # the memory table the back-end mapped
    VirtqueueView(guest.queues[0], memory=guest.memory,         # guest's ring,
                  state=lambda: server.snapshot().vrings[0])    # device's counters
    VirtqueueView(lambda: qemu_guest.ring_state(1), state=...)  # over qtest
    LogBitmapView(server)              # the vhost log as the back-end marks it
    DirtyBitmapView(migration.dirty_rounds[2])          # one sync of a migration
    DirtyRoundPlayer(migration.dirty_rounds)            # all of them, Play + slider
    CallTimelineView(vhost_dev)        # vhost.c calls, nested, with their messages
    watch_migration(migration, until=thread_or_callable, trace=server)
"""
from .bitmap import LogBitmapView, bitmap_rgb, dirty_counts, dirty_ranges, page_bits
from .calls import CallTimelineView, inferred_timeline, timeline_entries
from .dirtymap import DirtyBitmapView, DirtyRoundPlayer, NewestDirtyRoundView
from .memmap import MemoryMapView, memory_regions
from .opstable import VhostOpsTableView
from .png import decode_png, figure_png, rgb_png
from .timeline import MigrationTimelineView, round_numbers
from .trace import TraceView, trace_records
from .packed import PackedRingSnapshot, PackedVirtqueueView, packed_ring_copy
from .virtqueue import RingSnapshot, VirtqueueView, descriptor_states, ring_snapshot
from .widgets import LiveView, RoundSlider, Stepper, WidgetView, progress, watch_migration

__all__ = [
    "CallTimelineView",
    "DirtyBitmapView",
    "DirtyRoundPlayer",
    "NewestDirtyRoundView",
    "LiveView",
    "LogBitmapView",
    "MemoryMapView",
    "MigrationTimelineView",
    "RingSnapshot",
    "RoundSlider",
    "Stepper",
    "TraceView",
    "VhostOpsTableView",
    "VirtqueueView", "PackedVirtqueueView", "PackedRingSnapshot", "packed_ring_copy",
    "WidgetView",
    "bitmap_rgb",
    "decode_png",
    "descriptor_states",
    "dirty_counts",
    "dirty_ranges",
    "figure_png",
    "inferred_timeline",
    "memory_regions",
    "page_bits",
    "progress",
    "rgb_png",
    "ring_snapshot",
    "round_numbers",
    "timeline_entries",
    "trace_records",
    "watch_migration",
]
