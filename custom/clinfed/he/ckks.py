"""Pure CKKS codec: encrypt a flat vector into ciphertext chunks, add them, decrypt the sum.

Wire format: one flat vector per site update, cut into chunks of N/2 values (the slot count), each
chunk one SEAL ciphertext serialised by SEAL itself (``Ciphertext::save``: SEAL header + zstd).
A whole model travels in ⌈size / (N/2)⌉ ciphertexts; FLARE's HE sends at least one ciphertext
per layer, so a 16-value bias costs as much as 2 048 weights.

Why we drive SEAL through ``tenseal.sealapi`` (shipped in the same TenSEAL 0.3.18 wheel) instead of
``ts.ckks_vector``: a symmetric (secret-key) CKKS ciphertext is (−a·s + e + m, a) with ``a``
uniformly random, so SEAL can serialise the fresh ciphertext with a 64-byte PRNG seed in place of
``a``, halving the upload. TenSEAL's vectors always serialise ``a`` in full, whatever the context's
``ENCRYPTION_TYPE`` (measured: 32.1 vs 16.2 bytes per parameter at N=4096, [60, 40]). Sites hold
the secret key anyway (DESIGN.md), so symmetric encryption costs no trust; it is also ~1.5x faster
and ~7x less noisy than public-key encryption. The seed is expanded when the server loads a
ciphertext, so the *sum* it returns is full size (2x the upload): uploads are many, one per site,
the download is one broadcast.

``tenseal.sealapi`` reads and writes SEAL objects only through file *paths*; on Linux we hand it an
anonymous in-memory file (``memfd``) so no key or ciphertext touches a disk, elsewhere a private
(0700) temporary directory. The TenSEAL context stays the federation's key container (files,
fingerprint, FLARE HEBuilder compatibility); the SEAL objects here are derived from it and cached.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sa

from clinfed.he.context import HEContextError, context_parts, context_scheme
from clinfed.he.params import CKKSParams, ciphertexts_for
from clinfed.textio import one_line

# SEAL raises std::logic_error / std::invalid_argument / std::runtime_error, which pybind11 maps to
# these Python types; anything else is a bug, not a bad ciphertext.
_SEAL_ERRORS = (ValueError, RuntimeError, TypeError, OverflowError, MemoryError)


class InvalidCiphertext(ValueError):
    """A site's payload that cannot join the sum; the message is one line naming the site."""

    def __init__(self, site: str, message: str):
        super().__init__(f"{site}: {message}")
        self.site = site


# --- SEAL objects through paths ------------------------------------------------------------------
_HAVE_MEMFD = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")
_tmpdir_lock = threading.Lock()
_tmpdir: str | None = None


def _private_tmpdir() -> str:
    global _tmpdir
    with _tmpdir_lock:
        if _tmpdir is None or not os.path.isdir(_tmpdir):
            _tmpdir = tempfile.mkdtemp(prefix="clinfed-he-")  # mode 0700
            atexit.register(shutil.rmtree, _tmpdir, True)
        return _tmpdir


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _seal_dump(save: Callable[[str], Any]) -> bytes:
    """Bytes of a SEAL object whose binding can only ``save(path)``."""
    if _HAVE_MEMFD:
        fd = os.memfd_create("clinfed-he", os.MFD_CLOEXEC)
        try:
            save(f"/proc/self/fd/{fd}")
            return _read_fd(fd)
        finally:
            os.close(fd)
    fd, path = tempfile.mkstemp(dir=_private_tmpdir())
    try:
        save(path)
        return _read_fd(fd)
    finally:
        os.close(fd)
        os.unlink(path)


