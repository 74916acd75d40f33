"""Tamper-evident audit trail: hash-chained JSON-lines logs (:mod:`.log`) and their verification
(:mod:`.verify`). Everything other modules use is importable from ``clinfed.audit``."""

from clinfed.audit.log import (
    EVENTS,
    GENESIS,
    SERVER,
    AuditLog,
    AuditTamperedError,
    payload_digest,
    payload_digest_chunks,
    read_records,
)
from clinfed.audit.verify import VerifyReport, main_verify, unmatched_spends, verify

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
    "read_records",
    "unmatched_spends",
    "verify",
]
