"""The pooled ROC's wiring (`clinfed.fl.roc_validation`) on real TenSEAL keys and real secure aggregation:
every site's histogram masked and encrypted, the server's sum, re-runs, reveals and the release site's
decryption, against sklearn's `roc_auc_score` on the pooled scores."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel
from sklearn.metrics import roc_auc_score

from clinfed.analytics.roc import fit_federated
from clinfed.deploy.simkit import ensure_sim_kits
from clinfed.errors import SiteRefusal
from clinfed.fl.roc_validation import RocParty, federated_roc, held_out_scores, write_scores
from clinfed.fl.secagg import ServerRoster, load_site
from clinfed.he.context import context_fingerprint, create_context_pair

SITES = ["site-1", "site-2", "site-3", "site-4"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("kits")
    ensure_sim_kits(root, SITES)
    secret, public = create_context_pair()
    return root, secret, public, context_fingerprint(public)


def scored(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    return 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.6 * y - 0.5))), y


class Federation:
    """The sites' `RocParty`s and an honest server's `ask` (a site's refusal is its reply, as the executor's)."""

    def __init__(self, keys, run: str, data: dict, min_cell: dict | None = None, dead: tuple[str, ...] = ()):
        root, secret, public, fingerprint = keys
        self.public, self.fingerprint, self.dead, self.asked = public, fingerprint, set(dead), []
        self.roster = ServerRoster()
        self.parties: dict[str, RocParty] = {}
        for site in SITES:
            secagg = load_site(root / site, site, run, persist=False)
            self.roster.add(site, secagg.hello())
            party = RocParty(site, secret, fingerprint, secagg, min_cell=(min_cell or {}).get(site, 5))
            party.keep(data.get(site), "breast_cancer")
            self.parties[site] = party

    def ask(self, params: dict, meta: dict, targets: list[str], everyone: bool) -> list[FLModel]:
        self.asked.append((meta["roc_step"], sorted(targets)))
        replies = []
        for site in targets:
            if site in self.dead:
                continue  # died after validating: no answer
            try:
                reply = self.parties[site].handle(meta, params)
            except SiteRefusal as exc:
                reply = FLModel(params={}, meta={"status": "refused", "reason": str(exc)})
            reply.meta["client_name"] = site
            replies.append(reply)
        return replies

    def roc(self, targets: list[str]) -> dict:
        return federated_roc(self.ask, self.roster, self.public, self.fingerprint, 5, targets)


def test_pooled_roc_matches_sklearn_within_its_resolution_and_the_plain_sums(keys):
    data = {s: scored(i) for i, s in enumerate(SITES[:3])}
    roc = Federation(keys, "r-exact", data, min_cell={"site-2": 8}).roc(SITES[:3])
    assert roc["status"] == "ok" and roc["sites"] == SITES[:3] and roc["release_site"] == "site-1"
    scores = np.concatenate([d[0] for d in data.values()])
    labels = np.concatenate([d[1] for d in data.values()])
    reference = roc_auc_score(labels, scores)
    assert abs(roc["auc"] - reference) <= roc["auc_resolution"] + 1e-6
    assert roc["n"] == {"negative": int((labels == 0).sum()), "positive": int(labels.sum())}
    # the largest min_cell of the members' policies is the one released under
    assert roc["min_cell"] == 8
    plain = fit_federated(data, min_cell=8)
    assert roc["auc"] == pytest.approx(plain["auc"], abs=1e-6)
    assert roc["fpr"] == pytest.approx(plain["fpr"], abs=1e-6) and roc["tpr"] == pytest.approx(plain["tpr"], abs=1e-6)
    # no CKKS error leaves the release site: every released float is on the 7-significant-digit grid
    cal = roc["calibration"]
    for v in [roc["auc"], roc["auc_resolution"], *roc["fpr"], *roc["tpr"], *cal["mean_predicted"], *cal["observed"]]:
        assert float(f"{v:.6e}") == v
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    steps = np.diff(np.rint(np.array(roc["fpr"]) * roc["n"]["negative"]))
    assert np.all((steps == 0) | (steps >= 8))  # small cells merged at the members' strictest floor
    assert all(n >= 8 for n in roc["calibration"]["n"])


def test_a_site_that_dies_after_validating_leaves_a_sum_of_the_survivors(keys):
    data = {s: scored(10 + i) for i, s in enumerate(SITES)}
    fed = Federation(keys, "r-dropout", data, dead=("site-4",))
    roc = fed.roc(SITES)
    survivors = SITES[:3]
    assert roc["status"] == "ok" and roc["sites"] == survivors
    assert ("remask", survivors) in fed.asked
    labels = np.concatenate([data[s][1] for s in survivors])
    assert roc["n"]["positive"] == int(labels.sum()) and roc["n"]["negative"] == int((labels == 0).sum())


def test_a_task_without_binary_scores_is_skipped_and_fewer_than_three_sites_are_withheld(keys):
    fed = Federation(keys, "r-skip", {})
    roc = fed.roc(SITES[:3])
    assert roc["status"] == "skipped" and "no per-patient binary score" in roc["reason"]
    data = {s: scored(i) for i, s in enumerate(SITES)}
    roc = Federation(keys, "r-two", data).roc(SITES[:2])
    assert roc["status"] == "withheld" and "< 3" in roc["reason"]


def test_breast_cancer_scores_are_the_held_out_probabilities_and_stay_in_a_site_file(tmp_path):
    import torch

    from clinfed.tasks import build_task

    task = build_task("breast_cancer")
    torch.manual_seed(0)
    model = task.build_model()
    data = task.load_site_data("site-1", 0, 3, None)
    scores, labels = held_out_scores(task, model, data.test)
    assert scores.shape == labels.shape == (len(data.test),)
    assert np.all((scores >= 0) & (scores <= 1)) and set(np.unique(labels)) <= {0, 1}
    with torch.no_grad():  # as SiteTrainer.evaluate calls it
        assert roc_auc_score(labels, scores) == pytest.approx(task.evaluate(model, data.test)["auc"])
    path = write_scores(tmp_path / "reports" / "s.csv", scores, labels)
    back = np.loadtxt(path, delimiter=",", skiprows=1)
    np.testing.assert_allclose(back[:, 0], scores, rtol=1e-8)
    assert held_out_scores(object(), model, data.test) is None  # segmentation: no `scores`


def test_a_recreated_site_keeps_its_histogram_in_a_private_file(keys, tmp_path):
    import stat

    root, secret, _, fingerprint = keys
    secagg = load_site(root / "site-1", "site-1", "r-file", persist=False)
    path = tmp_path / "local" / "secagg" / "run.roc.npy"
    first = RocParty("site-1", secret, fingerprint, secagg, state_file=path)
    first.keep(scored(0), "breast_cancer")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = RocParty("site-1", secret, fingerprint, secagg, state_file=path)  # FLARE made a new executor
    np.testing.assert_array_equal(again.vector, first.vector)
    assert RocParty("site-1", secret, fingerprint, secagg, state_file=tmp_path / "other.npy").vector is None
