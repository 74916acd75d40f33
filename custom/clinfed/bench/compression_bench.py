"""`scripts/compression_bench.py`: what `--compression F` costs and saves against the dense compact format.

For each UNet (segmentation_dp's default 12 k-parameter one and `--channels 32,64,128`, 185 k) it runs
the product's own path twice in FLARE's simulator, dense (the compact format) and compressed (F of the
coordinates in `clinfed.he.truncated`), same data, rounds and ε, and reports per site-round the bytes
each site uploaded (`rounds[].sites[].bytes_sent`: the ciphertexts plus layout, key id and spec, as
the audit log counts them) and the final mean Dice, each as a ratio compressed / dense. A 125 M row
comes from `clinfed bench stream --params N --compression F` (no training: the transport and the
cryptography of a model that size), whose upload is compared with the dense compact upload of all N
values.

The runs are short on purpose (the suite's 2 shared cores); the settings go into the JSON and under
the table, so the ratios are read against them: few rounds favour dense, which moves every coordinate
every round, while compressed moves F of them and keeps the rest in the sites' error feedback.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {"12k": (8, 16, 32), "185k": (32, 64, 128)}
DEFAULT_SETTINGS = {"image_size": 32, "n_train": 128, "n_test": 32, "batch_size": 16}


def _mean_bytes(summary: dict) -> float:
    sent = [e["bytes_sent"] for r in summary["rounds"] for e in r["sites"].values() if e.get("status") == "ok"]
    return float(np.mean(sent)) if sent else float("nan")


def _run(out: Path, channels, rounds: int, sites: int, settings: dict, compression: float | None) -> dict:
    from clinfed.simulate import SimulationRequest, run_simulation

    extra = {**settings, "channels": list(channels)}
    if compression:
        extra["compression"] = compression
    started = time.monotonic()
    summary = run_simulation(SimulationRequest(job="segmentation_dp", sites=sites, rounds=rounds, out=out, extra=extra))
    return {
        "wall_seconds": time.monotonic() - started,
        "rounds_completed": summary["rounds_completed"],
        "bytes_per_site_round": _mean_bytes(summary),
        "dice": float(summary["final"]["metrics"].get("dice", float("nan"))),
        "compression": summary.get("compression"),
    }


def run_model(name: str, rounds: int, sites: int, fraction: float, settings: dict, out: Path) -> dict:
    """Dense and compressed runs of one UNet: their numbers and the ratios compressed / dense."""
    channels = MODELS[name]
    dense = _run(out / f"{name}-dense", channels, rounds, sites, settings, None)
    comp = _run(out / f"{name}-compressed", channels, rounds, sites, settings, fraction)
    info = comp["compression"] or {}
    return {
        "model": name,
        "channels": list(channels),
        "params": info.get("size"),
        "k": info.get("k"),
        "dense": dense,
        "compressed": comp,
        "bytes_ratio": comp["bytes_per_site_round"] / dense["bytes_per_site_round"],
        "dice_ratio": comp["dice"] / dense["dice"] if dense["dice"] else float("nan"),
    }


def run_compression_bench(
    models: list[str] | tuple[str, ...] = tuple(MODELS),
    rounds: int = 5,
    sites: int = 3,
    fraction: float = 0.01,
    settings: dict | None = None,
    stream: dict | None = None,
    out: str | Path | None = None,
) -> dict:
    """The bench's JSON: one entry per UNet, plus ``stream`` (a `bench stream --compression` result) if given."""
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="clinfed-compression-"))
    result: dict = {
        "fraction": fraction,
        "rounds": rounds,
        "sites": sites,
        "settings": settings,
        "models": [run_model(m, rounds, sites, fraction, settings, out) for m in models],
    }
    if stream:
        result["stream"] = stream
    return result


def markdown_table(result: dict) -> str:
    """The table docs/benchmarks.md shows (rendered by `clinfed.bench.tables`)."""
    f = result["fraction"]
    lines = [
        "| model | params | k | dense B / site-round | compressed B / site-round | bytes ratio | dense Dice | "
        "compressed Dice | Dice ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["models"]:
        d, c = m["dense"], m["compressed"]
        lines.append(
            f"| UNet {m['model']} ({','.join(map(str, m['channels']))}) | {m['params']:,} | {m['k']:,} | "
            f"{d['bytes_per_site_round']:,.0f} | {c['bytes_per_site_round']:,.0f} | **{m['bytes_ratio']:.2%}** | "
            f"{d['dice']:.3f} | {c['dice']:.3f} | {m['dice_ratio']:.2f} |"
        )
    s = result.get("stream")
    if s:
        lines.append(
            f"| stream bench (no training) | {s['params']:,} | {s['k']:,} | {s['dense_upload_bytes']:,} | "
            f"{s['upload_bytes_per_param'] * s['params']:,.0f} | **{s['upload_bytes_ratio']:.2%}** | – | – | "
            f"max rel. error {s['max_rel_error']:.1e} |"
        )
    st = result["settings"]
    lines += [
        "",
        f"F = {f:g}, {result['sites']} sites, {result['rounds']} rounds, segmentation_dp at "
        f"{st['image_size']} px, {st['n_train']} training images per site, default ε; one run each on 2 shared "
        "cores. Bytes are one site's upload per round as `bytes_sent` counts it (ciphertexts, layout, key id, "
        "spec); Dice is the final global model's mean over the sites.",
    ]
    if s:
        lines[-1] += (
            f" The stream row: one round of `clinfed bench stream --params {s['params']} --compression "
            f"{s['compression']:g}` ({s['sites']} sites, {s['wall_seconds']:.0f} s wall): its upload against the "
            "ciphertexts of the dense compact upload of all its values (`he.truncated.dense_compact_upload_bytes`, "
            "checked against the format by the unit tests); the error is the decrypted average's at the sent "
            "coordinates, relative to its largest value, within the compact grid's bound as in the dense bench."
        )
    return "\n".join(lines)


def save(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