def _seal_restore(load: Callable[[str], Any], data: bytes) -> None:
    """Feed ``data`` to a SEAL binding that can only ``load(path)``."""
    if _HAVE_MEMFD:
        fd = os.memfd_create("clinfed-he", os.MFD_CLOEXEC)
        try:
            _write_fd(fd, data)
            load(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(dir=_private_tmpdir())
    try:
        _write_fd(fd, data)
        load(path)
    finally:
        os.close(fd)
        os.unlink(path)


# --- the SEAL view of a TenSEAL context ----------------------------------------------------------
@dataclass(frozen=True)
class _Seal:
    context: Any  # sa.SEALContext
    encoder: Any  # sa.CKKSEncoder
    evaluator: Any  # sa.Evaluator
    encryptor: Any | None  # sa.Encryptor (secret key), sites only
    decryptor: Any | None  # sa.Decryptor, sites only
    first_parms_id: Any
    scale: float
    params: CKKSParams

    @property
    def slots(self) -> int:
        return self.params.slot_count


_cache: weakref.WeakKeyDictionary[ts.Context, _Seal] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _seal_context(ctx: ts.Context, needs: str) -> tuple[Any, Any, Any]:
    """(SEAL encryption parameters, SEAL context at 128-bit security, `context_parts`) of a TenSEAL
    CKKS context; HEContextError for another scheme (`needs` says who needs CKKS) or parameters SEAL's
    TC128 table refuses. Shared by the default path (`_seal`) and the compact format."""
    if context_scheme(ctx) != "CKKS":
        raise HEContextError(f"a {context_scheme(ctx)} context; {needs}")
    parts = context_parts(ctx, with_secret_key=ctx.is_private())
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.CKKS)
    _seal_restore(parms.load, parts.encryption_parameters)
    context = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise HEContextError(f"CKKS parameters rejected by SEAL: {context.parameters_error_message()}")
    return parms, context, parts


def _secret_tools(context: Any, parts: Any) -> tuple[Any, Any]:
    """(Encryptor, Decryptor) under the context's secret key, or (None, None) for a public context."""
    if not parts.secret_key:
        return None, None
    secret = sa.SecretKey()
    _seal_restore(lambda path: secret.load(context, path), parts.secret_key)
    return sa.Encryptor(context, secret), sa.Decryptor(context, secret)


def _seal(ctx: ts.Context) -> _Seal:
    """SEAL objects for ``ctx``, built once per context object (keys parsed from its serialisation)."""
    scale = float(ctx.global_scale)
    private = ctx.is_private()
    with _cache_lock:
        cached = _cache.get(ctx)
    if cached is not None and cached.scale == scale and (cached.decryptor is not None) == private:
        return cached
    parms, context, parts = _seal_context(ctx, "clinfed aggregates with CKKS")
    bits = [m.bit_count() for m in parms.coeff_modulus()]
    scale_bits = math.log2(scale)
    if scale_bits != int(scale_bits):
        raise HEContextError(f"global scale {scale} is not a power of two")
    try:
        params = CKKSParams(parms.poly_modulus_degree(), tuple(bits), int(scale_bits))
    except ValueError as exc:
        raise HEContextError(f"unsupported CKKS parameters: {exc}") from exc
    encryptor, decryptor = _secret_tools(context, parts)
    bundle = _Seal(
        context=context,
        encoder=sa.CKKSEncoder(context),
        evaluator=sa.Evaluator(context),
        encryptor=encryptor,
        decryptor=decryptor,
        first_parms_id=list(context.first_parms_id()),
        scale=scale,
        params=params,
    )
    with _cache_lock:
        _cache[ctx] = bundle
    return bundle


def context_params(ctx: ts.Context) -> CKKSParams:
    """The :class:`CKKSParams` a context was made with (read from its SEAL parameters)."""
    return _seal(ctx).params


def slot_count(ctx: ts.Context) -> int:
    """Values per ciphertext under ``ctx`` (N/2)."""
    return ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2


def expected_ciphertext_count(ctx_or_params: ts.Context | CKKSParams, size: int) -> int:
    """Ciphertexts that carry a flat vector of ``size`` values: ⌈size / slots⌉."""
    if isinstance(ctx_or_params, CKKSParams):
        return ciphertexts_for(ctx_or_params, size)
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    return math.ceil(size / slot_count(ctx_or_params))


