"""The federation's CKKS key pair: a secret context for sites, a public one for the server.

Threat model (DESIGN.md): the server is honest-but-curious and must never be able to decrypt, so
its kit holds a context serialised *without* the secret key, and :func:`load_server_context`
refuses one that has it. The sites share the secret key; :func:`load_site_context` refuses a
context without it (a site that cannot decrypt cannot take part).

Both files are plain TenSEAL serialised contexts, so FLARE's ``HEBuilder`` output
(``client_context.tenseal`` / ``server_context.tenseal`` in the startup kits) loads with the same
functions. HEBuilder makes SYMMETRIC contexts, which hold no public key: their fingerprint can only
cover the parameters (see :func:`context_fingerprint`). Ours are public-key contexts; the server
file carries neither relinearisation nor Galois keys (the server never multiplies or rotates).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import tenseal as ts

from clinfed.he.params import DEFAULT_PARAMS, CKKSParams
from clinfed.textio import one_line, write_private

_FINGERPRINT_DOMAIN = b"clinfed.he.context_fingerprint.v1\x00"


class HEContextError(ValueError):
    """A context file that cannot play the role it was loaded for (one line, names the file)."""


def create_context(params: CKKSParams = DEFAULT_PARAMS) -> ts.Context:
    """A fresh secret (site) context: new keys, public key included.

    Public-key type even though sites encrypt with the secret key (see ``ckks.py``): the public key
    is what both sides hash for :func:`context_fingerprint`. (TenSEAL also makes relinearisation
    keys; a site file regenerates them from the secret key on load, the server file omits them.)
    """
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    ctx.global_scale = 2.0**params.global_scale_bits
    return ctx


def public_context(ctx: ts.Context) -> ts.Context:
    """The server's view of ``ctx``: same parameters and public key, no secret key."""
    public = ts.context_from(ctx.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False))
    if public.is_private():  # TenSEAL guarantees this today; the server's safety must not depend on it silently
        raise HEContextError("public context still holds the secret key")
    return public


def create_context_pair(params: CKKSParams = DEFAULT_PARAMS) -> tuple[ts.Context, ts.Context]:
    """(site context with the secret key, server context without it) for one new federation."""
    secret = create_context(params)
    return secret, public_context(secret)


def write_context_pair(
    site_path: str | os.PathLike, server_path: str | os.PathLike, params: CKKSParams = DEFAULT_PARAMS
) -> str:
    """Generate a federation's keys and write the site (0600) and server (0644) context files.

    Returns the federation's :func:`context_fingerprint`, which both files reproduce.
    """
    secret, public = create_context_pair(params)
    write_private(Path(site_path), secret.serialize(save_secret_key=True), 0o600)
    write_private(
        Path(server_path),
        public.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False),
        0o644,
    )
    return context_fingerprint(secret)


def _read_context(path: str | os.PathLike, role: str) -> ts.Context:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise HEContextError(f"{p}: cannot read the {role} CKKS context ({exc.strerror or exc})") from exc
    try:
        ctx = ts.context_from(data)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError with protobuf or SEAL text
        raise HEContextError(f"{p}: not a TenSEAL context ({one_line(exc)})") from exc
    scheme = context_scheme(ctx)
    if scheme != "CKKS":
        raise HEContextError(f"{p}: a {scheme} context; clinfed aggregates with CKKS")
    try:
        ctx.global_scale  # noqa: B018 (TenSEAL raises when the file carries no scale)
    except ValueError as exc:
        raise HEContextError(f"{p}: context has no global scale; write it with global_scale set") from exc
    return ctx


def load_site_context(path: str | os.PathLike) -> ts.Context:
    """A site's context: must hold the secret key, since sites both encrypt and decrypt."""
    ctx = _read_context(path, "site")
    if not ctx.is_private():
        raise HEContextError(
            f"{path}: context holds no secret key; a site needs the federation's site context, not the server's"
        )
    return ctx


def load_server_context(path: str | os.PathLike) -> ts.Context:
    """The server's context: must NOT hold the secret key (the server must never be able to decrypt)."""
    ctx = _read_context(path, "server")
    if ctx.is_private():
        raise HEContextError(
            f"{path}: context holds the secret key; the server kit must never hold it "
            "(write it with serialize(save_secret_key=False))"
        )
    return ctx


