"""The key_exchange job's site side (clinfed.keys.exchange.KeyExchangeExecutor) on kit folders, without FLARE
processes: what a holder issues, what a site installs, and what each refuses.

Kits are laid out like FLARE's (startup/client.crt, client.key, rootCA.pem, fed_client.json naming the
server), with certificates made by FLARE's own `generate_cert`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tenseal as ts
from nvflare.apis.dxo import from_shareable
from nvflare.apis.shareable import Shareable
from nvflare.lighter.utils import Identity, generate_cert, generate_keys, serialize_cert, serialize_pri_key

from clinfed.he.context import context_fingerprint, create_context
from clinfed.keys.exchange import KeyExchangeExecutor, held_fingerprint

SERVER = "localhost"


def _kits(tmp_path: Path, sites=("site-1", "site-2", "site-3")) -> dict[str, Path]:
    root_key, root_pub = generate_keys()
    root = generate_cert(Identity("fed"), Identity("fed"), root_key, root_pub, ca=True)
    kits = {}
    for name in (*sites, SERVER):
        key, pub = generate_keys()
        server = name == SERVER
        cert = generate_cert(
            Identity(name, "org"), Identity("fed"), root_key, pub, server_default_host=name if server else None
        )
        startup = tmp_path / name / "startup"
        startup.mkdir(parents=True)
        (startup / ("server.crt" if server else "client.crt")).write_bytes(serialize_cert(cert))
        (startup / ("server.key" if server else "client.key")).write_bytes(serialize_pri_key(key))
        (startup / "rootCA.pem").write_bytes(serialize_cert(root))
        fed = {"servers": [{"name": "fed", "service": {"target": f"{SERVER}:18102"}, "identity": SERVER}]}
        (startup / "fed_client.json").write_text(json.dumps(fed))
        kits[name] = tmp_path / name
    return kits


def _shareable(**data) -> Shareable:
    s = Shareable()
    s.update(data)
    return s


@pytest.fixture
def kits(tmp_path):
    return _kits(tmp_path)


@pytest.fixture
def executor():
    return KeyExchangeExecutor()


def _exchange(executor, kits, holder="site-1", recipients=("site-2", "site-3")):
    certs = {s: (kits[s] / "startup" / "client.crt").read_bytes() for s in recipients}
    issued = executor._issue(kits[holder], holder, _shareable(certificates=certs))
    answers = {
        site: executor._install(
            kits[site],
            site,
            _shareable(
                bundle=issued["bundles"][site],
                sender_certificate=issued["certificate"],
                fingerprint=issued["fingerprint"],
            ),
        )
        for site in issued["bundles"]
    }
    return issued, answers


def test_the_holder_makes_the_key_and_every_site_installs_the_same_one(kits, executor):
    issued, answers = _exchange(executor, kits)
    assert issued["generated"] and issued["refused"] == {}
    assert not ts.context_from(issued["public_context"]).is_private()
    assert context_fingerprint(ts.context_from(issued["public_context"])) == issued["fingerprint"]
    for site in ("site-1", "site-2", "site-3"):
        path = kits[site] / "local" / "client_context.tenseal"
        assert path.stat().st_mode & 0o777 == 0o600
        assert held_fingerprint(kits[site], site) == issued["fingerprint"]
    assert answers["site-2"]["reason"] == "site-2: received the key from site-1"
    # Again: the holder keeps its key, a site that has it already keeps it too.
    again, answers = _exchange(executor, kits, recipients=("site-2",))
    assert not again["generated"] and again["fingerprint"] == issued["fingerprint"]
    assert answers["site-2"]["reason"] == "site-2: already holds this key"


def test_the_holder_refuses_the_servers_certificate_offered_as_a_site(kits, executor):
    server_cert = (kits[SERVER] / "startup" / "server.crt").read_bytes()
    issued = executor._issue(kits["site-1"], "site-1", _shareable(certificates={"site-2": server_cert}))
    assert issued["bundles"] == {}
    assert issued["refused"] == {
        "site-2": "site-1: certificate for site-2: the server's certificate (localhost), not a site's"
    }
    issued = executor._issue(kits["site-1"], "site-1", _shareable(certificates={SERVER: server_cert}))
    assert issued["refused"] == {
        SERVER: "site-1: certificate for localhost: the server's certificate (localhost), not a site's"
    }


def test_a_site_with_another_key_refuses_to_replace_it(kits, executor, tmp_path):
    _exchange(executor, kits)
    other = _kits(tmp_path / "other", sites=("site-1", "site-2"))
    foreign, _ = _exchange(executor, other, recipients=())
    with pytest.raises(Exception, match=r"^site-2: already holds a different key \(.{16}…\), refusing to replace it"):
        executor._install(
            kits["site-2"], "site-2", _shareable(bundle=b"", sender_certificate=b"", fingerprint=foreign["fingerprint"])
        )


def test_a_bundle_for_another_site_is_refused_in_one_line(kits, executor):
    issued = executor._issue(
        kits["site-1"],
        "site-1",
        _shareable(certificates={"site-2": (kits["site-2"] / "startup" / "client.crt").read_bytes()}),
    )
    reply = executor.execute(
        "key_install",
        _shareable(
            bundle=issued["bundles"]["site-2"],
            sender_certificate=issued["certificate"],
            fingerprint=issued["fingerprint"],
        ),
        _ctx("site-3", kits["site-3"]),
        None,
    )
    data = from_shareable(reply).data
    assert data == {"status": "failed", "reason": "site-3: key bundle is addressed to site-2, not to this site"}
    assert not (kits["site-3"] / "local" / "client_context.tenseal").exists()


def test_a_hospital_policy_can_limit_who_receives_the_key(kits, executor):
    (kits["site-1"] / "local").mkdir()
    (kits["site-1"] / "local" / "resources.json").write_text(json.dumps({"clinfed": {"key_recipients": ["site-2"]}}))
    issued, _ = _exchange(executor, kits)
    assert set(issued["bundles"]) == {"site-2"}
    assert issued["refused"] == {"site-3": "site-1: local policy does not list site-3 in key_recipients"}


def _ctx(site: str, root: Path):
    """An FLContext whose identity is `site` and whose workspace is its kit folder."""
    from unittest.mock import MagicMock

    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext

    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    engine = MagicMock()
    engine.get_workspace.return_value.get_root_dir.return_value = str(root)
    ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)
    return ctx


def test_a_key_that_came_with_the_kit_is_neither_used_nor_handed_on(kits, executor):
    """An operator who slips a context it made into a kit's startup/ (as FLARE's HEBuilder does) could decrypt
    everything encrypted under it: the site refuses it by name, as holder and as recipient."""
    planted = kits["site-1"] / "startup" / "client_context.tenseal"
    planted.write_bytes(create_context().serialize(save_secret_key=True))
    reply = executor.execute("key_hello", Shareable(), _ctx("site-1", kits["site-1"]), None)
    data = from_shareable(reply).data
    assert data["status"] == "failed"
    assert data["reason"].startswith(f"site-1: {planted} came with the kit, so the operator made it")
    with pytest.raises(Exception, match=r"came with the kit, so the operator made it"):
        executor._issue(kits["site-1"], "site-1", _shareable(certificates={}))
    assert not (kits["site-1"] / "local" / "client_context.tenseal").exists()