# --- site side ------------------------------------------------------------------------------------
def encrypt_vector(
    ctx: ts.Context, vec: np.ndarray | Sequence[float], into: Any = None, mask: Callable[[int], Any] | None = None
) -> Any:
    """Encrypt a flat vector into ⌈len/slots⌉ serialised, seeded symmetric ciphertexts (sites only).

    The last chunk is zero-padded by the encoder; the caller keeps the true length (the layout).
    ``into``: anything with ``append`` that receives each ciphertext as it is made and is returned
    (a stream's on-disk spool, so a large update's ciphertexts never sit in memory together);
    a new list by default. ``mask(i)``: the secure-aggregation mask of ciphertext i, added to its c0
    (:mod:`clinfed.he.masking`; the ciphertext is then serialised uncompressed, ~1 % larger).
    """
    seal = _seal(ctx)
    if seal.encryptor is None:
        raise HEContextError("this context holds no secret key: only sites encrypt")
    flat = np.asarray(vec, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ValueError(
            f"vector holds {int(np.count_nonzero(~np.isfinite(flat)))} NaN/Inf values; refusing to encrypt"
        )
    out = [] if into is None else into
    for start in range(0, flat.size, seal.slots):
        plain = sa.Plaintext()
        try:
            seal.encoder.encode(flat[start : start + seal.slots].tolist(), seal.scale, plain)
        except _SEAL_ERRORS as exc:  # "encoded values are too large" past the modulus
            raise ValueError(f"values {start}..{start + seal.slots - 1} cannot be encoded: {one_line(exc)}") from exc
        blob = _seal_dump(seal.encryptor.encrypt_symmetric(plain).save)
        if mask is not None:
            from clinfed.he.masking import mask_seal_ciphertext, ring_of

            blob = mask_seal_ciphertext(blob, mask(start // seal.slots), ring_of(ctx), seeded=True)
        out.append(blob)
    return out


def real_unmasked(ctx: ts.Context, cts: Sequence[bytes], correction: Callable[[int], Any]) -> Sequence[bytes]:
    """A real-valued sum (full ciphertexts) seen through ``correction(i)`` added to each c0, one
    ciphertext at a time: the twin of :func:`clinfed.he.compact.compact_unmasked`."""
    from clinfed.he.masking import CorrectedCiphertexts, mask_seal_ciphertext, ring_of

    ring = ring_of(ctx)

    def correct(index: int, data: Any) -> bytes:
        try:
            return mask_seal_ciphertext(data, correction(index), ring, seeded=False)
        except (ValueError, HEContextError, struct.error) as exc:
            raise InvalidCiphertext("server", f"ciphertext {index + 1}: {one_line(exc)}") from exc

    return CorrectedCiphertexts(cts, correct)


def decrypt_vector(ctx: ts.Context, cts: Sequence[bytes], size: int, source: str = "server") -> np.ndarray:
    """Decrypt ciphertext chunks back into a float64 vector of ``size`` values (sites only).

    ``source`` names the sender in errors (the aggregate normally comes from the server).
    """
    seal = _seal(ctx)
    if seal.decryptor is None:
        raise HEContextError("this context holds no secret key: it cannot decrypt")
    expected = expected_ciphertext_count(ctx, size)
    out = np.empty(expected * seal.slots, dtype=np.float64)
    # one ciphertext parsed at a time: a streamed (spooled) sum never lies in memory whole
    for i, ct in enumerate(_iter_parse(seal, cts, expected, source)):
        plain = sa.Plaintext()
        seal.decryptor.decrypt(ct, plain)
        out[i * seal.slots : (i + 1) * seal.slots] = seal.encoder.decode_double(plain)
    return out[:size]


# --- server side ------------------------------------------------------------------------------------
def _parse(seal: _Seal, cts: Sequence[bytes], expected_count: int, site: str) -> list[Any]:
    """Parse and vet every ciphertext of one payload before any of them is used."""
    return list(_iter_parse(seal, cts, expected_count, site))


def is_ciphertext_sequence(cts: Any) -> bool:
    """A list/tuple of ciphertexts, or a sequence that reads them one at a time (a stream's spool)."""
    return isinstance(cts, Sequence) and not isinstance(cts, str | bytes | bytearray | memoryview)


def _iter_parse(seal: _Seal, cts: Sequence[bytes], expected_count: int, site: str) -> Iterator[Any]:
    """Parse and vet one payload's ciphertexts one at a time (raising on the first bad one)."""
    if not is_ciphertext_sequence(cts):
        raise InvalidCiphertext(site, f"payload is {type(cts).__name__}, expected a list of ciphertexts")
    n = len(cts)
    if n != expected_count:
        raise InvalidCiphertext(site, f"sent {n} ciphertexts, expected {expected_count}")
    for i, data in enumerate(cts, start=1):
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidCiphertext(site, f"ciphertext {i} of {n} is {type(data).__name__}, not bytes")
        ct = sa.Ciphertext()
        try:
            _seal_restore(lambda path, ct=ct: ct.load(seal.context, path), bytes(data))
        except _SEAL_ERRORS as exc:
            raise InvalidCiphertext(
                site, f"ciphertext {i} of {n} does not parse under the federation's context ({one_line(exc)})"
            ) from exc
        if list(ct.parms_id()) != seal.first_parms_id or not ct.is_ntt_form():
            raise InvalidCiphertext(
                site, f"ciphertext {i} of {n} is not a fresh ciphertext of the federation's context"
            )
        if ct.size() != 2:
            raise InvalidCiphertext(site, f"ciphertext {i} of {n} has {ct.size()} polynomials, expected 2")
        if not math.isclose(ct.scale, seal.scale, rel_tol=1e-9):
            raise InvalidCiphertext(
                site,
                f"ciphertext {i} of {n} has scale 2^{math.log2(ct.scale):.1f}, expected 2^{math.log2(seal.scale):g}",
            )
        yield ct


def parse_ciphertexts(ctx: ts.Context, cts: Sequence[bytes], expected_count: int, site: str) -> list[Any]:
    """``site``'s payload as SEAL ciphertexts of ``ctx``, every one vetted before any is used.

    Raises :class:`InvalidCiphertext` (one line naming the site) for garbage bytes, truncation,
    another parameter set, another scale or a wrong count. It cannot catch another federation's
    *key* under the same parameters: such a ciphertext is well formed (compare
    :func:`clinfed.he.context.context_fingerprint` for that).
    """
    return _parse(_seal(ctx), cts, expected_count, site)


def check_ciphertexts(ctx: ts.Context, cts: Sequence[bytes], expected_count: int, site: str) -> None:
    """Raise :class:`InvalidCiphertext` unless ``cts`` are ``expected_count`` fresh ciphertexts of ``ctx``."""
    parse_ciphertexts(ctx, cts, expected_count, site)


def add_ciphertexts(ctx: ts.Context, total: list[Any] | None, parsed: list[Any]) -> list[Any]:
    """Chunk-wise ``total += parsed`` on parsed ciphertexts (no secret key needed); ``total`` None starts a sum."""
    return add_parsed(_seal(ctx).evaluator, total, parsed)


def add_parsed(evaluator: Any, total: list[Any] | None, parsed: Iterable[Any]) -> list[Any]:
    """``total += parsed`` with SEAL's evaluator (any context, any scale); ``total`` None starts a sum."""
    if total is None:
        return list(parsed)
    for acc, ct in zip(total, parsed, strict=True):
        evaluator.add_inplace(acc, ct)
    return total


def add_in_two_passes(evaluator: Any, total: list[Any] | None, parse: Callable[[], Iterator[Any]]) -> list[Any]:
    """``total += parse()`` for a payload read one ciphertext at a time (a stream's spool on disk).

    Two passes, so a payload that turns bad at its 57th ciphertext never touches the sum: first every
    ciphertext is parsed and vetted (``parse`` raises on a bad one) and then dropped, then each is
    parsed again and added. Memory: the sum plus one ciphertext, whatever the payload's size (issue
    14: the server never holds an upload whole). Used by both wire formats (real-valued and compact).
    """
    for _ in parse():
        pass
    return add_parsed(evaluator, total, parse())


def add_streamed(
    ctx: ts.Context, total: list[Any] | None, cts: Sequence[bytes], expected_count: int, site: str
) -> list[Any]:
    """``total += cts`` for a spooled payload of the real-valued format (see :func:`add_in_two_passes`)."""
    seal = _seal(ctx)
    return add_in_two_passes(seal.evaluator, total, lambda: _iter_parse(seal, cts, expected_count, site))


def serialize_ciphertexts(cts: Sequence[Any], into: Any = None) -> Any:
    """Parsed ciphertexts back to SEAL's wire format: a new list, or appended one by one to ``into``
    (a spool on disk, so the serialised sum never sits in memory beside the parsed one)."""
    out = [] if into is None else into
    for ct in cts:
        out.append(_seal_dump(ct.save))
    return out


def sum_ciphertexts(ctx: ts.Context, payloads: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Chunk-wise sum of several sites' payloads; needs no secret key. Payloads are vetted first."""
    if not payloads:
        raise ValueError("nothing to sum: no payloads")
    expected = len(payloads[0])
    total = None
    for j, payload in enumerate(payloads, start=1):
        total = add_ciphertexts(ctx, total, parse_ciphertexts(ctx, payload, expected, f"payload {j}"))
    return serialize_ciphertexts(total)
