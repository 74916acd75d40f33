"""Attack (issue 12, item 4): concurrent jobs erase each other's privacy spends.

FLARE runs up to four jobs at once, each site's part in its own process, all charging the one ledger
in the site's `local/` folder. A ledger that keeps its spends in memory and rewrites the file whole
on every spend lets the last writer erase every other job's spends: the site then believes it spent
a fraction of what it released. Here real OS processes (spawned, as FLARE's job processes are)
charge one ledger at the same time; afterwards every single spend must be on file.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from clinfed.privacy.ledger import PrivacyLedger

PROCESSES = 3
SPENDS = 6
SITE = "site-1"


def _charge(path: str, worker: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    """One job's process: open the site's ledger, wait for the others, then spend every round."""
    ledger = PrivacyLedger(path, SITE)
    barrier.wait(timeout=60)
    for rnd in range(SPENDS):
        ledger.record(f"job-{worker}", rnd, 1.1, 0.05, 3, run=f"run-{worker}")


def test_concurrent_processes_lose_no_spend(tmp_path: Path) -> None:
    path = tmp_path / "local" / "privacy_ledger.json"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    procs = [ctx.Process(target=_charge, args=(str(path), w, barrier)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    spends = json.loads(path.read_text())["spends"]
    charged = sorted((s["job"], s["round"]) for s in spends)
    expected = sorted((f"job-{w}", r) for w in range(PROCESSES) for r in range(SPENDS))
    assert charged == expected, (
        f"{PROCESSES} jobs charged {PROCESSES * SPENDS} spends, the ledger kept {len(spends)}: "
        "concurrent jobs erased each other's spends"
    )
    # What the site believes it spent covers every job's steps, not the last writer's share.
    assert PrivacyLedger(path, SITE).history == [[1.1, 0.05, 3 * PROCESSES * SPENDS]]
