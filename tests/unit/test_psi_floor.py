"""psi_linkage's site floor (issue 23, item 2): a linkage of fewer than 3 sites (or fewer than the
site's own ``min_sites``) tells a site which of its patients one other site holds, so it is refused
by the recipe and, whatever the server says, no site keeps such an intersection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nvflare.apis.shareable import Shareable

from clinfed.analytics import psi
from clinfed.fl.participant import SIM_ROOT_ENV


def test_the_recipe_refuses_a_two_site_linkage():
    with pytest.raises(ValueError, match="at least 3 sites, got 2"):
        psi.LinkageRecipe(name="psi_linkage", num_sites=2)


def _report(tmp_path, monkeypatch, sites: list[str]) -> tuple[dict, object]:
    monkeypatch.setenv(SIM_ROOT_ENV, str(tmp_path))
    folder = psi.psi_folder(tmp_path / "site-1")
    pending = folder / "job-1.pending"
    pending.parent.mkdir(parents=True, exist_ok=True)
    pending.write_text("p-1\np-2\n")
    fl_ctx = SimpleNamespace(get_identity_name=lambda: "site-1", get_job_id=lambda: "job-1")
    task = Shareable()
    task[psi.COMMIT_KEY], task[psi.SITES_KEY] = True, sites
    reply = psi.PSIReportExecutor(num_sites=3).execute(psi.REPORT_TASK, task, fl_ctx, None)
    return reply["DXO"]["data"], folder


def test_a_site_keeps_no_intersection_of_a_two_site_linkage(tmp_path, monkeypatch):
    """Attack: the server runs the DH-PSI between site-1 and site-2 only and tells both to commit."""
    data, folder = _report(tmp_path, monkeypatch, ["site-1", "site-2"])
    assert data["status"] == "refused" and "fewer than this site's min_sites 3" in data["reason"]
    assert not list(folder.glob("*.pending")) and not (folder / psi.INTERSECTION_FILE).exists()


def test_a_three_site_linkage_is_kept(tmp_path, monkeypatch):
    data, folder = _report(tmp_path, monkeypatch, ["site-1", "site-2", "site-3"])
    assert data["status"] == "ok" and data["intersection_size"] == 2
    assert (folder / psi.INTERSECTION_FILE).read_text().split() == ["p-1", "p-2"]
