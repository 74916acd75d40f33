"""Tamper-evident audit trail, the writer: one hash-chained JSON-lines log per participant.

This module is the log's format and its writer (:class:`AuditLog`, record hashing, payload digests,
checking one chain, which the writer needs before it may extend a log); :mod:`clinfed.audit.verify`
checks many logs against each other, against their anchors and against the sites' privacy ledgers.

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
  as long as the other party's log is verified alongside.
* *Anchors* close the rest: every round, sites and server append an ``anchor`` record holding the
  peer's :attr:`AuditLog.head` (record count and hash of its last line) as they saw it. A party that
  later rewrites its own log consistently (fresh hashes from the edit on) or cuts its tail no longer
  matches the head that the other party's log vouched for, and :func:`clinfed.audit.verify` says so.

Nothing secret is logged: records carry digests (:func:`payload_digest`,
:func:`payload_digest_chunks`) and sizes of payloads, never the payloads, weights, data or keys.
:meth:`AuditLog.append` refuses ``bytes`` values outright so a payload cannot slip in by mistake.

Events used by clinfed components (free-form: any other event name is accepted)::

    job_start        {job, ...}
    job_end          {job, ...}
    update_sent      {job, round, site, sha256, bytes, encrypted}
    update_received  {job, round, site, sha256, bytes, encrypted}
    aggregation      {job, round, sites, encrypted}
    epsilon_spent    {job, round, run, mechanism, epsilon, delta, noise_multiplier, sample_rate, steps,
                      spend_epsilon (laplace only)}   written by the privacy ledger, under its lock
    anchor           {peer, peer_seq, peer_hash}   the peer's AuditLog.head as this participant saw it
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
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from clinfed.textio import json_default

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
    "payload_digest",
    "payload_digest_chunks",
    "read_records",
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
    "epsilon_spent": (
        "job",
        "round",
        "run",
        "mechanism",
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
    ),
    "anchor": ("peer", "peer_seq", "peer_hash"),
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


def _normalise(fields: dict[str, Any]) -> dict[str, Any]:
    """Round-trip fields through JSON so what is hashed is exactly what a reader will parse back."""
    try:
        return json.loads(json.dumps(fields, default=json_default))
    except TypeError as exc:
        raise TypeError(
            f"{exc} (audit records never carry payloads: log payload_digest(data) and len(data) instead)"
        ) from None


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


def read_records(path: str | Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records of one log that parse (optionally only one event), read under a shared lock.

    For consumers that need a log's *content* (the privacy ledger's cross-check); it does not judge
    the chain: :func:`clinfed.audit.verify` does. A missing log reads as no records.
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in _read_locked(path).split(b"\n"):
        record, _ = _parse(line) if line else (None, None)
        if record is not None and (event is None or record["event"] == event):
            records.append(record)
    return records
