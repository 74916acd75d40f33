"""The server's resume point: the encrypted global model and the round log after every round.

FLARE 2.9 no longer snapshots components (`ServerEngine.persist_components` is a no-op, and a
restarted server marks running jobs ABANDONED), so if the server dies the job would start over at
round 0 and the sites would spend their budget twice. The resume point is ours, written in the
server's own folder after every round.

It is keyed by the job's *submission* (a random id drawn when the job is built, see
`SecureFedAvgRecipe`), not by the job's name: only a resubmission of the very same job folder, after
a server restart, continues it. A new submission of the same job starts at round 0 with a fresh run
key, and never inherits an older unfinished run's model or privacy accounting.

What is written is what the server may hold: ciphertexts (or, with --no-encrypt only, plaintext).
Ciphertexts go to a binary file next to the JSON (length-prefixed records, written one at a time from
the spool they live in, SHA-256 in the JSON), not into the JSON as hex: a 500 MB model's sum is about
1 GB, which as a hex string inside one JSON document would double on disk and be held whole in
memory by the encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from clinfed.fl import payload
from clinfed.textio import json_default

GLOBAL_MODEL_FILE = {True: "global_model.ckks.json", False: "global_model.npz"}
CIPHERTEXT_SUFFIX = ".bin"  # the ciphertexts of `<name>.json` are in `<name>.bin`
_LEN = struct.Struct("<Q")


def write_ciphertexts(path: Path, cts: Sequence[bytes]) -> dict:
    """Write ``cts`` one at a time as length-prefixed records (atomically: a crash leaves the previous
    file); returns what the JSON records of them (file name, count, SHA-256 of the records)."""
    digest, tmp = hashlib.sha256(), path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as fh:
        for ct in cts:
            record = _LEN.pack(len(ct)) + bytes(ct)
            digest.update(record)
            fh.write(record)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return {"ckks_file": path.name, "ckks_count": len(cts), "ckks_sha256": digest.hexdigest()}


def read_ciphertexts(path: Path, count: int, sha256: str) -> Iterator[bytes]:
    """The records of :func:`write_ciphertexts`, one at a time; ValueError if the file is not the one
    the JSON describes (count or digest), checked before the first record is handed out."""
    digest, seen = hashlib.sha256(), 0
    with open(path, "rb") as fh:  # first pass: verify, so nothing is used from a damaged file
        while head := fh.read(_LEN.size):
            (size,) = _LEN.unpack(head)
            digest.update(head + fh.read(size))
            seen += 1
    if seen != count or digest.hexdigest() != sha256:
        raise ValueError(f"{path.name}: ciphertexts do not match the checkpoint ({seen} of {count}, or a changed file)")
    with open(path, "rb") as fh:
        while head := fh.read(_LEN.size):
            (size,) = _LEN.unpack(head)
            yield fh.read(size)


def checkpoint_path(server_root: Path, job: str, submission: str) -> Path:
    """`<server>/checkpoints/<job>-<submission>.json`; the submission id is reduced to safe characters."""
    from clinfed.textio import safe_job_label

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", submission)
    return server_root / "checkpoints" / f"{safe_job_label(job, 'server')}-{safe}.json"


def model_doc(model: FLModel, encrypted: bool, blob: Path | None = None) -> dict:
    """The global model as it may be written to the server's disk; encrypted, its ciphertexts go to
    ``blob`` (see :func:`write_ciphertexts`) and the document names that file."""
    if encrypted:
        if blob is None:
            raise ValueError("an encrypted model's ciphertexts need a file to go to")
        params = model.params
        return {
            "total_weight": model.meta["total_weight"],
            "layout": params[payload.LAYOUT_KEY],
            "fingerprint": params[payload.FINGERPRINT_KEY],
            "compact_spec": params.get(payload.COMPACT_KEY),
            "secagg_sum": model.meta.get("secagg_sum"),  # the members' reveals: the sites unmask with them
            **write_ciphertexts(blob, params[payload.CKKS_KEY]),
        }
    return {
        "total_weight": model.meta["total_weight"],
        "arrays": {k: np.asarray(v).tolist() for k, v in model.params.items()},
    }


def model_from_doc(doc: dict, folder: Path, into=None) -> FLModel:
    """The model of :func:`model_doc`; encrypted, its ciphertexts are read from ``folder`` into ``into``
    (a list by default, or e.g. a `fl.streaming.Spool`, so a large sum never sits in memory)."""
    if "ckks_file" in doc:
        cts = [] if into is None else into
        for ct in read_ciphertexts(Path(folder) / doc["ckks_file"], int(doc["ckks_count"]), str(doc["ckks_sha256"])):
            cts.append(ct)
        params = payload.encrypted_params(cts, doc["layout"], doc["fingerprint"], doc.get("compact_spec"))
    else:
        params = {k: np.asarray(v, dtype=np.float32) for k, v in doc["arrays"].items()}
    meta = {"total_weight": doc["total_weight"]}
    if doc.get("secagg_sum"):
        meta["secagg_sum"] = doc["secagg_sum"]
    return FLModel(params=params, meta=meta)


def save_global_model(run_dir: Path, model: FLModel, encrypted: bool, round_num: int) -> None:
    """The global model of the run, in FLARE's run folder (downloaded with the job)."""
    path = Path(run_dir) / GLOBAL_MODEL_FILE[encrypted]
    if encrypted:
        doc = model_doc(model, encrypted, path.with_suffix(CIPHERTEXT_SUFFIX))
        path.write_text(json.dumps({"round": round_num, **doc}))
    else:
        np.savez(path, **model.params)


def save_state(path: Path, state: dict) -> None:
    """Write the resume point atomically (a crash mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, default=json_default))
    tmp.replace(path)


def load_state(path: Path, encrypted: bool, num_rounds: int) -> dict | None:
    """The resume point at `path` if it belongs to an unfinished run of the same kind, else None."""
    if not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("encrypted") != encrypted or state.get("next_round", 0) >= num_rounds:
        return None
    return state
