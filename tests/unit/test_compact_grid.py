"""Claims about the noise-tied compact grid (issue 25, item 5): ≤ 2 B/param up, error far below the noise."""

from __future__ import annotations

import os

import numpy as np
import pytest

from clinfed.he import context_fingerprint
from clinfed.he.compact import (
    COMPACT_PARAMS,
    GRID_LADDER,
    GRID_PARAMS,
    CompactSpec,
    CompactSum,
    clamp_update,
    compact_decrypt_sum,
    compact_encrypt,
    compact_unmasked,
    pack_fields,
    quantize,
    unpack_fields,
)
from clinfed.he.context import create_context_pair
from clinfed.he.masking import Mask, MaskedStream, ring_of

SIGMA = 0.003  # the per-coordinate noise std DP-SGD put in each site's update
PER_CT = GRID_PARAMS.values_per_ciphertext  # 16 384


@pytest.fixture(scope="module")
def pair():
    return create_context_pair()


def test_the_grid_packs_four_ten_bit_fields_under_two_bytes_per_param_up_and_four_down():
    assert (GRID_PARAMS.fields, GRID_PARAMS.field_bits, PER_CT) == (4, 10, 16_384)
    assert GRID_PARAMS.upload_bytes_per_value() <= 2.0 and 2 * GRID_PARAMS.upload_bytes_per_value() <= 4.0
    spec = CompactSpec.for_noise(SIGMA, 3)
    assert spec.params == GRID_PARAMS and spec.pooled and spec.stochastic
    assert spec.quantum == pytest.approx(SIGMA / 30)  # a tenth of each (equal) share's noise std σ/3
    assert spec.value_bound >= 8 * SIGMA and spec.value_bound == pytest.approx(spec.per_site_limit * spec.quantum)
    assert CompactSpec.from_json(spec.to_json()) == spec and '"rounding":"stochastic"' in spec.to_json()
    assert "rounding" not in CompactSpec(1.0, 3, pooled=True).to_json()  # the fixed grid's spec is unchanged
    # more sites need log2(sites) more bits: the ladder steps to wider fields, or refuses
    assert CompactSpec.for_noise(SIGMA, 6).params == GRID_PARAMS
    assert CompactSpec.for_noise(SIGMA, 7).params.field_bits == 14
    with pytest.raises(ValueError, match="noise std"):
        CompactSpec.for_noise(SIGMA, 7, params=GRID_PARAMS)
    with pytest.raises(ValueError, match="noise_std"):
        CompactSpec.for_noise(0.0, 3)


def test_stochastic_rounding_is_unbiased_and_each_error_is_below_one_quantum():
    spec = CompactSpec.for_noise(SIGMA, 3)
    delta = spec.quantum
    rng = np.random.default_rng(0)
    for frac in (0.1, 0.3, 0.5, 0.77):
        x = np.full(200_000, (5 + frac) * delta)
        got = quantize(x, spec, 1.0, rng) * delta
        err = got - x
        assert np.abs(err).max() < delta
        # the mean's standard error is ≤ 0.5·δ/√200 000 ≈ 0.0011·δ; rounding to nearest would be off by min(f, 1−f)·δ
        assert abs(err.mean()) < 0.006 * delta, frac
    nearest = CompactSpec(spec.value_bound, 3, GRID_PARAMS, pooled=True)
    assert abs((quantize(np.full(1000, 5.3 * delta), nearest) * delta - 5.3 * delta).mean()) > 0.29 * delta


def test_values_past_the_range_are_clamped_and_counted():
    spec = CompactSpec.for_noise(SIGMA, 3)
    b = spec.value_bound
    inside = np.linspace(-b, b, 11, dtype=np.float32)
    update = {"w": np.array([0.0, 1.5 * b, -2 * b, b, -b * 0.999], dtype=np.float32), "v": inside}
    out, clamped = clamp_update(update, spec)
    assert clamped == 2
    b32 = np.float32(b) if float(np.float32(b)) <= b else np.nextafter(np.float32(b), np.float32(0))
    np.testing.assert_array_equal(out["w"], np.array([0.0, b32, -b32, b32, -b * 0.999], dtype=np.float32))
    assert float(np.abs(out["w"]).max()) <= b  # float32 rounding never lands past the bound (encryption refuses that)
    assert out["v"] is inside  # nothing past the range: passed through uncopied
    assert clamp_update({"v": inside}, spec)[1] == 0


@pytest.mark.parametrize("params", GRID_LADDER)
def test_no_honest_sum_can_overflow_a_field_for_any_number_of_sites(params):
    top = 2 ** (params.field_bits - 1) - 1
    rng = np.random.default_rng(1)
    for sites in sorted({1, 2, 3, 5, 6, 7, 10, 20, 50, params.max_sites}):
        try:
            spec = CompactSpec.for_noise(SIGMA, sites, params=params, range_std=1e-9)
        except ValueError:
            assert top - sites < 1  # refused only where the fields cannot hold one level
            continue
        # the worst case: every site at the bound with its share, each rounding up
        assert spec.per_site_limit + sites <= top
        shares = rng.dirichlet(np.ones(sites))
        x = np.full(2048, spec.value_bound)
        x[1024:] *= -1
        ints = [quantize(x, spec, float(s), rng) for s in shares]
        total = sum(ints)
        assert np.abs(total).max() <= top
        # the packed half slots add up and split back into exactly the fields' sums (no carry across)
        halves = sum(pack_fields(i, params) for i in ints)
        np.testing.assert_array_equal(unpack_fields(halves, params, x.size, spec.sum_limit), total)


