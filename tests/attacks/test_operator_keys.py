"""Attack (issue 12, item 9): the operator reads the CKKS secret key out of its provisioning output.

Whoever runs `clinfed provision` keeps the whole output folder: every kit before it is handed out,
and FLARE's provisioning state. If any file there holds the federation's secret key, the operator
(or anyone who copies that folder) can decrypt every update and model the server aggregates. The
attacker here is that operator: it provisions the bundled loopback project exactly as documented
and searches everything it was left with.

The project file is the one shipped next to the installed clinfed (`clinfed.deploy.poc.DEFAULT_PROJECT`),
so the same test runs against the original bundle and the fixed one.
"""

from __future__ import annotations

from pathlib import Path

import tenseal as ts

from clinfed.deploy.poc import DEFAULT_PROJECT
from clinfed.deploy.provision import provision


def _secret_keys(out: Path) -> list[str]:
    found = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.name == "client_context.tenseal":
            found.append(f"{path.relative_to(out)} (a site's secret-context file)")
            continue
        if path.suffix != ".tenseal":
            continue
        try:
            private = ts.context_from(path.read_bytes()).is_private()
        except Exception:  # not a TenSEAL context: nothing to decrypt with
            continue
        if private:
            found.append(f"{path.relative_to(out)} (holds the CKKS secret key)")
    return found


def test_the_provisioning_output_holds_no_ckks_secret_key(tmp_path):
    out = tmp_path / "provision"
    kits = provision(DEFAULT_PROJECT, out)
    assert (kits / "site-1" / "startup" / "client.crt").is_file(), "the kits were issued"
    assert _secret_keys(out) == [], "the operator's provisioning output must hold no CKKS secret key"


def test_every_consortium_project_leaves_the_operator_without_a_key(tmp_path):
    out = tmp_path / "consortium"
    provision(DEFAULT_PROJECT.parent / "consortium.yml", out)
    assert _secret_keys(out) == []
