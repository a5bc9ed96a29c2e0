"""Secure aggregation: pairwise masks over a sparse neighbour graph, agreed by X25519, that cancel in the sum.

Every primitive comes from the `cryptography` package:
- Identity: each client holds an Ed25519 key; its public half is its identity, which the other clients pin at
  enrolment (in a deployment: provisioned out of band, e.g. Flower's SuperNode authentication keys).
- Key agreement: each client makes a fresh X25519 key pair and signs its public key together with its name;
  the server relays the signed keys, and a client refuses a key whose signature does not verify against the
  pinned identity of the peer named, so a key the server substituted is detected.
- Masks: HKDF-SHA256 of the X25519 shared secret (bound to both names) is a ChaCha20 key; the keystream for
  one round and attempt (the nonce) is the mask, as uint64 words.

Each client encodes its vector in fixed point as integers mod 2^64 and adds, for every neighbour taking part,
`+mask` towards a neighbour whose name sorts after its own and `-mask` towards one before: summed over the
participants every mask appears once with each sign, so the server gets the exact sum and nothing about any
one vector. As SecAgg+ (Bell et al., CCS 2020) the masks follow a sparse graph, not every pair: a Harary graph
of even degree m (each client's m/2 successors and predecessors on a ring in a public random order), which
stays connected after removing any m - 1 clients. A client masks only if the graph among the round's
participants is connected and the round has at least the agreed minimum of participants, so the server
cannot isolate it (a component's masks cancel within it, which would give away that component's sum).

Dropouts: FederatedKMeans runs the round again without the dropped clients, with fresh masks (per round and
attempt); with dropout_recovery, engine.federated.recovery recovers the round without a redo (Bonawitz et al.'s
2017 double masking, secret-shared self masks); see docs/federated.md.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from engine.errors import DataError

# 2^-20 ~ 1e-6 resolution; |value| up to 2^62 / 2^20 ~ 4.4e12 summed over every client.
FRAC_BITS = 20
_SCALE = float(1 << FRAC_BITS)
_RANGE = float(1 << 62)
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecureAggregationError(DataError):
    """A client refuses to take part: a relayed key is not its peer's, or the round could isolate it."""


def default_degree(n: int) -> int:
    """The neighbour graph's degree: every pair below 8 clients, else about 2 log2(n) (even), as SecAgg+."""
    if n <= 8:
        return n - 1
    return min(n - 1, 2 * math.ceil(math.log2(n)))


@functools.lru_cache(maxsize=8)
def neighbour_graph(names: tuple[str, ...], degree: int, seed: int) -> dict[str, frozenset[str]]:
    """The public mask graph: a Harary graph of `degree` over the clients in a random order seeded by `seed`
    (odd degrees are rounded up). Complete when degree >= n - 1."""
    n = len(names)
    if degree >= n - 1:
        return {a: frozenset(b for b in names if b != a) for a in names}
    order = [names[i] for i in np.random.default_rng(seed).permutation(n)]
    half = (degree + 1) // 2
    graph: dict[str, set[str]] = {a: set() for a in names}
    for i, a in enumerate(order):
        for j in range(1, half + 1):
            b = order[(i + j) % n]
            graph[a].add(b)
            graph[b].add(a)
    return {a: frozenset(b) for a, b in graph.items()}


@functools.lru_cache(maxsize=64)
def _round_view(names: tuple[str, ...], degree: int, seed: int, participants: tuple[str, ...]
                ) -> tuple[frozenset[str], bool]:
    """The participants as a set, and whether the graph among them is connected. Cached: the clients of one host
    get the same participant tuple in a round, so the O(n) work is done once per host, not once per client."""
    graph = neighbour_graph(names, degree, seed)
    live = frozenset(participants)
    start = participants[0]
    seen, todo = {start}, [start]
    while todo:
        for b in graph[todo.pop()]:
            if b in live and b not in seen:
                seen.add(b)
                todo.append(b)
    return live, len(seen) == len(live)


class IdentityKey:
    """A client's long-term Ed25519 signing key; `public` (32 bytes) is its identity."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes(*_RAW)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def _key_message(owner: str, public: bytes) -> bytes:
    return b"dce-secagg-key\x00" + owner.encode() + b"\x00" + public


class KeyPair:
    """A fresh X25519 key pair for one run, its public half signed by the owner's identity."""

    def __init__(self, owner: str, identity: IdentityKey) -> None:
        self.owner = owner
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(*_RAW)
        self.signature = identity.sign(_key_message(owner, self.public))

    def signed(self) -> dict[str, bytes]:
        return {"public": self.public, "signature": self.signature}

    def shared_key(self, peer: str, signed: dict[str, bytes], peer_identity: bytes) -> bytes:
        """The 32-byte mask key this client shares with `peer`, after checking that `peer`'s identity signed the
        relayed public key; the same from either side."""
        try:
            public = bytes(signed["public"])
            Ed25519PublicKey.from_public_bytes(peer_identity).verify(bytes(signed["signature"]),
                                                                     _key_message(peer, public))
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(public))
        except (InvalidSignature, KeyError, TypeError, ValueError):
            raise SecureAggregationError(
                f"secure aggregation: partition '{self.owner}' refuses the public key relayed for '{peer}': it is "
                f"not signed by '{peer}''s identity (a substituted key?)") from None
        return pair_key(secret, self.owner, peer)



