"""Secure aggregation against a malicious server: the protocol every encrypted sum goes through.

The masks themselves and why they sit inside the CKKS plaintext are in :mod:`clinfed.he.masking`.
This module agrees their seeds, binds them to one sum, and decides when a site may reveal what the
decrypting sites need. Training (:mod:`clinfed.fl.executor` / ``controller``) and every clinical
method (:mod:`clinfed.analytics.sums_fl`) use it; the server side is :class:`ServerRoster` plus the
task names below, the site side :class:`SiteSecAgg`.

Stages of one run (Bell et al. 2020's SecAgg+, with re-runs instead of Shamir shares, see below):

1. **Keys** (admission). Each site makes a fresh X25519 key pair for the run and answers admission
   with its public key, *signed with its FLARE kit key* and accompanied by its kit certificate.
   The server forwards the roster of admitted sites with every task; each site checks every entry
   (certificate from its own root CA, issued to that site's name, signature over run + name + key)
   and pins it for the run: a server that later substitutes a key (to sit in the middle of a pair)
   is refused by name. Pair secret: HKDF(X25519(a, B)), bound to the run and the pair's names.
2. **Masked upload** for a member set M (round r, purpose p): site i adds
   B_i + Σ_{j∈M, j>i} P_ij − Σ_{j∈M, j<i} P_ij, with P_ij = PRG(HKDF(pair secret, run|r|p|M)) and
   B_i = PRG(a fresh random seed). A sum over exactly M, each upload once, cancels every P_ij.
3. **Re-run on dropout.** If some members' uploads did not arrive, the server asks the survivors
   M' ⊂ M to upload the *same* update again, masked for M' (one more encryption, no retraining, no
   second DP spend). A site accepts a re-run only for a strict subset of its last member set, with
   more than half of the round's first set (so two disjoint groups can never both be summed) and
   never after it has revealed.
4. **Reveal.** When every member of M has uploaded, each reveals its self-mask seed for M, signed
   with its kit key over (run, r, p, M), once; after that it uploads nothing more in round r.
5. **Decrypt.** The decrypting site checks every member's signature over the very M the sum
   claims (equivocation: a site shown another set never signed this one), then subtracts
   Σ PRG(revealed seeds) from the sum's c0 before decrypting.

Why it holds (docs/threat-model.md has the tests): an unmasked sum needs every self-mask of its
member set, and a site reveals one only for its *last* set, after which it uploads no more. So in a
round a site's update is in at most one decryptable sum, and that sum is over ≥ ``min_members`` sites
that all signed it. A server that calls a live site d dropped gets d's upload masked by B_d, which d
never reveals (d's last set still contains d); one upload alone, a duplicate, a forged count, an
old round's upload or any other combination decrypts to uniform noise, which the decoders refuse.
A coalition of the server with c sites learns a single site's update only if that site's member set
holds no other honest site: with ``min_members`` = 3, the server plus one hospital learns nothing of
another hospital's update; the sum over M is what everyone gets by design.

Why re-runs and not Shamir (SecAgg+'s choice): no secret is ever revealed for a dropped site, so
there is no "which share did you reveal" race to get wrong, and the cost of a dropout is one more
encryption at each survivor. The window it leaves: a member that dies *during* the reveal stage
(after uploading for the final set) stalls that round's sum, which is then withheld (the previous
global model stays); a Shamir variant would save that round. Threshold CKKS (a shared key no single
hospital holds) is not available on Python 3.11 today: OpenFHE's wheels need 3.12 and bind N-of-N.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clinfed.errors import SiteRefusal
from clinfed.he.masking import SEED_BYTES, Mask, Ring

REMASK_TASK = "secagg_remask"  # survivors upload the kept update again, masked for the smaller set
REVEAL_TASK = "secagg_reveal"  # every member reveals its self-mask seed for the final set
SECAGG_KEY = "secagg"  # meta key: task → site {round, purpose, members, roster}
SUM_KEY = "secagg_sum"  # meta key of an encrypted sum → site: {round, purpose, members, reveals}
HELLO_KEY = "secagg_hello"  # meta key: admission reply → server
MIN_MEMBERS = 3
STATE_FORMAT = "clinfed-secagg-state/1"
STATE_TTL_S = 7 * 24 * 3600.0  # other runs' state files older than this are removed when a run starts

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_KEYS: dict[bytes, object] = {}  # a kit's parsed signing key, per process (parsing a PEM costs ~50 ms)


class SecAggError(SiteRefusal):
    """A secure-aggregation message that must not be used; one line naming the site and the cause (the
    site refuses the task: its status is "refused", as for any other refusal by its own rules)."""


def _canonical(fields: dict) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def binding(run: str, rnd: int, purpose: str, members: list[str] | tuple[str, ...]) -> bytes:
    """What a mask, a reveal and its signature are bound to: one sum of one run."""
    return _canonical({"run": run, "round": int(rnd), "purpose": purpose, "members": sorted(members)})


# --- identities: the FLARE kit ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KitIdentity:
    """A site's FLARE kit: its signing key and certificate, the root CA it trusts, the server's name."""

    site: str
    key_pem: bytes
    cert_pem: bytes
    root_ca_pem: bytes
    server_name: str | None = None

    @classmethod
    def load(cls, root: Path, site: str) -> KitIdentity:
        from clinfed.keys.exchange import server_name_of

        files = {}
        for name in ("client.key", "client.crt", "rootCA.pem"):
            path = root / "startup" / name
            if not path.is_file():
                raise SecAggError(
                    f"{site}: no {path}: secure aggregation signs with the site's FLARE kit (provision the site, "
                    "or run `clinfed simulate`, which lays out simulated kits)"
                )
            files[name] = path.read_bytes()
        return cls(site, files["client.key"], files["client.crt"], files["rootCA.pem"], server_name_of(root))

    def sign(self, data: bytes) -> str:
        return base64.b64encode(self._private_key().sign(data, _PSS, hashes.SHA256())).decode()

    def _private_key(self):
        from clinfed.keys.bundle import load_private_key

        key = _KEYS.get(self.key_pem)
        if key is None:
            key = _KEYS[self.key_pem] = load_private_key(self.key_pem, self.site)
        return key

    def verify(self, peer: str, cert_pem: bytes, data: bytes, signature: str, what: str) -> None:
        """``signature`` over ``data`` by ``peer``'s kit key, its certificate checked against our root CA."""
        from clinfed.keys.bundle import KeyExchangeError, check_site_certificate

        try:
            cert = check_site_certificate(cert_pem, self.root_ca_pem, peer, self.server_name)
        except KeyExchangeError as exc:
            raise SecAggError(f"{self.site}: {what} of {peer}: {exc}") from None
        try:
            cert.public_key().verify(base64.b64decode(signature, validate=True), data, _PSS, hashes.SHA256())
        except (InvalidSignature, ValueError, TypeError):
            raise SecAggError(f"{self.site}: {what} of {peer}: the signature does not verify") from None


