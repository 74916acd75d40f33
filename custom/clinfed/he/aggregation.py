"""Weighted FedAvg over ciphertexts: site-side weighting/encryption, server-side running sum.

The split follows the threat model: the server is honest-but-curious, so it only ever *adds*
ciphertexts and sums the (public) weights; each site multiplies its own update by its weight
before encrypting, and divides the decrypted sum by the total weight. Like MONAI's
``compute_dice`` / ``DiceMetric``, the arithmetic lives in pure functions (``ckks.py``) and the
classes here only validate and accumulate.

Validation happens *before* a payload touches the running sum: one bad site (garbage bytes, a
wrong count, another federation's key, NaN in plaintext) is refused with a one-line reason naming
it, and the sum of the others stays exactly what it was.

Two protections live on the sites' side, because the server that builds a sum cannot be trusted to
report on it:

* **Contributor floor.** Every site packs one extra value, ``1/weight`` in the pseudo-layer
  ``COUNT_LAYER``, which its weighting turns into exactly 1. The decrypted slot is therefore the true
  number of updates in the sum, whatever the server claims, and a site refuses to decrypt a sum of
  fewer than ``MIN_CONTRIBUTORS`` (3): with two, each site would subtract its own update and read the
  other's in the clear.
* **No full-precision decryptions.** CKKS decryption returns the message plus the scheme's error,
  and that error is a linear function of the secret key: whoever holds a ciphertext and learns its
  decryption at full precision can recover the key (Li and Micciancio, EUROCRYPT 2021). So every
  decrypted value is noise-flooded with Gaussian noise of σ = ``FLOOD_SIGMA`` (2^-20, ~100x the CKKS
  error measured at our parameters) drawn from OS entropy, then rounded to a grid of ``FLOOD_SIGMA``,
  before anything computed from it can leave the site. At 2^-20 absolute the model is unchanged for
  training purposes; the flood is fresh on every decryption, so decrypting twice does not average it out.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tenseal as ts

from clinfed.he.ckks import (
    InvalidCiphertext,
    add_ciphertexts,
    add_streamed,
    context_params,
    decrypt_vector,
    encrypt_vector,
    expected_ciphertext_count,
    is_ciphertext_sequence,
    parse_ciphertexts,
    serialize_ciphertexts,
)
from clinfed.he.context import HEContextError, context_fingerprint
from clinfed.he.packing import Layout, flatten, unflatten
from clinfed.he.params import max_abs_value

COUNT_LAYER = "__contributors__"
MIN_CONTRIBUTORS = 3  # a floor in code: no job argument can lower it
FLOOD_SIGMA = 2.0**-20


class TooFewContributors(ValueError):
    """A sum of fewer than MIN_CONTRIBUTORS updates: decrypting it would expose the others' updates."""


def _check_weight(site: str, weight: float) -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w) or w <= 0:
        raise InvalidCiphertext(site, f"aggregation weight {weight!r} is not a positive finite number")
    return w


class _RunningSum:
    """What both sums expose besides their result: who contributed, and with how much weight."""

    _sites: list[str]
    _weight: float

    @property
    def sites(self) -> list[str]:
        return list(self._sites)

    @property
    def total_weight(self) -> float:
        return self._weight


