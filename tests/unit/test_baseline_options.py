"""Tuned non-private baselines (issue 25, item 4): `--seed/--lr/--clip` reach the sites' settings,
clipping without noise clips, a seed fixes the data and the initial weights (and another seed changes
them), and `clinfed bench baselines` builds its sweep and its generated table from its JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinfed.bench.baselines import markdown_table, merge_results, run_baselines, spread, sweep_grid
from clinfed.bench.tables import render
from clinfed.cli import UsageError, _analytics_options, _check_applies, build_parser
from clinfed.jobs import load_job
from clinfed.tasks import build_task
from clinfed.tasks.breast_cancer import BreastCancerTask
from clinfed.training import DPConfig, SiteTrainer, TrainConfig


def _recipe(argv: list[str]):
    """What `clinfed simulate ARGV` hands the job's make_recipe (without running anything)."""
    args = build_parser().parse_args(["simulate", *argv])
    _check_applies("simulate", args)
    module = load_job(args.job)
    epsilon = None if args.no_dp else module.DEFAULTS["epsilon"]
    return module.make_recipe(sites=3, rounds=2, encrypt=False, epsilon=epsilon, **_analytics_options(args))


@pytest.mark.parametrize("job", ["segmentation_dp", "segmentation3d_dp"])
def test_options_reach_the_sites_train_config(job):
    plain = _recipe([job, "--no-dp", "--seed", "7", "--lr", "0.01", "--clip", "0.5", "--local-epochs", "2"]).executor
    train = TrainConfig(**plain.train_args)
    assert (train.seed, train.lr, train.clip_norm, train.local_epochs) == (7, 0.01, 0.5, 2)
    assert plain.task_args["seed"] == 7 and plain.dp_args["enabled"] is False
    private = _recipe([job, "--seed", "7", "--clip", "0.5"]).executor
    # under DP-SGD --clip is the per-sample clip; the batch clip stays off (DP clips per sample already)
    assert private.dp_args["enabled"] and DPConfig(**private.dp_args).max_grad_norm == 0.5
    assert TrainConfig(**private.train_args).clip_norm is None
    default = _recipe([job]).executor
    assert default.dp_args["max_grad_norm"] == 0.1 and default.train_args["lr"] == 0.03
    assert default.train_args["seed"] == 0 and default.train_args["clip_norm"] is None
    assert default.train_args["local_epochs"] == 1


def test_options_survive_the_exported_job(tmp_path):
    """FLARE serialises the executor from its attributes: the seed and the clip must reach the sites'
    config, and the summary must record them."""
    _recipe(["segmentation_dp", "--no-dp", "--seed", "4", "--lr", "0.01", "--clip", "0.2"]).export(str(tmp_path))
    config = tmp_path / "segmentation_dp" / "app" / "config"
    site = json.loads((config / "config_fed_client.json").read_text())["executors"][0]["executor"]["args"]
    assert site["train_args"]["clip_norm"] == 0.2 and site["train_args"]["seed"] == 4 and site["task_args"]["seed"] == 4
    server = json.loads((config / "config_fed_server.json").read_text())["workflows"][0]["args"]["extra_summary"]
    assert (server["seed"], server["lr"], server["clip"], server["local_epochs"]) == (4, 0.01, 0.2, 1)


@pytest.mark.parametrize("flag", [["--seed", "0"], ["--lr", "0.1"], ["--clip", "1"], ["--local-epochs", "2"]])
def test_options_a_job_does_not_take_are_refused(flag):
    """breast_cancer_dp takes none of them: refused in one line, even `--seed 0` (0 == False)."""
    args = build_parser().parse_args(["simulate", "breast_cancer_dp", *flag])
    with pytest.raises(UsageError, match=f"{flag[0]} does not apply to breast_cancer_dp"):
        _check_applies("simulate", args)


def _trained_distance(clip_norm: float | None) -> tuple[float, int]:
    task = BreastCancerTask()
    data = task.load_site_data("site-1", 0, 3, None)
    train = TrainConfig(rounds=1, batch_size=32, lr=1.0, optimizer="sgd", clip_norm=clip_norm)
    trainer = SiteTrainer(task, data, train, DPConfig(enabled=False))
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    steps = trainer.train_round()["steps"]
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return float((after - before).norm()), steps


