"""Local DP-SGD at a site: plain PyTorch around the objects Opacus' `make_private` hands back.

One `SiteTrainer` lives for the whole job at a site. It calls `PrivacyEngine.make_private` once, so
Opacus' accountant sees every step of every round (one accountant per site, never reset between
rounds); each round the global weights are loaded into the wrapped module (`model._module`).

The noise multiplier is fixed once per job from the site's target ε over the *planned* number of
steps (rounds × local epochs × batches per epoch), with Opacus' own `get_noise_multiplier`.

Randomness: the job's `seed` fixes only the model initialisation (all sites must start from the same
weights) and nothing a privacy proof relies on. DP-SGD's Gaussian noise and the Poisson sampling of
batches draw from two `torch.Generator`s seeded with 64 bits of fresh OS entropy (`secrets`) in each
site process, so nobody holding the job config can regenerate the noise and subtract it, and a second
run (or a resumed one) never replays the first run's noise. Opacus' `secure_mode` would use
torchcsprng's /dev/urandom generator instead, but torchcsprng has no build for our torch (2.13):
the OS-seeded Mersenne Twister is the best available; its state stays inside the site process.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

import clinfed.per_sample_grads  # noqa: F401  (registers exact, cheaper per-sample gradient samplers with Opacus)
from clinfed.tasks.base import SiteData, Task


@dataclass
class TrainConfig:
    """Local optimisation settings; JSON-serialisable so they can travel in the job config."""

    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    optimizer: str = "sgd"  # "sgd" | "adam"
    momentum: float = 0.0
    seed: int = 0  # model initialisation only; never the DP noise or the batch sampling
    #: DP-SGD (hooks mode): run each sampled batch's forward and backward passes in chunks of this many
    #: samples (0: the whole batch at once; None: the task's `physical_batch`); the step, clipping,
    #: noise and accounting are unchanged (`hooks_backward`, which says why).
    physical_batch: int | None = None
    #: non-private training only: clip the batch gradient to this L2 norm before each step (None: no
    #: clipping). Why: a non-private baseline "with the same care" as DP-SGD may clip too, without noise,
    #: so a table can tell what clipping alone does from what noise costs (`clinfed bench baselines`).
    #: Under DP-SGD the per-sample clip is `DPConfig.max_grad_norm` and this is ignored.
    clip_norm: float | None = None


def os_seeded_generator() -> torch.Generator:
    """A generator seeded from the OS's entropy pool: private to this process, new for every job and restart."""
    return torch.Generator().manual_seed(secrets.randbits(63))


@dataclass
class DPConfig:
    """DP-SGD settings. `target_epsilon` is for this job at this site, δ per record."""

    enabled: bool = True
    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    #: Opacus' per-sample gradient engine: "hooks" (per-sample gradients materialised), "ghost"
    #: (fast gradient clipping: per-sample *norms* only, then a second, reweighted backward pass) or
    #: "auto" (the task's `grad_sample_mode`, chosen per model from `clinfed bench dp`). Same
    #: clipping, same noise, same accountant in every mode: only the cost differs.
    grad_sample_mode: str = "auto"


GRAD_SAMPLE_MODES = ("hooks", "ghost", "auto")


