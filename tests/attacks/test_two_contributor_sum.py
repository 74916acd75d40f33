"""Attack (issue 12, item 6): with two contributors, each site reads the other's update.

Site A knows its own update; if it may decrypt a sum of A + B, it subtracts its own and holds B's
update in the clear. A sum must carry its true contributor count (the server cannot be trusted to
state it) and sites must refuse to decrypt one of fewer than three; a job of two sites is refused up
front.
"""

import numpy as np
import pytest

from clinfed.he import EncryptedSum, context_fingerprint, create_context_pair, decrypt_average, weighted_encrypt


def _update(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).normal(0, 0.3, 64).astype(np.float32)}


def _recovered_b(sites: dict[str, tuple[dict, float]]) -> np.ndarray | None:
    """Site A's attempt: decrypt the sum and subtract its own weighted update; None if the site refuses."""
    secret, public = create_context_pair()
    acc = EncryptedSum(public, context_fingerprint(public))
    layout = None
    for name, (update, weight) in sites.items():
        cts, layout = weighted_encrypt(secret, update, weight, sites=len(sites))
        acc.add(name, cts, weight, context_fingerprint(public))
    cts, total, _ = acc.result()
    try:
        avg = decrypt_average(secret, cts, total, layout)
    except ValueError:
        return None
    a_update, a_weight = sites["A"]
    return (avg["w"] * total - a_update["w"] * a_weight) / sites["B"][1]


def test_a_site_cannot_read_the_other_update_of_a_two_site_sum():
    b = _update(2)
    recovered = _recovered_b({"A": (_update(1), 0.4), "B": (b, 0.3)})
    leaked = recovered is not None and np.allclose(recovered, b["w"], atol=1e-3)
    assert not leaked, "site A recovered site B's update from a sum of two"


def test_the_server_cannot_pass_off_one_update_added_twice_as_three():
    """The count is inside the ciphertexts: adding the same ciphertexts again cannot fake it either,
    because the server's sum refuses a second contribution by the same site (an honest-but-curious
    server), and the decrypted count is what the sites trust, not the server's list of names."""
    secret, public = create_context_pair()
    cts, layout = weighted_encrypt(secret, _update(1), 0.5, sites=3)
    acc = EncryptedSum(public, context_fingerprint(public))
    acc.add("A", cts, 0.5, context_fingerprint(public))
    summed, total, _ = acc.result()
    with pytest.raises(ValueError):
        decrypt_average(secret, summed, total * 3, layout)  # the server claims a weight of three sites


def test_three_contributors_decrypt_to_the_average():
    secret, public = create_context_pair()
    ups = {name: (_update(i), 0.2 + 0.1 * i) for i, name in enumerate("ABC")}
    acc = EncryptedSum(public, context_fingerprint(public))
    layout = None
    for name, (update, weight) in ups.items():
        cts, layout = weighted_encrypt(secret, update, weight, sites=3)
        acc.add(name, cts, weight, context_fingerprint(public))
    cts, total, _ = acc.result()
    want = sum(u["w"].astype(np.float64) * w for u, w in ups.values()) / total
    np.testing.assert_allclose(decrypt_average(secret, cts, total, layout)["w"], want, atol=2e-5)


def test_a_two_site_training_job_is_refused_up_front():
    from clinfed.jobs import load_job

    with pytest.raises(ValueError, match="3"):
        load_job("breast_cancer_dp").make_recipe(sites=2, rounds=1)
