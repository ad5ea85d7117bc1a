"""release_freed_heap: glibc hands freed heap pages back to the OS after the sessions load."""
from __future__ import annotations

import platform

import numpy as np
import psutil
import pytest

from handlers.runtime.service import release_freed_heap


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_freed_heap_returns_freed_small_blocks():
    proc = psutil.Process()
    # many small (heap, not mmap) blocks, then free all but the last: the heap top stays
    # pinned by the survivor, so only malloc_trim can return the freed pages
    blocks = [np.ones(16_000, dtype=np.uint8) for _ in range(5_000)]  # ~80 MB below the mmap threshold
    keep = blocks[-1]
    del blocks
    before = proc.memory_info().rss
    assert release_freed_heap() is True
    after = proc.memory_info().rss
    assert keep.sum() == 16_000
    assert before - after > 40 * 2**20, (before / 2**20, after / 2**20)
