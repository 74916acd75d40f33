"""psi_linkage: which patients appear at every site? Diffie-Hellman private set intersection.

FLARE's DH-PSI (OpenMined `openmined.psi`) on patient identifiers: no site learns another's
identifiers outside the intersection, and the server learns set sizes only. Each site keeps the
intersection in its own `local/psi/intersection.txt`, where `cohort_stats --cohort intersect`
reads it. Bundled demo: site i of S holds the identifiers of rows [i·w, i·w + L) of the 569
breast-cancer rows (w = 569 // 2S, L = 569 − (S−1)·w), so the true intersection (193 for three
sites) is known and recorded as `expected_intersection_size`. A site's own CSV (`data_dir` in its
local/resources.json) brings the `patient_id` column instead.
Run it: `clinfed simulate psi_linkage --sites 3 --out out/psi`.
"""

from clinfed.analytics.psi import LinkageRecipe

DEFAULTS = {"sites": 3, "rounds": 1}


def make_recipe(sites: int, id_column: str = "patient_id", **_: object) -> LinkageRecipe:
    """Rounds, encryption, ε and min_cell do not apply: DH-PSI is one protocol run, always blinded."""
    return LinkageRecipe(name="psi_linkage", num_sites=sites, id_column=id_column)
