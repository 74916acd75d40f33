"""Attack (issue 23, item 1): averaging away output DP by asking for the same release again.

`SumsExecutor` drew fresh Gaussian noise each time the server sent `clinical_step` with the same sum
(to the release site, or to any other site: they all hold the key), but every site had charged its
ledger once: N answers averaged shrink the noise by √N, so the ε every ledger recorded was a fiction.
Fixed: a charged sum is released once. The same sum sent again to the release site returns the
identical release (nothing new is drawn); another sum for a round already stepped is refused; a site
other than the job's release site refuses to step at all; the release is bound to the run and round.
"""

from __future__ import annotations

import numpy as np

from clinfed.analytics.methods import KaplanMeier, dp_config

from .sitekit import SumsFederation

KM = {"method": "km", "group": None, "levels": None, "time_bin": 90.0, "n_bins": 4}


def _federation(tmp_path) -> SumsFederation:
    rng = np.random.default_rng(2)
    tables = {
        f"site-{i}": {"time": rng.uniform(1, 360, 40).round(), "event": (rng.random(40) < 0.6).astype(float)}
        for i in (1, 2, 3)
    }
    dp = dp_config("survival_km", KaplanMeier.dp_sensitivity, 1.0, 1e-5)
    return SumsFederation(tmp_path, {**KM, "dp": dp}, tables, epsilon_budget=10.0)


def test_the_same_charged_sum_is_released_once(tmp_path):
    fed = _federation(tmp_path)
    names = sorted(fed.sites)
    agg = fed.add(fed.sums("counts", 0, names), "counts")
    replies = [fed.step("site-1", "counts", 0, agg, names) for _ in range(6)]
    replies += [fed.step(s, "counts", 0, agg, names) for s in ("site-2", "site-3")]
    released = {r.meta["release_json"] for r in replies if r.meta.get("status") == "ok"}
    assert len(released) == 1, f"{len(released)} differently-noised releases of one charged sum (ε charged once)"
    for site in ("site-2", "site-3"):
        reply = replies[6 + ("site-2", "site-3").index(site)]
        assert reply.meta["status"] == "refused" and "release site" in reply.meta["reason"]


def test_another_sum_for_a_released_run_is_refused(tmp_path):
    fed = _federation(tmp_path)
    names = sorted(fed.sites)
    agg = fed.add(fed.sums("counts", 0, names), "counts")
    assert fed.step("site-1", "counts", 0, agg, names).meta["status"] == "ok"
    # the server asks for the same counts again (new ciphertexts, same sum): a fresh draw, were it answered.
    # Under secure aggregation the sites do not upload again for a round they already unmasked.
    answers = fed.sums("counts", 0, names)
    assert all(a.meta["status"] == "refused" for a in answers.values()), "a second upload of an unmasked round"
    assert all("already unmasked" in a.meta["reason"] for a in answers.values())
    # and a step on another round after the release is refused by the release site itself
    reply = fed.step("site-1", "counts", 1, agg, names)
    assert reply.meta["status"] == "refused", "a second noisy release of the run's counts"
    assert "already" in reply.meta["reason"]
