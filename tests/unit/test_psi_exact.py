"""A linkage must not link a patient who is not at every site.

FLARE's DH-PSI server role ships its blinded IDs in OpenMined's Bloom filter, which reports false
members far more often than the rate FLARE asks for. With fixed keys the pairwise exchange is
deterministic, so the case below (found by trying key pairs on the bundled registries) replays one
such false positive through FLARE's handler and then through ours.
"""

from __future__ import annotations

import hashlib
import types

import private_set_intersection.python as psi
import pytest
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import PSIConst
from nvflare.app_common.psi.dh_psi.dh_psi_workflow import DhPSIWorkFlow
from nvflare.app_opt.psi.dh_psi import dh_psi_client, dh_psi_server
from nvflare.app_opt.psi.dh_psi.dh_psi_client import PSIClient
from nvflare.app_opt.psi.dh_psi.dh_psi_task_handler import DhPSITaskHandler

from clinfed.analytics.psi import patient_ids, registry_rows
from clinfed.analytics.psi_exact import ExactDhPSITaskHandler

SERVER_KEY = hashlib.sha256(b"server-124").digest()
CLIENT_KEY = hashlib.sha256(b"client-124").digest()


class _Saved:
    """The site's PSI component as far as the handler uses it after `load_items`: it records `save`."""

    def __init__(self):
        self.saved: list[str] | None = None

    def save(self, intersection: list[str]) -> None:
        self.saved = list(intersection)


@pytest.fixture
def fixed_keys(monkeypatch):
    """FLARE's PSIClient/PSIServer draw fresh keys; pin them so the exchange replays exactly."""
    server = types.SimpleNamespace(CreateWithNewKey=lambda reveal: psi.server.CreateFromKey(SERVER_KEY, reveal))
    client = types.SimpleNamespace(CreateWithNewKey=lambda reveal: psi.client.CreateFromKey(CLIENT_KEY, reveal))
    monkeypatch.setattr(dh_psi_server, "psi", types.SimpleNamespace(**{**vars(psi), "server": server}))
    monkeypatch.setattr(dh_psi_client, "psi", types.SimpleNamespace(**{**vars(psi), "client": client}))


def _registries():
    """A forward-pass step of the 3-site demo: site 1's 381 IDs against site 2 ∩ site 3 (287 IDs)."""
    site = [patient_ids(registry_rows(i, 3)) for i in range(3)]
    server_items = sorted(set(site[1]) & set(site[2]))
    return site[0], server_items


def _pairwise(handler_cls, client_items: list[str], server_items: list[str]) -> list[str]:
    """One pairwise exchange the way `DhPSIWorkFlow` drives it: setup, request, response, intersect."""
    server_site, client_site = handler_cls("local_psi"), handler_cls("local_psi")
    server_site.items, server_site.bloom_filter_fpr = server_items, DhPSIWorkFlow().bloom_filter_fpr
    client_site.items, client_site.local_psi_handler = client_items, _Saved()
    client_site.psi_client = PSIClient(client_items)

    setup = server_site.setup(Shareable({PSIConst.ITEMS_SIZE: len(client_items)}), "site-2")
    request = client_site.create_request(Shareable({PSIConst.SETUP_MSG: setup[PSIConst.SETUP_MSG]}))
    response = server_site.process_request(Shareable({PSIConst.REQUEST_MSG: request[PSIConst.REQUEST_MSG]}))
    reply = client_site.calculate_intersection(Shareable({PSIConst.RESPONSE_MSG: response[PSIConst.RESPONSE_MSG]}))
    assert reply[PSIConst.ITEMS_SIZE] == len(client_site.local_psi_handler.saved)
    return client_site.local_psi_handler.saved


def test_flares_bloom_filter_links_a_patient_who_is_not_at_every_site(fixed_keys):
    client_items, server_items = _registries()
    got = _pairwise(DhPSITaskHandler, client_items, server_items)
    extra = set(got) - set(server_items)
    assert extra == {"bc-0160"}  # at site 1 only; the true intersection has 193 IDs, FLARE reports 194


def test_ours_finds_exactly_the_intersection_with_the_same_keys(fixed_keys):
    client_items, server_items = _registries()
    got = _pairwise(ExactDhPSITaskHandler, client_items, server_items)
    assert sorted(got) == sorted(set(client_items) & set(server_items))
    assert len(got) == 193


def test_the_setup_message_is_smaller_than_flares():
    """The exact set costs less on the wire, not more (fresh keys, 287 IDs for 381 queries)."""
    client_items, server_items = _registries()
    fpr = DhPSIWorkFlow().bloom_filter_fpr
    ours = ExactDhPSITaskHandler("local_psi")
    ours.items, ours.bloom_filter_fpr = server_items, fpr
    flare = DhPSITaskHandler("local_psi")
    flare.items, flare.bloom_filter_fpr = server_items, fpr
    sizes = [
        len(h.setup(Shareable({PSIConst.ITEMS_SIZE: len(client_items)}), "site-2")[PSIConst.SETUP_MSG])
        for h in (ours, flare)
    ]
    assert sizes[0] < sizes[1]


def test_the_backward_pass_gets_one_exact_setup_per_requested_size():
    client_items, server_items = _registries()
    handler = ExactDhPSITaskHandler("local_psi")
    handler.items, handler.bloom_filter_fpr = server_items, 1e-9
    setups = handler.setup(Shareable({PSIConst.ITEMS_SIZE_SET: {287, 381}}), "site-3")[PSIConst.SETUP_MSG]
    assert set(setups) == {"287", "381"}
    for size, message in setups.items():
        client = psi.client.CreateWithNewKey(True)
        parsed = psi.ServerSetup()
        parsed.ParseFromString(message)
        items = client_items[: int(size)]
        response = psi.Response()
        response.ParseFromString(handler.psi_server.process_request(client.CreateRequest(items).SerializeToString()))
        found = {items[i] for i in client.GetIntersection(parsed, response)}
        assert found == set(items) & set(server_items)
