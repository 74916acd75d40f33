"""Top-F compressed updates under CKKS: the server adds k values per site, the sites get the sum back.

Issue 15's tests: the decrypted sum of compressed updates equals the plaintext sum of the same sparse
updates; error feedback keeps what was not sent; the bytes are ≤ 2 % of the dense encrypted update.
"""

import numpy as np
import pytest

from clinfed.fl.compression import ErrorFeedback, scatter, shared_indices
from clinfed.he.aggregation import EncryptedSum, decrypt_sum, weighted_encrypt
from clinfed.he.context import context_fingerprint, create_context_pair

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
