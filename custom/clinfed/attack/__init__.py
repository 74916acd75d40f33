"""Privacy attacks we run against our own updates, to measure what the protections are worth.

`invert`: gradient inversion ("Inverting Gradients", Geiping et al. 2020) by an honest-but-curious
server that sees one site's plaintext update, with and without DP-SGD.
"""

from clinfed.attack.invert import format_table, run_invert

__all__ = ["format_table", "run_invert"]
