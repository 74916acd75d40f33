"""Attack: a site pulls another site's streamed upload.

Every site holds the federation's secret key, so a site that gets hold of another site's *individual*
ciphertexts reads that site's update in the clear. A streamed upload is served by FLARE's download
service to any cell that presents its reference; the reference travels only to the server, but a
curious server (or a leaked log line) can hand it on. So the source itself must refuse every
requester but the server, and the global sum every requester outside the round's sites.
"""

from __future__ import annotations

from nvflare.fuel.f3.streaming.download_service import ProduceRC

from clinfed.fl.streaming import _source_class

CTS = [b"ciphertext-1" * 10, b"ciphertext-2" * 10, b"ciphertext-3" * 10]


def _source(readers: set[str]):
    return _source_class()(CTS, 1 << 20, frozenset(readers))


def test_another_site_cannot_pull_a_sites_upload():
    upload = _source({"server"})
    rc, data, _ = upload.produce({}, "site-2.simulate_job")
    assert rc == ProduceRC.ERROR and data is None
    rc, data, _ = upload.produce({}, "site-1.simulate_job")  # not even the site's own job cell by name
    assert rc == ProduceRC.ERROR and data is None


def test_the_server_pulls_every_ciphertext_of_an_upload():
    rc, data, _ = _source({"server"}).produce({}, "server.simulate_job")
    assert rc == ProduceRC.OK and data == CTS


def test_the_global_sum_goes_only_to_the_rounds_sites():
    aggregate = _source({"site-1", "site-2", "site-3"})
    assert aggregate.produce({}, "site-2.simulate_job")[0] == ProduceRC.OK
    assert aggregate.produce({}, "site-9.simulate_job")[0] == ProduceRC.ERROR


# --- the site's privacy filter cannot be bypassed by streaming plaintext -----------------------------
def _filter_verdict(params: dict) -> str | None:
    from nvflare.apis.dxo import DataKind, from_shareable
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from clinfed.fl.privacy_filter import plaintext_weights

    dxo = from_shareable(FLModelUtils.to_shareable(FLModel(params=params)))
    assert dxo.data_kind in (DataKind.WEIGHTS, DataKind.FL_MODEL)
    return plaintext_weights(dxo)


def _offered(ref: str, items: list[bytes]) -> tuple[dict, object]:
    """(the reference a site's reply carries, the source `offer` recorded for it: hold it, the
    registry keeps sources weakly)."""
    from clinfed.fl import streaming

    source = _source({"server"})
    source.base_obj = items
    streaming._offered[ref] = source
    return {streaming.STREAM_KEY: {"source": "site-1.job", "ref": ref, "count": len(items)}, "layout": "{}"}, source


def test_the_privacy_filter_refuses_a_stream_of_plaintext_weights():
    """A job that streams its update (so the filter never sees the bytes) must still be stopped: the
    filter checks the source this process offered, item by item, for SEAL ciphertexts."""
    import numpy as np

    from clinfed.he import create_context_pair, encrypt_vector

    weights = np.random.default_rng(0).normal(size=4096).astype(np.float32)
    plain, _held = _offered("plain", [weights.tobytes()])
    assert "not a SEAL or compact-format ciphertext" in _filter_verdict(plain)
    assert "did not offer" in _filter_verdict({**plain, "stream": {"ref": "forged", "count": 1}})
    secret, _ = create_context_pair()
    cts, _held = _offered("cts", encrypt_vector(secret, weights))
    assert _filter_verdict(cts) is None
    from clinfed.he.compact import CompactSpec, compact_encrypt

    upload, _ = compact_encrypt(secret, {"w": weights}, 0.5, CompactSpec(8.0, 3, pooled=True))
    compact, _held2 = _offered("compact", upload)
    assert _filter_verdict(compact) is None
    from clinfed.he.truncated import truncated_encrypt

    compressed, _held3 = _offered(
        "truncated", truncated_encrypt(secret, weights[:40], 0.5, CompactSpec(8.0, 3, pooled=True))
    )
    assert _filter_verdict(compressed) is None
