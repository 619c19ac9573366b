"""glibc malloc settings for the services' processes: keep a message's freed memory for the next.

glibc hands the free top of a thread's heap back to the kernel (madvise
MADV_DONTNEED) once more than M_TRIM_THRESHOLD of it is free, and sizes that
threshold from the mmapped blocks freed lately: a few hundred KiB here. A
scanner thread allocates and frees a message's bytes and decoded parts for
every message (82 KiB on average, attachments of up to a few hundred KiB), so
its heap was given back and faulted in again per message: 38 page faults per
message in the scanner (perf stat), about 5% of its CPU in the kernel's fault
handler (perf record). With the thresholds fixed below, the faults all but
stop (93,599 -> 793 in 10 s of the benchmark) and the scanner's CPU per
message fell 8% relative to the load generator's (three alternating rounds
of `python -m bench --systems embedded-split` against the code before), for
13 MiB more peak RSS in the scanner (its threads keep their heaps).

What the fixed values still bound: a block of MMAP_THRESHOLD or more (a large
message's bytes) is its own mapping, returned to the kernel when freed, so a
20 MiB message leaves nothing behind; a heap keeps at most TRIM_THRESHOLD of
free memory at its top (glibc has at most 8 heaps per core).
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 4 << 20


def tune() -> bool:
    """Set the thresholds in this process (glibc only; elsewhere nothing). True when set."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this interpreter runs on
    # mallopt returns 1 on success, 0 on error.
    ok = bool(
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    if not ok:
        log.warning("glibc refused the malloc thresholds; running with its defaults")
    return ok