# --- a site's part ---------------------------------------------------------------------------------------
@dataclass
class _Upload:
    members: tuple[str, ...]
    seed: bytes


@dataclass
class _Sum:
    """One (round, purpose) at this site: the member sets it uploaded for, in order, and the reveal."""

    uploads: list[_Upload] = field(default_factory=list)
    revealed: bool = False


class SiteSecAgg:
    """One site's secure-aggregation state for one run.

    With a ``state_file`` (what :func:`load_site` gives every job) the state outlives the executor:
    FLARE re-creates executors (its simulator does so whenever more sites than it runs at once take
    turns; a site process may restart), and a site that forgot its key, its pinned roster or that it
    already revealed a round's seed would either fail the run or, worse, upload again after a reveal.
    The file lives in the site's ``local/`` folder (mode 0600, next to its CKKS secret key), is written
    atomically after every step that changes the state, and is bound to the run and the site's name.
    Without one (tests, a bench that wants fresh keys) the state lives as long as the object.
    """

    def __init__(self, identity: KitIdentity, run: str, min_members: int = MIN_MEMBERS, state_file: Path | None = None):
        self.identity, self.site, self.run = identity, identity.site, str(run)
        self.min_members = max(int(min_members), MIN_MEMBERS)
        self.state_file = state_file
        self._roster: dict[str, tuple[bytes, bytes]] = {}  # site → (certificate PEM, X25519 public key)
        self._pairs: dict[str, bytes] = {}
        self._sums: dict[tuple[int, str], _Sum] = {}
        self.last_decrypted: dict[str, int] = {}
        if state_file is not None and state_file.is_file():
            self._restore(state_file)
        else:
            self._key = X25519PrivateKey.generate()
            self._save()
        self._pub = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    # persistence ------------------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.state_file is None:
            return
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        state = {
            "format": STATE_FORMAT,
            "run": self.run,
            "site": self.site,
            "key": raw.hex(),
            "roster": {peer: [cert.decode(), pub.hex()] for peer, (cert, pub) in self._roster.items()},
            "sums": [
                {
                    "round": rnd,
                    "purpose": purpose,
                    "uploads": [[list(u.members), u.seed.hex()] for u in entry.uploads],
                    "revealed": entry.revealed,
                }
                for (rnd, purpose), entry in self._sums.items()
            ],
            "last_decrypted": self.last_decrypted,
        }
        folder = self.state_file.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = folder / f".{self.state_file.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(state, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.state_file)  # atomic: a crash leaves the old state or the new, never half

    def _restore(self, path: Path) -> None:
        try:
            state = json.loads(path.read_text())
            if state.get("format") != STATE_FORMAT:
                raise ValueError(f"format {state.get('format')!r}")
            if state.get("run") != self.run or state.get("site") != self.site:
                raise ValueError(f"it belongs to {state.get('site')!r}, run {state.get('run')!r}")
            self._key = X25519PrivateKey.from_private_bytes(bytes.fromhex(state["key"]))
            for rnd_purpose in state["sums"]:
                entry = _Sum(
                    [_Upload(tuple(m), bytes.fromhex(seed)) for m, seed in rnd_purpose["uploads"]],
                    bool(rnd_purpose["revealed"]),
                )
                self._sums[(int(rnd_purpose["round"]), str(rnd_purpose["purpose"]))] = entry
            self.last_decrypted = {str(k): int(v) for k, v in state["last_decrypted"].items()}
            roster = {peer: (cert.encode(), bytes.fromhex(pub)) for peer, (cert, pub) in state["roster"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SecAggError(
                f"{self.site}: its secure-aggregation state {path} cannot be read ({exc}); refusing rather than "
                "starting over (a fresh key mid-run could upload twice)"
            ) from None
        for peer, (cert, pub) in roster.items():  # pinned entries were checked when first seen
            self._roster[peer] = (cert, pub)
            if peer != self.site:
                self._pairs[peer] = self._pair_secret(peer, pub)

    def _pair_secret(self, peer: str, pub: bytes) -> bytes:
        shared = self._key.exchange(X25519PublicKey.from_public_bytes(pub))
        info = b"clinfed-secagg-pair|" + _canonical({"run": self.run, "pair": sorted([self.site, peer])})
        return HKDF(hashes.SHA256(), SEED_BYTES, None, info).derive(shared)

    # stage 1 ----------------------------------------------------------------------------------------------
    def _hello_bytes(self, site: str, pub: bytes) -> bytes:
        return b"clinfed-secagg-hello|" + _canonical({"run": self.run, "site": site, "pub": pub.hex()})

    def hello(self) -> dict:
        """This site's signed X25519 public key for the run (the admission reply carries it)."""
        return {
            "pub": self._pub.hex(),
            "cert": self.identity.cert_pem.decode(),
            "sig": self.identity.sign(self._hello_bytes(self.site, self._pub)),
        }

    def join(self, roster: dict) -> None:
        """Check and pin the roster the server forwards; derive a pair secret with every member."""
        if not isinstance(roster, dict) or self.site not in roster:
            raise SecAggError(f"{self.site}: the server's key roster does not list this site")
        changed = False
        for peer in sorted(roster):
            entry = roster[peer]
            try:
                pub, cert = bytes.fromhex(entry["pub"]), str(entry["cert"]).encode()
                signature = str(entry["sig"])
            except (KeyError, TypeError, ValueError):
                raise SecAggError(f"{self.site}: the roster entry of {peer} is malformed") from None
            pinned = self._roster.get(peer)
            if pinned is not None:
                if pinned != (cert, pub):
                    raise SecAggError(
                        f"{self.site}: the server now shows another key for {peer} than earlier in this run "
                        "(a substituted key would let it read that pair's masks); refusing"
                    )
                continue
            if peer == self.site:
                if pub != self._pub:
                    raise SecAggError(f"{self.site}: the roster carries a key for this site that it never made")
            else:
                self.identity.verify(peer, cert, self._hello_bytes(peer, pub), signature, "secure-aggregation key")
                self._pairs[peer] = self._pair_secret(peer, pub)
            self._roster[peer] = (cert, pub)
            changed = True
        if changed:
            self._save()

    # stage 2-3 --------------------------------------------------------------------------------------------
    def _check_members(self, members: list[str], what: str) -> tuple[str, ...]:
        chosen = tuple(sorted(set(members)))
        if len(chosen) != len(members):
            raise SecAggError(f"{self.site}: the {what} names a site twice")
        if len(chosen) < self.min_members:
            raise SecAggError(
                f"{self.site}: the {what} has {len(chosen)} member(s), fewer than {self.min_members}: its sum would "
                "expose the members' updates; refusing"
            )
        unknown = [s for s in chosen if s not in self._roster]
        if unknown:
            raise SecAggError(f"{self.site}: the {what} names {unknown[0]}, whose key this site never checked")
        return chosen

    def mask(self, rnd: int, purpose: str, members: list[str], ring: Ring) -> Mask:
        """The mask of this site's upload for ``members`` (a re-run gets fresh masks for a smaller set)."""
        chosen = self._check_members(members, f"member set of round {rnd}")
        if self.site not in chosen:
            raise SecAggError(f"{self.site}: asked to upload for a member set of round {rnd} that leaves it out")
        state = self._sums.setdefault((int(rnd), purpose), _Sum())
        if state.revealed:
            raise SecAggError(
                f"{self.site}: round {rnd} ({purpose}) was already unmasked; a further upload could be differenced "
                "against it; refusing"
            )
        if state.uploads:
            last, first = set(state.uploads[-1].members), state.uploads[0].members
            if not set(chosen) < last:
                raise SecAggError(
                    f"{self.site}: a re-run of round {rnd} must drop sites from {sorted(last)}, got {list(chosen)}; "
                    "refusing (two overlapping sums would expose the difference)"
                )
            if 2 * len(chosen) <= len(first):
                raise SecAggError(
                    f"{self.site}: a re-run of round {rnd} for {len(chosen)} of the round's {len(first)} sites is "
                    "not a majority (two disjoint sums could be taken); refusing"
                )
        seed = secrets.token_bytes(SEED_BYTES)
        state.uploads.append(_Upload(chosen, seed))
        self._save()  # before the masked upload leaves: a restarted site knows what it uploaded for
        bound = binding(self.run, rnd, purpose, chosen)
        plus, minus = [seed], []
        for peer in chosen:
            if peer == self.site:
                continue
            pair = HKDF(hashes.SHA256(), SEED_BYTES, None, b"clinfed-secagg-mask|" + bound).derive(self._pairs[peer])
            (plus if self.site < peer else minus).append(pair)
        return Mask(ring, tuple(plus), tuple(minus))

    # stage 4 ----------------------------------------------------------------------------------------------
    def reveal(self, rnd: int, purpose: str, members: list[str]) -> dict:
        """This site's self-mask seed for its last member set of the round, signed; once."""
        chosen = self._check_members(members, f"member set of round {rnd}")
        state = self._sums.get((int(rnd), purpose))
        if state is None or not state.uploads:
            raise SecAggError(f"{self.site}: asked to unmask round {rnd} ({purpose}), for which it uploaded nothing")
        last = state.uploads[-1]
        if last.members != chosen:
            raise SecAggError(
                f"{self.site}: asked to unmask round {rnd} for {list(chosen)}, but its last upload was masked for "
                f"{list(last.members)}; refusing"
            )
        state.revealed = True
        self._save()  # before the seed leaves: after a restart this site still refuses to upload again
        bound = binding(self.run, rnd, purpose, chosen)
        return {"seed": last.seed.hex(), "sig": self.identity.sign(b"clinfed-secagg-reveal|" + bound)}

    # stage 5 ----------------------------------------------------------------------------------------------
    def correction(self, info: dict, ring: Ring, expect_round: int | None = None, purpose: str | None = None) -> Mask:
        """What to add to a sum's c0 before decrypting it, after checking that every member signed the
        very member set (and round) the server claims for the sum."""
        if not isinstance(info, dict) or not isinstance(info.get("reveals"), dict):
            raise SecAggError(
                f"{self.site}: the sum comes without its members' reveals: it cannot be unmasked (a sum the "
                "sites did not agree on); refusing"
            )
        rnd, what = int(info.get("round", -1)), str(info.get("purpose", ""))
        if purpose is not None and what != purpose:
            raise SecAggError(f"{self.site}: the server sent a {what!r} sum where a {purpose!r} sum belongs; refusing")
        if expect_round is not None and rnd != expect_round:
            raise SecAggError(
                f"{self.site}: the server sent the sum of round {rnd} as round {expect_round}'s; refusing (replay)"
            )
        if rnd < self.last_decrypted.get(what, -1):
            raise SecAggError(
                f"{self.site}: the server sent the sum of round {rnd} after this site used round "
                f"{self.last_decrypted[what]}'s; refusing (replay of an old sum)"
            )
        members = self._check_members(list(info.get("members") or []), f"sum of round {rnd}")
        bound = b"clinfed-secagg-reveal|" + binding(self.run, rnd, what, members)
        seeds = []
        for peer in members:
            reveal = info["reveals"].get(peer)
            if not isinstance(reveal, dict) or "seed" not in reveal or "sig" not in reveal:
                raise SecAggError(f"{self.site}: the sum of round {rnd} lacks {peer}'s reveal; refusing")
            self.identity.verify(
                peer, self._roster[peer][0], bound, str(reveal["sig"]),
                f"member set {list(members)} of round {rnd} (the server may have shown sites different sets)",
            )  # fmt: skip
            try:
                seed = bytes.fromhex(str(reveal["seed"]))
            except ValueError:
                raise SecAggError(f"{self.site}: {peer}'s revealed seed is not hex") from None
            if len(seed) != SEED_BYTES:
                raise SecAggError(f"{self.site}: {peer}'s revealed seed is not {SEED_BYTES} bytes")
            seeds.append(seed)
        self.last_decrypted[what] = rnd
        self._save()
        return Mask(ring, (), tuple(seeds))


def state_path(root: Path, run: str) -> Path:
    """Where a site keeps its secure-aggregation state for ``run``: ``local/secagg/<hash of run>.json``."""
    return Path(root) / "local" / "secagg" / f"{hashlib.sha256(str(run).encode()).hexdigest()[:24]}.json"


def prune_states(folder: Path, keep: Path, older_than_s: float = STATE_TTL_S) -> None:
    """Remove other runs' state files not touched for ``older_than_s`` (a run's X25519 key has no use
    once the run is over; keeping it only widens what a stolen disk gives away), and the files kept
    beside them under the same name (a run's ROC histogram, ``<name>.roc.npy``)."""
    now = time.time()
    mine = keep.name.split(".")[0]
    for path in folder.glob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and path.name.split(".")[0] != mine and now - path.stat().st_mtime > older_than_s:
                path.unlink()


def load_site(root: Path, site: str, run: str, min_members: int = MIN_MEMBERS, persist: bool = True) -> SiteSecAgg:
    """The site's secure-aggregation party for ``run``: restored from ``local/`` if this site already
    took part in the run (a re-created executor), else with a fresh key (``persist=False``: in memory)."""
    identity = KitIdentity.load(root, site)
    path = state_path(root, run) if persist else None
    party = SiteSecAgg(identity, run, min_members, path)
    if path is not None:
        prune_states(path.parent, keep=path)
    return party


# --- the server's part -----------------------------------------------------------------------------------
class ServerRoster:
    """The admitted sites' signed keys, forwarded with every task (the server cannot check them: it has
    no say in which keys the sites accept), and the meta every secure-aggregation task carries."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def add(self, site: str, hello: object) -> bool:
        if isinstance(hello, dict) and all(isinstance(hello.get(k), str) for k in ("pub", "cert", "sig")):
            self.entries[site] = {k: hello[k] for k in ("pub", "cert", "sig")}
            return True
        return False

    def task(self, rnd: int, purpose: str, members: list[str]) -> dict:
        roster = {s: self.entries[s] for s in members if s in self.entries}
        return {"round": int(rnd), "purpose": purpose, "members": sorted(members), "roster": roster}


def sum_info(rnd: int, purpose: str, members: list[str], reveals: dict[str, dict]) -> dict:
    """What travels with an unmaskable sum: its round, purpose, member set and every member's reveal."""
    return {"round": int(rnd), "purpose": purpose, "members": sorted(members), "reveals": dict(reveals)}


@dataclass
class Unmasking:
    """How a round's secure sum ended: its running sum, its members and their reveals (members [] and
    reveals None when it cannot be unmasked; ``reason`` says why in one line)."""

    acc: object
    members: list[str]
    reveals: dict[str, dict] | None
    reason: str = ""


def complete_round(
    first: list[str],
    acc: object,
    accepted: list[str],
    floor: int,
    rerun: Callable[[list[str]], tuple[object, list[str]]],
    reveal: Callable[[list[str]], dict[str, dict]],
) -> Unmasking:
    """The server's end of one secure sum, written once for every job kind: while members are missing,
    the survivors upload again for the smaller set (``rerun(members)`` → the new sum and the sites in
    it), as long as they are at least ``floor`` and a strict majority of ``first``; then every member
    must reveal (``reveal(members)`` → site → reveal). A member that does not reveal leaves the sum
    masked: it is withheld, never decrypted without that member."""
    members = sorted(first)
    while sorted(accepted) != members:
        if len(accepted) < floor or 2 * len(accepted) <= len(first):
            return Unmasking(
                acc, [], None,
                f"{len(accepted)} of the {len(first)} sites uploaded: too few to re-run the sum (at least {floor} "
                "and a majority); it stays masked",
            )  # fmt: skip
        members = sorted(accepted)
        acc, accepted = rerun(members)
    reveals = reveal(members)
    lost = [s for s in members if s not in reveals]
    if lost:
        return Unmasking(
            acc, [], None, f"{', '.join(lost)} did not reveal its mask: the sum stays masked and is withheld"
        )
    return Unmasking(acc, members, reveals)


def result_site(result) -> str:
    return (result.meta or {}).get("client_name", "?")


def collect_reveals(results: list, members: list[str], entries: dict[str, dict]) -> dict[str, dict]:
    """The reveals in a reveal task's results (FLModels); a member without one is marked failed in ``entries``."""
    reveals: dict[str, dict] = {}
    for result in results:
        meta, site = result.meta or {}, result_site(result)
        if meta.get("status") == "ok" and site in members and isinstance(meta.get("reveal"), dict):
            reveals[site] = meta["reveal"]
        elif site in entries:
            entries[site].update(status="failed", reason=meta.get("reason") or f"{site}: sent no reveal")
    for site in members:
        if site not in reveals and site in entries and entries[site].get("status") == "ok":
            entries[site].update(status="failed", reason=f"{site}: no reveal (died while unmasking)")
    return reveals
