"""Compact encrypted FedAvg: ≤ 4 bytes per parameter up, ≤ 8 down, exact in the quantised sense.

The training jobs' wire format (dense updates; `clinfed.fl.controller` picks it). It runs on the
federation's own CKKS key (:data:`clinfed.he.params.DEFAULT_PARAMS`: N = 4096, [60 | 40]), so no
second key has to be made or exchanged: CKKS keeps the scale per ciphertext, and this format only
chooses its own scale and packing. The statistics jobs keep the real-valued path
(:mod:`clinfed.he.ckks`), whose exactness they rely on. The arithmetic and the security level are
written out in ``docs/he-parameters.md``; in short:

* **Parameters** (:data:`COMPACT_PARAMS`): N = 4096, coefficient modulus [60 | 40] (one 60-bit data
  prime, SEAL's special prime last), 100 bits in all ≤ the 109 that the HomomorphicEncryption.org
  table allows N = 4096 for **128-bit security**; scale 2^15 (per ciphertext).
* **Integers, not reals.** A site quantises every value to an integer multiple of the job's
  quantum δ (:class:`CompactSpec`). In the training jobs' *pooled* spec a site sends its share
  s = w / W of the admitted sites' total weight W times its model (|x| ≤ ``value_bound``), so the
  *sum* of all sites' integers is bounded by ``value_bound`` / δ and δ = ``value_bound`` / (2^20 − 1
  − ⌈max_sites / 2⌉): the precision does not shrink with the number of sites. (A spec that is not
  pooled bounds each site's |w·x| instead, with M = ⌊(2^20 − 1) / max_sites⌋ levels per site.) A
  value beyond ``value_bound`` is refused (ValueError) before anything is encrypted.
* **Two fields per half slot, both halves of each slot.** TenSEAL's ``ckks_vector`` takes real
  vectors only, but the SEAL encoder shipped in the same wheel (``tenseal.sealapi.CKKSEncoder``)
  encodes complex vectors, so each of the N/2 slots carries two reals (real and imaginary halves),
  and each half carries the integer T = f0 + f1·2^21 (two 21-bit fields). One ciphertext thus
  holds 2·N = 8192 values. Sums of ciphertexts are sums of T; after decryption each half is rounded
  to the nearest integer (the CKKS error is ~0.02 at 20 sites, far below the 0.5 that rounding
  forgives) and split back into fields with balanced digits. The decrypted sum is therefore
  *exactly* Σ_sites round(s·x/δ): the only error is the quantisation, |error of the sum| ≤
  sites·δ/2. Because the output is an exact integer, it reveals nothing of the CKKS error, so no
  noise flooding is needed (compare ``aggregation.flood``).
* **Wire format.** A seeded upload is c0 plus SEAL's 64-byte PRNG seed for c1; instead of SEAL's
  zstd (which stores a 60-bit residue in ~7.9 bytes), every residue is bit-packed to the bit length
  of its prime. Upload: 60 bits per coefficient, N coefficients per 2N values: 3.75 B/param plus
  69 bytes per ciphertext; download (c0 and c1): 7.5 B/param. The server rebuilds SEAL's own
  (uncompressed) serialisation from its context and lets SEAL load it, so SEAL still vets every
  coefficient and expands the seed; metadata (parameters id, scale) never comes from the sender.
* **Streaming.** Encryption walks the model in chunks (:func:`clinfed.he.packing.iter_flat`) and
  hands each ciphertext to ``into`` (a spool on disk, :mod:`clinfed.fl.streaming`); decryption
  writes each ciphertext's values straight into the model's arrays: a site holds its float32 model
  plus one chunk, never a float64 copy of the whole model.

**The noise-tied grid** (:data:`GRID_PARAMS`, :meth:`CompactSpec.for_noise`; issue 25, item 5): a
DP-SGD update already carries Gaussian noise of std σ per coordinate, so a site sends its share of
its *change* from the round's global model on δ = σ / (10·sites), rounded stochastically (unbiased,
error < δ), in four 10-bit fields per half slot (16 384 values per ciphertext): 1.875 B/param up,
3.75 down, the average's rounding error ≤ σ/10 and 1/400 of its noise variance. 10 bits hold
log2(range/δ) + log2(sites) for a range ≥ 8σ up to 6 sites; more sites step to wider fields
(:data:`GRID_LADDER`). Values past the range are clamped and counted (:func:`clamp_update`).

A contributor count travels in the first field, as in :mod:`clinfed.he.aggregation`: sites refuse
to decrypt a sum of fewer than ``MIN_CONTRIBUTORS`` updates, whatever the server says.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import json
import math
import struct
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from clinfed.he.aggregation import MIN_CONTRIBUTORS, TooFewContributors, _check_weight, _RunningSum
from clinfed.he.ckks import (
    _SEAL_ERRORS,
    InvalidCiphertext,
    _seal_context,
    _seal_dump,
    _seal_restore,
    _secret_tools,
    add_in_two_passes,
    add_parsed,
)
from clinfed.he.context import HEContextError, context_fingerprint
from clinfed.he.masking import CorrectedCiphertexts, MaskFn, Ring, patch_c0
from clinfed.he.packing import FlatWriter, Layout, iter_flat, layout_of
from clinfed.he.params import MAX_COEFF_BITS_128
from clinfed.textio import one_line

# SEAL's fresh-encryption noise: centred binomial, variance 10.5 (σ ≈ 3.24) per coefficient; each
# site's encoding adds a rounding error of variance 1/12 per coefficient.
_NOISE_VAR_PER_SITE = 10.5 + 1.0 / 12.0
# The decoder rounds each half slot; it needs the summed noise below 0.5. We ask 10σ of it (a
# Gaussian tail of 1e-23 per value) and refuse, at decryption, any half slot farther than
# _ROUND_TOLERANCE from an integer (a wrong key or a corrupted sum, never honest noise).
_NOISE_SIGMAS = 10.0
_ROUND_TOLERANCE = 0.45
# Largest |integer| per half slot that float64 (SEAL's encoder and decoder FFTs) carries exactly
# with margin: measured error 0.17 at 2^45 with 20 sites' noise included (docs/he-parameters.md).
_MAX_HALF_SLOT_BITS = 46
_SAFETY_BITS = 1  # below the worst-case (constant vector) wraparound bound

_MAGIC = b"CFK"
_VERSION = 1
_SEEDED, _FULL = b"S", b"F"
_HEADER = len(_MAGIC) + 2
UPLOAD_HEAD = _MAGIC + bytes([_VERSION]) + _SEEDED  # how every compact upload starts (privacy filter)
_SEED_BYTES = 65  # SEAL's UniformRandomGeneratorInfo: 1 byte PRNG type + 64-byte seed


@dataclass(frozen=True)
class CompactParams:
    """CKKS parameters and integer packing of the compact format.

    ``coeff_mod_bit_sizes`` ends with SEAL's special prime (never on the wire); the others are the
    data primes. Each half slot (real or imaginary part) holds ``fields`` signed integers of
    ``field_bits`` bits; ``scale_bits`` sets the CKKS scale Δ.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    scale_bits: int = 15
    field_bits: int = 21
    fields: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if n not in MAX_COEFF_BITS_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)}, got {n}")
        if len(self.coeff_mod_bit_sizes) < 2 or any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise ValueError(
                "coeff_mod_bit_sizes must be ≥ 2 primes of 20 to 60 bits (data primes, then SEAL's special prime; "
                f"TenSEAL contexts need key switching, so a single prime is refused), got {self.coeff_mod_bit_sizes}"
            )
        if self.total_coeff_bits > MAX_COEFF_BITS_128[n]:
            raise ValueError(
                f"{self.total_coeff_bits} coefficient bits exceed the {MAX_COEFF_BITS_128[n]} that N={n} "
                "allows for 128-bit security"
            )
        if not 8 <= self.field_bits <= 40 or not 1 <= self.fields <= 4:
            raise ValueError(f"field_bits must be 8..40 and fields 1..4, got {self.field_bits}, {self.fields}")
        if self.half_slot_bits > _MAX_HALF_SLOT_BITS:
            raise ValueError(
                f"{self.fields} fields of {self.field_bits} bits need {self.half_slot_bits} bits per half slot; "
                f"float64 decoding is exact only up to {_MAX_HALF_SLOT_BITS}"
            )
        if self.max_sites < 1:
            raise ValueError(
                f"scale 2^{self.scale_bits} leaves the CKKS noise of even one site too close to the rounding bound"
            )
        # worst-case coefficient: √2·Δ·2^(half_slot_bits − 1) must stay under q/2 > 2^(data_bits − k − 1)
        need = 0.5 + self.scale_bits + self.half_slot_bits - 1 + _SAFETY_BITS
        room = self.data_bits - len(self.data_primes) - 1
        if need > room:
            raise ValueError(
                f"{self.fields}×{self.field_bits}-bit fields at scale 2^{self.scale_bits} need {need:g} bits under "
                f"q/2, the data primes {self.data_primes} give {room}"
            )

    @property
    def data_primes(self) -> tuple[int, ...]:
        return self.coeff_mod_bit_sizes[:-1]

    @property
    def data_bits(self) -> int:
        return sum(self.data_primes)

    @property
    def total_coeff_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def half_slot_bits(self) -> int:
        return self.field_bits * self.fields

    @property
    def values_per_ciphertext(self) -> int:
        """N/2 complex slots x 2 halves x ``fields``."""
        return self.poly_modulus_degree * self.fields

    @property
    def max_sites(self) -> int:
        """Most sites whose summed CKKS noise stays ``_NOISE_SIGMAS`` standard deviations under 0.5.

        The decoded error of a half slot is (1/Δ)·Σ_i e_i·ζ^i over N noise coefficients of variance
        sites·``_NOISE_VAR_PER_SITE``: standard deviation √(N/2 · sites · var) / Δ.
        """
        sigma_allowed = 0.5 / _NOISE_SIGMAS * 2.0**self.scale_bits
        return int(sigma_allowed**2 / (self.poly_modulus_degree / 2 * _NOISE_VAR_PER_SITE))

    def upload_bytes_per_value(self) -> float:
        """Asymptotic upload size (seeded: c0 only), excluding the 70 bytes per ciphertext."""
        return self.data_bits / 8 / self.fields

    def as_dict(self) -> dict:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale_bits": self.scale_bits,
            "field_bits": self.field_bits,
            "fields_per_half_slot": self.fields,
            "values_per_ciphertext": self.values_per_ciphertext,
            "security_bits": 128,
        }


