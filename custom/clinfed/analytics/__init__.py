"""Federated analytics: the clinical methods and descriptive cohort statistics on one encrypted-sums job,
and private set intersection of patient identifiers (`psi`).

Each method's arithmetic is a numpy-only module (`km`, `cox`, `glm`, `stats`), tested against the
statisticians' references; `methods` and `cohort_method` are thin strategies over them, and
`sums_fl` is the one FLARE executor/controller pair and recipe every method rides. `cohort_data`
says where cohort_stats' rows come from. Import those modules directly: this package imports
nothing, so the math modules stay cheap.
"""
