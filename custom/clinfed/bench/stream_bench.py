"""`clinfed bench stream`: a model-sized encrypted update through a real FLARE federation (issue 14).

`bench he` times the arithmetic in one process; this runs the product's own path end to end in
FLARE's simulator (one process per site, cellnet between them): the `SecureFedAvg` controller,
`fl.streaming` over FLARE's download service, CKKS at the sites in the training jobs' compact format
(`he.compact`, the job's spec and the admitted weight from the controller), one round, then every site pulls
and decrypts the global sum. No training: each site sends a seeded random update of ``params``
float32 values (a stand-in for a 500 MB UNet's update; DP-SGD on such a model is not what is being
measured), so every site can also recompute the exact average and report the decryption's error.

With ``compression`` F (`clinfed bench stream --compression F`) each site sends only the k = ⌈F·P⌉
values at a set of coordinates every site draws from one public seed, in the compressed wire format
(`he.truncated`: k values in the first ⌈(k+1)/2⌉ coefficients of one ciphertext's c0 per 2·N values),
and checks the decrypted sum at those coordinates; `upload_bytes_ratio` is its upload against the
dense compact upload of all P values. (The coordinates, error feedback and top-k of a training run
are `clinfed.fl.compression`'s; here the transport and the cryptography are what is measured.)

Reported per role: wall seconds of each phase, bytes pulled per site, download-service messages,
and the peak resident memory of each process (`ru_maxrss`), i.e. what a hospital's machine and the
server need for a model of that size.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from clinfed.fl import payload, streaming
from clinfed.fl.participant import participant_root, site_context, site_index
from clinfed.fl.secagg import HELLO_KEY, REVEAL_TASK, SECAGG_KEY, SUM_KEY, load_site
from clinfed.he.masking import MaskedStream, ring_of
from clinfed.sysinfo import peak_rss_mb, release_free_memory

LAYER = "update"
SCALE = 0.1  # magnitude of the synthetic update: a trained layer's weights (FedAvg averages weights)
VALUE_BOUND = 1.0  # the job's public bound on |value| (10 σ of the synthetic update)


def bench_indices(params: int, fraction: float) -> np.ndarray:
    """The k = ⌈fraction·params⌉ coordinates every site sends (sorted; one public seed for all)."""
    k = min(params, max(1, int(np.ceil(fraction * params))))
    return np.sort(np.random.default_rng(20_250).choice(params, size=k, replace=False))


def synthetic_update(index: int, params: int) -> np.ndarray:
    """Site ``index``'s stand-in update: seeded, so every site can recompute the true average."""
    update = np.random.default_rng(10_000 + index).standard_normal(params, dtype=np.float32)
    update *= SCALE  # in place: the site holds one float32 copy, as a trained model's would be
    return update


