"""The truncated wire format of compressed updates (`clinfed.he.truncated`, issue 25 item 3): k values
ride in the first ⌈(k+1)/2⌉ coefficients of c0, on the compact format's key and grid."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from clinfed.he import create_context_pair
from clinfed.he.aggregation import TooFewContributors
from clinfed.he.ckks import InvalidCiphertext
from clinfed.he.compact import CompactSpec, compact_encrypt
from clinfed.he.masking import Mask, MaskedStream, ring_of
from clinfed.he.truncated import (
    TruncatedSum,
    dense_compact_upload_bytes,
    is_truncated_upload,
    truncated_decrypt_average,
    truncated_decrypt_ints,
    truncated_encrypt,
    truncated_shape,
    truncated_unmasked,
    upload_bytes,
)

SPEC = CompactSpec(1.0, 5, pooled=True)
SHARES = (0.2, 0.3, 0.5)


@pytest.fixture(scope="module")
def keys():
    return create_context_pair()


def _updates(size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.5, 0.5, size) for _ in SHARES]


def _sum(server, uploads) -> tuple[list[bytes], float]:
    acc = TruncatedSum(server, SPEC)
    for i, (up, share) in enumerate(zip(uploads, SHARES, strict=True)):
        acc.add(f"site-{i + 1}", up, share, acc.fingerprint, SPEC.to_json())
    cts, total, sites = acc.result()
    assert sites == ["site-1", "site-2", "site-3"]
    return cts, total


def _masks(ring) -> tuple[list[Mask], Mask]:
    """Three sites' masks (pairwise seeds with ±, a self seed each) and the decrypting site's correction."""
    p01, p02, p12, *own = (secrets.token_bytes(32) for _ in range(6))
    masks = [Mask(ring, (p01, p02, own[0])), Mask(ring, (p12, own[1]), (p01,)), Mask(ring, (own[2],), (p02, p12))]
    return masks, Mask(ring, (), tuple(own))


@pytest.mark.parametrize("size", [121, 20_000])
def test_round_trip_of_three_uploads_is_the_weighted_average_within_the_grid(keys, size):
    secret, server = keys
    updates = _updates(size)
    uploads = [truncated_encrypt(secret, u, s, SPEC) for u, s in zip(updates, SHARES, strict=True)]
    assert sum(len(c) for c in uploads[0]) == upload_bytes(size)
    assert len(uploads[0]) == len(truncated_shape(size)) == -(-(size + 1) // 8192)
    assert all(is_truncated_upload(c) for c in uploads[0])
    cts, total = _sum(server, uploads)
    got = truncated_decrypt_average(secret, cts, size, total, SPEC)
    want = sum(s * u for s, u in zip(SHARES, updates, strict=True)) / total
    assert np.max(np.abs(got - want)) <= SPEC.sum_error_bound(3) / total
    assert np.max(np.abs(got - want)) > 0  # quantised, not passed through


def test_the_upload_is_under_two_percent_of_the_dense_compact_one(keys):
    """121 values of a 12 062-parameter model: the compressed bytes against the dense compact upload."""
    secret, _ = keys
    dense, _ = compact_encrypt(secret, {"w": np.zeros(12_062)}, 1.0, SPEC)
    compressed = truncated_encrypt(secret, np.zeros(121), 1.0, SPEC)
    ratio = sum(len(c) for c in compressed) / sum(len(c) for c in dense)
    assert dense_compact_upload_bytes(12_062) == sum(len(c) for c in dense)
    assert ratio <= 0.02, ratio
    assert sum(len(c) for c in compressed) == 5 + 65 + 61 * 60 // 8 + 1  # header, seed, 61 coefficients


def test_the_sum_of_three_masked_uploads_equals_the_plaintext_sum(keys):
    secret, server = keys
    size = 9_000  # two ciphertexts: masks of ciphertext 1 come from the PRG's second range
    ring = ring_of(secret)
    masks, correction = _masks(ring)
    updates = _updates(size, seed=1)
    uploads = [
        truncated_encrypt(secret, u, s, SPEC, mask=MaskedStream(m))
        for u, s, m in zip(updates, SHARES, masks, strict=True)
    ]
    cts, _ = _sum(server, uploads)
    unmasked = truncated_unmasked(secret, cts, MaskedStream(correction))
    ints, count = truncated_decrypt_ints(secret, unmasked, size, SPEC)
    plain, _ = _sum(server, [truncated_encrypt(secret, u, s, SPEC) for u, s in zip(updates, SHARES, strict=True)])
    assert count == 3
    assert np.array_equal(ints, truncated_decrypt_ints(secret, plain, size, SPEC)[0])  # exactly the unmasked sum
    with pytest.raises(ValueError, match=r"whole numbers|head-room"):  # still masked: noise
        truncated_decrypt_ints(secret, cts, size, SPEC)


def test_a_single_masked_upload_or_a_subset_decrypts_to_noise(keys):
    secret, server = keys
    ring = ring_of(secret)
    masks, correction = _masks(ring)
    updates = _updates(121, seed=2)
    uploads = [
        truncated_encrypt(secret, u, s, SPEC, mask=MaskedStream(m))
        for u, s, m in zip(updates, SHARES, masks, strict=True)
    ]
    one = TruncatedSum(server, SPEC)
    one.add("site-1", uploads[0], SHARES[0], one.fingerprint)
    cts, _, _ = one.result()
    with pytest.raises(ValueError, match=r"whole numbers|head-room") as err:
        truncated_decrypt_ints(secret, truncated_unmasked(secret, cts, MaskedStream(correction)), 121, SPEC)
    assert "\n" not in str(err.value)
    two = TruncatedSum(server, SPEC)
    for i in (0, 1):
        two.add(f"site-{i + 1}", uploads[i], SHARES[i], two.fingerprint)
    with pytest.raises(ValueError, match=r"whole numbers|head-room"):
        truncated_decrypt_ints(secret, truncated_unmasked(secret, two.result()[0], MaskedStream(correction)), 121, SPEC)


def test_an_unmasked_sum_of_two_is_refused_as_too_few(keys):
    secret, server = keys
    acc = TruncatedSum(server, SPEC)
    for i in (0, 1):
        acc.add(f"site-{i + 1}", truncated_encrypt(secret, np.zeros(10), 0.5, SPEC), 0.5, acc.fingerprint)
    with pytest.raises(TooFewContributors, match="fewer than 3"):
        truncated_decrypt_ints(secret, acc.result()[0], 10, SPEC)


def _refusal(server, cts) -> str:
    acc = TruncatedSum(server, SPEC, size=121)
    with pytest.raises(InvalidCiphertext) as err:
        acc.add("site-9", cts, 0.5, acc.fingerprint)
    assert acc._total is None  # the sum is untouched
    message = str(err.value)
    assert "\n" not in message and message.startswith("site-9: ")
    return message


def test_malformed_uploads_are_refused_in_one_line_naming_the_site(keys):
    secret, server = keys
    good = truncated_encrypt(secret, np.zeros(121), 0.5, SPEC)[0]
    assert "not a truncated-format upload" in _refusal(server, [b"garbage" * 20])
    assert "bytes" in _refusal(server, [good[:-3]])
    assert "expected 1" in _refusal(server, [good, good])
    over = bytearray(good)
    over[-8:] = b"\xff" * 8  # the last coefficient at 2^60 - 1 ≥ q
    assert "outside the federation's modulus" in _refusal(server, [bytes(over)])
    bad_seed = bytearray(good)
    bad_seed[5] = 7  # no such PRNG
    assert "PRNG" in _refusal(server, [bytes(bad_seed)])
    assert "not bytes" in _refusal(server, ["text"])
    acc = TruncatedSum(server, SPEC)
    with pytest.raises(InvalidCiphertext, match="another compact spec"):
        acc.add("site-1", [good], 0.5, acc.fingerprint, CompactSpec(2.0, 5, pooled=True).to_json())
    with pytest.raises(InvalidCiphertext, match="another federation's key"):
        acc.add("site-1", [good], 0.5, "other")


def test_a_sum_under_another_key_is_refused(keys):
    secret, server = keys
    other, _ = create_context_pair()
    cts, _ = _sum(server, [truncated_encrypt(secret, np.zeros(50), s, SPEC) for s in SHARES])
    with pytest.raises(ValueError, match=r"whole numbers|head-room") as err:
        truncated_decrypt_ints(other, cts, 50, SPEC)
    assert "\n" not in str(err.value)


def test_values_past_the_bound_or_nan_are_refused_before_encrypting(keys):
    secret, _ = keys
    with pytest.raises(ValueError, match="value_bound"):
        truncated_encrypt(secret, np.full(4, 2.0), 0.5, SPEC)
    with pytest.raises(ValueError, match="NaN"):
        truncated_encrypt(secret, np.array([np.nan]), 0.5, SPEC)
    with pytest.raises(ValueError, match="share"):
        truncated_encrypt(secret, np.zeros(4), 1.5, SPEC)


def test_what_is_clipped_to_the_bound_waits_in_the_error_feedback():
    from clinfed.fl.compression import CompressedSite

    site = CompressedSite("key", 0.5, "site-1")
    site.start(np.zeros(4))
    values, _ = site.encode(0, np.array([3.0, -3.0, 0.5, 0.25]))
    before = site.feedback.residual.copy()
    clipped = np.clip(values, -1.0, 1.0)
    site.hold_back(values - clipped)
    idx = site.indices(0)
    assert np.array_equal(site.feedback.residual[idx] - before[idx], values - clipped)
    site.settle(0, [])  # the round was withheld: what was sent (clipped) goes back too, nothing is lost
    assert np.array_equal(site.feedback.residual[idx] - before[idx], values)


@pytest.mark.parametrize(("params", "limit"), [(100_000, 0.02), (185_582, 0.02), (125_000_000, 0.012)])
def test_from_100k_parameters_an_upload_at_f_001_is_under_the_issues_bounds(params, limit):
    """Issue 25's bounds on the ciphertexts (≤ 2 % from 100 k parameters, ≤ 1.2 % at 125 M); `upload_bytes`
    is the encrypted upload's exact size (round-trip test) and the dense one is checked against
    `compact_encrypt` above."""
    k = -(-params // 100)
    assert upload_bytes(k) / dense_compact_upload_bytes(params) <= limit


def test_three_executors_compressed_updates_sum_to_the_weighted_change_and_the_excess_waits(tmp_path, keys):
    """The site's path (`DPTrainExecutor._encode_update` on a compact job): k = ⌈F·P⌉ values in the
    truncated format, its share of the admitted weight, a value past the bound clipped with the excess
    kept in its error feedback and only the count in its audit log."""
    from clinfed.audit import AuditLog
    from clinfed.audit.log import read_records
    from clinfed.fl import payload
    from clinfed.fl.compression import CompressedSite
    from clinfed.fl.executor import DPTrainExecutor
    from clinfed.he import context_fingerprint
    from clinfed.he.packing import layout_from_json

    secret, server = keys
    spec = CompactSpec(2.0, 3, pooled=True)
    samples = [100, 300, 600]  # shares 0.1, 0.3, 0.6 of the admitted 10
    models = [np.full(10, float(i + 1) / 4) for i in range(3)]
    models[2][:] = 5.0  # past the bound: 2.0 is sent, 3.0 waits at the site
    acc, sites = TruncatedSum(server, spec), []
    for i, (n, model) in enumerate(zip(samples, models, strict=True)):
        ex = DPTrainExecutor(weight_unit=100.0, compression=0.5)
        ex.site, ex.job, ex._ctx, ex._fingerprint = f"site-{i + 1}", "job", secret, context_fingerprint(secret)
        ex.audit = AuditLog(tmp_path / ex.site, ex.site)
        ex._wire = (spec.to_json(), 10.0)
        ex._compressed = CompressedSite("shared", 0.5, ex.site, slots=2047)  # slots: the real path's; unused here
        ex._compressed.start(np.zeros(10))
        params, share, extra = ex._encode_update({"w": model.astype(np.float32)}, n, round_num=0)
        info = extra["compression"]
        assert info["format"] == "truncated" and info["k"] == info["k_nominal"] == 5 and info["ciphertexts"] == 1
        assert info["dense_upload_bytes"] == dense_compact_upload_bytes(10)
        acc.add(ex.site, params[payload.CKKS_KEY], share, params[payload.FINGERPRINT_KEY], params[payload.COMPACT_KEY])
        sites.append(ex)
    cts, total, _ = acc.result()
    size = layout_from_json(params[payload.LAYOUT_KEY]).size
    avg = truncated_decrypt_average(secret, cts, size, total, spec)
    np.testing.assert_allclose(avg, np.full(5, 0.1 * 0.25 + 0.3 * 0.5 + 0.6 * 2.0), atol=3 * spec.quantum)
    idx = sites[2]._compressed.indices(0)
    assert np.allclose(sites[2]._compressed.feedback.residual[idx], 3.0)  # the excess waits at the site
    clipped = read_records(tmp_path / "site-3" / "audit" / "site-3.jsonl", "update_clipped")
    assert [(r["values"], r["bound"]) for r in clipped] == [(5, 2.0)]
