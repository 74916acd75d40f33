"""Attack (issue 12, item 6, statistics side): two contributors expose each other.

A cohort_stats release pooled over two sites is, to each of them, the other site's statistics: a
site subtracts its own counts, sums and histograms from the released (or decrypted) totals and reads
the other's, small cells included. Old code runs a 2-site job, and a 3-site job in which one site
fails releases the remaining two sites' pooled statistics (min_sites 2).

Fixed code: an aggregate of fewer than three sites is never released, whatever the job says; the
number of sites comes from the sum itself (every site packs a 1 in a contributor slot), not from
the server's word; a job for two sites is refused before it starts.
"""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.analytics import stats
from clinfed.data import breast_cancer as bc
from clinfed.fl.participant import write_site_policy
from clinfed.simulate import SimulationRequest, run_simulation


def _masks(y: np.ndarray) -> dict:
    return {stats.ALL: np.ones(len(y), bool), "malignant": y == 1, "benign": y == 0}


def test_a_two_site_sum_is_not_released():
    """What the release site does with the decrypted sums of two sites: it must not release them."""
    table = bc.load_bundled()
    spec = stats.StatsSpec(tuple(table.features), tuple(stats.reference_bounds(table.x)))
    parts = [np.arange(0, 300), np.arange(300, 569)]
    sums = stats.unpack_sums(sum(stats.local_sums(table.x[p], _masks(table.y[p]), spec) for p in parts), spec)
    devs = sum(stats.local_deviations(table.x[p], _masks(table.y[p]), sums.means(), spec) for p in parts)
    try:
        released = stats.release(sums, stats.unpack_deviations(devs, spec), spec, min_cell=10)
    except ValueError as exc:
        assert "at least 3" in str(exc) and "\n" not in str(exc)
        return
    site1 = stats.pooled_reference(table.x[parts[0]], _masks(table.y[parts[0]]), spec)
    site2 = released["statistics"]["all"]["mean radius"]["count"] - site1["all"]["mean radius"]["count"]
    pytest.fail(f"a two-site release let site-1 read site-2's row count ({site2}) and every other statistic")


def test_a_two_site_cohort_stats_job_releases_nothing(tmp_path):
    try:
        summary = run_simulation(SimulationRequest(job="cohort_stats", sites=2, out=tmp_path / "out"))
    except (ValueError, SystemExit) as exc:
        text = str(exc)
        assert "3" in text and "\n" not in text, text
        return
    assert summary["final"]["status"] != "released" and not summary["statistics"], (
        "two sites' pooled statistics released"
    )


def _write_csv_without(folder, table, rows, drop):
    folder.mkdir(parents=True, exist_ok=True)
    cols = [f for f in table.features if f != drop]
    lines = [",".join([*cols, "target"])]
    for r in rows:
        values = [repr(float(v)) for f, v in zip(table.features, table.x[r], strict=True) if f != drop]
        lines.append(",".join([*values, str(int(table.y[r]))]))
    (folder / "data.csv").write_text("\n".join(lines) + "\n")


def test_a_three_site_job_where_one_site_fails_releases_nothing(tmp_path):
    table = bc.load_bundled()
    ws = tmp_path / "ws"
    _write_csv_without(tmp_path / "site3", table, range(60), drop="mean radius")  # fails: lacks a column
    write_site_policy(ws / "site-3", data_dir=str(tmp_path / "site3"))
    summary = run_simulation(SimulationRequest(job="cohort_stats", sites=3, out=tmp_path / "out", workspace=ws))
    assert summary["admission"]["site-3"]["status"] == "failed"  # its rows are read when it admits the job
    assert summary["final"]["status"] != "released", "the two remaining sites' pooled statistics were released"
    assert not summary["statistics"]
    assert "3" in summary["final"]["reason"]


def test_a_site_refuses_a_two_site_sum_the_server_says_holds_three(tmp_path):
    """The server adds site-1's pass-1 vector to one other site's and tells site-1, the release site,
    that three sites took part. Decrypting it hands site-1 the pooled sums of two sites, i.e. the other
    site's. The count must come from the sum itself, not from the server's list."""
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.signal import Signal
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from clinfed.analytics.registry import make_method
    from clinfed.analytics.sums_fl import PURPOSE, STEP_TASK, SumsExecutor
    from clinfed.audit import AuditLog
    from clinfed.deploy.simkit import ensure_sim_kits
    from clinfed.fl import payload
    from clinfed.fl.participant import SitePolicy
    from clinfed.fl.secagg import SECAGG_KEY, SUM_KEY, load_site, sum_info
    from clinfed.he.aggregation import EncryptedSum
    from clinfed.he.ckks import encrypt_vector
    from clinfed.he.context import context_fingerprint, create_context_pair
    from clinfed.he.masking import MaskedStream, ring_of

    table = bc.load_bundled()
    spec = stats.StatsSpec(tuple(table.features), tuple(stats.reference_bounds(table.x)))
    method = {"method": "cohort", "spec": spec.to_dict(), "group_values": {"malignant": 1, "benign": 0}}
    method["group_column"] = "target"
    ex = SumsExecutor(method=method, num_sites=3, job_label="cohort_stats")
    secret, public = create_context_pair()
    ex.site, ex.root, ex.run_id = "site-1", tmp_path / "site-1", "job-1"
    ex.policy, ex.audit, ex._m = SitePolicy(), AuditLog(ex.root, ex.site), make_method(method)
    ex._ctx, ex._fingerprint, ex._ready = secret, context_fingerprint(secret), True
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=True)

    # secure aggregation (issue 22): all three sites upload masked vectors and reveal; the server adds
    # only site-1's and site-2's and claims three
    sites = ["site-1", "site-2", "site-3"]
    ensure_sim_kits(tmp_path / "kits", sites)
    parties = {s: load_site(tmp_path / "kits" / s, s, "job-1") for s in sites}
    roster = {s: p.hello() for s, p in parties.items()}
    for p in parties.values():
        p.join(roster)
    ex._secagg = parties["site-1"]
    rows = {"site-1": np.arange(200, 400), "site-2": np.arange(100), "site-3": np.arange(400, 500)}
    acc = EncryptedSum(public)
    for site in ("site-1", "site-2"):
        vec = np.append(stats.local_sums(table.x[rows[site]], _masks(table.y[rows[site]]), spec), 1.0)
        mask = MaskedStream(parties[site].mask(0, PURPOSE, sites, ring_of(secret)))
        acc.add(site, encrypt_vector(secret, vec, mask=mask), 1.0, acc.fingerprint)
    parties["site-3"].mask(0, PURPOSE, sites, ring_of(secret))  # site-3 uploaded too: left out of the sum
    reveals = {s: parties[s].reveal(0, PURPOSE, sites) for s in sites}
    params = payload.encrypted_params(list(acc.result()[0]), "", ex._fingerprint)
    meta = {"settings": ex._m.digest(), "phase": "sums", "round": 0, "sites": sites}
    meta |= {SECAGG_KEY: {"roster": roster, "members": sites}, SUM_KEY: sum_info(0, PURPOSE, sites, reveals)}
    request = FLModelUtils.to_shareable(FLModel(params=params, meta={**meta, "min_cell": 10}))
    reply = FLModelUtils.from_shareable(ex.execute(STEP_TASK, request, fl_ctx, Signal()))
    assert reply.meta["status"] == "refused", "site-1 worked on (decrypted) a sum of two sites"
    assert reply.meta["reason"].startswith("site-1: ") and "not a whole number of sites" in reply.meta["reason"]
