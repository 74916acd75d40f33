"""Attacks of a malicious server (issue 22), on the sites' own protocol objects and real TenSEAL keys.

The server holds the public key, so it can encrypt anything, add any uploads any number of times,
replay old sums, call a live site dropped, show different sites different member sets, and collude
with one hospital (which holds the federation's secret key). On the starting commit every one of
these decrypted to something meaningful: site A's own update from "A + A + A", or from "A +
Enc(count = 2)". With secure aggregation (`clinfed.fl.secagg`, `clinfed.he.masking`) each decrypts to
noise the decoders refuse, or is refused by the protocol in one line, while the honest sum still
decrypts to the exact FedAvg.
"""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as sa

from clinfed.deploy.simkit import ensure_sim_kits
from clinfed.fl.secagg import SecAggError, load_site, sum_info
from clinfed.he import create_context_pair, weighted_encrypt
from clinfed.he.aggregation import EncryptedSum, decrypt_sum_exact
from clinfed.he.ckks import real_unmasked
from clinfed.he.compact import (
    _FULL,
    _SEEDED,
    CompactSpec,
    CompactSum,
    _compact,
    _dump_full,
    _load,
    _wire_words,
    compact_decrypt_sum,
    compact_encrypt,
    compact_unmasked,
    pack_fields,
    quantize,
)
from clinfed.he.masking import Mask, MaskedStream, add_mod, neg_mod, ring_of
from clinfed.he.packing import iter_flat, layout_of

RUN = "run-attack"
SIZE = 9000  # two compact ciphertexts


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    sites = [f"site-{i}" for i in range(1, 5)]
    ensure_sim_kits(root, sites)
    secret, public = create_context_pair()
    return root, sites, secret, public


def _parties(fed, n: int):
    root, sites, _, _ = fed
    parties = {s: load_site(root / s, s, RUN, persist=False) for s in sites[:n]}
    roster = {s: p.hello() for s, p in parties.items()}
    for p in parties.values():
        p.join(roster)
    return parties


def _updates(n: int) -> dict[str, dict]:
    rng = np.random.default_rng(7)
    return {f"site-{i}": {"w": rng.normal(0, 0.5, SIZE).astype(np.float32)} for i in range(1, n + 1)}


SPEC4 = CompactSpec(4.0, 4, pooled=True)


def _upload(fed, party, update, rnd, members, share=0.25, purpose="train"):
    secret = fed[2]
    mask = MaskedStream(party.mask(rnd, purpose, members, ring_of(secret)))
    return compact_encrypt(secret, update, share, SPEC4, mask=mask)[0]


def _server_sum(public, uploads: dict[str, list[bytes]]) -> list[bytes]:
    acc = CompactSum(public, SPEC4)
    for i, (site, cts) in enumerate(uploads.items()):
        acc.add(f"{site}#{i}", cts, 0.25, acc.fingerprint)  # the server names entries as it pleases
    return list(acc.result()[0])


def _decrypt(fed, decryptor, cts, info):
    secret = fed[2]
    correction = MaskedStream(decryptor.correction(info, ring_of(secret), purpose=info["purpose"]))
    return compact_decrypt_sum(
        secret, compact_unmasked(secret, cts, correction), layout_of({"w": np.zeros(SIZE)}), SPEC4
    )


def _honest_round(fed, parties, updates, rnd):
    members = sorted(parties)
    uploads = {s: _upload(fed, parties[s], updates[s], rnd, members) for s in members}
    reveals = {s: parties[s].reveal(rnd, "train", members) for s in members}
    return uploads, reveals, members


def test_the_honest_sum_decrypts_to_the_exact_fedavg(fed):
    parties, updates = _parties(fed, 4), _updates(4)
    uploads, reveals, members = _honest_round(fed, parties, updates, 0)
    total = _server_sum(fed[3], uploads)
    arrays, count = _decrypt(fed, parties["site-1"], total, sum_info(0, "train", members, reveals))
    want = sum(0.25 * u["w"].astype(np.float64) for u in updates.values())
    assert count == 4
    np.testing.assert_allclose(arrays["w"], want, atol=SPEC4.sum_error_bound(4))


