"""A frame arena: many frames packed in one numpy buffer.

TX bursts fill one (frame ``k`` is ``buf[offsets[k]:offsets[k] + lengths[k]]``,
``count`` frames); RX bursts read frames from one. Kernels take the three
arrays, so a burst moves no Python objects.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

__all__ = ["FrameArena", "MAX_FRAME_SIZE"]

# The largest frame a virtio-net device may see with GSO: 64 KiB plus the
# 12-byte header. A TX arena smaller than this can break a ring.
MAX_FRAME_SIZE = 65536 + 12


class FrameArena:
    """``capacity`` bytes of frames, at most ``max_frames`` of them."""

    def __init__(self, capacity: int = 1 << 20, max_frames: int = 256) -> None:
        if capacity < 1 or max_frames < 1:
            raise ValueError(f"capacity = {capacity}, max_frames = {max_frames}: "
                             "both must be >= 1")
        self.buf = np.zeros(capacity, np.uint8)
        self.offsets = np.zeros(max_frames, np.int64)
        self.lengths = np.zeros(max_frames, np.int64)
        self.count = 0

    @classmethod
    def from_frames(cls, frames: Iterable[bytes], capacity: int | None = None,
                    max_frames: int | None = None) -> "FrameArena":
        """An arena holding ``frames`` (sized to fit them unless told)."""
        frames = [bytes(f) for f in frames]
        arena = cls(capacity or max(1, sum(map(len, frames))),
                    max_frames or max(1, len(frames)))
        arena.extend(frames)
        return arena

    @property
    def capacity(self) -> int:
        return self.buf.size

    @property
    def max_frames(self) -> int:
        return self.offsets.size

    @property
    def used_bytes(self) -> int:
        """Bytes up to the end of the last frame."""
        if self.count == 0:
            return 0
        return int(self.offsets[self.count - 1] + self.lengths[self.count - 1])

    def clear(self) -> None:
        self.count = 0

    def append(self, frame) -> None:
        """Add one frame at the end; ValueError when it does not fit."""
        data = np.frombuffer(memoryview(frame).cast("B"), np.uint8)
        start = self.used_bytes
        if self.count >= self.max_frames or start + data.size > self.capacity:
            raise ValueError(f"frame of {data.size} bytes does not fit: {self.count}/"
                             f"{self.max_frames} frames, {start}/{self.capacity} bytes used")
        self.buf[start:start + data.size] = data
        self.offsets[self.count], self.lengths[self.count] = start, data.size
        self.count += 1

    def extend(self, frames: Iterable[bytes]) -> None:
        for frame in frames:
            self.append(frame)

    def drop_front(self, n: int) -> None:
        """Forget the first ``n`` frames (an RX burst delivered them), moving
        the rest to the front."""
        n = max(0, min(n, self.count))
        rest = [self.frame(k).copy() for k in range(n, self.count)]
        self.clear()
        self.extend(rest)

    def frame(self, k: int) -> np.ndarray:
        """A view of frame ``k``."""
        if not 0 <= k < self.count:
            raise IndexError(f"frame {k}: the arena holds {self.count}")
        start = int(self.offsets[k])
        return self.buf[start:start + int(self.lengths[k])]

    def frames(self) -> list[bytes]:
        """Copies of all frames."""
        return [self.frame(k).tobytes() for k in range(self.count)]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.frames())

    def __repr__(self) -> str:
        return (f"<FrameArena {self.count}/{self.max_frames} frames, "
                f"{self.used_bytes}/{self.capacity} bytes>")
