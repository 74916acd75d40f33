"""Simulated FLARE kits for `clinfed simulate`: a throw-away root CA and one site certificate each.

Why: secure aggregation (:mod:`clinfed.fl.secagg`) authenticates every site's key with its FLARE kit
(``startup/client.key``, ``client.crt``, ``rootCA.pem``), and FLARE's simulator has no kits. A
simulated workspace gets what ``nvflare provision`` would put there, shaped like FLARE's own
certificates (CN = site name, RSA 2048, issued by the project's root CA), made once per workspace and
reused by later runs on it. The CA's private key is not kept: nobody can mint a certificate for this
simulated federation afterwards, which is stricter than a real deployment (see docs/threat-model.md
on the operator).
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from clinfed.textio import write_private

_FILES = ("client.key", "client.crt", "rootCA.pem")


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_sim_kits(root: Path, sites: list[str], project: str = "clinfed-simulated") -> None:
    """Give every site under ``root`` a kit (kept if all sites already have one from the same CA)."""
    roots = {(root / s / "startup" / "rootCA.pem").read_bytes() for s in sites if _has_kit(root / s)}
    if len(roots) == 1 and all(_has_kit(root / s) for s in sites):
        return
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_pem = _pem(_certificate(project, ca_key, project, ca_key, ca=True))
    for site in sites:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        startup = root / site / "startup"
        startup.mkdir(parents=True, exist_ok=True)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
        write_private(startup / "client.key", key_pem)
        (startup / "client.crt").write_bytes(_pem(_certificate(site, key, project, ca_key, ca=False)))
        (startup / "rootCA.pem").write_bytes(ca_pem)


def _has_kit(folder: Path) -> bool:
    return all((folder / "startup" / name).is_file() for name in _FILES)
