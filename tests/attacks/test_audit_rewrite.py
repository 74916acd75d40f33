"""Attack (issue 12, audit anchoring): a participant rewrites its own audit history consistently.

A hash chain only shows that no line changed *since the next one was written*: whoever can write a
log can edit a record and recompute every later hash, and the chain verifies again. A site could so
understate the ε it spent, or a server which sites it aggregated. Sites and server therefore exchange
chain heads every round and log them (`anchor` records, holding the peer's `AuditLog.head`); a
rewrite or a cut tail then disagrees with a head that the *other* party's log vouched for, and
`verify` must say so. The attacker below knows the documented record format and recomputes the
chain exactly as the writer does, so its own log verifies alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from clinfed.audit import AuditLog, payload_digest, verify

JOB = "breast_cancer_dp"
SITE = "site-1"
SERVER = "server"
ROUNDS = 3


def _anchor(log: AuditLog, peer: AuditLog) -> None:
    """`log` records `peer`'s head as it stands now: what the lead wires up every round."""
    seq, digest = peer.head
    log.append("anchor", peer=peer.participant, peer_seq=seq, peer_hash=digest)


def _federation(root: Path) -> dict[str, Path]:
    """A site and the server logging three rounds, exchanging heads after each, then the job's end."""
    site, server = AuditLog(root / SITE, SITE), AuditLog(root / SERVER, SERVER)
    site.append("job_start", job=JOB)
    server.append("job_start", job=JOB)
    for rnd in range(ROUNDS):
        site.append(
            "epsilon_spent",
            job=JOB,
            round=rnd,
            run="run-a",
            mechanism="gaussian",
            epsilon=0.8 * (rnd + 1),
            delta=1e-5,
            noise_multiplier=1.2,
            sample_rate=0.1,
            steps=10,
        )
        update = f"ciphertexts of {SITE} round {rnd}".encode()
        exchange = {"job": JOB, "round": rnd, "site": SITE, "sha256": payload_digest(update), "bytes": len(update)}
        site.append("update_sent", **exchange, encrypted=True)
        server.append("update_received", **exchange, encrypted=True)
        server.append("aggregation", job=JOB, round=rnd, sites=[SITE], encrypted=True)
        _anchor(server, site)
        _anchor(site, server)
    site.append("job_end", job=JOB)
    server.append("job_end", job=JOB)
    _anchor(server, site)
    _anchor(site, server)
    return {SITE: site.path, SERVER: server.path}


def _rewrite(path: Path, edit) -> None:
    """Apply `edit` to the parsed records, then rebuild the whole chain as the writer would."""
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    edit(records)
    prev, lines = "0" * 64, []
    for seq, record in enumerate(records):
        record["seq"], record["prev"] = seq, prev
        body = {k: v for k, v in record.items() if k != "hash"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        record["hash"] = hashlib.sha256(canonical).hexdigest()
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode()
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _understate_epsilon(records: list[dict]) -> None:
    for record in records:
        if record["event"] == "epsilon_spent":
            record["epsilon"] = record["epsilon"] / 10


def _forge_aggregation(records: list[dict]) -> None:
    for record in records:
        if record["event"] == "aggregation" and record["round"] == 0:
            record["sites"] = [SITE, "site-9"]


def test_an_honest_pair_with_anchors_verifies_clean(tmp_path: Path) -> None:
    _federation(tmp_path)
    report = verify(tmp_path)
    assert report.ok, report.problems
    assert report.warnings == []
    assert report.records == (1 + 3 * ROUNDS + 2) + (1 + 3 * ROUNDS + 2)


@pytest.mark.parametrize(("who", "edit"), [(SITE, _understate_epsilon), (SERVER, _forge_aggregation)])
def test_a_consistent_rewrite_is_caught_by_the_peers_anchors(tmp_path: Path, who: str, edit) -> None:
    paths = _federation(tmp_path)
    _rewrite(paths[who], edit)
    assert verify(paths[who]).ok, "the attacker's rewritten chain must verify on its own"
    report = verify(tmp_path)
    assert not report.ok, f"{who} rewrote its own audit log consistently and verify did not notice"
    named = [p for p in report.problems if p.startswith(f"{paths[who]}: rewritten or cut")]
    assert named, report.problems
    peer = SERVER if who == SITE else SITE
    assert f"{paths[peer]}:" in named[0], named[0]  # names the anchor that vouched for the old head


def test_a_cut_tail_is_caught_by_the_peers_anchor(tmp_path: Path) -> None:
    paths = _federation(tmp_path)
    lines = paths[SITE].read_bytes().splitlines(keepends=True)
    paths[SITE].write_bytes(b"".join(lines[:-2]))  # drop job_end and the last anchor: a valid, shorter chain
    assert verify(paths[SITE]).ok
    report = verify(tmp_path)
    assert not report.ok, "the site cut its log's tail and verify did not notice"
    assert any(p.startswith(f"{paths[SITE]}: rewritten or cut") and "found only" in p for p in report.problems), (
        report.problems
    )