class EncryptedSum(_RunningSum):
    """Server-side running sum of the sites' encrypted, pre-weighted updates.

    ``size`` (values in the flat model) fixes the expected ciphertext count; without it the first
    accepted site's count becomes the reference, so a malformed first site is caught only by
    parsing, and the others are then held to its count.
    """

    def __init__(self, ctx: ts.Context, fingerprint: str | None = None, size: int | None = None):
        if ctx.is_private():
            raise HEContextError(
                "EncryptedSum runs on the server, whose context must not hold the secret key "
                "(load it with load_server_context)"
            )
        self._ctx = ctx
        self.fingerprint = fingerprint or context_fingerprint(ctx)
        self._expected = None if size is None else expected_ciphertext_count(ctx, size)
        self._total: list[Any] | None = None
        self._weight = 0.0
        self._sites: list[str] = []
        self._lock = threading.Lock()

    def add(self, site: str, cts: Sequence[bytes], weight: float, fingerprint: str) -> None:
        """Vet ``site``'s ciphertexts, then add them; on any problem raise and leave the sum intact."""
        w = _check_weight(site, weight)
        if not fingerprint:
            raise InvalidCiphertext(site, "sent no context fingerprint; cannot tell which key made its ciphertexts")
        if fingerprint != self.fingerprint:
            raise InvalidCiphertext(
                site,
                f"ciphertexts were made under another federation's key "
                f"(context fingerprint {fingerprint[:12]}…, this federation's {self.fingerprint[:12]}…)",
            )
        with self._lock:
            if site in self._sites:
                raise InvalidCiphertext(site, "already contributed to this sum")
            expected = self._expected
            if expected is None:
                expected = len(cts) if is_ciphertext_sequence(cts) else 0
            if expected == 0:
                raise InvalidCiphertext(site, "sent no ciphertexts")
            if isinstance(cts, list | tuple):  # in memory already: parse once, then add
                parsed = parse_ciphertexts(self._ctx, cts, expected, site)
                self._total = add_ciphertexts(self._ctx, self._total, parsed)
            else:  # a streamed upload read from its spool: vetted whole, added one ciphertext at a time
                self._total = add_streamed(self._ctx, self._total, cts, expected, site)
            self._expected = expected
            self._weight += w
            self._sites.append(site)

    def result(self, into: Any = None) -> tuple[Sequence[bytes], float, list[str]]:
        """(serialised encrypted sum, total weight, contributing sites in arrival order); ``into``
        receives the ciphertexts one by one (see :func:`serialize_ciphertexts`)."""
        with self._lock:
            if self._total is None:
                raise ValueError("no site contributed to the sum")
            return serialize_ciphertexts(self._total, into), self._weight, list(self._sites)


class PlainWeightedSum(_RunningSum):
    """Plaintext twin of :class:`EncryptedSum` for ``--no-encrypt`` runs (the FedAvg baseline).

    Sites send unweighted arrays; the server weights, sums and averages, as FLARE's FedAvg does.
    The first accepted site's layout (or ``reference``) fixes the names and shapes expected of all.
    """

    def __init__(self, reference: Layout | None = None, fingerprint: str | None = None):
        self._layout = reference
        self.fingerprint = fingerprint
        self._sum: np.ndarray | None = None
        self._weight = 0.0
        self._sites: list[str] = []
        self._lock = threading.Lock()

    def add(self, site: str, arrays: Mapping[str, np.ndarray], weight: float, fingerprint: str | None = None) -> None:
        """Vet ``site``'s arrays (numeric, finite, expected layout), then add them weighted."""
        w = _check_weight(site, weight)
        if self.fingerprint is not None and fingerprint != self.fingerprint:
            raise InvalidCiphertext(site, f"fingerprint {fingerprint!r} does not match this job's")
        if not isinstance(arrays, Mapping) or not arrays:
            raise InvalidCiphertext(site, "sent an empty update")
        try:
            vec, layout = flatten(arrays)
        except (TypeError, ValueError) as exc:
            raise InvalidCiphertext(site, str(exc)) from exc
        bad = ~np.isfinite(vec)
        if bad.any():
            first = layout.locate(int(np.argmax(bad)))
            raise InvalidCiphertext(site, f"update holds {int(bad.sum())} NaN/Inf values (first in layer '{first}')")
        with self._lock:
            if site in self._sites:
                raise InvalidCiphertext(site, "already contributed to this sum")
            if self._layout is not None:
                _same_layout(site, layout, self._layout)
            else:
                self._layout = layout
            weighted = vec * w
            self._sum = weighted if self._sum is None else self._sum + weighted
            self._weight += w
            self._sites.append(site)

    def result(self) -> tuple[dict[str, np.ndarray], float, list[str]]:
        """(weighted average in the reference dtypes, total weight, contributing sites)."""
        with self._lock:
            if self._sum is None or self._layout is None:
                raise ValueError("no site contributed to the sum")
            return unflatten(self._sum / self._weight, self._layout), self._weight, list(self._sites)


def _same_layout(site: str, got: Layout, want: Layout) -> None:
    if got.names != want.names:
        missing = sorted(set(want.names) - set(got.names))
        extra = sorted(set(got.names) - set(want.names))
        raise InvalidCiphertext(site, f"update layers differ (missing {missing}, unexpected {extra})")
    for name, shape, ref in zip(got.names, got.shapes, want.shapes, strict=True):
        if shape != ref:
            raise InvalidCiphertext(site, f"layer '{name}' has shape {shape}, expected {ref}")


