"""Output DP of released statistics: one Gaussian calibration, the one every site's ledger composes.

Why one: a site's privacy ledger charges an output-DP release as RDP spends (noise multiplier z,
sample rate 1, steps), the accountant Opacus uses for DP-SGD, and derives ε from them. A release
calibrated any other way is charged an ε that is not the one asked for. Before this module,
`cohort_stats` calibrated each of its four families with the analytic Gaussian mechanism at its
share of (ε, δ) and basic composition, then charged the ledger the RDP-equivalent z: at ε = 1,
δ = 1e-5 the ledger charged 0.56 (1.70 for ε = 3), i.e. the release carried ~1.8× the noise its
ε needed. Now both `methods.Method` (survival_km, crosstab, cumulative_incidence) and
`cohort_stats` take z from `noise_multiplier`, the ε the ledger charges is the ε asked for.

Several noised vectors in one release (cohort_stats' four families, each with unit L2
sensitivity after scaling): Gaussian mechanisms without subsampling compose in RDP as one with
1/z² = Σ_k 1/z_k², so the family shares of the budget become multipliers z_k = z / √share_k
(`family_multipliers`); the whole release is then exactly the one charged spend (z, 1, 1).

Laplace (cohort_stats' pure-ε option) is not calibrated here: its scale is L1 / ε per family,
charged to the ledger as pure ε by basic composition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def noise_multiplier(epsilon: float, delta: float, releases: int = 1) -> float:
    """z such that `releases` Gaussian releases N(0, (z·Δ₂)²) are (ε, δ)-DP under Opacus' RDP accountant."""
    if not (isinstance(epsilon, int | float) and math.isfinite(epsilon) and epsilon > 0) or not 0 < delta < 1:
        raise ValueError(f"output DP needs ε > 0 and 0 < δ < 1, got ε={epsilon!r}, δ={delta!r}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(target_epsilon=float(epsilon), target_delta=float(delta), sample_rate=1.0, steps=releases)
    )


def family_multipliers(z: float, split: Mapping[str, float]) -> dict[str, float]:
    """Per family k the multiplier z_k = z/√share_k: together exactly one Gaussian release at z (RDP)."""
    return {family: z / math.sqrt(share) for family, share in split.items()}


def dp_config(method: str, sensitivity: float | None, epsilon: float, delta: float, releases: int = 1) -> dict:
    """A job's output-DP block: the noise multiplier z for `releases` Gaussian releases at (ε, δ).

    z is computed here, at submission, and travels in the job config; a site never trusts the ε
    written next to it: it charges its ledger with z and takes the ε the ledger computes.
    """
    if sensitivity is None:
        raise ValueError(
            f"{method} has no output DP: one patient's share of its sums has no public bound "
            "(offered for survival_km, crosstab, cumulative_incidence and cohort_stats)"
        )
    z = noise_multiplier(epsilon, delta, releases)
    return {"epsilon": float(epsilon), "delta": float(delta), "noise_multiplier": z, "mechanism": "gaussian"}
