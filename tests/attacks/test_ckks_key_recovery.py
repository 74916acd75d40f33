"""Attack (issue 12, item 8): Li–Micciancio key recovery from full-precision CKKS decryptions.

A CKKS decryption is the message plus the scheme's error e, and e is a linear function of the secret
key. Whoever holds a ciphertext of a known message and learns its decryption at full precision reads e
exactly, slot by slot, and a handful of such leaks recovers the key. Here the attacker knows the exact
messages (the sites' updates it can guess or plant) and sees what a site decrypted; the released value
minus the message must not reproduce the decryption error.
"""

import numpy as np

from clinfed.he import EncryptedSum, context_fingerprint, create_context_pair, decrypt_average, weighted_encrypt
from clinfed.he.ckks import decrypt_vector


def test_released_decryptions_do_not_reveal_the_ckks_error():
    secret, public = create_context_pair()
    rng = np.random.default_rng(0)
    updates = [{"w": rng.normal(0, 0.3, 2000)} for _ in range(3)]
    weights = [0.3, 0.5, 0.2]
    acc = EncryptedSum(public, context_fingerprint(public))
    layout = None
    for i, (update, weight) in enumerate(zip(updates, weights, strict=True)):
        cts, layout = weighted_encrypt(secret, update, weight, sites=3)
        acc.add(f"site-{i + 1}", cts, weight, context_fingerprint(public))
    cts, total, _ = acc.result()
    exact = sum(u["w"] * w for u, w in zip(updates, weights, strict=True)) / total

    # the true CKKS error of this ciphertext (only the key holder can see it)
    start, stop = layout.offsets()["w"]
    raw = decrypt_vector(secret, cts, layout.size)[start:stop] / total
    true_error = raw - exact

    released = decrypt_average(secret, cts, total, layout)["w"].astype(np.float64)
    seen_error = released - exact  # what the attacker computes from a released value
    correlation = np.corrcoef(true_error, seen_error)[0, 1]
    assert abs(correlation) < 0.3, f"released values carry the CKKS error (correlation {correlation:.3f})"
    # and the release is still the model: within 1e-5 of the exact average
    assert np.max(np.abs(seen_error)) < 1e-5


def test_decrypting_twice_does_not_average_the_flood_away():
    secret, public = create_context_pair()
    acc = EncryptedSum(public, context_fingerprint(public))
    layout = None
    for i in range(3):
        cts, layout = weighted_encrypt(secret, {"w": np.full(100, 0.25)}, 1.0, sites=3)
        acc.add(f"site-{i + 1}", cts, 1.0, context_fingerprint(public))
    cts, total, _ = acc.result()
    first = decrypt_average(secret, cts, total, layout)["w"]
    second = decrypt_average(secret, cts, total, layout)["w"]
    assert not np.array_equal(first, second), "two decryptions of one ciphertext are identical: no fresh flood"


def test_a_compact_release_is_a_function_of_the_updates_alone_never_of_the_ckks_error():
    """The training jobs' compact format releases no flood, so its claim is stronger: what a site
    decrypts is exactly Σ round(share·x/δ), whatever noise the encryptions drew. Two federations of
    the same updates under fresh encryptions (new noise, new seeds) and a fresh key must release
    bit-identical models; were any CKKS error left in the release, they would differ."""
    from clinfed.he.compact import CompactSpec, CompactSum, compact_decrypt_average, compact_encrypt

    rng = np.random.default_rng(1)
    updates = [{"w": rng.normal(0, 0.3, 5000).astype(np.float32)} for _ in range(3)]
    shares = [0.3, 0.5, 0.2]
    spec = CompactSpec(4.0, 3, pooled=True)
    releases = []
    for _ in range(2):
        secret, public = create_context_pair()
        acc = CompactSum(public, spec)
        for i, (update, share) in enumerate(zip(updates, shares, strict=True)):
            cts, layout = compact_encrypt(secret, update, share, spec)
            acc.add(f"site-{i + 1}", cts, share, context_fingerprint(public), spec.to_json())
        cts, total, _ = acc.result()
        releases.append(compact_decrypt_average(secret, cts, total, layout, spec)["w"])
    np.testing.assert_array_equal(releases[0], releases[1])
    exact = sum(u["w"].astype(np.float64) * s for u, s in zip(updates, shares, strict=True))
    assert np.max(np.abs(releases[0] - exact)) <= spec.sum_error_bound(3) + 1e-7  # still the model
