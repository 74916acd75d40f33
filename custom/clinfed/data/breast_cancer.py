"""Wisconsin diagnostic breast-cancer data (scikit-learn's bundled copy), split across hospital sites.

The records are real clinical measurements (569 fine-needle aspirates, 30 features, 212 malignant,
357 benign); they ship inside scikit-learn, so nothing is downloaded at run time.

The federated split is deliberately non-IID, as hospitals are: each class is divided among the sites
with proportions drawn from a Dirichlet(alpha) distribution (fixed seed), so sites differ both in size
and in malignant fraction. Each site then holds out a stratified 25 % of its own rows as a local
test set. A site's own CSV (``--data-dir``) replaces the bundled rows for that site.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from clinfed.errors import SiteDataError

LABEL_COLUMN = "target"
#: scikit-learn codes malignant as 0; we flip it so that 1 = malignant, the positive clinical finding.
MALIGNANT = 1


@dataclass
class Table:
    """Feature matrix, binary labels (1 = malignant) and the feature names."""

    x: np.ndarray
    y: np.ndarray
    features: list[str]


def load_bundled() -> Table:
    """All 569 rows, labels recoded so 1 = malignant."""
    bunch = load_breast_cancer()
    return Table(
        x=bunch.data.astype(np.float64), y=(1 - bunch.target).astype(np.int64), features=list(bunch.feature_names)
    )


def dirichlet_split(
    y: np.ndarray, num_sites: int, alpha: float = 2.0, seed: int = 0, min_per_class: int | None = None
) -> list[np.ndarray]:
    """Row indices for each site: label-skewed shares of every class (Dirichlet(alpha), fixed seed).

    Redraws (with the next seed) until every site holds at least `min_per_class` rows of each class,
    so every site can both train and compute a meaningful AUC on its held-out part. The default is
    12, or for many sites half a fair share of the smaller class (at least 4, so a 25 % stratified
    hold-out still holds both classes): 569 rows have 212 malignant, 10.6 per site at 20 sites.
    """
    classes = np.unique(y)
    if min_per_class is None:
        smallest = min(int(np.sum(y == c)) for c in classes)
        min_per_class = min(12, max(4, smallest // (2 * num_sites)))
    for attempt in range(1000):
        rng = np.random.default_rng(seed + attempt)
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(y == cls))
            shares = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if all(min(np.sum(y[p] == c) for c in classes) >= min_per_class for p in parts):
            return [np.sort(np.asarray(p)) for p in parts]
    raise ValueError(f"cannot split {len(y)} rows across {num_sites} sites with ≥{min_per_class} rows per class each")


def find_site_csv(site: str, data_dir: str | Path) -> Path:
    """A site's table: `<data_dir>/data.csv`, or the only CSV there; errors name the site and folder."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise SiteDataError(f"{site}: data folder {folder} does not exist")
    csvs = sorted(folder.glob("*.csv"))
    path = folder / "data.csv" if (folder / "data.csv").exists() else (csvs[0] if len(csvs) == 1 else None)
    if path is None:
        raise SiteDataError(f"{site}: no data.csv in {folder}")
    return path


def read_site_csv(site_name: str, data_dir: str | Path, features: list[str]) -> Table:
    """A site's own rows from `<data_dir>/data.csv` (or the only CSV there): the features + `target`."""
    path = find_site_csv(site_name, data_dir)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise SiteDataError(f"{site_name}: {path} has no rows")
    header = set(rows[0].keys())
    for col in [*features, LABEL_COLUMN]:
        if col not in header:
            raise SiteDataError(f"{site_name}: {path} lacks column '{col}'")
    try:
        x = np.array([[float(r[f]) for f in features] for r in rows], dtype=np.float64)
        y = np.array([int(float(r[LABEL_COLUMN])) for r in rows], dtype=np.int64)
    except ValueError as exc:
        raise SiteDataError(f"{site_name}: {path} has a non-numeric value ({exc})") from None
    return Table(x=x, y=y, features=features)


def site_table(site_index: int, num_sites: int, seed: int = 0, alpha: float = 2.0) -> Table:
    """The bundled rows that belong to site `site_index` (0-based) of `num_sites`."""
    full = load_bundled()
    rows = dirichlet_split(full.y, num_sites, alpha=alpha, seed=seed)[site_index]
    return Table(x=full.x[rows], y=full.y[rows], features=full.features)


def train_test(table: Table, seed: int = 0, test_fraction: float = 0.25) -> tuple[Table, Table]:
    """Stratified local hold-out: the test rows never train any model, local or global."""
    x_tr, x_te, y_tr, y_te = train_test_split(
        table.x, table.y, test_size=test_fraction, random_state=seed, stratify=table.y
    )
    return Table(x_tr, y_tr, table.features), Table(x_te, y_te, table.features)
