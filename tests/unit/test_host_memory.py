"""``trainer.host_mmap_threshold_mib``: blocks freed between micro-batches go back to the system (glibc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Freeing one 8 MiB block raises glibc's threshold to 8 MiB; 4 MiB blocks then come from the heap, and the last
# one still held keeps the heap from shrinking. Prints the MiB given back when the others are freed.
PROBE = """
import sys
sys.path.insert(0, {root!r})
from trainer.process import set_mmap_threshold

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

if {fixed}:
    assert set_mmap_threshold(1)
big = bytearray(8 << 20)
del big
blocks = [bytearray(4 << 20) for _ in range(64)]
last = blocks.pop()
before = rss_mib()
del blocks
print(before - rss_mib())
"""


def _returned_mib(fixed: bool) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), fixed=fixed)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


def test_a_fixed_threshold_gives_freed_blocks_back():
    assert _returned_mib(fixed=False) < 16  # glibc's default keeps the 252 MiB freed
    assert _returned_mib(fixed=True) > 200
