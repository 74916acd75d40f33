"""Compressed updates on the compact format's key: k values in the first ⌈(k+1)/2⌉ coefficients of c0.

Why a wire format of its own (issue 25, item 3). A compressed upload carries k = ⌈F·P⌉ values; in
the slot-encoded formats those k values still cost a whole ciphertext (33 KB real-valued, 30 KB
compact), so `--compression 0.01` sent 52 % of the dense compact bytes on the 12 k UNet. Here the
values go into the *coefficients* of the plaintext polynomial, not its slots, so a ciphertext is only
as long as the values it holds:

* **Encoding.** Each value is quantised on the job's :class:`~clinfed.he.compact.CompactSpec` grid
  (the dense format's integers: the sum is exact), two signed fields per coefficient
  (T = f0 + f1·2^21, as the compact format packs a half slot), and coefficient i of the plaintext is
  Δ·T_i (Δ = 2^scale_bits). A ciphertext holds N coefficients, i.e. the dense format's 2·N values.
* **Truncation.** A fresh symmetric ciphertext is (c0, c1) = (−a·s + e + m, a) with ``a`` expanded
  from SEAL's 64-byte seed. Decryption of coefficient i needs only c0[i] and a (c0[i] + (a·s)[i] =
  Δ·T_i + e_i), and addition is coefficient-wise, so a site sends the seed and the first t
  coefficients of c0 (in coefficient form, modulo the first data prime only): t = ⌈values/2⌉, 60 bits
  each, i.e. 3.75 B per value and 69 bytes per ciphertext. Dropping coefficients of an RLWE sample
  leaves a subset of its LWE samples: no key material is exposed.
* **Server.** It vets each upload (length, every coefficient < q, and the seed: SEAL expands it under
  the federation's context) and adds the coefficients mod q; the sum it returns is Σ c0[:t] plus the
  contributors' seeds (65 bytes per site and ciphertext), never holding a secret key.
* **Decryption.** A site expands every contributor's seed, adds the a's, lets SEAL decrypt (0, Σa)
  to Σa·s (NTT form), brings that back to coefficients (SEAL's inverse NTT on a ciphertext), adds
  Σ c0[:t], centres mod q and divides by Δ. The summed noise (≤ 20 per site, SEAL's clipped
  binomial) is far below Δ/2, so the integers come out exactly; anything farther than
  :data:`_TOLERANCE_PER_SITE` per site from a multiple of Δ is refused (a wrong key, a subset of a
  masked sum, or garbage).
* **Secure aggregation.** The masks of :mod:`clinfed.he.masking` are added to the first t
  coefficients of c0 (first prime's row of ciphertext i's mask words): uniform mod q, they cancel
  exactly in the members' sum, and one upload alone decrypts to uniform noise.

Uses a few of :mod:`clinfed.he.compact`'s private helpers (SEAL's bundle for the context, SEAL's
serialisation layout, the 60-bit bit-packing) rather than copying them; this module adds to that
format, it does not change it.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from clinfed.he.aggregation import MIN_CONTRIBUTORS, TooFewContributors
from clinfed.he.ckks import _SEAL_ERRORS, InvalidCiphertext, _seal_dump, _seal_restore
from clinfed.he.compact import (
    _SEED_BYTES,
    COMPACT_PARAMS,
    CompactParams,
    CompactSpec,
    _bitpack,
    _bitunpack,
    _compact,
    _packed_len,
    _seal_body,
    _seal_header,
    check_room,
    quantize,
    vet_upload,
)
from clinfed.he.context import HEContextError, context_fingerprint
from clinfed.he.masking import CorrectedCiphertexts, MaskFn
from clinfed.textio import one_line

_MAGIC = b"CFT"
_VERSION = 1
_UPLOAD, _SUM = b"U", b"S"
_HEADER = len(_MAGIC) + 2
UPLOAD_HEAD = _MAGIC + bytes([_VERSION]) + _UPLOAD  # how every truncated upload starts (privacy filter)
_PRNG_TYPES = (1, 2)  # SEAL's prng_type: blake2xb, shake256 (0 is "unknown")
# SEAL's symmetric encryption noise is a centred binomial clipped at 6σ = 19.2 per coefficient.
_TOLERANCE_PER_SITE = 20
_PLAIN_PREFIX = 32 + 8 + 8 + 16 + 8  # Plaintext::save_members: parms_id, coeff_count, scale, data header, count


def coefficients_per_ciphertext(params: CompactParams = COMPACT_PARAMS) -> int:
    return params.poly_modulus_degree


def values_per_ciphertext(params: CompactParams = COMPACT_PARAMS) -> int:
    return params.poly_modulus_degree * params.fields


def truncated_shape(size: int, params: CompactParams = COMPACT_PARAMS) -> list[int]:
    """Coefficients of each ciphertext for ``size`` values plus the contributor count."""
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    total, per = size + 1, values_per_ciphertext(params)
    counts = [per] * (total // per) + ([total % per] if total % per else [])
    return [math.ceil(c / params.fields) for c in counts]


def upload_bytes(size: int, params: CompactParams = COMPACT_PARAMS) -> int:
    """Bytes of one site's truncated upload of ``size`` values (what `bytes_sent` counts of the ciphertexts)."""
    bits = params.data_primes[0]
    return sum(_HEADER + _SEED_BYTES + _packed_len(t, bits) for t in truncated_shape(size, params))


