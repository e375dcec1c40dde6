"""Issue 24 item 7: free memory stranded inside glibc's heaps is given back (`steady_malloc`'s trimmer).

The 10,000-request soak crept up 7 % at the 2 MiB mmap threshold with no Python object growing:
free chunks below live ones, which the trim threshold (heap tops only) never returns. Shown here
in a fresh process (mallopt is process-wide): a fragmented heap keeps its RSS until the trimmer
thread runs, then gives the free pages back. glibc only.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import ctypes, time
from server.cli import start_malloc_trimmer, steady_malloc

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

assert steady_malloc(2 * 1024 * 1024, trim_every_s=0)  # the thresholds, no trimmer yet
blocks = [bytearray(1024 * 1024) for _ in range(150)]  # 1 MiB each: under the mmap threshold, in the heap
full = rss_mb()
kept = blocks[::10] + [blocks[-1]]  # every tenth and the top one stay: the free ones are stranded
blocks = None
time.sleep(0.5)
stranded = rss_mb()
start_malloc_trimmer(ctypes.CDLL("libc.so.6"), 0.1)
time.sleep(1.0)
trimmed = rss_mb()
print(full, stranded, trimmed, len(kept))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim")
def test_the_trimmer_gives_stranded_heap_pages_back():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    full, stranded, trimmed, _ = (float(x) for x in out.stdout.split())
    assert stranded > full - 20, "the freed blocks were returned without the trimmer: nothing to show"
    assert trimmed < stranded - 100, (full, stranded, trimmed)