def test_clipping_without_noise_clips():
    """Plain SGD at lr 1: each step moves the weights by at most the clip norm, so an epoch by at most
    steps × clip; unclipped, the same epoch moves them far more."""
    clip = 1e-3
    moved, steps = _trained_distance(clip)
    assert 0 < moved <= steps * clip * (1 + 1e-4)
    unclipped, _ = _trained_distance(None)
    assert unclipped > 10 * steps * clip
    with pytest.raises(ValueError, match="clip_norm must be a positive number"):
        SiteTrainer(
            BreastCancerTask(),
            BreastCancerTask().load_site_data("site-1", 0, 3, None),
            TrainConfig(clip_norm=0.0),
            DPConfig(enabled=False),
        )


def _site_start(seed: int) -> tuple[np.ndarray, dict]:
    recipe = load_job("segmentation_dp").make_recipe(
        sites=3, rounds=1, encrypt=False, epsilon=None, difficulty="hard", n_train=3, n_test=1, seed=seed
    )
    task = build_task(recipe.executor.task, **recipe.executor.task_args)
    data = task.load_site_data("site-2", 1, 3, None)
    trainer = SiteTrainer(task, data, TrainConfig(**recipe.executor.train_args), DPConfig(enabled=False))
    return data.train.images.numpy(), trainer.get_weights()


def test_seed_fixes_the_data_and_the_initial_weights():
    images, weights = _site_start(1)
    again_images, again_weights = _site_start(1)
    other_images, other_weights = _site_start(2)
    assert np.array_equal(images, again_images)
    assert all(np.array_equal(weights[k], again_weights[k]) for k in weights)
    assert not np.array_equal(images, other_images)
    assert any(not np.array_equal(weights[k], other_weights[k]) for k in weights)


def test_sweep_grid_is_the_product_of_its_axes():
    grid = sweep_grid(lrs=(0.01, 0.03), clips=(None, 0.1), epochs=(1, 2))
    assert len(grid) == 8 and len({json.dumps(g, sort_keys=True) for g in grid}) == 8
    assert {"lr": 0.03, "clip": None, "local_epochs": 2} in grid
    assert build_parser().parse_args(["bench", "baselines", "--clips", "none,0.1"]).clips == [None, 0.1]
    with pytest.raises(UsageError, match="--dims: expected some of 2d,3d, got '4d'"):
        build_parser().parse_args(["bench", "baselines", "--dims", "4d"])


def _row(seed: int, dice: float, lr: float = 0.01, clip: float | None = None, epochs: int = 1, **extra) -> dict:
    return {"seed": seed, "dice": dice, "lr": lr, "clip": clip, "local_epochs": epochs, **extra}


FAKE = {
    "setup": {
        "sites": 3,
        "epsilon": 8.0,
        "sweep_seed": 0,
        "seeds": [1, 2, 3],
        "cpu_cores": 2,
        "load_average": 3.0,
        "federation": "in-process FedAvg",
    },
    "dims": {
        "2d": {
            "job": "segmentation_dp",
            "rounds": 5,
            "n_train": 16,
            "sweep": [_row(0, 0.40), _row(0, 0.55, lr=0.003, clip=0.1, epochs=2), _row(0, 0.50, lr=0.03)],
            "best": {"lr": 0.003, "clip": 0.1, "local_epochs": 2},
            "nonprivate": [_row(s, d, lr=0.003, clip=0.1, epochs=2) for s, d in ((1, 0.5), (2, 0.6), (3, 0.7))],
            "dp": [_row(s, d, lr=0.03, clip=0.1, epsilon=8.0) for s, d in ((1, 0.8), (2, 0.8), (3, 0.8))],
        }
    },
}


def test_table_reports_each_seed_and_the_spread():
    assert spread(FAKE["dims"]["2d"]["nonprivate"]) == pytest.approx((0.6, 0.1))
    table = markdown_table(FAKE)
    label = "| 2D hard, 5 rounds |"
    assert f"{label} no DP, best of sweep (seed 0) | 0.003 | 0.1 | 2 | 0.500 | 0.600 | 0.700 | 0.600 ± 0.100 |" in table
    assert f"{label} DP-SGD ε = 8 | 0.03 | 0.1 | 1 | 0.800 | 0.800 | 0.800 | 0.800 ± 0.000 |" in table
    assert "| 2D | 0.003 | 0.1 | 2 | **0.550** |" in table and "| 2D | 0.01 | none | 1 | 0.400 |" in table
    assert "2D: DP − best no DP = +0.200 Dice" in table


