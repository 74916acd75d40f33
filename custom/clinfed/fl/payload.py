"""What travels between a site and the server in one round, encrypted or in plaintext.

Encrypted (the default), a site's update is the flattened model multiplied by its aggregation weight
and packed into as few CKKS ciphertexts as the slot count allows::

    params = {"ckks": [bytes, ...], "layout": "<json>", "fingerprint": "<federation key id>"}
    meta   = {"weight": n_i / weight_unit}

The server adds the ciphertexts and sums the weights; the global model it sends back has the same
shape with meta {"total_weight": Σ weights}, and only the sites can decrypt and divide. Sample
counts (the weights) travel in the clear, as in FLARE's own FedAvg; the weights themselves never do.

Dense training updates use the compact format (`clinfed.he.compact`, ~3.75 B/param up, 7.5 down):
the train task's meta carries the job's `CompactSpec` (`compact_spec`) and the admitted sites' total
weight (`admitted_weight`); a site sends its share w_i / W of that total as its weight and the spec
in `params["compact_spec"]`, and the server's sum carries it back.

Plaintext (`--no-encrypt`, for comparison) is ordinary FedAvg: params are the arrays themselves.

Compressed (`--compression F`, `clinfed.fl.compression`), the update is one layer of k = ⌈F·P⌉ values
(the same coordinates at every site; on a compact job in `clinfed.he.truncated`'s ciphertexts, with
the job's spec in `params["compact_spec"]`) and meta carries the keyed digest of those coordinates
(`index_digest`); the sum the server sends back is tagged with the round it holds (`sum_round`), the
round it follows (`after_round`) and whose updates it holds (`contributors`), so each site can add it
to its own copy of the model exactly once and take back what the sum does not hold.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from clinfed.audit import payload_digest_chunks

ADMIT_TASK = "admit"  # job start: each site accepts or refuses the whole job
TRAIN_TASK = "train"
VALIDATE_TASK = "validate"
AUDIT_HEAD_KEY = "audit_head"  # meta key: the sender's audit-chain head (anchoring)

CKKS_KEY = "ckks"
LAYOUT_KEY = "layout"
FINGERPRINT_KEY = "fingerprint"
COMPACT_KEY = "compact_spec"  # params (compact-format payloads) and train-task meta: the job's CompactSpec
ADMITTED_WEIGHT_KEY = "admitted_weight"  # train-task meta: Σ of the admitted sites' weights

# compressed rounds (meta keys)
DIGEST_KEY = "index_digest"
SUM_ROUND_KEY = "sum_round"
AFTER_ROUND_KEY = "after_round"
CONTRIBUTORS_KEY = "contributors"


def is_encrypted(params: dict | None) -> bool:
    return bool(params) and CKKS_KEY in params


def payload_chunks(params: dict) -> Iterator[bytes]:
    """The bytes that go on the wire, in a fixed order, for hashing (audit) and size accounting;
    yielded one at a time, so a streamed update read from its spool is never in memory whole."""
    if is_encrypted(params):
        yield from params[CKKS_KEY]
        yield params[LAYOUT_KEY].encode()
        yield params[FINGERPRINT_KEY].encode()
        if params.get(COMPACT_KEY):
            yield str(params[COMPACT_KEY]).encode()
        return
    for k in sorted(params):
        yield k.encode() + np.ascontiguousarray(params[k]).tobytes()


def payload_size(params: dict) -> int:
    return sum(len(c) for c in payload_chunks(params))


def payload_sha256(params: dict) -> str:
    """The audit digest of an update: the site and the server hash the same chunks the same way."""
    return payload_digest_chunks(payload_chunks(params))


def log_update(audit, event: str, params: dict, *, job: str, round_num: int, site: str) -> tuple[str, int]:
    """Append `update_sent` / `update_received` for `params` (its digest and size, never its bytes);
    the site and the server log the same digest, which `clinfed audit verify` cross-checks."""
    size = 0

    def counted() -> Iterator[bytes]:  # one pass: a spooled update is read from disk once
        nonlocal size
        for chunk in payload_chunks(params):
            size += len(chunk)
            yield chunk

    digest = payload_digest_chunks(counted())
    audit.append(event, job=job, round=round_num, site=site, sha256=digest, bytes=size, encrypted=is_encrypted(params))
    return digest, size


def encrypted_params(cts: Sequence[bytes], layout_json: str, fingerprint: str, compact: str | None = None) -> dict:
    """The encrypted payload; a list stays a list, a spool (`fl.streaming.Spool`) stays on disk.
    ``compact``: the `CompactSpec` JSON of a compact-format payload (None: the real-valued format)."""
    keep = isinstance(cts, Sequence) and not isinstance(cts, tuple)
    params = {CKKS_KEY: cts if keep else list(cts), LAYOUT_KEY: layout_json, FINGERPRINT_KEY: fingerprint}
    if compact:
        params[COMPACT_KEY] = compact
    return params


def record_anchor(audit, meta: dict | None, *, job: str, round_num: int, peer: str) -> None:
    """Record the audit-chain head `peer` sent in `meta` (anchoring, `clinfed.audit.verify`): a copy
    held by the other party is what later shows that `peer` did not cut or rewrite its log."""
    head = (meta or {}).get(AUDIT_HEAD_KEY)
    if isinstance(head, list | tuple) and len(head) == 2:
        audit.append("anchor", job=job, round=round_num, peer=peer, peer_seq=int(head[0]), peer_hash=str(head[1]))


# --- anchors handed back at job start (issue 23, item 6) ---------------------------------------------------
ANCHORS_KEY = "anchors"  # admit-task meta: {peer: [seq, hash]}, the last head of each peer the sender anchored


def peer_anchors(audit, peers) -> dict[str, list]:
    """The last audit-chain head of each of `peers` that `audit`'s owner recorded (``anchor`` records)."""
    from clinfed.audit.log import read_records

    wanted, last = set(peers), {}
    for record in read_records(audit.path, "anchor"):
        if record.get("peer") in wanted:
            last[record["peer"]] = [int(record["peer_seq"]), str(record["peer_hash"])]
    return last


def check_own_anchor(audit, meta: dict | None, site: str) -> None:
    """Refuse (SiteRefusal) when this site's audit log no longer holds the head a peer anchored.

    Why: a ledger restored from a backup *together with* its audit log is consistent with itself,
    so the ledger's own cross-check passes; only a copy of the head held elsewhere shows that the log
    was cut. The server hands each site the last head it anchored in the `admit` task. A server that
    withholds it shows nothing (what a colluding server can hide: see docs/threat-model.md).
    """
    anchor = ((meta or {}).get(ANCHORS_KEY) or {}).get(site)
    if not (isinstance(anchor, list | tuple) and len(anchor) == 2):
        return
    from clinfed.audit.verify import _anchor_mismatch, _split_lines
    from clinfed.errors import SiteRefusal

    lines = _split_lines(audit.path.read_bytes()) if audit.path.exists() else []
    problem = _anchor_mismatch(audit.path, lines, int(anchor[0]), str(anchor[1]), "the server's anchor")
    if problem:
        raise SiteRefusal(
            f"{site}: its audit log does not hold the head the server anchored ({problem}); the ledger and "
            "audit log were rolled back or cut: refusing every job until they are restored"
        )
