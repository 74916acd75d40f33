"""Tamper-evident audit trail: one hash-chained JSON-lines log per participant.

Why: a hospital (or a regulator acting for it) must be able to show afterwards what left the site,
what the server received and aggregated, and how much privacy budget each round spent, without
trusting the operator's word. Each participant (``"server"`` or a site name) appends to
``<workspace>/audit/<participant>.jsonl``; every record names the SHA-256 of the exact bytes of the
line before it, so a line edited, removed, inserted or reordered breaks the chain at a place
:func:`verify` can name (``file:line``).

What a chain can and cannot show:

* It shows *internal consistency*: no record was changed, dropped or moved since the next one was
  written. It cannot show *authenticity*: whoever can write the file can rewrite it from the edit
  onwards with fresh hashes. It cannot show that the *tail* was not cut off either: a log truncated
  at a line boundary is a valid, shorter chain.
* Both gaps are narrowed by *cross-checks between participants*, whose logs live on different
  machines under different administrators: every ``update_sent`` in one log must match an
  ``update_received`` (same job, round, peer and payload SHA-256) in the peer's log. A site that
  cuts its log, or a server that claims to have received something a site never sent, is caught
  as long as the other party's log is verified alongside. Publishing :attr:`AuditLog.head` (for
  example in ``summary.json``) anchors a chain further.

Nothing secret is logged: records carry digests (:func:`payload_digest`,
:func:`payload_digest_chunks`) and sizes of payloads, never the payloads, weights, data or keys.
:meth:`AuditLog.append` refuses ``bytes`` values outright so a payload cannot slip in by mistake.

Events used by clinfed components (free-form: any other event name is accepted)::

    job_start        {job, ...}
    job_end          {job, ...}
    update_sent      {job, round, site, sha256, bytes, encrypted}
    update_received  {job, round, site, sha256, bytes, encrypted}
    aggregation      {job, round, sites, encrypted}
    epsilon_spent    {job, round, epsilon, delta, noise_multiplier, sample_rate, steps}
    refused          {job, round, site, reason}
    failed           {job, round, site, reason}

For ``update_sent`` / ``update_received`` the ``site`` field names the *site end* of the exchange:
in a site's log, the site itself; in the server's log, the site the update came from or went to.
Both ends must digest the *same bytes* (the serialized payload as it travels, ciphertexts
included), or the cross-check cannot match them.

Record layout (one JSON object per line, ASCII, compact, keys in this order)::

    {"seq": 0, "time": "2025-01-01T00:00:00.000000Z", "participant": "site-1", "event": "...",
     ...fields, "prev": "<sha256 of the previous line's bytes, or 64 zeros>",
     "hash": "<sha256 of the record's canonical JSON (sorted keys) without 'hash'>"}

"Line bytes" are the bytes between newlines, without the terminating ``\\n``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

try:  # POSIX advisory locks make appends from several processes safe; elsewhere threads only.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "EVENTS",
    "GENESIS",
    "SERVER",
    "AuditLog",
    "AuditTamperedError",
    "VerifyReport",
    "main_verify",
    "payload_digest",
    "payload_digest_chunks",
    "verify",
]

SERVER = "server"
"""The participant name the server logs under (sites log under their FLARE site names)."""

GENESIS = "0" * 64
"""The ``prev`` of a chain's first record: there is no line before it."""

