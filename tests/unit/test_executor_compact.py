"""A site's side of the compact format, on real TenSEAL keys: its share of the admitted weight, the
public bound (values past it clipped, and only the count logged, at the site), and a server that
understates the admitted total is refused before anything is encrypted."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.audit import AuditLog
from clinfed.audit.log import read_records
from clinfed.fl import payload
from clinfed.fl.executor import DPTrainExecutor
from clinfed.he import context_fingerprint, create_context_pair
from clinfed.he.compact import CompactSpec, CompactSum, compact_decrypt_average
from clinfed.he.packing import layout_from_json


def _site(name: str, ctx, tmp_path, spec: CompactSpec, admitted: float) -> DPTrainExecutor:
    ex = DPTrainExecutor(weight_unit=100.0)
    ex.site, ex.job, ex._ctx, ex._fingerprint = name, "job", ctx, context_fingerprint(ctx)
    ex.audit = AuditLog(tmp_path / name, name)
    ex._wire = (spec.to_json(), admitted)
    return ex


def test_three_sites_shares_sum_to_fedavg_and_an_out_of_bound_value_is_clipped_at_the_site(tmp_path):
    secret, public = create_context_pair()
    spec = CompactSpec(2.0, 3, pooled=True)
    samples = [100, 300, 600]  # weights 1, 3, 6 at weight_unit 100: admitted total 10
    models = [{"w": np.full(10, float(i + 1), dtype=np.float32)} for i in range(3)]
    models[2]["w"][0] = 50.0  # past the public bound: sent as 2.0
    acc = CompactSum(public, spec)
    for i, (n, model) in enumerate(zip(samples, models, strict=True)):
        site = _site(f"site-{i + 1}", secret, tmp_path, spec, admitted=10.0)
        params, share, _ = site._encode_compact({k: v.copy() for k, v in model.items()}, n, round_num=0)
        assert share == pytest.approx(n / 1000) and params[payload.COMPACT_KEY] == spec.to_json()
        fingerprint, spec_json = params[payload.FINGERPRINT_KEY], params[payload.COMPACT_KEY]
        acc.add(site.site, params[payload.CKKS_KEY], share, fingerprint, spec_json)
    cts, total, _ = acc.result()
    avg = compact_decrypt_average(secret, cts, total, layout_from_json(params[payload.LAYOUT_KEY]), spec)["w"]
    want = np.array([0.1 * 1 + 0.3 * 2 + 0.6 * min(v, 2.0) for v in models[2]["w"]])  # 3 → clipped to 2 too
    np.testing.assert_allclose(avg, want, atol=3 * spec.quantum)
    clipped = read_records(tmp_path / "site-3" / "audit" / "site-3.jsonl", "update_clipped")
    assert [(r["values"], r["bound"]) for r in clipped] == [(10, 2.0)]  # the count only, never a value
    assert not read_records(tmp_path / "site-1" / "audit" / "site-1.jsonl", "update_clipped")


def test_a_server_that_understates_the_admitted_total_is_refused_before_encrypting(tmp_path):
    secret, _ = create_context_pair()
    spec = CompactSpec(2.0, 3, pooled=True)
    site = _site("site-2", secret, tmp_path, spec, admitted=0.5)  # below the site's own weight of 3
    with pytest.raises(ValueError, match=r"^site-2: the server's admitted weight total 0.5 is below") as info:
        site._encode_compact({"w": np.zeros(4, dtype=np.float32)}, 300, round_num=0)
    assert "\n" not in str(info.value)
    site._wire = (CompactSpec(2.0, 3).to_json(), 10.0)  # not pooled: not the format this federation uses
    with pytest.raises(ValueError, match="not the pooled format"):
        site._encode_compact({"w": np.zeros(4, dtype=np.float32)}, 300, round_num=0)


def test_on_the_noise_grid_sites_send_changes_from_the_kept_global_model_and_fedavg_comes_back(tmp_path):
    from types import SimpleNamespace

    from clinfed.errors import SiteRefusal

    secret, public = create_context_pair()
    sigma = 0.01
    spec = CompactSpec.for_noise(sigma, 3)
    rng = np.random.default_rng(5)
    base = {"w": rng.normal(0, 1.0, 50).astype(np.float32)}  # weights far past the grid's range (±17σ)
    samples = [100, 300, 600]
    models = [{"w": (base["w"] + rng.normal(0, sigma, 50)).astype(np.float32)} for _ in samples]
    models[1]["w"][0] = base["w"][0] + 1.0  # a change of 100σ: past the range, clamped and counted
    acc = CompactSum(public, spec)
    for i, (n, model) in enumerate(zip(samples, models, strict=True)):
        site = _site(f"site-{i + 1}", secret, tmp_path, spec, admitted=10.0)
        site.root, site.run_key, site.encrypt = tmp_path / site.site, "run-1", True
        site._trainer = SimpleNamespace(get_weights=lambda: {k: v.copy() for k, v in base.items()})
        site._keep_base(4)  # what _train does before training round 4
        params, share, extra = site._encode_compact({k: v.copy() for k, v in model.items()}, n, round_num=4)
        assert extra == {"clamped_values": 1 if i == 1 else 0}
        acc.add(
            site.site, params[payload.CKKS_KEY], share, params[payload.FINGERPRINT_KEY], params[payload.COMPACT_KEY]
        )
    cts, total, _ = acc.result()
    change = compact_decrypt_average(secret, cts, total, layout_from_json(params[payload.LAYOUT_KEY]), spec)["w"]
    models[1]["w"][0] = base["w"][0] + spec.value_bound
    want = sum(n / 1000 * m["w"].astype(np.float64) for n, m in zip(samples, models, strict=True))
    assert np.abs(base["w"] + change - want).max() <= sigma / 10 + 1e-6  # ≤ sites·δ, plus float32 rounding
    # a re-created executor finds the kept model on disk; another round's is refused, not guessed
    again = _site("site-1", secret, tmp_path, spec, admitted=10.0)
    again.root, again.run_key = tmp_path / "site-1", "run-1"
    np.testing.assert_array_equal(again._base_for(4)["w"], base["w"])
    with pytest.raises(SiteRefusal, match="round 5's global model, which this site does not hold"):
        again._base_for(5)
    # two rounds are kept on disk (a resumed server sends the sum of the round before), no more
    for r in (5, 6):
        again._trainer = SimpleNamespace(get_weights=lambda r=r: {"w": np.full(50, float(r), dtype=np.float32)})
        again._keep_base(r)
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "site-1" / "grid").iterdir()) == ["5.npz", "6.npz"]
    assert again._base_for(5)["w"][0] == 5.0 and again._base_for(6)["w"][0] == 6.0
