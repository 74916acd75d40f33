"""Secure-aggregation masks inside CKKS: uniform polynomials mod q added to a ciphertext's c0.

Why here, and why this way. CKKS alone protects updates from a server that follows the protocol:
it holds the public key, so it can *encrypt* anything, and the sites (which all hold the secret key)
decrypt whatever sum it sends. A malicious server can therefore add one site's upload to itself
three times, or to an encryption of "count = 2", and the release site decrypts that site's own
update (issue 22). The fix, SecAgg (Bell et al. 2020) moved under the encryption: every upload's
*plaintext polynomial* carries masks that are uniform modulo the data prime q,

    upload_i = Enc(m_i + B_i + Σ_{j ≠ i} ±P_ij)      (mod q, coefficient-wise, in SEAL's NTT form)

where P_ij = PRG(seed shared by sites i and j, bound to run, round, purpose and member set) enters
site i with + and site j with − (so the pairs cancel in the sum over exactly that member set), and
B_i = PRG(a fresh seed only site i knows) is its *self-mask*. Because Enc is linear and the server's
ciphertext addition is coefficient-wise mod q, the masks move through the server's sum unchanged:

* one upload alone, or any sum that is not every member's upload added exactly once (a duplicate, a
  forged count, a subset, another round's upload), decrypts to a uniform polynomial: noise that the
  compact decoder refuses ("not whole numbers") and the real-valued one fails on its count slot;
* the full members' sum decrypts to Σ m_i + Σ B_i; the decrypting site removes Σ B_i from the seeds
  the members reveal (each only once, for the last member set it uploaded for: `clinfed.fl.secagg`).

Adding a mask costs no byte (c0 is uniform-looking anyway) and no precision (the masks cancel
*exactly*, mod q). The PRG is ChaCha20 keyed by a 32-byte seed; ciphertext ``i`` takes the
keystream blocks from ``i · blocks_per_ciphertext`` on, so any range of ciphertexts is generated in
one call without generating the ones before it. A 64-bit keystream word is reduced to ``bits(q)``
bits and then mod q: the statistical distance from uniform is (2^bits − q) / 2^bits, checked below
2^-40 for every prime in use (SEAL's NTT primes sit just under a power of two).

This module is pure (numpy + ``cryptography`` + the SEAL serialisation helpers); the protocol that
agrees the seeds, signs the member sets and collects the reveals is :mod:`clinfed.fl.secagg`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MaskFn = Callable[[int], np.ndarray]  # ciphertext index → its mask words (k·n, uint64)
SEED_BYTES = 32
_BLOCK = 64  # ChaCha20 block
_MAX_BIAS_BITS = 40
# SEAL ``Ciphertext::save_members`` before the coefficient data: parms_id (32), NTT flag (1),
# size / N / k (24), scale (8), correction factor (8), the data's own header (16) and count (8).
_C0_OFFSET = 32 + 1 + 24 + 8 + 8 + 16 + 8
_SEED_RECORD = 16 + 65  # a seeded ciphertext ends with SEAL's header + the 65-byte PRNG info


@dataclass(frozen=True)
class Ring:
    """The polynomial ring of one ciphertext's c0 at the data level: N coefficients per RNS prime."""

    n: int
    moduli: tuple[int, ...]

    def __post_init__(self) -> None:
        for q in self.moduli:
            bits = q.bit_length()
            if bits > 62 or ((1 << bits) - q) * (1 << _MAX_BIAS_BITS) > (1 << bits):
                raise ValueError(f"prime {q} is too far below 2^{bits} for an unbiased mask")

    @property
    def k(self) -> int:
        return len(self.moduli)

    @property
    def words(self) -> int:
        return self.k * self.n

    @property
    def blocks_per_ciphertext(self) -> int:
        return self.words * 8 // _BLOCK

    def zeros(self, count: int) -> np.ndarray:
        return np.zeros((count, self.k, self.n), dtype=np.uint64)


def ring_of(ctx: Any) -> Ring:
    """The data-level ring of a TenSEAL CKKS context (N and the data primes; the special prime never
    appears in a ciphertext). One ring for both wire formats: they share the federation's key."""
    from clinfed.he.ckks import _seal

    data = _seal(ctx).context.first_context_data()
    parms = data.parms()
    return Ring(parms.poly_modulus_degree(), tuple(m.value() for m in parms.coeff_modulus()))


