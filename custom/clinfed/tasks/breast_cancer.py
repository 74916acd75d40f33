"""Malignancy classification on the Wisconsin breast-cancer data: a small MLP trained with DP-SGD.

Features are put on a common scale with a fixed, data-independent transform (log1p, then the
per-feature location/scale of a public reference: the feature's documented range in the UCI data
description, which sites know without sharing anything). Per-site standardisation would erase the
very label skew the federation must learn across, and pooled statistics would need a federated
pass; a fixed transform needs neither and leaks nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from clinfed.data import breast_cancer as bc
from clinfed.tasks.base import SiteData, Task


def reference_scale() -> tuple[np.ndarray, np.ndarray]:
    """Location and scale of log1p(feature) from the public reference (the bundled data set itself)."""
    logged = np.log1p(bc.load_bundled().x)
    return logged.mean(axis=0), logged.std(axis=0) + 1e-8


class BreastCancerTask(Task):
    primary_metric = "auc"

    def __init__(self, hidden: int = 16, split_seed: int = 0, alpha: float = 2.0):
        self.hidden, self.split_seed, self.alpha = hidden, split_seed, alpha
        self._loc, self._scale = reference_scale()
        self._features = bc.load_bundled().features
        self._loss = nn.BCEWithLogitsLoss()

    def build_model(self) -> nn.Module:
        if self.hidden <= 0:
            return nn.Sequential(nn.Linear(len(self._features), 1), nn.Flatten(0))
        return nn.Sequential(
            nn.Linear(len(self._features), self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1), nn.Flatten(0)
        )

    def _dataset(self, table: bc.Table) -> Dataset:
        x = (np.log1p(np.clip(table.x, 0, None)) - self._loc) / self._scale
        return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(table.y, dtype=torch.float32))

    def load_site_data(self, site_name: str, site_index: int, num_sites: int, data_dir: str | Path | None) -> SiteData:
        if data_dir:
            table = bc.read_site_csv(site_name, data_dir, self._features)
            origin = f"{data_dir}"
        else:
            table = bc.site_table(site_index, num_sites, seed=self.split_seed, alpha=self.alpha)
            origin = f"bundled rows, Dirichlet({self.alpha}) label-skew split, site {site_index + 1}/{num_sites}"
        train, test = bc.train_test(table, seed=self.split_seed)
        desc = (
            f"{origin}: {len(train.y)} train ({int(train.y.sum())} malignant), "
            f"{len(test.y)} test ({int(test.y.sum())} malignant)"
        )
        return SiteData(train=self._dataset(train), test=self._dataset(test), description=desc)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(output, target)

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(output, target, reduction="none")

    def scores(self, model: nn.Module, test: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """(P(malignant), label) of every held-out patient: what the pooled ROC bins (fl.roc_validation)."""
        x, y = test.tensors  # type: ignore[attr-defined]
        with torch.no_grad():
            return torch.sigmoid(model(x)).numpy().ravel(), y.numpy().ravel().astype(int)

    def evaluate(self, model: nn.Module, test: Dataset) -> dict[str, float]:
        x, y = test.tensors  # type: ignore[attr-defined]
        logits = model(x)
        loss = float(self._loss(logits, y))
        prob = torch.sigmoid(logits).numpy()
        truth = y.numpy().astype(int)
        auc = float(roc_auc_score(truth, prob)) if len(np.unique(truth)) == 2 else float("nan")
        return {"auc": auc, "accuracy": float(accuracy_score(truth, prob >= 0.5)), "loss": loss}
