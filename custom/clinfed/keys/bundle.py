"""A site's CKKS secret context, sealed to another site's FLARE kit certificate.

Why this exists: the secret key must reach every hospital and nobody else, and the only thing
between two hospitals is the aggregation server (honest-but-curious) and the operator who issued
the kits. Both can read anything that is not encrypted to a hospital's own key, so the key travels
as a *bundle*:

- the serialised secret context, encrypted with a fresh AES-256-GCM key;
- that AES key wrapped with RSA-OAEP (SHA-256) under the recipient's kit certificate
  (``startup/client.crt``): only the holder of the recipient's ``startup/client.key`` can unwrap it;
- the sender, recipient and key fingerprint bound into the GCM associated data *and* into an
  RSA-PSS signature made with the sender's own kit key, so a bundle cannot be redirected to
  another site, relabelled, or made up by the server.

Both ends check certificates against the kit's own ``startup/rootCA.pem`` (the federation's root
CA) and require a *site* certificate: not the server's (by the server name in the site's own
kit), not an admin's (FLARE writes an admin's role into its certificate). The recipient's
certificate must name the site it is for, so the server cannot slip in its own public key; the
sender's must name the sender.

What this does not stop: whoever holds the root CA's private key (the operator's provisioning
state) can issue a kit for a *new* site, and that site will be given the key like any other. A
hospital that wants to vet new members lists them in ``key_recipients`` of its local policy (see
:mod:`clinfed.keys.exchange`).

No FLARE import here: the FLARE job in :mod:`clinfed.keys.exchange` only moves these bytes.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import ExtensionOID, NameOID

BUNDLE_FORMAT = "clinfed.key_bundle.v2"
# v2: a bundle names the key-exchange run it was made in and carries a random id, so an old bundle (from an
# earlier run, before a rotation) replayed to a site is refused: the site checks the run is its own.
_HEADER_FIELDS = ("format", "sender", "recipient", "fingerprint", "run", "bundle_id")
_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class KeyExchangeError(ValueError):
    """A certificate or key bundle that must not be used (one line: who, and why)."""


# --- certificates --------------------------------------------------------------------------------
def load_certificate(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError) as exc:
        raise KeyExchangeError(f"{what}: not a PEM certificate ({' '.join(str(exc).split())})") from None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def check_site_certificate(
    cert_pem: bytes, root_ca_pem: bytes, site: str, server_name: str | None = None
) -> x509.Certificate:
    """The certificate, if it is `site`'s FLARE kit certificate from this federation's root CA.

    Refused (KeyExchangeError naming `site`): not issued by the root CA, expired or not yet valid,
    a CA, the server's (its name is `server_name`, or its subjectAltName lists host names other
    than its own name), an admin's (role attribute), or issued to another name. FLARE gives a
    server certificate the same shape as a site's when the server's host is its name, so the
    caller passes the server's name from its own kit (``fed_client.json``).
    """
    cert = load_certificate(cert_pem, f"certificate for {site}")
    root = load_certificate(root_ca_pem, "root CA")
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise KeyExchangeError(
            f"certificate for {site}: not issued by this federation's root CA ({common_name(root)})"
        ) from None
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeyExchangeError(
            f"certificate for {site}: not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    extensions = {ext.oid for ext in cert.extensions}
    if (
        ExtensionOID.BASIC_CONSTRAINTS in extensions
        and cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ):
        raise KeyExchangeError(f"certificate for {site}: a CA certificate, not a site's")
    if server_name is not None and common_name(cert) == server_name:
        raise KeyExchangeError(f"certificate for {site}: the server's certificate ({server_name}), not a site's")
    if ExtensionOID.SUBJECT_ALTERNATIVE_NAME in extensions:  # FLARE: a site's names only itself, a server its hosts
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if list(names) != [x509.DNSName(common_name(cert))]:
            raise KeyExchangeError(f"certificate for {site}: a server certificate ({common_name(cert)}), not a site's")
    if cert.subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME):
        raise KeyExchangeError(f"certificate for {site}: an admin's certificate ({common_name(cert)}), not a site's")
    if common_name(cert) != site:
        raise KeyExchangeError(f"certificate for {site}: issued to '{common_name(cert)}', not to {site}")
    if not isinstance(cert.public_key(), rsa.RSAPublicKey):
        raise KeyExchangeError(f"certificate for {site}: not an RSA key; cannot wrap a key for it")
    return cert


def load_private_key(pem: bytes, site: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyExchangeError(f"{site}: kit key unreadable ({' '.join(str(exc).split())})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyExchangeError(f"{site}: kit key is not an RSA key")
    return key


# --- bundles -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedKey:
    """What a recipient gets out of a bundle it accepted."""

    context: bytes  # the serialised secret context, exactly as the sender holds it
    fingerprint: str
    sender: str
    run: str = ""
    bundle_id: str = ""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def seal(
    context: bytes,
    fingerprint: str,
    sender: str,
    sender_key_pem: bytes,
    recipient: str,
    recipient_cert: x509.Certificate,
    run: str = "",
) -> bytes:
    """A signed bundle of `context` that only `recipient` (holder of its kit key) can open.

    `recipient_cert` must already have passed :func:`check_site_certificate` for `recipient`.
    """
    if common_name(recipient_cert) != recipient:
        raise KeyExchangeError(f"certificate for {recipient}: issued to '{common_name(recipient_cert)}'")
    header = {
        "format": BUNDLE_FORMAT,
        "sender": sender,
        "recipient": recipient,
        "fingerprint": fingerprint,
        "run": run,
        "bundle_id": os.urandom(16).hex(),
    }
    aes_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    body = {
        **header,
        "wrapped_key": _b64(recipient_cert.public_key().encrypt(aes_key, _OAEP)),
        "nonce": _b64(nonce),
        "ciphertext": _b64(AESGCM(aes_key).encrypt(nonce, context, _canonical(header))),
    }
    signature = load_private_key(sender_key_pem, sender).sign(_canonical(body), _PSS, hashes.SHA256())
    return _canonical({**body, "signature": _b64(signature)})


def bundle_header(bundle: bytes) -> dict:
    """The bundle's unauthenticated header (sender, recipient, fingerprint): for messages, not for trust."""
    try:
        data = json.loads(bundle)
        if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
            raise ValueError("wrong format")
        return {k: str(data[k]) for k in _HEADER_FIELDS}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise KeyExchangeError(f"not a {BUNDLE_FORMAT} key bundle") from None


