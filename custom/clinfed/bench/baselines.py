"""Honest non-private baselines for the `hard` imaging task (issue 25, item 4).

The DP table compared DP-SGD, whose settings (Adam lr 0.03, per-sample clip 0.1) were tuned for it,
against a non-private run with the same optimiser and no tuning at all. That says nothing about what
DP costs. Here the non-private run gets the same care: a small sweep of learning rate, local epochs
and gradient clipping *without noise* (`TrainConfig.clip_norm`), chosen on seed 0 only, and then the
best non-private setting and the DP run (the job's defaults, ε = 8) are each trained on seeds 1-3,
which none of the choices saw. A seed fixes the sites' synthetic data and the initial weights
(`--seed`); DP noise and batch order always come from OS entropy (`clinfed.training`).

Each run is the job's own configuration (`make_recipe(...).executor`: task, data, optimiser, DP
settings) trained by the sites' own `SiteTrainer`, federated by plain FedAvg (weights by training
samples, as the server's) inside one process, and scored as the server's final validation scores
(every site's held-out Dice of the last global model, averaged). FLARE and encryption are left out
for speed: neither changes the model (docs/benchmarks.md: Dice and ε identical with and without
`--no-encrypt`), and `clinfed simulate JOB --difficulty hard --seed S --lr X --clip C --local-epochs N --no-dp`
runs any row of the table through the simulator.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

#: the two imaging jobs, by dimension
JOBS = {"2d": "segmentation_dp", "3d": "segmentation3d_dp"}
#: the sweep (non-private, seed 0): learning rate × batch-gradient clip (None: none) × local epochs
LRS: tuple[float, ...] = (0.01, 0.03, 0.1)
CLIPS: tuple[float | None, ...] = (None, 0.1, 1.0)
EPOCHS: tuple[int, ...] = (1, 2)
SWEEP_SEED = 0
SEEDS: tuple[int, ...] = (1, 2, 3)
EPSILON = 8.0
#: the runs on `SEEDS`: the best non-private setting, DP-SGD, and DP-SGD's clipping without its noise
KINDS = ("nonprivate", "dp", "dp_no_noise")


def sweep_grid(
    lrs: Sequence[float] = LRS, clips: Sequence[float | None] = CLIPS, epochs: Sequence[int] = EPOCHS
) -> list[dict]:
    """Every non-private setting of the sweep, as keyword arguments of `federated_run`."""
    return [
        {"lr": float(lr), "clip": None if clip is None else float(clip), "local_epochs": int(e)}
        for lr, clip, e in itertools.product(lrs, clips, epochs)
    ]


def federated_run(
    job: str,
    seed: int,
    epsilon: float | None,
    lr: float | None = None,
    clip: float | None = None,
    local_epochs: int = 1,
    sites: int = 3,
    rounds: int | None = None,
    n_train: int | None = None,
    noise: bool = True,
) -> dict:
    """One `--difficulty hard` run of `job`: `rounds` of FedAvg over `sites` sites; the final Dice.

    `epsilon` None trains without DP (`clip`: the batch gradient's norm); otherwise DP-SGD at that
    target ε (`clip`: the per-sample norm; None: the job's). `lr` None: the job's. `noise=False`
    (with an ε): DP-SGD's per-sample clipping with the noise switched off in Opacus' optimizer, the
    DP run minus its noise, which tells what the clipping does from what the noise costs (no ε).
    """
    from clinfed.jobs import load_job
    from clinfed.tasks import build_task
    from clinfed.training import DPConfig, SiteTrainer, TrainConfig

    module = load_job(job)
    rounds = rounds or module.DEFAULTS["rounds"]
    options = {"seed": seed, "local_epochs": local_epochs, "difficulty": "hard", "clip_norm": clip}
    options |= {k: v for k, v in (("lr", lr), ("n_train", n_train)) if v is not None}
    recipe = module.make_recipe(sites=sites, rounds=rounds, encrypt=False, epsilon=epsilon, **options)
    executor = recipe.executor
    task = build_task(executor.task, **executor.task_args)
    train, dp = TrainConfig(**executor.train_args), DPConfig(**executor.dp_args)
    started = time.perf_counter()
    trainers = [
        SiteTrainer(task, task.load_site_data(f"site-{i + 1}", i, sites, None), train, dp) for i in range(sites)
    ]
    if not noise:
        for trainer in trainers:
            trainer.optimizer.noise_multiplier = 0.0  # Opacus adds N(0, (σ·C)²): σ = 0, clipping only
    weights = trainers[0].get_weights()  # every site built the same seeded initialisation
    for _ in range(rounds):
        updates, counts = [], []
        for trainer in trainers:
            trainer.set_weights(weights)
            trainer.train_round()
            updates.append(trainer.get_weights())
            counts.append(len(trainer.data.train))
        total = sum(counts)
        weights = {k: sum(u[k] * (n / total) for u, n in zip(updates, counts, strict=True)) for k in weights}
    site_dice = []
    for trainer in trainers:
        trainer.set_weights(weights)
        site_dice.append(float(trainer.evaluate()["dice"]))
    row = {
        "seed": seed,
        "lr": train.lr,
        "clip": dp.max_grad_norm if dp.enabled else train.clip_norm,
        "local_epochs": train.local_epochs,
        "dice": statistics.fmean(site_dice),
        "site_dice": site_dice,
        "seconds": time.perf_counter() - started,
    }
    if dp.enabled and noise:
        row["epsilon"] = max(t.engine.accountant.get_epsilon(delta=dp.delta) for t in trainers)
    elif dp.enabled:
        row["noise"] = False
    return row


def hard_n_train(job: str) -> int:
    """Training samples per site of `job` at `--difficulty hard` (the job's default, as the bench ran it)."""
    from clinfed.jobs import load_job

    recipe = load_job(job).make_recipe(sites=3, rounds=1, encrypt=False, epsilon=None, difficulty="hard")
    return int(recipe.executor.task_args["n_train"])


def _earlier_row(earlier: dict, kind: str, seed: int, setting: dict) -> dict | None:
    """The row of an earlier result with this kind, seed and setting, if it has one."""
    for row in earlier.get(kind, []):
        if row["seed"] == seed and all(row[k] == v for k, v in setting.items()):
            return row
    return None


def _best(sweep: list[dict]) -> dict:
    best = max(sweep, key=lambda r: r["dice"])
    return {k: best[k] for k in ("lr", "clip", "local_epochs")}


def run_baselines(
    dims: Sequence[str] = tuple(JOBS),
    grid: list[dict] | None = None,
    seeds: Sequence[int] = SEEDS,
    epsilon: float = EPSILON,
    sites: int = 3,
    rounds: int | None = None,
    n_train: int | None = None,
    json_path: Path | None = None,
    progress: Callable[[str], None] = print,
    kinds: Sequence[str] = KINDS,
    resume: dict | None = None,
) -> dict:
    """The sweep on `SWEEP_SEED`, then on `seeds` the best non-private setting, DP at `epsilon`, and
    the DP run without its noise (`kinds` picks among the three; no "nonprivate": no sweep either).

    With `json_path` the result so far is written after every run, so an interrupted bench keeps
    what it measured. Returns ``{"setup": {...}, "dims": {DIM: {"sweep": [...], "best": {...},
    "nonprivate": [...], "dp": [...], "dp_no_noise": [...]}}}`` (rows of `federated_run`);
    `merge_results` joins benches run apart (e.g. one process per dimension). `resume`: an earlier
    (interrupted) result of the same bench; a run it already holds, same dimension, kind, seed and
    setting, is kept instead of run again.
    """
    import torch

    torch.set_num_threads(1)  # as a simulated site runs; the machine is shared
    grid = grid if grid is not None else sweep_grid()
    result: dict = {
        "setup": {
            "difficulty": "hard",
            "sites": sites,
            "epsilon": epsilon,
            "sweep_seed": SWEEP_SEED,
            "seeds": list(seeds),
            "grid": grid,
            "federation": "in-process FedAvg of the sites' SiteTrainer, plaintext (no FLARE, no encryption)",
            "cpu_cores": os.cpu_count(),
            "torch_threads": 1,
        },
        "dims": {},
    }

    def save() -> None:
        result["setup"]["load_average"] = os.getloadavg()[0]
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=2))

    for dim in dims:
        job = JOBS[dim]
        from clinfed.jobs import load_job

        module = load_job(job)
        entry: dict = {
            "job": job,
            "rounds": rounds or module.DEFAULTS["rounds"],
            "n_train": n_train,  # None: the job's `hard` default
            "sweep": [],
            "nonprivate": [],
            "dp": [],
            "dp_no_noise": [],
        }
        result["dims"][dim] = entry
        common = {"sites": sites, "rounds": rounds, "n_train": n_train}
        earlier = (resume or {}).get("dims", {}).get(dim, {})
        if earlier and (earlier.get("rounds"), earlier.get("n_train")) != (entry["rounds"], n_train):
            earlier = {}  # another size of run: nothing to keep

        def run(kind: str, seed: int, eps: float | None, setting: dict, noise: bool = True, done=earlier) -> dict:
            kept = _earlier_row(done, kind, seed, setting)
            return kept or federated_run(job, seed, eps, **setting, **common, noise=noise)  # noqa: B023

        for setting in grid if "nonprivate" in kinds else []:
            row = run("sweep", SWEEP_SEED, None, setting)
            entry["sweep"].append(row)
            progress(f"{dim} sweep lr {row['lr']} clip {row['clip']} epochs {row['local_epochs']}: {row['dice']:.3f}")
            save()
        if entry["sweep"]:
            entry["best"] = _best(entry["sweep"])
        for seed in seeds:
            if "nonprivate" in kinds:
                row = run("nonprivate", seed, None, entry["best"])
                entry["nonprivate"].append(row)
                progress(f"{dim} seed {seed} no DP (best): {row['dice']:.3f}")
                save()
            if "dp" in kinds:
                row = run("dp", seed, epsilon, {})
                entry["dp"].append(row)
                progress(f"{dim} seed {seed} DP ε={epsilon:g}: {row['dice']:.3f} (ε {row['epsilon']:.2f})")
                save()
            if "dp_no_noise" in kinds:
                row = run("dp_no_noise", seed, epsilon, {}, noise=False)
                entry["dp_no_noise"].append(row)
                progress(f"{dim} seed {seed} DP clipping, no noise: {row['dice']:.3f}")
                save()
    save()
    return result


def merge_results(*results: dict) -> dict:
    """One result from benches run apart (one process per dimension, or the no-noise rows added later):
    per dimension, every non-empty part of each; the setup of the first, with the highest load seen."""
    merged: dict = {"setup": dict(results[0]["setup"]), "dims": {}}
    merged["setup"]["load_average"] = max(r["setup"].get("load_average", 0.0) for r in results)
    for result in results:
        for dim, entry in result["dims"].items():
            target = merged["dims"].setdefault(dim, {})
            target.update({k: v for k, v in entry.items() if v not in ([], None) or k not in target})
    return merged


def spread(rows: list[dict]) -> tuple[float, float]:
    """Mean and sample standard deviation of the rows' Dice (sd 0 for one row)."""
    dice = [r["dice"] for r in rows]
    return statistics.fmean(dice), statistics.stdev(dice) if len(dice) > 1 else 0.0


def _clip(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def markdown_table(result: dict) -> str:
    """DP against the best non-private run per dimension, each seed and mean ± sd; then the sweep."""
    setup = result["setup"]
    seeds = setup["seeds"]
    eps = setup["epsilon"]
    lines = [
        "| task | run | lr | clip | local epochs | " + " | ".join(f"Dice seed {s}" for s in seeds) + " | mean ± sd |",
        "|---|---|---:|---:|---:|" + "---:|" * len(seeds) + "---:|",
    ]
    notes = []
    for dim, entry in result["dims"].items():
        label = f"{dim.upper()} hard, {entry['rounds']} rounds"
        for name, rows in (
            (f"no DP, best of sweep (seed {setup['sweep_seed']})", entry["nonprivate"]),
            (f"DP-SGD ε = {eps:g}", entry["dp"]),
            ("DP-SGD's per-sample clipping, no noise", entry.get("dp_no_noise", [])),
        ):
            if not rows:
                continue
            first = rows[0]
            by_seed = {r["seed"]: f"{r['dice']:.3f}" for r in rows}
            mean, sd = spread(rows)
            summary = f"{mean:.3f} ± {sd:.3f}" if len(rows) > 1 else f"{mean:.3f} (one seed)"
            lines.append(
                f"| {label} | {name} | {first['lr']:g} | {_clip(first['clip'])} | {first['local_epochs']} | "
                + " | ".join(by_seed.get(s, "-") for s in seeds)
                + f" | {summary} |"
            )
        if entry["nonprivate"] and entry["dp"]:
            (np_mean, _), (dp_mean, _) = spread(entry["nonprivate"]), spread(entry["dp"])
            note = f"{dim.upper()}: DP − best no DP = {dp_mean - np_mean:+.3f} Dice"
            if entry.get("dp_no_noise"):
                clip_mean, _ = spread(entry["dp_no_noise"])
                note += f", DP − its clipping without noise = {dp_mean - clip_mean:+.3f}"
            notes.append(note)
    lines += ["", "Sweep (no DP, seed 0; best in bold):", ""]
    lines += ["| task | lr | clip | local epochs | Dice |", "|---|---:|---:|---:|---:|"]
    for dim, entry in result["dims"].items():
        best = entry.get("best") or (_best(entry["sweep"]) if entry["sweep"] else None)
        for row in entry["sweep"]:
            chosen = best is not None and all(row[k] == best[k] for k in ("lr", "clip", "local_epochs"))
            dice = f"**{row['dice']:.3f}**" if chosen else f"{row['dice']:.3f}"
            lines.append(f"| {dim.upper()} | {row['lr']:g} | {_clip(row['clip'])} | {row['local_epochs']} | {dice} |")
    if notes:
        lines += ["", "; ".join(notes) + " (means over the seeds above)."]
    return "\n".join(lines)


def format_table(result: dict) -> str:
    return markdown_table(result)