def _masks(ring, sites: int) -> tuple[list[MaskedStream], MaskedStream]:
    """Each site's pairwise (+/−) and self masks, and the decrypting site's correction (−Σ self masks)."""
    pairs = {(i, j): os.urandom(32) for i in range(sites) for j in range(i + 1, sites)}
    own = [os.urandom(32) for _ in range(sites)]
    masks = [
        MaskedStream(
            Mask(
                ring,
                plus=(own[i], *[pairs[i, j] for j in range(i + 1, sites)]),
                minus=tuple(pairs[j, i] for j in range(i)),
            )
        )
        for i in range(sites)
    ]
    return masks, MaskedStream(Mask(ring, minus=tuple(own)))


def test_three_masked_uploads_sum_to_the_plaintext_sum_within_the_stated_error(pair):
    site, server = pair
    sites, size = 3, 2 * PER_CT - 1  # + the count: exactly two ciphertexts
    spec = CompactSpec.for_noise(SIGMA, sites)
    rng = np.random.default_rng(7)
    weights = [120.0, 157.0, 194.0]
    shares = [w / sum(weights) for w in weights]
    updates = [{"w": rng.normal(0, SIGMA, size).astype(np.float32)} for _ in range(sites)]
    for u in updates:  # the fields' extremes: every site at ± the bound on the same coordinates
        u["w"][:64], u["w"][64:128] = spec.value_bound, -spec.value_bound
    masks, correction = _masks(ring_of(site), sites)
    acc = CompactSum(server, spec, size=size)
    for i, (u, s, mask) in enumerate(zip(updates, shares, masks, strict=True)):
        cts, layout = compact_encrypt(site, u, s, spec, mask=mask, rng=rng)
        assert len(cts) == 2 and sum(map(len, cts)) / size <= 2.0
        acc.add(f"site-{i}", cts, s, context_fingerprint(site), spec.to_json())
    total, _, _ = acc.result()
    assert sum(map(len, total)) / size <= 4.0
    with pytest.raises(ValueError, match="whole numbers"):  # the masks are really there
        compact_decrypt_sum(site, total, layout, spec)
    sums, count = compact_decrypt_sum(site, compact_unmasked(site, total, correction, GRID_PARAMS), layout, spec)
    assert count == sites
    exact = sum(s * u["w"].astype(np.float64) for s, u in zip(shares, updates, strict=True))
    err = sums["w"] - exact
    assert np.abs(err).max() <= spec.sum_error_bound(sites) * (1 + 1e-9)  # sites·δ = σ/10
    assert np.abs(err).max() <= 0.1 * SIGMA * (1 + 1e-9)
    assert abs(err.mean()) < 0.005 * SIGMA  # unbiased
    assert np.std(err) <= SIGMA / (20 * np.sqrt(sites))  # ≤ δ·√sites/2: 1/400 of the average's noise variance


def test_the_fixed_grid_is_untouched():
    assert COMPACT_PARAMS.fields == 2 and COMPACT_PARAMS.field_bits == 21
    spec = CompactSpec(1.0, 20, pooled=True)
    assert not spec.stochastic and spec.per_site_limit == 2**20 - 1 - 10
    assert spec.sum_error_bound(20) == pytest.approx(10 * spec.quantum)


@pytest.mark.parametrize(("optimizer", "lr", "momentum"), [("sgd", 0.5, 0.0), ("sgd", 0.1, 0.9), ("adam", 0.01, 0.0)])
def test_the_noise_a_site_states_is_the_noise_dp_sgd_puts_in_its_round_change(optimizer, lr, momentum):
    """Two runs of one round from the same model differ by two independent draws of the DP noise (and of
    the Poisson batches): their difference's std / √2 is what `update_noise_std` states, within 30 %."""
    from clinfed.tasks import build_task
    from clinfed.training import DPConfig, SiteTrainer, TrainConfig

    def trainer(dp: bool = True) -> SiteTrainer:
        task = build_task("breast_cancer", hidden=16)
        config = TrainConfig(rounds=2, batch_size=32, lr=lr, optimizer=optimizer, momentum=momentum)
        return SiteTrainer(task, task.load_site_data("site-1", 0, 3, None), config, DPConfig(enabled=dp))

    a, b = trainer(), trainer()
    start = a.get_weights()
    changes = []
    for t in (a, b):
        t.train_round()
        changes.append(np.concatenate([(t.get_weights()[k] - start[k]).ravel() for k in sorted(start)]))
    measured = float(np.std(changes[0] - changes[1])) / np.sqrt(2)
    assert 0.8 * a.update_noise_std() <= measured <= 1.3 * a.update_noise_std()
    assert trainer(dp=False).update_noise_std() == 0.0  # no DP noise: the job keeps the fixed grid
