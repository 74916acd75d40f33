"""What a curious server could learn from ONE site's plaintext update, and what DP-SGD leaves of it.

Threat: without HE (or if the server colludes with a site holding the CKKS key) the server sees a
site's update. For a single local SGD step the update is the weight delta, i.e. `-lr × gradient`,
so the server knows the gradient up to a scale, and it knows the global model it sent. Gradient
inversion turns that into the training image.

Attack: "Inverting Gradients" (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020,
arXiv:2003.14053): optimise a dummy image so that *its* gradient points the same way as the
observed one (1 − cosine similarity summed over all layers, which is blind to the unknown scale
`lr`), plus a total-variation prior; Adam on the image with signed gradients, step decay at 3/8, 5/8
and 7/8 of the iterations, and projection onto the known input range [0, 1] after every step (the
preprocessing is part of the job code, so the attacker knows it). The label is not given to the
attacker: it is read off the update with iDLG's rule (Zhao, Mopuri, Bilen 2020, arXiv:2001.02610):
for softmax cross-entropy on one sample, ∂L/∂b_c = p_c − y_c, so the true class is the only
negative entry of the last layer's bias gradient.

Setting, chosen to favour the attacker so a "fails under DP" result means something:
- Batch size 1: the observed step used the target image alone (the best case for inversion; under
  Poisson sampling such a batch can happen). The model is the untrained global model of round 1
  (inversion is easiest before training), a small CNN with a wide first convolution.
- No DP: the plain per-sample gradient.
- DP: the same step as Opacus' DP-SGD releases it: `make_private` on the same model with a loader of
  the site's data (64 images, batch 32 → sample rate 0.5; 10 rounds × 1 epoch × 2 steps = 20 steps),
  noise multiplier from `get_noise_multiplier` for the target ε (default 8, δ = 1e-5, the
  segmentation job's default), then `DPOptimizer.pre_step()`: per-sample clipping to C, Gaussian
  noise N(0, σ²C²), division by the expected batch size. `p.grad` after that is what `step()` applies.
  The noise has norm ≈ σ·C·√d against a signal of norm ≤ C, whatever C is.

Images: MONAI `create_test_image_2d`, 32×32, 1-4 circles with uniform background texture
(`noise_max`), because on a black background an all-zero guess already scores SSIM ≈ 0.5 and would
make the metric meaningless; the result also reports a no-gradient baseline (a constant image at the
site's mean intensity) for that reason. Metrics: MONAI PSNR and SSIM, data range [0, 1], on the
clamped reconstruction with no post-hoc fitting to the truth.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.synthetic import create_test_image_2d
from monai.metrics import PSNRMetric, SSIMMetric
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ATTACK_NAME = "Inverting Gradients (Geiping et al. 2020): cosine gradient matching + TV, Adam, signed; iDLG label"

NUM_CLASSES = 4  # the site's label: how many lesions (1-4) the image holds
PSNR_CAP_DB = 100.0  # an exact reconstruction has infinite PSNR, which JSON cannot hold


def synthetic_site(n: int, size: int, seed: int, noise_max: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A site's data set: `n` single-channel images in [0, 1] of 1-4 circles and their count as label.

    The background texture (`noise_max`, MONAI's own option) is what makes SSIM honest here: on a
    black background an all-zero guess already scores SSIM ≈ 0.5.
    """
    rs = np.random.RandomState(seed)
    images, labels = [], []
    for _ in range(n):
        count = int(rs.randint(1, NUM_CLASSES + 1))
        image, _ = create_test_image_2d(
            size, size, num_objs=count, rad_max=max(size // 4, 3), rad_min=2, noise_max=noise_max, random_state=rs
        )
        images.append(image)
        labels.append(count - 1)
    x = torch.tensor(np.stack(images)[:, None], dtype=torch.float32)
    return x, torch.tensor(labels, dtype=torch.long)


def build_target_model(size: int, seed: int, width: int = 32) -> nn.Module:
    """The round-1 global model the server sent: a small DP-compatible CNN with a wide first layer.

    LeakyReLU (not in place, per DESIGN.md's Opacus notes) keeps second derivatives useful for the
    attack's double backward; no BatchNorm, which Opacus refuses.
    """
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(width * (size // 2) ** 2, NUM_CLASSES),
    )


def plain_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of one local step on (x, y): what a plaintext update reveals, up to the scale −lr."""
    loss = F.cross_entropy(model(x), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]


def dp_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> tuple[float, float]:
    """(σ, ε actually spent): Opacus' calibration for the job's planned steps, then its RDP accountant.

    `get_noise_multiplier` stops within a tolerance of the target, so the ε reported is recomputed
    from the history an accountant would hold, as the privacy ledger does.
    """
    sigma = get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
    )
    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    return float(sigma), float(accountant.get_epsilon(delta))


def dp_update(
    model: nn.Module,
    site: TensorDataset,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int,
) -> list[torch.Tensor]:
    """The same step as DP-SGD releases it, computed by Opacus itself (no re-implementation of the noise).

    `make_private` with the site's loader fixes the expected batch size (sample rate × site size), then
    the batch holding only `x` goes through the GradSampleModule and `DPOptimizer.pre_step()` clips,
    adds noise and scales; the noisy `p.grad` is exactly what `optimizer.step()` would apply.
    """
    local = copy.deepcopy(model)
    errors = ModuleValidator.validate(local, strict=False)
    if errors:
        raise ValueError(f"target model is not DP-SGD compatible: {errors[0]}")
    optimizer = torch.optim.SGD(local.parameters(), lr=0.1)
    loader = DataLoader(site, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        # A measurement, not a release: a seeded (non-cryptographic) generator makes it reproducible.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # The input needs no gradient here; Opacus' hooks still fire on the parameters, as in training.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        private, dp_optimizer, _ = engine.make_private(
            module=local,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(seed),
        )
        private.train()
        dp_optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(private(x), y).backward()
        dp_optimizer.pre_step()
    return [p.grad.detach().clone() for p in private._module.parameters()]


def infer_label(update: list[torch.Tensor]) -> int:
    """iDLG: the true class is the most negative entry of the last layer's bias gradient (p_c − y_c < 0)."""
    return int(torch.argmin(update[-1]))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV, the image prior of Inverting Gradients."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def invert_gradients(
    model: nn.Module,
    update: list[torch.Tensor],
    label: int,
    shape: tuple[int, ...],
    *,
    iterations: int,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    signed: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Geiping et al.'s reconstruction: the image in [0, 1] whose gradient best aligns with `update`.

    Cosine distance makes the attack independent of the update's unknown scale (lr, DP's division by
    the expected batch size, clipping), so the no-DP and DP cases face the same attack.
    """
    params = list(model.parameters())
    target_norm = torch.sqrt(sum((t * t).sum() for t in update))
    y = torch.tensor([label])
    dummy = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=lr)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    for _ in range(iterations):
        optimizer.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(F.cross_entropy(model(dummy), y), params, create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, update, strict=True))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        objective = 1 - dot / (norm * target_norm + 1e-12) + tv_weight * total_variation(dummy)
        objective.backward()
        if signed:
            dummy.grad.sign_()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            dummy.clamp_(0.0, 1.0)
    return dummy.detach()


def image_quality(reconstruction: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """MONAI SSIM and PSNR with data range [0, 1] (PSNR capped so an exact match stays valid JSON)."""
    ssim = float(SSIMMetric(spatial_dims=2, data_range=1.0)(reconstruction, truth).mean())
    psnr = float(PSNRMetric(max_val=1.0)(reconstruction, truth).mean())
    return {"ssim": ssim, "psnr": min(psnr, PSNR_CAP_DB) if math.isfinite(psnr) else PSNR_CAP_DB}


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def save_png(
    path: str, originals: list[torch.Tensor], no_dp: list[torch.Tensor], dp: list[torch.Tensor], result: dict
) -> None:
    """One row per image: original, reconstruction from the plaintext update, from the DP update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(originals)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), squeeze=False)
    eps = result["dp"]["epsilon"]
    for i, (orig, a, b) in enumerate(zip(originals, no_dp, dp, strict=True)):
        per = result["per_image"][i]
        panels = [
            (orig, "original"),
            (a, f"no DP: SSIM {per['no_dp']['ssim']:.2f}"),
            (b, f"DP ε={eps:.1f}: SSIM {per['dp']['ssim']:.2f}"),
        ]
        for ax, (img, title) in zip(axes[i], panels, strict=True):
            ax.imshow(img.squeeze().numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.suptitle("Gradient inversion of one site's update (Inverting Gradients)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_invert(
    json_path: str | None = None,
    png_path: str | None = None,
    epsilon: float = 8.0,
    images: int = 3,
    iterations: int = 300,
    seed: int = 0,
    *,
    size: int = 32,
    delta: float = 1e-5,
    max_grad_norm: float = 1.0,
    site_size: int = 64,
    batch_size: int = 32,
    rounds: int = 10,
    tv_weight: float = 1e-4,
    threads: int = 2,
) -> dict:
    """Invert `images` of one site's single-image updates, plaintext and DP-SGD, and score them.

    Returns `{"no_dp": {ssim, psnr}, "dp": {ssim, psnr, epsilon, noise_multiplier, max_grad_norm, ...},
    "baseline": {ssim, psnr}, "attack", "images", "seconds", "per_image", "setting"}` (means over images).
    """
    if images < 1 or iterations < 1:
        raise ValueError(f"attack invert: images ({images}) and iterations ({iterations}) must be at least 1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        site_x, site_y = synthetic_site(site_size, size, seed)
        site = TensorDataset(site_x, site_y)
        model = build_target_model(size, seed)
        sample_rate = batch_size / site_size
        steps = rounds * math.ceil(site_size / batch_size)
        sigma, spent = dp_noise_multiplier(epsilon, delta, sample_rate, steps)
        # No-gradient baseline: a constant guess at the site's mean intensity, what the prior alone gives.
        constant = float(site_x.mean())

        per_image, originals, rec_plain, rec_dp = [], [], [], []
        for i in range(min(images, site_size)):
            x, y = site_x[i : i + 1], site_y[i : i + 1]
            plain = plain_update(model, x, y)
            noisy = dp_update(
                model,
                site,
                x,
                y,
                batch_size=batch_size,
                noise_multiplier=sigma,
                max_grad_norm=max_grad_norm,
                seed=seed + i,
            )
            # Above C, clipping is active: DP's signal is then exactly C, against noise of norm ≈ σ·C·√d.
            grad_norm = float(torch.sqrt(sum((g * g).sum() for g in plain)))
            row: dict = {"image": i, "label": int(y), "gradient_norm": grad_norm}
            for name, update, store in (("no_dp", plain, rec_plain), ("dp", noisy, rec_dp)):
                label = infer_label(update)
                recon = invert_gradients(
                    model, update, label, tuple(x.shape), iterations=iterations, tv_weight=tv_weight, seed=seed + i
                )
                store.append(recon)
                row[name] = {**image_quality(recon, x), "label_inferred": label}
            row["baseline"] = image_quality(torch.full_like(x, constant), x)
            per_image.append(row)
            originals.append(x)

        def summary(key: str) -> dict[str, float]:
            rows = [r[key] for r in per_image]
            return {
                "ssim": _mean(rows, "ssim"),
                "psnr": _mean(rows, "psnr"),
                **(
                    {"label_accuracy": float(np.mean([r[key]["label_inferred"] == r["label"] for r in per_image]))}
                    if key != "baseline"
                    else {}
                ),
            }

        result: dict = {
            "no_dp": summary("no_dp"),
            "dp": {
                **summary("dp"),
                "epsilon": spent,
                "target_epsilon": float(epsilon),
                "delta": float(delta),
                "noise_multiplier": sigma,
                "max_grad_norm": float(max_grad_norm),
                "sample_rate": sample_rate,
                "steps": steps,
            },
            "baseline": summary("baseline"),
            "attack": ATTACK_NAME,
            "images": len(per_image),
            "iterations": iterations,
            "tv_weight": tv_weight,
            "setting": {
                "image_size": size,
                "batch_of_target_step": 1,
                "site_size": site_size,
                "batch_size": batch_size,
                "rounds": rounds,
                "model": "Conv(1→32,3) LReLU Conv(32→32,3,s2) LReLU Linear(→4), round-1 weights",
                "parameters": sum(p.numel() for p in model.parameters()),
                "seed": seed,
            },
            "per_image": per_image,
        }
        result["seconds"] = time.perf_counter() - start
        if png_path:
            save_png(png_path, originals, rec_plain, rec_dp, result)
        result["seconds"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    """The claim in one screen: the plaintext update gives the image away, the DP-SGD update does not."""
    dp, plain, base = result["dp"], result["no_dp"], result["baseline"]
    n = result["images"]
    dp_label = (
        f"DP-SGD ε={dp['epsilon']:.2f} δ={dp['delta']:g} σ={dp['noise_multiplier']:.3f} C={dp['max_grad_norm']:g}"
    )
    lines = [
        f"attack: {result['attack']}",
        f"{n} image(s), {result['setting']['image_size']}px, {result['iterations']} iterations, "
        f"{result['setting']['parameters']} parameters, batch of the observed step = 1",
        f"{'update the server sees':<44} {'SSIM':>6} {'PSNR dB':>8} {'label ok':>9}",
        f"{'plaintext gradient (no DP)':<44} {plain['ssim']:>6.3f} {plain['psnr']:>8.2f} "
        f"{plain['label_accuracy'] * n:>5.0f}/{n:<3}",
        f"{dp_label:<44} {dp['ssim']:>6.3f} {dp['psnr']:>8.2f} {dp['label_accuracy'] * n:>5.0f}/{n:<3}",
        f"{'no update (constant at site mean intensity)':<44} {base['ssim']:>6.3f} {base['psnr']:>8.2f}",
        f"DP accounting: sample rate {dp['sample_rate']:g}, {dp['steps']} steps "
        f"({result['setting']['rounds']} rounds × 1 epoch of a {result['setting']['site_size']}-image site, "
        f"batch {result['setting']['batch_size']})",
        f"seconds: {result['seconds']:.1f}",
    ]
    return "\n".join(lines)
