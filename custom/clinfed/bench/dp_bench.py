"""What DP-SGD costs a site: one local epoch of the segmentation job, non-private vs Opacus, side by side.

Both contenders run the very code a site runs (`clinfed.training.SiteTrainer` on
`clinfed.tasks.segmentation`), with the job's defaults: the same UNet, the same 512 synthetic
128 × 128 images, batch 32, Adam. The DP contender adds exactly what `make_private` adds: per-sample
gradients (Opacus "hooks" mode, functorch for PReLU and transposed convolutions), per-sample
clipping to norm 0.1, Gaussian noise, and Poisson sampling.

Measured, per contender, in a fresh process of its own (so neither inherits the other's allocator
state or warmed-up kernels):
- ``epoch_seconds``: median wall time of ``repeats`` epochs after the first (the first pays one-time
  costs, reported apart as ``first_epoch_seconds``).
- ``peak_mb``: peak resident memory (RSS, from the kernel's VmHWM) during the first epoch, minus the
  RSS just before it, i.e. the working memory an epoch adds on top of the model and the data. The
  kernel's high-water mark is reset through /proc/self/clear_refs just before the epoch; where that
  is not allowed, RSS is sampled every 2 ms instead. tracemalloc would miss it entirely: PyTorch
  allocates tensors outside Python's allocator.
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

CONTENDERS = ("non_private", "dp")
STATUS = Path("/proc/self/status")


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


def _measure(dp: bool, settings: dict, queue: mp.Queue) -> None:
    """One contender, in its own process: build the site, time epochs, report through `queue`."""
    try:
        import torch

        from clinfed.tasks.segmentation import SegmentationTask
        from clinfed.training import DPConfig, SiteTrainer, TrainConfig

        task = SegmentationTask(image_size=settings["image_size"], n_train=settings["n_train"], n_test=8)
        data = task.load_site_data("site-1", 0, 1, None)
        epochs = 1 + settings["repeats"]
        train = TrainConfig(
            rounds=epochs, local_epochs=1, batch_size=32, lr=0.03, optimizer="adam", seed=settings["seed"]
        )
        privacy = DPConfig(
            enabled=dp,
            target_epsilon=settings["epsilon"],
            delta=1e-5,
            max_grad_norm=settings["max_grad_norm"],
            grad_sample_mode=settings["grad_sample_mode"],
        )
        trainer = SiteTrainer(task, data, train, privacy)
        with PeakRSS() as mem:
            start = time.perf_counter()
            trainer.train_round()
            first = time.perf_counter() - start
        times = []
        for _ in range(settings["repeats"]):
            start = time.perf_counter()
            trainer.train_round()
            times.append(time.perf_counter() - start)
        result = {
            "epoch_seconds": statistics.median(times),
            "peak_mb": mem.peak_mb,
            "first_epoch_seconds": first,
            "epoch_seconds_all": times,
            "memory_method": mem.method,
            "torch_threads": torch.get_num_threads(),
        }
        if dp:
            result.update(
                epsilon=trainer.engine.accountant.get_epsilon(delta=1e-5),
                noise_multiplier=trainer.noise_multiplier,
                max_grad_norm=settings["max_grad_norm"],
                grad_sample_mode=settings["grad_sample_mode"],
            )
        queue.put(result)
    except Exception as exc:  # the parent reports it; a traceback in a child process is easy to lose
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_dp_bench(
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 512,
    repeats: int = 3,
    epsilon: float = 8.0,
    max_grad_norm: float = 0.1,
    grad_sample_mode: str = "hooks",
) -> dict:
    """Non-private vs DP-SGD epoch time and memory on the segmentation job's model and data.

    Returns ``{"non_private": {...}, "dp": {..., "epsilon"}, "ratio": dp/non-private epoch time,
    "memory_ratio": ..., "setup": {...}}``. ε is what the DP contender's accountant reports after all
    its epochs (the noise is calibrated so that this equals `epsilon`).
    """
    settings = {
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "repeats": repeats,
        "epsilon": epsilon,
        "max_grad_norm": max_grad_norm,
        "grad_sample_mode": grad_sample_mode,
    }
    ctx = mp.get_context("spawn")
    result: dict = {}
    for name in CONTENDERS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(name == "dp", settings, queue))
        proc.start()
        outcome = queue.get()
        proc.join()
        if "error" in outcome:
            raise RuntimeError(f"dp bench, {name}: {outcome['error']}")
        result[name] = outcome
    plain, dp = result["non_private"], result["dp"]
    result["ratio"] = dp["epoch_seconds"] / plain["epoch_seconds"]
    result["memory_ratio"] = dp["peak_mb"] / plain["peak_mb"] if plain["peak_mb"] > 0 else float("nan")
    result["setup"] = {
        **settings,
        "images": n_train,
        "batch_size": 32,
        "model": "MONAI UNet (8, 16, 32), instance norm",
        "cpu_cores": os.cpu_count(),
        "load_average_after": os.getloadavg()[0],
    }
    return result


def format_table(result: dict) -> str:
    """The bench as a small text table a person can paste into an issue."""
    setup = result.get("setup", {})
    lines = [
        f"one local epoch: {setup.get('images', '?')} images at {setup.get('image_size', '?')} px, batch "
        f"{setup.get('batch_size', '?')}, {result['non_private'].get('torch_threads', '?')} torch threads",
        f"{'contender':<12} {'s/epoch':>8} {'1st epoch':>10} {'peak MB':>8} {'ε':>6}",
    ]
    for name in CONTENDERS:
        row = result[name]
        eps = f"{row['epsilon']:.2f}" if "epsilon" in row else "-"
        seconds = f"{row['epoch_seconds']:>8.2f} {row['first_epoch_seconds']:>10.2f}"
        lines.append(f"{name:<12} {seconds} {row['peak_mb']:>8.1f} {eps:>6}")
    dp = result["dp"]
    lines.append(
        f"DP / non-private: {result['ratio']:.2f}× time, {result['memory_ratio']:.2f}× memory "
        f"(grad_sample_mode={dp.get('grad_sample_mode')}, clip {dp.get('max_grad_norm')}, "
        f"noise multiplier {dp.get('noise_multiplier', float('nan')):.3f})"
    )
    lines.append(f"peak memory: RSS growth during the first epoch ({result['non_private'].get('memory_method')})")
    return "\n".join(lines)
