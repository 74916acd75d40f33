"""The federation's CKKS key, made by a hospital and handed to the other hospitals only.

No secret key ever exists outside the hospitals (DESIGN.md, threat model: the operator who
provisions never holds one). One site generates the key pair; every other site receives the
secret context encrypted to its own FLARE kit certificate and signed with the sender's kit key;
the server receives the public context only.

- :mod:`clinfed.keys.bundle`: the cryptography (certificate checks, sealing and opening a key
  bundle), with no FLARE import, so it can be tested and reviewed on its own.
- :mod:`clinfed.keys.exchange`: the FLARE job around it (``key_exchange``: controller, executor,
  recipe).
"""