def dense_compact_upload_bytes(size: int, params: CompactParams = COMPACT_PARAMS) -> int:
    """Bytes of the ciphertexts of one site's *dense* compact upload of ``size`` values (the yardstick
    of compression): the compact format's seeded ciphertexts, header, seed and N bit-packed residues
    per data prime each (its wire layout, restated; a unit test checks it against the real thing)."""
    count = math.ceil((size + 1) / params.values_per_ciphertext)
    per = _HEADER + _SEED_BYTES + sum(_packed_len(params.poly_modulus_degree, b) for b in params.data_primes)
    return count * per


# --- SEAL plumbing ---------------------------------------------------------------------------------
class _Tools:
    """SEAL objects and layout facts for one context (cached per context, like the compact format's)."""

    def __init__(self, ctx: ts.Context, params: CompactParams):
        seal = _compact(ctx, params)
        self.seal, self.params = seal, params
        self.n, self.k = seal.n, seal.k
        self.q = seal.moduli[0]
        self.bits = seal.bits[0]
        self.delta = 1 << params.scale_bits
        # room check: |Δ·T| for the largest packed integer must stay below q/2
        if self.delta * (1 << params.half_slot_bits) >= self.q // 2:
            raise HEContextError("the compact parameters leave no room for coefficient encoding")


_tools_cache: weakref.WeakKeyDictionary[ts.Context, _Tools] = weakref.WeakKeyDictionary()
_tools_lock = threading.Lock()


def _tools(ctx: ts.Context, params: CompactParams) -> _Tools:
    with _tools_lock:
        hit = _tools_cache.get(ctx)
    if hit is not None and hit.params == params and (hit.seal.decryptor is not None) == ctx.is_private():
        return hit
    tools = _Tools(ctx, params)
    with _tools_lock:
        _tools_cache[ctx] = tools
    return tools


def _words(blob: bytes, prefix: int, count: int) -> np.ndarray:
    body = _seal_body(blob, prefix + 8 * count)
    return np.frombuffer(body, dtype="<u8", count=count, offset=prefix).astype(np.uint64)


def _expand(tools: _Tools, seed: bytes) -> Any:
    """(0, a) in NTT form, ``a`` expanded by SEAL from a seeded ciphertext's 65-byte seed record."""
    seal = tools.seal
    words = tools.k * tools.n
    raw = bytearray(16 + len(seal.seeded_prefix) + 8 * words + len(seal.seed_header) + _SEED_BYTES)
    raw[:16] = _seal_header(len(raw))
    raw[16 : 16 + len(seal.seeded_prefix)] = seal.seeded_prefix
    raw[-(len(seal.seed_header) + _SEED_BYTES) :] = seal.seed_header + bytes(seed)
    ct = sa.Ciphertext()
    _seal_restore(lambda path: ct.load(seal.context, path), bytes(raw))
    return ct


