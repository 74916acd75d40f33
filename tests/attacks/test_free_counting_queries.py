"""Attack (issue 23, item 3): free counting queries on a site's test patients.

`validate` scored any model the server sent, as often as it was sent, uncharged: a plaintext model in
an encrypted job was loaded as it came, so a crafted network turned the returned accuracy into the
count of test patients with x_j > t (binary search then recovers feature values). And `train_loss`,
a statistic of the training batches, left the site without DP.

Fixed: in an encrypted job a site loads only a model it decrypted itself (plaintext refused); it
evaluates at most once per round (train's `global_*` metrics or `validate`), only for rounds the job
planned; train-batch metrics leave only under the policy's `metrics: full`.
"""

from __future__ import annotations

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from clinfed.fl.executor import DPTrainExecutor
from clinfed.fl.participant import write_site_policy

from .sitekit import roster, send, sim_root


def _site(monkeypatch, tmp_path, rounds: int = 2, admit: bool = True) -> DPTrainExecutor:
    sim_root(monkeypatch, tmp_path, ["site-1", "site-2", "site-3"])
    write_site_policy(tmp_path / "site-1", epsilon_budget=50.0)
    ex = DPTrainExecutor(
        task="breast_cancer",
        task_args={"hidden": 4},
        train_args={"rounds": rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.5},
        dp_args={"enabled": True, "target_epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0},
        encrypt=True,
        num_sites=3,
        job_label="breast_cancer_dp",
    )
    if admit:
        reply = send(ex, "admit", FLModel(params={}, meta={"run_key": "run-1"}))
        assert reply.meta["status"] == "accepted"
        ex._admission_reply = reply.meta
    return ex


def train_meta(ex: DPTrainExecutor, tmp_path) -> dict:
    """A train task's meta as an honest server sends it: the run key and the secure-aggregation roster."""
    if not hasattr(ex, "_test_roster"):  # the other sites' keys are made once per run, as real sites do
        ex._test_roster = roster(ex._admission_reply, "run-1", tmp_path, ["site-1", "site-2", "site-3"])
    return {"run_key": "run-1", **ex._test_roster}


def _crafted(ex: DPTrainExecutor) -> dict:
    """A plaintext 'global model' of the right shapes: what a server crafts to count patients."""
    return {k: np.asarray(v) * 0 + 0.01 for k, v in ex._trainer.get_weights().items()}


def test_a_plaintext_model_in_an_encrypted_job_is_not_evaluated(monkeypatch, tmp_path):
    ex = _site(monkeypatch, tmp_path)
    reply = send(ex, "validate", FLModel(params=_crafted(ex), meta={"run_key": "run-1"}, current_round=2))
    assert reply.meta["status"] == "refused", f"site-1 scored a plaintext model: {reply.metrics}"
    assert not reply.metrics
    assert reply.meta["reason"].startswith("site-1") and "plaintext" in reply.meta["reason"]


def test_validate_is_answered_at_most_once_per_round(monkeypatch, tmp_path):
    ex = _site(monkeypatch, tmp_path)
    first = send(ex, "validate", FLModel(params={}, meta={"run_key": "run-1"}, current_round=2))
    assert first.meta["status"] == "ok" and first.metrics
    answers = [send(ex, "validate", FLModel(params={}, meta={"run_key": "run-1"}, current_round=2)) for _ in range(3)]
    assert [a.meta["status"] for a in answers] == ["refused"] * 3, "repeated validate answered: a free query each"
    beyond = send(ex, "validate", FLModel(params={}, meta={"run_key": "run-1"}, current_round=7))
    assert beyond.meta["status"] == "refused", "a round the job never planned was evaluated"


def test_train_loss_does_not_leave_under_the_default_policy(monkeypatch, tmp_path):
    ex = _site(monkeypatch, tmp_path)
    reply = send(ex, "train", FLModel(params={}, meta=train_meta(ex, tmp_path), current_round=0))
    assert reply.meta["status"] == "ok", reply.meta.get("reason")
    assert "train_loss" not in reply.meta["metrics"], "a training-batch statistic left the site without DP"
    # the round's global model was evaluated by train: validate for the same round is a second query
    again = send(ex, "validate", FLModel(params={}, meta={"run_key": "run-1"}, current_round=0))
    assert again.meta["status"] == "refused"
