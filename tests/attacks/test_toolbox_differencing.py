"""Attack: a crosstab over sites 1-3, then over sites 1-4, subtracted, gives site 4's own table, small cells and all.

Each release alone passes the small-cell rule (every pooled cell ≥ the minimum); their difference is
site 4's table, whose cell of 1 patient neither release shows. The release site's release log for
crosstab (`toolbox_methods._Logged`, `release_log-crosstab.json`) refuses the second release: it is
over another set of sites. Without the log (the step alone, as before it) both are released and the
attack reads the cell of one.
"""

import numpy as np
import pytest

from clinfed.analytics.methods import SiteInfo
from clinfed.analytics.registry import make_method
from clinfed.analytics.release_log import ReleaseRefused

CONFIG = {"method": "crosstab", "rows": "a", "cols": "b", "row_levels": ["x", "y"], "col_levels": ["u", "v"]}


def _table(cells):
    (xu, xv), (yu, yv) = cells
    a = ["x"] * (xu + xv) + ["y"] * (yu + yv)
    b = ["u"] * xu + ["v"] * xv + ["u"] * yu + ["v"] * yv
    return {"a": np.array(a, dtype=object), "b": np.array(b, dtype=object)}


SITES = {
    "site-1": [[10, 6], [7, 9]],
    "site-2": [[8, 5], [6, 11]],
    "site-3": [[9, 7], [5, 8]],
    "site-4": [[6, 1], [7, 6]],  # one patient with a = x, b = v: the cell the attack wants
}


def _release(method, names, min_cell=5):
    summed = sum(method.site_local(method.load(_table(SITES[s]), s, min_cell), "counts", None) for s in names)
    step = method.step(summed, "counts", min_cell)
    return step.result


def test_differencing_two_site_sets_reveals_a_small_cell_without_the_log():
    method = make_method(CONFIG)
    three = np.array(_release(method, ["site-1", "site-2", "site-3"])["table"])
    four = np.array(_release(method, ["site-1", "site-2", "site-3", "site-4"])["table"])
    assert (three >= 5).all() and (four >= 5).all()  # each release alone passes the small-cell rule
    assert (four - three)[0, 1] == 1  # ... their difference is site-4's cell of one patient


def test_release_log_refuses_the_second_site_set(tmp_path):
    site = SiteInfo("site-1", tmp_path, None, run_id="r1", job_label="crosstab")
    first, second = make_method(CONFIG), make_method(CONFIG)
    for m in (first, second):
        m._site, m._rows = site, 32
    names3 = ["site-1", "site-2", "site-3"]
    first.vet_release(None, _release(first, names3), names3)
    first.vet_release(None, _release(first, names3), names3)  # the same release again is admitted
    names4 = [*names3, "site-4"]
    with pytest.raises(ReleaseRefused, match="another cohort definition"):
        second.vet_release(None, _release(second, names4), names4)
    assert (tmp_path / "local" / "release_log-crosstab.json").exists()
    assert not (tmp_path / "local" / "release_log.json").exists()  # cohort_stats' own log untouched