def test_a_one_site_upload_added_three_times_decrypts_to_noise(fed):
    """(a) "A + A + A" passed off as a 3-site sum: refused, in the compact and the real-valued format."""
    parties, updates = _parties(fed, 3), _updates(3)
    members = sorted(parties)
    uploads, reveals, _ = _honest_round(fed, parties, updates, 0)
    forged = _server_sum(fed[3], {s: uploads["site-1"] for s in members})
    with pytest.raises(ValueError, match="does not decrypt to whole numbers") as info:
        _decrypt(fed, parties["site-2"], forged, sum_info(0, "train", members, reveals))
    assert "\n" not in str(info.value)


def test_the_real_valued_format_refuses_a_tripled_upload_too(fed):
    secret, public = fed[2], fed[3]
    parties = _parties(fed, 3)
    members = sorted(parties)
    ring = ring_of(secret)
    rng = np.random.default_rng(3)
    update = {"w": rng.normal(0, 0.5, 3000).astype(np.float32)}
    uploads = {}
    for s in members:
        cts, layout = weighted_encrypt(
            secret, update, 0.3, sites=3, mask=MaskedStream(parties[s].mask(0, "train", members, ring))
        )
        uploads[s] = list(cts)
    reveals = {s: parties[s].reveal(0, "train", members) for s in members}
    acc = EncryptedSum(public)
    for i in range(3):
        acc.add(f"x{i}", uploads["site-1"], 0.3, acc.fingerprint)
    forged = acc.result()[0]
    correction = MaskedStream(parties["site-3"].correction(sum_info(0, "train", members, reveals), ring))
    with pytest.raises(ValueError, match=r"contributor count|fewer than 3"):  # noise: either check
        decrypt_sum_exact(secret, real_unmasked(secret, forged, correction), layout)
    honest = EncryptedSum(public)
    for s in members:
        honest.add(s, uploads[s], 0.3, honest.fingerprint)
    vec, count = decrypt_sum_exact(
        secret, real_unmasked(secret, honest.result()[0], MaskedStream(parties["site-2"].correction(
            sum_info(0, "train", members, reveals), ring))), layout,
    )  # fmt: skip
    assert count == 3
    start, stop = layout.offsets()["w"]
    np.testing.assert_allclose(vec[start:stop], 0.9 * update["w"], atol=1e-6)


