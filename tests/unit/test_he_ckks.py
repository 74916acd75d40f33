"""Claims about the CKKS codec and packing: exact-enough sums, chunking at slot boundaries, vetting."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.he import (
    DEFAULT_PARAMS,
    CKKSParams,
    HEContextError,
    InvalidCiphertext,
    check_ciphertexts,
    context_params,
    create_context_pair,
    decrypt_vector,
    encrypt_vector,
    expected_ciphertext_count,
    flatten,
    layout_from_json,
    layout_to_json,
    max_abs_value,
    slot_count,
    sum_ciphertexts,
    unflatten,
)

SLOTS = DEFAULT_PARAMS.slot_count


@pytest.fixture(scope="module")
def pair():
    return create_context_pair()


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


@pytest.mark.parametrize("size", [1, SLOTS - 1, SLOTS, SLOTS + 1, 3 * SLOTS + 17])
def test_encrypted_weighted_sum_matches_plaintext_fedavg(pair, size):
    secret, public = pair
    rng = np.random.default_rng(size)
    updates = [rng.normal(0, 0.1, size) for _ in range(3)]
    weights = [120.0, 45.0, 300.0]
    payloads = [encrypt_vector(secret, w * u) for w, u in zip(weights, updates, strict=True)]
    assert all(len(p) == expected_ciphertext_count(public, size) == -(-size // SLOTS) for p in payloads)
    total = sum_ciphertexts(public, payloads)
    fedavg = decrypt_vector(secret, total, size) / sum(weights)
    want = sum(w * u for w, u in zip(weights, updates, strict=True)) / sum(weights)
    assert fedavg.shape == (size,)
    assert _rel_error(fedavg, want) <= 1e-4


def test_slot_count_and_params_are_read_back_from_the_context(pair):
    secret, public = pair
    assert slot_count(public) == SLOTS == 2048
    assert context_params(secret) == context_params(public) == DEFAULT_PARAMS
    assert expected_ciphertext_count(DEFAULT_PARAMS, 0) == 0
    assert expected_ciphertext_count(DEFAULT_PARAMS, SLOTS + 1) == 2


def test_fresh_uploads_are_seeded_half_size_ciphertexts(pair):
    """Symmetric encryption lets SEAL send a seed instead of the random half of each ciphertext."""
    secret, public = pair
    cts = encrypt_vector(secret, np.ones(10 * SLOTS))
    total = sum_ciphertexts(public, [cts, cts])
    up = sum(map(len, cts)) / (10 * SLOTS)
    down = sum(map(len, total)) / (10 * SLOTS)
    assert up <= 17.0  # bytes per parameter: 60-bit coefficients, one polynomial of two
    assert up < 0.55 * down


def test_the_public_context_cannot_encrypt_our_format(pair):
    _, public = pair
    with pytest.raises(HEContextError, match="secret key"):
        encrypt_vector(public, np.ones(3))


def test_nan_is_refused_before_encryption(pair):
    secret, _ = pair
    with pytest.raises(ValueError, match="NaN"):
        encrypt_vector(secret, np.array([1.0, np.nan]))


def test_max_abs_value_is_a_safe_bound_for_the_sum(pair):
    """A sum exactly at the bound decrypts; the bound sits well below where CKKS wraps around."""
    secret, public = pair
    bound = max_abs_value(DEFAULT_PARAMS)
    assert bound == 2.0**20
    half = np.full(SLOTS, bound / 2)  # a constant vector is the worst case for the encoder
    total = sum_ciphertexts(public, [encrypt_vector(secret, half)] * 2)
    assert np.max(np.abs(decrypt_vector(secret, total, SLOTS) - bound)) < 1e-6
    big = np.full(SLOTS, 3.9 * bound)
    wrapped = sum_ciphertexts(public, [encrypt_vector(secret, big)] * 3)  # 11.7x the bound: wraps silently
    assert np.max(np.abs(decrypt_vector(secret, wrapped, SLOTS) - 3 * big)) > 1.0


def test_garbage_and_wrong_count_are_named(pair):
    secret, public = pair
    cts = encrypt_vector(secret, np.ones(3 * SLOTS))
    with pytest.raises(InvalidCiphertext) as err:
        check_ciphertexts(public, [cts[0], cts[1], b"\x00garbage"], 3, "site-2")
    assert str(err.value).startswith("site-2: ciphertext 3 of 3 does not parse under the federation's context")
    assert "\n" not in str(err.value) and err.value.site == "site-2"
    with pytest.raises(InvalidCiphertext, match=r"^site-2: sent 2 ciphertexts, expected 3$"):
        check_ciphertexts(public, cts[:2], 3, "site-2")
    truncated = cts[1][: len(cts[1]) // 2]
    with pytest.raises(InvalidCiphertext, match="site-4: ciphertext 2 of 3 does not parse"):
        check_ciphertexts(public, [cts[0], truncated, cts[2]], 3, "site-4")
    with pytest.raises(InvalidCiphertext, match="not bytes"):
        check_ciphertexts(public, [cts[0], "text", cts[2]], 3, "site-4")
    check_ciphertexts(public, cts, 3, "site-1")  # the genuine payload passes


def test_ciphertexts_under_other_parameters_or_scale_are_refused(pair):
    _, public = pair
    other_n, _ = create_context_pair(CKKSParams(8192, (60, 40), 36))
    with pytest.raises(InvalidCiphertext, match="site-3: ciphertext 1 of 1 does not parse"):
        check_ciphertexts(public, encrypt_vector(other_n, np.ones(5)), 1, "site-3")
    other_scale, _ = create_context_pair(CKKSParams(4096, (60, 40), 40))
    with pytest.raises(InvalidCiphertext, match=r"site-3: ciphertext 1 of 1 has scale 2\^40.0, expected 2\^36"):
        check_ciphertexts(public, encrypt_vector(other_scale, np.ones(5)), 1, "site-3")


def test_params_refuse_less_than_128_bit_security():
    with pytest.raises(ValueError, match="128-bit"):
        CKKSParams(4096, (60, 60), 36)
    assert CKKSParams().security_bits == 128 and CKKSParams().total_coeff_bits <= 109


# --- packing -------------------------------------------------------------------------------------
def test_flatten_round_trips_names_shapes_and_dtypes():
    arrays = {
        "conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "conv.bias": np.array([0.5, -0.5], dtype=np.float32),
        "steps": np.array(7, dtype=np.int64),
        "head": np.linspace(0, 1, 5),
    }
    vec, layout = flatten(arrays)
    assert vec.dtype == np.float64 and vec.size == layout.size == 24 + 2 + 1 + 5
    back = unflatten(vec, layout_from_json(layout_to_json(layout)))
    assert set(back) == set(arrays)
    for name, arr in arrays.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        np.testing.assert_array_equal(back[name], arr)


def test_packing_order_does_not_depend_on_insertion_order():
    a, b = np.ones(3), np.zeros(2)
    vec1, layout1 = flatten({"b": b, "a": a})
    vec2, layout2 = flatten({"a": a, "b": b})
    np.testing.assert_array_equal(vec1, vec2)
    assert layout1 == layout2 and layout1.names == ("a", "b")


def test_packing_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError, match="'flags'"):
        flatten({"flags": np.array(["x"])})
    _, layout = flatten({"w": np.ones(4)})
    with pytest.raises(ValueError, match="expects 4"):
        unflatten(np.ones(5), layout)
    with pytest.raises(ValueError, match="malformed layout"):
        layout_from_json('{"version": 1, "names": ["w"]}')


def test_the_temporary_file_fallback_gives_the_same_result(pair, monkeypatch):
    """Where memfd is missing (macOS, Windows), SEAL's path-only I/O goes through a private temp dir."""
    from clinfed.he import ckks

    secret, public = pair
    monkeypatch.setattr(ckks, "_HAVE_MEMFD", False)
    x = np.linspace(-1, 1, SLOTS + 5)
    total = sum_ciphertexts(public, [encrypt_vector(secret, x)] * 2)
    assert _rel_error(decrypt_vector(secret, total, x.size), 2 * x) <= 1e-6
