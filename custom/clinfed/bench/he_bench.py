"""One FedAvg round five ways, side by side: plaintext, FLARE's own HE, and clinfed's CKKS paths.

Contenders (``CONTENDERS``; ``contenders=`` picks some):

- ``plaintext``: float32 updates, weighted sum at the server (FLARE's plain FedAvg).
- ``flare_he``: FLARE's own HE, driven through its components (``HEModelEncryptor`` → fobs →
  ``HEInTimeAccumulateWeightedAggregator`` → fobs → ``HEModelDecryptor``) with real FLContext,
  Shareable and DXO objects and the context FLARE's ``HEBuilder`` provisions (N=8192, [60, 40, 40],
  2^40, symmetric), one TenSEAL vector per layer.
- ``ours``: the compact format on the grid tied to the update's own noise (``clinfed.he.compact``,
  ``CompactSpec.for_noise``: the federation's key, N=4096 [60 | 40], scale 2^15 per ciphertext; each
  site sends its share of the total weight times its *change* from the global model, stochastically
  rounded to δ = σ / (10·sites) with σ the update's per-coordinate noise std, four 10-bit fields per
  half slot, both halves of each slot, bit-packed seeded uploads: 16 384 values per ciphertext).
- ``ours_fixed``: the compact format on the fixed grid (``--he-format compact-fixed``): each site sends
  its share times its *model*, rounded to nearest on value_bound / 2^20, two 21-bit fields per half
  slot. Its pooled ``value_bound`` is the largest |value| any site sends (the tightest bound a job
  could set; the training jobs use a looser public 16, which costs precision in proportion) and
  ``max_sites`` is ``sites``.
- ``ours_secagg``: ``ours`` with secure aggregation as the training jobs run it (``clinfed.fl.secagg``):
  each upload masked for the round's member set (pairwise + self-masks on c0), every site's signed
  reveal collected after the uploads, the sum unmasked at the decrypting site. Its ``setup`` block is
  the once-per-run cost per site (X25519 key, kit signature, checking every other site's entry):
  seconds and bytes, which grow with the number of sites.
- ``ours_real``: clinfed's real-valued CKKS path, which the statistics jobs use (``weighted_encrypt``
  / ``EncryptedSum`` / ``decrypt_average``, same key, scale 2^36, seeded, the whole model packed into
  one vector, every decryption noise-flooded).
- ``ours_flare_params``: the real-valued path's code and wire format at FLARE's parameters (N=8192,
  [60, 40, 40], 2^40), so the ratio to FLARE splits into engineering (``flare_he`` →
  ``ours_flare_params``), parameter choice (→ ``ours_real``) and integer packing (→ ``ours``).

Every contender aggregates the same site updates (a layered float32 model of ``params`` values with
16-value biases and norm scales, as a MONAI-style CNN has; each site's is the global model plus
Gaussian noise of one std σ on every coordinate, as DP-SGD's noise is, σ = 1 % of the model's overall
std (``noise_std``), generated when that site encrypts so that memory does not grow with ``sites``). A round
streams: site i encrypts, the server ingests site i's upload, the update and the upload are
dropped, then site i+1; the server thus ingests ``sites`` distinct uploads. Each contender runs
``repeats`` rounds (≥ 3 by default), interleaved with the other contenders' so that background load
hits all alike, and reports per field:

- ``bytes_per_param``: bytes one site puts on the wire for its update, over the parameter count.
  Plaintext is float32 (4). For HE contenders it is the FLARE-serialised (``fobs``) Shareable that
  carries the update, i.e. what FLARE actually sends; ``ciphertext_bytes_per_param`` counts the
  ciphertexts alone, and ``download_bytes_per_param`` the aggregate sent back (fobs, same way).
- ``encrypt_seconds``: one site's weighting + encryption + serialisation, the mean over sites
  (sites run in parallel, so one site's time is what a round waits for).
- ``aggregate_seconds``: the server's work for all sites (deserialise, vet, add, serialise).
- ``decrypt_seconds``: one site's deserialisation + decryption + division.
- ``round_seconds``: the sum of the three, the HE cost on a round's critical path.
- ``max_rel_error``: max |aggregate − exact FedAvg| / max |exact FedAvg| (float64 reference).
- ``max_error_noise_std``: max |aggregate − exact FedAvg| in units of the updates' noise std σ.
- ``server_peak_rss_mb`` / ``site_peak_rss_mb``: peak resident memory while that role's code runs,
  *above* the process's resident memory at the start of the round (which holds the interpreter,
  FLARE, TenSEAL, keys, the global model and the float64 reference, common to all contenders). On
  Linux the kernel's high-water mark is reset (``/proc/self/clear_refs``) before each section and
  ``VmHWM`` read after it, so it is a true peak of the process during the section; elsewhere it falls
  back to the growth of ``ru_maxrss``, which cannot be reset and reads 0 when an earlier section
  peaked higher (``rss_method`` says which). The site's figure covers encrypting site 1's update
  (with that float32 update resident) and decrypting the aggregate (with the download resident);
  the server's covers ingesting each upload (with it resident, as an upload in flight is) and
  serialising the sum. All roles share one process: freed heap is handed back to the OS
  (``malloc_trim``) before the round and before decryption, but memory the allocator keeps can
  still hide part of a section's growth, so read them as lower bounds within a few MB.

Times, bytes and memory are the median over the repeats; ``max_rel_error`` the worst repeat;
``round_seconds_runs`` lists every repeat's round time.

FLARE's HE loads its context through ``SecurityContentService``, a process-wide singleton bound to
the first startup folder it sees; the bench points it at a temporary kit (written by FLARE's own
``HEBuilder``) for the START_RUN events and then restores whatever was there, so FLARE's own loader
(``load_tenseal_context_from_workspace``, in non-secure mode since the kit is unsigned) reads it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONTENDERS = ("plaintext", "flare_he", "ours", "ours_secagg", "ours_fixed", "ours_flare_params", "ours_real")
NOISE_FRACTION = 0.01  # each site's update: the global model plus N(0, σ) per coordinate, σ = 1 % of its std
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


def noise_std(model: dict[str, np.ndarray]) -> float:
    """σ: the per-coordinate noise std of every site's update, the same on every coordinate as DP-SGD's."""
    values = np.concatenate([v.reshape(-1) for v in model.values()]).astype(np.float64)
    return NOISE_FRACTION * (float(np.std(values)) or 1.0)


def _site_update(model: dict[str, np.ndarray], sigma: float, site: int, seed: int) -> dict[str, np.ndarray]:
    """Site ``site``'s model: the global one plus N(0, σ²) on every coordinate (reproducible)."""
    rng = np.random.default_rng([seed + 1, site])
    return {k: (v + rng.normal(0, sigma, v.shape)).astype(np.float32) for k, v in model.items()}


