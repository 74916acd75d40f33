"""What DP-SGD costs a site: one local epoch, non-private vs Opacus' two per-sample engines, per model.

Three models, each with its job's defaults (model, data, batch, optimizer, clip norm):
- ``tabular``: the breast-cancer MLP (30 → 16 → 1, SGD), all of one site's rows;
- ``unet2d``: the segmentation job's MONAI UNet (8, 16, 32), 512 synthetic 128 × 128 images, batch 32, Adam;
- ``unet3d``: the 3-D job's UNet (8, 16, 32), 256 synthetic 32³ volumes, batch 16, Adam.

Three modes, all running the very code a site runs (`clinfed.training.SiteTrainer`):
- ``nonprivate``: plain PyTorch, the floor;
- ``hooks``: Opacus' default, per-sample gradients materialised, clipped, summed, noised;
- ``ghost``: Opacus' fast gradient clipping (`grad_sample_mode="ghost"`): per-sample gradient *norms*,
  then a second backward pass of the loss reweighted by each sample's clipping factor.
Both DP modes use the per-sample gradient samplers of `clinfed.per_sample_grads`, the accountant and
the noise of a real job (target ε, δ = 1e-5, Poisson sampling).

Measured, per model and mode, in a fresh process of its own (so none inherits another's allocator
state, warmed-up kernels or high-water mark), with one torch thread (as a simulated site runs):
- ``seconds``: median wall time of ``repeats`` epochs after the first (the first pays one-time
  costs, reported apart as ``first_epoch_seconds``); ``cpu_seconds``: the same epochs' median process
  CPU time, which a busy shared machine disturbs far less than wall time;
- ``peak_rss_mb``: peak resident memory (RSS, from the kernel's VmHWM) during the first epoch, minus the
  RSS just before it, i.e. the working memory an epoch adds on top of the model and the data. The
  kernel's high-water mark is reset through /proc/self/clear_refs just before the epoch; where that
  is not allowed, RSS is sampled every 2 ms instead. tracemalloc would miss it entirely: PyTorch
  allocates tensors outside Python's allocator. ``process_peak_rss_mb`` is the whole process's VmHWM.

`ratios.<model>.<mode>` divides by the non-private row: ``seconds``, ``cpu_seconds``, ``peak_rss_mb``.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import re
import statistics
import threading
import time
from pathlib import Path

MODELS = ("tabular", "unet2d", "unet3d")
MODES = ("nonprivate", "hooks", "ghost")
STATUS = Path("/proc/self/status")
#: targets of issue 25: DP-SGD at ≤ 1.2× the time and ≤ 1.5× the memory of non-private training
TARGET_TIME, TARGET_MEMORY = 1.2, 1.5


def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


class PeakRSS:
    """Peak RSS above the starting RSS, in MB, across a `with` block."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self._sampler: threading.Thread | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        except OSError:
            self._stop = threading.Event()
            self._peak_kb = _status_kb("VmRSS")
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self.start_kb = _status_kb("VmRSS")
        self.method = "VmHWM" if self._sampler is None else "VmRSS sampled every 2 ms"
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak_kb = max(self._peak_kb, _status_kb("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            peak = _status_kb("VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak_kb
        self.peak_mb = max(0, peak - self.start_kb) / 1024


def _site(model: str, settings: dict):
    """(task, train config, clip norm) of `model` with its job's defaults."""
    from clinfed.training import TrainConfig

    epochs = 1 + settings["repeats"]
    if model == "tabular":
        from clinfed.tasks.breast_cancer import BreastCancerTask

        train = TrainConfig(rounds=epochs, batch_size=32, lr=0.5, optimizer="sgd", seed=settings["seed"])
        return BreastCancerTask(hidden=16), train, 1.0
    if model == "unet2d":
        from clinfed.tasks.segmentation import SegmentationTask

        task = SegmentationTask(image_size=128, n_train=settings["n_train_2d"], n_test=8)
        train = TrainConfig(rounds=epochs, batch_size=32, lr=0.03, optimizer="adam", seed=settings["seed"])
        return task, train, 0.1
    from clinfed.tasks.segmentation import Segmentation3DTask

    task = Segmentation3DTask(image_size=32, n_train=settings["n_train_3d"], n_test=4)
    train = TrainConfig(rounds=epochs, batch_size=16, lr=0.03, optimizer="adam", seed=settings["seed"])
    return task, train, 0.1


def _measure(model: str, mode: str, settings: dict, queue: mp.Queue) -> None:
    """One model in one mode, in its own process: build the site, time epochs, report through `queue`."""
    try:
        import torch

        from clinfed.training import DPConfig, SiteTrainer

        torch.set_num_threads(1)
        task, train, clip = _site(model, settings)
        data = task.load_site_data("site-1", 0, 1, None)
        privacy = DPConfig(
            enabled=mode != "nonprivate",
            target_epsilon=settings["epsilon"],
            delta=1e-5,
            max_grad_norm=clip,
            grad_sample_mode="hooks" if mode == "nonprivate" else mode,
        )
        trainer = SiteTrainer(task, data, train, privacy)
        with PeakRSS() as mem:
            start = time.perf_counter()
            trainer.train_round()
            first = time.perf_counter() - start
        walls, cpus = [], []
        for _ in range(settings["repeats"]):
            start, cpu = time.perf_counter(), time.process_time()
            trainer.train_round()
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        result = {
            "seconds": statistics.median(walls),
            "cpu_seconds": statistics.median(cpus),
            "peak_rss_mb": mem.peak_mb,
            "process_peak_rss_mb": _status_kb("VmHWM") / 1024,
            "first_epoch_seconds": first,
            "seconds_all": walls,
            "samples_per_epoch": len(data.train),
            "memory_method": mem.method,
            "torch_threads": torch.get_num_threads(),
        }
        if trainer.engine is not None:
            result.update(
                epsilon=trainer.engine.accountant.get_epsilon(delta=1e-5),
                noise_multiplier=trainer.noise_multiplier,
                max_grad_norm=clip,
            )
        queue.put(result)
    except Exception as exc:  # the parent reports it; a traceback in a child process is easy to lose
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def run_dp_bench(
    models: tuple[str, ...] = MODELS,
    modes: tuple[str, ...] = MODES,
    seed: int = 0,
    repeats: int = 3,
    epsilon: float = 8.0,
    n_train_2d: int = 512,
    n_train_3d: int = 256,
) -> dict:
    """Every model in every mode, each in a fresh process; non-private first, so the ratios have a floor.

    Returns ``{"models": {MODEL: {MODE: {...}}}, "ratios": {MODEL: {MODE: {...}}}, "setup": {...}}``.
    """
    settings = {
        "seed": seed,
        "repeats": repeats,
        "epsilon": epsilon,
        "n_train_2d": n_train_2d,
        "n_train_3d": n_train_3d,
    }
    ctx = mp.get_context("spawn")
    rows: dict = {}
    ratios: dict = {}
    for model in models:
        rows[model] = {}
        for mode in modes:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(model, mode, settings, queue))
            proc.start()
            outcome = queue.get()
            proc.join()
            if "error" in outcome:
                raise RuntimeError(f"dp bench, {model} {mode}: {outcome['error']}")
            rows[model][mode] = outcome
        base = rows[model].get("nonprivate")
        if base:
            ratios[model] = {
                mode: {key: _ratio(row[key], base[key]) for key in ("seconds", "cpu_seconds", "peak_rss_mb")}
                for mode, row in rows[model].items()
                if mode != "nonprivate"
            }
    return {
        "models": rows,
        "ratios": ratios,
        "targets": {"seconds": TARGET_TIME, "peak_rss_mb": TARGET_MEMORY},
        "setup": {
            **settings,
            "cpu_cores": os.cpu_count(),
            "load_average_after": os.getloadavg()[0],
            "unet": "MONAI UNet (8, 16, 32), instance norm, one residual unit",
        },
    }


def markdown_table(result: dict) -> str:
    """The bench as a Markdown table (docs/benchmarks.md is generated from the JSON with it)."""
    lines = [
        "| model | mode | s/epoch | CPU s/epoch | × time (CPU) | peak RSS growth MB | × memory | ε |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, modes in result["models"].items():
        for mode, row in modes.items():
            ratio = result.get("ratios", {}).get(model, {}).get(mode)
            times = f"{ratio['seconds']:.2f} ({ratio['cpu_seconds']:.2f})" if ratio else "1"
            memory = f"{ratio['peak_rss_mb']:.2f}" if ratio else "1"
            eps = f"{row['epsilon']:.2f}" if "epsilon" in row else "-"
            lines.append(
                f"| {model} | {mode} | {row['seconds']:.3f} | {row['cpu_seconds']:.3f} | {times} | "
                f"{row['peak_rss_mb']:.1f} | {memory} | {eps} |"
            )
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """The bench as a small text table a person can paste into an issue."""
    setup = result.get("setup", {})
    lines = [
        f"one local epoch per model, one torch thread, median of {setup.get('repeats', '?')} epochs after the first; "
        f"targets: ≤ {TARGET_TIME}× time, ≤ {TARGET_MEMORY}× memory",
        markdown_table(result),
    ]
    return "\n".join(lines)
