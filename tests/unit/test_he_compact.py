"""Claims about the compact HE format: exact integer packing, bytes at plaintext parity, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinfed.he import InvalidCiphertext, context_fingerprint
from clinfed.he.aggregation import TooFewContributors
from clinfed.he.compact import (
    COMPACT_PARAMS,
    CompactParams,
    CompactSpec,
    CompactSum,
    compact_ciphertext_count,
    compact_decrypt_average,
    compact_decrypt_ints,
    compact_decrypt_sum,
    compact_encrypt,
    compact_encrypt_ints,
    pack_fields,
    quantize,
    sum_compact,
    unpack_fields,
)
from clinfed.he.context import create_context_pair
from clinfed.he.params import MAX_COEFF_BITS_128

PER_CT = COMPACT_PARAMS.values_per_ciphertext  # 8192


@pytest.fixture(scope="module")
def pair():
    return create_context_pair()


def _sites_updates(sites: int, size: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """FL-like updates: one global model plus ~1 % per-site steps, in two layers (one tiny)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.2, size).astype(np.float32)
    bias = rng.normal(0, 0.01, 16).astype(np.float32)
    return [
        {
            "w": (base + rng.normal(0, 0.002, size)).astype(np.float32),
            "b": (bias + rng.normal(0, 1e-4, 16)).astype(np.float32),
        }
        for _ in range(sites)
    ]


def test_parameters_are_128_bit_secure_and_fit_the_byte_targets():
    p = COMPACT_PARAMS
    assert p.total_coeff_bits <= MAX_COEFF_BITS_128[p.poly_modulus_degree]
    assert p.upload_bytes_per_value() <= 3.9 and 2 * p.upload_bytes_per_value() <= 7.8
    assert p.max_sites >= 20
    with pytest.raises(ValueError, match="128-bit"):
        CompactParams(coeff_mod_bit_sizes=(40, 40, 40))
    with pytest.raises(ValueError, match="under q/2"):
        CompactParams(field_bits=23)
    with pytest.raises(ValueError, match="single prime"):
        CompactParams(coeff_mod_bit_sizes=(54,))


