"""Fixtures for the protocol tests: real fds that are always closed."""
from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from protocol_samples import make_fds


@pytest.fixture
def fds() -> Iterator[Callable[[int], tuple[int, ...]]]:
    """``fds(n)`` opens n real eventfds; all are closed after the test."""
    opened: list[int] = []
    yield lambda n: make_fds(n, opened)
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass
