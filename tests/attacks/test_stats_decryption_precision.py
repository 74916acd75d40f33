"""Attack (issue 12, item 8, statistics side): decrypted values go back at full precision.

The release site decrypts the pooled sums and sends the statistics computed from them to the server,
which holds the very ciphertexts. A CKKS decryption is the message plus the scheme's error, a linear
function of the secret key; released at full precision, the error can be read off (subtract the true
value, or compare releases) and the key recovered (Li & Micciancio, EUROCRYPT 2021).

Here the true pooled statistics are known (central computation on the same rows), so the attacker's
view is direct: old code releases means and std that differ from the truth in their last bits by the
CKKS error. Fixed code releases counts as exact integers and means / std rounded to 7 significant
digits: every released value is exactly on that grid, within half a grid step of the truth, and (but
for a value whose truth lies within the tiny CKKS error of a rounding boundary) equal to the truth
rounded to the grid, so it carries no trace of the decryption error.
"""

from __future__ import annotations

import numpy as np

from clinfed.analytics import stats
from clinfed.data import breast_cancer as bc

DIGITS = 7


def _masks(y: np.ndarray) -> dict:
    return {stats.ALL: np.ones(len(y), bool), "malignant": y == 1, "benign": y == 0}


def _on_grid(value: float) -> bool:
    return float(f"{value:.{DIGITS - 1}e}") == value


def _ckks_release(table, spec, parts) -> dict:
    """The job's two passes, summed and decrypted under CKKS in this process."""
    from clinfed.he.aggregation import EncryptedSum
    from clinfed.he.ckks import decrypt_vector, encrypt_vector
    from clinfed.he.context import create_context_pair

    secret, public = create_context_pair()

    def encrypted_sum(vectors):
        acc = EncryptedSum(public)
        for i, vec in enumerate(vectors):
            acc.add(f"site-{i + 1}", encrypt_vector(secret, vec), 1, acc.fingerprint)
        return decrypt_vector(secret, acc.result()[0], len(vectors[0]))

    sums = stats.unpack_sums(
        encrypted_sum([stats.local_sums(table.x[p], _masks(table.y[p]), spec) for p in parts]), spec
    )
    devs = encrypted_sum([stats.local_deviations(table.x[p], _masks(table.y[p]), sums.means(), spec) for p in parts])
    return stats.release(sums, stats.unpack_deviations(devs, spec), spec, min_cell=10)


def test_released_statistics_carry_no_ckks_decryption_error():
    table = bc.load_bundled()
    spec = stats.StatsSpec(tuple(table.features), tuple(stats.reference_bounds(table.x)))
    parts = bc.dirichlet_split(table.y, 3)
    released = _ckks_release(table, spec, parts)["statistics"]
    truth = stats.pooled_reference(table.x, _masks(table.y), spec)
    values, off_grid, equal_to_rounded_truth = 0, [], 0
    for g, feats in released.items():
        for f, e in feats.items():
            assert isinstance(e["count"], int) and e["count"] == truth[g][f]["count"], (g, f)
            for key in ("mean", "std"):
                v, t = e[key], truth[g][f][key]
                values += 1
                if not _on_grid(v):
                    off_grid.append((g, f, key, v - t))
                    continue
                step = 10.0 ** (np.floor(np.log10(abs(t))) - DIGITS + 1)
                assert abs(v - t) <= 0.5 * step * (1 + 1e-6), (g, f, key)
                assert abs(v - t) / abs(t) < 1e-6, (g, f, key)
                equal_to_rounded_truth += v == float(f"{t:.{DIGITS - 1}e}")
    assert not off_grid, f"{len(off_grid)}/{values} released values carry bits below the grid, e.g. {off_grid[0]}"
    assert equal_to_rounded_truth >= 0.95 * values