def _public_encryption_of_count(public, count: int) -> sa.Ciphertext:
    """What the server can make with the public key alone: a ciphertext whose count field reads ``count``."""
    seal = _compact(public, SPEC4.params)
    from clinfed.he.ckks import _seal_restore
    from clinfed.he.context import context_parts

    pk = sa.PublicKey()
    _seal_restore(lambda path: pk.load(seal.context, path), context_parts(public).public_key)
    ints = np.zeros(seal.params.values_per_ciphertext, dtype=np.int64)
    ints[0] = count
    halves = pack_fields(ints, seal.params)[0].astype(np.float64)
    n = seal.n
    plain = sa.Plaintext()
    seal.encoder.encode((halves[: n // 2] + 1j * halves[n // 2 :]).tolist(), seal.scale, plain)
    ct = sa.Ciphertext()
    sa.Encryptor(seal.context, pk).encrypt(plain, ct)
    return ct


def test_one_upload_plus_a_forged_count_decrypts_to_noise(fed):
    """(b) A + Enc_pk(count = 2): the count reads 3, but A's masks do not cancel."""
    secret, public = fed[2], fed[3]
    parties, updates = _parties(fed, 3), _updates(3)
    members = sorted(parties)
    uploads, reveals, _ = _honest_round(fed, parties, updates, 0)
    seal = _compact(public, SPEC4.params)
    forged = []
    for i, data in enumerate(uploads["site-1"]):
        ct = _load(seal, data, _SEEDED, "A")
        if i == 0:
            seal.evaluator.add_inplace(ct, _public_encryption_of_count(public, 2))
        forged.append(_dump_full(seal, ct))
    with pytest.raises(ValueError, match="does not decrypt to whole numbers"):
        _decrypt(fed, parties["site-2"], forged, sum_info(0, "train", members, reveals))
    # the forgery works on the starting commit's protocol (no masks): the site would have read A's update
    plain_a = compact_encrypt(secret, updates["site-1"], 0.25, SPEC4)[0]
    unmasked_forgery = []
    for i, data in enumerate(plain_a):
        ct = _load(seal, data, _SEEDED, "A")
        if i == 0:
            seal.evaluator.add_inplace(ct, _public_encryption_of_count(public, 2))
        unmasked_forgery.append(_dump_full(seal, ct))
    arrays, count = compact_decrypt_sum(secret, unmasked_forgery, layout_of({"w": np.zeros(SIZE)}), SPEC4)
    assert count == 3 and np.allclose(arrays["w"], 0.25 * updates["site-1"]["w"], atol=1e-5)


def _raw_halves(secret, data, kind) -> np.ndarray:
    """What the holder of the secret key reads from any ciphertext: its decrypted half-slot values."""
    seal = _compact(secret, SPEC4.params)
    ct = _load(seal, data, kind, "x")
    plain = sa.Plaintext()
    seal.decryptor.decrypt(ct, plain)
    z = np.asarray(seal.encoder.decode_complex(plain))
    return np.concatenate([z.real, z.imag])


def _true_halves(update, share=0.25) -> np.ndarray:
    seal_params = SPEC4.params
    chunk = next(iter_flat(update, layout_of(update), seal_params.values_per_ciphertext, head=np.ones(1)))
    ints = quantize(chunk, SPEC4, share)
    ints[0] = 1
    return pack_fields(ints, seal_params)[0].astype(np.float64)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return abs(float(np.corrcoef(a, b)[0, 1]))


def _strip(data: bytes, secret, mask: Mask, kind=_SEEDED) -> bytes:
    """Remove a known mask from an upload's c0 (what a colluder can do with the seeds it holds)."""
    seal = _compact(secret, SPEC4.params)
    words = _wire_words(seal, data, kind, "x")
    c0 = words[: seal.k * seal.n].reshape(seal.k, seal.n)
    add_mod(c0, neg_mod(mask.words(0, 1)[0], mask.ring), mask.ring)
    from clinfed.he.compact import _encode_wire

    seed = bytes(memoryview(data)[5 : 5 + 65]) if kind == _SEEDED else b""
    return _encode_wire(seal, kind, words, seed)


def test_the_server_and_one_hospital_cannot_read_another_hospitals_upload(fed):
    """(c) site-1 (holding the secret key and its pair secret with site-2) plus the server (holding
    site-2's revealed self-mask seed): site-2's upload is still masked by its pair with site-3."""
    secret = fed[2]
    parties, updates = _parties(fed, 3), _updates(3)
    members = sorted(parties)
    ring = ring_of(secret)
    uploads, reveals, _ = _honest_round(fed, parties, updates, 0)
    truth = _true_halves(updates["site-2"])
    raw = _raw_halves(secret, uploads["site-2"][0], _SEEDED)
    assert _corr(raw, truth) < 0.05
    # the colluders strip every mask they know: site-2's self-mask (revealed) and the 1-2 pair mask
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from clinfed.fl.secagg import binding

    pair12 = HKDF(hashes.SHA256(), 32, None, b"clinfed-secagg-mask|" + binding(RUN, 0, "train", members)).derive(
        parties["site-1"]._pairs["site-2"]
    )
    known = Mask(ring, (bytes.fromhex(reveals["site-2"]["seed"]),), (pair12,))  # site-2 adds −P_12 (1 < 2)
    stripped = _strip(uploads["site-2"][0], secret, Mask(ring, known.plus, ()), _SEEDED)
    stripped = _strip(stripped, secret, Mask(ring, (), known.minus), _SEEDED)
    assert _corr(_raw_halves(secret, stripped, _SEEDED), truth) < 0.05
    # without masks (the starting commit) site-1 reads site-2's update exactly
    plain = compact_encrypt(secret, updates["site-2"], 0.25, SPEC4)[0]
    assert _corr(_raw_halves(secret, plain[0], _SEEDED), truth) > 0.999


def test_an_old_rounds_sum_replayed_into_a_later_round_is_refused(fed):
    """(d) round 2's uploads summed and presented with round 3's reveals decrypt to noise; round 2's
    sum presented as round 3's, or after the site used round 3's, is refused by the protocol."""
    parties, updates = _parties(fed, 3), _updates(3)
    members = sorted(parties)
    up2, rev2, _ = _honest_round(fed, parties, updates, 2)
    up3, rev3, _ = _honest_round(fed, parties, updates, 3)
    old = _server_sum(fed[3], up2)
    with pytest.raises(ValueError, match="does not decrypt to whole numbers"):
        _decrypt(fed, parties["site-1"], old, sum_info(3, "train", members, rev3))
    decryptor = parties["site-2"]
    ring = ring_of(fed[2])
    with pytest.raises(SecAggError, match="replay"):
        decryptor.correction(sum_info(2, "sums", members, rev2), ring, expect_round=3)
    _decrypt(fed, decryptor, _server_sum(fed[3], up3), sum_info(3, "train", members, rev3))
    with pytest.raises(SecAggError, match=r"sum of round 2 after this site used round 3's; refusing \(replay"):
        decryptor.correction(sum_info(2, "train", members, rev2), ring)


def test_different_member_sets_shown_to_different_sites_are_refused(fed):
    """(e) equivocation: site-3 is told the round holds sites 1-4, the others 1-3. Its upload's masks
    do not cancel against theirs, and the reveals the server collects do not carry every member's
    signature over the set the sum claims."""
    parties, updates = _parties(fed, 4), _updates(4)
    three, four = ["site-1", "site-2", "site-3"], sorted(parties)
    ups = {s: _upload(fed, parties[s], updates[s], 0, three) for s in ["site-1", "site-2"]}
    ups["site-3"] = _upload(fed, parties["site-3"], updates["site-3"], 0, four)
    reveals = {s: parties[s].reveal(0, "train", three) for s in ["site-1", "site-2"]}
    with pytest.raises(SecAggError, match="asked to unmask round 0 for"):
        parties["site-3"].reveal(0, "train", three)
    reveals["site-3"] = parties["site-3"].reveal(0, "train", four)  # what site-3 signs: its own view
    with pytest.raises(SecAggError, match=r"site-3: the signature does not verify") as info:
        _decrypt(fed, parties["site-1"], _server_sum(fed[3], ups), sum_info(0, "train", three, reveals))
    assert "different sets" in str(info.value) and "\n" not in str(info.value)


def test_a_live_site_called_dropped_stays_hidden(fed):
    """(f) all four upload for {1..4}; the server tells 1-3 that site-4 dropped. They upload again for
    {1,2,3} and reveal for that set only; site-4 reveals for its own set. With site-1 colluding (its
    secret key, its own seeds), what the server holds of site-4 correlates < 0.05 with site-4's update;
    a re-run that is not a majority, or after a reveal, is refused."""
    secret, public = fed[2], fed[3]
    parties, updates = _parties(fed, 4), _updates(4)
    ring = ring_of(secret)
    four, three = sorted(parties), ["site-1", "site-2", "site-3"]
    first = {s: _upload(fed, parties[s], updates[s], 0, four) for s in four}
    again = {s: _upload(fed, parties[s], updates[s], 0, three) for s in three}
    reveals3 = {s: parties[s].reveal(0, "train", three) for s in three}
    reveal4 = parties["site-4"].reveal(0, "train", four)
    _, count = _decrypt(fed, parties["site-2"], _server_sum(public, again), sum_info(0, "train", three, reveals3))
    assert count == 3  # the survivors' sum is what the round releases
    truth = _true_halves(updates["site-4"])
    # every sum over the first uploads that holds site-4, with every seed the server and site-1 hold
    seeds = [bytes.fromhex(reveal4["seed"]), parties["site-1"]._sums[(0, "train")].uploads[0].seed]
    for subset in (four, ["site-4"], ["site-1", "site-4"], ["site-2", "site-3", "site-4"]):
        total = _server_sum(public, {s: first[s] for s in subset})[0]
        stripped = _strip(total, secret, Mask(ring, tuple(seeds), ()), _FULL)
        assert _corr(_raw_halves(secret, stripped, _FULL), truth) < 0.05
    with pytest.raises(SecAggError, match="already unmasked"):
        parties["site-1"].mask(0, "train", three, ring)
    fresh = _parties(fed, 4)
    for s in four:
        fresh[s].mask(1, "train", four, ring)
    with pytest.raises(SecAggError, match="fewer than 3"):
        fresh["site-1"].mask(1, "train", ["site-1", "site-2"], ring)
    with pytest.raises(SecAggError, match="must drop sites"):
        fresh["site-1"].mask(1, "train", four, ring)


def test_a_substituted_key_and_a_foreign_certificate_are_refused(fed):
    """The server cannot sit between two sites: a key it swaps in later is refused by name, and a
    roster entry signed by a certificate from another CA (or for another name) is refused."""
    root = fed[0]
    parties = _parties(fed, 3)
    intruder = load_site(root / "site-3", "site-3", RUN, persist=False)  # a second key pair under site-3's kit
    roster = {s: p.hello() for s, p in parties.items()}
    with pytest.raises(SecAggError, match="another key for site-3"):
        parties["site-1"].join({**roster, "site-3": intruder.hello()})
    other = root.parent / "other-ca"
    ensure_sim_kits(other, ["site-3"])
    forged = load_site(other / "site-3", "site-3", RUN)
    newcomer = load_site(root / "site-1", "site-1", RUN, persist=False)
    with pytest.raises(SecAggError, match="not issued by this federation's root CA"):
        newcomer.join({"site-1": newcomer.hello(), "site-3": forged.hello()})
    renamed = dict(parties["site-2"].hello())
    with pytest.raises(SecAggError, match="issued to 'site-2', not to site-4"):
        newcomer.join({"site-1": newcomer.hello(), "site-4": renamed})


def _sums_site(fed, party, method_size: int):
    """A clinical job's site (`SumsExecutor`) wired to real keys and its secure-aggregation state."""
    from types import SimpleNamespace

    from clinfed.analytics.sums_fl import SumsExecutor
    from clinfed.fl.participant import SitePolicy
    from clinfed.he import context_fingerprint

    ex = SumsExecutor(num_sites=3)
    ex.site, ex._ctx, ex._fingerprint, ex._secagg = party.site, fed[2], context_fingerprint(fed[2]), party
    ex.policy = SitePolicy()
    ex._m = SimpleNamespace(wire_limbs=1, size=lambda phase: method_size)
    return ex


def test_a_clinical_release_of_a_forged_sum_is_refused(fed):
    """(h) the release site gets "site-1's counts + themselves twice" (or site-1's alone) as the sum of
    three sites: refused in one line; the honest sum of the same round passes the same check."""
    from clinfed.analytics.sums_fl import PURPOSE
    from clinfed.errors import SiteRefusal

    parties = _parties(fed, 3)
    members = sorted(parties)
    sites = {s: _sums_site(fed, parties[s], 4) for s in members}
    vectors = {s: np.array([10.0 + i, 3.0, 0.0, 7.0, 1.0]) for i, s in enumerate(members)}  # 4 sums + the count
    uploads = {s: sites[s]._masked(vectors[s], 0, members) for s in members}
    reveals = {s: parties[s].reveal(0, PURPOSE, members) for s in members}
    meta = {"sites": members, "secagg_sum": sum_info(0, PURPOSE, members, reveals)}

    def total(which: list[str]) -> dict:
        acc = EncryptedSum(fed[3])
        for i, s in enumerate(which):
            acc.add(f"{s}#{i}", uploads[s]["ckks"], 1.0, acc.fingerprint)
        return {**uploads[which[0]], "ckks": list(acc.result()[0])}

    release = sites["site-2"]
    summed = release._checked_sum(total(members), meta, 0, "")
    np.testing.assert_allclose(summed, sum(vectors.values()), atol=1e-6)
    for forged in (["site-1"] * 3, ["site-1", "site-1", "site-2"]):
        with pytest.raises(SiteRefusal, match="site-2: the sum's count slot reads") as info:
            sites["site-2"]._checked_sum(total(forged), meta, 0, "")
        assert "\n" not in str(info.value)
