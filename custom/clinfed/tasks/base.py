"""What a site needs to know about a learning task, and nothing about FLARE or encryption.

A task bundles the site's data, the network, the loss and the held-out evaluation. The FLARE
executor (`clinfed.fl.executor`) and the DP-SGD loop (`clinfed.training`) are generic over it, so a
new clinical workload is one new module under `clinfed.tasks`, not a fork of the federation code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from clinfed.errors import SiteDataError

__all__ = ["SiteData", "SiteDataError", "Task"]


@dataclass
class SiteData:
    """A site's local split: training data never leaves the site, the test set scores every model."""

    train: Dataset
    test: Dataset
    description: str


class Task(ABC):
    """A learning task as seen from one site.

    Subclasses are plain Python: they may be built from keyword arguments that travel in the job
    config (no secrets there), so every argument must be JSON-serialisable.
    """

    #: name of the metric that summarises utility ("auc", "dice"); reported in summary.json `final`.
    primary_metric: str = "auc"

    #: Opacus engine for DP-SGD when the job says "auto" (`clinfed.training.DPConfig`): "hooks" for all
    #: three of our models, measured with `clinfed bench dp` (docs/benchmarks.md). Ghost clipping
    #: (fast gradient clipping) only pays where per-sample gradients are large and Opacus has a ghost
    #: *norm* sampler for the layer: 1.6 has them for Linear and Embedding only. Our UNets' convolutions,
    #: transposed convolutions and PReLUs fall back to materialised per-sample gradients inside ghost
    #: mode, which then adds a second backward pass: 1.6-1.8× the CPU time of hooks mode on the UNets.
    #: The tabular MLP is all Linear, but with 500 parameters per-sample gradients cost nothing, and
    #: the second pass still made ghost slower there too. A task with big Linear/Embedding layers
    #: (a transformer) would set "ghost".
    grad_sample_mode: str = "hooks"

    #: DP-SGD forward/backward chunk size (`clinfed.training.hooks_backward`; 0: whole batches). Worth
    #: it where activations are large (the UNets: 8); for a small MLP the extra passes only cost time.
    physical_batch: int = 0

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model. Must be deterministic under `torch.manual_seed` so all sites start equal."""

    @abstractmethod
    def load_site_data(self, site_name: str, site_index: int, num_sites: int, data_dir: str | Path | None) -> SiteData:
        """This site's train and held-out test sets; raise SiteDataError naming the site and path."""

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (Opacus scales per-sample gradients itself)."""

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each sample, shape [batch]; its mean must equal `loss` on the same batch.

        Opacus' ghost clipping needs it: it backpropagates the per-sample losses twice, the second
        time scaled by each sample's clipping factor. This default calls `loss` once per sample,
        which is exact for every loss that is a mean of independent per-sample losses (the only kind
        DP-SGD's per-sample clipping allows); tasks override it with one vectorised call.
        """
        return torch.stack([self.loss(output[i : i + 1], target[i : i + 1]) for i in range(len(output))])

    @abstractmethod
    def evaluate(self, model: nn.Module, test: Dataset) -> dict[str, float]:
        """Metrics of `model` on the held-out set; must include `primary_metric` and "loss"."""