class StreamBenchExecutor(Executor):
    """A site that sends one encrypted, streamed update of ``params`` values and checks the sum it gets back."""

    def __init__(self, params: int, num_sites: int, compression: float = 0.0):
        super().__init__()
        self.params, self.num_sites, self.compression = int(params), int(num_sites), float(compression)
        self._secagg = None  # secure aggregation, as every training site runs it (`clinfed.fl.secagg`)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        site = fl_ctx.get_identity_name()
        root = participant_root(fl_ctx)
        cell = fl_ctx.get_engine().get_cell()
        spool_dir = root / "spool"
        spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        incoming = FLModelUtils.from_shareable(shareable)
        if self._secagg is None:
            self._secagg = load_site(root, site, str(incoming.meta.get("run_key", "")))
        if task_name == payload.ADMIT_TASK:
            meta = {"status": "accepted", "weight": 1.0, HELLO_KEY: self._secagg.hello()}
            return FLModelUtils.to_shareable(FLModel(params={}, meta=meta))
        ctx, fingerprint = site_context(root, site)
        info = incoming.meta.get(SECAGG_KEY) or {}
        self._secagg.join(info.get("roster"))
        if task_name == REVEAL_TASK:
            reveal = self._secagg.reveal(0, "train", list(info["members"]))
            return FLModelUtils.to_shareable(FLModel(params={}, meta={"status": "ok", "reveal": reveal}))
        if task_name == payload.TRAIN_TASK:
            spec = str(incoming.meta[payload.COMPACT_KEY])
            share = 1.0 / float(incoming.meta[payload.ADMITTED_WEIGHT_KEY])
            mask = self._secagg.mask(0, "train", list(info["members"]), ring_of(ctx))
            return self._send(site, ctx, fingerprint, cell, spool_dir, spec, share, MaskedStream(mask))
        if task_name == payload.VALIDATE_TASK:
            return self._check(site, ctx, cell, spool_dir, incoming, abort_signal)
        return make_reply(ReturnCode.TASK_UNKNOWN)

    def _send(
        self, site: str, ctx, fingerprint: str, cell, spool_dir: Path, spec: str, share: float, mask
    ) -> Shareable:
        from clinfed.he.compact import CompactSpec, compact_encrypt
        from clinfed.he.packing import layout_to_json

        update = synthetic_update(site_index(site) or 0, self.params)
        start = time.monotonic()
        spool = streaming.Spool(spool_dir)
        extra: dict = {}
        if self.compression:
            from clinfed.he.packing import layout_of
            from clinfed.he.truncated import dense_compact_upload_bytes, truncated_encrypt

            values = update[bench_indices(self.params, self.compression)].astype(np.float64)
            del update
            compact = CompactSpec.from_json(spec)
            truncated_encrypt(ctx, values, share, compact, into=spool, mask=mask)
            layout = layout_of({LAYER: values})
            extra = {
                payload.DIGEST_KEY: f"bench-{self.compression!r}",  # the same coordinates at every site
                "compression": {
                    "fraction": self.compression, "k": int(values.size), "k_nominal": int(values.size),
                    "size": self.params, "format": "truncated", "ciphertexts": len(spool),
                    "dense_ciphertexts": -(-(self.params + 1) // compact.params.values_per_ciphertext),
                    "dense_upload_bytes": dense_compact_upload_bytes(self.params, compact.params),
                },
            }  # fmt: skip
        else:
            _, layout = compact_encrypt(ctx, {LAYER: update}, share, CompactSpec.from_json(spec), into=spool, mask=mask)
            del update
        seconds = time.monotonic() - start
        release_free_memory()
        params = payload.encrypted_params(spool, layout_to_json(layout), fingerprint, spec)
        nbytes = spool.nbytes
        if streaming.worth_streaming(spool):
            params = streaming.offer(cell, params, ["server"], spool.close)
        else:  # a small compressed update rides in the reply, as the training executor sends it
            params[payload.CKKS_KEY] = streaming.into_memory(spool)
        metrics = {"encrypt_seconds": seconds, "upload_bytes": nbytes, "peak_rss_mb": peak_rss_mb()}
        meta = {"status": "ok", "weight": share, "bytes_sent": nbytes, "metrics": metrics, **extra}
        return FLModelUtils.to_shareable(FLModel(params=params, meta=meta))

    def _check(self, site: str, ctx, cell, spool_dir: Path, incoming: FLModel, abort_signal: Signal) -> Shareable:
        from clinfed.he.compact import CompactSpec, compact_decrypt_average, compact_unmasked
        from clinfed.he.packing import layout_from_json

        start = time.monotonic()
        if streaming.is_streamed(incoming.params):
            params, transfer = streaming.receive(cell, incoming.params, "server", spool_dir, abort_signal)
        else:  # a small sum rides inline in the task (`streaming.worth_streaming`)
            params = incoming.params
            transfer = {"bytes": sum(len(c) for c in params[payload.CKKS_KEY])}
        pulled = time.monotonic() - start
        try:
            layout = layout_from_json(params[payload.LAYOUT_KEY])
            total = float(incoming.meta["total_weight"])
            start = time.monotonic()
            spec = CompactSpec.from_json(str(params[payload.COMPACT_KEY]))
            correction = MaskedStream(self._secagg.correction(incoming.meta.get(SUM_KEY), ring_of(ctx)))
            if self.compression:
                from clinfed.he.truncated import truncated_decrypt_average, truncated_unmasked

                cts = truncated_unmasked(ctx, params[payload.CKKS_KEY], correction)
                got = truncated_decrypt_average(ctx, cts, layout.size, total, spec)
            else:
                cts = compact_unmasked(ctx, params[payload.CKKS_KEY], correction)
                got = compact_decrypt_average(ctx, cts, total, layout, spec)[LAYER]  # float32
            decrypt_seconds = time.monotonic() - start
            site_peak = peak_rss_mb()  # through encrypt, pull and decrypt; the check below is the bench's own
        finally:
            streaming.release(params)
        idx = bench_indices(self.params, self.compression) if self.compression else slice(None)
        want = np.zeros(got.size, dtype=np.float64)
        for i in range(self.num_sites):
            want += synthetic_update(i, self.params)[idx]
        want /= self.num_sites
        error = float(np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want)))
        metrics = {
            "download_bytes": transfer["bytes"],
            "download_seconds": pulled,
            "decrypt_seconds": decrypt_seconds,
            "max_rel_error": error,
            "peak_rss_mb": site_peak,
            "check_peak_rss_mb": peak_rss_mb(),
        }
        return FLModelUtils.to_shareable(FLModel(metrics=metrics, meta={"status": "ok"}))


def _sent(entry: dict) -> float:
    """Bytes one site uploaded: its stream's, or (a small update rides inline) what it reported."""
    return float(entry.get("stream", {}).get("bytes", entry.get("bytes_sent", 0)))