# --- site side ------------------------------------------------------------------------------------
def weighted_encrypt(
    ctx: ts.Context,
    arrays: Mapping[str, np.ndarray],
    weight: float,
    sites: int = 1,
    into: Any = None,
    mask: Any = None,
) -> tuple[Sequence[bytes], Layout]:
    """Multiply a site's arrays by its weight, pack them into one vector and encrypt it.

    The vector carries one more value, ``COUNT_LAYER``, that is exactly 1 after weighting, so the
    decrypted sum tells every site how many updates it holds (see the module docstring).
    Refuses (ValueError) values the CKKS parameters could not sum without silent wraparound:
    |weight·x| must stay under :func:`max_abs_value` divided by the number of ``sites`` that will
    be summed (the bound holds for the sum, and the server cannot check a sum it cannot read).
    ``into`` receives the ciphertexts one by one and ``mask`` masks them (see :func:`encrypt_vector`).
    """
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"aggregation weight {weight!r} is not a positive finite number")
    if COUNT_LAYER in arrays:
        raise ValueError(f"layer name {COUNT_LAYER!r} is reserved for the contributor count")
    vec, layout = flatten({**arrays, COUNT_LAYER: np.array([1.0 / w])})
    vec *= w
    bad = ~np.isfinite(vec)
    if bad.any():
        first = layout.locate(int(np.argmax(bad)))
        raise ValueError(
            f"update holds {int(bad.sum())} NaN/Inf values (first in layer '{first}'); refusing to send it"
        )
    bound = max_abs_value(context_params(ctx)) / max(int(sites), 1)
    if vec.size:
        peak = int(np.argmax(np.abs(vec)))
        if abs(vec[peak]) > bound:
            raise ValueError(
                f"weighted update reaches {abs(vec[peak]):.4g} in layer '{layout.locate(peak)}', beyond the "
                f"±{bound:.4g} that {sites} site(s) can sum under these CKKS parameters; use a smaller "
                "aggregation weight (e.g. samples / 100)"
            )
    return encrypt_vector(ctx, vec, into, mask), layout


def flood(values: np.ndarray, sigma: float = FLOOD_SIGMA) -> np.ndarray:
    """Decrypted values made safe to build on and release: fresh Gaussian noise of ``sigma`` from OS
    entropy, then rounding to a grid of ``sigma`` (the CKKS error, and with it the key, stays hidden)."""
    rng = np.random.default_rng(secrets.randbits(128))
    noisy = np.asarray(values, dtype=np.float64) + rng.normal(0.0, sigma, size=np.shape(values))
    return np.round(noisy / sigma) * sigma


def decrypt_sum(
    ctx: ts.Context, cts: Sequence[bytes], layout: Layout, source: str = "server"
) -> tuple[dict[str, np.ndarray], int]:
    """Decrypt an encrypted sum at a site: (the summed arrays, noise-flooded; the true contributor count).

    Refuses (TooFewContributors) a sum of fewer than MIN_CONTRIBUTORS updates, and (ValueError) one
    without a count, whatever the server says about it.
    """
    vec, contributors = decrypt_sum_exact(ctx, cts, layout, source)
    arrays = unflatten(flood(vec), layout)
    arrays.pop(COUNT_LAYER)
    return arrays, contributors


def decrypt_sum_exact(
    ctx: ts.Context, cts: Sequence[bytes], layout: Layout, source: str = "server"
) -> tuple[np.ndarray, int]:
    """:func:`decrypt_sum` before flooding: (the flat decrypted vector, the true contributor count),
    with the same refusals. Nothing computed from it may leave the site (see :func:`flood`); a
    compressed site ranks next round's coordinates on it, identically at every site."""
    if COUNT_LAYER not in layout.names:
        raise ValueError(f"{source}: the encrypted sum carries no contributor count; refusing to decrypt it")
    vec = decrypt_vector(ctx, cts, layout.size, source)
    start, _ = layout.offsets()[COUNT_LAYER]
    count = float(vec[start])
    contributors = round(count)
    if abs(count - contributors) > 0.05:
        raise ValueError(f"{source}: contributor count {count:.3f} is not a whole number; refusing the sum")
    if contributors < MIN_CONTRIBUTORS:
        raise TooFewContributors(
            f"{source}: the encrypted sum holds {contributors} update(s), fewer than {MIN_CONTRIBUTORS}: "
            "decrypting it would let a contributor read another's update; refusing"
        )
    return vec, contributors


def decrypt_average(
    ctx: ts.Context, cts: Sequence[bytes], total_weight: float, layout: Layout
) -> dict[str, np.ndarray]:
    """Decrypt the server's encrypted sum and divide by the total weight: the FedAvg model (flooded)."""
    total = float(total_weight)
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"total weight {total_weight!r} is not a positive finite number")
    sums, _ = decrypt_sum(ctx, cts, layout)
    return {name: (value / total).astype(value.dtype) for name, value in sums.items()}