def prg(seed: bytes, ring: Ring, first: int, count: int) -> np.ndarray:
    """Uniform residues for ciphertexts ``first .. first+count-1``: shape (count, k, n), uint64 < q_j."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    counter = first * ring.blocks_per_ciphertext
    if counter + count * ring.blocks_per_ciphertext >= 1 << 32:
        raise ValueError("more ciphertexts than one ChaCha20 stream covers")
    nonce = struct.pack("<I", counter) + b"\x00" * 12
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    raw = np.frombuffer(stream.update(bytes(count * ring.words * 8)), dtype="<u8").reshape(count, ring.k, ring.n)
    out = np.empty((count, ring.k, ring.n), dtype=np.uint64)
    for j, q in enumerate(ring.moduli):
        row = out[:, j, :]
        np.right_shift(raw[:, j, :], np.uint64(64 - q.bit_length()), out=row)
        _reduce_once(row, q)  # < 2^bits < 2q: one conditional subtraction is the reduction
    return out


def _reduce_once(row: np.ndarray, q: int) -> None:
    """row mod q for 0 ≤ row < 2q, in place (a compare and a subtract: ~10x faster than numpy's %)."""
    np.subtract(row, np.uint64(q), out=row, where=row >= np.uint64(q))


def add_mod(a: np.ndarray, b: np.ndarray, ring: Ring) -> np.ndarray:
    """(a + b) mod q_j per RNS row, in place on ``a`` (both < q_j < 2^62: no uint64 overflow)."""
    for j, q in enumerate(ring.moduli):
        row = a[..., j, :]
        row += b[..., j, :]
        _reduce_once(row, q)
    return a


def neg_mod(a: np.ndarray, ring: Ring) -> np.ndarray:
    """(−a) mod q_j per RNS row, in place."""
    for j, q in enumerate(ring.moduli):
        row = a[..., j, :]
        np.subtract(np.uint64(q), row, out=row)
        _reduce_once(row, q)  # q − 0 = q → 0
    return a


@dataclass(frozen=True)
class Mask:
    """Σ PRG(plus seeds) − Σ PRG(minus seeds), mod q: what one site adds (or a decrypting site
    removes). Generated per range of ciphertexts, never for the whole model at once."""

    ring: Ring
    plus: tuple[bytes, ...] = ()
    minus: tuple[bytes, ...] = ()

    def words(self, first: int, count: int) -> np.ndarray:
        total = self.ring.zeros(count)
        for seed in self.plus:
            add_mod(total, prg(seed, self.ring, first, count), self.ring)
        if self.minus:
            neg = self.ring.zeros(count)
            for seed in self.minus:
                add_mod(neg, prg(seed, self.ring, first, count), self.ring)
            add_mod(total, neg_mod(neg, self.ring), self.ring)
        return total


class MaskedStream:
    """Hands out one ciphertext's mask at a time, generating ``chunk`` ciphertexts' worth per call to
    the PRG (a site's encryptor walks its model in order; so does a decrypting site)."""

    def __init__(self, mask: Mask, chunk: int = 64):
        self.mask, self.chunk = mask, chunk
        self._first, self._block = -1, None

    def __call__(self, index: int) -> np.ndarray:
        if self._block is None or not self._first <= index < self._first + len(self._block):
            self._first = index
            self._block = self.mask.words(index, self.chunk)
        return self._block[index - self._first]


def patch_c0(words: np.ndarray, mask_words: np.ndarray, ring: Ring) -> np.ndarray:
    """c0 (k·n words, as laid out in SEAL's serialisation) plus a mask, mod q."""
    view = words.reshape(ring.k, ring.n)
    return add_mod(view, mask_words.reshape(ring.k, ring.n), ring).reshape(-1)


def mask_seal_ciphertext(blob: bytes, mask_words: np.ndarray, ring: Ring, seeded: bool) -> bytes:
    """A SEAL-serialised ciphertext (any compression) with ``mask_words`` added to c0, re-serialised
    uncompressed (c0 is uniform mod q either way: zstd saves < 2 % on it). ``seeded``: a fresh
    symmetric upload (c0 + SEAL's seed for c1) rather than a full (c0, c1) ciphertext."""
    from clinfed.he.compact import _seal_body, _seal_header

    polys = 1 if seeded else 2
    expected = _C0_OFFSET + 8 * polys * ring.words + (_SEED_RECORD if seeded else 0)
    body = bytearray(_seal_body(bytes(blob), expected))
    c0 = np.frombuffer(body, dtype="<u8", count=ring.words, offset=_C0_OFFSET).astype(np.uint64)
    if np.any(c0.reshape(ring.k, ring.n) >= np.array(ring.moduli, dtype=np.uint64)[:, None]):
        raise ValueError("ciphertext holds coefficients outside the federation's modulus")
    patch_c0(c0, mask_words, ring)
    body[_C0_OFFSET : _C0_OFFSET + 8 * ring.words] = c0.astype("<u8").tobytes()
    return _seal_header(16 + len(body)) + bytes(body)


class CorrectedCiphertexts(Sequence):
    """A read-only view of a sum's ciphertexts with a correction added to each as it is read, so
    the existing decryptors (which read one ciphertext at a time) decrypt the unmasked sum without
    the whole corrected sum ever sitting in memory."""

    def __init__(self, cts: Sequence[Any], correct: Callable[[int, Any], Any]):
        self._cts, self._correct = cts, correct

    def __len__(self) -> int:
        return len(self._cts)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self._correct(index, self._cts[index])

    def __iter__(self) -> Iterable[Any]:  # type: ignore[override]
        return (self[i] for i in range(len(self)))
