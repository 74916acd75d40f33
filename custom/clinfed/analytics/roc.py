"""ROC curve, AUC and calibration of a model on every site's held-out patients, from summed score histograms.

Why histograms: an ROC curve sorts every patient's score, which is patient-level data; counted
in B public bins of the score range [0, 1], negatives and positives per bin are sums a site can
encrypt and the server can add. The pooled ROC is then exact for the scores rounded to their
bin, and its AUC is the Mann–Whitney statistic of the binned scores (pairs in one bin count ½).

Resolution: the AUC of the unbinned scores differs from the binned one only through pairs of a
negative and a positive in the same bin, each moving it by at most ½/(N·P); `auc_resolution` is
that bound, Σ_b neg_b·pos_b / (2·N·P), released with the AUC (≤ 0.002 on breast_cancer at the
default 1,000 bins). sklearn's `roc_auc_score` on the unbinned scores lies within it (the tests).

Site vector (`roc_site_local`), B bins, length 3·B: ``[negatives per bin, positives per bin,
Σ score per bin]``; bin b holds scores in [b/B, (b+1)/B), a score of 1 the last bin.

Calibration: the bins are pooled into `calibration_bins` equal-width groups (10 by default);
per group the mean predicted score, the observed fraction of positives and n (as sklearn's
`calibration_curve` with strategy "uniform" on the same scores; groups with no patient omitted).

Small cells: the ROC points are released only at thresholds where the numbers of negatives and of
positives passed are each 0 or ≥ the minimum cell since the previous point (bins merged forward,
as `km.enforce_min_cell` does); a calibration group under the minimum cell is withheld.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from clinfed.analytics.federated import sum_site_vectors

DEFAULT_BINS = 1000
CALIBRATION_BINS = 10


def roc_site_local(scores: np.ndarray, labels: np.ndarray, n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """This site's [negatives, positives, Σ score] per score bin (scores clipped to [0, 1])."""
    s = np.clip(np.asarray(scores, dtype=float).ravel(), 0.0, 1.0)
    y = np.asarray(labels).ravel() > 0
    b = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    return np.concatenate(
        [
            np.bincount(b[~y], minlength=n_bins),
            np.bincount(b[y], minlength=n_bins),
            np.bincount(b, weights=s, minlength=n_bins),
        ]
    ).astype(float)


def _merge(neg: np.ndarray, pos: np.ndarray, min_cell: int) -> np.ndarray:
    """Indices (from the top score bin down) after which an ROC point may be released."""
    cut, acc_n, acc_p = [], 0.0, 0.0
    for b in range(neg.size - 1, -1, -1):
        acc_n, acc_p = acc_n + neg[b], acc_p + pos[b]
        if (acc_n or acc_p) and all(v == 0 or v >= min_cell for v in (acc_n, acc_p)):
            cut.append(b)
            acc_n = acc_p = 0.0
    return np.array(cut, dtype=np.int64)


def roc_combine(
    summed: np.ndarray, n_bins: int = DEFAULT_BINS, min_cell: int = 1, calibration_bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """summary.json's `roc`: {auc, auc_resolution, fpr, tpr, thresholds, calibration, n, bins}."""
    v = np.asarray(summed, dtype=float).reshape(3, n_bins)
    neg, pos, ssum = np.rint(v[0]), np.rint(v[1]), v[2]
    n_neg, n_pos = neg.sum(), pos.sum()
    if n_neg == 0 or n_pos == 0:
        raise ValueError("the validation sets hold only one class: no ROC curve")
    # Mann–Whitney on binned scores: positives above each negative's bin, plus ½ in the same bin
    pos_above = np.concatenate([np.cumsum(pos[::-1])[::-1][1:], [0.0]])
    auc = float((neg * (pos_above + 0.5 * pos)).sum() / (n_neg * n_pos))
    resolution = float((neg * pos).sum() / (2 * n_neg * n_pos))
    cuts = _merge(neg, pos, min_cell)
    tp = np.cumsum(pos[::-1])[::-1]  # scores ≥ the bin's lower edge
    fp = np.cumsum(neg[::-1])[::-1]
    fpr = [0.0, *(fp[cuts] / n_neg).tolist()]
    tpr = [0.0, *(tp[cuts] / n_pos).tolist()]
    thresholds = [None, *(cuts / n_bins).tolist()]
    per = n_bins // calibration_bins
    calibration = {"mean_predicted": [], "observed": [], "n": [], "withheld": 0}
    for g in range(calibration_bins):
        sl = slice(g * per, n_bins if g == calibration_bins - 1 else (g + 1) * per)
        n = neg[sl].sum() + pos[sl].sum()
        if n == 0:
            continue
        if n < min_cell:
            calibration["withheld"] += 1
            continue
        calibration["mean_predicted"].append(float(ssum[sl].sum() / n))
        calibration["observed"].append(float(pos[sl].sum() / n))
        calibration["n"].append(int(n))
    return {
        "auc": auc,
        "auc_resolution": resolution,
        "bins": int(n_bins),
        "fpr": fpr,
        "tpr": tpr,
        "thresholds": thresholds,
        "calibration": calibration,
        "n": {"negative": int(n_neg), "positive": int(n_pos)},
    }


def fit_federated(
    site_scores: Mapping[str, tuple[np.ndarray, np.ndarray]], n_bins: int = DEFAULT_BINS, min_cell: int = 1
) -> dict[str, Any]:
    """`roc` over sites ({site: (scores, labels)}) with plain sums standing in for the encrypted ones."""
    vectors = {s: roc_site_local(sc, y, n_bins) for s, (sc, y) in site_scores.items()}
    return roc_combine(sum_site_vectors(vectors), n_bins, min_cell)
