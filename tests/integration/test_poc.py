"""Claim: FLARE's POC mode runs the bundled jobs encrypted, exactly like a provisioned deployment.

`clinfed poc prepare/start/stop` wrap `nvflare poc`; a job goes in through FLARE's API as the POC
project admin. The kits carry no CKKS key: `poc start` runs the key exchange (site-1 makes the key,
the other sites receive it sealed to their kit certificates, the server the public context). Real FLARE
processes on loopback; HOME points at a scratch folder because `nvflare poc` registers its admin
kits in ~/.nvflare.
"""

from __future__ import annotations

import json
import socket

import pytest
import tenseal as ts

from clinfed.deploy import poc
from clinfed.deploy.submit import submit
from clinfed.he.context import context_fingerprint

# port 18102 is shared with the other loopback federations: under `pytest -n`, one worker runs them in turn
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("loopback_federation")]
SITES = ["site-1", "site-2", "site-3"]


def test_poc_runs_breast_cancer_dp_encrypted(tmp_path, monkeypatch):
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", 18102)) == 0:
            pytest.fail("port 18102 on 127.0.0.1 is in use; the POC federation needs it")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    workspace = tmp_path / "poc"
    kits = poc.prepare(workspace, sites=3)  # a sum is released only with >= 3 contributors
    server = next(p for p in kits.iterdir() if (p / "startup" / "fed_server.json").is_file())
    assert not list(workspace.rglob("*.tenseal")), "no CKKS key is made at provisioning"
    try:
        poc.start(workspace, timeout=120)  # then site-1 makes the key and seals it to the others' kit certificates
        assert not list(server.rglob("client_context.tenseal")), "the POC server holds no secret key"
        public = ts.context_from((server / "local" / "server_context.tenseal").read_bytes())
        assert not public.is_private()
        for site in SITES:
            secret = kits / site / "local" / "client_context.tenseal"
            assert secret.stat().st_mode & 0o777 == 0o600
            assert context_fingerprint(ts.context_from(secret.read_bytes())) == context_fingerprint(public)
        out = tmp_path / "result"
        result = submit("breast_cancer_dp", kits / "admin@clinfed.local", wait=True, out=out, rounds=2, timeout=600)
        assert result.status == "FINISHED:COMPLETED"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["encrypted"] is True
        assert summary["rounds_completed"] == 2
        assert summary["sites"] == SITES
        assert summary["final"]["metrics"]["auc"] >= 0.95
    finally:
        poc.stop(workspace)
