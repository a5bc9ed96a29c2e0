"""Dropout recovery for secure aggregation: secret-shared mask keys and self masks (Bonawitz et al. 2017, SecAgg+).

Each round a client adds, to the pairwise masks of `secure.Masking`, a self mask: ChaCha20's keystream under a
fresh 32-byte seed b. Before masking it splits two secrets t-of-m among its m neighbours in the public graph
(Shamir over GF(2^128), PyCryptodome's `Shamir`, which shares 16-byte secrets: each 32-byte secret is two halves):
its X25519 private key (from which every pairwise mask of the run follows) and b. Each neighbour's shares travel
through the server encrypted and authenticated under the pair's agreed key (ChaCha20-Poly1305, bound to both names
and the round), so the server relays them without reading them.

When clients drop after the shares went out, the server asks each survivor, for every neighbour, for one kind of
share: of the X25519 key of a dropped neighbour (to remove the masks it left dangling in the survivors' views), of
the self-mask seed of a surviving one (to remove its self mask). A client never reveals both kinds for one peer,
in any round: the server would then hold that peer's pairwise and self masks, i.e. its vector. A client whose key
was revealed has lost its pairwise masks' secrecy for the rest of the run: its neighbours will not reveal its self
mask again, so it cannot take part in a later round (a server driving recovery takes it out). With fewer than
t shares of a secret the round is refused. Not yet driven by FederatedKMeans' transport (docs/federated.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from engine.federated import secure
from engine.federated.secure import SecureAggregationError

KEY, SELF = "key", "self"


def threshold(neighbours: int) -> int:
    """Shares needed to rebuild a secret: a majority of the holders, at least 2 (one holder alone never can)."""
    return max(2, neighbours // 2 + 1)


def split(secret: bytes, t: int, holders: list[str]) -> dict[str, tuple[int, bytes]]:
    """A 32-byte secret as t-of-len(holders) Shamir shares, one per holder: (index, 32 bytes = two 16-byte halves)."""
    halves = [Shamir.split(t, len(holders), secret[i:i + 16]) for i in (0, 16)]
    return {h: (halves[0][i][0], halves[0][i][1] + halves[1][i][1]) for i, h in enumerate(holders)}


def combine(shares: list[tuple[int, bytes]], t: int, what: str) -> bytes:
    """The secret from at least t shares; fewer refuse the round."""
    if len(shares) < t:
        raise SecureAggregationError(f"secure aggregation: only {len(shares)} shares of {what}, fewer than the "
                                     f"threshold {t}: the round cannot be unmasked and is refused")
    shares = shares[:t]
    return b"".join(Shamir.combine([(i, s[o:o + 16]) for i, s in shares]) for o in (0, 16))


def self_mask(seed: bytes, length: int) -> np.ndarray:
    """The uint64 self mask of a 32-byte seed (ChaCha20 keystream, as the pairwise masks)."""
    return secure.mask(seed, 0, 0, length)


def _aad(sender: str, receiver: str, round_: int) -> bytes:
    return b"dce-secagg-share\x00" + sender.encode() + b"\x00" + receiver.encode() + round_.to_bytes(8, "little")


@dataclass
class RecoveringClient:
    """One client's side of secure aggregation with dropout recovery, over an enrolled `secure.Masking`."""

    masking: secure.Masking
    held: dict[int, dict[str, dict[str, tuple[int, bytes]]]] = field(default_factory=dict)  # round -> peer -> kind
    revealed: dict[str, str] = field(default_factory=dict)  # peer -> the kind of share revealed for it
    _seeds: dict[int, bytes] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.masking.owner

    def share(self, round_: int) -> dict[str, bytes]:
        """Draw this round's self-mask seed, split it and the X25519 key among the neighbours; returns each
        neighbour's shares encrypted under the pair's key (for the server to relay)."""
        neighbours = sorted(self.masking.neighbours)
        t = threshold(len(neighbours))
        self._seeds[round_] = os.urandom(32)
        key = self.masking.private_key_bytes()
        key_shares, self_shares = split(key, t, neighbours), split(self._seeds[round_], t, neighbours)
        out = {}
        for peer in neighbours:
            plain = _pack(key_shares[peer]) + _pack(self_shares[peer])
            out[peer] = ChaCha20Poly1305(self.masking.shared_key(peer)).encrypt(
                round_.to_bytes(12, "little"), plain, _aad(self.owner, peer, round_))
        return out

    def receive(self, round_: int, boxes: dict[str, bytes]) -> None:
        """Keep the shares each neighbour sent this client (relayed by the server); a box that does not decrypt
        under the pair's key was not made by that neighbour and is refused."""
        kept = {}
        for peer, box in boxes.items():
            try:
                plain = ChaCha20Poly1305(self.masking.shared_key(peer)).decrypt(
                    round_.to_bytes(12, "little"), bytes(box), _aad(peer, self.owner, round_))
            except (InvalidTag, KeyError):
                raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' refuses the shares "
                                             f"relayed from '{peer}': not sealed by '{peer}'") from None
            kept[peer] = {KEY: _unpack(plain[:40]), SELF: _unpack(plain[40:])}
        self.held[round_] = kept

    def masked(self, values: np.ndarray, participants: tuple[str, ...], round_: int) -> np.ndarray:
        """The pairwise-masked view of `secure.Masking`, plus this round's self mask."""
        view = self.masking.masked(values, participants, round_, 0)
        return view + self_mask(self._seeds[round_], view.shape[0])

    def reveal(self, round_: int, dropped: set[str], survivors: set[str]) -> dict[str, tuple[str, tuple[int, bytes]]]:
        """For each neighbour in this round: its key share if it dropped, its self-mask share if it survived;
        never both kinds for one peer in the run."""
        if dropped & survivors:
            raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' refuses to unmask: "
                                         f"{sorted(dropped & survivors)} reported both dropped and surviving")
        out = {}
        for peer, shares in self.held.get(round_, {}).items():
            kind = KEY if peer in dropped else SELF if peer in survivors else None
            if kind is None:
                continue
            if self.revealed.get(peer, kind) != kind:
                raise SecureAggregationError(
                    f"secure aggregation: partition '{self.owner}' refuses to reveal the {kind} share of '{peer}': "
                    f"it revealed its {self.revealed[peer]} share before, and both would give away its vector")
            self.revealed[peer] = kind
            out[peer] = (kind, shares[kind])
        return out


