"""Attack (issue 23, item 2): the job set the smallest cell, and the site owned no other floor.

`SumsExecutor._min_cell` took the job's value and the site template had none, so a lead's
`min_cell: 1` released every KM bin, GLM level and cohort cell unsuppressed. Fixed: the site policy
owns `min_cell` (default 5): a job may only raise it. Likewise the site owns
`max_params_per_observation` (DataSHIELD's nfilter.glm, 0.33) for regressions and `min_sites` (≥ 3)
for every clinical method: no job setting goes below them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinfed.errors import SiteRefusal
from clinfed.fl.participant import SitePolicy, write_site_policy

from .sitekit import SumsFederation

KM = {"method": "km", "group": None, "levels": None, "time_bin": 30.0, "n_bins": 12}


def _km_tables(seed: int = 5) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    return {
        f"site-{i}": {"time": rng.uniform(1, 360, 14).round(), "event": (rng.random(14) < 0.6).astype(float)}
        for i in (1, 2, 3)
    }


def test_a_job_min_cell_of_1_does_not_release_cells_under_the_sites_floor(tmp_path):
    fed = SumsFederation(tmp_path, KM, _km_tables(), min_cell=1)  # the job asks for 1; policies say nothing
    names = sorted(fed.sites)
    answers = fed.sums("counts", 0, names, min_cell=1)
    reply = fed.step("site-1", "counts", 0, fed.add(answers, "counts"), names, min_cell=1)
    assert reply.meta["status"] == "ok", reply.meta.get("reason")
    block = json.loads(reply.meta["release_json"])["km"]
    cells = [c for g in block["groups"].values() for k in ("events", "censored") for c in g[k]]
    small = [c for c in cells if 0 < c < 5]
    assert not small, f"released cells {small} under the site's default floor of 5 (the job said 1)"


def test_the_policy_owns_the_floors_and_refuses_weaker_ones(tmp_path):
    write_site_policy(tmp_path / "site-1", min_cell=8, max_params_per_observation=0.2, min_sites=4)
    policy = SitePolicy.load(tmp_path / "site-1")
    assert (policy.min_cell, policy.max_params_per_observation, policy.min_sites) == (8, 0.2, 4)
    defaults = SitePolicy()
    assert (defaults.min_cell, defaults.max_params_per_observation, defaults.min_sites) == (5, 0.33, 3)
    for key, bad in (("min_cell", 0), ("min_sites", 2), ("max_params_per_observation", 0.0)):
        write_site_policy(tmp_path / f"bad-{key}", **{key: bad})
        with pytest.raises(SiteRefusal, match=key):
            SitePolicy.load(tmp_path / f"bad-{key}")


def test_a_glm_past_the_sites_parameters_per_observation_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    tables = {
        f"site-{i}": {"y": rng.normal(size=20), "a": rng.normal(size=20), "b": rng.normal(size=20)} for i in (1, 2, 3)
    }
    glm = {"method": "glm", "family": "gaussian", "outcome": "y", "covariates": ["a", "b"], "offset": None}
    SumsFederation(tmp_path / "lax", glm, tables)  # 3 parameters on 20 rows: within DataSHIELD's 0.33
    with pytest.raises(SiteRefusal, match="parameters"):
        SumsFederation(tmp_path / "strict", glm, tables, max_params_per_observation=0.1)


def test_a_site_whose_policy_wants_more_sites_refuses_a_three_site_sum(tmp_path):
    fed = SumsFederation(tmp_path, KM, _km_tables(), min_sites=4)
    answers = fed.sums("counts", 0, sorted(fed.sites))
    statuses = {s: a.meta["status"] for s, a in answers.items()}
    assert set(statuses.values()) == {"refused"}, f"sites sent their counts into a 3-site sum: {statuses}"
    assert "min_sites" in answers["site-1"].meta["reason"]
