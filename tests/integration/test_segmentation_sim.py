"""Claims of the segmentation_dp job on a real FLARE simulator run (shrunk to 32 px so it runs in
well under a minute on two cores): DP-SGD at every site plus encrypted FedAvg learn a segmenter far
better than the untrained network, and no site spends more than the job's ε."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from clinfed.jobs import load_job
from clinfed.plots import plot_rounds
from clinfed.privacy.ledger import epsilon_of
from clinfed.simulate import SimulationRequest, run_simulation
from clinfed.tasks.segmentation import SegmentationTask

pytestmark = pytest.mark.slow

TINY = {"image_size": 32, "n_train": 64, "n_test": 16, "batch_size": 16}
# a UNet of 18,878 parameters: two ciphertexts of the noise-tied grid's 16,384 values, so an upload spans
# more than one stream message (the default channels' 12,062 fit one ciphertext)
CHANNELS = [8, 24, 40]
SITES, EPSILON = 3, 8.0  # never fewer than 3 sites (a sum of two exposes each to the other)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("segmentation")


STREAM_CHUNK = 48 * 1024  # bytes per pull request: smaller than one update, so each takes several messages


@pytest.fixture(scope="module")
def summary(out):
    saved = os.environ.get("CLINFED_STREAM_CHUNK_BYTES")
    os.environ["CLINFED_STREAM_CHUNK_BYTES"] = str(STREAM_CHUNK)  # read by the simulator's site and server processes
    try:
        extra = {**TINY, "channels": CHANNELS}
        return run_simulation(SimulationRequest(job="segmentation_dp", sites=SITES, rounds=2, out=out, extra=extra))
    finally:
        if saved is None:
            os.environ.pop("CLINFED_STREAM_CHUNK_BYTES", None)
        else:
            os.environ["CLINFED_STREAM_CHUNK_BYTES"] = saved


def untrained_dice() -> float:
    """Mean held-out Dice of the network every site starts from (SiteTrainer seeds 0 before building it)."""
    task = SegmentationTask(
        image_size=TINY["image_size"], n_train=TINY["n_train"], n_test=TINY["n_test"], channels=CHANNELS
    )
    torch.manual_seed(0)
    model = task.build_model()
    scores = [
        task.evaluate(model, task.load_site_data(f"site-{i + 1}", i, SITES, None).test)["dice"] for i in range(SITES)
    ]
    return float(np.mean(scores))


def test_every_round_completes_encrypted(summary):
    assert summary["job"] == "segmentation_dp" and summary["encrypted"] is True
    assert summary["rounds_completed"] == 2
    # Dice has no per-patient binary score: the pooled ROC is skipped, saying why (fl.roc_validation)
    assert summary["roc"]["status"] == "skipped" and "no per-patient binary score" in summary["roc"]["reason"]
    assert {e["status"] for r in summary["rounds"] for e in r["sites"].values()} == {"ok"}


def test_updates_larger_than_one_message_are_streamed_and_pulled_whole(summary):
    """Every upload went as a stream reference the server pulled in several messages (FLARE's download
    service), and what arrived is every ciphertext the site sent (the round's Dice depends on it)."""
    for r in summary["rounds"]:
        for site, entry in r["sites"].items():
            stream = entry["stream"]
            assert stream["ciphertexts"] >= 2 and stream["bytes"] > STREAM_CHUNK, (site, stream)
            assert stream["messages"] >= stream["bytes"] // STREAM_CHUNK, (site, stream)
            assert stream["bytes"] <= entry["bytes_sent"] < stream["bytes"] + 4096, (site, stream)


def test_final_dice_is_far_above_the_untrained_network(summary):
    final = summary["final"]["metrics"]["dice"]
    baseline = untrained_dice()
    assert summary["final"]["primary_metric"] == "dice"
    assert set(summary["final"]["per_site"]) == {"site-1", "site-2", "site-3"}
    assert final > baseline + 0.2, (final, baseline)


def test_no_site_spends_more_than_the_job_epsilon_and_history_recomputes_it(summary):
    assert load_job("segmentation_dp").DEFAULTS["epsilon"] == EPSILON
    for site, privacy in summary["privacy"].items():
        assert 0.0 < privacy["epsilon"] <= EPSILON, site
        assert epsilon_of(privacy["history"], privacy["delta"], privacy["accountant"]) == pytest.approx(
            privacy["epsilon"]
        )


def test_each_site_leaves_example_predictions_in_out(summary, out):
    for site in summary["sites"]:
        with Image.open(out / f"segmentation_dp-{site}-examples.png") as png:
            assert png.format == "PNG"


def test_round_plot_is_drawn_from_the_summary(summary, tmp_path):
    with Image.open(plot_rounds(summary, tmp_path / "rounds.png", "dice")) as png:
        assert png.format == "PNG"


def test_updates_travel_in_the_compact_format_on_the_noise_grid_at_half_plaintext_size(summary):
    """Dense encrypted updates use the compact format on the grid tied to the sites' DP noise
    (16,384 values per ciphertext, ~1.9 B/value): each upload is ⌈(P + 1) / 16384⌉ ciphertexts (the +1:
    the contributor count) where the fixed grid needs ⌈(P + 1) / 8192⌉, within 2 bytes per packed
    value; the quantum is a tenth of each share's noise std, and values past the range are counted."""
    task = SegmentationTask(
        image_size=TINY["image_size"], n_train=TINY["n_train"], n_test=TINY["n_test"], channels=CHANNELS
    )
    size = sum(p.numel() for p in task.build_model().parameters())
    fmt = summary["he_format"]
    assert fmt["format"] == "compact" and fmt["grid"] == "noise" and fmt["fields"] == "4x10"
    assert fmt["max_sites"] == SITES
    noise = min(e["update_noise_std"] for e in summary["admission"].values())
    assert fmt["quantum"] == pytest.approx(noise / (10 * SITES))
    cts = -(-(size + 1) // 16384)
    for r in summary["rounds"]:
        for site, entry in r["sites"].items():
            assert entry["stream"]["ciphertexts"] == cts, (site, entry["stream"])
            assert entry["stream"]["bytes"] <= 2.0 * 16384 * cts, (site, entry["stream"])
            assert 0 <= entry["clamped_values"] <= size
    assert fmt["clamped_values"] == sum(e["clamped_values"] for r in summary["rounds"] for e in r["sites"].values())