def _reference(model, sigma: float, weights: Sequence[float], seed: int) -> tuple[dict[str, np.ndarray], float]:
    """Exact FedAvg in float64, one site at a time; and the largest |value| any site sends."""
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in model.items()}
    peak = 0.0
    for i, w in enumerate(weights):
        update = _site_update(model, sigma, i, seed)
        for k, v in update.items():
            total[k] += w * v.astype(np.float64)
            peak = max(peak, float(np.max(np.abs(v))))
    whole = sum(weights)
    return {k: v / whole for k, v in total.items()}, peak


def _max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max |got − want|, max |want|)."""
    peak = max(float(np.max(np.abs(v))) for v in want.values())
    worst = max(
        float(np.max(np.abs(np.asarray(got[k], dtype=np.float64).reshape(v.shape) - v))) for k, v in want.items()
    )
    return worst, peak


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


# --- memory ------------------------------------------------------------------------------------------
class _Memory:
    """Peak resident memory of code sections (see the module docstring for what it does and does not see)."""

    def __init__(self) -> None:
        self.method = "ru_maxrss growth"
        try:
            self._reset()
            if self._status("VmHWM") is not None:
                self.method = "VmHWM after clear_refs reset"
        except OSError:
            pass

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return float(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    @staticmethod
    def _maxrss_mb() -> float:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0

    @staticmethod
    def trim() -> None:
        """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so that memory an
        earlier contender freed but the allocator kept does not hide the next section's growth."""
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).malloc_trim(0)

    def rss_mb(self) -> float:
        now = self._status("VmRSS")
        return now if now is not None else self._maxrss_mb()

    @contextlib.contextmanager
    def section(self) -> Iterator[list[float]]:
        """Yields a one-item list that holds the peak RSS (MB) of the section once it ends."""
        box = [0.0]
        if self.method.startswith("VmHWM"):
            self._reset()
        try:
            yield box
        finally:
            peak = self._status("VmHWM") if self.method.startswith("VmHWM") else None
            box[0] = peak if peak is not None else self._maxrss_mb()


