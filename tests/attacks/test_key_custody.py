"""Attack (issue 22, g): the operator (who holds the root CA key) and a malicious server get the key.

On the starting commit: the operator mints a second, valid certificate named ``site-2``; the server
offers it to the key holder in ``key_issue``; the holder checked CA, name and shape, sealed the
federation's secret key to it, and the operator opened the bundle with the minted key. Bundles carried
no run id, so an old bundle could be replayed to a site after a rotation.

Now: the holder seals only to certificates it pinned at the first exchange or that its own admin
listed; a new site needs that listing; a bundle names its run and id, and a site refuses another
run's bundle and one it installed before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.apis.shareable import Shareable
from nvflare.lighter.utils import Identity, generate_cert, generate_keys, serialize_cert, serialize_pri_key

from clinfed.keys.bundle import KeyExchangeError, check_site_certificate, open_sealed, seal
from clinfed.keys.exchange import KeyExchangeExecutor, allow_recipient_certificate

SERVER = "localhost"


def _ca():
    key, pub = generate_keys()
    return key, generate_cert(Identity("fed"), Identity("fed"), key, pub, ca=True)


def _kit(tmp_path: Path, name: str, ca) -> Path:
    root_key, root_cert = ca
    key, pub = generate_keys()
    cert = generate_cert(Identity(name, "org"), Identity("fed"), root_key, pub)
    startup = tmp_path / name / "startup"
    startup.mkdir(parents=True)
    (startup / "client.crt").write_bytes(serialize_cert(cert))
    (startup / "client.key").write_bytes(serialize_pri_key(key))
    (startup / "rootCA.pem").write_bytes(serialize_cert(root_cert))
    fed = {"servers": [{"name": "fed", "service": {"target": f"{SERVER}:18102"}, "identity": SERVER}]}
    (startup / "fed_client.json").write_text(json.dumps(fed))
    return tmp_path / name


def _issue(executor, holder: Path, certs: dict[str, bytes], run: str) -> dict:
    executor._run = run
    request = Shareable()
    request["certificates"] = certs
    return executor._issue(holder, "site-1", request)


def _install(executor, kit: Path, site: str, issued: dict, bundle: bytes, run: str) -> dict:
    executor._run = run
    request = Shareable()
    request.update(bundle=bundle, sender_certificate=issued["certificate"], fingerprint=issued["fingerprint"])
    return executor._install(kit, site, request)


@pytest.fixture
def fed(tmp_path):
    ca = _ca()
    kits = {s: _kit(tmp_path / "kits", s, ca) for s in ("site-1", "site-2", "site-3")}
    return ca, kits, tmp_path


def test_a_second_certificate_under_a_sites_name_does_not_get_the_key(fed):
    ca, kits, tmp_path = fed
    executor = KeyExchangeExecutor()
    certs = {s: (kits[s] / "startup" / "client.crt").read_bytes() for s in ("site-2", "site-3")}
    first = _issue(executor, kits["site-1"], certs, "run-1")
    assert sorted(first["bundles"]) == ["site-2", "site-3"] and first["generated"]
    # the operator mints "site-2" again with the root CA key; the server offers that certificate
    minted = _kit(tmp_path / "operator", "site-2", ca)
    offered = {"site-2": (minted / "startup" / "client.crt").read_bytes()}
    again = _issue(executor, kits["site-1"], offered, "run-2")
    assert again["bundles"] == {}
    reason = again["refused"]["site-2"]
    assert "not the one this hospital pinned" in reason and "\n" not in reason
    # the starting commit's checks (CA, name, shape) alone accept it: the holder sealed the key to it,
    # and the operator opened that bundle with the minted kit key
    root_ca = (kits["site-1"] / "startup" / "rootCA.pem").read_bytes()
    cert = check_site_certificate(offered["site-2"], root_ca, "site-2", SERVER)
    bundle = seal(b"secret", "fp", "site-1", (kits["site-1"] / "startup" / "client.key").read_bytes(), "site-2", cert)
    opened = open_sealed(
        bundle, "site-2", (minted / "startup" / "client.key").read_bytes(), first["certificate"], root_ca
    )
    assert opened.context == b"secret"


def test_a_new_site_needs_its_certificate_listed_by_the_holders_admin(fed):
    ca, kits, tmp_path = fed
    executor = KeyExchangeExecutor()
    certs = {s: (kits[s] / "startup" / "client.crt").read_bytes() for s in ("site-2", "site-3")}
    _issue(executor, kits["site-1"], certs, "run-1")
    new = _kit(tmp_path / "kits", "site-4", ca)
    pem = (new / "startup" / "client.crt").read_bytes()
    refused = _issue(executor, kits["site-1"], {"site-4": pem}, "run-2")
    assert refused["bundles"] == {} and "is new to this federation" in refused["refused"]["site-4"]
    allow_recipient_certificate(kits["site-1"], "site-4", pem)  # the hospital admin's action
    issued = _issue(executor, kits["site-1"], {"site-4": pem}, "run-3")
    answer = _install(executor, new, "site-4", issued, issued["bundles"]["site-4"], "run-3")
    assert answer["status"] == "ok"


def test_a_replayed_bundle_is_refused(fed):
    _, kits, _ = fed
    executor = KeyExchangeExecutor()
    certs = {s: (kits[s] / "startup" / "client.crt").read_bytes() for s in ("site-2", "site-3")}
    issued = _issue(executor, kits["site-1"], certs, "run-1")
    bundle = issued["bundles"]["site-2"]
    with pytest.raises(KeyExchangeError, match=r"made in key-exchange run run-1, not this run \(run-9\): a replayed"):
        _install(executor, kits["site-2"], "site-2", issued, bundle, "run-9")
    assert _install(executor, kits["site-2"], "site-2", issued, bundle, "run-1")["status"] == "ok"
    (kits["site-2"] / "local" / "client_context.tenseal").unlink()  # a rotation: the site drops its key
    with pytest.raises(KeyExchangeError, match="installed before: a replay"):
        _install(executor, kits["site-2"], "site-2", issued, bundle, "run-1")
