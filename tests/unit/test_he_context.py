"""Claims about the federation's key files: who holds which key, and how a foreign key is told apart."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import tenseal as ts

from clinfed.he import (
    HEContextError,
    context_fingerprint,
    create_context_pair,
    decrypt_vector,
    encrypt_vector,
    load_server_context,
    load_site_context,
    sum_ciphertexts,
    write_context_pair,
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("kit")
    site, server = root / "site_context.tenseal", root / "server_context.tenseal"
    fingerprint = write_context_pair(site, server)
    return site, server, fingerprint


def test_server_context_holds_no_secret_key_and_cannot_decrypt(kit):
    site_path, server_path, _ = kit
    site, server = load_site_context(site_path), load_server_context(server_path)
    assert site.is_private()
    assert not server.is_private()
    cts = encrypt_vector(site, np.arange(10.0))
    total = sum_ciphertexts(server, [cts, cts])  # the server can add...
    with pytest.raises(HEContextError, match="cannot decrypt"):
        decrypt_vector(server, total, 10)  # ...but not read the sum
    with pytest.raises(ValueError):
        ts.ckks_vector(server, [1.0, 2.0]).decrypt()  # nor through TenSEAL's own API
    np.testing.assert_allclose(decrypt_vector(site, total, 10), 2 * np.arange(10.0), atol=1e-6)


def test_site_file_is_owner_only_and_server_file_lacks_the_key(kit):
    site_path, server_path, _ = kit
    assert stat.S_IMODE(os.stat(site_path).st_mode) == 0o600
    assert server_path.stat().st_size < site_path.stat().st_size


def test_load_server_context_refuses_a_secret_context(kit):
    site_path, _, _ = kit
    with pytest.raises(HEContextError) as err:
        load_server_context(site_path)
    message = str(err.value)
    assert str(site_path) in message and "secret key" in message and "\n" not in message


def test_load_site_context_refuses_a_public_context(kit):
    _, server_path, _ = kit
    with pytest.raises(HEContextError, match="no secret key") as err:
        load_site_context(server_path)
    assert str(server_path) in str(err.value)


def test_unreadable_or_garbage_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.tenseal"
    garbage.write_bytes(b"not a context")
    with pytest.raises(HEContextError, match=r"garbage\.tenseal"):
        load_site_context(garbage)
    with pytest.raises(HEContextError, match=r"missing\.tenseal"):
        load_server_context(tmp_path / "missing.tenseal")


def test_a_bfv_context_is_refused(tmp_path):
    bfv = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
    path = tmp_path / "bfv.tenseal"
    path.write_bytes(bfv.serialize(save_secret_key=True))
    with pytest.raises(HEContextError, match="BFV"):
        load_site_context(path)


def test_fingerprint_agrees_between_site_and_server_across_save_and_load(kit, tmp_path):
    site_path, server_path, fingerprint = kit
    site, server = load_site_context(site_path), load_server_context(server_path)
    assert context_fingerprint(site) == context_fingerprint(server) == fingerprint
    # and again after each side writes its context back out and reads it in
    (tmp_path / "s").write_bytes(site.serialize(save_secret_key=True))
    (tmp_path / "p").write_bytes(server.serialize())
    assert context_fingerprint(load_site_context(tmp_path / "s")) == fingerprint
    assert context_fingerprint(load_server_context(tmp_path / "p")) == fingerprint
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0


def test_fingerprint_differs_for_another_key_with_the_same_parameters(kit):
    _, _, fingerprint = kit
    other_secret, other_public = create_context_pair()
    assert context_fingerprint(other_secret) == context_fingerprint(other_public) != fingerprint


def test_flare_hebuilder_files_load_and_aggregate(tmp_path):
    """FLARE's provisioning builder writes plain TenSEAL contexts: the same loaders take them."""
    from nvflare.lighter.impl.he import HEBuilder

    builder = HEBuilder()
    builder.initialize(None, None)  # makes the context; project and provision context are unused
    client, server = tmp_path / "client_context.tenseal", tmp_path / "server_context.tenseal"
    client.write_bytes(builder.get_serialized_context(is_client=True))
    server.write_bytes(builder.get_serialized_context(is_client=False))
    site_ctx, server_ctx = load_site_context(client), load_server_context(server)
    with pytest.raises(HEContextError, match="secret key"):
        load_server_context(client)
    # symmetric contexts carry no public key: the fingerprint can only cover the parameters
    assert context_fingerprint(site_ctx) == context_fingerprint(server_ctx)
    assert context_fingerprint(site_ctx).startswith("params-only:")
    x = np.linspace(-1, 1, 5000)
    total = sum_ciphertexts(server_ctx, [encrypt_vector(site_ctx, x), encrypt_vector(site_ctx, 2 * x)])
    np.testing.assert_allclose(decrypt_vector(site_ctx, total, x.size), 3 * x, atol=1e-6)
