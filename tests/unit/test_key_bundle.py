"""The key bundle that carries the CKKS secret key from one hospital to another (clinfed.keys.bundle).

Certificates are made the way FLARE's CertBuilder makes them (`nvflare.lighter.utils.generate_cert`):
a root CA, a server certificate with its host names, site certificates, an admin's with its role.
Each attack is something the server (or the operator) can do with what passes through it.
"""

from __future__ import annotations

import json

import pytest
from nvflare.lighter.utils import Identity, generate_cert, generate_keys, serialize_cert, serialize_pri_key

from clinfed.he.context import context_fingerprint, create_context, public_context
from clinfed.keys.bundle import (
    KeyExchangeError,
    check_site_certificate,
    open_sealed,
    public_context_fingerprint,
    seal,
    secret_context_fingerprint,
)


class _PKI:
    def __init__(self, name: str = "clinfed_test"):
        self.key, pub = generate_keys()
        self.root = generate_cert(Identity(name), Identity(name), self.key, pub, ca=True)
        self.root_pem = serialize_cert(self.root)
        self.kits: dict[str, tuple[bytes, bytes]] = {}

    def issue(self, name: str, role: str | None = None, server: bool = False) -> tuple[bytes, bytes]:
        key, pub = generate_keys()
        cert = generate_cert(
            Identity(name, "org", role),
            Identity(self.root.subject.rfc4514_string().split("=")[1]),
            self.key,
            pub,
            server_default_host=name if server else None,
            server_additional_hosts=["127.0.0.1"] if server else None,
        )
        self.kits[name] = (serialize_cert(cert), serialize_pri_key(key))
        return self.kits[name]


@pytest.fixture(scope="module")
def pki():
    p = _PKI()
    for site in ("site-1", "site-2", "site-3"):
        p.issue(site)
    p.issue("localhost", server=True)
    p.issue("admin@clinfed.local", role="project_admin")
    return p


@pytest.fixture(scope="module")
def secret():
    ctx = create_context()
    return ctx.serialize(save_secret_key=True), context_fingerprint(ctx), ctx


def _seal_for(pki, secret, recipient="site-2", sender="site-1", recipient_cert=None):
    data, fp, _ = secret
    cert = check_site_certificate(recipient_cert or pki.kits[recipient][0], pki.root_pem, recipient, "localhost")
    return seal(data, fp, sender, pki.kits[sender][1], recipient, cert)


def _open(pki, bundle, recipient="site-2", sender="site-1", sender_cert=None):
    return open_sealed(
        bundle, recipient, pki.kits[recipient][1], sender_cert or pki.kits[sender][0], pki.root_pem, "localhost"
    )


def test_a_sealed_key_opens_at_its_recipient_with_the_same_context_and_fingerprint(pki, secret):
    data, fp, _ = secret
    bundle = _seal_for(pki, secret)
    assert data not in bundle and fp in bundle.decode()
    opened = _open(pki, bundle)
    assert opened.context == data and opened.fingerprint == fp and opened.sender == "site-1"
    assert secret_context_fingerprint(opened.context, "site-2") == fp
    assert not fp.startswith("params-only:")


def test_another_site_cannot_open_a_bundle_addressed_to_site_2(pki, secret):
    bundle = _seal_for(pki, secret)
    with pytest.raises(KeyExchangeError, match=r"^site-3: key bundle is addressed to site-2, not to this site$"):
        _open(pki, bundle, recipient="site-3")
    # Relabelling the recipient breaks the signature (and the GCM associated data).
    relabelled = json.loads(bundle)
    relabelled["recipient"] = "site-3"
    with pytest.raises(KeyExchangeError, match=r"^site-3: key bundle from site-1: signature does not verify$"):
        _open(pki, json.dumps(relabelled).encode(), recipient="site-3")


@pytest.mark.parametrize("field", ["ciphertext", "wrapped_key", "nonce", "fingerprint"])
def test_a_tampered_bundle_is_refused_in_one_line(pki, secret, field):
    data = json.loads(_seal_for(pki, secret))
    value = data[field]
    data[field] = value[:-4] + ("AAAA" if value[-4:] != "AAAA" else "BBBB")
    with pytest.raises(KeyExchangeError) as err:
        _open(pki, json.dumps(data).encode())
    assert str(err.value) == "site-2: key bundle from site-1: signature does not verify"


def test_a_bundle_the_server_signs_with_its_own_certificate_is_refused(pki, secret):
    data, fp, _ = secret
    cert = check_site_certificate(pki.kits["site-2"][0], pki.root_pem, "site-2")
    forged = seal(data, fp, "localhost", pki.kits["localhost"][1], "site-2", cert)
    with pytest.raises(KeyExchangeError, match=r"^certificate for localhost: the server's certificate"):
        _open(pki, forged, sender="localhost")
    # ...also when it claims to be site-1 but can only show (and sign with) its own certificate.
    claimed = seal(data, fp, "site-1", pki.kits["localhost"][1], "site-2", cert)
    server_cert_refused = r"^certificate for site-1: the server's certificate \(localhost\), not a site's$"
    with pytest.raises(KeyExchangeError, match=server_cert_refused):
        _open(pki, claimed, sender_cert=pki.kits["localhost"][0])
    with pytest.raises(KeyExchangeError, match=r"^site-2: key bundle from site-1: signature does not verify$"):
        _open(pki, claimed)  # with site-1's real certificate the server's signature fails


def test_the_server_cannot_get_the_key_sealed_to_its_own_certificate(pki, secret):
    for cert in (pki.kits["localhost"][0], pki.kits["admin@clinfed.local"][0]):
        with pytest.raises(KeyExchangeError, match=r"^certificate for site-2: "):
            _seal_for(pki, secret, recipient_cert=cert)
    with pytest.raises(KeyExchangeError, match=r"the server's certificate \(localhost\)"):
        check_site_certificate(pki.kits["localhost"][0], pki.root_pem, "localhost", "localhost")
    with pytest.raises(KeyExchangeError, match=r"an admin's certificate \(admin@clinfed.local\)"):
        check_site_certificate(pki.kits["admin@clinfed.local"][0], pki.root_pem, "admin@clinfed.local")


def test_a_certificate_from_another_root_ca_is_refused(pki, secret):
    other = _PKI("elsewhere")
    cert, _ = other.issue("site-2")
    with pytest.raises(KeyExchangeError, match=r"^certificate for site-2: not issued by this federation's root CA"):
        _seal_for(pki, secret, recipient_cert=cert)
    other_sender, other_key = other.issue("site-1")
    data, fp, _ = secret
    target = check_site_certificate(pki.kits["site-2"][0], pki.root_pem, "site-2")
    bundle = seal(data, fp, "site-1", other_key, "site-2", target)
    with pytest.raises(KeyExchangeError, match=r"^certificate for site-1: not issued by this federation's root CA"):
        _open(pki, bundle, sender_cert=other_sender)


def test_the_public_context_check_refuses_a_secret_key_and_a_keyless_context(secret):
    _, fp, ctx = secret
    public = public_context(ctx).serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    assert public_context_fingerprint(public, "server") == fp
    with pytest.raises(KeyExchangeError, match=r"^server: the 'public' context holds the secret key"):
        public_context_fingerprint(ctx.serialize(save_secret_key=True), "server")
    with pytest.raises(KeyExchangeError, match=r"^site-2: the context received holds no secret key$"):
        secret_context_fingerprint(public, "site-2")
    with pytest.raises(KeyExchangeError, match=r"^site-2: the key received is not a TenSEAL context"):
        secret_context_fingerprint(b"garbage", "site-2")
