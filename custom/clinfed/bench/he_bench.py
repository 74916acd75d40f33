"""One FedAvg round three ways, side by side: plaintext, FLARE's own HE, and clinfed's packed CKKS.

Each contender aggregates the same site updates (a layered float32 model of ``params`` values with
16-value biases and norm scales, as a MONAI-style CNN has) and is scored on:

- ``bytes_per_param``: bytes one site puts on the wire for its update, over the parameter count.
  Plaintext is float32 (4). For both HE contenders it is the FLARE-serialised (``fobs``) Shareable
  that carries the update, i.e. what FLARE actually sends; ``ciphertext_bytes_per_param`` counts
  the ciphertexts alone, and ``download_bytes_per_param`` the aggregate sent back.
- ``encrypt_seconds``: one site's weighting + encryption + serialisation (sites run in parallel,
  so one site's time is what a round waits for; the mean over sites).
- ``aggregate_seconds``: the server's work for all sites (deserialise, vet, add, serialise).
- ``decrypt_seconds``: one site's deserialisation + decryption + division.
- ``round_seconds``: the sum of the three, the HE cost on a round's critical path.
- ``max_rel_error``: max |aggregate − exact FedAvg| / max |exact FedAvg| (float64 reference).

FLARE's HE is driven through its own components (``HEModelEncryptor`` → fobs →
``HEInTimeAccumulateWeightedAggregator`` → fobs → ``HEModelDecryptor``) with real FLContext,
Shareable and DXO objects, and the context FLARE's ``HEBuilder`` provisions (N=8192,
[60, 40, 40], 2^40, symmetric) written to a temporary startup kit. Smallest workaround: FLARE loads
that file through ``SecurityContentService``, a process-wide singleton bound to the first startup
folder it sees; the bench points it at the temporary kit for the two START_RUN events and then
restores whatever was there, so FLARE's own loader (``load_tenseal_context_from_workspace``, in
non-secure mode since the temporary kit is unsigned) reads the files.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BIAS = 16  # the smallest layers: a 16-channel bias or norm scale costs FLARE a whole ciphertext


def bench_model(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A UNet-like float32 model of exactly ``params`` values: 3x3 convs, biases, norm scales, a head."""
    if params < 1:
        raise ValueError(f"params must be positive, got {params}")
    rng = np.random.default_rng(seed)
    down = [(3, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 256)]
    up = [(256, 128), (128, 128), (128, 64), (64, 64), (64, 32), (32, 32), (32, 16), (16, 16)]
    model: dict[str, np.ndarray] = {}
    used = 0
    for i, (cin, cout) in enumerate(down + up + down + up):
        need = cout * cin * 9 + 3 * cout
        if used + need >= params:
            break
        std = np.sqrt(2.0 / (cin * 9))
        model[f"block{i:02d}.conv.weight"] = rng.normal(0, std, (cout, cin, 3, 3)).astype(np.float32)
        model[f"block{i:02d}.conv.bias"] = rng.normal(0, 0.01, cout).astype(np.float32)
        model[f"block{i:02d}.norm.weight"] = (1 + rng.normal(0, 0.05, cout)).astype(np.float32)
        model[f"block{i:02d}.norm.bias"] = rng.normal(0, 0.01, cout).astype(np.float32)
        used += need
    model["head.weight"] = rng.normal(0, 0.05, params - used).astype(np.float32)
    return model


