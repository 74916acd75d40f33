"""The site's node policy: which methods, variables and concepts a job may use here at all.

Why: as a vantage6 node admin or DataSHIELD's disclosure settings do, the hospital decides what can
be asked of its data, whatever the job says. The allow-lists live in the site's `local/` policy
(`SitePolicy.allowed_methods`, `allowed_columns`, `allowed_concepts`; None allows all) and are checked
when the job is admitted, before any query runs; a job outside them is refused in one line naming
the rule. (`min_cell`, `min_sites` and `max_params_per_observation` are the same policy's disclosure
floors, enforced where each method releases; see docs/site-policy.md, "Node policy".)
"""

from __future__ import annotations

from typing import Any

from clinfed.errors import SiteRefusal

RULE = "(local policy)"


def check_node_policy(policy: Any, site: str, job: str, method: Any) -> None:
    """Refuse (SiteRefusal, one line naming the rule) a job this site's node policy does not allow.

    `method` is a `clinfed.analytics.methods.Method`: its block (``cox``), the variables it reads, and
    the OMOP cohort definition its config carries, if any.
    """
    allowed = getattr(policy, "allowed_methods", None)
    if allowed is not None and job not in allowed and getattr(method, "block", None) not in allowed:
        raise SiteRefusal(f"{site}: method {job} is not in this site's allowed_methods {RULE}")
    columns = getattr(policy, "allowed_columns", None)
    if columns is not None:
        outside = [v for v in method.variables() if v not in columns]
        if outside:
            raise SiteRefusal(f"{site}: column {outside[0]!r} is not in this site's allowed_columns {RULE}")
    cohort = (getattr(method, "config", None) or {}).get("omop_cohort")
    concepts = getattr(policy, "allowed_concepts", None)
    if cohort and concepts is not None:
        from clinfed.data.omop import cohort_concepts, parse_cohort

        outside_ids = [c for c in cohort_concepts(parse_cohort(cohort)) if c not in set(concepts)]
        if outside_ids:
            raise SiteRefusal(f"{site}: concept {outside_ids[0]} is not in this site's allowed_concepts {RULE}")
