"""key_exchange: a hospital makes the federation's CKKS key pair and hands it to the other hospitals.

No kit carries a CKKS key (the operator who provisions must never hold one). This job, run once the
kits are up, has one site (the first that already holds a key, else the first by name) generate
the key pair and send each other site its secret context encrypted to that site's FLARE kit
certificate and signed with its own kit key; the server keeps only the public context. Sites that
already hold the key keep it, so running it again after `clinfed provision --add-site` gives only
the new site the key. `clinfed up` submits it by itself when a site or the server lacks its context.
Deployment only (it needs the kits' certificates): `clinfed submit key_exchange --kit <admin kit> --wait`.
See clinfed.keys.exchange and docs/keys.md.
"""

from clinfed.keys.exchange import KeyExchangeRecipe

DEFAULTS = {"sites": 3, "rounds": 1}


def make_recipe(sites: int, **_: object) -> KeyExchangeRecipe:
    """Rounds, encryption and ε do not apply: one exchange, every site takes part."""
    return KeyExchangeRecipe(name="key_exchange", num_sites=sites)
