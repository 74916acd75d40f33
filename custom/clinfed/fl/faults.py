"""Fault injection for tests and demos (`clinfed simulate --inject SITE=KIND`), simulator only.

A job is untrusted input, so no job argument can switch a fault on: the switch is the environment
variable ``CLINFED_INJECT`` ("site-2=nan,site-3=crash") of the site process itself, which
`clinfed simulate` sets for its own simulated sites and a deployed site's kit never does.

Each kind imitates a real failure a consortium meets, applied at the site after local training:

- ``nan``: training diverged; the update holds NaN/Inf. The site's own screen must catch it.
- ``corrupt``: the bytes that travel are garbage (a broken serialiser, a disk error, an attacker);
  the server must reject them before they touch the sum.
- ``wrongshape``: the site runs a different model version: too few ciphertexts / a missing layer.
- ``crash``: the site process dies in the middle of the round, sending nothing.
- ``vanish``: the site sends its masked upload, then dies before the round is unmasked (its next
  secure-aggregation task: a re-run or its reveal), the dropout that secure aggregation must survive.
"""

from __future__ import annotations

import os

import numpy as np

from clinfed.fl import payload

FAULT_KINDS = ("nan", "corrupt", "wrongshape", "crash", "vanish")
INJECT_ENV = "CLINFED_INJECT"


def encode_faults(faults: dict[str, str]) -> str:
    return ",".join(f"{site}={kind}" for site, kind in sorted(faults.items()))


def injected_fault(site: str) -> str | None:
    """The fault this site process was started with (simulator only), or None."""
    for item in os.environ.get(INJECT_ENV, "").split(","):
        name, _, kind = item.partition("=")
        if name == site and kind in FAULT_KINDS:
            return kind
    return None


def poison_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``nan``: the first layer's first entry becomes NaN, the way a diverged step leaves it."""
    poisoned = {k: v.copy() for k, v in weights.items()}
    first = sorted(poisoned)[0]
    poisoned[first].flat[0] = np.nan
    return poisoned


def damage_payload(kind: str, params: dict, seed: int = 0) -> dict:
    """``corrupt`` / ``wrongshape`` applied to what is about to be sent."""
    rng = np.random.default_rng(seed)
    if payload.is_encrypted(params):
        cts = list(params[payload.CKKS_KEY])
        if kind == "corrupt":
            cts = [rng.bytes(len(c)) for c in cts]
        elif kind == "wrongshape":
            cts = cts[:-1] if len(cts) > 1 else [*cts, cts[0]]
        return {**params, payload.CKKS_KEY: cts}
    damaged = dict(params)
    first = sorted(damaged)[0]
    if kind == "corrupt":
        damaged[first] = np.frombuffer(rng.bytes(16), dtype=np.uint8)
    elif kind == "wrongshape":
        damaged[first] = np.zeros(np.asarray(damaged[first]).size + 1, dtype=np.float32)
    return damaged


def crash_now() -> None:
    """``crash``: die without a word, as a killed process does (no exception handler runs)."""
    os._exit(17)
