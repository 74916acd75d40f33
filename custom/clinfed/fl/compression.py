"""Top-F updates the server can still only add: shared coordinates, error feedback (issue 15, part 3).

A site that sends only the largest F (e.g. 1 %) of its update's coordinates saves ~1/F of the bytes,
but per-site top-k picks *different* coordinates at every site, and an encrypted sum needs the same
slot to mean the same coordinate everywhere; sending the indices in the clear would also tell the
server where each site's update is large. So every site sends the **same** coordinates in a round,
chosen from what all sites already share and the server cannot see:

* half of them are the largest coordinates of the previous decrypted *global* update (each site
  holds it after decryption; it is a post-processing of DP-protected updates and costs no ε),
* the other half are drawn at random from a generator seeded by the job's run key and the round,
  so coordinates the global update never moved still get their turn (round 0 is all random).

What a site does not send is kept in its **error-feedback** residual (Stich et al., "Sparsified SGD
with memory", 2018; Karimireddy et al., "Error feedback fixes SignSGD", 2019) and added to its next
update, so nothing is lost, only delayed. The server adds ciphertexts of k = ⌈F·P⌉ values exactly as
it adds dense ones; the sites scatter the decrypted sum back to the model's P coordinates.

Pure numpy on purpose (no FLARE, no TenSEAL): the executor calls these around `weighted_encrypt` and
`decrypt_sum`, and the tests check the arithmetic on its own.
"""

from __future__ import annotations

import hashlib

import numpy as np


def shared_indices(
    run_key: str, round_num: int, size: int, fraction: float, previous_global: np.ndarray | None = None
) -> np.ndarray:
    """The k = ⌈fraction·size⌉ coordinates every site sends this round, sorted (identical at every site).

    Half: the largest |previous_global| (the last decrypted global update, shared by all sites); the
    rest: random from a generator keyed by (run_key, round). Without a previous update, all random.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"compression fraction must be in (0, 1], got {fraction!r}")
    if size < 1:
        raise ValueError(f"cannot compress an empty update (size {size})")
    k = min(size, max(1, int(np.ceil(fraction * size))))
    chosen = np.zeros(size, dtype=bool)
    if previous_global is not None:
        prev = np.abs(np.asarray(previous_global, dtype=np.float64).reshape(-1))
        if prev.size != size:
            raise ValueError(f"previous global update has {prev.size} values, the model {size}")
        top = k // 2
        if top:
            # stable order: ties broken by index, so every site picks the very same set
            chosen[np.argsort(-prev, kind="stable")[:top]] = True
    seed = int.from_bytes(hashlib.sha256(f"{run_key}|{round_num}".encode()).digest()[:16], "big")
    rest = np.flatnonzero(~chosen)
    need = k - int(chosen.sum())
    chosen[np.random.default_rng(seed).choice(rest, size=need, replace=False)] = True
    return np.flatnonzero(chosen)


class ErrorFeedback:
    """A site's memory of what it has not sent yet: residual += update; send residual[idx]; zero those."""

    def __init__(self, size: int):
        self.residual = np.zeros(int(size), dtype=np.float64)

    def compress(self, update: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """The values to send at `indices` (this update plus everything held back before)."""
        flat = np.asarray(update, dtype=np.float64).reshape(-1)
        if flat.size != self.residual.size:
            raise ValueError(f"update has {flat.size} values, the error-feedback memory {self.residual.size}")
        self.residual += flat
        sent = self.residual[indices].copy()
        self.residual[indices] = 0.0
        return sent

    @property
    def held_back(self) -> float:
        """L2 norm of what is still waiting to be sent (a diagnostic, never sent)."""
        return float(np.linalg.norm(self.residual))


def scatter(values: np.ndarray, indices: np.ndarray, size: int) -> np.ndarray:
    """A dense vector of `size` with `values` at `indices` and 0 elsewhere (the decompressed sum)."""
    out = np.zeros(int(size), dtype=np.float64)
    out[np.asarray(indices)] = np.asarray(values, dtype=np.float64)
    return out
