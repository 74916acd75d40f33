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
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from clinfed.fl import payload
from clinfed.textio import json_default

GLOBAL_MODEL_FILE = {True: "global_model.ckks.json", False: "global_model.npz"}


def checkpoint_path(server_root: Path, job: str, submission: str) -> Path:
    """`<server>/checkpoints/<job>-<submission>.json`; the submission id is reduced to safe characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", submission)
    return server_root / "checkpoints" / f"{job}-{safe}.json"


def model_doc(model: FLModel, encrypted: bool) -> dict:
    """The global model as it may be written to the server's disk."""
    if encrypted:
        params = model.params
        return {
            "total_weight": model.meta["total_weight"],
            "layout": params[payload.LAYOUT_KEY],
            "fingerprint": params[payload.FINGERPRINT_KEY],
            "ckks": [c.hex() for c in params[payload.CKKS_KEY]],
            "compact_spec": params.get(payload.COMPACT_KEY),
        }
    return {
        "total_weight": model.meta["total_weight"],
        "arrays": {k: np.asarray(v).tolist() for k, v in model.params.items()},
    }


def model_from_doc(doc: dict) -> FLModel:
    if "ckks" in doc:
        params = payload.encrypted_params(
            [bytes.fromhex(c) for c in doc["ckks"]], doc["layout"], doc["fingerprint"], doc.get("compact_spec")
        )
    else:
        params = {k: np.asarray(v, dtype=np.float32) for k, v in doc["arrays"].items()}
    return FLModel(params=params, meta={"total_weight": doc["total_weight"]})


def save_global_model(run_dir: Path, model: FLModel, encrypted: bool, round_num: int) -> None:
    """The global model of the run, in FLARE's run folder (downloaded with the job)."""
    path = Path(run_dir) / GLOBAL_MODEL_FILE[encrypted]
    if encrypted:
        path.write_text(json.dumps({"round": round_num, **model_doc(model, encrypted)}))
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