EVENTS: dict[str, tuple[str, ...]] = {
    "job_start": ("job",),
    "job_end": ("job",),
    "update_sent": ("job", "round", "site", "sha256", "bytes", "encrypted"),
    "update_received": ("job", "round", "site", "sha256", "bytes", "encrypted"),
    "aggregation": ("job", "round", "sites", "encrypted"),
    "epsilon_spent": ("job", "round", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps"),
    "refused": ("job", "round", "site", "reason"),
    "failed": ("job", "round", "site", "reason"),
}
"""The events clinfed components write and the fields they carry (documentation, not enforced)."""

_RESERVED = ("seq", "time", "participant", "event", "prev", "hash")
_REQUIRED_TYPES: dict[str, type] = {
    "seq": int,
    "time": str,
    "participant": str,
    "event": str,
    "prev": str,
    "hash": str,
}
_SHORT = 16  # hex digits of a digest shown in messages: enough to tell two apart, short enough to read


class AuditTamperedError(RuntimeError):
    """An existing log's chain is broken, so extending it would bury the evidence."""


# --------------------------------------------------------------------------------------------------
# digests and encoding


def payload_digest(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of one payload: what the log records instead of the payload itself."""
    return hashlib.sha256(data).hexdigest()


def payload_digest_chunks(chunks: Iterable[bytes | bytearray | memoryview]) -> str:
    """Hex SHA-256 of a sequence of byte chunks (e.g. the ciphertexts of one update).

    Each chunk is preceded by its length as 8 big-endian bytes, so the framing is part of what is
    digested: ``[b"ab"]`` and ``[b"a", b"b"]`` differ, and so do ``[]`` and ``[b""]``. For the same
    reason the digest of ``[data]`` is *not* ``payload_digest(data)``: both ends of an exchange must
    use the same function.
    """
    h = hashlib.sha256()
    for chunk in chunks:
        view = memoryview(chunk)
        h.update(view.nbytes.to_bytes(8, "big"))
        h.update(view)
    return h.hexdigest()


def _line_digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the record's canonical JSON (sorted keys, compact, ASCII) without ``hash``."""
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _encode_line(record: dict[str, Any]) -> bytes:
    """The exact bytes the writer puts on a line (insertion order, compact, ASCII, no newline)."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(
            "audit records never carry payloads: log payload_digest(data) and len(data) instead of the bytes"
        )
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()  # numpy / torch scalars, e.g. an epsilon from an accountant
    raise TypeError(f"audit field of type {type(value).__name__} is not JSON-serialisable")


def _normalise(fields: dict[str, Any]) -> dict[str, Any]:
    """Round-trip fields through JSON so what is hashed is exactly what a reader will parse back."""
    return json.loads(json.dumps(fields, default=_json_default))


def _check_participant(participant: str) -> str:
    if (
        not isinstance(participant, str)
        or not participant
        or participant.startswith(".")
        or any(c in participant for c in "/\\\x00\n")
    ):
        raise ValueError(f"audit participant must be a plain site or server name, got {participant!r}")
    return participant


# --------------------------------------------------------------------------------------------------
# locking


_PATH_LOCKS: dict[str, threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    """One lock per log file per process, shared by every AuditLog on it (a site's executor and
    filters may each open the same log)."""
    key = os.path.realpath(path)
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(key, threading.Lock())


@contextlib.contextmanager
def _file_lock(f: IO[bytes], exclusive: bool) -> Iterator[None]:
    """Advisory lock against other processes (POSIX); closing the file also releases it."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_locked(path: Path) -> bytes:
    """Whole file under a shared lock, so a reader never sees a half-written last line."""
    with open(path, "rb") as f, _file_lock(f, exclusive=False):
        return f.read()


def _read_last_line(f: IO[bytes]) -> tuple[bytes | None, bool]:
    """(last line without its newline, whether it ended with one); (None, True) for an empty file."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end == 0:
        return None, True
    f.seek(end - 1)
    terminated = f.read(1) == b"\n"
    stop = end - 1 if terminated else end
    pos, buf, block = stop, b"", 8192
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        buf = f.read(pos - start) + buf
        pos = start
        cut = buf.rfind(b"\n")
        if cut >= 0:
            return buf[cut + 1 :], terminated
    return buf, terminated


# --------------------------------------------------------------------------------------------------
# checking one line / one file


def _parse(line: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) or (None, reason) for one line's bytes."""
    if not line:
        return None, "empty line (a line was inserted, or a record removed)"
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None, "not valid JSON (line edited, or a write was interrupted)"
    if not isinstance(record, dict):
        return None, "not a JSON object (line edited)"
    for key, kind in _REQUIRED_TYPES.items():
        value = record.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return None, f"field {key!r} missing or not {kind.__name__} (line edited)"
    return record, None


def _content_problem(record: dict[str, Any], line: bytes) -> str | None:
    """Why this record's own content cannot be trusted, or None."""
    if _record_hash(record) != record["hash"]:
        return "record hash does not match its contents (line edited)"
    if _encode_line(record) != line:
        return "line is not in the form the writer produces (edited by hand)"
    return None


@dataclass
class _Entry:
    file: Path
    line: int
    record: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _check_file(path: Path, data: bytes) -> tuple[list[str], list[_Entry]]:
    """Problems of one log's chain, and the records that parsed (whether or not the chain holds)."""
    problems: list[str] = []
    entries: list[_Entry] = []
    if not data:
        return problems, entries
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    else:
        problems.append(f"{path}:{len(lines)}: last line has no newline (a write was interrupted, or the file was cut)")
    participant = path.stem
    expected_seq = 0
    prev_line: bytes | None = None
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        record, reason = _parse(line)
        if record is None:
            problems.append(f"{where}: {reason}")
        else:
            entries.append(_Entry(path, number, record))
            content = _content_problem(record, line)
            if content:
                problems.append(f"{where}: {content}")
            if record["seq"] != expected_seq:
                problems.append(
                    f"{where}: seq {record['seq']} where {expected_seq} was expected "
                    "(line removed, inserted or reordered)"
                )
            expected_prev = GENESIS if prev_line is None else _line_digest(prev_line)
            if record["prev"] != expected_prev:
                if prev_line is None:
                    problems.append(
                        f"{where}: prev hash is not the start of a chain (lines removed from the start, or reordered)"
                    )
                else:
                    problems.append(
                        f"{where}: prev hash does not match line {number - 1} (line removed, reordered or edited)"
                    )
            if record["participant"] != participant:
                problems.append(
                    f"{where}: record of participant {record['participant']!r} in {participant}'s log "
                    "(records moved between logs, or the file renamed)"
                )
        # Resynchronise on the highest seq seen, so one removal, insertion or swap is reported where it
        # happened rather than on every line after it.
        expected_seq = max(expected_seq, record["seq"] + 1) if record is not None else expected_seq + 1
        prev_line = line
    return problems, entries


# --------------------------------------------------------------------------------------------------
# writer


class AuditLog:
    """Appends hash-chained records to ``<folder>/audit/<participant>.jsonl``.

    Opening continues an existing log, but only after verifying its whole chain: extending a log
    that was tampered with would make the new, honest records vouch for the edited ones, so a
    broken log raises :class:`AuditTamperedError` instead (move it aside to start a new chain).

    Each append re-reads the last line under a per-file thread lock and a POSIX ``flock``, so any
    number of ``AuditLog`` objects, threads and processes can share one log, and it is flushed and
    fsynced before :meth:`append` returns: a record that returned is on disk.
    """

    def __init__(self, folder: str | Path, participant: str) -> None:
        self.participant = _check_participant(participant)
        self.path = Path(folder) / "audit" / f"{participant}.jsonl"
        self._lock = _thread_lock(self.path)
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.path.touch(exist_ok=True)
            if created:
                _fsync_dir(self.path.parent)
            problems, _ = _check_file(self.path, _read_locked(self.path))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise AuditTamperedError(
                f"refusing to append to {self.path}: its hash chain is broken: {problems[0]}{more}; "
                "keep it as evidence, run `clinfed audit verify` on it, and move it aside to start a new log"
            )

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one record and return it as written.

        ``fields`` must be JSON-serialisable and must not reuse the record's own keys
        (seq, time, participant, event, prev, hash). Log digests and sizes, never payloads.
        """
        if not isinstance(event, str) or not event:
            raise ValueError(f"audit event must be a non-empty string, got {event!r}")
        clash = sorted(set(fields) & set(_RESERVED))
        if clash:
            raise ValueError(f"audit fields {clash} clash with the record's own keys")
        body = _normalise(fields)
        with self._lock, open(self.path, "a+b") as f, _file_lock(f, exclusive=True):
            seq, prev = self._tail(f)
            record: dict[str, Any] = {
                "seq": seq,
                "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "participant": self.participant,
                "event": event,
                **body,
                "prev": prev,
            }
            record["hash"] = _record_hash(record)
            f.write(_encode_line(record) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    @property
    def head(self) -> tuple[int, str]:
        """(number of records, SHA-256 of the last line): a value worth publishing elsewhere, since
        a copy held by someone else is what shows later that the log was not cut or rewritten."""
        with self._lock, open(self.path, "rb") as f, _file_lock(f, exclusive=False):
            seq, prev = self._tail(f)
        return seq, prev

    def _tail(self, f: IO[bytes]) -> tuple[int, str]:
        """(next seq, prev) from the last line, refusing if that line was edited since it was written."""
        line, terminated = _read_last_line(f)
        if line is None:
            return 0, GENESIS
        if not terminated:
            raise AuditTamperedError(
                f"refusing to append to {self.path}: its last line is incomplete "
                "(a write was interrupted, or the file was cut); run `clinfed audit verify` on it"
            )
        record, reason = _parse(line)
        if record is not None:
            reason = _content_problem(record, line)
            if not reason and record["participant"] != self.participant:
                reason = f"it holds records of participant {record['participant']!r}"
        if reason or record is None:
            raise AuditTamperedError(f"refusing to append to {self.path}: last line: {reason}")
        return record["seq"] + 1, _line_digest(line)

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"


def _fsync_dir(folder: Path) -> None:
    """Make a new log's directory entry durable too (POSIX); best effort elsewhere."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# verifier


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
    for log in logs:
        problems, found = _check_file(log, _read_locked(log))
        report.problems.extend(problems)
        entries.extend(found)
        report.files += 1
        report.records += len(found)
    _cross_check(entries, {log.stem for log in logs}, report)
    return report


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