def test_generated_block_renders_from_the_json(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(FAKE))
    doc = "<!-- generated: baselines (b.json) -->\nstale\n<!-- end generated: baselines -->"
    out = render(doc, tmp_path)
    assert "stale" not in out and "0.600 ± 0.100" in out and "16 training samples per site" in out


def test_bench_runs_the_job_settings_end_to_end(tmp_path):
    """One tiny run of each kind through the real SiteTrainer: the JSON holds every row as it goes."""
    path = tmp_path / "baselines.json"
    grid = sweep_grid(lrs=(0.01,), clips=(0.1,), epochs=(1,))
    result = run_baselines(
        dims=("3d",), grid=grid, seeds=(1,), rounds=1, n_train=4, json_path=path, progress=lambda _: None
    )
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    entry = saved["dims"]["3d"]
    assert entry["best"] == {"lr": 0.01, "clip": 0.1, "local_epochs": 1}
    assert entry["nonprivate"][0]["clip"] == 0.1 and "epsilon" not in entry["nonprivate"][0]
    dp = entry["dp"][0]
    assert dp["lr"] == 0.03 and dp["clip"] == 0.1 and 0 < dp["epsilon"] <= 8.0 + 1e-6
    quiet = entry["dp_no_noise"][0]  # the DP run minus its noise: clipped per sample, no ε to report
    assert quiet["noise"] is False and "epsilon" not in quiet and quiet["clip"] == 0.1
    assert all(0.0 <= r["dice"] <= 1.0 for r in (*entry["sweep"], *entry["nonprivate"], dp, quiet))


def test_benches_run_apart_merge_per_dimension():
    other = {
        "setup": {**FAKE["setup"], "load_average": 9.0},
        "dims": {
            "2d": {
                "job": "segmentation_dp",
                "rounds": 5,
                "n_train": 16,
                "sweep": [],
                "nonprivate": [],
                "dp": [],
                "dp_no_noise": [_row(1, 0.9, clip=0.1)],
            },
            "3d": {
                "job": "segmentation3d_dp",
                "rounds": 3,
                "n_train": 16,
                "sweep": [],
                "nonprivate": [],
                "dp": [],
                "dp_no_noise": [_row(1, 0.4)],
            },
        },
    }
    merged = merge_results(FAKE, other)
    two = merged["dims"]["2d"]
    assert two["sweep"] == FAKE["dims"]["2d"]["sweep"] and two["dp"] == FAKE["dims"]["2d"]["dp"]
    assert two["dp_no_noise"] == other["dims"]["2d"]["dp_no_noise"] and two["best"]["lr"] == 0.003
    assert merged["dims"]["3d"]["dp_no_noise"][0]["dice"] == 0.4 and merged["setup"]["load_average"] == 9.0
    assert "DP − its clipping without noise = -0.100" in markdown_table(merged)


def test_resume_keeps_the_runs_an_interrupted_bench_wrote(monkeypatch):
    """Every run the earlier result holds (same kind, seed and setting) is kept; only the rest run."""
    import clinfed.bench.baselines as baselines

    ran = []

    def fake_run(job, seed, epsilon, lr=None, clip=None, local_epochs=1, noise=True, **_):
        ran.append((seed, epsilon, lr))
        return _row(seed, 0.1, lr=lr or 0.03, clip=clip, epochs=local_epochs)

    monkeypatch.setattr(baselines, "federated_run", fake_run)
    earlier = json.loads(json.dumps(FAKE))
    grid = [{"lr": r["lr"], "clip": r["clip"], "local_epochs": r["local_epochs"]} for r in FAKE["dims"]["2d"]["sweep"]]
    grid.append({"lr": 0.1, "clip": None, "local_epochs": 1})
    result = run_baselines(
        dims=("2d",),
        grid=grid,
        kinds=("nonprivate", "dp"),
        n_train=16,
        rounds=5,
        resume=earlier,
        progress=lambda _: None,
    )
    assert ran == [(0, None, 0.1)]  # the one new setting; the seeds' runs were all kept
    assert result["dims"]["2d"]["sweep"][:3] == FAKE["dims"]["2d"]["sweep"]
    assert result["dims"]["2d"]["nonprivate"] == FAKE["dims"]["2d"]["nonprivate"]
