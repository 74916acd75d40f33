"""Secure aggregation's parts, alone: the masks (uniform mod q, cancelling exactly), the protocol's
stages on real kits and keys, and the dropout path: 5 sites, one dies before uploading and one after
its masked upload, and the round still ends with the survivors' exact FedAvg."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.deploy.simkit import ensure_sim_kits
from clinfed.fl.secagg import SecAggError, complete_round, load_site, sum_info
from clinfed.he import create_context_pair
from clinfed.he.compact import CompactSpec, CompactSum, compact_decrypt_sum, compact_encrypt, compact_unmasked
from clinfed.he.masking import Mask, MaskedStream, Ring, prg, ring_of
from clinfed.he.packing import layout_of

Q = 1152921504606830593  # the federation's 60-bit data prime (N = 4096)


def test_the_prg_is_uniform_mod_q_and_ranges_are_consistent():
    ring = Ring(4096, (Q,))
    seed = bytes(range(32))
    block = prg(seed, ring, 0, 8)
    assert block.shape == (8, 1, 4096) and int(block.max()) < Q
    # each ciphertext's mask is the same whether generated alone or in a range
    np.testing.assert_array_equal(prg(seed, ring, 5, 1)[0], block[5])
    # top byte of a uniform residue mod q ~ uniform: chi-square over 256 bins of 32k samples
    top = (block.reshape(-1) >> np.uint64(52)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 350  # 255 degrees of freedom: p ≈ 1e-4 at 350


def test_a_prime_far_below_its_power_of_two_is_refused():
    with pytest.raises(ValueError, match="too far below"):
        Ring(16, ((1 << 59) + 1,))


def test_pairwise_masks_cancel_exactly():
    ring = Ring(64, (Q,))
    a, b, c = (bytes([i]) * 32 for i in (1, 2, 3))
    total = ring.zeros(2)
    from clinfed.he.masking import add_mod

    for mask in (Mask(ring, (a, b)), Mask(ring, (c,), (a,)), Mask(ring, (), (b, c))):
        add_mod(total, mask.words(0, 2), ring)
    assert not total.any()


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    sites = [f"site-{i}" for i in range(1, 6)]
    ensure_sim_kits(root, sites)
    secret, public = create_context_pair()
    return root, sites, secret, public


def _join(fed, run="r1"):
    root, sites, _, _ = fed
    parties = {s: load_site(root / s, s, run, persist=False) for s in sites}
    roster = {s: p.hello() for s, p in parties.items()}
    for p in parties.values():
        p.join(roster)
    return parties


def test_five_sites_one_dies_before_uploading_one_after_masking_the_survivors_fedavg_is_exact(fed):
    _, sites, secret, public = fed
    parties = _join(fed)
    ring = ring_of(secret)
    spec = CompactSpec(4.0, 5, pooled=True)
    rng = np.random.default_rng(11)
    updates = {s: {"w": rng.normal(0, 0.7, 5000).astype(np.float32)} for s in sites}
    share = 0.2

    def upload(site: str, members: list[str]) -> list[bytes]:
        mask = MaskedStream(parties[site].mask(0, "train", members, ring))
        return list(compact_encrypt(secret, updates[site], share, spec, mask=mask)[0])

    def add(uploads: dict[str, list[bytes]]):
        acc = CompactSum(public, spec)
        for site, cts in uploads.items():
            acc.add(site, cts, share, acc.fingerprint)
        return acc

    # site-4 dies before uploading; site-5 uploads for all five, then dies before the re-run
    first = {s: upload(s, sites) for s in sites if s != "site-4"}
    asked: list[list[str]] = []

    def rerun(members: list[str]):
        asked.append(members)
        alive = [s for s in members if s != "site-5"]
        return add({s: upload(s, members) for s in alive}), alive

    def reveal(members: list[str]) -> dict[str, dict]:
        return {s: parties[s].reveal(0, "train", members) for s in members}

    done = complete_round(sites, add(first), sorted(first), 3, rerun, reveal)
    survivors = ["site-1", "site-2", "site-3"]
    assert done.reason == "" and done.members == survivors
    assert asked == [["site-1", "site-2", "site-3", "site-5"], survivors]
    cts, _, _ = done.acc.result()
    correction = MaskedStream(parties["site-2"].correction(sum_info(0, "train", survivors, done.reveals), ring))
    arrays, count = compact_decrypt_sum(
        secret, compact_unmasked(secret, cts, correction), layout_of(updates["site-1"]), spec
    )
    want = sum(share * updates[s]["w"].astype(np.float64) for s in survivors)
    assert count == 3
    np.testing.assert_allclose(arrays["w"], want, atol=spec.sum_error_bound(3))


def test_a_round_without_a_majority_of_survivors_stays_masked(fed):
    _, sites, _, _ = fed

    def never(_members):
        raise AssertionError("no re-run without a majority")

    done = complete_round(sites, object(), ["site-1", "site-2"], 3, never, never)
    assert done.members == [] and "too few to re-run" in done.reason


def test_a_member_that_does_not_reveal_leaves_the_sum_withheld(fed):
    _, sites, _, _ = fed
    done = complete_round(sites[:3], object(), sites[:3], 3, None, lambda m: {s: {} for s in m[:2]})
    assert done.members == [] and "site-3 did not reveal" in done.reason


def test_a_sum_without_reveals_and_a_site_without_a_kit_are_refused(fed, tmp_path):
    parties = _join(fed, "r2")
    ring = ring_of(fed[2])
    with pytest.raises(SecAggError, match="without its members' reveals"):
        parties["site-1"].correction({"round": 0, "purpose": "train", "members": []}, ring)
    with pytest.raises(SecAggError, match=r"site-9: no .*startup/client.key: secure aggregation signs"):
        load_site(tmp_path / "site-9", "site-9", "r2")


def test_a_site_whose_policy_asks_more_sites_refuses_a_smaller_sum(fed):
    """The site's own `min_sites` (issue 23, item 2) holds for training and every clinical sum alike:
    its upload enters no member set smaller than that, whatever the job or the server says."""
    root, sites, secret, _ = fed
    strict = load_site(root / "site-1", "site-1", "r3", min_members=4, persist=False)
    others = {s: load_site(root / s, s, "r3", persist=False) for s in sites[1:]}
    roster = {"site-1": strict.hello(), **{s: p.hello() for s, p in others.items()}}
    strict.join(roster)
    with pytest.raises(SecAggError, match=r"site-1: the member set of round 0 has 3 member\(s\), fewer than 4"):
        strict.mask(0, "train", sites[:3], ring_of(secret))
    strict.mask(0, "train", sites[:4], ring_of(secret))


# --- a site's state outlives its executor (FLARE re-creates executors; a site process may restart) ------
def _restarted(fed, site: str, run: str):
    root = fed[0]
    return load_site(root / site, site, run)


def test_a_recreated_site_keeps_its_key_roster_and_upload_chain(fed):
    """FLARE's simulator re-creates a site's executor whenever more sites than it runs at once take
    turns (the > 8-site failure: 'the roster carries a key for this site that it never made')."""
    root, sites, secret, _ = fed
    run = "persist-1"
    parties = {s: load_site(root / s, s, run) for s in sites}
    roster = {s: p.hello() for s, p in parties.items()}
    for p in parties.values():
        p.join(roster)
    ring = ring_of(secret)
    parties["site-1"].mask(0, "train", sites, ring)
    again = _restarted(fed, "site-1", run)
    assert again.hello()["pub"] == roster["site-1"]["pub"]
    again.join(roster)  # its own key, and the pinned peers, are recognised
    # the upload chain survived: a re-run must still drop sites from the last set
    with pytest.raises(SecAggError, match="must drop sites"):
        again.mask(0, "train", sites, ring)
    # and the pair secrets are the ones agreed before the restart: the survivors' re-run cancels
    from clinfed.he.masking import add_mod

    survivors = sites[:4]
    for s in survivors[1:]:
        parties[s].mask(0, "train", sites, ring)  # their first upload, for all five
    masks = [again.mask(0, "train", survivors, ring)]
    masks += [parties[s].mask(0, "train", survivors, ring) for s in survivors[1:]]
    seeds = [again.reveal(0, "train", survivors)] + [parties[s].reveal(0, "train", survivors) for s in survivors[1:]]
    total = ring.zeros(1)
    for mask in [*masks, Mask(ring, (), tuple(bytes.fromhex(r["seed"]) for r in seeds))]:
        add_mod(total, mask.words(0, 1), ring)
    assert not total.any()
    path = again.state_file
    assert path.parent == root / "site-1" / "local" / "secagg" and (path.stat().st_mode & 0o777) == 0o600


def test_a_restart_does_not_let_the_server_get_a_second_upload_after_a_reveal(fed):
    """Attack: after a site revealed its self-mask seed for round 0, the server has it restarted (or
    its executor re-created) and asks again for round 0. Before the state was kept on disk the new
    executor had forgotten the reveal and would have uploaded a second, differencable sum."""
    root, sites, secret, _ = fed
    run = "persist-2"
    parties = {s: load_site(root / s, s, run) for s in sites[:3]}
    roster = {s: p.hello() for s, p in parties.items()}
    for p in parties.values():
        p.join(roster)
    ring = ring_of(secret)
    parties["site-2"].mask(0, "train", sites[:3], ring)
    parties["site-2"].reveal(0, "train", sites[:3])
    again = _restarted(fed, "site-2", run)
    again.join(roster)
    with pytest.raises(SecAggError, match="already unmasked"):
        again.mask(0, "train", sites[:3], ring)
    # a substituted key is still refused by name after the restart (the roster stayed pinned)
    intruder = load_site(root / "site-3", "site-3", run, persist=False)
    with pytest.raises(SecAggError, match="another key for site-3"):
        again.join({**roster, "site-3": intruder.hello()})


def test_a_state_file_of_another_run_or_site_or_garbled_is_refused_in_one_line(fed):
    root = fed[0]
    party = load_site(root / "site-4", "site-4", "persist-3")
    other = load_site(root / "site-5", "site-5", "persist-3").state_file
    party.state_file.write_bytes(other.read_bytes())  # site-5's state copied over site-4's
    with pytest.raises(SecAggError, match=r"site-4: its secure-aggregation state .* belongs to 'site-5'"):
        _restarted(fed, "site-4", "persist-3")
    party.state_file.write_text("{not json")
    with pytest.raises(SecAggError, match="cannot be read"):
        _restarted(fed, "site-4", "persist-3")


def test_old_runs_state_files_are_pruned(fed):
    import os
    import time

    root = fed[0]
    stale = load_site(root / "site-5", "site-5", "persist-old").state_file
    histogram = stale.with_name(stale.name.split(".")[0] + ".roc.npy")  # kept beside it (fl.roc_validation)
    histogram.write_bytes(b"counts")
    old = time.time() - 8 * 24 * 3600
    for path in (stale, histogram):
        os.utime(path, (old, old))
    fresh = load_site(root / "site-5", "site-5", "persist-new").state_file
    fresh.with_name(fresh.name.split(".")[0] + ".roc.npy").write_bytes(b"counts")
    again = load_site(root / "site-5", "site-5", "persist-new").state_file
    assert again == fresh and fresh.is_file() and fresh.with_name(fresh.name.split(".")[0] + ".roc.npy").is_file()
    assert not stale.exists() and not histogram.exists()
