"""Every analytics method by name, imported eagerly: how `sums_fl` builds a strategy from a job's JSON config.

Why a module of its own: the strategies subclass `methods.Method`, so a list of them inside
`methods` made `methods` import its own subclasses' modules (`cohort_method`, `toolbox_methods`),
which import `methods` back: a circle that only a function-level import kept from failing. Here
the arrows point one way: `sums_fl` → registry → the strategies → `methods` → the numpy modules
(`km`, `cox`, `glm`, `stats`, `crosstab`, `ttest`, `correlation`, `cif`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clinfed.analytics.cohort_method import CohortStats
from clinfed.analytics.methods import GLM, CoxPH, KaplanMeier, Method
from clinfed.analytics.toolbox_methods import CorrelationMethod, CrossTab, CumulativeIncidence, TTest

#: config["method"] → strategy; the block each writes into summary.json is its `block`.
METHODS: dict[str, type[Method]] = {
    "km": KaplanMeier,
    "cox": CoxPH,
    "glm": GLM,
    "cohort": CohortStats,
    "crosstab": CrossTab,
    "ttest": TTest,
    "correlation": CorrelationMethod,
    "cif": CumulativeIncidence,
}


def make_method(config: Mapping[str, Any]) -> Method:
    """The strategy named by ``config["method"]``, built from the job's JSON config; ValueError (one line)
    for an unknown method or an output-DP config it cannot honour."""
    name = config.get("method")
    if name not in METHODS:
        raise ValueError(f"unknown analytics method {name!r} (known: {', '.join(METHODS)})")
    method = METHODS[name](config)
    method.check_dp()
    return method