def unmask(views: dict[str, np.ndarray], reveals: dict[str, dict[str, tuple[str, tuple[int, bytes]]]],
           graph: dict[str, frozenset[str]], signed_keys: dict[str, dict[str, bytes]], round_: int,
           attempt: int = 0) -> np.ndarray:
    """The server's side: the decoded sum of the survivors' views (`views`) once their self masks and the masks
    dropped clients left dangling are removed, from the shares the survivors revealed (`reveals`: survivor ->
    peer -> (kind, share)). Refuses (SecureAggregationError) when any secret has fewer than t shares."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    survivors = set(views)
    length = next(iter(views.values())).shape[0]
    total = np.zeros(length, dtype=np.uint64)
    for view in views.values():
        total += view
    collected: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
    for shares in reveals.values():
        for peer, (kind, share) in shares.items():
            collected.setdefault((peer, kind), []).append(share)
    for u in sorted(survivors):
        seed = combine(collected.get((u, SELF), []), threshold(len(graph[u])), f"the self mask of '{u}'")
        total -= self_mask(seed, length)
    dropped = {u for (u, kind) in collected if kind == KEY}
    for u in sorted(dropped):
        private = X25519PrivateKey.from_private_bytes(
            combine(collected[(u, KEY)], threshold(len(graph[u])), f"the mask key of '{u}'"))
        for v in sorted(graph[u] & survivors):
            secret = private.exchange(X25519PublicKey.from_public_bytes(bytes(signed_keys[v]["public"])))
            m = secure.mask(secure.pair_key(secret, u, v), round_, attempt, length)
            # v added +m towards a peer whose name sorts after its own, -m otherwise: take it back.
            if v < u:
                total -= m
            else:
                total += m
    return secure.decode(total)


def _pack(share: tuple[int, bytes]) -> bytes:
    return share[0].to_bytes(8, "little") + share[1]


def _unpack(raw: bytes) -> tuple[int, bytes]:
    return int.from_bytes(raw[:8], "little"), raw[8:40]

