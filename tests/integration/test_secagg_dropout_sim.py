"""Claim (issue 22): secure aggregation survives dropouts in real FLARE runs.

Five sites; site-4 dies before uploading (``crash``), site-5 after its masked upload, before the round
is unmasked (``vanish``). The server re-runs the sum among the survivors (``secagg_remask``), every
survivor reveals, and the round completes with sites 1-3: breast_cancer_dp keeps training (every
round's sum holds exactly the three survivors) and survival_km releases the survivors' pooled curve,
equal to the Kaplan–Meier table of their pooled rows (the unit test
tests/unit/test_secagg.py checks the exact FedAvg of the same dropout pattern).
"""

import numpy as np
import pandas as pd
import pytest

from clinfed.analytics.km import bin_index
from clinfed.data.sitedb import find_site_databases, read_site_table, site_columns, split_dataset
from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow
DROPOUTS = {"site-4": "crash", "site-5": "vanish"}
SURVIVORS = {"site-1", "site-2", "site-3"}


def test_training_completes_with_the_survivors(tmp_path):
    summary = run_simulation(
        SimulationRequest(
            job="breast_cancer_dp", sites=5, rounds=2, out=tmp_path, inject=DROPOUTS, extra={"straggler_wait": 5}
        )
    )
    assert summary["rounds_completed"] == 2, summary["rounds"]
    for rnd in summary["rounds"]:
        ok = {s for s, e in rnd["sites"].items() if e["status"] == "ok"}
        assert ok == SURVIVORS, rnd["sites"]
        for site in DROPOUTS:
            assert rnd["sites"][site]["reason"].startswith(f"{site}: ") and "\n" not in rnd["sites"][site]["reason"]
    assert summary["final"]["metrics"]["auc"] >= 0.95
    server_log = (tmp_path / "workspace" / "server" / "audit" / "server.jsonl").read_text()
    assert '"event":"secagg_rerun"' in server_log


def test_km_releases_the_survivors_pooled_curve(tmp_path):
    data = tmp_path / "whas500"
    split_dataset("whas500", 5, data, seed=3)
    summary = run_simulation(
        SimulationRequest(
            job="survival_km",
            sites=5,
            out=tmp_path / "km",
            data_dir=str(data),
            min_cell=1,
            inject=DROPOUTS,
            extra={"data_dir": str(data), "straggler_wait": 5, "time_bin": 365},
        )
    )
    assert summary["final"]["status"] == "released", summary["final"]["reason"]
    assert set(summary["provenance"]["km"]["sites"]) == SURVIVORS
    frames = []
    for site, path in find_site_databases(data).items():
        if site in SURVIVORS:
            frames.append(pd.DataFrame(read_site_table(path, site_columns(path))))
    pooled = pd.concat(frames, ignore_index=True)
    curve = summary["km"]["groups"]["all"]
    assert curve["at_risk"][0] == len(pooled)
    bins = bin_index(pooled["time"].to_numpy(float), 365.0)
    first = round(curve["time"][0] / 365.0)  # the first released bin (1-based)
    assert curve["events"][0] == int(np.sum((bins == first) & (pooled["event"].to_numpy(int) == 1)))
