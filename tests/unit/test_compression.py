"""Top-F compressed updates under CKKS: the server adds k values per site, the sites get the sum back.

Issue 15's tests: the decrypted sum of compressed updates equals the plaintext sum of the same sparse
updates; error feedback keeps what was not sent; the bytes are ≤ 2 % of the dense encrypted update.
"""

import numpy as np
import pytest

from clinfed.fl.compression import LAYER, CompressedSite, ErrorFeedback, scatter, shared_indices
from clinfed.he.aggregation import EncryptedSum, decrypt_sum, weighted_encrypt
from clinfed.he.ckks import decrypt_vector, slot_count
from clinfed.he.context import HEContextError, context_fingerprint, create_context_pair, site_secret

P = 200_000  # at 1 %, 2,000 values + the count fill one 2,048-slot ciphertext


@pytest.fixture(scope="module")
def keys():
    secret, public = create_context_pair()
    return secret, public


def test_every_site_picks_the_same_coordinates_and_they_follow_the_global_update():
    prev = np.zeros(P)
    prev[[5, 17, 40_000]] = [3.0, -9.0, 1.0]
    a = shared_indices("run-a", 2, P, 0.01, prev)
    b = shared_indices("run-a", 2, P, 0.01, prev.copy())
    assert np.array_equal(a, b) and len(a) == 2000 and np.all(np.diff(a) > 0)
    assert {5, 17, 40_000} <= set(a.tolist())  # the global update's largest coordinates are in
    assert not np.array_equal(a, shared_indices("run-a", 3, P, 0.01, prev))  # the random half moves on
    assert not np.array_equal(shared_indices("run-a", 0, P, 0.01), shared_indices("run-b", 0, P, 0.01))
    with pytest.raises(ValueError, match="fraction"):
        shared_indices("run-a", 0, P, 0.0)


def test_error_feedback_keeps_what_was_not_sent():
    rng = np.random.default_rng(0)
    fb = ErrorFeedback(P)
    total_in, total_out = np.zeros(P), np.zeros(P)
    for rnd in range(5):
        update = rng.normal(0, 1e-3, P)
        idx = shared_indices("run", rnd, P, 0.01)
        total_in += update
        total_out += scatter(fb.compress(update, idx), idx, P)
    # nothing lost: what was sent plus what is held back is exactly what came in
    assert np.allclose(total_out + fb.residual, total_in, atol=1e-15)
    assert fb.held_back > 0


def test_decrypted_sum_of_compressed_updates_equals_the_plaintext_sum_and_costs_under_2_percent(keys):
    secret, public = keys
    fingerprint = context_fingerprint(public)
    rng = np.random.default_rng(1)
    idx = shared_indices("run", 0, P, 0.01)
    acc = EncryptedSum(public, fingerprint, size=len(idx) + 1)
    sparse_sum = np.zeros(P)
    dense_bytes = compressed_bytes = 0
    for site in ("site-1", "site-2", "site-3"):
        update = rng.normal(0, 1e-2, P)
        sent = ErrorFeedback(P).compress(update, idx)
        sparse_sum += scatter(sent, idx, P)
        cts, layout = weighted_encrypt(secret, {"update": sent}, 1.0, sites=3)
        acc.add(site, cts, 1.0, fingerprint)
        compressed_bytes += sum(len(c) for c in cts)
        dense_bytes += sum(len(c) for c in weighted_encrypt(secret, {"update": update}, 1.0, sites=3)[0])
    total, _, _ = acc.result()
    sums, count = decrypt_sum(secret, total, layout)
    assert count == 3
    assert np.allclose(scatter(sums["update"], idx, P), sparse_sum, atol=1e-5)
    assert compressed_bytes <= 0.02 * dense_bytes, (compressed_bytes, dense_bytes)


SITES = ("site-1", "site-2", "site-3")