class PerSampleCriterion(nn.Module):
    """The task's loss in the shape Opacus' ghost clipping wants: a module with a `reduction` attribute
    that returns one loss per sample when Opacus sets `reduction = "none"` (its
    `DPLossFastGradientClipping` does, around each call) and their mean otherwise."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task
        self.reduction = "mean"

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = self.task.per_sample_loss(output, target)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def state_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters and buffers as float32 numpy arrays (what travels, encrypted or not)."""
    return {k: v.detach().cpu().numpy().astype(np.float32).copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load a global model; refuses silently-partial updates (every key must match in name and shape)."""
    current = model.state_dict()
    if set(weights) != set(current):
        missing, extra = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
        raise ValueError(
            f"global model does not match the local network (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    tensors = {}
    for k, v in weights.items():
        if tuple(np.shape(v)) != tuple(current[k].shape):
            raise ValueError(f"global model layer '{k}' has shape {np.shape(v)}, expected {tuple(current[k].shape)}")
        tensors[k] = torch.as_tensor(np.asarray(v), dtype=current[k].dtype)
    model.load_state_dict(tensors)


def noise_for_target(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior_history: list,
    accountant: str = "rdp",
) -> float:
    """Noise multiplier for `steps` more steps so that, composed with `prior_history`, ε ≤ target.

    Without prior spends this is Opacus' own `get_noise_multiplier`. With them (a resumed job) Opacus
    has no helper, so we bisect on the composed history with Opacus' accountant; if the prior spends
    alone already reach the target, no noise level can help and the site's budget check refuses.
    """
    if not prior_history:
        return get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
    prior = [list(h) for h in prior_history]
    eps = _composed_epsilon(prior, delta, sample_rate, steps, accountant)
    # The run's own noise, continued, still lands on the target (within Opacus' own search tolerance):
    # keep it. FLARE's simulator re-creates a site's executor between tasks when sites take turns, and
    # each re-created executor sees this run's earlier spends; re-searching σ there cost minutes of CPU
    # per task on a loaded machine (a reveal missed its deadline). A run that spent other than planned
    # (resumed after a restart) searches.
    previous = float(prior[-1][0])
    if previous > 0 and float(prior[-1][1]) == sample_rate and target_epsilon - 0.01 <= eps(previous) <= target_epsilon:
        return previous
    low, high = 0.3, 1.0
    while eps(high) > target_epsilon and high < 1e3:
        low, high = high, high * 2
    while high - low > 1e-3 * high:  # σ to 0.1 %: ε moves far less than the accountant's own slack
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high


def _composed_epsilon(prior: list, delta: float, sample_rate: float, steps: int, accountant: str):
    """ε(σ) of ``prior`` followed by ``steps`` steps at σ. For RDP the prior's RDP curve is computed
    once (RDP composes by addition), so each σ tried costs one entry, not the whole history."""
    from clinfed.privacy.ledger import epsilon_of

    if accountant != "rdp":
        return lambda sigma: epsilon_of([*prior, [sigma, sample_rate, steps]], delta, accountant)
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    orders = RDPAccountant.DEFAULT_ALPHAS
    base = sum(
        analysis.compute_rdp(q=float(sr), noise_multiplier=float(nm), steps=int(st), orders=orders)
        for nm, sr, st in prior
    )

    def eps(sigma: float) -> float:
        rdp = base + analysis.compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=orders)
        return max(0.0, float(analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]))

    return eps


def hooks_backward(model: nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Forward and backward passes of one sampled batch under Opacus' hooks mode, `chunk` samples at a
    time; returns the batch's mean loss. The optimizer's next `step` then clips, sums and noises the
    per-sample gradients exactly as for one pass over the whole batch.

    Why chunks: Poisson sampling gives every batch a different size, so every activation tensor
    changes size every step and glibc's heap fragments; DP-SGD's peak memory was mostly that (2.8-3.1×
    the non-private peak on the 2-D UNet, docs/benchmarks.md), not per-sample gradients. Chunks of a
    fixed size (only the last one smaller) keep the big tensors the same size step after step, and
    smaller. Each chunk's per-sample gradients are exact whatever its size (Opacus undoes the chunk
    mean), and they are joined into one tensor per parameter before the step, so Opacus sees one
    batch: it divides by the expected batch size once and charges the accountant one step at the
    sampling rate (it would count each extra backward pass as another step otherwise).
    """
    if chunk <= 0 or len(x) <= chunk:
        loss = task.loss(model(x), y)
        loss.backward()
        return loss.detach()
    total = torch.zeros(())
    for start in range(0, len(x), chunk):
        part = task.loss(model(x[start : start + chunk]), y[start : start + chunk])
        part.backward()
        total += part.detach() * len(x[start : start + chunk])
    for param in model.parameters():
        if isinstance(getattr(param, "grad_sample", None), list):
            param.grad_sample = torch.cat(param.grad_sample)
    return total / len(x)


class SiteTrainer:
    """Model, optimizer, loader and privacy engine of one site, kept across rounds."""

    def __init__(
        self,
        task: Task,
        data: SiteData,
        train: TrainConfig,
        dp: DPConfig,
        rounds_left: int | None = None,
        prior_history: list | None = None,
    ):
        """`rounds_left` and `prior_history` serve a job resumed mid-way: the noise is set so that what
        this run already spent (prior_history) plus the remaining rounds meets the job's target ε."""
        self.task, self.data, self.train_cfg, self.dp = task, data, train, dp
        if train.clip_norm is not None and not (isinstance(train.clip_norm, int | float) and train.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number or None, got {train.clip_norm!r}")
        with torch.random.fork_rng():  # the job seed fixes the initial weights (equal at every site), nothing else
            torch.manual_seed(int(train.seed))
            model = task.build_model()
        torch.seed()  # whatever else draws from torch's global RNG starts from OS entropy, not a default seed
        if dp.enabled:
            errors = ModuleValidator.validate(model, strict=False)
            if errors:
                raise ValueError(f"model is not DP-SGD compatible: {errors[0]}")
        params = [p for p in model.parameters() if p.requires_grad]
        if train.optimizer == "adam":
            optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=train.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum)
        loader = DataLoader(data.train, batch_size=train.batch_size, shuffle=True, generator=os_seeded_generator())
        self.batches_per_epoch = len(loader)
        self.sample_rate = 1.0 / len(loader)
        self.noise_multiplier = 0.0
        self.engine: PrivacyEngine | None = None
        self.criterion = None  # Opacus' two-pass loss in ghost mode; `task.loss` otherwise
        mode = dp.grad_sample_mode
        if mode == "auto":
            mode = getattr(task, "grad_sample_mode", "hooks")
        if mode not in ("hooks", "ghost"):
            raise ValueError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {mode!r}")
        self.grad_sample_mode = mode
        chunk = train.physical_batch
        self.physical_batch = int(getattr(task, "physical_batch", 0) if chunk is None else chunk)
        if dp.enabled:
            rounds = train.rounds if rounds_left is None else max(1, rounds_left)
            self.planned_steps = rounds * train.local_epochs * len(loader)
            self.noise_multiplier = noise_for_target(
                dp.target_epsilon, dp.delta, self.sample_rate, self.planned_steps, prior_history or [], dp.accountant
            )
            self.engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
            private = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=PerSampleCriterion(task),
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=False,  # Poisson sampling is set up below, on a generator of our own
                grad_sample_mode=mode,
                noise_generator=os_seeded_generator(),
            )
            if mode == "ghost":  # ghost mode hands back a 4th object: the loss that runs both passes
                model, optimizer, self.criterion, _ = private
            else:
                model, optimizer, _ = private
            # make_private would hand Poisson sampling torch's *global* RNG (seeded by the job) unless
            # secure_mode is on; the same DPDataLoader with an OS-seeded generator samples at the same
            # rate (1 / batches per epoch), which is what the accountant is told.
            loader = DPDataLoader.from_data_loader(loader, generator=os_seeded_generator())
        self.model, self.optimizer, self.loader = model, optimizer, loader

    @property
    def network(self) -> nn.Module:
        """The user's module, without Opacus' GradSampleModule wrapper (what the federation averages)."""
        return getattr(self.model, "_module", self.model)

    def get_weights(self) -> dict[str, np.ndarray]:
        return state_to_numpy(self.network)

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        load_numpy_state(self.network, weights)

    def planned_spend(self) -> tuple[float, float, int]:
        """(noise multiplier, sample rate, steps) the next round will consume, for the budget check."""
        return self.noise_multiplier, self.sample_rate, self.train_cfg.local_epochs * self.batches_per_epoch

    def update_noise_std(self) -> float:
        """σ: the per-coordinate standard deviation of the Gaussian noise DP-SGD puts into one round's
        model change at this site (0 without DP). The compact format's noise-tied grid is cut to it
        (`clinfed.he.compact.CompactSpec.for_noise`): an estimate that runs high makes the grid coarser
        than a tenth of the true noise, one that runs low narrows its range (more values clamped, counted).

        Opacus adds N(0, (z·C)²) to the summed clipped gradients and divides by the expected batch
        B = sample_rate · n, so each step's gradient carries z·C/B per coordinate. Over T steps of SGD
        with momentum μ, step t's noise reaches the round's change with weight lr·(1 − μ^(T−t+1))/(1 − μ):
        σ = lr·(z·C/B)·√Σ_t w_t². Adam divides each coordinate by its running RMS, in which the noise
        (z·C/B, far above the clipped signal per coordinate) dominates: each step moves a coordinate by
        about lr times a unit-variance draw, so σ ≈ lr·√T, an upper estimate when the signal is not small.
        """
        if self.engine is None or self.noise_multiplier <= 0:
            return 0.0
        steps = self.train_cfg.local_epochs * self.batches_per_epoch
        lr = float(self.train_cfg.lr)
        if self.train_cfg.optimizer == "adam":
            return lr * math.sqrt(steps)
        mu = float(self.train_cfg.momentum)
        weights = [(1 - mu ** (steps - t)) / (1 - mu) if mu else 1.0 for t in range(steps)]
        per_step = self.noise_multiplier * self.dp.max_grad_norm / (self.sample_rate * len(self.data.train))
        return lr * per_step * math.sqrt(sum(w * w for w in weights))

    def planned_job(self) -> list[tuple[float, float, int]]:
        """The whole remaining job's spends, for admission: every round this run still plans."""
        if self.engine is None:
            return []
        return [(self.noise_multiplier, self.sample_rate, self.planned_steps)]

    def train_round(self) -> dict[str, float]:
        """Local epochs of DP-SGD; returns the mean training loss and the accountant steps consumed."""
        self.model.train()
        # Optimizer state from the previous round refers to a local model the global average replaced.
        inner = getattr(self.optimizer, "original_optimizer", self.optimizer)
        inner.state.clear()
        losses, steps = [], 0
        for _ in range(self.train_cfg.local_epochs):
            for x, y in self.loader:
                if len(x) == 0:
                    # Poisson sampling drew an empty batch: nothing to learn from, but the sampling
                    # still happened, so the step is accounted exactly as Opacus would have.
                    if self.engine is not None:
                        self.engine.accountant.step(
                            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate
                        )
                    steps += 1
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                if self.criterion is not None:  # ghost clipping: Opacus' loss runs both backward passes
                    loss = self.criterion(self.model(x), y)
                    loss.backward()
                elif self.engine is not None:
                    loss = hooks_backward(self.model, self.task, x, y, self.physical_batch)
                else:
                    loss = self.task.loss(self.model(x), y)
                    loss.backward()
                    if self.train_cfg.clip_norm:
                        nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.clip_norm)
                self.optimizer.step()
                losses.append(float(loss.detach()))
                steps += 1
        mean_loss = float(np.mean(losses)) if losses else math.nan
        return {"train_loss": mean_loss, "steps": steps}

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            return self.task.evaluate(self.network, self.data.test)
