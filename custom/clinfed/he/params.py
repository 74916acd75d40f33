"""CKKS parameters for encrypted FedAvg, chosen for a depth-0 workload.

What the workload asks of CKKS: each site multiplies its flattened update by its aggregation weight
*in plaintext*, then encrypts; the server only *adds* ciphertexts; the sites decrypt and divide by
the total weight. No ciphertext is ever multiplied, so no level is ever consumed: one data prime is
enough, and its size alone sets both the bytes on the wire and the dynamic range. (FLARE's default,
N=8192 / [60, 40, 40] / 2^40, keeps a second data prime because its aggregator multiplies the
encrypted sum by 1/Σweights; that second prime costs ~80 % more bytes per parameter.)

Security: the HomomorphicEncryption.org standard (ternary secret, classical attacks) allows at most
27 / 54 / 109 / 218 / 438 / 881 bits of total coefficient modulus for N = 1024 … 32768 at the
128-bit level; SEAL enforces the same table. The default, N=4096 with [60, 40] = 100 bits, is
within the 109-bit limit: **128-bit security**. The special (last) prime never travels: ciphertexts
live at the first data level, so only the 60-bit prime sets the wire size.

Measured with TenSEAL 0.3.18 / SEAL on this repository's code (``ckks.py``): 3 sites, 200 000 values
each uniform in [-1, 1], weights 1 / 2 / 3; "up" is one site's fresh seeded ciphertexts, "down" the
server's sum, "error" the max |decrypted sum − exact sum| (the sum peaks near 6):

=========================  ======  ========  =========  =========  ============
N / coeff bits / scale     up B/p  down B/p  enc µs/p   error      max |value|
=========================  ======  ========  =========  =========  ============
4096 / [40, 40] / 2^30     12.1    24.1      0.24       1.0e-6     64
4096 / [60, 40] / 2^40     16.2    32.2      0.25       1.1e-9     65 536
4096 / [60, 40] / 2^38     16.2    32.2      0.23       4.3e-9     262 144
**4096 / [60, 40] / 2^36** 16.2    32.2      0.24       1.8e-8     1 048 576
8192 / [60, 40] / 2^40     16.1    32.1      0.26       1.5e-9     65 536
=========================  ======  ========  =========  =========  ============

(B/p: bytes per parameter; plaintext float32 is 4. "max |value|" is :func:`max_abs_value`, the safe
bound on any entry of the *summed* weighted vector. TenSEAL's own ``ckks_vector`` serialisation
would be 24.0 / 32.1 B/p for the same parameters: see ``ckks.py`` for why ours halves it.)
N=8192 buys security margin we do not need at the same bytes per parameter and doubles the slot
padding of small models. [40, 40] / 2^30 saves 4 bytes per parameter but leaves only 64 of
headroom: sample-count weights (hundreds per site) times weights near 1 would wrap silently.
2^36 rather than 2^40 keeps the error ~5 000x below the 1e-4 relative target for values near 1
and buys 16x the headroom, so unnormalised sample-count weights stay safe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Max total coefficient-modulus bits for 128-bit classical security (HomomorphicEncryption.org
# standard, ternary secret), keyed by polynomial modulus degree N; SEAL's CoeffModulus.MaxBitCount.
MAX_COEFF_BITS_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

# Head-room kept below the wraparound bound of max_abs_value(): a factor 4 (2 bits) over a bound
# that is already worst case, so that noise, rounding and the odd outlier never come close.
SAFETY_BITS = 2


@dataclass(frozen=True)
class CKKSParams:
    """The three numbers that define a federation's CKKS context.

    ``coeff_mod_bit_sizes`` lists the primes of the modulus chain, the last one being SEAL's special
    prime (used only for key switching, which we never do); the others are the data primes.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40)
    global_scale_bits: int = 36

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        n = self.poly_modulus_degree
        if n not in MAX_COEFF_BITS_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)}, got {n}")
        if not self.coeff_mod_bit_sizes or any(not 20 <= b <= 60 for b in self.coeff_mod_bit_sizes):
            raise ValueError(f"coeff_mod_bit_sizes must be primes of 20 to 60 bits, got {self.coeff_mod_bit_sizes}")
        if self.total_coeff_bits > MAX_COEFF_BITS_128[n]:
            raise ValueError(
                f"{self.total_coeff_bits} coefficient bits exceed the {MAX_COEFF_BITS_128[n]} that N={n} "
                "allows for 128-bit security"
            )
        if not 20 <= self.global_scale_bits <= self.data_bits - SAFETY_BITS - 3:
            raise ValueError(
                f"global_scale_bits={self.global_scale_bits} leaves no head-room under {self.data_bits} data bits"
            )

    @property
    def slot_count(self) -> int:
        """Values per ciphertext: CKKS packs N/2 complex slots; we use their real parts."""
        return self.poly_modulus_degree // 2

    @property
    def data_primes(self) -> tuple[int, ...]:
        """Bit sizes of the primes a fresh ciphertext carries (all but SEAL's special prime)."""
        sizes = self.coeff_mod_bit_sizes
        return sizes[:-1] if len(sizes) > 1 else sizes

    @property
    def data_bits(self) -> int:
        return sum(self.data_primes)

    @property
    def total_coeff_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def security_bits(self) -> int:
        """128 when the modulus fits the standard's table (validated at construction)."""
        return 128

    def as_dict(self) -> dict:
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale_bits": self.global_scale_bits,
            "security_bits": self.security_bits,
        }


DEFAULT_PARAMS = CKKSParams()


def max_abs_value(params: CKKSParams) -> float:
    """A safe bound on |value| for any entry of a packed vector, *including the sum over sites*.

    Derivation: CKKS encodes slot values z (|z_j| ≤ B) into a polynomial whose coefficients are
    Δ·IDFT(z) with Δ = 2^scale_bits; each coefficient is an average of N terms of modulus ≤ Δ·B,
    so |c_i| ≤ Δ·B, with equality for a constant vector. Decryption recovers c + e modulo the data
    modulus q, read in (−q/2, q/2]: anything past q/2 wraps around to a wrong value *silently*.
    Each data prime of b bits exceeds 2^(b−1), so q/2 > 2^(data_bits − k − 1) for k data primes,
    and the fresh noise e (a few tens per site) is negligible next to that. Hence
    B < 2^(data_bits − k − 1 − scale_bits), and we keep SAFETY_BITS more below it.

    The bound applies to the summed weighted vector Σ_i w_i·x_i the server produces, so a single
    site must stay below it divided by the number of sites.
    """
    k = len(params.data_primes)
    return float(2 ** (params.data_bits - k - 1 - params.global_scale_bits - SAFETY_BITS))


def ciphertexts_for(params: CKKSParams, size: int) -> int:
    """How many ciphertexts a flat vector of ``size`` values needs under ``params``."""
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}")
    return math.ceil(size / params.slot_count)