COMPACT_PARAMS = CompactParams()
# The noise-tied grid (:meth:`CompactSpec.for_noise`): four 10-bit fields per half slot, 16 384 values
# per ciphertext, 1.875 B/param up and 3.75 down. 10 bits hold log2(range/δ) + log2(sites) for a range
# of ≥ 8 noise standard deviations up to 5 sites; more sites step down :data:`GRID_LADDER`.
GRID_PARAMS = CompactParams(field_bits=10, fields=4)
GRID_LADDER = (GRID_PARAMS, CompactParams(field_bits=14, fields=3), COMPACT_PARAMS)
# δ = GRID_FRACTION · noise_std / sites: a tenth of the noise std of each site's (equal) share.
GRID_FRACTION = 0.1
GRID_RANGE_STD = 8.0  # the least range, in noise standard deviations, :meth:`CompactSpec.for_noise` accepts


@dataclass(frozen=True)
class CompactSpec:
    """What every site and the server of a job agree on before a round: bound, sites, parameters.

    ``max_sites`` is the most updates one sum may hold (the server refuses more). Not ``pooled``,
    ``value_bound`` bounds |weight·x| for every value a site sends and the quantum is
    δ = value_bound / M, M = ⌊(2^(field_bits−1) − 1) / max_sites⌋. ``pooled`` (the training jobs),
    each site sends its share s ≤ 1 of the round's total weight (Σ s ≤ 1) times values
    |x| ≤ ``value_bound``, so the bound holds for the whole sum and δ = value_bound / M with
    M = 2^(field_bits−1) − 1 − ⌈max_sites / 2⌉ (each site's rounding may add ½). ``stochastic`` (the
    noise-tied grid, :meth:`for_noise`): values are rounded up or down at random, unbiased, so each
    site's rounding may add < 1 and M = 2^(field_bits−1) − 1 − max_sites.
    """

    value_bound: float
    max_sites: int
    params: CompactParams = COMPACT_PARAMS
    pooled: bool = False
    stochastic: bool = False  # unbiased stochastic rounding (the noise-tied grid) rather than to nearest

    def __post_init__(self) -> None:
        bound = float(self.value_bound)
        if not math.isfinite(bound) or bound <= 0:
            raise ValueError(f"value_bound must be a positive finite number, got {self.value_bound!r}")
        object.__setattr__(self, "value_bound", bound)
        sites = int(self.max_sites)
        if not 1 <= sites <= self.params.max_sites:
            raise ValueError(
                f"max_sites must be 1..{self.params.max_sites} under these parameters (CKKS noise grows with "
                f"the number of summed updates), got {self.max_sites!r}"
            )
        object.__setattr__(self, "max_sites", sites)
        if self.per_site_limit < 1:
            raise ValueError(
                f"{self.params.field_bits}-bit fields leave no room for {sites} sites' rounding; use wider fields"
            )

    @classmethod
    def for_noise(
        cls,
        noise_std: float,
        sites: int,
        params: CompactParams | Sequence[CompactParams] = GRID_LADDER,
        range_std: float = GRID_RANGE_STD,
        fraction: float = GRID_FRACTION,
    ) -> CompactSpec:
        """The pooled grid tied to the job's own noise: δ = ``fraction`` · ``noise_std`` / ``sites``.

        ``noise_std`` is the per-coordinate noise standard deviation σ that DP-SGD already put in each
        site's update (the change from the round's global model). A site sends its share s ≈ 1/sites
        of it, whose noise std is s·σ; δ is ``fraction`` of that, and stochastic rounding makes the
        error unbiased with variance ≤ δ²/4 per site, so the sum's rounding error has std
        ≤ δ·√sites / 2 = σ / (20·√sites) against the average's noise std ≥ σ / √sites: 1/400 of the
        noise variance. The fields hold M = 2^(b−1) − 1 − sites levels (each site's rounding may add
        one), so the range is ±M·δ; ``params`` (one, or a ladder tried in order) gives the first whose
        range reaches ``range_std``·σ (ValueError if none does). Values past the range are clamped
        and counted (:func:`clamp_update`).
        """
        sigma, n = float(noise_std), int(sites)
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"noise_std must be a positive finite number, got {noise_std!r}")
        if not 0 < fraction <= 1 or not range_std > 0:
            raise ValueError(f"fraction must be in (0, 1] and range_std positive, got {fraction!r}, {range_std!r}")
        if n < 1:
            raise ValueError(f"sites must be positive, got {sites!r}")
        ladder = (params,) if isinstance(params, CompactParams) else tuple(params)
        quantum = fraction * sigma / n
        for p in ladder:
            levels = 2 ** (p.field_bits - 1) - 1 - n
            if levels >= 1 and levels * quantum >= range_std * sigma and n <= p.max_sites:
                return cls(levels * quantum, n, p, pooled=True, stochastic=True)
        raise ValueError(
            f"no field width in {[f'{p.fields}x{p.field_bits}' for p in ladder]} holds ±{range_std:g} noise std "
            f"at δ = σ/{1 / (fraction / n):g} for {n} sites"
        )

    @property
    def per_site_limit(self) -> int:
        """M: the largest |integer| one site may put in a field (pooled: the sites together, before rounding).

        Pooled, each site's rounding may add ½ (to nearest) or < 1 (stochastic) to the sum's field."""
        top = 2 ** (self.params.field_bits - 1) - 1
        if self.pooled:
            return top - (self.max_sites if self.stochastic else math.ceil(self.max_sites / 2))
        return top // self.max_sites

    @property
    def sum_limit(self) -> int:
        """The largest |integer| a field of an honest sum can hold."""
        return 2 ** (self.params.field_bits - 1) - 1 if self.pooled else self.max_sites * self.per_site_limit

    @property
    def quantum(self) -> float:
        """δ: the grid every weighted value is rounded to."""
        return self.value_bound / self.per_site_limit

    def sum_error_bound(self, sites: int | None = None) -> float:
        """Worst-case |decrypted sum − exact sum| per value: sites·δ/2 to nearest, sites·δ stochastic
        (rounding only; decoding is exact). Values clamped to the range are not counted here."""
        return (self.max_sites if sites is None else sites) * self.quantum * (1.0 if self.stochastic else 0.5)

    def to_json(self) -> str:
        obj = {"version": _VERSION, "value_bound": self.value_bound, "max_sites": self.max_sites,
               "pooled": bool(self.pooled), "params": {"poly_modulus_degree": self.params.poly_modulus_degree,
                          "coeff_mod_bit_sizes": list(self.params.coeff_mod_bit_sizes),
                          "scale_bits": self.params.scale_bits, "field_bits": self.params.field_bits,
                          "fields": self.params.fields}}  # fmt: skip
        if self.stochastic:  # absent for the fixed grid, whose JSON stays as it was
            obj["rounding"] = "stochastic"
        return json.dumps(obj, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CompactSpec:
        try:
            obj = json.loads(text)
            if obj.get("version") != _VERSION:
                raise ValueError(f"malformed compact spec: unsupported version {obj.get('version')!r}")
            pooled = obj.get("pooled", False)
            if not isinstance(pooled, bool):
                raise ValueError(f"malformed compact spec: pooled={pooled!r}")
            rounding = obj.get("rounding", "nearest")
            if rounding not in ("nearest", "stochastic"):
                raise ValueError(f"malformed compact spec: rounding={rounding!r}")
            params = CompactParams(**obj["params"])
            return cls(float(obj["value_bound"]), int(obj["max_sites"]), params, pooled, rounding == "stochastic")
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed compact spec: {exc}") from exc


def compact_ciphertext_count(params: CompactParams, size: int) -> int:
    """Ciphertexts for ``size`` values plus the contributor count."""
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    return math.ceil((size + 1) / params.values_per_ciphertext)


# --- integer packing (pure numpy) ------------------------------------------------------------------
def quantize(
    values: np.ndarray, spec: CompactSpec, weight: float = 1.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """weight·values / δ rounded as ``spec`` says, as int64, clipped to the per-site field share.

    To nearest (the fixed grid), or stochastically (``spec.stochastic``): up with probability equal to
    the fractional part, so E[integer] = weight·x/δ exactly and the error is < δ (variance ≤ δ²/4).
    ``rng`` (default: a fresh generator seeded by the OS) draws the rounding. Callers vet the values
    first (:func:`_check_update`: finite, within ``spec.value_bound``); the clip only absorbs the last
    ulp of |weight·x/δ| at the bound itself (M is an integer, so stochastic rounding never passes it).
    """
    ints = np.multiply(np.asarray(values, dtype=np.float64).reshape(-1), float(weight) / spec.quantum)
    if spec.stochastic:
        low = np.floor(ints)
        up = (rng or np.random.default_rng()).random(ints.size) < (ints - low)
        ints = np.add(low, up, out=low)
    else:
        np.rint(ints, out=ints)
    limit = spec.per_site_limit
    return np.clip(ints, -limit, limit, out=ints).astype(np.int64)


def clamp_update(arrays: Mapping[str, np.ndarray], spec: CompactSpec) -> tuple[dict[str, np.ndarray], int]:
    """(the arrays with every value clamped to ±``spec.value_bound``, how many values were clamped).

    The pooled grid's range is public and finite; a value past it (a coordinate whose signal outgrew
    the noise-tied range, or a model value past the fixed bound) is clamped rather than refused, and
    the count is reported (the site's audit log; summary ``clamped_values``). NaN/Inf are left for
    :func:`compact_encrypt` to refuse. Arrays with nothing to clamp are passed through uncopied.
    """
    bound, clamped, out = spec.value_bound, 0, {}
    for name, arr in arrays.items():
        limit = bound
        if np.issubdtype(np.asarray(arr).dtype, np.floating):  # the array's own largest value ≤ the bound
            limit = np.asarray(bound, dtype=np.asarray(arr).dtype)
            if float(limit) > bound:  # (compared in float64: NumPy would compare in the array's dtype)
                limit = np.nextafter(limit, limit.dtype.type(0))
        over = int(np.count_nonzero(np.abs(arr) > limit))
        if over:
            clamped += over
            arr = np.clip(arr, -limit, limit)
        out[name] = arr
    return out, clamped


def pack_fields(ints: np.ndarray, params: CompactParams) -> np.ndarray:
    """Signed integers → half-slot integers T = Σ_k f_k·2^(k·field_bits), shape (ciphertexts, N).

    Field k of half slot c in ciphertext j is ``ints[j·N·fields + k·N + c]`` (zero-padded at the end).
    """
    n = params.poly_modulus_degree
    per = params.values_per_ciphertext
    flat = np.asarray(ints, dtype=np.int64).reshape(-1)
    count = max(1, math.ceil(flat.size / per))
    if flat.size != count * per:
        padded = np.zeros(count * per, dtype=np.int64)
        padded[: flat.size] = flat
        flat = padded
    planes = flat.reshape(count, params.fields, n)
    total = planes[:, params.fields - 1, :].copy()
    for k in range(params.fields - 2, -1, -1):
        total <<= params.field_bits
        total += planes[:, k, :]
    return total


def unpack_fields(halves: np.ndarray, params: CompactParams, size: int, field_limit: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_fields` on (possibly summed) half-slot integers: the first ``size`` fields.

    Balanced digits: each field is read in [−2^(b−1), 2^(b−1)), exact while every field sum stays
    inside. ``field_limit`` (if given) bounds |field|; a field past it, or a remainder above the top
    field, raises ValueError (a sum that overflowed, or that was not made under this key).
    """
    b = params.field_bits
    half, mask = 1 << (b - 1), (1 << b) - 1
    rest = np.asarray(halves, dtype=np.int64).copy()
    planes = []
    for _ in range(params.fields):
        field = ((rest + half) & mask) - half
        planes.append(field)
        rest = (rest - field) >> b
    if np.any(rest != 0):
        raise ValueError("decrypted values overflow the packed fields (a wrong key, or a corrupted sum)")
    out = np.stack(planes, axis=1).reshape(-1)[:size]
    if field_limit is not None and out.size and int(np.max(np.abs(out))) > field_limit:
        raise ValueError("decrypted values exceed the fields' head-room (a wrong key, or a corrupted sum)")
    return out


def _bitpack(values: np.ndarray, bits: int) -> bytes:
    """uint64 values < 2^bits → ⌈len·bits/8⌉ bytes, little-endian bit order."""
    if bits == 60 and values.size % 2 == 0:  # the federation's prime: two values in 15 bytes, by shifts
        pairs = np.ascontiguousarray(values, dtype="<u8").reshape(-1, 2)
        words = np.empty((pairs.shape[0], 2), dtype="<u8")  # a pair as 120 bits in two words
        np.left_shift(pairs[:, 1], np.uint64(60), out=words[:, 0])
        words[:, 0] |= pairs[:, 0]
        np.right_shift(pairs[:, 1], np.uint64(4), out=words[:, 1])
        return words.view(np.uint8)[:, :15].tobytes()  # the 16th byte is always zero
    as_bytes = np.ascontiguousarray(values, dtype="<u8").view(np.uint8).reshape(-1, 8)
    planes = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _bitunpack(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    if bits == 60 and count % 2 == 0:  # inverse of _bitpack's fast path
        raw = np.frombuffer(data, dtype=np.uint8, count=count * 15 // 2).reshape(-1, 15)
        padded = np.zeros((raw.shape[0], 16), dtype=np.uint8)  # each pair's 15 bytes as two words
        padded[:, :15] = raw
        words = padded.view("<u8")
        out = np.empty((raw.shape[0], 2), dtype=np.uint64)
        np.bitwise_and(words[:, 0], np.uint64((1 << 60) - 1), out=out[:, 0])
        out[:, 1] = (words[:, 0] >> np.uint64(60)) | (words[:, 1] << np.uint64(4))
        return out.reshape(-1)
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits]
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, :bits] = planes.reshape(count, bits)
    return np.packbits(full, axis=1, bitorder="little").reshape(-1).view("<u8").astype(np.uint64)


def _packed_len(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# --- zstd (SEAL's own save is always compressed) ------------------------------------------------------
_zstd_lock = threading.Lock()
_zstd_lib: Any = None


def _zstd() -> Any:
    """ZSTD_decompress from the SEAL extension itself (it exports zstd), else the system libzstd."""
    global _zstd_lib
    with _zstd_lock:
        if _zstd_lib is None:
            candidates = []
            with contextlib.suppress(ImportError):
                candidates.append(importlib.import_module("_sealapi_cpp").__file__)
            candidates.append(ctypes.util.find_library("zstd"))
            for path in filter(None, candidates):
                try:
                    lib = ctypes.CDLL(path)
                    fn = lib.ZSTD_decompress
                except (OSError, AttributeError):
                    continue
                fn.restype = ctypes.c_size_t
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
                lib.ZSTD_isError.restype = ctypes.c_uint
                lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
                _zstd_lib = lib
                break
            else:
                raise HEContextError("the compact HE format needs zstd (in the SEAL extension or as libzstd)")
        return _zstd_lib


def _seal_body(blob: bytes, expected: int) -> bytes:
    """SEAL ``save`` output (16-byte header + zstd or raw body) → the raw body, which must be ``expected`` long."""
    magic, header_size, _, _, mode, _, size = struct.unpack_from("<HBBBBHQ", blob)
    if magic != 0xA15E or header_size != 16 or size != len(blob):
        raise HEContextError("unexpected SEAL serialisation header")
    if mode == 0:
        body = blob[16:]
    elif mode == 2:
        lib = _zstd()
        out = ctypes.create_string_buffer(expected)
        got = lib.ZSTD_decompress(out, expected, blob[16:], len(blob) - 16)
        if lib.ZSTD_isError(got) or got != expected:
            raise HEContextError("SEAL's serialisation does not have the layout the compact format expects")
        body = out.raw
    else:
        raise HEContextError(f"unsupported SEAL compression mode {mode}")
    if len(body) != expected:
        raise HEContextError("SEAL's serialisation does not have the layout the compact format expects")
    return body


def _seal_header(total: int) -> bytes:
    h = sa.Serialization.SEALHeader()
    return struct.pack("<HBBBBHQ", 0xA15E, 16, h.version_major, h.version_minor, 0, 0, total)


# --- the SEAL view of a compact context ---------------------------------------------------------------
@dataclass(frozen=True)
class _Compact:
    context: Any
    encoder: Any
    evaluator: Any
    encryptor: Any | None
    decryptor: Any | None
    params: CompactParams
    scale: float
    moduli: tuple[int, ...]
    bits: tuple[int, ...]
    seeded_prefix: bytes  # SEAL body up to c0's data (seeded ciphertext)
    seed_header: bytes  # SEAL header of the seed record that follows c0
    full_prefix: bytes  # SEAL body up to the data of a full (c0, c1) ciphertext

    @property
    def n(self) -> int:
        return self.params.poly_modulus_degree

    @property
    def k(self) -> int:
        return len(self.moduli)

    def packed_poly_bytes(self, polys: int) -> int:
        return sum(_packed_len(polys * self.n, b) for b in self.bits)


_cache: weakref.WeakKeyDictionary[ts.Context, _Compact] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _prefix(parms_id: Sequence[int], polys: int, n: int, k: int, scale: float, stored: int) -> bytes:
    """SEAL 4.x ``Ciphertext::save_members`` up to the coefficient data (``stored`` polynomials of data)."""
    words = stored * k * n
    return (
        struct.pack("<4Q", *parms_id)
        + b"\x01"  # NTT form
        + struct.pack("<3Q", polys, n, k)
        + struct.pack("<d", scale)
        + struct.pack("<Q", 1)  # correction factor
        + _seal_header(16 + 8 + 8 * words)
        + struct.pack("<Q", words)
    )


def _compact(ctx: ts.Context, params: CompactParams) -> _Compact:
    """SEAL objects for a compact-format context, built once per context (HEContextError if ``ctx`` was
    not made with ``params``: the packing is not stored in a context, so the job's spec names it)."""
    private = ctx.is_private()
    with _cache_lock:
        cached = _cache.get(ctx)
    if cached is not None and cached.params == params and (cached.decryptor is not None) == private:
        return cached
    parms, context, parts = _seal_context(ctx, "the compact format needs CKKS")
    # The scale is the ciphertext's, not the context's: the federation's key serves both formats.
    got = (parms.poly_modulus_degree(), tuple(m.bit_count() for m in parms.coeff_modulus()))
    want = (params.poly_modulus_degree, params.coeff_mod_bit_sizes)
    if got != want:
        raise HEContextError(
            f"context (N={got[0]}, primes {list(got[1])}) is not the compact format's "
            f"(N={want[0]}, primes {list(want[1])})"
        )
    data = context.first_context_data()
    moduli = tuple(m.value() for m in data.parms().coeff_modulus())
    n, k, scale = params.poly_modulus_degree, len(moduli), 2.0**params.scale_bits
    parms_id = list(context.first_parms_id())
    encoder, evaluator = sa.CKKSEncoder(context), sa.Evaluator(context)
    encryptor, decryptor = _secret_tools(context, parts)
    seeded_prefix = _prefix(parms_id, 2, n, k, scale, 1)
    seed_header = _seal_header(16 + _SEED_BYTES)
    full_prefix = _prefix(parms_id, 2, n, k, scale, 2)
    # Check the layout against SEAL's own serialisation of a real ciphertext before any payload relies on it.
    plain = sa.Plaintext()
    encoder.encode(0.0, scale, plain)
    if encryptor is not None or parts.public_key:
        if encryptor is None:
            public = sa.PublicKey()
            _seal_restore(lambda path: public.load(context, path), parts.public_key)
            ct = sa.Ciphertext()
            sa.Encryptor(context, public).encrypt(plain, ct)
        else:
            ct = sa.Ciphertext()
            encryptor.encrypt_symmetric(plain, ct)
        words = 2 * k * n
        body = _seal_body(_seal_dump(ct.save), len(full_prefix) + 8 * words)
        if body[: len(full_prefix)] != full_prefix:
            raise HEContextError("SEAL's ciphertext layout is not the one the compact format was written for")
        if encryptor is not None:
            seeded = _seal_dump(encryptor.encrypt_symmetric(plain).save)
            body = _seal_body(seeded, len(seeded_prefix) + 8 * k * n + 16 + _SEED_BYTES)
            if body[: len(seeded_prefix)] != seeded_prefix or body[-16 - _SEED_BYTES : -_SEED_BYTES] != seed_header:
                raise HEContextError(
                    "SEAL's seeded ciphertext layout is not the one the compact format was written for"
                )
    bundle = _Compact(
        context, encoder, evaluator, encryptor, decryptor, params, scale, moduli,
        tuple(m.bit_length() for m in moduli[:k]), seeded_prefix, seed_header, full_prefix,
    )  # fmt: skip
    with _cache_lock:
        _cache[ctx] = bundle
    return bundle


# --- wire format ---------------------------------------------------------------------------------------
def _encode_wire(seal: _Compact, kind: bytes, words: np.ndarray, seed: bytes = b"") -> bytes:
    polys = 1 if kind == _SEEDED else 2
    coeffs = words.reshape(polys, seal.k, seal.n)
    parts = [_MAGIC, bytes([_VERSION]), kind, seed]
    parts += [_bitpack(coeffs[:, j, :].reshape(-1), bits) for j, bits in enumerate(seal.bits)]
    return b"".join(parts)


def _wire_words(seal: _Compact, data: Any, kind: bytes, label: str) -> np.ndarray:
    """Our wire bytes → the ciphertext's coefficient words (polys·k·n, uint64), vetted against q."""
    return _parse_wire(seal, data, kind, label)[0].reshape(-1)


def _parse_wire(seal: _Compact, data: Any, kind: bytes, label: str) -> tuple[np.ndarray, memoryview]:
    polys = 1 if kind == _SEEDED else 2
    seed_len = _SEED_BYTES if kind == _SEEDED else 0
    expected = _HEADER + seed_len + seal.packed_poly_bytes(polys)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"{label} is {type(data).__name__}, not bytes")
    view = memoryview(data)
    if len(view) != expected:
        raise ValueError(f"{label} is {len(view)} bytes, a compact {'upload' if polys == 1 else 'sum'} is {expected}")
    if bytes(view[:3]) != _MAGIC or view[3] != _VERSION or bytes(view[4:5]) != kind:
        raise ValueError(f"{label} is not a compact-format {'upload' if polys == 1 else 'sum'} ciphertext")
    offset = _HEADER + seed_len
    count = polys * seal.n
    coeffs = np.empty((polys, seal.k, seal.n), dtype="<u8")
    for j, bits in enumerate(seal.bits):
        size = _packed_len(count, bits)
        values = _bitunpack(view[offset : offset + size], count, bits)
        if np.any(values >= np.uint64(seal.moduli[j])):
            raise ValueError(f"{label} holds coefficients outside the federation's modulus")
        coeffs[:, j, :] = values.reshape(polys, seal.n)
        offset += size
    return coeffs, view


def _decode_wire(seal: _Compact, data: Any, kind: bytes, label: str) -> bytearray:
    """Our wire bytes → SEAL's uncompressed serialisation (raises ValueError with a reason)."""
    polys = 1 if kind == _SEEDED else 2
    seed_len = _SEED_BYTES if kind == _SEEDED else 0
    coeffs, view = _parse_wire(seal, data, kind, label)
    # SEAL's serialisation, written once into one buffer: header, prefix, coefficients, (seed record)
    prefix = seal.seeded_prefix if polys == 1 else seal.full_prefix
    start = 16 + len(prefix)
    end = start + coeffs.nbytes
    raw = bytearray(end + (len(seal.seed_header) + seed_len if polys == 1 else 0))
    raw[:16] = _seal_header(len(raw))
    raw[16:start] = prefix
    np.frombuffer(raw, dtype=np.uint8, count=end - start, offset=start)[:] = coeffs.view(np.uint8).reshape(-1)
    if polys == 1:
        raw[end:] = seal.seed_header + bytes(view[_HEADER : _HEADER + seed_len])
    return raw


def _load(seal: _Compact, data: Any, kind: bytes, label: str) -> Any:
    raw = _decode_wire(seal, data, kind, label)
    ct = sa.Ciphertext()
    try:
        _seal_restore(lambda path: ct.load(seal.context, path), raw)
    except _SEAL_ERRORS as exc:
        raise ValueError(f"{label} does not load under the federation's context ({one_line(exc)})") from exc
    return ct


def _dump_full(seal: _Compact, ct: Any) -> bytes:
    words = 2 * seal.k * seal.n
    if ct.size() != 2 or ct.coeff_modulus_size() != seal.k or ct.poly_modulus_degree() != seal.n:
        raise ValueError("not a fresh-level two-polynomial ciphertext of this context")
    body = _seal_body(_seal_dump(ct.save), len(seal.full_prefix) + 8 * words)
    data = np.frombuffer(body, dtype="<u8", offset=len(seal.full_prefix)).astype(np.uint64)
    return _encode_wire(seal, _FULL, data)


# --- site side ----------------------------------------------------------------------------------------
_CHUNK_CIPHERTEXTS = 64  # ciphertexts' worth of values (64 x 8192) quantised and packed at a time


def _encrypt_halves(seal: _Compact, halves: np.ndarray, out: Any, mask: MaskFn | None = None, first: int = 0) -> None:
    """Encrypt rows of half-slot integers as seeded compact uploads, appending each to ``out``;
    ``mask(i)`` (secure aggregation, :mod:`clinfed.he.masking`) is added to ciphertext ``first + i``'s c0."""
    n, k = seal.n, seal.k
    c0_words = k * n
    expected = len(seal.seeded_prefix) + 8 * c0_words + 16 + _SEED_BYTES
    start = len(seal.seeded_prefix)
    for i, row in enumerate(halves):
        values = row.astype(np.float64)
        plain = sa.Plaintext()
        seal.encoder.encode((values[: n // 2] + 1j * values[n // 2 :]).tolist(), seal.scale, plain)
        body = _seal_body(_seal_dump(seal.encryptor.encrypt_symmetric(plain).save), expected)
        c0 = np.frombuffer(body, dtype="<u8", count=c0_words, offset=start).astype(np.uint64)
        if mask is not None:
            patch_c0(c0, mask(first + i), _ring(seal))
        out.append(_encode_wire(seal, _SEEDED, c0, body[-_SEED_BYTES:]))


def _ring(seal: _Compact) -> Ring:
    return Ring(seal.n, seal.moduli)


def _site_seal(ctx: ts.Context, params: CompactParams) -> _Compact:
    seal = _compact(ctx, params)
    if seal.encryptor is None:
        raise HEContextError("this context holds no secret key: only sites encrypt")
    return seal


def compact_encrypt_ints(
    ctx: ts.Context,
    ints: np.ndarray,
    params: CompactParams = COMPACT_PARAMS,
    into: Any = None,
    mask: MaskFn | None = None,
) -> Sequence[bytes]:
    """Encrypt signed integers (each within one site's share of a field) as seeded compact uploads;
    ``into`` (default: a new list) receives each ciphertext as it is made."""
    seal = _site_seal(ctx, params)
    out = [] if into is None else into
    _encrypt_halves(seal, pack_fields(ints, seal.params), out, mask)
    return out


def compact_unmasked(ctx: ts.Context, cts: Sequence[bytes], correction: MaskFn, params: CompactParams = COMPACT_PARAMS):
    """A compact sum (full ciphertexts) seen through ``correction(i)`` added to each c0, read one
    ciphertext at a time (:class:`clinfed.he.masking.CorrectedCiphertexts`): what a decrypting site
    hands the decryptor once it has the members' reveals. Malformed bytes raise as in decryption."""
    seal = _compact(ctx, params)
    ring = _ring(seal)

    def correct(index: int, data: Any) -> bytes:
        words = _wire_words(seal, data, _FULL, f"ciphertext {index + 1} of {len(cts)}")
        c0 = words[: seal.k * seal.n]
        patch_c0(c0, correction(index), ring)
        return _encode_wire(seal, _FULL, words)

    return CorrectedCiphertexts(cts, correct)


def _check_update(arrays: Mapping[str, np.ndarray], layout: Layout, bound: float, spec: CompactSpec, w: float) -> None:
    """Refuse NaN/Inf and any value past the bound, layer by layer, before anything is encrypted."""
    for name in layout.names:
        arr = np.asarray(arrays[name])
        if arr.size == 0:
            continue
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(
                f"update holds {int((~finite).sum())} NaN/Inf values (first in layer '{name}'); refusing to encrypt it"
            )
        peak = float(np.max(np.abs(arr)))
        if peak * (1.0 if spec.pooled else w) > bound:
            what = "value" if spec.pooled else "weighted value"
            shown = peak if spec.pooled else peak * w
            raise ValueError(
                f"{what} {shown:.6g} in layer '{name}' exceeds the job's value_bound ±{bound:.6g}, past which "
                f"{spec.max_sites} sites' sum would overflow its field; clip the update or raise the bound"
            )


def compact_encrypt(
    ctx: ts.Context,
    arrays: Mapping[str, np.ndarray],
    weight: float,
    spec: CompactSpec,
    into: Any = None,
    mask: MaskFn | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Sequence[bytes], Layout]:
    """A site's update: multiply by ``weight``, quantise to ``spec``'s grid, pack, encrypt (seeded).

    ``weight`` is the site's share s ∈ (0, 1] of the round's total weight when ``spec.pooled``, its
    aggregation weight otherwise. Refuses (ValueError, one line, before encrypting) a bad weight,
    NaN/Inf, and any value past the bound (pooled |x|, else |weight·x|, above ``spec.value_bound``).
    The first field carries the contributor count (1). The model is walked in chunks of
    ``_CHUNK_CIPHERTEXTS`` ciphertexts, and ``into`` (default: a new list) receives each ciphertext.
    ``mask(i)``: the secure-aggregation mask of ciphertext i (:mod:`clinfed.fl.secagg`), added to c0.
    ``rng``: the stochastic rounding's generator (``spec.stochastic``; default seeded by the OS).
    """
    w = float(weight)
    if not math.isfinite(w) or w <= 0 or (spec.pooled and w > 1.0):
        raise ValueError(
            f"aggregation {'share' if spec.pooled else 'weight'} {weight!r} is not a "
            + ("fraction in (0, 1] of the round's total weight" if spec.pooled else "positive finite number")
        )
    seal = _site_seal(ctx, spec.params)  # a context of another format fails here, before any work
    layout = layout_of(arrays)
    _check_update(arrays, layout, spec.value_bound, spec, w)
    out = [] if into is None else into
    per = seal.params.values_per_ciphertext * _CHUNK_CIPHERTEXTS

    made, rng = 0, (rng or np.random.default_rng()) if spec.stochastic else None
    for i, chunk in enumerate(iter_flat(arrays, layout, per, head=np.ones(1))):  # the count's slot first
        ints = quantize(chunk, spec, w, rng)
        if i == 0:
            ints[0] = 1  # the contributor count, not a model value: not weighted, not on the grid
        halves = pack_fields(ints, seal.params)
        _encrypt_halves(seal, halves, out, mask, made)
        made += len(halves)
    return out, layout


def _decrypt_halves(seal: _Compact, data: Any, label: str) -> np.ndarray:
    ct = _load(seal, data, _FULL, label)
    plain = sa.Plaintext()
    seal.decryptor.decrypt(ct, plain)
    z = np.asarray(seal.encoder.decode_complex(plain), dtype=np.complex128)
    values = np.concatenate([z.real, z.imag])
    rounded = np.rint(values)
    if not np.all(np.abs(values - rounded) <= _ROUND_TOLERANCE) or np.any(
        np.abs(rounded) >= 2.0 ** (seal.params.half_slot_bits)
    ):
        raise ValueError(
            f"{label} does not decrypt to whole numbers under this key: another federation's key, "
            "or a sum past its noise bound; refusing it"
        )
    return rounded.astype(np.int64)


def _decrypted_fields(
    ctx: ts.Context, cts: Sequence[bytes], size: int, params: CompactParams, field_limit: int | None, source: str
) -> Any:
    """Yield a compact sum's signed integer fields one ciphertext at a time (the first ``size`` in all)."""
    seal = _compact(ctx, params)
    if seal.decryptor is None:
        raise HEContextError("this context holds no secret key: it cannot decrypt")
    expected = math.ceil(size / seal.params.values_per_ciphertext)
    if isinstance(cts, str | bytes) or not isinstance(cts, Sequence) or len(cts) != expected:
        got = len(cts) if isinstance(cts, Sequence) and not isinstance(cts, str | bytes) else type(cts).__name__
        raise ValueError(f"{source}: sent {got} ciphertexts, expected {expected}")
    per, left = seal.params.values_per_ciphertext, size
    for i in range(expected):
        label = f"{source}: ciphertext {i + 1} of {expected}"
        try:
            yield unpack_fields(_decrypt_halves(seal, cts[i], label)[None, :], seal.params, min(per, left), field_limit)
        except ValueError as exc:
            raise ValueError(exc.args[0] if str(exc).startswith(source) else f"{source}: {exc}") from exc
        left -= per


def compact_decrypt_ints(
    ctx: ts.Context,
    cts: Sequence[bytes],
    size: int,
    params: CompactParams = COMPACT_PARAMS,
    field_limit: int | None = None,
    source: str = "server",
) -> np.ndarray:
    """Decrypt a compact sum into its first ``size`` signed integer fields, exactly.

    Raises ValueError (one line) for a wrong count, malformed bytes, or a sum that does not decrypt
    to whole numbers within the fields (another federation's key, or a corrupted sum).
    """
    parts = list(_decrypted_fields(ctx, cts, size, params, field_limit, source))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _checked_count(first: np.ndarray, spec: CompactSpec, source: str) -> int:
    contributors = int(first[0])
    if not 1 <= contributors <= spec.max_sites:
        raise ValueError(f"{source}: contributor count {contributors} is outside 1..{spec.max_sites}; refusing the sum")
    if contributors < MIN_CONTRIBUTORS:
        raise TooFewContributors(
            f"{source}: the encrypted sum holds {contributors} update(s), fewer than {MIN_CONTRIBUTORS}: "
            "decrypting it would let a contributor read another's update; refusing"
        )
    return contributors


def _decrypt_into(
    ctx: ts.Context, cts: Sequence[bytes], layout: Layout, spec: CompactSpec, factor: float, source: str
) -> tuple[dict[str, np.ndarray], int]:
    """Decrypt one ciphertext at a time, check the contributor count on the first, and write
    fields·``factor`` straight into arrays of the layout (see :class:`FlatWriter`)."""
    writer, contributors = FlatWriter(layout), 0
    for i, fields in enumerate(_decrypted_fields(ctx, cts, layout.size + 1, spec.params, spec.sum_limit, source)):
        if i == 0:
            contributors = _checked_count(fields, spec, source)  # refused before any value is used
            fields = fields[1:]
        writer.write(fields * factor)
    return writer.result(), contributors


def compact_decrypt_sum(
    ctx: ts.Context, cts: Sequence[bytes], layout: Layout, spec: CompactSpec, source: str = "server"
) -> tuple[dict[str, np.ndarray], int]:
    """(the summed weighted arrays in float64, the true contributor count), refusing fewer than
    ``MIN_CONTRIBUTORS``. Each value is within ``spec.sum_error_bound(count)`` of the exact sum."""
    wide = Layout(layout.names, layout.shapes, tuple(np.dtype(np.float64).str for _ in layout.names))
    return _decrypt_into(ctx, cts, wide, spec, spec.quantum, source)


def compact_decrypt_average(
    ctx: ts.Context,
    cts: Sequence[bytes],
    total_weight: float,
    layout: Layout,
    spec: CompactSpec,
    source: str = "server",
) -> dict[str, np.ndarray]:
    """Decrypt the sum and divide by the (public) total weight, in the layout's dtypes, one
    ciphertext at a time: the site holds the model in its own dtypes plus one ciphertext's values."""
    total = float(total_weight)
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"total weight {total_weight!r} is not a positive finite number")
    return _decrypt_into(ctx, cts, layout, spec, spec.quantum / total, source)[0]


# --- server side --------------------------------------------------------------------------------------
def vet_upload(
    site: str, cts: Any, weight: float, fingerprint: str, spec: str | None, own_fingerprint: str, own_spec: CompactSpec
) -> float:
    """The checks an upload passes before a sum looks at its bytes (the dense compact sum here and the
    compressed one in `he.truncated`): a valid weight, the federation's key, the job's spec, and some
    ciphertexts at all. Returns the weight; raises InvalidCiphertext naming the site."""
    w = _check_weight(site, weight)
    if fingerprint != own_fingerprint:
        raise InvalidCiphertext(site, "ciphertexts were made under another federation's key (context fingerprint)")
    if spec is not None and spec != own_spec.to_json():
        raise InvalidCiphertext(site, "quantised with another compact spec (value bound, sites or parameters)")
    if isinstance(cts, str | bytes) or not isinstance(cts, Sequence) or not len(cts):
        raise InvalidCiphertext(site, "sent no ciphertexts")
    return w


def check_room(site: str, sites: list[str], max_sites: int) -> None:
    """Under the sum's lock: one upload per site, and no more sites than the spec's fields can hold."""
    if site in sites:
        raise InvalidCiphertext(site, "already contributed to this sum")
    if len(sites) >= max_sites:
        raise InvalidCiphertext(site, f"the sum already holds max_sites={max_sites} updates")


class CompactSum(_RunningSum):
    """Server-side running sum of compact uploads (no secret key); vets each upload before adding.

    Besides what :class:`clinfed.he.EncryptedSum` checks (fingerprint, count, parse, duplicates), it
    refuses a contribution past ``spec.max_sites`` (the fields' head-room is sized for that many) and
    a site that declares another spec. An upload in memory (a list) is parsed once and added; one
    streamed from a spool is vetted whole first, then read again and added one ciphertext at a time,
    so the server holds the running sum plus one ciphertext in flight.
    """

    def __init__(self, ctx: ts.Context, spec: CompactSpec, fingerprint: str | None = None, size: int | None = None):
        if ctx.is_private():
            raise HEContextError(
                "CompactSum runs on the server, whose context must not hold the secret key "
                "(load it with load_server_context)"
            )
        self._seal = _compact(ctx, spec.params)
        self.spec = spec
        self.fingerprint = fingerprint or context_fingerprint(ctx)
        self._expected = None if size is None else compact_ciphertext_count(spec.params, size)
        self._total: list[Any] | None = None
        self._weight = 0.0
        self._sites: list[str] = []
        self._lock = threading.Lock()

    def add(self, site: str, cts: Sequence[bytes], weight: float, fingerprint: str, spec: str | None = None) -> None:
        """Vet ``site``'s upload, then add it; on any problem raise InvalidCiphertext and leave the sum intact."""
        w = vet_upload(site, cts, weight, fingerprint, spec, self.fingerprint, self.spec)
        with self._lock:
            check_room(site, self._sites, self.spec.max_sites)
            expected = self._expected if self._expected is not None else len(cts)
            if len(cts) != expected:
                raise InvalidCiphertext(site, f"sent {len(cts)} ciphertexts, expected {expected}")

            def load(i: int) -> Any:
                try:
                    return _load(self._seal, cts[i], _SEEDED, f"ciphertext {i + 1} of {expected}")
                except ValueError as exc:
                    raise InvalidCiphertext(site, str(exc)) from exc

            def parse() -> Iterator[Any]:
                return (load(i) for i in range(expected))

            if isinstance(cts, list | tuple):  # in memory: parse once (all of it vetted before adding)
                self._total = add_parsed(self._seal.evaluator, self._total, list(parse()))
            else:  # a spool: vet it whole, then read it again one ciphertext at a time
                self._total = add_in_two_passes(self._seal.evaluator, self._total, parse)
            self._expected = expected
            self._weight += w
            self._sites.append(site)

    def result(self, into: Any = None) -> tuple[Sequence[bytes], float, list[str]]:
        """(the encrypted sum in the compact wire format, total weight, contributing sites); ``into``
        (default: a new list) receives each serialised ciphertext."""
        with self._lock:
            if self._total is None:
                raise ValueError("no site contributed to the sum")
            out = [] if into is None else into
            for ct in self._total:
                out.append(_dump_full(self._seal, ct))
            return out, self._weight, list(self._sites)


def sum_compact(ctx: ts.Context, payloads: Sequence[Sequence[bytes]], spec: CompactSpec) -> list[bytes]:
    """Sum several sites' compact uploads (server context); each is vetted first."""
    acc = CompactSum(ctx, spec)
    for j, payload in enumerate(payloads, start=1):
        acc.add(f"payload {j}", payload, 1.0, acc.fingerprint)
    return acc.result()[0]


def is_compact_upload(head: bytes) -> bool:
    """Whether ``head`` (≥ :data:`UPLOAD_HEAD` bytes) starts a compact-format seeded upload."""
    return bytes(head[: len(UPLOAD_HEAD)]) == UPLOAD_HEAD