def _from_ntt(tools: _Tools, ntt_words: np.ndarray) -> np.ndarray:
    """The first prime's coefficients of a polynomial given in NTT form (k·n words): SEAL's own
    inverse NTT, run on a ciphertext (ntt_words, 1) built from its serialisation."""
    seal = tools.seal
    words = tools.k * tools.n
    raw = bytearray(16 + len(seal.full_prefix) + 16 * words)
    raw[:16] = _seal_header(len(raw))
    raw[16 : 16 + len(seal.full_prefix)] = seal.full_prefix
    start = 16 + len(seal.full_prefix)
    raw[start : start + 8 * words] = np.ascontiguousarray(ntt_words, dtype="<u8").tobytes()
    raw[start + 8 * words :] = np.ones(words, dtype="<u8").tobytes()  # any c1 ≠ 0: SEAL refuses a transparent one
    ct = sa.Ciphertext()
    _seal_restore(lambda path: ct.load(seal.context, path), bytes(raw))
    seal.evaluator.transform_from_ntt_inplace(ct)
    return _words(_seal_dump(ct.save), len(seal.full_prefix), 2 * words)[: tools.n]


# --- integer packing -------------------------------------------------------------------------------
def _pack(ints: np.ndarray, t: int, params: CompactParams) -> np.ndarray:
    """``fields``·t signed integers → t packed integers T_i = Σ_f ints[f·t + i]·2^(f·field_bits)."""
    flat = np.zeros(params.fields * t, dtype=np.int64)
    flat[: ints.size] = ints
    planes = flat.reshape(params.fields, t)
    total = planes[-1].copy()
    for f in range(params.fields - 2, -1, -1):
        total <<= params.field_bits
        total += planes[f]
    return total


def _unpack(packed: np.ndarray, params: CompactParams, count: int, field_limit: int) -> np.ndarray:
    """Inverse of :func:`_pack` with balanced digits; raises on a field past ``field_limit``."""
    b = params.field_bits
    half, mask = 1 << (b - 1), (1 << b) - 1
    rest, planes = packed.copy(), []
    for _ in range(params.fields):
        field = ((rest + half) & mask) - half
        planes.append(field)
        rest = (rest - field) >> b
    out = np.concatenate(planes)[:count]
    if np.any(rest != 0) or (out.size and int(np.max(np.abs(out))) > field_limit):
        raise ValueError("decrypted values exceed the fields' head-room (a wrong key, or not a whole masked sum)")
    return out


def _spans(size: int, params: CompactParams) -> Iterator[tuple[int, int, int]]:
    """(first value, values, coefficients) of each ciphertext for ``size`` values plus the count."""
    per, first = values_per_ciphertext(params), 0
    for t in truncated_shape(size, params):
        count = min(per, size + 1 - first)
        yield first, count, t
        first += count


# --- site side -------------------------------------------------------------------------------------
def truncated_encrypt(
    ctx: ts.Context,
    values: np.ndarray,
    share: float,
    spec: CompactSpec,
    into: Any = None,
    mask: MaskFn | None = None,
) -> Sequence[bytes]:
    """A site's compressed update: ``share``·values on ``spec``'s grid, the count (1) first, as
    truncated uploads appended to ``into`` (default: a new list).

    ``share`` is the site's fraction in (0, 1] of the round's admitted weight (``spec`` is pooled) or
    its weight (not pooled). Refuses (ValueError, one line, before encrypting) NaN/Inf, a value past
    ``spec.value_bound`` and a bad share. ``mask(i)``: ciphertext i's secure-aggregation mask words.
    """
    w = float(share)
    if not math.isfinite(w) or w <= 0 or (spec.pooled and w > 1.0):
        raise ValueError(f"aggregation share {share!r} is not a fraction in (0, 1] of the round's total weight")
    vec = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(vec)):
        raise ValueError(f"compressed update holds {int((~np.isfinite(vec)).sum())} NaN/Inf values; refusing it")
    peak = float(np.max(np.abs(vec))) * (1.0 if spec.pooled else w) if vec.size else 0.0
    if peak > spec.value_bound:
        raise ValueError(f"value {peak:.6g} exceeds the job's value_bound ±{spec.value_bound:.6g}; clip it first")
    tools = _tools(ctx, spec.params)
    seal = tools.seal
    if seal.encryptor is None:
        raise HEContextError("this context holds no secret key: only sites encrypt")
    ints = np.empty(vec.size + 1, dtype=np.int64)
    ints[0] = 1  # the contributor count: not weighted, not on the grid
    ints[1:] = quantize(vec, spec, w)
    zero = sa.Plaintext()
    seal.encoder.encode(0.0, seal.scale, zero)
    words = tools.k * tools.n
    seeded_len = len(seal.seeded_prefix) + 8 * words + len(seal.seed_header) + _SEED_BYTES
    out = [] if into is None else into
    for i, (first, count, t) in enumerate(_spans(vec.size, spec.params)):
        blob = _seal_dump(seal.encryptor.encrypt_symmetric(zero).save)  # (−a·s + e, seed of a), NTT form
        seed = _seal_body(blob, seeded_len)[-_SEED_BYTES:]
        ct = sa.Ciphertext()
        _seal_restore(lambda path, ct=ct: ct.load(seal.context, path), blob)  # SEAL expands a
        seal.evaluator.transform_from_ntt_inplace(ct)
        c0 = _words(_seal_dump(ct.save), len(seal.full_prefix), 2 * words)[:t]  # first prime, first t
        plain = (_pack(ints[first : first + count], t, spec.params) * tools.delta) % tools.q  # Δ·T mod q
        c0 = _add_mod(c0, plain.astype(np.uint64), tools.q)
        if mask is not None:
            c0 = _add_mod(c0, np.asarray(mask(i)).reshape(tools.k, tools.n)[0, :t], tools.q)
        out.append(_MAGIC + bytes([_VERSION]) + _UPLOAD + seed + _bitpack_any(c0, tools.bits))
    return out