def run_stream_bench(params: int, sites: int, out: str | Path | None = None, compression: float = 0.0) -> dict:
    """One round of a ``params``-value encrypted update from ``sites`` sites in FLARE's simulator
    (``compression`` F: only ⌈F·params⌉ values each, in the compressed wire format)."""
    import secrets

    from nvflare.job_config.api import FedJob

    from clinfed.fl.controller import SecureFedAvg
    from clinfed.simulate import SimulationRequest, run_simulation

    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="clinfed-stream-"))
    job = FedJob(name="stream_bench", min_clients=sites)
    job.set_app_packages(["clinfed"])
    job.to_server(
        SecureFedAvg(
            num_rounds=1,
            min_clients=sites,
            encrypted=True,
            job_label="stream_bench",
            primary_metric="max_rel_error",
            submission=secrets.token_hex(8),
            value_bound=VALUE_BOUND,
            compression=compression,
        ),
        id="controller",
    )
    job.to_clients(
        StreamBenchExecutor(params, sites, compression),
        id="executor",
        tasks=[payload.ADMIT_TASK, payload.TRAIN_TASK, payload.VALIDATE_TASK, REVEAL_TASK],
    )
    from nvflare.recipe.spec import Recipe

    started = time.monotonic()
    # every site process at once: the server pulls each upload from its site after the task returns, which a
    # site that took its turn and left (past MAX_PARALLEL_SITES) can no longer serve; no training here, so
    # a site holds ~130 MB plus its model
    request = SimulationRequest(job="stream_bench", sites=sites, out=out, parallel=sites)
    summary = run_simulation(request, recipe=Recipe(job))
    wall = time.monotonic() - started
    rnd = summary["rounds"][0]
    ups = {s: e for s, e in rnd["sites"].items()}  # a small upload rides inline: no "stream" entry
    checks = summary["final"]["per_site"]
    result = {
        "params": params,
        "sites": sites,
        "wall_seconds": wall,
        "all_ok": all(e["status"] == "ok" for e in ups.values()) and len(checks) == sites,
        "upload_bytes_per_param": float(np.mean([_sent(e) for e in ups.values()])) / params,
        "download_bytes_per_param": float(np.mean([m["download_bytes"] for m in checks.values()])) / params,
        "messages_per_upload": float(np.mean([e.get("stream", {}).get("messages", 1) for e in ups.values()])),
        "encrypt_seconds": float(np.median([e["metrics"]["encrypt_seconds"] for e in ups.values()])),
        "aggregate_seconds": rnd.get("aggregate_seconds"),
        "download_seconds": float(np.median([m["download_seconds"] for m in checks.values()])),
        "decrypt_seconds": float(np.median([m["decrypt_seconds"] for m in checks.values()])),
        "max_rel_error": float(max(m["max_rel_error"] for m in checks.values())),
        "server_peak_rss_mb": rnd.get("server_peak_rss_mb"),
        "site_peak_rss_mb": float(max(m["peak_rss_mb"] for m in checks.values())),
        "model_mb": params * 4 / 2**20,
    }
    if compression:
        from clinfed.he.compact import COMPACT_PARAMS
        from clinfed.he.truncated import dense_compact_upload_bytes

        dense = dense_compact_upload_bytes(params, COMPACT_PARAMS)
        result["compression"] = compression
        result["k"] = int(summary["compression"]["k"]) if summary.get("compression") else None
        result["dense_upload_bytes"] = dense
        result["upload_bytes_ratio"] = float(np.mean([_sent(e) for e in ups.values()])) / dense
    (out / "stream_bench.json").write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict) -> str:
    r = result
    lines = [
        f"stream bench: {r['params']:,} parameters ({r['model_mb']:.0f} MB float32) x {r['sites']} sites, one "
        f"round through FLARE's simulator: {'all ok' if r['all_ok'] else 'NOT ALL OK'}, {r['wall_seconds']:.0f} s wall",
        f"  upload {r['upload_bytes_per_param']:.2f} B/param in {r['messages_per_upload']:.0f} messages per site; "
        f"download {r['download_bytes_per_param']:.2f} B/param",
        f"  site: encrypt {r['encrypt_seconds']:.1f} s, pull {r['download_seconds']:.1f} s, decrypt "
        f"{r['decrypt_seconds']:.1f} s; server: aggregate {r['aggregate_seconds'] or 0:.1f} s",
        f"  peak memory: server {r['server_peak_rss_mb'] or 0:.0f} MB, largest site {r['site_peak_rss_mb']:.0f} MB; "
        f"max rel. error {r['max_rel_error']:.1e}",
    ]
    if r.get("compression"):
        lines.insert(
            -1,
            f"  compression F = {r['compression']:g}: k = {r['k']:,} values, upload {r['upload_bytes_ratio']:.2%} "
            f"of the dense compact upload ({r['dense_upload_bytes']:,} B)",
        )
    return "\n".join(lines)
