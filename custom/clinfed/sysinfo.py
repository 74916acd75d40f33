"""Process facts reported each round (memory), so leaks show in summary.json and the soak benchmark."""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path


def current_rss_mb() -> float:
    """Resident set size of this process now (not the peak), from /proc; NaN where /proc is absent."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def release_free_memory() -> bool:
    """End of a round: collect cyclic garbage, then hand the C heap's free pages back to the OS.

    Returns False where glibc's ``malloc_trim`` is unavailable (the collection still runs).

    Why (measured with `clinfed bench soak` and glibc's mallinfo2 in every process, 30 rounds): without
    it RSS crept up 0.3-0.7 MB a round at the sites and ~0.3 MB at the server, while no clinfed object
    outlived its round (one site's work looped standalone, train + encrypt + sum + decrypt, stays flat
    at 0.01 MB/round). What grew was (1) a round's messages (FLARE Shareables / FLModels holding the
    ciphertexts) left in reference cycles that only Python's generation-2 collection frees, every
    dozen rounds or so: the server's RSS climbed in a ~20 MB sawtooth; and (2) memory glibc keeps
    *free* inside its arenas after a round's many short-lived buffers (torch, SEAL, FLARE's streaming
    threads) while the bytes in use stayed flat: fragmentation, which `free` never hands back.
    ``gc.collect()`` frees the round's cycles at once and ``malloc_trim(0)`` releases every whole free
    page of every arena (``madvise(MADV_DONTNEED)``), so RSS follows what is really in use (server:
    0.29 → 0.02 MB/round). The cost is one full collection and one trim per round. What remains at a
    site under FLARE's default settings is FLARE's own retry window (see `clinfed.bench.soak`).
    """
    global _malloc_trim
    gc.collect()
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
            _malloc_trim = False
    if not _malloc_trim:
        return False
    _malloc_trim(0)
    return True


_malloc_trim = None


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas for threads created from now on (``mallopt(M_ARENA_MAX)``, what
    MALLOC_ARENA_MAX does at start-up); False where unavailable. A site runs each FLARE task and each
    streaming timer on short-lived threads; with one arena per thread (up to 8 per core) every arena
    keeps its own fragmented free memory, which `release_free_memory` can only partly hand back.
    Called once when a site's executor first sets up. `clinfed bench soak` measured site slopes of
    0.02-0.06 MB/round with it and a 4 s FLARE retry window (two runs), 0.19-0.29 without it and a 6 s
    window (one run); the two changes were not measured apart. Training runs on one thread here, so
    one arena costs no contention."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, int(arenas)))


_M_ARENA_MAX = -8  # glibc <malloc.h>
