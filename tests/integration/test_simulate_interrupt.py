"""Claim (issue 22): an interrupted `clinfed simulate` stops every FLARE process it started.

Measured before the fix: a hung run's simulator (its own session, reparented to init when the parent
was killed) and two site workers were still running an hour later. Here `clinfed simulate` is sent
SIGTERM once its simulator and site processes are up; it must exit, and none of them may survive.
"""

import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow


def test_sigterm_stops_the_simulator_and_its_sites(tmp_path):
    cmd = [sys.executable, "-m", "clinfed.cli", "simulate", "breast_cancer_dp", "--sites", "3", "--rounds", "20"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for child in parent.children(recursive=True):
            seen.setdefault(child.pid, child)
        if len(seen) >= 4:  # the simulator server and its site workers
            break
        time.sleep(0.5)
    assert len(seen) >= 4, f"the simulation did not start its processes ({len(seen)} seen)"
    time.sleep(3)
    for child in parent.children(recursive=True):
        seen.setdefault(child.pid, child)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    _, alive = psutil.wait_procs(list(seen.values()), timeout=20)
    survivors = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in survivors:  # leave nothing behind, whatever the verdict
        p.kill()
    assert not survivors, f"{len(survivors)} FLARE process(es) outlived `clinfed simulate`"
