"""Claims of the streamed path (issue 14): an upload read back from its spool one ciphertext at a time
sums and decrypts exactly like one held in memory, and one that turns bad half-way spoils nothing.

The transfer itself (FLARE's download service between real cells) is exercised by every encrypted
simulator run; `tests/integration/test_segmentation_sim.py` checks one that takes many messages.
"""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.fl.payload import encrypted_params, log_update, payload_sha256, payload_size
from clinfed.fl.streaming import Spool
from clinfed.he import (
    EncryptedSum,
    InvalidCiphertext,
    context_fingerprint,
    create_context_pair,
    decrypt_average,
    weighted_encrypt,
)

WEIGHTS = {"site-1": 1.2, "site-2": 0.45, "site-3": 3.0, "site-4": 0.8}


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(0, 0.1, (50, 100)).astype(np.float32), "b": rng.normal(0, 0.1, 7).astype(np.float32)}


@pytest.fixture(scope="module")
def fed():
    secret, public = create_context_pair()
    models = {site: _model(i) for i, site in enumerate(WEIGHTS)}
    payloads = {site: weighted_encrypt(secret, models[site], w) for site, w in WEIGHTS.items()}
    assert all(len(cts) >= 3 for cts, _ in payloads.values())  # several ciphertexts per upload
    return secret, public, models, payloads


def _spooled(cts, tmp_path) -> Spool:
    spool = Spool(tmp_path)
    spool.extend(cts)
    return spool


def test_a_spool_reads_back_every_ciphertext_and_deletes_itself(fed, tmp_path):
    cts = fed[3]["site-1"][0]
    spool = _spooled(cts, tmp_path)
    assert len(spool) == len(cts) and list(spool) == cts and spool[-1] == cts[-1]
    assert spool.nbytes == sum(len(c) for c in cts)
    assert oct(spool.path.stat().st_mode & 0o777) == "0o600"
    spool.close()
    assert not spool.path.exists()


def test_spooled_uploads_sum_and_decrypt_like_in_memory_ones(fed, tmp_path):
    secret, public, models, payloads = fed
    fingerprint = context_fingerprint(public)
    in_memory, streamed = EncryptedSum(public, fingerprint), EncryptedSum(public, fingerprint)
    for site in WEIGHTS:
        cts = payloads[site][0]
        in_memory.add(site, cts, WEIGHTS[site], fingerprint)
        streamed.add(site, _spooled(cts, tmp_path), WEIGHTS[site], fingerprint)
    (a, total, _), (b, _, _) = in_memory.result(), streamed.result()
    layout = payloads["site-1"][1]
    want = decrypt_average(secret, a, total, layout)
    got = decrypt_average(secret, _spooled(b, tmp_path), total, layout)  # the site decrypts from a spool too
    truth = {k: sum(WEIGHTS[s] * models[s][k].astype(np.float64) for s in WEIGHTS) / total for k in want}
    for k in want:
        np.testing.assert_allclose(got[k], truth[k], atol=1e-5)
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)


def test_an_upload_that_turns_bad_half_way_leaves_the_sum_intact(fed, tmp_path):
    """Streaming adds one ciphertext at a time; a site whose 2nd ciphertext is garbage must not have
    added its 1st (a one-pass add would have, and the average would be silently wrong)."""
    secret, public, models, payloads = fed
    fingerprint = context_fingerprint(public)
    acc = EncryptedSum(public, fingerprint)
    good = ["site-1", "site-2", "site-3"]
    acc.add(good[0], _spooled(payloads[good[0]][0], tmp_path), WEIGHTS[good[0]], fingerprint)
    bad = list(payloads["site-4"][0])
    bad[1] = bad[1][: len(bad[1]) // 2]
    with pytest.raises(InvalidCiphertext, match=r"site-4: ciphertext 2 of \d+"):
        acc.add("site-4", _spooled(bad, tmp_path), WEIGHTS["site-4"], fingerprint)
    for site in good[1:]:
        acc.add(site, _spooled(payloads[site][0], tmp_path), WEIGHTS[site], fingerprint)
    cts, total, sites = acc.result()
    assert sites == good and total == pytest.approx(sum(WEIGHTS[s] for s in good))
    got = decrypt_average(secret, cts, total, payloads["site-1"][1])
    for k in got:
        truth = sum(WEIGHTS[s] * models[s][k].astype(np.float64) for s in good) / total
        np.testing.assert_allclose(got[k], truth, atol=1e-5)


def test_the_audit_digest_of_a_spooled_update_is_the_senders(fed, tmp_path):
    """The site logs the digest of the list it encrypted, the server that of the spool it received."""
    cts = fed[3]["site-2"][0]
    sent = encrypted_params(cts, '{"x": 1}', "fp")
    received = encrypted_params(_spooled(cts, tmp_path), '{"x": 1}', "fp")
    assert payload_sha256(sent) == payload_sha256(received)
    assert payload_size(sent) == payload_size(received)

    class _Log:
        def append(self, event, **fields):
            self.fields = fields

    log = _Log()
    digest, size = log_update(log, "update_received", received, job="j", round_num=0, site="site-2")
    assert (digest, size) == (payload_sha256(sent), payload_size(sent)) == (log.fields["sha256"], log.fields["bytes"])