@pytest.mark.parametrize("size", [1, PER_CT - 1, PER_CT, PER_CT + 1, 3 * PER_CT + 17])
def test_field_packing_round_trips_at_the_boundaries(size):
    spec = CompactSpec(1.0, 20)
    limit = spec.per_site_limit
    rng = np.random.default_rng(size)
    ints = rng.integers(-limit, limit + 1, size)
    ints[0], ints[-1] = limit, -limit  # extremes at both ends of the vector
    halves = pack_fields(ints, COMPACT_PARAMS)
    assert halves.shape == (max(1, -(-size // PER_CT)), COMPACT_PARAMS.poly_modulus_degree)
    assert np.abs(halves).max() < 2 ** (COMPACT_PARAMS.half_slot_bits - 1)
    np.testing.assert_array_equal(unpack_fields(halves, COMPACT_PARAMS, size), ints)
    # the sum of 20 sites at the extremes still splits exactly (the head-room the fields keep)
    total = 20 * halves
    np.testing.assert_array_equal(unpack_fields(total, COMPACT_PARAMS, size), 20 * ints)


def test_encrypt_decrypt_ints_is_exact_across_several_ciphertexts(pair):
    site, _ = pair
    spec = CompactSpec(1.0, 20)
    size = 2 * PER_CT + 5
    ints = np.random.default_rng(3).integers(-spec.per_site_limit, spec.per_site_limit + 1, size)
    cts = compact_encrypt_ints(site, ints)
    assert len(cts) == 3 == compact_ciphertext_count(COMPACT_PARAMS, size - 1)
    from clinfed.he.compact import _FULL, _SEEDED, _compact, _dump_full, _load

    seal = _compact(site, COMPACT_PARAMS)
    # the site can read its own upload back through the server's path (seed expanded by SEAL)
    full = [_dump_full(seal, _load(seal, ct, _SEEDED, "self")) for ct in cts]
    assert all(len(f) == len(_dump_full(seal, _load(seal, full[0], _FULL, "self"))) for f in full)
    np.testing.assert_array_equal(compact_decrypt_ints(site, full, size), ints)


def test_twenty_sites_sum_to_the_plaintext_fedavg_within_the_bound_and_bytes_meet_the_targets(pair):
    site, server = pair
    sites, size = 20, 3 * PER_CT - 17  # + 16 biases + the count: exactly 3 full ciphertexts
    updates = _sites_updates(sites, size)
    weights = [float(100 + 7 * i) for i in range(sites)]
    bound = max(w * max(float(np.abs(v).max()) for v in u.values()) for u, w in zip(updates, weights, strict=True))
    spec = CompactSpec(bound, sites)
    acc = CompactSum(server, spec, size=size + 16)
    upload = 0
    for i, (u, w) in enumerate(zip(updates, weights, strict=True)):
        cts, layout = compact_encrypt(site, u, w, spec)
        upload = sum(map(len, cts))
        acc.add(f"site-{i}", cts, w, context_fingerprint(site), spec.to_json())
    total, weight, contributors = acc.result()
    assert contributors == [f"site-{i}" for i in range(sites)] and weight == pytest.approx(sum(weights))
    params = size + 16
    assert upload / params <= 4.0 and sum(map(len, total)) / params <= 8.0
    sums, count = compact_decrypt_sum(site, total, layout, spec)
    assert count == sites
    exact = {k: sum(w * u[k].astype(np.float64) for u, w in zip(updates, weights, strict=True)) for k in layout.names}
    for k in layout.names:  # the documented bound: sites·δ/2 per value of the sum
        assert np.abs(sums[k] - exact[k]).max() <= spec.sum_error_bound(sites) * (1 + 1e-9)
    avg = compact_decrypt_average(site, total, weight, layout, spec)
    peak = max(float(np.abs(v).max()) for v in exact.values()) / sum(weights)
    worst = max(float(np.abs(avg[k] - exact[k] / sum(weights)).max()) for k in layout.names)
    assert worst / peak <= 1e-5
    assert avg["w"].dtype == np.float32 and avg["b"].shape == (16,)


def test_a_value_past_the_head_room_is_refused_before_encrypting(pair, monkeypatch):
    site, _ = pair
    spec = CompactSpec(1.0, 10)
    import clinfed.he.compact as compact

    called = []
    monkeypatch.setattr(compact, "_encrypt_halves", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=r"layer 'big'.*exceeds the job's value_bound") as info:
        compact_encrypt(site, {"ok": np.zeros(4), "big": np.array([0.5, 0.6])}, 2.0, spec)
    assert "\n" not in str(info.value) and not called
    with pytest.raises(ValueError, match="NaN"):
        compact_encrypt(site, {"x": np.array([np.nan])}, 1.0, spec)
    with pytest.raises(ValueError, match="weight"):
        compact_encrypt(site, {"x": np.zeros(2)}, 0.0, spec)
    assert not called
    # exactly at the bound is fine, and quantises to the field's share
    assert quantize(np.array([1.0, -1.0]), spec).tolist() == [spec.per_site_limit, -spec.per_site_limit]


def test_the_server_refuses_more_sites_than_the_head_room_holds(pair):
    site, server = pair
    spec = CompactSpec(1.0, 3)
    acc = CompactSum(server, spec)
    fp = context_fingerprint(server)
    for i in range(3):
        acc.add(f"s{i}", compact_encrypt(site, {"x": np.full(5, 0.5)}, 1.0, spec)[0], 1.0, fp)
    extra = compact_encrypt(site, {"x": np.full(5, 0.5)}, 1.0, spec)[0]
    with pytest.raises(InvalidCiphertext, match="max_sites=3"):
        acc.add("s3", extra, 1.0, fp)
    with pytest.raises(InvalidCiphertext, match="already contributed"):
        acc.add("s0", extra, 1.0, fp)


def test_malformed_uploads_are_refused_with_one_line_and_the_sum_stays_intact(pair):
    site, server = pair
    spec = CompactSpec(1.0, 5)
    fp = context_fingerprint(server)
    good = compact_encrypt(site, {"x": np.full(10, 0.25)}, 1.0, spec)[0]
    acc = CompactSum(server, spec)
    acc.add("a", good, 1.0, fp)
    truncated = [good[0][:-1]]
    garbage = [b"CFK\x01S" + b"\xff" * (len(good[0]) - 5)]
    wrong_magic = [b"XXXX" + good[0][4:]]
    cases = [
        (truncated, "bytes"),
        (garbage, "outside the federation's modulus"),
        (wrong_magic, "not a compact-format upload"),
        ([good[0], good[0]], "sent 2 ciphertexts, expected 1"),
        (["text"], "not bytes"),
    ]
    for payload, reason in cases:
        with pytest.raises(InvalidCiphertext, match=reason) as info:
            acc.add("bad", payload, 1.0, fp)
        assert str(info.value).startswith("bad: ") and "\n" not in str(info.value)
    with pytest.raises(InvalidCiphertext, match="another federation's key"):
        acc.add("bad", good, 1.0, "0" * 64)
    with pytest.raises(InvalidCiphertext, match="another compact spec"):
        acc.add("bad", good, 1.0, fp, CompactSpec(2.0, 5).to_json())
    assert acc.sites == ["a"]


def test_a_sum_under_another_key_or_corrupted_does_not_decrypt(pair):
    site, _ = pair
    other_site, other_server = create_context_pair()
    spec = CompactSpec(1.0, 5)
    payloads = [compact_encrypt(other_site, {"x": np.full(10, 0.1 * i)}, 1.0, spec) for i in range(3)]
    layout = payloads[0][1]
    total = sum_compact(other_server, [p[0] for p in payloads], spec)
    with pytest.raises(ValueError, match="another federation's key") as info:
        compact_decrypt_sum(site, total, layout, spec)
    assert "\n" not in str(info.value)
    sums, count = compact_decrypt_sum(other_site, total, layout, spec)
    assert count == 3 and np.allclose(sums["x"], 0.3, atol=spec.sum_error_bound(3))
    with pytest.raises(ValueError, match=r"is \d+ bytes"):
        compact_decrypt_sum(other_site, [total[0][:100]], layout, spec)
    with pytest.raises(ValueError, match="expected 1"):
        compact_decrypt_sum(other_site, total * 2, layout, spec)


def test_a_sum_of_too_few_sites_is_refused(pair):
    site, server = pair
    spec = CompactSpec(1.0, 5)
    two = [compact_encrypt(site, {"x": np.ones(3) * 0.5}, 1.0, spec) for _ in range(2)]
    total = sum_compact(server, [p[0] for p in two], spec)
    with pytest.raises(TooFewContributors):
        compact_decrypt_sum(site, total, two[0][1], spec)


def test_the_compact_format_runs_on_the_federations_own_key_and_refuses_other_parameters(pair):
    """No second key to make or exchange: the federation's default context (N=4096 [60 | 40], scale
    2^36) carries compact ciphertexts at their own scale, and its real-valued path still works."""
    from clinfed.he import HEContextError, create_context, create_context_pair, encrypt_vector
    from clinfed.he.params import CKKSParams

    site, server = create_context_pair()
    spec = CompactSpec(1.0, 3, pooled=True)
    ups = [compact_encrypt(site, {"x": np.full(5, 0.25 * (i + 1))}, 1 / 3, spec) for i in range(3)]
    sums, count = compact_decrypt_sum(site, sum_compact(server, [u[0] for u in ups], spec), ups[0][1], spec)
    assert count == 3 and np.allclose(sums["x"], 0.5, atol=spec.sum_error_bound(3))
    assert len(encrypt_vector(site, [1.0])) == 1
    other = create_context(CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40, 60)))
    with pytest.raises(HEContextError, match="not the compact"):
        compact_encrypt(other, {"x": np.zeros(2)}, 1.0, CompactSpec(1.0, 3))
    with pytest.raises(HEContextError, match="secret key"):
        CompactSum(site, CompactSpec(1.0, 3))


def test_pooled_shares_keep_full_precision_at_twenty_sites_and_sum_exactly_at_the_bound(pair):
    """Pooled (the training jobs): shares of the round's total weight, |x| ≤ bound, so the sum's
    field holds the bound whatever the number of sites: at 20 sites the average is within
    sites·δ/2 of the exact FedAvg, δ = bound/(2^20 − 11), i.e. ≤ 1e-5 of the bound."""
    site, server = pair
    sites = 20
    spec = CompactSpec(2.0, sites, pooled=True)
    weights = np.array([float(50 + 13 * i) for i in range(sites)])
    shares = weights / weights.sum()
    rng = np.random.default_rng(7)
    updates = [{"w": rng.uniform(-2.0, 2.0, PER_CT).astype(np.float32)} for _ in range(sites)]
    updates[0]["w"][:4] = [2.0, -2.0, 2.0, -2.0]  # every site at the bound in its first values
    for u in updates:
        u["w"][:4] = updates[0]["w"][:4]
    acc = CompactSum(server, spec)
    for i, (u, s) in enumerate(zip(updates, shares, strict=True)):
        cts, layout = compact_encrypt(site, u, float(s), spec)
        acc.add(f"site-{i}", cts, float(s), context_fingerprint(server), spec.to_json())
    total, weight, _ = acc.result()
    avg = compact_decrypt_average(site, total, weight, layout, spec)
    exact = sum(s * u["w"].astype(np.float64) for u, s in zip(updates, shares, strict=True))
    err = np.abs(avg["w"].astype(np.float64) - exact).max()
    assert err <= spec.sum_error_bound(sites) + 1e-6  # + float32 rounding of the result
    assert spec.sum_error_bound(sites) / spec.value_bound <= 1e-5
    np.testing.assert_allclose(avg["w"][:4], [2.0, -2.0, 2.0, -2.0], atol=1e-5)  # no wraparound at the bound
    with pytest.raises(ValueError, match="share"):
        compact_encrypt(site, updates[0], 1.5, spec)  # a share above the whole would overflow the sum
    with pytest.raises(ValueError, match=r"value 2\.5.*exceeds"):
        compact_encrypt(site, {"w": np.array([2.5], dtype=np.float32)}, 0.1, spec)


def test_a_streamed_upload_and_sum_go_through_spools_and_a_bad_item_leaves_the_sum_intact(pair, tmp_path):
    """Streaming (fl.streaming): a model of several ciphertexts encrypted straight into a spool, added
    from the spool (vetted whole, then added one ciphertext at a time), the sum written into a spool
    and decrypted from it; an upload whose last ciphertext is damaged never touches the sum."""
    from clinfed.fl.streaming import Spool

    site, server = pair
    spec = CompactSpec(1.0, 5, pooled=True)
    size = 2 * PER_CT + 100  # three ciphertexts with the count
    ups = [{"w": np.full(size, 0.1 * (i + 1), dtype=np.float32)} for i in range(4)]
    acc = CompactSum(server, spec, size=size)
    fp = context_fingerprint(server)
    spools = []
    for i, u in enumerate(ups[:3]):
        spool = Spool(tmp_path)
        cts, layout = compact_encrypt(site, u, 0.25, spec, into=spool)
        assert cts is spool and len(spool) == 3
        acc.add(f"site-{i}", spool, 0.25, fp)
        spools.append(spool)
    bad = Spool(tmp_path)
    good = compact_encrypt(site, ups[3], 0.25, spec)[0]
    bad.extend([good[0], good[1], good[2][:-8] + b"\xff" * 8])
    with pytest.raises(InvalidCiphertext, match="ciphertext 3 of 3"):
        acc.add("site-3", bad, 0.25, fp)
    out = Spool(tmp_path)
    total, weight, sites = acc.result(into=out)
    assert total is out and sites == ["site-0", "site-1", "site-2"] and weight == pytest.approx(0.75)
    avg = compact_decrypt_average(site, out, weight, layout, spec)
    assert np.allclose(avg["w"], 0.2, atol=1e-5)  # (0.1 + 0.2 + 0.3) / 3: site-3's 0.4 never entered
    for sp in (*spools, bad, out):
        sp.close()


def test_the_spec_round_trips_and_bounds_its_inputs():
    spec = CompactSpec(0.5, 7)
    assert CompactSpec.from_json(spec.to_json()) == spec
    assert spec.quantum == pytest.approx(0.5 / ((2**20 - 1) // 7))
    pooled = CompactSpec(0.5, 7, pooled=True)
    assert CompactSpec.from_json(pooled.to_json()) == pooled != spec
    assert pooled.quantum == pytest.approx(0.5 / (2**20 - 1 - 4))  # the bound holds for the sum
    json.loads(spec.to_json())
    for bad in (0.0, float("inf"), -1.0):
        with pytest.raises(ValueError, match="value_bound"):
            CompactSpec(bad, 3)
    with pytest.raises(ValueError, match="max_sites"):
        CompactSpec(1.0, COMPACT_PARAMS.max_sites + 1)
    with pytest.raises(ValueError, match="malformed"):
        CompactSpec.from_json("{}")


def test_the_60_bit_fast_packing_is_the_generic_little_endian_bit_packing():
    """The federation's 60-bit prime takes a shift-based fast path; the bytes must be exactly the
    generic bit-packing's (wire compatibility), and unpack must invert it at the prime's edges."""
    from clinfed.he.compact import _bitpack, _bitunpack

    rng = np.random.default_rng(5)
    values = rng.integers(0, 2**60, 4096, dtype=np.uint64)
    values[:2] = [2**60 - 1, 0]
    bits = np.unpackbits(values.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :60]
    generic = np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    assert _bitpack(values, 60) == generic and len(generic) == 4096 * 60 // 8
    np.testing.assert_array_equal(_bitunpack(generic, 4096, 60), values)
    odd = values[:5]  # an odd count takes the generic path both ways
    np.testing.assert_array_equal(_bitunpack(_bitpack(odd, 60), 5, 60), odd)
