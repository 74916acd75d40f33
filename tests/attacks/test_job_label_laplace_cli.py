"""Attacks (issue 23, item 8): a job label that walks out of the site's folder, floating-point Laplace
noise, and a CLI option silently ignored.

* `job_label` (job config, untrusted) reached file names unchecked: ``../../x`` wrote the release
  site's plot, a training site's example figure and the server's checkpoint outside their folders.
  Fixed: a label that is not a plain name ([A-Za-z0-9_.-], not starting with a dot) is refused.
* cohort_stats' Laplace noise came from numpy's floating-point `rng.laplace`, whose low bits betray
  the value it was added to (Mironov 2012); fixed: OpenDP's Laplace sampler (exact sampling on a
  grid, its own CSPRNG): the caller's generator is not used at all.
* `--time-bin` with a site-stratified Cox (and any option the chosen job does not take) was silently
  ignored; fixed: refused in one line, exit 2, before anything runs.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest

from clinfed import cli
from clinfed.analytics import stats
from clinfed.analytics.registry import make_method
from clinfed.analytics.sums_fl import SumsExecutor, SumsRecipe
from clinfed.fl.checkpoint import checkpoint_path

KM = {"method": "km", "group": None, "levels": None, "time_bin": 30.0, "n_bins": 4}
BLOCK = {
    "time_bin": 30.0,
    "groups": {
        "all": {
            "time": [30.0, 60.0],
            "survival": [0.9, 0.8],
            "at_risk": [50, 40],
            "events": [5, 5],
            "censored": [5, 35],
            "median": None,
            "median_ci": [None, None],
        }
    },
    "logrank": None,
}


def test_a_job_label_cannot_name_a_file_outside_the_sites_folder(tmp_path):
    site = tmp_path / "sites" / "site-1"
    ex = SumsExecutor(method=KM, job_label="../../../escaped")
    ex.site, ex.root = "site-1", site
    ex._m = make_method(KM)
    with contextlib.suppress(Exception):  # refusing is the fix; what matters: nothing lands outside the site
        ex._save_plot(BLOCK)
    escaped = [p for p in tmp_path.rglob("*.png") if site not in p.parents]
    assert not escaped, f"the job label wrote {escaped[0]} outside {site}"
    with pytest.raises(ValueError, match="job label"):
        checkpoint_path(tmp_path / "server", "../../escaped", "abc")
    with pytest.raises(ValueError, match="job label"):
        SumsRecipe(name="../escaped", num_sites=3, method=KM)


def test_laplace_noise_is_not_numpys_floating_point_sampler():
    def forbidden(*_a, **_k):
        raise AssertionError("numpy's floating-point Laplace sampler was used (Mironov's attack applies)")

    rng = SimpleNamespace(laplace=forbidden, normal=forbidden, random=forbidden)
    noise = stats._draw(rng, "laplace", np.array([1.0, 2.0, 4.0]), (3,))
    assert noise.shape == (3,) and np.all(np.isfinite(noise))
    # the noise does not come from the caller's generator: the same seed gives other draws
    a = stats._draw(np.random.default_rng(7), "laplace", 5.0, (8,))
    b = stats._draw(np.random.default_rng(7), "laplace", 5.0, (8,))
    assert not np.array_equal(a, b)


def test_an_option_that_does_not_apply_exits_2_in_one_line(monkeypatch, capsys):
    import clinfed.simulate

    def ran(_req):
        raise AssertionError("the simulation ran with an option the job ignores")

    monkeypatch.setattr(clinfed.simulate, "run_simulation", ran)
    for argv, option in (
        (["simulate", "cox_ph", "--strata", "site", "--time-bin", "30"], "--time-bin"),
        (["simulate", "breast_cancer_dp", "--covariates", "age"], "--covariates"),
        (["simulate", "glm", "--group", "grade"], "--group"),
        (["simulate", "key_exchange", "--epsilon", "1"], "--epsilon"),
    ):
        assert cli.main(argv) == 2, f"{' '.join(argv)} was not refused"
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and option in err, err
