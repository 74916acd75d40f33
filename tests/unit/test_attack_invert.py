"""Claims of `clinfed attack invert`: a plaintext update gives the image away, a DP-SGD update does not."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from clinfed.attack.invert import (
    build_target_model,
    dp_noise_multiplier,
    dp_update,
    format_table,
    infer_label,
    plain_update,
    run_invert,
    synthetic_site,
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, bytes]:
    out = tmp_path_factory.mktemp("invert")
    result = run_invert(
        json_path=str(out / "invert.json"), png_path=str(out / "invert.png"), images=1, iterations=120, seed=0
    )
    return result, json.loads((out / "invert.json").read_text()), (out / "invert.png").read_bytes()


def test_plaintext_update_is_inverted_and_dp_update_is_not(quick_run: tuple[dict, dict, bytes]) -> None:
    result, _, _ = quick_run
    assert result["no_dp"]["ssim"] >= 0.6
    assert result["dp"]["ssim"] <= 0.2
    assert result["no_dp"]["ssim"] - result["dp"]["ssim"] >= 0.5
    assert result["no_dp"]["psnr"] > result["dp"]["psnr"] + 10


def test_dp_update_is_at_the_requested_epsilon(quick_run: tuple[dict, dict, bytes]) -> None:
    dp = quick_run[0]["dp"]
    assert 7.5 <= dp["epsilon"] <= 8.0 + 1e-6
    assert dp["sample_rate"] == 0.5 and dp["steps"] == 20
    assert dp["noise_multiplier"] > 1.0 and dp["max_grad_norm"] == 1.0


def test_json_and_png_are_written_with_the_contract_keys(quick_run: tuple[dict, dict, bytes]) -> None:
    result, written, png = quick_run
    assert {"no_dp", "dp", "attack", "images", "seconds"} <= set(written)
    assert {"ssim", "psnr"} <= set(written["no_dp"])
    assert {"ssim", "psnr", "epsilon", "noise_multiplier", "max_grad_norm"} <= set(written["dp"])
    assert written["images"] == 1 and "Inverting Gradients" in written["attack"]
    assert written["dp"]["epsilon"] == pytest.approx(result["dp"]["epsilon"])
    assert png.startswith(b"\x89PNG")
    assert "no DP" in format_table(result) and "ε=" in format_table(result)


def test_label_is_read_off_the_plaintext_update() -> None:
    x, y = synthetic_site(8, 32, seed=1)
    model = build_target_model(32, seed=1)
    assert [infer_label(plain_update(model, x[i : i + 1], y[i : i + 1])) for i in range(8)] == y.tolist()


def test_noiseless_dp_update_is_the_clipped_gradient_over_the_expected_batch() -> None:
    """Opacus' pre_step with σ = 0 must give clip(g, C) / 32: proves the DP path clips what we attack."""
    x, y = synthetic_site(64, 32, seed=2)
    model = build_target_model(32, seed=2)
    plain = plain_update(model, x[:1], y[:1])
    norm = torch.sqrt(sum((g * g).sum() for g in plain))
    released = dp_update(
        model, TensorDataset(x, y), x[:1], y[:1], batch_size=32, noise_multiplier=0.0, max_grad_norm=1.0, seed=0
    )
    scale = min(1.0, 1.0 / float(norm)) / 32
    for got, expected in zip(released, plain, strict=True):
        torch.testing.assert_close(got, expected * scale, rtol=1e-4, atol=1e-7)


def test_noise_multiplier_meets_the_target_epsilon() -> None:
    sigma, spent = dp_noise_multiplier(8.0, 1e-5, 0.5, 20)
    assert spent <= 8.0 + 1e-6 and spent > 7.5 and sigma > 1.0
