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
import hmac
from dataclasses import dataclass

import numpy as np

#: the one layer a compressed update carries: the k sent values, in the order of the shared indices
LAYER = "__shared_coordinates__"


def shared_indices(
    run_key: str,
    round_num: int,
    size: int,
    fraction: float,
    previous_global: np.ndarray | None = None,
    k: int | None = None,
) -> np.ndarray:
    """The k = ⌈fraction·size⌉ coordinates (or `k` if given) every site sends this round, sorted and
    identical at every site.

    Half: the largest |previous_global| (the last decrypted global update, shared by all sites); the
    rest: random from a generator keyed by (run_key, round). Without a previous update, all random.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"compression fraction must be in (0, 1], got {fraction!r}")
    if size < 1:
        raise ValueError(f"cannot compress an empty update (size {size})")
    k = min(size, max(1, int(np.ceil(fraction * size)) if k is None else int(k)))
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


def index_digest(key: str, round_num: int, indices: np.ndarray) -> str:
    """A keyed digest of a round's index set, sent in the clear so the server can exclude a site whose
    coordinates differ from the others' (its values would land on the wrong coordinates of the sum).

    Keyed by the sites' secret (see `CompressedSite`): the server learns only which sites agree,
    never the set; an unkeyed hash would let it test guesses about the global update's largest values.
    """
    data = np.ascontiguousarray(np.asarray(indices, dtype=np.int64)).tobytes()
    mac = hmac.new(key.encode(), f"{round_num}|".encode() + data, hashlib.sha256)
    return mac.hexdigest()[:32]


@dataclass
class _Sent:
    round: int
    indices: np.ndarray
    values: np.ndarray


class CompressedSite:
    """One site's side of a compressed run: the plaintext global model, its error feedback, and which
    round's sum it has applied.

    The server only ever holds the sum of one round's k values, so the *model* lives at the sites:
    each starts from the same seeded initialisation (`start`) and adds every round's decrypted
    average (`apply`). Sums are tagged by the server with the round they come from and the round
    they follow (`after_round`); a site that missed one cannot rebuild the model and says so rather
    than train on a wrong one. What a site sent but the sum does not hold (its update was refused,
    or the round withheld for want of contributors) goes back into its error feedback (`settle`).

    `key` seeds the random half of the index set and keys the digest: the executor derives it from
    the federation's secret key (`clinfed.he.context.site_secret`) so the server does not know it.

    `slots` (values per ciphertext, encrypted runs): an upload costs whole ciphertexts, so k is
    rounded up to fill the last one (less the contributor count's slot). The bytes are those of
    ⌈F·P⌉ values; the extra coordinates travel free. A 12k-parameter UNet at F = 0.01 thus sends
    2,047 coordinates (17 %) in one ciphertext instead of 121 in the same ciphertext.
    """

    def __init__(self, key: str, fraction: float, site: str = "site", slots: int | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"compression fraction must be in (0, 1], got {fraction!r}")
        self.key, self.fraction, self.site, self.slots = key, float(fraction), site, slots
        self.base: np.ndarray | None = None
        self.applied_round = -1
        self.previous_update: np.ndarray | None = None  # exact decrypted sum, only for ranking
        self.feedback: ErrorFeedback | None = None
        self._sent: _Sent | None = None

    @property
    def size(self) -> int:
        return 0 if self.base is None else int(self.base.size)

    @property
    def k(self) -> int:
        k = max(1, int(np.ceil(self.fraction * self.size)))
        if self.slots:
            k = -(-(k + 1) // self.slots) * self.slots - 1  # whole ciphertexts, one slot for the count
        return min(self.size, k)

    def start(self, initial: np.ndarray) -> None:
        """The model every site starts from (the seeded initialisation), flat."""
        if self.base is None:
            self.base = np.asarray(initial, dtype=np.float64).reshape(-1).copy()
            self.feedback = ErrorFeedback(self.base.size)

    def indices(self, round_num: int) -> np.ndarray:
        """This round's shared coordinates (from the last applied global update and the key)."""
        return shared_indices(self.key, round_num, self.size, self.fraction, self.previous_update, k=self.k)

    def encode(self, round_num: int, local: np.ndarray) -> tuple[np.ndarray, str]:
        """(the k values to send, the digest of their coordinates): local model − global model, plus
        everything held back before, at this round's shared coordinates."""
        if self.base is None or self.feedback is None:
            raise ValueError(f"{self.site}: compressed update before the starting model is known")
        delta = np.asarray(local, dtype=np.float64).reshape(-1) - self.base
        idx = self.indices(round_num)
        values = self.feedback.compress(delta, idx)
        self._sent = _Sent(round_num, idx, values.copy())
        return values, index_digest(self.key, round_num, idx)

    def hold_back(self, excess: np.ndarray) -> None:
        """Take ``excess`` (at this round's sent coordinates) off what was sent and keep it in the error
        feedback: the part of a value past the job's public bound, sent in a later round instead."""
        sent = self._sent
        if sent is None or self.feedback is None:
            raise ValueError(f"{self.site}: nothing sent this round to hold back from")
        excess = np.asarray(excess, dtype=np.float64).reshape(-1)
        self.feedback.residual[sent.indices] += excess
        sent.values -= excess

    def settle(self, sum_round: int, contributors: list[str] | tuple[str, ...]) -> None:
        """Give back to the error feedback what this site sent if the latest sum does not hold it."""
        sent = self._sent
        if sent is None or self.feedback is None:
            return
        if sent.round != sum_round or self.site not in contributors:
            self.feedback.residual[sent.indices] += sent.values
        self._sent = None

    def apply(self, sum_round: int, after_round: int, digest: str, average: np.ndarray, exact_sum: np.ndarray) -> None:
        """Add a round's decrypted average at that round's coordinates to the global model.

        `average` is what the model gets (noise-flooded at decryption); `exact_sum` (the unflooded
        decryption, identical at every site) only ranks the coordinates of the next round, so that all
        sites pick the same ones. Raises ValueError if this site cannot place the sum.
        """
        if self.base is None:
            raise ValueError(f"{self.site}: a compressed global update arrived before the starting model")
        if after_round != self.applied_round:
            raise ValueError(
                f"{self.site}: the compressed global update of round {sum_round} follows round {after_round}, but "
                f"this site's model is at round {self.applied_round}; a compressed run cannot be rejoined or resumed"
            )
        idx = self.indices(sum_round)
        if index_digest(self.key, sum_round, idx) != digest:
            raise ValueError(
                f"{self.site}: the federation's coordinates of round {sum_round} are not this site's; "
                "cannot place the compressed sum"
            )
        if np.size(average) != idx.size or np.size(exact_sum) != idx.size:
            raise ValueError(f"{self.site}: compressed sum holds {np.size(average)} values, expected {idx.size}")
        self.base[idx] += np.asarray(average, dtype=np.float64).reshape(-1)
        self.previous_update = scatter(exact_sum, idx, self.size)
        self.applied_round = sum_round