def open_sealed(
    bundle: bytes,
    recipient: str,
    recipient_key_pem: bytes,
    sender_cert_pem: bytes,
    root_ca_pem: bytes,
    server_name: str | None = None,
) -> OpenedKey:
    """Verify and decrypt a bundle addressed to `recipient`; KeyExchangeError (one line) otherwise.

    The sender's certificate must be another site's kit certificate from the same root CA, naming
    the bundle's sender, and its key must have signed the whole bundle.
    """
    header = bundle_header(bundle)
    data = json.loads(bundle)
    sender = header["sender"]
    if header["recipient"] != recipient:
        raise KeyExchangeError(f"{recipient}: key bundle is addressed to {header['recipient']}, not to this site")
    if sender == recipient:
        raise KeyExchangeError(f"{recipient}: key bundle claims to come from this site itself")
    sender_cert = check_site_certificate(sender_cert_pem, root_ca_pem, sender, server_name)
    try:
        signature = base64.b64decode(data["signature"], validate=True)
        body = {k: v for k, v in data.items() if k != "signature"}
        sender_cert.public_key().verify(signature, _canonical(body), _PSS, hashes.SHA256())
    except (InvalidSignature, ValueError, KeyError, TypeError):
        raise KeyExchangeError(f"{recipient}: key bundle from {sender}: signature does not verify") from None
    key = load_private_key(recipient_key_pem, recipient)
    try:
        aes_key = key.decrypt(base64.b64decode(data["wrapped_key"], validate=True), _OAEP)
        context = AESGCM(aes_key).decrypt(
            base64.b64decode(data["nonce"], validate=True),
            base64.b64decode(data["ciphertext"], validate=True),
            _canonical({k: data[k] for k in _HEADER_FIELDS}),
        )
    except (ValueError, InvalidTag, KeyError, TypeError):
        raise KeyExchangeError(
            f"{recipient}: key bundle from {sender}: cannot be decrypted with this site's kit key"
        ) from None
    return OpenedKey(
        context=context,
        fingerprint=header["fingerprint"],
        sender=sender,
        run=header["run"],
        bundle_id=header["bundle_id"],
    )


# --- the context inside --------------------------------------------------------------------------
def secret_context_fingerprint(context: bytes, site: str) -> str:
    """Fingerprint of a serialised context that must hold the secret key and a public key."""
    import tenseal as ts

    from clinfed.he.context import context_fingerprint

    try:
        ctx = ts.context_from(context)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError with protobuf text
        raise KeyExchangeError(f"{site}: the key received is not a TenSEAL context ({type(exc).__name__})") from None
    if not ctx.is_private():
        raise KeyExchangeError(f"{site}: the context received holds no secret key")
    fingerprint = context_fingerprint(ctx)
    if fingerprint.startswith("params-only:"):
        raise KeyExchangeError(f"{site}: the context received has no public key, so no key fingerprint")
    return fingerprint


def public_context_fingerprint(context: bytes, who: str) -> str:
    """Fingerprint of a serialised context that must NOT hold the secret key (the server's)."""
    import tenseal as ts

    from clinfed.he.context import context_fingerprint

    try:
        ctx = ts.context_from(context)
    except Exception as exc:
        raise KeyExchangeError(f"{who}: the public context is not a TenSEAL context ({type(exc).__name__})") from None
    if ctx.is_private():
        raise KeyExchangeError(f"{who}: the 'public' context holds the secret key; refusing it")
    fingerprint = context_fingerprint(ctx)
    if fingerprint.startswith("params-only:"):
        raise KeyExchangeError(f"{who}: the public context has no public key, so no key fingerprint")
    return fingerprint
