"""Claims of `--compression` on a real FLARE simulator run of segmentation_dp (shrunk to 32 px, 3
rounds, ~45 s on two cores): each site uploads one ciphertext a round instead of the dense six, the
server still only adds (every round completes encrypted, with one agreed set of coordinates), and the
model the sites rebuild from the sums learns."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.he.aggregation import weighted_encrypt
from clinfed.he.context import create_context_pair
from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow

TINY = {"image_size": 32, "n_train": 64, "n_test": 16, "batch_size": 16}
ROUNDS = 3
UNTRAINED_DICE = 0.271  # tests/integration/test_segmentation_sim.py's untrained_dice() at TINY


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("compressed")
    extra = {**TINY, "compression": 0.01}
    return run_simulation(SimulationRequest(job="segmentation_dp", sites=3, rounds=ROUNDS, out=out, extra=extra))


def dense_upload_bytes(size: int) -> int:
    """Bytes of one site's dense encrypted update of `size` values under the default parameters."""
    secret, _ = create_context_pair()
    cts, _ = weighted_encrypt(secret, {"w": np.random.default_rng(0).normal(0, 0.1, size)}, 0.064, sites=3)
    return sum(len(c) for c in cts)


def test_every_compressed_round_completes_encrypted(summary):
    assert summary["encrypted"] is True and summary["rounds_completed"] == ROUNDS
    assert {e["status"] for r in summary["rounds"] for e in r["sites"].values()} == {"ok"}


def test_each_site_sends_one_sixth_of_the_dense_encrypted_bytes(summary):
    comp = summary["compression"]
    assert comp["fraction"] == 0.01 and comp["k_nominal"] == 121 and comp["size"] == 12_062
    assert comp["ciphertexts"] == 1 and comp["dense_ciphertexts"] == 6
    dense = dense_upload_bytes(comp["size"])
    for rnd in summary["rounds"]:
        for entry in rnd["sites"].values():
            assert entry["bytes_sent"] <= dense / 5, (entry["bytes_sent"], dense)
    for site, total in summary["bytes_sent"].items():
        assert total == sum(r["sites"][site]["bytes_sent"] for r in summary["rounds"])


def test_the_model_rebuilt_from_compressed_sums_learns(summary):
    assert summary["final"]["metrics"]["dice"] > UNTRAINED_DICE + 0.08, summary["final"]["metrics"]
