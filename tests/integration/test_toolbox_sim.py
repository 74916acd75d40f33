"""crosstab, ttest, correlation and cumulative_incidence on real FLARE simulator runs under CKKS, 3 sites,
against scipy, pandas and lifelines on the pooled table of the same split.

One parametrised test, each job in its cheapest configuration (gbsg2's 686 patients; flchain with
one-year bins for the competing risks): ~20-30 s each on two cores, most of it FLARE's start-up.
Released floats carry 7 significant digits (`sums_fl.round_release`), so 1e-6 relative.
"""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clinfed.data.sitedb import find_site_databases, read_site_table, site_columns, split_dataset
from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow
REL = 1e-6


def _pooled(data_dir: Path) -> pd.DataFrame:
    frames = []
    for _site, path in find_site_databases(data_dir).items():
        frames.append(pd.DataFrame(read_site_table(path, site_columns(path))))
    return pd.concat(frames, ignore_index=True)


def _check_crosstab(summary, pooled):
    from scipy import stats

    ct = summary["crosstab"]
    ref = pd.crosstab(pooled["horTh"], pooled["menostat"]).to_numpy()
    assert ct["table"] == ref.tolist()
    chi2, p, _, _ = stats.chi2_contingency(ref)
    assert ct["chi2"] == pytest.approx(chi2, rel=REL) and ct["p"] == pytest.approx(p, rel=REL)
    assert ct["fisher_p"] == pytest.approx(stats.fisher_exact(ref)[1], rel=REL)


def _check_ttest(summary, pooled):
    from scipy import stats

    tt = summary["ttest"]
    a, b = (pooled.loc[pooled["horTh"] == v, "age"] for v in ("no", "yes"))
    for key, equal in (("student", True), ("welch", False)):
        ref = stats.ttest_ind(a, b, equal_var=equal)
        assert tt[key]["t"] == pytest.approx(ref.statistic, rel=REL)
        assert tt[key]["p"] == pytest.approx(ref.pvalue, rel=REL)
    assert tt["groups"]["yes"]["sd"] == pytest.approx(b.std(), rel=REL)


def _check_correlation(summary, pooled):
    names = ["age", "tsize", "pnodes", "progrec"]
    corr = summary["correlation"]
    assert np.allclose(np.array(corr["matrix"], dtype=float), pooled[names].corr().to_numpy(), rtol=REL, atol=1e-7)
    assert np.allclose(np.array(corr["covariance"], dtype=float), pooled[names].cov().to_numpy(), rtol=REL)
    assert corr["n"][0][1] == len(pooled)


def _check_cif(summary, pooled):
    from lifelines.statistics import multivariate_logrank_test

    from clinfed.analytics.km import bin_index

    tests = summary["cif"]["tests"]
    t = bin_index(pooled["time"].to_numpy(), 365) * 365.0
    dead = pooled["event"] > 0
    for cause, mask in (("Circulatory", dead & (pooled["chapter"] == "Circulatory")),):
        ref = multivariate_logrank_test(t, pooled["sex"], mask.astype(int))
        assert tests[cause]["chi2"] == pytest.approx(ref.test_statistic, rel=REL)
    last = summary["cif"]["groups"]["F"]["cif"]["Circulatory"][-1]
    assert 0.05 < last < 0.2


CASES = {
    "crosstab": ("gbsg2", {"rows": "horTh", "cols": "menostat"}, _check_crosstab),
    "ttest": ("gbsg2", {"variable": "age", "group": "horTh"}, _check_ttest),
    "correlation": ("gbsg2", {"variables": "age,tsize,pnodes,progrec"}, _check_correlation),
    "cumulative_incidence": (
        "flchain",
        {"group": "sex", "cause": "chapter:Circulatory,Neoplasms", "time_bin": 365},
        _check_cif,
    ),
}


@pytest.mark.parametrize("job", list(CASES))
def test_toolbox_job_encrypted_equals_pooled_reference(job, tmp_path):
    dataset, options, check = CASES[job]
    data = tmp_path / dataset
    split_dataset(dataset, 3, data, seed=1)
    start = time.monotonic()
    summary = run_simulation(
        SimulationRequest(
            job=job, sites=3, out=tmp_path / job, data_dir=str(data), extra={"data_dir": str(data), **options}
        )
    )
    seconds = time.monotonic() - start
    assert summary["encrypted"] is True and summary["final"]["status"] == "released", summary["final"]
    assert summary["provenance"][summary["method"]]["sites"] == ["site-1", "site-2", "site-3"]
    check(summary, _pooled(data))
    print(f"{job}: {seconds:.1f} s on 3 sites")
