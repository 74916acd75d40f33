"""Claims about one round of encrypted FedAvg: the average is right, and one bad site spoils nothing."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.he import (
    CKKSParams,
    EncryptedSum,
    HEContextError,
    InvalidCiphertext,
    PlainWeightedSum,
    context_fingerprint,
    create_context_pair,
    decrypt_average,
    encrypt_vector,
    flatten,
    max_abs_value,
    weighted_encrypt,
)

WEIGHTS = {"site-1": 120.0, "site-2": 45.0, "site-3": 300.0, "site-4": 80.0}


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv1.weight": rng.normal(0, 0.2, (16, 3, 3, 3)).astype(np.float32),
        "conv1.bias": rng.normal(0, 0.1, 16).astype(np.float32),
        "conv2.weight": rng.normal(0, 0.1, (32, 16, 3, 3)).astype(np.float32),
        "conv2.bias": rng.normal(0, 0.1, 32).astype(np.float32),
        "fc.weight": rng.normal(0, 0.05, (2, 32)).astype(np.float32),
        "fc.bias": np.zeros(2, dtype=np.float32),
    }


def _fedavg(models: dict[str, dict], weights: dict[str, float]) -> dict[str, np.ndarray]:
    total = sum(weights[s] for s in models)
    return {k: sum(weights[s] * models[s][k].astype(np.float64) for s in models) / total for k in models["site-1"]}


def _assert_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    peak = max(np.max(np.abs(v)) for v in want.values())
    worst = max(np.max(np.abs(got[k].astype(np.float64) - want[k])) for k in want)
    assert worst / peak <= 1e-4, f"relative error {worst / peak:.2e}"


@pytest.fixture(scope="module")
def fed():
    secret, public = create_context_pair()
    models = {site: _model(i) for i, site in enumerate(WEIGHTS)}
    payloads = {site: weighted_encrypt(secret, models[site], WEIGHTS[site]) for site in WEIGHTS}
    return secret, public, models, payloads


def _round(public, payloads, sites, bad: dict | None = None) -> tuple[EncryptedSum, list[str]]:
    acc, errors = EncryptedSum(public, context_fingerprint(public)), []
    for site in sites:
        cts, fingerprint = (bad or {}).get(site, (payloads[site][0], context_fingerprint(public)))
        try:
            acc.add(site, cts, WEIGHTS[site], fingerprint)
        except InvalidCiphertext as exc:
            errors.append(str(exc))
    return acc, errors


def test_decrypted_aggregate_equals_plaintext_fedavg(fed):
    secret, public, models, payloads = fed
    acc, errors = _round(public, payloads, WEIGHTS)
    assert errors == []
    cts, total, sites = acc.result()
    assert sites == list(WEIGHTS) and total == sum(WEIGHTS.values())
    layout = payloads["site-1"][1]
    avg = decrypt_average(secret, cts, total, layout)
    _assert_close(avg, _fedavg(models, WEIGHTS))
    assert all(avg[k].dtype == np.float32 and avg[k].shape == models["site-1"][k].shape for k in avg)


def test_a_dropped_site_leaves_the_average_of_the_rest(fed):
    secret, public, models, payloads = fed
    acc, _ = _round(public, payloads, ["site-1", "site-3", "site-4"])
    cts, total, sites = acc.result()
    assert sites == ["site-1", "site-3", "site-4"]
    rest = {s: models[s] for s in sites}
    _assert_close(decrypt_average(secret, cts, total, payloads["site-1"][1]), _fedavg(rest, WEIGHTS))


def _assert_refused_and_rest_intact(fed, bad: dict, pattern: str) -> None:
    secret, public, models, payloads = fed
    acc, errors = _round(public, payloads, WEIGHTS, bad)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("site-2: ")
    assert pattern in errors[0], errors[0]
    cts, total, sites = acc.result()
    assert sites == ["site-1", "site-3", "site-4"]
    assert total == WEIGHTS["site-1"] + WEIGHTS["site-3"] + WEIGHTS["site-4"]
    rest = {s: models[s] for s in sites}
    _assert_close(decrypt_average(secret, cts, total, payloads["site-1"][1]), _fedavg(rest, WEIGHTS))


def test_a_garbage_payload_is_refused_by_name(fed):
    _, public, _, payloads = fed
    cts = list(payloads["site-2"][0])
    cts[2] = b"\x5e\xa1\x10\x04" + bytes(200)  # a SEAL-looking header, then nothing sensible
    bad = {"site-2": (cts, context_fingerprint(public))}
    _assert_refused_and_rest_intact(fed, bad, f"ciphertext 3 of {len(cts)} does not parse")


def test_a_short_payload_is_refused_by_name(fed):
    _, public, _, payloads = fed
    cts = payloads["site-2"][0][:-1]
    bad = {"site-2": (cts, context_fingerprint(public))}
    _assert_refused_and_rest_intact(fed, bad, f"sent {len(cts)} ciphertexts, expected {len(cts) + 1}")


def test_another_federations_key_is_refused_by_fingerprint(fed):
    models = fed[2]
    foreign, foreign_public = create_context_pair()  # same parameters, another key
    cts, _ = weighted_encrypt(foreign, models["site-2"], WEIGHTS["site-2"])
    bad = {"site-2": (cts, context_fingerprint(foreign_public))}
    _assert_refused_and_rest_intact(fed, bad, "another federation's key")


def test_other_parameters_are_refused_even_with_a_copied_fingerprint(fed):
    _, public, models, _ = fed
    foreign, _ = create_context_pair(CKKSParams(8192, (60, 40), 36))
    cts, _ = weighted_encrypt(foreign, models["site-2"], WEIGHTS["site-2"])
    ours = len(fed[3]["site-1"][0])
    cts = (cts * ours)[:ours]  # the right count, to reach the parser
    bad = {"site-2": (cts, context_fingerprint(public))}
    _assert_refused_and_rest_intact(fed, bad, "does not parse under the federation's context")


def test_a_missing_fingerprint_and_a_second_contribution_are_refused(fed):
    _, public, _, payloads = fed
    acc = EncryptedSum(public)
    with pytest.raises(InvalidCiphertext, match=r"^site-2: sent no context fingerprint"):
        acc.add("site-2", payloads["site-2"][0], 1.0, "")
    acc.add("site-1", payloads["site-1"][0], 1.0, context_fingerprint(public))
    with pytest.raises(InvalidCiphertext, match=r"^site-1: already contributed"):
        acc.add("site-1", payloads["site-1"][0], 1.0, context_fingerprint(public))
    with pytest.raises(InvalidCiphertext, match=r"^site-3: aggregation weight"):
        acc.add("site-3", payloads["site-3"][0], float("nan"), context_fingerprint(public))
    assert acc.sites == ["site-1"] and acc.total_weight == 1.0


def test_the_expected_count_can_be_fixed_up_front(fed):
    _, public, _, payloads = fed
    size = payloads["site-1"][1].size
    acc = EncryptedSum(public, size=size)
    with pytest.raises(InvalidCiphertext, match=r"^site-1: sent 1 ciphertexts, expected"):
        acc.add("site-1", payloads["site-1"][0][:1], 1.0, context_fingerprint(public))
    with pytest.raises(ValueError, match="no site contributed"):
        acc.result()


def test_the_server_sum_refuses_a_secret_context(fed):
    secret = fed[0]
    with pytest.raises(HEContextError, match="must not hold the secret key"):
        EncryptedSum(secret)


def test_weighted_encrypt_refuses_values_that_could_wrap(fed):
    secret = fed[0]
    bound = max_abs_value(CKKSParams())
    with pytest.raises(ValueError, match="'big'"):
        weighted_encrypt(secret, {"small": np.ones(3), "big": np.full(2, 2.0)}, bound / 1.5)
    with pytest.raises(ValueError, match="3 site"):
        weighted_encrypt(secret, {"w": np.ones(3)}, bound / 2, sites=3)
    with pytest.raises(ValueError, match=r"NaN/Inf values .*'w'"):
        weighted_encrypt(secret, {"v": np.ones(2), "w": np.array([1.0, np.inf])}, 1.0)
    with pytest.raises(ValueError, match="weight"):
        weighted_encrypt(secret, {"w": np.ones(3)}, 0.0)


def test_ciphertexts_are_packed_across_layers(fed):
    """FLARE pays one ciphertext per layer; we pay ⌈parameters / slots⌉ for the whole model."""
    payloads = fed[3]
    cts, layout = payloads["site-1"]
    # six layers and the contributor count (one value that is 1 after weighting)
    assert len(layout.names) == 7 and layout.size == 432 + 16 + 4608 + 32 + 64 + 2 + 1
    assert len(cts) == -(-layout.size // 2048) == 3


# --- the plaintext twin --------------------------------------------------------------------------
def test_plain_sum_averages_and_names_bad_sites(fed):
    models = fed[2]
    acc = PlainWeightedSum()
    acc.add("site-1", models["site-1"], WEIGHTS["site-1"])
    nan_model = {**models["site-2"], "conv2.bias": np.full(32, np.nan, dtype=np.float32)}
    with pytest.raises(
        InvalidCiphertext, match=r"^site-2: update holds 32 NaN/Inf values \(first in layer 'conv2.bias'\)"
    ):
        acc.add("site-2", nan_model, WEIGHTS["site-2"])
    wrong = {**models["site-2"], "fc.weight": np.zeros((3, 32), dtype=np.float32)}
    with pytest.raises(InvalidCiphertext, match=r"^site-2: layer 'fc.weight' has shape \(3, 32\), expected \(2, 32\)"):
        acc.add("site-2", wrong, WEIGHTS["site-2"])
    missing = {k: v for k, v in models["site-2"].items() if k != "fc.bias"}
    with pytest.raises(InvalidCiphertext, match=r"^site-2: update layers differ \(missing \['fc.bias'\]"):
        acc.add("site-2", missing, WEIGHTS["site-2"])
    acc.add("site-3", models["site-3"], WEIGHTS["site-3"])
    avg, total, sites = acc.result()
    assert sites == ["site-1", "site-3"] and total == 420.0
    rest = {s: models[s] for s in sites}
    _assert_close(avg, _fedavg(rest, WEIGHTS))
    assert avg["conv1.weight"].dtype == np.float32


def test_plain_sum_takes_a_reference_layout():
    _, layout = flatten({"w": np.zeros(4)})
    acc = PlainWeightedSum(reference=layout)
    with pytest.raises(InvalidCiphertext, match=r"^site-1: layer 'w' has shape"):
        acc.add("site-1", {"w": np.zeros(5)}, 1.0)


def test_encrypt_vector_output_is_what_the_sum_accepts(fed):
    secret, public, _, _ = fed
    acc = EncryptedSum(public)
    acc.add("site-1", encrypt_vector(secret, np.ones(10)), 1.0, context_fingerprint(secret))
    assert acc.sites == ["site-1"]