def _federation(secret, size: int, fraction: float = 0.01) -> dict[str, CompressedSite]:
    key = site_secret(secret, "compression|run").hex()
    sites = {s: CompressedSite(key, fraction, s, slots=slot_count(secret)) for s in SITES}
    for site in sites.values():
        site.start(np.zeros(size))
    return sites


def test_three_sites_rebuild_the_same_global_model_from_the_encrypted_sum(keys):
    """Every site ends a round with the same model: start + Σ w·(sparse update) / Σ w at the shared
    coordinates (to the 2^-20 flood), and ranks the same coordinates for the next round."""
    secret, public = keys
    size, rng = 30_000, np.random.default_rng(3)
    sites = _federation(secret, size)
    assert sites["site-1"].k == slot_count(secret) - 1  # ⌈0.01·30,000⌉ = 300 filled up to one ciphertext
    weights = {"site-1": 0.5, "site-2": 1.0, "site-3": 0.25}
    for rnd in range(2):
        base = sites["site-1"].base.copy()
        locals_ = {s: base + rng.normal(0, 1e-2, size) for s in SITES}
        idx = sites["site-1"].indices(rnd)
        assert all(np.array_equal(sites[s].indices(rnd), idx) for s in SITES)  # the same coordinates everywhere
        expected = np.zeros(size)
        for s in SITES:
            expected[idx] += weights[s] * (locals_[s] - base + sites[s].feedback.residual)[idx]
        expected /= sum(weights.values())
        fingerprint = context_fingerprint(public)
        acc, digests = EncryptedSum(public, fingerprint, size=idx.size + 1), set()
        for s in SITES:
            values, digest = sites[s].encode(rnd, locals_[s])
            digests.add(digest)
            cts, layout = weighted_encrypt(secret, {LAYER: values}, weights[s], sites=3)
            acc.add(s, cts, weights[s], fingerprint)
        assert len(digests) == 1
        total_cts, total, _ = acc.result()
        sums, count = decrypt_sum(secret, total_cts, layout)
        exact = decrypt_vector(secret, total_cts, layout.size)[: idx.size]
        assert count == 3
        for s in SITES:
            sites[s].settle(rnd, list(SITES))
            sites[s].apply(rnd, rnd - 1, digests.copy().pop(), sums[LAYER] / total, exact)
            assert np.allclose(sites[s].base - base, expected, atol=1e-5)
        assert all(np.array_equal(sites[s].previous_update, sites["site-1"].previous_update) for s in SITES)


def test_what_a_dropped_site_sent_goes_back_into_its_error_feedback():
    site = CompressedSite("key", 0.1, "site-2")
    site.start(np.zeros(1_000))
    update = np.random.default_rng(4).normal(0, 1, 1_000)
    values, _ = site.encode(0, update)
    assert np.count_nonzero(site.feedback.residual) == 1_000 - values.size
    site.settle(0, ["site-1", "site-3", "site-4"])  # the sum of round 0 does not hold site-2's update
    assert np.allclose(site.feedback.residual, update)  # nothing lost: all of it waits for the next round
    site.encode(1, update)
    site.settle(-1, [])  # round 1 withheld (too few contributors): the server still holds no sum
    assert np.allclose(site.feedback.residual, 2 * update)


def test_a_site_that_missed_a_sum_or_disagrees_on_the_coordinates_refuses_to_apply_it():
    site = CompressedSite("key", 0.1, "site-1")
    site.start(np.zeros(100))
    with pytest.raises(ValueError, match="follows round 0, but this site's model is at round -1"):
        site.apply(1, 0, "digest", np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError, match="coordinates of round 0 are not this site's"):
        site.apply(0, -1, "another federation's digest", np.zeros(10), np.zeros(10))


def test_the_index_key_is_shared_by_the_sites_and_unknown_to_the_server(keys):
    secret, public = keys
    assert site_secret(secret, "compression|run") == site_secret(secret, "compression|run")
    assert site_secret(secret, "compression|run") != site_secret(secret, "compression|other-run")
    with pytest.raises(HEContextError, match="without the secret key"):
        site_secret(public, "compression|run")
