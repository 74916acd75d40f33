"""Attack: a malicious server wants one hospital's held-out score histogram out of the pooled ROC.

The ROC sum (`clinfed.fl.roc_validation`) goes through secure aggregation like every training upload:
a member set of fewer than 3 sites is refused at upload, and one site's upload presented as the sum,
with every member's genuine reveal, still carries its pairwise masks: it decrypts to noise, which the
release site refuses on its count slot before anything is derived from it. Real TenSEAL keys, real
FLARE kits and signatures; the server's side is written by the attacker."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.deploy.simkit import ensure_sim_kits
from clinfed.errors import SiteRefusal
from clinfed.fl import payload
from clinfed.fl.roc_validation import PURPOSE, STEP_KEY, RocParty, vector_size
from clinfed.fl.secagg import SECAGG_KEY, SUM_KEY, ServerRoster, load_site, sum_info
from clinfed.he.context import context_fingerprint, create_context_pair

SITES = ["site-1", "site-2", "site-3"]
RND = 5


@pytest.fixture()
def fed(tmp_path):
    ensure_sim_kits(tmp_path, SITES)
    secret, public = create_context_pair()
    fingerprint = context_fingerprint(public)
    roster, parties = ServerRoster(), {}
    rng = np.random.default_rng(0)
    for site in SITES:
        secagg = load_site(tmp_path / site, site, "run-roc", persist=False)
        roster.add(site, secagg.hello())
        party = RocParty(site, secret, fingerprint, secagg, min_cell=5)
        y = (rng.random(60) < 0.4).astype(int)
        party.keep((rng.random(60), y), "breast_cancer")
        parties[site] = party
    return secret, public, fingerprint, roster, parties


def _meta(roster: ServerRoster, step: str, members: list[str]) -> dict:
    return {STEP_KEY: step, SECAGG_KEY: roster.task(RND, PURPOSE, members)}


def test_a_member_set_of_fewer_than_three_sites_is_refused_at_upload(fed):
    _, _, _, roster, parties = fed
    for members in (["site-1"], ["site-1", "site-2"]):
        with pytest.raises(SiteRefusal, match="fewer than 3"):
            parties["site-1"].handle(_meta(roster, "upload", members), {})


def _honest_round(fed) -> tuple[dict, dict, dict]:
    """Every site uploads for the three and reveals: (uploads, the combine task's meta, the true sum's params)."""
    from clinfed.he.aggregation import EncryptedSum

    _, public, fingerprint, roster, parties = fed
    uploads = {s: p.handle(_meta(roster, "upload", SITES), {}).params for s, p in parties.items()}
    reveals = {s: p.handle(_meta(roster, "reveal", SITES), {}).meta["reveal"] for s, p in parties.items()}
    combine = {**_meta(roster, "combine", SITES), SUM_KEY: sum_info(RND, PURPOSE, SITES, reveals)}
    acc = EncryptedSum(public, fingerprint, size=vector_size())
    for site, params in uploads.items():
        acc.add(site, params[payload.CKKS_KEY], 1.0, fingerprint)
    cts, _, _ = acc.result()
    return uploads, combine, payload.encrypted_params(list(cts), uploads["site-1"][payload.LAYOUT_KEY], fingerprint)


def test_one_sites_upload_passed_off_as_the_sum_decrypts_to_noise_and_is_refused(fed):
    from clinfed.he.aggregation import EncryptedSum
    from clinfed.he.ckks import decrypt_vector, real_unmasked
    from clinfed.he.masking import MaskedStream, ring_of

    secret, public, fingerprint, _, parties = fed
    uploads, combine, summed = _honest_round(fed)
    alone = EncryptedSum(public, fingerprint, size=vector_size())  # a "sum" of the victim's upload alone
    alone.add("site-2", uploads["site-2"][payload.CKKS_KEY], 1.0, fingerprint)
    lone = payload.encrypted_params(list(alone.result()[0]), summed[payload.LAYOUT_KEY], fingerprint)
    with pytest.raises(SiteRefusal, match="count slot"):
        parties["site-1"].handle(combine, lone)
    # what the release site would have seen: noise, not site-2's histogram
    correction = MaskedStream(parties["site-3"].secagg.correction(combine[SUM_KEY], ring_of(secret), RND, PURPOSE))
    seen = decrypt_vector(secret, real_unmasked(secret, lone[payload.CKKS_KEY], correction), vector_size())
    assert np.abs(seen - parties["site-2"].vector).max() > 1e3
    # the genuine sum of the three is released, to the same site, from the same reveals
    released = parties["site-1"].handle(combine, summed).meta["roc"]
    want = sum(parties[s].vector for s in SITES)
    assert released["sites"] == SITES
    assert released["n"]["negative"] + released["n"]["positive"] == int(want[:2000].sum())


def test_a_site_whose_policy_asks_more_sites_releases_no_three_site_roc(fed):
    secret, _, fingerprint, _, parties = fed
    _, combine, summed = _honest_round(fed)
    strict = RocParty("site-1", secret, fingerprint, parties["site-1"].secagg, min_cell=5, min_sites=4)
    with pytest.raises(SiteRefusal, match="≥ 4 sites"):
        strict.handle(combine, summed)