# --- contenders ----------------------------------------------------------------------------------------
class _Contender:
    """One aggregation path, split into the roles' steps; subclasses fill them in."""

    name = ""
    timed_sites = True  # plaintext has no site-side crypto: its encrypt/decrypt seconds are 0

    def start_round(self) -> None:
        """Fresh server state for a round (not timed)."""

    def encrypt(self, site: str, update: dict[str, np.ndarray], weight: float) -> tuple[Any, int]:
        """(what the site sends, bytes of ciphertext in it)."""
        raise NotImplementedError

    def ingest(self, site: str, wire: Any) -> None:
        raise NotImplementedError

    def finish(self) -> Any:
        """The server's aggregate as sent back; drops the server state."""
        raise NotImplementedError

    def decrypt(self, back: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def size(self, wire: Any) -> int:
        return len(wire)

    def info(self) -> dict:
        return {}


class _Plaintext(_Contender):
    name = "plaintext"
    timed_sites = False

    def __init__(self, weights: Sequence[float]):
        self._weights = dict(zip((f"site-{i + 1}" for i in range(len(weights))), weights, strict=True))

    def start_round(self) -> None:
        self._sum: dict[str, np.ndarray] | None = None
        self._total = 0.0

    def encrypt(self, site, update, weight):
        return update, 0

    def ingest(self, site, wire):
        w = self._weights[site]
        if self._sum is None:
            self._sum = {k: w * v for k, v in wire.items()}
        else:
            for k, v in wire.items():
                self._sum[k] += w * v
        self._total += w

    def finish(self):
        out = {k: v / self._total for k, v in self._sum.items()}
        self._sum = None
        return out

    def decrypt(self, back):
        return back

    def size(self, wire) -> int:
        return sum(v.nbytes for v in wire.values())


class _FlareHE(_Contender):
    name = "flare_he"

    def __init__(self, sites: int, workdir: Path):
        from nvflare.apis.event_type import EventType
        from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
        from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
        from nvflare.lighter.impl.he import HEBuilder

        self.builder = HEBuilder()  # FLARE's provisioning defaults
        self.builder.initialize(None, None)  # builds the TenSEAL context; project/provision args are unused
        self.startup = workdir / "flare" / "startup"
        self.startup.mkdir(parents=True)
        (self.startup / "client_context.tenseal").write_bytes(self.builder.get_serialized_context(is_client=True))
        (self.startup / "server_context.tenseal").write_bytes(self.builder.get_serialized_context(is_client=False))
        self.names = [f"site-{i + 1}" for i in range(sites)]
        self.encryptors = {s: HEModelEncryptor() for s in self.names}  # weigh_by_local_iter: weight first
        self.decryptor = HEModelDecryptor()
        with _flare_startup_kit(self.startup), _quiet():
            for site, enc in self.encryptors.items():
                enc.handle_event(EventType.START_RUN, _flare_ctx(site))
            self.decryptor.handle_event(EventType.START_RUN, _flare_ctx(self.names[0]))
        self.ct_per_update = 0

    def start_round(self) -> None:
        from nvflare.apis.event_type import EventType
        from nvflare.app_common.app_constant import AppConstants
        from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator

        self.aggregator = HEInTimeAccumulateWeightedAggregator(weigh_by_local_iter=False)
        self.server_ctx = _flare_ctx()
        self.server_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
        with _flare_startup_kit(self.startup), _quiet():
            self.aggregator.handle_event(EventType.START_RUN, self.server_ctx)

    def encrypt(self, site, update, weight):
        import tenseal as ts
        from nvflare.apis.dxo import DXO, DataKind, MetaKey
        from nvflare.app_common.app_constant import AppConstants
        from nvflare.fuel.utils import fobs

        dxo = DXO(DataKind.WEIGHT_DIFF, data=dict(update), meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weight})
        with _quiet():
            encrypted = self.encryptors[site].process_dxo(dxo, dxo.to_shareable(), _flare_ctx(site))
            out = encrypted.to_shareable()
            out.add_cookie(AppConstants.CONTRIBUTION_ROUND, 0)
            wire = fobs.dumps(out)
        half = self.builder.poly_modulus_degree // 2
        self.ct_per_update = sum(-(-v.size // half) for v in update.values())
        return wire, sum(len(v.serialize()) for v in encrypted.data.values() if isinstance(v, ts.CKKSVector))

    def ingest(self, site, wire):
        from nvflare.apis.fl_constant import ReservedKey
        from nvflare.fuel.utils import fobs

        with _quiet():
            incoming = fobs.loads(wire)
            incoming.set_peer_props({ReservedKey.IDENTITY_NAME: site})
            if not self.aggregator.accept(incoming, self.server_ctx):
                raise RuntimeError(f"FLARE's HE aggregator refused {site}'s update")

    def finish(self):
        from nvflare.fuel.utils import fobs

        with _quiet():
            back = fobs.dumps(self.aggregator.aggregate(self.server_ctx))
        self.aggregator = None
        return back

    def decrypt(self, back):
        from nvflare.apis.dxo import from_shareable
        from nvflare.fuel.utils import fobs

        with _quiet():
            shareable = fobs.loads(back)
            dxo = self.decryptor.process_dxo(from_shareable(shareable), shareable, _flare_ctx(self.names[0]))
        return {k: np.asarray(v, dtype=np.float64) for k, v in dxo.data.items()}

    def info(self) -> dict:
        return {
            "ciphertexts_per_update": self.ct_per_update,
            "context": {
                "poly_modulus_degree": self.builder.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.builder.coeff_mod_bit_sizes),
                "global_scale_bits": self.builder.scale_bits,
                "encryption": "symmetric, one TenSEAL vector per layer",
            },
        }


class _Ours(_Contender):
    """clinfed's real-valued path (``ours_real``), or its code at FLARE's parameters (``ours_flare_params``)."""

    def __init__(self, name: str, params, sites: int, workdir: Path):
        from clinfed.he import context_fingerprint, load_server_context, load_site_context, write_context_pair

        self.name, self.params, self.sites = name, params, sites
        folder = workdir / name
        folder.mkdir(parents=True)
        write_context_pair(folder / "site_context.tenseal", folder / "server_context.tenseal", params)
        self.site_ctx = load_site_context(folder / "site_context.tenseal")
        self.server_ctx = load_server_context(folder / "server_context.tenseal")
        self.fingerprint = context_fingerprint(self.site_ctx)
        self.server_fingerprint = context_fingerprint(self.server_ctx)
        self.ct_per_update = 0

    def start_round(self) -> None:
        from clinfed.he import EncryptedSum

        self.acc = EncryptedSum(self.server_ctx, self.server_fingerprint)
        self.layout_json = ""

    def encrypt(self, site, update, weight):
        from nvflare.apis.dxo import DXO, DataKind
        from nvflare.fuel.utils import fobs

        from clinfed.he import layout_to_json, weighted_encrypt

        cts, layout = weighted_encrypt(self.site_ctx, update, weight, sites=self.sites)
        data = {"ckks": cts, "layout": layout_to_json(layout), "fingerprint": self.fingerprint}
        self.ct_per_update = len(cts)
        return fobs.dumps(DXO(DataKind.WEIGHT_DIFF, data=data, meta={"weight": weight}).to_shareable()), sum(
            map(len, cts)
        )

    def ingest(self, site, wire):
        from nvflare.apis.dxo import from_shareable
        from nvflare.fuel.utils import fobs

        dxo = from_shareable(fobs.loads(wire))
        self.acc.add(site, dxo.data["ckks"], dxo.get_meta_prop("weight"), dxo.data["fingerprint"])
        self.layout_json = dxo.data["layout"]

    def finish(self):
        from nvflare.apis.dxo import DXO, DataKind
        from nvflare.fuel.utils import fobs

        total_cts, total_weight, _ = self.acc.result()
        self.acc = None
        data = {"ckks": total_cts, "layout": self.layout_json, "fingerprint": self.server_fingerprint}
        return fobs.dumps(DXO(DataKind.WEIGHTS, data=data, meta={"total_weight": total_weight}).to_shareable())

    def decrypt(self, back):
        from nvflare.apis.dxo import from_shareable
        from nvflare.fuel.utils import fobs

        from clinfed.he import decrypt_average, layout_from_json

        dxo = from_shareable(fobs.loads(back))
        return decrypt_average(
            self.site_ctx, dxo.data["ckks"], dxo.get_meta_prop("total_weight"), layout_from_json(dxo.data["layout"])
        )

    def info(self) -> dict:
        return {
            "ciphertexts_per_update": self.ct_per_update,
            "context": {**self.params.as_dict(), "encryption": "symmetric, seeded, whole model packed"},
        }


class _OursCompact(_Ours):
    """The training jobs' compact format (``clinfed.he.compact``) on the federation's own key: on the
    noise-tied grid (``spec.stochastic``) each site sends its change from the ``base`` (global) model,
    and the decrypting site adds the average change back; on the fixed grid, its model."""

    def __init__(self, spec, weights: Sequence[float], workdir: Path, name: str = "ours", base=None):
        from clinfed.he import DEFAULT_PARAMS

        super().__init__(name, DEFAULT_PARAMS, spec.max_sites, workdir)
        self.spec, self.base = spec, base if spec.stochastic else None
        self.spec_json = self.spec.to_json()
        self.whole = float(sum(weights))  # the admitted sites' total: each site sends its share
        self.clamped = 0

    def _outgoing(self, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the site encrypts: its change from the global model, clamped to the grid's range."""
        from clinfed.he.compact import clamp_update

        if self.base is None:
            return update
        change, clamped = clamp_update({k: v - self.base[k] for k, v in update.items()}, self.spec)
        self.clamped += clamped
        return change

    def _incoming(self, avg: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.base is None:
            return avg
        return {k: (self.base[k] + v).astype(self.base[k].dtype) for k, v in avg.items()}

    def start_round(self) -> None:
        from clinfed.he.compact import CompactSum

        self.acc = CompactSum(self.server_ctx, self.spec, self.server_fingerprint)
        self.layout_json = ""

    def encrypt(self, site, update, weight):
        from nvflare.apis.dxo import DXO, DataKind
        from nvflare.fuel.utils import fobs

        from clinfed.he import layout_to_json
        from clinfed.he.compact import compact_encrypt

        share = weight / self.whole
        cts, layout = compact_encrypt(self.site_ctx, self._outgoing(update), share, self.spec)
        data = {"ckks": cts, "layout": layout_to_json(layout), "fingerprint": self.fingerprint, "spec": self.spec_json}
        self.ct_per_update = len(cts)
        return fobs.dumps(DXO(DataKind.WEIGHT_DIFF, data=data, meta={"weight": share}).to_shareable()), sum(
            map(len, cts)
        )

    def ingest(self, site, wire):
        from nvflare.apis.dxo import from_shareable
        from nvflare.fuel.utils import fobs

        dxo = from_shareable(fobs.loads(wire))
        self.acc.add(site, dxo.data["ckks"], dxo.get_meta_prop("weight"), dxo.data["fingerprint"], dxo.data["spec"])
        self.layout_json = dxo.data["layout"]

    def decrypt(self, back):
        from nvflare.apis.dxo import from_shareable
        from nvflare.fuel.utils import fobs

        from clinfed.he import layout_from_json
        from clinfed.he.compact import compact_decrypt_average

        dxo = from_shareable(fobs.loads(back))
        layout = layout_from_json(dxo.data["layout"])
        return self._incoming(
            compact_decrypt_average(
                self.site_ctx, dxo.data["ckks"], dxo.get_meta_prop("total_weight"), layout, self.spec
            )
        )

    def info(self) -> dict:
        return {
            "ciphertexts_per_update": self.ct_per_update,
            "value_bound": self.spec.value_bound,
            "quantum": self.spec.quantum,
            "clamped_values": self.clamped,
            "context": {
                **self.spec.params.as_dict(),
                "max_sites": self.spec.max_sites,
                "pooled": True,
                "rounding": "stochastic" if self.spec.stochastic else "nearest",
                "sends": "change from the global model" if self.base is not None else "model",
                "encryption": "symmetric, seeded, integer fields, complex slots, bit-packed",
            },
        }


class _OursSecAgg(_OursCompact):
    """``ours`` plus secure aggregation: masked uploads, signed reveals, unmasking at the site."""

    def __init__(self, spec, weights: Sequence[float], workdir: Path, base=None):
        super().__init__(spec, weights, workdir, "ours_secagg", base)
        self.parties, self.setup = secagg_setup(spec.max_sites, workdir / "kits")
        self.round = -1

    def start_round(self) -> None:
        super().start_round()
        self.round += 1
        self.members = sorted(self.parties)

    def encrypt(self, site, update, weight):
        from nvflare.apis.dxo import DXO, DataKind
        from nvflare.fuel.utils import fobs

        from clinfed.he import layout_to_json
        from clinfed.he.compact import compact_encrypt
        from clinfed.he.masking import MaskedStream, ring_of

        mask = MaskedStream(self.parties[site].mask(self.round, "train", self.members, ring_of(self.site_ctx)))
        share = weight / self.whole
        cts, layout = compact_encrypt(self.site_ctx, self._outgoing(update), share, self.spec, mask=mask)
        data = {"ckks": cts, "layout": layout_to_json(layout), "fingerprint": self.fingerprint, "spec": self.spec_json}
        self.ct_per_update = len(cts)
        return fobs.dumps(DXO(DataKind.WEIGHT_DIFF, data=data, meta={"weight": share}).to_shareable()), sum(
            map(len, cts)
        )

    def finish(self):
        from nvflare.apis.dxo import DXO, DataKind
        from nvflare.fuel.utils import fobs

        from clinfed.fl.secagg import sum_info

        reveals = {s: p.reveal(self.round, "train", self.members) for s, p in self.parties.items()}
        total_cts, total_weight, _ = self.acc.result()
        self.acc = None
        data = {"ckks": total_cts, "layout": self.layout_json, "fingerprint": self.server_fingerprint}
        meta = {"total_weight": total_weight, "secagg_sum": sum_info(self.round, "train", self.members, reveals)}
        return fobs.dumps(DXO(DataKind.WEIGHTS, data=data, meta=meta).to_shareable())

    def decrypt(self, back):
        from nvflare.apis.dxo import from_shareable
        from nvflare.fuel.utils import fobs

        from clinfed.he import layout_from_json
        from clinfed.he.compact import compact_decrypt_average, compact_unmasked
        from clinfed.he.masking import MaskedStream, ring_of

        dxo = from_shareable(fobs.loads(back))
        decryptor = self.parties[self.members[0]]
        correction = MaskedStream(decryptor.correction(dxo.get_meta_prop("secagg_sum"), ring_of(self.site_ctx)))
        cts = compact_unmasked(self.site_ctx, dxo.data["ckks"], correction, self.spec.params)
        layout = layout_from_json(dxo.data["layout"])
        total = dxo.get_meta_prop("total_weight")
        return self._incoming(compact_decrypt_average(self.site_ctx, cts, total, layout, self.spec))

    def info(self) -> dict:
        return {**super().info(), "setup": self.setup}


def secagg_setup(sites: int, folder: Path) -> tuple[dict, dict]:
    """Secure aggregation's once-per-run setup for ``sites`` sites (simulated kits): the parties, and
    per site the seconds (X25519 key + kit signature, then checking every other site's certificate and
    signature and deriving the pair secrets) and bytes (its signed key up, the roster down)."""
    import json

    from clinfed.deploy.simkit import ensure_sim_kits
    from clinfed.fl.secagg import load_site

    names = [f"site-{i + 1}" for i in range(sites)]
    ensure_sim_kits(folder, names)
    start = time.perf_counter()
    parties = {s: load_site(folder / s, s, "bench") for s in names}
    roster = {s: p.hello() for s, p in parties.items()}
    hello_seconds = (time.perf_counter() - start) / sites
    start = time.perf_counter()
    for p in parties.values():
        p.join(roster)
    join_seconds = (time.perf_counter() - start) / sites
    up = float(np.mean([len(json.dumps(h)) for h in roster.values()]))
    return parties, {
        "sites": sites,
        "seconds_per_site": hello_seconds + join_seconds,
        "bytes_up_per_site": up,
        "bytes_down_per_site": float(len(json.dumps(roster))),
    }


# --- the round -----------------------------------------------------------------------------------------
def _round(c: _Contender, model, sigma: float, weights, seed: int, reference, mem: _Memory) -> dict:
    """One streamed round of contender ``c``: per-role times, bytes, peak memory and error."""
    names = [f"site-{i + 1}" for i in range(len(weights))]
    c.start_round()
    mem.trim()
    base = mem.rss_mb()
    enc_times: list[float] = []
    aggregate = 0.0
    site_peak = server_peak = 0.0
    up = ct_bytes = 0
    for i, (site, weight) in enumerate(zip(names, weights, strict=True)):
        update = _site_update(model, sigma, i, seed)
        with mem.section() as peak:
            start = time.perf_counter()
            wire, cts = c.encrypt(site, update, weight)
            enc_times.append(time.perf_counter() - start)
        if i == 0:
            site_peak, up, ct_bytes = peak[0] - base, c.size(wire), cts
        del update
        with mem.section() as peak:
            start = time.perf_counter()
            c.ingest(site, wire)
            aggregate += time.perf_counter() - start
        server_peak = max(server_peak, peak[0] - base)
        del wire
    with mem.section() as peak:
        start = time.perf_counter()
        back = c.finish()
        aggregate += time.perf_counter() - start
    server_peak = max(server_peak, peak[0] - base)
    mem.trim()
    with mem.section() as peak:
        start = time.perf_counter()
        avg = c.decrypt(back)
        decrypt = time.perf_counter() - start
    site_peak = max(site_peak, peak[0] - base)
    params = sum(v.size for v in model.values())
    worst, peak = _max_error(avg, reference)
    row = {
        "bytes_per_param": up / params,
        "download_bytes_per_param": c.size(back) / params,
        "encrypt_seconds": float(np.mean(enc_times)) if c.timed_sites else 0.0,
        "aggregate_seconds": aggregate,
        "decrypt_seconds": decrypt if c.timed_sites else 0.0,
        "max_rel_error": worst / peak,
        "max_error_noise_std": worst / sigma,
        "server_peak_rss_mb": max(server_peak, 0.0),
        "site_peak_rss_mb": max(site_peak, 0.0),
    }
    if ct_bytes:
        row["ciphertext_bytes_per_param"] = ct_bytes / params
    return row


def _parse_contenders(contenders: str | Sequence[str] | None) -> list[str]:
    if contenders is None:
        return list(CONTENDERS)
    names = [n.strip() for n in contenders.split(",")] if isinstance(contenders, str) else list(contenders)
    names = [n for n in names if n]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown or not names:
        raise ValueError(f"unknown contender(s) {unknown or names}; choose from {', '.join(CONTENDERS)}")
    return [n for n in CONTENDERS if n in names]  # the table's order, each once


def run_he_bench(
    params: int = 1_000_000,
    sites: int = 3,
    seed: int = 0,
    contenders: str | Sequence[str] | None = None,
    repeats: int = 3,
) -> dict:
    """Run ``repeats`` streamed rounds per contender; returns ``{contender: row}`` in ``CONTENDERS`` order.

    ``contenders``: names or a comma-separated string (default: all). Each row has the fields the
    module docstring lists, medians over the repeats (``max_rel_error``: the worst repeat).
    """
    from clinfed.he.aggregation import MIN_CONTRIBUTORS
    from clinfed.he.params import CKKSParams

    if sites < 1:
        raise ValueError(f"sites must be positive, got {sites}")
    if repeats < 1:
        raise ValueError(f"repeats must be positive, got {repeats}")
    names = _parse_contenders(contenders)
    if sites < MIN_CONTRIBUTORS and any(n.startswith("ours") for n in names):
        raise ValueError(f"clinfed's sites refuse to decrypt a sum of fewer than {MIN_CONTRIBUTORS} updates")
    from clinfed.he.compact import CompactSpec

    model = bench_model(params, seed)
    sigma = noise_std(model)
    weights = _weights(sites)
    reference, peak_value = _reference(model, sigma, weights, seed)
    mem = _Memory()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="clinfed-he-bench-") as tmp:
        work = Path(tmp)
        built: dict[str, _Contender] = {}
        for name in names:
            if name == "plaintext":
                built[name] = _Plaintext(weights)
            elif name == "flare_he":
                built[name] = _FlareHE(sites, work)
            elif name == "ours":
                built[name] = _OursCompact(CompactSpec.for_noise(sigma, sites), weights, work, base=model)
            elif name == "ours_secagg":
                built[name] = _OursSecAgg(CompactSpec.for_noise(sigma, sites), weights, work, base=model)
            elif name == "ours_fixed":
                built[name] = _OursCompact(CompactSpec(peak_value, sites, pooled=True), weights, work, "ours_fixed")
            elif name == "ours_real":
                from clinfed.he import DEFAULT_PARAMS

                built[name] = _Ours(name, DEFAULT_PARAMS, sites, work)
            else:
                built[name] = _Ours(name, CKKSParams(8192, (60, 40, 40), 40), sites, work)
        for _ in range(repeats):
            for name in names:
                runs[name].append(_round(built[name], model, sigma, weights, seed, reference, mem))
        out = {}
        for name in names:
            rows = runs[name]
            row: dict[str, Any] = {
                "contender": name, "params": params, "sites": sites, "repeats": repeats, "noise_std": sigma,
            }  # fmt: skip
            for key in rows[0]:
                values = [r[key] for r in rows]
                row[key] = max(values) if key.startswith("max_") else float(statistics.median(values))
            rounds = [r["encrypt_seconds"] + r["aggregate_seconds"] + r["decrypt_seconds"] for r in rows]
            row["round_seconds"] = row["encrypt_seconds"] + row["aggregate_seconds"] + row["decrypt_seconds"]
            row["round_seconds_runs"] = rounds
            row["rss_method"] = mem.method
            row.update(built[name].info())
            out[name] = row
        return out


def format_table(result: dict) -> str:
    """One row per contender, then how ours compares with FLARE's HE and with plaintext."""
    header = (
        f"{'contender':<17} {'B/param':>8} {'ct B/p':>7} {'down B/p':>8} {'encrypt s':>9} {'aggregate s':>11} "
        f"{'decrypt s':>9} {'round s':>8} {'max rel err':>11} {'err/σ':>7} {'server MB':>9} {'site MB':>8}"
    )
    lines = [header, "-" * len(header)]
    for name, row in result.items():
        wire = row["bytes_per_param"]
        ct, down = row.get("ciphertext_bytes_per_param", wire), row.get("download_bytes_per_param", wire)
        lines.append(
            f"{name:<17} {wire:>8.2f} {ct:>7.2f} {down:>8.2f} {row['encrypt_seconds']:>9.3f} "
            f"{row['aggregate_seconds']:>11.3f} {row['decrypt_seconds']:>9.3f} {row['round_seconds']:>8.3f} "
            f"{row['max_rel_error']:>11.1e} {row.get('max_error_noise_std', math.nan):>7.3f} "
            f"{row.get('server_peak_rss_mb', math.nan):>9.1f} "
            f"{row.get('site_peak_rss_mb', math.nan):>8.1f}"
        )
    first = next(iter(result.values()))
    repeats = first.get("repeats", 1)
    lines.append(
        f"({first['params']:,} parameters, {first['sites']} sites, median of {repeats} round(s); seconds: one "
        "site's encrypt/decrypt, the server's aggregate for all sites;"
    )
    lines.append(
        " B/param: one site's FLARE-serialised update; err/σ: max error in the updates' noise std; "
        "MB: peak RSS above the round's start, per role)"
    )
    flare = result.get("flare_he")
    for name in ("ours", "ours_secagg", "ours_fixed", "ours_flare_params", "ours_real"):
        if name in result and flare is not None:
            ours = result[name]
            line = (
                f"{name} vs FLARE HE: {ours['bytes_per_param'] / flare['bytes_per_param']:.2f}x bytes, "
                f"{ours['round_seconds'] / flare['round_seconds']:.2f}x round time"
            )
            if "plaintext" in result:
                line += f"; vs plaintext: {ours['bytes_per_param'] / result['plaintext']['bytes_per_param']:.2f}x bytes"
            lines.append(line)
    setup = (result.get("ours_secagg") or {}).get("setup")
    if setup:
        lines.append(
            f"ours_secagg setup, once per run: {setup['seconds_per_site']:.3f} s per site, "
            f"{setup['bytes_up_per_site']:,.0f} B up and {setup['bytes_down_per_site']:,.0f} B down per site "
            f"({setup['sites']} sites)"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m clinfed.bench.he_bench [params] [sites] [contenders] [repeats]
    import json

    argv = sys.argv[1:]
    outcome = run_he_bench(
        params=int(argv[0]) if argv else 1_000_000,
        sites=int(argv[1]) if len(argv) > 1 else 3,
        contenders=argv[2] if len(argv) > 2 else None,
        repeats=int(argv[3]) if len(argv) > 3 else 3,
    )
    print(format_table(outcome))
    print(json.dumps(outcome, indent=2))
