"""Real clinical datasets that ship inside installed packages, as one uniform patient table each.

Why these: the analytics jobs (Kaplan–Meier, Cox, GLM, medians) must be checked against what a
statistician gets on the pooled table of real patients, and nothing may be downloaded at run time.
scikit-survival bundles five survival studies in its wheel; scikit-learn bundles the Wisconsin
breast-cancer aspirates.

Uniform shape (a pandas DataFrame, one row per patient):

- survival datasets: ``time`` (float, days as in the source) and ``event`` (int, 1 = event,
  0 = censored) first, then the covariates;
- ``breast_cancer``: the 30 measurements, then ``malignant`` (int, 1 = malignant, 0 = benign);
- covariates keep their source names with ``.`` and spaces turned into ``_`` (``flc.grp`` ->
  ``flc_grp``, ``mean radius`` -> ``mean_radius``), so a job names them on a command line and in SQL
  without quoting;
- categoricals stay text (``str``) even where the source codes them as digits (whas500's ``'0'``/``'1'``
  flags, aids' ``karnof``): turning a category into a number is an analysis decision, not the loader's;
- missing values stay missing: NaN in numeric columns, None in text columns (flchain has 1,350
  missing ``creatinine`` and 5,705 missing ``chapter``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pandas (and scikit-survival) load only when a table is: `clinfed --help` stays quick
    import pandas as pd

#: Every dataset `load_dataset` knows, in the order the CLI lists them.
DATASETS: tuple[str, ...] = ("whas500", "gbsg2", "aids", "flchain", "veterans", "breast_cancer")

#: The binary outcome of each dataset: what a split stratifies on and what `data split` counts.
OUTCOME: dict[str, str] = {name: "event" for name in DATASETS} | {"breast_cancer": "malignant"}

#: scikit-survival's loader name and its (event, time) field names, per dataset.
_SKSURV: dict[str, tuple[str, str, str]] = {
    "whas500": ("load_whas500", "fstat", "lenfol"),
    "gbsg2": ("load_gbsg2", "cens", "time"),
    "aids": ("load_aids", "censor", "time"),
    "flchain": ("load_flchain", "death", "futime"),
    "veterans": ("load_veterans_lung_cancer", "Status", "Survival_in_days"),
}


def clean_name(name: str) -> str:
    """A source column name as a variable name: ``.`` and spaces become ``_``."""
    return "_".join(str(name).replace(".", " ").split())


def _covariates(frame: pd.DataFrame) -> pd.DataFrame:
    """Source covariates with clean names; categoricals as text with None for missing, numbers as float."""
    import pandas as pd

    out: dict[str, pd.Series] = {}
    for col in frame.columns:
        series = frame[col]
        if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
            text = series.astype(object)
            out[clean_name(col)] = text.where(text.notna(), None).map(lambda v: v if v is None else str(v))
        else:
            out[clean_name(col)] = series.astype(np.float64)
    return pd.DataFrame(out, index=frame.index)


def _survival(name: str) -> pd.DataFrame:
    import pandas as pd
    from sksurv import datasets

    loader, event_field, time_field = _SKSURV[name]
    x, y = getattr(datasets, loader)()
    outcome = pd.DataFrame(
        {"time": np.asarray(y[time_field], dtype=np.float64), "event": np.asarray(y[event_field], dtype=np.int64)}
    )
    table = pd.concat([outcome, _covariates(x).reset_index(drop=True)], axis=1)
    return table


def _breast_cancer() -> pd.DataFrame:
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    table = pd.DataFrame(bunch.data.astype(np.float64), columns=[clean_name(n) for n in bunch.feature_names])
    # scikit-learn codes malignant as 0; the clinical positive finding is 1 here, as in data/breast_cancer.py.
    table["malignant"] = (1 - bunch.target).astype(np.int64)
    return table


_LOADERS: dict[str, Callable[[], pd.DataFrame]] = {name: (lambda n=name: _survival(n)) for name in _SKSURV} | {
    "breast_cancer": _breast_cancer
}


def check_dataset(name: str) -> str:
    """`name` if it is a known dataset, else a one-line ValueError listing the known ones."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")
    return name


def load_dataset(name: str) -> pd.DataFrame:
    """The whole dataset `name` as one uniform table (see the module docstring), rows in source order."""
    import pandas as pd

    table = _LOADERS[check_dataset(name)]()
    table.index = pd.RangeIndex(len(table))
    return table
