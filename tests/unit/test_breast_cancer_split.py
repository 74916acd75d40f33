"""Claims about the bundled breast-cancer split: non-IID, disjoint, complete, deterministic."""

import numpy as np
import pytest

from clinfed.data import breast_cancer as bc
from clinfed.tasks.base import SiteDataError
from clinfed.tasks.breast_cancer import BreastCancerTask


@pytest.mark.parametrize("sites", [2, 3, 5])
def test_split_is_a_partition_with_both_classes_everywhere(sites):
    y = bc.load_bundled().y
    parts = bc.dirichlet_split(y, sites)
    joined = np.concatenate(parts)
    assert len(joined) == len(y) == 569 and len(np.unique(joined)) == 569
    fractions = [y[p].mean() for p in parts]
    assert all(np.sum(y[p] == c) >= 12 for p in parts for c in (0, 1))
    assert max(fractions) - min(fractions) > 0.05  # label skew: sites really differ
    again = bc.dirichlet_split(y, sites)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_site_csv_missing_column_names_site_and_column(tmp_path):
    task = BreastCancerTask()
    (tmp_path / "data.csv").write_text("mean radius,target\n1.0,0\n")
    with pytest.raises(SiteDataError, match=r"site-4: .*lacks column 'mean texture'"):
        task.load_site_data("site-4", 3, 4, tmp_path)


def test_missing_data_folder_names_the_folder():
    with pytest.raises(SiteDataError, match="site-2: data folder /nonexistent/x does not exist"):
        BreastCancerTask().load_site_data("site-2", 1, 3, "/nonexistent/x")
