"""Verifying audit logs: each chain alone, participants against each other, anchors, and ledgers.

Why a separate module: writing a record (:mod:`clinfed.audit.log`) needs only the chain format;
judging a federation's logs needs all of them at once, and that is where tampering that no single
chain can show becomes visible:

* **Exchanges**: every ``update_received`` must match an ``update_sent`` (same job, round, site end
  and payload SHA-256) in the sender's log.
* **Anchors**: an ``anchor`` record holds a peer's :attr:`~clinfed.audit.log.AuditLog.head` as this
  participant saw it (``peer``, ``peer_seq`` = the peer's record count, ``peer_hash`` = SHA-256 of its
  last line then). The peer's log must still hold at least ``peer_seq`` records, and its line
  ``peer_seq`` must still hash to ``peer_hash``. A party that rewrites its own log *consistently*
  (edits a record and recomputes every later hash, so its chain verifies alone) or cuts its tail is
  caught by any anchor another party took after the edited record. What an anchor cannot show: edits
  after the last anchor, or a rewrite in which every peer that anchored the log colludes.
* **Privacy ledgers**: in a participant folder that holds both ``local/privacy_ledger.json`` and
  ``audit/<site>.jsonl``, every ``epsilon_spent`` record must be a spend in the ledger and every
  ledger spend must have its ``epsilon_spent`` record (matched on job, round, run and mechanism). A
  ledger deleted, truncated or restored from an old backup lacks spends its audit log holds (a
  participant folder with ``local/`` whose ledger is gone while its log records spends is reported
  as well); a spend forged into the ledger has no audit record.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clinfed.audit.log import GENESIS, SERVER, _check_file, _Entry, _line_digest, _read_locked, read_records

__all__ = ["LEDGER_FILE", "VerifyReport", "main_verify", "spend_key", "unmatched_spends", "verify"]

LEDGER_FILE = "privacy_ledger.json"
"""A site's privacy ledger, in its workspace's ``local/`` folder (see :mod:`clinfed.privacy.ledger`)."""

_SHORT = 16  # hex digits of a digest shown in messages: enough to tell two apart, short enough to read


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. Problems are evidence of tampering (or of a broken writer);
    warnings are gaps a chain cannot decide on its own (e.g. an update sent but never received)."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: int = 0
    records: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _find_logs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.name == "audit":
        return sorted(p for p in path.glob("*.jsonl") if p.is_file())
    return sorted(p for p in path.rglob("*.jsonl") if p.parent.name == "audit" and p.is_file())


def verify(path: str | Path) -> VerifyReport:
    """Check every audit chain under ``path`` and cross-check the participants against each other.

    ``path`` is one ``.jsonl`` log, an ``audit/`` folder, or any folder (searched recursively for
    ``audit/*.jsonl``). Per log: every line parses, ``seq`` runs on from 0, ``prev`` is the SHA-256
    of the previous line's bytes and ``hash`` matches the record; failures name ``file:line``.

    A cut tail is invisible to a chain, so exchanges are then cross-checked: an ``update_sent`` in
    one log against the ``update_received`` of the same job, round and site in the peer's log (the
    server's for a site, the site's for the server). A problem is reported when the receiver logged
    a *different* SHA-256 from every one the sender logged (naming both lines), or when the receiver
    logged something the sender's log -- verified alongside -- never sent. Sent but not received is
    only a warning: the server may legitimately exclude or never get a site's update (a refusal, a
    crash, a timeout). Logs of a peer not among the verified files cannot be cross-checked: warning.

    Then every ``anchor`` record is checked against the anchored peer's log, and every participant
    folder holding a privacy ledger beside its audit log is cross-checked against it (see the module
    docstring).
    """
    root = Path(path)
    report = VerifyReport()
    if not root.exists():
        report.problems.append(f"{root}: no such file or folder")
        return report
    logs = _find_logs(root)
    if not logs:
        report.problems.append(f"{root}: no audit logs found (expected audit/<participant>.jsonl)")
        return report
    entries: list[_Entry] = []
    lines: dict[str, list[tuple[Path, list[bytes]]]] = defaultdict(list)
    for log in logs:
        data = _read_locked(log)
        problems, found = _check_file(log, data)
        report.problems.extend(problems)
        entries.extend(found)
        report.files += 1
        report.records += len(found)
        lines[log.stem].append((log, _split_lines(data)))
    _cross_check(entries, {log.stem for log in logs}, report)
    _check_anchors(entries, lines, report)
    _check_ledgers(root, logs, report)
    return report


def _split_lines(data: bytes) -> list[bytes]:
    """A log's lines as the writer wrote them (a last line without its newline counts too)."""
    out = data.split(b"\n")
    if out and out[-1] == b"":
        out.pop()
    return out


@dataclass(frozen=True)
class _Exchange:
    job: str
    round: str
    sender: str
    receiver: str


def _exchange(entry: _Entry) -> tuple[_Exchange, str] | None:
    """The exchange an update record is one end of, and the digest it logged; None if not one."""
    r = entry.record
    event, me = r["event"], r["participant"]
    if event not in ("update_sent", "update_received"):
        return None
    if me == SERVER:
        peer = r.get("site")
        if not isinstance(peer, str):
            return None
    else:
        peer = SERVER
    sender, receiver = (me, peer) if event == "update_sent" else (peer, me)
    # json.dumps keys: a round logged as 3 and one logged as "3" are different claims.
    return _Exchange(json.dumps(r.get("job")), json.dumps(r.get("round")), sender, receiver), str(r.get("sha256"))


def _cross_check(entries: list[_Entry], participants: set[str], report: VerifyReport) -> None:
    sent: dict[_Exchange, list[tuple[str, _Entry]]] = defaultdict(list)
    received: dict[_Exchange, list[tuple[str, _Entry]]] = defaultdict(list)
    for entry in entries:
        found = _exchange(entry)
        if found is None:
            if entry.record["event"] in ("update_sent", "update_received"):
                report.warnings.append(f"{entry.where}: {entry.record['event']} without a site; not cross-checked")
            continue
        key, digest = found
        (sent if entry.record["event"] == "update_sent" else received)[key].append((digest, entry))

    def what(key: _Exchange) -> str:
        return f"{key.sender}'s update to {key.receiver} for job {key.job} round {key.round}"

    missing_peer: set[str] = set()
    for key, receipts in received.items():
        sends = sent.get(key, [])
        for digest, entry in receipts:
            if any(d == digest for d, _ in sends):
                continue
            if sends:
                other_digest, other = sends[0]
                report.problems.append(
                    f"{entry.where}: {key.receiver} logged receiving {what(key)} with sha256 {digest[:_SHORT]}, "
                    f"but {other.where}: {key.sender} logged sending it with sha256 {other_digest[:_SHORT]} "
                    "(altered in transit, or one of the logs edited)"
                )
            elif key.sender in participants:
                report.problems.append(
                    f"{entry.where}: {key.receiver} logged receiving {what(key)} (sha256 {digest[:_SHORT]}), "
                    f"but {key.sender}'s log has no such update_sent (its log cut or edited, or the update forged)"
                )
            else:
                missing_peer.add(key.sender)
    for key, sends in sent.items():
        receipts = received.get(key, [])
        for digest, entry in sends:
            if any(d == digest for d, _ in receipts):
                continue
            if receipts:
                continue  # a differing receipt is already reported from the receiver's side
            if key.receiver in participants:
                report.warnings.append(
                    f"{entry.where}: {what(key)} was logged as sent but {key.receiver} logged no receipt "
                    "(excluded, lost in transit, or the receiver's log cut)"
                )
            else:
                missing_peer.add(key.receiver)
    for peer in sorted(missing_peer):
        report.warnings.append(f"no audit log of {peer} among the verified files: its exchanges are not cross-checked")


# --------------------------------------------------------------------------------------------------
# anchors


def _check_anchors(
    entries: list[_Entry], logs: dict[str, list[tuple[Path, list[bytes]]]], report: VerifyReport
) -> None:
    """Every anchor must still match the anchored peer's log (see the module docstring)."""
    unverified: set[str] = set()
    for entry in entries:
        r = entry.record
        if r["event"] != "anchor":
            continue
        peer, seq, digest = r.get("peer"), r.get("peer_seq"), r.get("peer_hash")
        if (
            not isinstance(peer, str)
            or not isinstance(seq, int)
            or isinstance(seq, bool)
            or seq < 0
            or not isinstance(digest, str)
        ):
            report.problems.append(f"{entry.where}: anchor without a valid peer, peer_seq and peer_hash (line edited)")
            continue
        if peer not in logs:
            unverified.add(peer)
            continue
        found = [_anchor_mismatch(path, peer_lines, seq, digest, entry.where) for path, peer_lines in logs[peer]]
        if all(found):  # several logs of one participant (copies, runs): one that matches is enough
            report.problems.append(str(found[0]))
    for peer in sorted(unverified):
        report.warnings.append(
            f"no audit log of {peer} among the verified files: the anchors of its head are not checked"
        )


def _anchor_mismatch(path: Path, lines: list[bytes], seq: int, digest: str, anchor: str) -> str | None:
    """Why the log at `path` no longer holds the head that the anchor at `anchor` recorded, or None."""
    if seq > len(lines):
        return (
            f"{path}: rewritten or cut: {anchor} anchored {seq} records (last hash {digest[:_SHORT]}), "
            f"found only {len(lines)}"
        )
    found = GENESIS if seq == 0 else _line_digest(lines[seq - 1])
    if found != digest:
        return (
            f"{path}: rewritten or cut: {anchor} anchored record {seq - 1} with hash {digest[:_SHORT]}, "
            f"found {found[:_SHORT]}"
        )
    return None


# --------------------------------------------------------------------------------------------------
# privacy ledgers


def spend_key(record: dict[str, Any]) -> tuple[str, str, str]:
    """What ties a ledger spend to its ``epsilon_spent`` record: job, round and mechanism (the run is
    compared separately, since records written before runs were logged carry none)."""
    return str(record.get("job")), json.dumps(record.get("round")), str(record.get("mechanism") or "gaussian")


def unmatched_spends(
    audit_records: Iterable[dict[str, Any]], ledger_spends: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(``epsilon_spent`` records no ledger spend accounts for, ledger spends no record accounts for).

    One-to-one matching on job, round, mechanism and run, so a spend recorded twice in the audit log
    needs two in the ledger. An audit record without a ``run`` field (written before runs were
    logged) matches a spend of any run, but only after the records that name their run took theirs.
    """
    pool: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for spend in ledger_spends:
        pool[spend_key(spend)].append(spend)
    records = list(audit_records)
    lacking: list[dict[str, Any]] = []
    for with_run in (True, False):
        for record in records:
            if ("run" in record) != with_run:
                continue
            candidates = pool.get(spend_key(record), [])
            run = str(record.get("run") or "")
            match = next(
                (
                    s
                    for s in candidates
                    if (not with_run or str(s.get("run") or "") == run) and _same_parameters(record, s)
                ),
                None,
            )
            if match is None:
                lacking.append(record)
            else:
                candidates.remove(match)
    unlogged = [s for spends in pool.values() for s in spends]
    order = {id(r): i for i, r in enumerate(records)}
    lacking.sort(key=lambda r: order[id(r)])
    return lacking, unlogged


#: Every parameter ε is computed from: a spend must carry the values its audit record holds (issue 23, item 6).
SPEND_PARAMETERS = ("noise_multiplier", "sample_rate", "steps", "spend_epsilon")


def _same_parameters(record: dict[str, Any], spend: dict[str, Any]) -> bool:
    """The audit record's spend parameters equal the ledger spend's (those the record holds: records
    written before a parameter was logged compare on the rest). Why: matched on job and round alone,
    a ledger whose noise multipliers were raised to 100 opened cleanly and its ε fell below zero."""
    for key in SPEND_PARAMETERS:
        if key not in record or record[key] is None:
            continue
        mine = spend.get(key)
        try:
            if mine is None or not math.isclose(float(record[key]), float(mine), rel_tol=1e-12, abs_tol=0.0):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _describe(record: dict[str, Any]) -> str:
    run = f" run {record['run']}" if record.get("run") else ""
    mechanism = record.get("mechanism") or "gaussian"
    return f"job {record.get('job')} round {record.get('round')}{run} ({mechanism})"


def _ledger_files(root: Path) -> list[Path]:
    if root.is_file():
        return []
    base = root.parent if root.name == "audit" else root
    found = sorted(p for p in base.rglob(LEDGER_FILE) if p.parent.name == "local" and p.is_file())
    return found


def _check_ledgers(root: Path, logs: list[Path], report: VerifyReport) -> None:
    """Each participant folder's ledger against its own audit log (see the module docstring).

    A participant folder (one with a ``local/`` folder) whose audit log records privacy spends but
    whose ledger is gone is reported too: that is the deleted-ledger attack itself.
    """
    for log in logs:
        folder = log.parent.parent
        ledger = folder / "local" / LEDGER_FILE
        if log.parent.name != "audit" or not (folder / "local").is_dir() or ledger.exists():
            continue
        spent = [r for r in read_records(log, "epsilon_spent") if r.get("participant") == log.stem]
        if spent:
            report.problems.append(
                f"{ledger}: missing, but {log} records {len(spent)} privacy spends of {log.stem} "
                f"(first: {_describe(spent[0])}; ledger deleted)"
            )
    for ledger in _ledger_files(root):
        folder = ledger.parent.parent
        try:
            data = json.loads(ledger.read_text())
            site = data["site"]
            spends = data["spends"]
            if not isinstance(site, str) or not isinstance(spends, list):
                raise TypeError("site must be a name and spends a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.problems.append(f"{ledger}: unreadable privacy ledger ({' '.join(str(exc).split())})")
            continue
        log = folder / "audit" / f"{site}.jsonl"
        if not log.is_file():
            continue
        records = [r for r in read_records(log, "epsilon_spent") if r.get("participant") == site]
        lacking, unlogged = unmatched_spends(records, [s for s in spends if isinstance(s, dict)])
        if lacking:
            report.problems.append(
                f"{ledger}: {site}'s audit log records {len(lacking)} privacy spends its ledger lacks "
                f"(first: {_describe(lacking[0])}; ledger deleted, cut or restored from an old copy) — {log}"
            )
        if unlogged:
            report.problems.append(
                f"{ledger}: {len(unlogged)} privacy spends in {site}'s ledger have no epsilon_spent record in "
                f"{log} (first: {_describe(unlogged[0])}; ledger edited, or a write was interrupted)"
            )


def main_verify(path: str) -> int:
    """``clinfed audit verify PATH``: 0 intact, 1 tampered (each problem on its own line, file:line
    first), 2 when PATH does not exist."""
    if not Path(path).exists():
        print(f"audit verify: {path}: no such file or folder", file=sys.stderr)
        return 2
    report = verify(path)
    for warning in report.warnings:
        print(f"warning: {warning}")
    if not report.ok:
        for problem in report.problems:
            print(problem)
        return 1
    print(f"audit intact: {report.records} records in {report.files} files")
    return 0