def pair_key(secret: bytes, a: str, b: str) -> bytes:
    """The 32-byte mask key of the pair (a, b) from their X25519 shared secret: HKDF-SHA256 bound to both names."""
    pair = "\x00".join(sorted((a, b))).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"dce-secagg-mask\x00" + pair).derive(secret)


def mask(key: bytes, round_: int, attempt: int, length: int) -> np.ndarray:
    """The uint64 mask of one pair for one round and attempt: ChaCha20's keystream under the pair's key, with
    the round and attempt as nonce, so two masked views of one client never differ by its true difference."""
    # cryptography's ChaCha20 nonce is 16 bytes: a 4-byte block counter (0), then 12 bytes of nonce.
    nonce = (0).to_bytes(4, "little") + round_.to_bytes(8, "little") + attempt.to_bytes(4, "little")
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype=np.uint64).copy()


def encode(values: np.ndarray, n_parties: int, where: str) -> np.ndarray:
    """Fixed-point encoding as uint64 (two's complement), small enough that the sum of n_parties encodings
    cannot wrap around."""
    q = np.rint(np.asarray(values, dtype=np.float64) * _SCALE)
    limit = _RANGE / max(1, n_parties)
    too_big = np.abs(q) >= limit
    if too_big.any():
        value = float(np.asarray(values, dtype=np.float64).ravel()[np.flatnonzero(too_big.ravel())[0]])
        raise DataError(
            f"{where}: secure aggregation cannot encode {value:.4g}: with {n_parties} clients values must stay "
            f"below {limit / _SCALE:.3g} in magnitude; scale the data down"
        )
    return q.astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    """The float64 values of a sum of encodings (mod 2^64)."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / _SCALE


class Masking:
    """One client's side of secure aggregation: its keys, the public graph and the keys it shares."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.identity = IdentityKey()
        self._identities: dict[str, bytes] | None = None
        self._graph: tuple[tuple[str, ...], int, int] | None = None
        self._min_participants = 2
        self._keys: KeyPair | None = None
        self._shared: dict[str, bytes] = {}

    def enrol(self, identities: dict[str, bytes], names: tuple[str, ...], degree: int, seed: int,
              min_participants: int) -> dict[str, bytes]:
        """Pin the identities of this client's neighbours (once: a later, different one is refused), take the
        public graph and the smallest round it will mask in; returns its fresh signed X25519 public key."""
        if self.owner not in names:
            raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' is not in the graph")
        graph = neighbour_graph(tuple(names), degree, seed)
        pinned = dict(self._identities or {})
        for peer in sorted(graph[self.owner]):
            if peer not in identities:
                raise SecureAggregationError(f"secure aggregation: no identity was given for '{peer}', a neighbour "
                                             f"of '{self.owner}'")
            if pinned.setdefault(peer, bytes(identities[peer])) != bytes(identities[peer]):
                raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' refuses a new identity "
                                             f"for '{peer}' (identities are pinned at enrolment)")
        self._identities = pinned
        self._graph = (tuple(names), degree, seed)
        self._min_participants = max(2, min_participants)
        self._keys = KeyPair(self.owner, self.identity)
        return self._keys.signed()

    def shared_key(self, peer: str) -> bytes:
        """The key agreed with neighbour `peer` (KeyError if none was)."""
        return self._shared[peer]

    @property
    def neighbours(self) -> frozenset[str]:
        if self._graph is None:
            return frozenset()
        return neighbour_graph(*self._graph)[self.owner]

    def agree(self, signed_keys: dict[str, dict[str, bytes]]) -> None:
        """Derive the key shared with every neighbour from the signed public keys the server relayed."""
        if self._keys is None or self._identities is None:
            raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' was not enrolled")
        self._shared = {peer: self._keys.shared_key(peer, signed_keys[peer], self._identities[peer])
                        for peer in self.neighbours if peer in signed_keys}

    def masked(self, values: np.ndarray, participants: tuple[str, ...], round_: int, attempt: int) -> np.ndarray:
        """`values` encoded and masked towards every participating neighbour; refuses a round that could isolate
        this client (too few participants, or a graph among them that falls apart)."""
        if self._graph is None:
            raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' has no agreed keys")
        live, connected = _round_view(*self._graph, tuple(participants))
        if self.owner not in live:
            raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' is not a participant")
        if len(participants) < self._min_participants:
            raise SecureAggregationError(
                f"secure aggregation: partition '{self.owner}' refuses a round of {len(participants)} participants, "
                f"fewer than the {self._min_participants} agreed at enrolment")
        if not connected:
            raise SecureAggregationError(
                f"secure aggregation: partition '{self.owner}' refuses a round whose {len(participants)} "
                "participants do not form a connected mask graph (too many dropouts for the graph's degree)")
        out = encode(values, len(participants), where=f"partition '{self.owner}'")
        for peer in sorted(self.neighbours & live):
            if peer not in self._shared:
                raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' has no key agreed with "
                                             f"'{peer}'")
            m = mask(self._shared[peer], round_, attempt, out.shape[0])
            # uint64 arithmetic wraps around: exactly arithmetic mod 2^64.
            if self.owner < peer:
                out += m
            else:
                out -= m
        return out


def unmasked_sum(views: list[np.ndarray]) -> np.ndarray:
    """The decoded sum of every participant's masked view (the masks cancel)."""
    total = np.zeros_like(views[0])
    for v in views:
        total += v
    return decode(total)