def _site_updates(model: dict[str, np.ndarray], sites: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Each site's model: the global one plus a local step of ~1 % of each layer's scale."""
    rng = np.random.default_rng(seed + 1)
    return [
        {k: (v + rng.normal(0, 0.01 * (float(np.std(v)) or 1.0), v.shape)).astype(np.float32) for k, v in model.items()}
        for _ in range(sites)
    ]


def _fedavg(updates: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {
        k: sum(w * u[k].astype(np.float64) for w, u in zip(weights, updates, strict=True)) / total for k in updates[0]
    }


def _max_rel_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    peak = max(float(np.max(np.abs(v))) for v in want.values())
    worst = max(
        float(np.max(np.abs(np.asarray(got[k], dtype=np.float64).reshape(v.shape) - v))) for k, v in want.items()
    )
    return worst / peak


def _weights(sites: int) -> list[float]:
    """Sample counts, unnormalised, as sites report them."""
    return [float(120 + 37 * i) for i in range(sites)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute FLARE's per-call warnings (no engine, default weights) and TenSEAL's native stdout note
    that a layer spans several ciphertexts (one per layer, from C++): the bench's output is its table."""
    logger = logging.getLogger("nvflare")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        libc.fflush(None)  # C++ iostreams write through C stdio, which may still buffer the notes
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        logger.setLevel(level)


def _result(name: str, params: int, sites: int, **values) -> dict:
    out = {"contender": name, "params": params, "sites": sites, **values}
    out["round_seconds"] = out["encrypt_seconds"] + out["aggregate_seconds"] + out["decrypt_seconds"]
    return out


# --- (a) plaintext FedAvg ------------------------------------------------------------------------
def _bench_plaintext(updates, weights, reference, params: int) -> dict:
    start = time.perf_counter()
    total = sum(weights)
    avg = {k: sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / total for k in updates[0]}
    aggregate = time.perf_counter() - start
    nbytes = sum(v.nbytes for v in updates[0].values())
    return _result(
        "plaintext",
        params,
        len(updates),
        bytes_per_param=nbytes / params,
        encrypt_seconds=0.0,
        aggregate_seconds=aggregate,
        decrypt_seconds=0.0,
        max_rel_error=_max_rel_error(avg, reference),
    )


# --- (b) FLARE's HE --------------------------------------------------------------------------------
def _flare_ctx(site: str | None = None):
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext

    ctx = FLContext()
    ctx.set_prop(FLContextKey.SECURE_MODE, False, private=True, sticky=False)
    if site is not None:
        peer = FLContext()
        peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
        ctx.set_peer_context(peer)
        ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    return ctx


@contextlib.contextmanager
def _flare_startup_kit(startup: Path) -> Iterator[None]:
    from nvflare.fuel.sec.security_content_service import SecurityContentService as Service

    saved = (Service.security_content_manager, Service.content_folder)
    Service.security_content_manager = None
    Service.initialize(content_folder=str(startup))
    try:
        yield
    finally:
        Service.security_content_manager, Service.content_folder = saved


def _bench_flare(updates, weights, reference, params: int, workdir: Path) -> dict:
    import tenseal as ts
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.app_common.app_constant import AppConstants
    from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
    from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
    from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
    from nvflare.fuel.utils import fobs
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder()  # FLARE's provisioning defaults
    builder.initialize(None, None)  # builds the TenSEAL context; project/provision args are unused
    startup = workdir / "flare" / "startup"
    startup.mkdir(parents=True)
    (startup / "client_context.tenseal").write_bytes(builder.get_serialized_context(is_client=True))
    (startup / "server_context.tenseal").write_bytes(builder.get_serialized_context(is_client=False))

    names = [f"site-{i + 1}" for i in range(len(updates))]
    encryptors = {s: HEModelEncryptor() for s in names}  # weigh_by_local_iter: weight before encryption
    decryptor = HEModelDecryptor()
    aggregator = HEInTimeAccumulateWeightedAggregator(weigh_by_local_iter=False)
    server_ctx = _flare_ctx()
    server_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    with _flare_startup_kit(startup):
        for site, enc in encryptors.items():
            enc.handle_event(EventType.START_RUN, _flare_ctx(site))
        decryptor.handle_event(EventType.START_RUN, _flare_ctx(names[0]))
        aggregator.handle_event(EventType.START_RUN, server_ctx)

    wires, enc_times, ct_bytes = [], [], 0
    with _quiet():
        for site, update, weight in zip(names, updates, weights, strict=True):
            dxo = DXO(DataKind.WEIGHT_DIFF, data=dict(update), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weight})
            shareable = dxo.to_shareable()
            start = time.perf_counter()
            encrypted = encryptors[site].process_dxo(dxo, shareable, _flare_ctx(site))
            out = encrypted.to_shareable()
            out.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
            wire = fobs.dumps(out)
            enc_times.append(time.perf_counter() - start)
            if site == names[0]:
                ct_bytes = sum(len(v.serialize()) for v in encrypted.data.values() if isinstance(v, ts.CKKSVector))
            wires.append((site, wire))

        start = time.perf_counter()
        for site, wire in wires:
            incoming = fobs.loads(wire)
            incoming.set_peer_props({ReservedKey.IDENTITY_NAME: site})
            if not aggregator.accept(incoming, server_ctx):
                raise RuntimeError(f"FLARE's HE aggregator refused {site}'s update")
        back = fobs.dumps(aggregator.aggregate(server_ctx))
        aggregate = time.perf_counter() - start

        start = time.perf_counter()
        shareable = fobs.loads(back)
        dxo = decryptor.process_dxo(from_shareable(shareable), shareable, _flare_ctx(names[0]))
        avg = {k: np.asarray(v, dtype=np.float64) for k, v in dxo.data.items()}
        decrypt = time.perf_counter() - start

    return _result(
        "flare_he",
        params,
        len(updates),
        bytes_per_param=len(wires[0][1]) / params,
        ciphertext_bytes_per_param=ct_bytes / params,
        download_bytes_per_param=len(back) / params,
        encrypt_seconds=float(np.mean(enc_times)),
        aggregate_seconds=aggregate,
        decrypt_seconds=decrypt,
        max_rel_error=_max_rel_error(avg, reference),
        ciphertexts_per_update=sum(-(-v.size // (builder.poly_modulus_degree // 2)) for v in updates[0].values()),
        context={
            "poly_modulus_degree": builder.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(builder.coeff_mod_bit_sizes),
            "global_scale_bits": builder.scale_bits,
            "encryption": "symmetric, one TenSEAL vector per layer",
        },
    )


# --- (c) clinfed ------------------------------------------------------------------------------------
def _bench_ours(updates, weights, reference, params: int, workdir: Path) -> dict:
    from nvflare.apis.dxo import DXO, DataKind, from_shareable
    from nvflare.fuel.utils import fobs

    from clinfed.he import (
        DEFAULT_PARAMS,
        EncryptedSum,
        context_fingerprint,
        decrypt_average,
        layout_from_json,
        layout_to_json,
        load_server_context,
        load_site_context,
        weighted_encrypt,
        write_context_pair,
    )

    site_file, server_file = workdir / "ours" / "site_context.tenseal", workdir / "ours" / "server_context.tenseal"
    write_context_pair(site_file, server_file, DEFAULT_PARAMS)
    names = [f"site-{i + 1}" for i in range(len(updates))]
    site_ctx, server_ctx = load_site_context(site_file), load_server_context(server_file)
    fingerprint = context_fingerprint(site_ctx)
    server_fingerprint = context_fingerprint(server_ctx)

    wires, enc_times, ct_bytes = [], [], 0
    for site, update, weight in zip(names, updates, weights, strict=True):
        start = time.perf_counter()
        cts, layout = weighted_encrypt(site_ctx, update, weight, sites=len(updates))
        data = {"ckks": cts, "layout": layout_to_json(layout), "fingerprint": fingerprint}
        wire = fobs.dumps(DXO(DataKind.WEIGHT_DIFF, data=data, meta={"weight": weight}).to_shareable())
        enc_times.append(time.perf_counter() - start)
        if site == names[0]:
            ct_bytes = sum(map(len, cts))
        wires.append((site, wire))

    start = time.perf_counter()
    acc = EncryptedSum(server_ctx, server_fingerprint)
    layout_json = ""
    for site, wire in wires:
        dxo = from_shareable(fobs.loads(wire))
        acc.add(site, dxo.data["ckks"], dxo.get_meta_prop("weight"), dxo.data["fingerprint"])
        layout_json = dxo.data["layout"]
    total_cts, total_weight, _ = acc.result()
    data = {"ckks": total_cts, "layout": layout_json, "fingerprint": server_fingerprint}
    back = fobs.dumps(DXO(DataKind.WEIGHTS, data=data, meta={"total_weight": total_weight}).to_shareable())
    aggregate = time.perf_counter() - start

    start = time.perf_counter()
    dxo = from_shareable(fobs.loads(back))
    avg = decrypt_average(
        site_ctx, dxo.data["ckks"], dxo.get_meta_prop("total_weight"), layout_from_json(dxo.data["layout"])
    )
    decrypt = time.perf_counter() - start

    return _result(
        "ours",
        params,
        len(updates),
        bytes_per_param=len(wires[0][1]) / params,
        ciphertext_bytes_per_param=ct_bytes / params,
        download_bytes_per_param=len(back) / params,
        encrypt_seconds=float(np.mean(enc_times)),
        aggregate_seconds=aggregate,
        decrypt_seconds=decrypt,
        max_rel_error=_max_rel_error(avg, reference),
        ciphertexts_per_update=len(total_cts),
        context={**DEFAULT_PARAMS.as_dict(), "encryption": "symmetric, seeded, whole model packed"},
    )


def run_he_bench(params: int = 1_000_000, sites: int = 3, seed: int = 0) -> dict:
    """Run one aggregation round per contender; returns ``{"plaintext", "flare_he", "ours"}`` dicts."""
    if sites < 1:
        raise ValueError(f"sites must be positive, got {sites}")
    model = bench_model(params, seed)
    updates = _site_updates(model, sites, seed)
    weights = _weights(sites)
    reference = _fedavg(updates, weights)
    with tempfile.TemporaryDirectory(prefix="clinfed-he-bench-") as tmp:
        work = Path(tmp)
        return {
            "plaintext": _bench_plaintext(updates, weights, reference, params),
            "flare_he": _bench_flare(updates, weights, reference, params, work),
            "ours": _bench_ours(updates, weights, reference, params, work),
        }


def format_table(result: dict) -> str:
    """One row per contender, then how ours compares with FLARE's HE and with plaintext."""
    header = (
        f"{'contender':<10} {'B/param':>8} {'ct B/p':>7} {'down B/p':>8} {'encrypt s':>9} "
        f"{'aggregate s':>11} {'decrypt s':>9} {'round s':>8} {'max rel err':>11}"
    )
    lines = [header, "-" * len(header)]
    for name, row in result.items():
        wire = row["bytes_per_param"]
        ct, down = row.get("ciphertext_bytes_per_param", wire), row.get("download_bytes_per_param", wire)
        lines.append(
            f"{name:<10} {wire:>8.2f} {ct:>7.2f} {down:>8.2f} {row['encrypt_seconds']:>9.3f} "
            f"{row['aggregate_seconds']:>11.3f} {row['decrypt_seconds']:>9.3f} {row['round_seconds']:>8.3f} "
            f"{row['max_rel_error']:>11.1e}"
        )
    first = next(iter(result.values()))
    lines.append(f"({first['params']:,} parameters, {first['sites']} sites; seconds: one site's encrypt/decrypt,")
    lines.append(" the server's aggregate for all sites; B/param: one site's FLARE-serialised update)")
    if "ours" in result and "flare_he" in result:
        ours, flare = result["ours"], result["flare_he"]
        line = (
            f"ours vs FLARE HE: {ours['bytes_per_param'] / flare['bytes_per_param']:.2f}x bytes, "
            f"{ours['round_seconds'] / flare['round_seconds']:.2f}x round time"
        )
        if "plaintext" in result:
            line += f"; vs plaintext: {ours['bytes_per_param'] / result['plaintext']['bytes_per_param']:.1f}x bytes"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":  # python -m clinfed.bench.he_bench [params] [sites]
    import json

    args = [int(a) for a in sys.argv[1:3]]
    outcome = run_he_bench(*args)
    print(format_table(outcome))
    print(json.dumps(outcome, indent=2))
