"""Dropout recovery for secure aggregation without a redo: double masking with secret-shared self masks
(Bonawitz et al. 2017, over SecAgg+'s sparse neighbour graph).

Each round a client adds, to the pairwise masks of `secure.Masking`, a self mask: ChaCha20's keystream under a
fresh 32-byte seed b. Before masking it splits b t-of-m among its m neighbours in the public graph (Shamir over
GF(2^128): PyCryptodome's `Shamir`, which shares 16-byte secrets, so b is two halves). Each neighbour's share
travels through the server sealed under the pair's agreed key (ChaCha20-Poly1305, bound to both names and the
round), so the server relays it without reading it.

After the masked views, the server asks each survivor, for every neighbour, for one of two things: for a dropped
neighbour, the pairwise mask this survivor added towards it this round (left dangling, as the dropped client's
opposite mask never arrived); for a surviving neighbour, its share of that neighbour's self-mask seed. A client
never gives both for one peer and round: with both the server would hold every mask on that peer's view. The
pairwise masks are per round (ChaCha20 nonce), so revealing one round's mask of a pair reveals no other round's:
unlike Bonawitz et al.'s single aggregation, where the dropped client's key itself is reconstructed, no mask key
is ever revealed, and a client that dropped can come back. With fewer than t shares of a self mask the round is
refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

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
    held: dict[int, dict[str, tuple[int, bytes]]] = field(default_factory=dict)  # round -> peer -> self share
    revealed: dict[tuple[int, str], str] = field(default_factory=dict)  # (round, peer) -> kind revealed
    _seeds: dict[int, bytes] = field(default_factory=dict)
    _participants: dict[int, tuple[str, ...]] = field(default_factory=dict)
    _lengths: dict[int, int] = field(default_factory=dict)

    @property
    def owner(self) -> str:
        return self.masking.owner

    def share(self, round_: int) -> dict[str, bytes]:
        """Draw this round's self-mask seed, split it and the X25519 key among the neighbours; returns each
        neighbour's shares encrypted under the pair's key (for the server to relay)."""
        neighbours = sorted(self.masking.neighbours)
        t = threshold(len(neighbours))
        self._seeds[round_] = os.urandom(32)
        self_shares = split(self._seeds[round_], t, neighbours)
        out = {}
        for peer in neighbours:
            plain = _pack(self_shares[peer])
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
            kept[peer] = _unpack(plain)
        self.held[round_] = kept

    def masked(self, values: np.ndarray, participants: tuple[str, ...], round_: int) -> np.ndarray:
        """The pairwise-masked view of `secure.Masking`, plus this round's self mask."""
        self._participants[round_] = tuple(participants)
        view = self.masking.masked(values, participants, round_, 0)
        self._lengths[round_] = view.shape[0]
        return view + self_mask(self._seeds[round_], view.shape[0])

    def reveal(self, round_: int, dropped: set[str], survivors: set[str]) -> dict[str, tuple[str, Any]]:
        """For each neighbour in this round: the pairwise mask this client added towards it if it dropped (what
        it left dangling), its self-mask share if it survived; never both for one peer and round."""
        if dropped & survivors:
            raise SecureAggregationError(f"secure aggregation: partition '{self.owner}' refuses to unmask: "
                                         f"{sorted(dropped & survivors)} reported both dropped and surviving")
        out: dict[str, tuple[str, Any]] = {}
        for peer in sorted(self.masking.neighbours & (dropped | survivors)):
            kind = KEY if peer in dropped else SELF
            if self.revealed.setdefault((round_, peer), kind) != kind:
                raise SecureAggregationError(
                    f"secure aggregation: partition '{self.owner}' refuses to reveal the {kind} share of '{peer}': "
                    f"it revealed the other kind for round {round_} before, and both would give away its vector")
            if kind == SELF and peer in self.held.get(round_, {}):
                out[peer] = (SELF, self.held[round_][peer])
            elif kind == KEY and peer in self._participants.get(round_, ()):
                length = self._lengths[round_]
                m = secure.mask(self.masking.shared_key(peer), round_, 0, length)
                out[peer] = (KEY, m if self.owner < peer else (np.zeros_like(m) - m))
        return out


def unmask(views: dict[str, np.ndarray], reveals: dict[str, dict[str, tuple[str, Any]]],
           graph: dict[str, frozenset[str]]) -> np.ndarray:
    """The server's side: the decoded sum of the survivors' views (`views`) once their self masks and the masks
    they left towards dropped neighbours are removed, from what the survivors revealed (`reveals`: survivor ->
    peer -> (kind, share or mask)). Refuses (SecureAggregationError) when a self mask has fewer than t shares."""
    survivors = set(views)
    length = next(iter(views.values())).shape[0]
    total = np.zeros(length, dtype=np.uint64)
    for view in views.values():
        total += view
    self_shares: dict[str, list[tuple[int, bytes]]] = {}
    for shares in reveals.values():
        for peer, (kind, value) in shares.items():
            if kind == SELF:
                self_shares.setdefault(peer, []).append(value)
            elif peer not in survivors:
                total -= np.asarray(value, dtype=np.uint64)  # the mask a survivor left towards a dropped peer
    for u in sorted(survivors):
        seed = combine(self_shares.get(u, []), threshold(len(graph[u])), f"the self mask of '{u}'")
        total -= self_mask(seed, length)
    return secure.decode(total)


def _pack(share: tuple[int, bytes]) -> bytes:
    return share[0].to_bytes(8, "little") + share[1]


def _unpack(raw: bytes) -> tuple[int, bytes]:
    return int.from_bytes(raw[:8], "little"), raw[8:40]

