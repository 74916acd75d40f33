"""Federated cohort analytics: encrypted descriptive statistics (`stats`, `stats_fl`) and private set
intersection of patient identifiers (`psi`).

`stats` is pure arithmetic (partial sums, packing, suppression, output DP) and imports no FLARE
runtime; `stats_fl` and `psi` are the FLARE components the jobs `cohort_stats` and `psi_linkage`
compose. Import those modules directly: this package imports nothing, so `stats` stays cheap.
"""