def _add_mod(a: np.ndarray, b: np.ndarray, q: int) -> np.ndarray:
    s = a.astype(np.uint64) + b.astype(np.uint64)  # both < q < 2^62: no overflow
    np.subtract(s, np.uint64(q), out=s, where=s >= np.uint64(q))
    return s


def _bitpack_any(values: np.ndarray, bits: int) -> bytes:
    """Bit-pack (the compact format's packer; its 60-bit fast path wants an even count)."""
    if values.size % 2:
        return _bitpack(np.append(values, np.uint64(0)), bits)[: _packed_len(values.size, bits)]
    return _bitpack(values, bits)


def _bitunpack_any(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    if count % 2:
        padded = bytes(data) + bytes(_packed_len(count + 1, bits) - len(data))
        return _bitunpack(padded, count + 1, bits)[:count]
    return _bitunpack(data, count, bits)


def _parse(tools: _Tools, data: Any, kind: bytes, t: int, label: str) -> tuple[list[bytes], np.ndarray]:
    """(seeds, the first t coefficients of c0) of one truncated upload or sum; ValueError naming why."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"{label} is {type(data).__name__}, not bytes")
    view = memoryview(data)
    what = "upload" if kind == _UPLOAD else "sum"
    if len(view) < _HEADER or bytes(view[:3]) != _MAGIC or view[3] != _VERSION or bytes(view[4:5]) != kind:
        raise ValueError(f"{label} is not a truncated-format {what} ciphertext")
    offset, sites = _HEADER, 1
    if kind == _SUM:
        if len(view) < _HEADER + 2:
            raise ValueError(f"{label} is {len(view)} bytes, too short for a truncated sum")
        sites = int.from_bytes(view[_HEADER : _HEADER + 2], "little")
        offset += 2
    expected = offset + sites * _SEED_BYTES + _packed_len(t, tools.bits)
    if len(view) != expected or sites < 1:
        raise ValueError(f"{label} is {len(view)} bytes, a truncated {what} of {t} coefficients is {expected}")
    seeds = [bytes(view[offset + j * _SEED_BYTES : offset + (j + 1) * _SEED_BYTES]) for j in range(sites)]
    if any(s[0] not in _PRNG_TYPES for s in seeds):
        raise ValueError(f"{label} carries a seed of an unknown PRNG type")
    coeffs = _bitunpack_any(view[offset + sites * _SEED_BYTES :], t, tools.bits)
    if np.any(coeffs >= np.uint64(tools.q)):
        raise ValueError(f"{label} holds coefficients outside the federation's modulus")
    return seeds, coeffs


# --- server side ---------------------------------------------------------------------------------------
class TruncatedSum:
    """Server-side running sum of truncated uploads (no secret key): Σ c0[:t] mod q and every
    contributor's seeds. Vets a whole upload (its seeds expanded by SEAL once) before adding any of it."""

    def __init__(self, ctx: ts.Context, spec: CompactSpec, fingerprint: str | None = None, size: int | None = None):
        if ctx.is_private():
            raise HEContextError("TruncatedSum runs on the server, whose context must not hold the secret key")
        self._tools = _tools(ctx, spec.params)
        self.spec = spec
        self.fingerprint = fingerprint or context_fingerprint(ctx)
        self._shape = None if size is None else truncated_shape(size, spec.params)
        self._total: list[np.ndarray] | None = None
        self._seeds: list[list[bytes]] = []
        self._weight = 0.0
        self._sites: list[str] = []
        self._lock = threading.Lock()

    def add(self, site: str, cts: Sequence[bytes], weight: float, fingerprint: str, spec: str | None = None) -> None:
        """Vet ``site``'s upload, then add it; on any problem raise InvalidCiphertext and leave the sum intact."""
        w = vet_upload(site, cts, weight, fingerprint, spec, self.fingerprint, self.spec)
        with self._lock:
            check_room(site, self._sites, self.spec.max_sites)
            shape = self._shape if self._shape is not None else _shape_of(self._tools, cts)
            if len(cts) != len(shape):
                raise InvalidCiphertext(site, f"sent {len(cts)} ciphertexts, expected {len(shape)}")
            parsed = []
            for i, t in enumerate(shape):
                label = f"ciphertext {i + 1} of {len(shape)}"
                try:
                    seeds, coeffs = _parse(self._tools, cts[i], _UPLOAD, t, label)
                    _expand(self._tools, seeds[0])  # SEAL must accept the seed, or no site could decrypt
                except (ValueError, *_SEAL_ERRORS) as exc:
                    raise InvalidCiphertext(site, one_line(exc)) from exc
                parsed.append((seeds[0], coeffs))
            if self._total is None:
                self._total = [c for _, c in parsed]
                self._seeds = [[s] for s, _ in parsed]
            else:
                for i, (seed, coeffs) in enumerate(parsed):
                    self._total[i] = _add_mod(self._total[i], coeffs, self._tools.q)
                    self._seeds[i].append(seed)
            self._shape = shape
            self._weight += w
            self._sites.append(site)

    def result(self, into: Any = None) -> tuple[Sequence[bytes], float, list[str]]:
        """(the sum in the truncated wire format, total weight, contributing sites)."""
        with self._lock:
            if self._total is None:
                raise ValueError("no site contributed to the sum")
            out = [] if into is None else into
            for coeffs, seeds in zip(self._total, self._seeds, strict=True):
                head = _MAGIC + bytes([_VERSION]) + _SUM + len(seeds).to_bytes(2, "little")
                out.append(head + b"".join(seeds) + _bitpack_any(coeffs, self._tools.bits))
            return out, self._weight, list(self._sites)


def _shape_of(tools: _Tools, cts: Sequence[bytes]) -> list[int]:
    """Coefficients per ciphertext as the first upload implies them (every ciphertext full but the last)."""
    last = len(cts[-1]) - _HEADER - _SEED_BYTES
    t_last = max(1, last * 8 // tools.bits)
    return [tools.n] * (len(cts) - 1) + [t_last]


# --- decrypting site -----------------------------------------------------------------------------------
def truncated_unmasked(
    ctx: ts.Context, cts: Sequence[bytes], correction: MaskFn, params: CompactParams = COMPACT_PARAMS
) -> Sequence[bytes]:
    """A truncated sum seen through ``correction(i)`` added to each ciphertext's coefficients (the
    members' self-masks removed, :class:`clinfed.he.masking.CorrectedCiphertexts`)."""
    tools = _tools(ctx, params)

    def correct(index: int, data: Any) -> bytes:
        view = memoryview(data)
        sites = int.from_bytes(view[_HEADER : _HEADER + 2], "little") if len(view) >= _HEADER + 2 else 0
        start = _HEADER + 2 + sites * _SEED_BYTES
        t = max(1, (len(view) - start) * 8 // tools.bits)
        _, coeffs = _parse(tools, data, _SUM, t, f"ciphertext {index + 1} of {len(cts)}")
        fix = np.asarray(correction(index)).reshape(tools.k, tools.n)[0, :t]
        return bytes(view[:start]) + _bitpack_any(_add_mod(coeffs, fix, tools.q), tools.bits)

    return CorrectedCiphertexts(cts, correct)


def truncated_decrypt_ints(
    ctx: ts.Context, cts: Sequence[bytes], size: int, spec: CompactSpec, source: str = "server"
) -> tuple[np.ndarray, int]:
    """(the summed integers of ``size`` values, the contributor count), exactly; refuses fewer than
    ``MIN_CONTRIBUTORS`` (TooFewContributors) and anything that is not a whole sum under this key
    (ValueError, one line naming ``source``)."""
    tools = _tools(ctx, spec.params)
    seal = tools.seal
    if seal.decryptor is None:
        raise HEContextError("this context holds no secret key: it cannot decrypt")
    shape = truncated_shape(size, spec.params)
    if isinstance(cts, str | bytes) or not isinstance(cts, Sequence) or len(cts) != len(shape):
        got = len(cts) if isinstance(cts, Sequence) and not isinstance(cts, str | bytes) else type(cts).__name__
        raise ValueError(f"{source}: sent {got} ciphertexts, expected {len(shape)}")
    out = np.empty(size + 1, dtype=np.int64)
    contributors = 0
    for i, (first, count, t) in enumerate(_spans(size, spec.params)):
        label = f"{source}: ciphertext {i + 1} of {len(shape)}"
        try:
            seeds, coeffs = _parse(tools, cts[i], _SUM, t, label)
            if i == 0:
                contributors = len(seeds)
            elif len(seeds) != contributors:
                raise ValueError(f"{label} holds {len(seeds)} sites' seeds, the first {contributors}")
            if len(seeds) > spec.max_sites:
                raise ValueError(f"{label} holds {len(seeds)} updates, more than max_sites={spec.max_sites}")
            acc = None
            for seed in seeds:
                a = _expand(tools, seed)
                if acc is None:
                    acc = a
                else:
                    seal.evaluator.add_inplace(acc, a)
            plain = sa.Plaintext()
            seal.decryptor.decrypt(acc, plain)  # (0, Σa) → Σa·s, NTT form
            words = tools.k * tools.n
            a_s = _from_ntt(tools, _words(_seal_dump(plain.save), _PLAIN_PREFIX, words))[:t]
            x = _add_mod(coeffs, a_s, tools.q).astype(np.int64)  # Δ·ΣT + Σe (mod q), q < 2^62
            x[x > tools.q // 2] -= tools.q
            packed = np.rint(x / tools.delta).astype(np.int64)  # exact: |x| < 2^58, float64 rounds to ±32
            residual = x - packed * tools.delta
            if np.any(np.abs(residual) > _TOLERANCE_PER_SITE * max(1, len(seeds))):
                raise ValueError(
                    f"{label} does not decrypt to whole numbers under this key: another federation's key, "
                    "or not every member's masked upload exactly once; refusing it"
                )
            out[first : first + count] = _unpack(packed, spec.params, count, spec.sum_limit)
        except (ValueError, *_SEAL_ERRORS) as exc:
            if isinstance(exc, TooFewContributors):
                raise
            message = one_line(exc)
            raise ValueError(message if message.startswith(source) else f"{label}: {message}") from exc
    count = int(out[0])
    if count != contributors or not 1 <= count <= spec.max_sites:
        raise ValueError(
            f"{source}: contributor count {count} does not match the {contributors} seeds the sum carries; refusing it"
        )
    if count < MIN_CONTRIBUTORS:
        raise TooFewContributors(
            f"{source}: the encrypted sum holds {count} update(s), fewer than {MIN_CONTRIBUTORS}: "
            "decrypting it would let a contributor read another's update; refusing"
        )
    return out[1:], count


def truncated_decrypt_average(
    ctx: ts.Context, cts: Sequence[bytes], size: int, total_weight: float, spec: CompactSpec, source: str = "server"
) -> np.ndarray:
    """The ``size`` summed values (weighted shares, ``spec``'s grid) divided by the public total weight."""
    total = float(total_weight)
    if not math.isfinite(total) or total <= 0:
        raise ValueError(f"total weight {total_weight!r} is not a positive finite number")
    ints, _ = truncated_decrypt_ints(ctx, cts, size, spec, source)
    return ints * (spec.quantum / total)


def is_truncated_upload(head: bytes) -> bool:
    """Whether ``head`` (≥ :data:`UPLOAD_HEAD` bytes) starts a truncated-format upload."""
    return bytes(head[: len(UPLOAD_HEAD)]) == UPLOAD_HEAD