# --- the serialised context, field by field ----------------------------------------------------
# TenSEAL 0.3.18 exposes neither the raw key bytes nor the modulus primes to Python, but its
# serialisation is a small documented protobuf (tenseal/proto/tensealcontext.proto). Reading the
# three fields we need by hand avoids a protobuf code-generation step for one message.


@dataclass(frozen=True)
class ContextParts:
    """The SEAL-serialised pieces of a TenSEAL context (``b""`` where absent)."""

    encryption_parameters: bytes
    public_key: bytes
    secret_key: bytes


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _proto_fields(buf: bytes) -> dict[int, bytes | int]:
    out: dict[int, bytes | int] = {}
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            out[number], i = _varint(buf, i)
        elif wire == 1:
            out[number], i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            out[number], i = bytes(buf[i : i + n]), i + n
        elif wire == 5:
            out[number], i = buf[i : i + 4], i + 4
        else:
            raise HEContextError(f"unexpected protobuf wire type {wire} in a TenSEAL context")
    return out


def context_parts(ctx: ts.Context, with_secret_key: bool = False) -> ContextParts:
    """Split ``ctx``'s serialisation into SEAL objects (secret key only when asked and present)."""
    blob = ctx.serialize(
        save_public_key=True,
        save_secret_key=with_secret_key and ctx.is_private(),
        save_galois_keys=False,
        save_relin_keys=False,
    )
    top = _proto_fields(blob)
    public = _proto_fields(top.get(2, b""))  # type: ignore[arg-type]
    private = _proto_fields(top.get(3, b""))  # type: ignore[arg-type]
    return ContextParts(
        encryption_parameters=top.get(1, b""),  # type: ignore[arg-type]
        public_key=public.get(1, b""),  # type: ignore[arg-type]
        secret_key=private.get(1, b""),  # type: ignore[arg-type]
    )


def context_scheme(ctx: ts.Context) -> str:
    """The context's scheme as SEAL names it: "CKKS", "BFV" or "BGV"."""
    return str(ctx.seal_context().data.key_context_data().parms().scheme()).rsplit(".", 1)[-1]


def context_fingerprint(ctx: ts.Context) -> str:
    """A federation id that a site (secret context) and the server (public context) compute alike.

    Why: a ciphertext made under another federation's key but the same parameters *parses fine*
    and adds without error; the sum then decrypts to noise. Sites send this fingerprint with their
    ciphertexts so the server can refuse a foreign key by name. It is the SHA-256 of the SEAL
    encryption parameters and public key as SEAL serialises them; the same bytes come back after a
    save/load round trip of either file (checked in tests/unit/test_he_context.py). It identifies
    a key, it does not authenticate a sender: a dishonest site can copy it. It reveals nothing the
    public key does not.

    FLARE HEBuilder's symmetric contexts have no public key, and their relinearisation keys are
    regenerated at random when a site loads its file, so no key material is common to both files:
    their fingerprint covers the parameters only and says so with a ``params-only:`` prefix (a
    foreign key with the same parameters then goes undetected).
    """
    parts = context_parts(ctx)
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN)
    pieces = (parts.encryption_parameters, parts.public_key) if parts.public_key else (parts.encryption_parameters,)
    for piece in pieces:
        digest.update(len(piece).to_bytes(8, "big"))
        digest.update(piece)
    return digest.hexdigest() if parts.public_key else "params-only:" + digest.hexdigest()


def site_secret(ctx: ts.Context, purpose: str) -> bytes:
    """32 bytes every site holding the federation's secret key derives alike and the server cannot.

    Why: some choices the sites must agree on are nobody else's business, e.g. which coordinates a
    compressed round sends (`clinfed.fl.compression`). The secret key is the one thing all sites
    share and the server lacks, so an HMAC keyed by it (SHA-256 of its SEAL serialisation, which is
    byte-identical at every site, and domain-separated by `purpose`) is a shared secret with no new
    key to distribute. Raises HEContextError for a public (server) context.
    """
    import hmac

    parts = context_parts(ctx, with_secret_key=True)
    if not parts.secret_key:
        raise HEContextError("a context without the secret key cannot derive the sites' shared secret")
    key = hashlib.sha256(parts.secret_key).digest()
    return hmac.new(key, b"clinfed.he.site_secret.v1\x00" + purpose.encode(), hashlib.sha256).digest()
