"""The server's resume point keeps ciphertexts in a binary file next to its JSON: the records come
back exactly, into a spool, and a damaged or swapped file is refused before any record is used."""

from __future__ import annotations

import json

import pytest
from nvflare.app_common.abstract.fl_model import FLModel

from clinfed.fl import checkpoint, payload
from clinfed.fl.streaming import Spool


def _model(cts: list[bytes]) -> FLModel:
    params = payload.encrypted_params(cts, '{"layout": 1}', "f" * 64, '{"spec": 1}')
    return FLModel(params=params, meta={"total_weight": 0.75})


def test_ciphertexts_round_trip_through_the_binary_file_into_a_spool(tmp_path):
    cts = [bytes([i]) * (100 + i) for i in range(5)] + [b""]
    doc = checkpoint.model_doc(_model(cts), True, tmp_path / "checkpoints" / "state.bin")  # folder made
    text = json.dumps(doc)
    assert "ckks_sha256" in doc and len(text) < 600  # no hex of the ciphertexts in the JSON
    spool = Spool(tmp_path)
    back = checkpoint.model_from_doc(json.loads(text), tmp_path / "checkpoints", spool)
    assert back.params[payload.CKKS_KEY] is spool and list(spool) == cts
    assert back.params[payload.COMPACT_KEY] == '{"spec": 1}' and back.meta["total_weight"] == 0.75
    spool.close()


def test_a_damaged_or_swapped_ciphertext_file_is_refused(tmp_path):
    doc = checkpoint.model_doc(_model([b"a" * 50, b"b" * 50]), True, tmp_path / "state.bin")
    data = bytearray((tmp_path / "state.bin").read_bytes())
    data[20] ^= 1
    (tmp_path / "state.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="do not match the checkpoint"):
        checkpoint.model_from_doc(doc, tmp_path)
    checkpoint.model_doc(_model([b"a" * 50]), True, tmp_path / "state.bin")  # another round's file
    with pytest.raises(ValueError, match="do not match the checkpoint"):
        checkpoint.model_from_doc(doc, tmp_path)
