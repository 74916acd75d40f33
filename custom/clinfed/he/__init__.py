"""CKKS-encrypted aggregation, FLARE-free: pack → weight → encrypt (sites), add (server), decrypt (sites).

FLARE filters and aggregators elsewhere in clinfed are thin wrappers over these functions.
"""

from clinfed.he.aggregation import EncryptedSum, PlainWeightedSum, decrypt_average, weighted_encrypt
from clinfed.he.ckks import (
    InvalidCiphertext,
    check_ciphertexts,
    context_params,
    decrypt_vector,
    encrypt_vector,
    expected_ciphertext_count,
    slot_count,
    sum_ciphertexts,
)
from clinfed.he.compact import (
    COMPACT_PARAMS,
    GRID_PARAMS,
    CompactParams,
    CompactSpec,
    CompactSum,
    clamp_update,
    compact_decrypt_average,
    compact_decrypt_sum,
    compact_encrypt,
)
from clinfed.he.context import (
    HEContextError,
    context_fingerprint,
    create_context,
    create_context_pair,
    load_server_context,
    load_site_context,
    public_context,
    write_context_pair,
)
from clinfed.he.packing import Layout, flatten, layout_from_json, layout_to_json, unflatten
from clinfed.he.params import DEFAULT_PARAMS, CKKSParams, max_abs_value

__all__ = [
    "COMPACT_PARAMS",
    "DEFAULT_PARAMS",
    "GRID_PARAMS",
    "CKKSParams",
    "CompactParams",
    "CompactSpec",
    "CompactSum",
    "EncryptedSum",
    "HEContextError",
    "InvalidCiphertext",
    "Layout",
    "PlainWeightedSum",
    "check_ciphertexts",
    "clamp_update",
    "compact_decrypt_average",
    "compact_decrypt_sum",
    "compact_encrypt",
    "context_fingerprint",
    "context_params",
    "create_context",
    "create_context_pair",
    "decrypt_average",
    "decrypt_vector",
    "encrypt_vector",
    "expected_ciphertext_count",
    "flatten",
    "layout_from_json",
    "layout_to_json",
    "load_server_context",
    "load_site_context",
    "max_abs_value",
    "public_context",
    "slot_count",
    "sum_ciphertexts",
    "unflatten",
    "weighted_encrypt",
    "write_context_pair",
]
