"""Secure aggregation: pairwise additive masks, agreed by Diffie-Hellman, that cancel exactly in the sum.

Each client encodes its vector in fixed point as integers mod 2^64 and adds, for every other participant, a
mask drawn from a stream seeded by their shared Diffie-Hellman secret: `+mask` towards a peer whose name sorts
after its own, `-mask` towards one before. Summed over all participants every mask appears once with each sign,
so the server gets the exact sum of the encoded vectors and nothing about any one of them. The public keys
pass through the server, which lacks every private exponent and so cannot derive a mask.

Dropouts are handled by redoing the round without the missing client (the masks are per round and attempt),
not by secret-sharing the keys as Bonawitz et al. (2017) do.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np

from engine.errors import DataError

# RFC 3526, group 14: the 2048-bit MODP prime, generator 2.
MODP_2048 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
GENERATOR = 2
_KEY_BYTES = 256
# 2^-20 ~ 1e-6 resolution; |value| up to 2^62 / 2^20 ~ 4.4e12 summed over every client.
FRAC_BITS = 20
_SCALE = float(1 << FRAC_BITS)
_RANGE = float(1 << 62)


class KeyPair:
    """A Diffie-Hellman key pair in the RFC 3526 group: a 256-bit secret exponent and its public key."""

    def __init__(self) -> None:
        self._private = secrets.randbits(256) | (1 << 255)
        self.public = pow(GENERATOR, self._private, MODP_2048)

    def shared_secret(self, peer_public: int, peer: str) -> bytes:
        """The secret this key pair shares with the owner of `peer_public`; the same from either side."""
        check_public_key(peer_public, peer)
        return pow(peer_public, self._private, MODP_2048).to_bytes(_KEY_BYTES, "big")


def check_public_key(key: object, owner: str) -> None:
    """A public key is an int in (1, p - 1); 0, 1 and p - 1 would make the shared secret predictable."""
    if isinstance(key, bool) or not isinstance(key, int) or not 1 < key < MODP_2048 - 1:
        raise DataError(f"secure aggregation: the public key of '{owner}' is not a valid group element")


def mask(secret: bytes, round_: int, attempt: int, length: int) -> np.ndarray:
    """The uint64 mask vector of one pair for one round and attempt: fresh each time, so two masked views
    of one client never differ by its true difference."""
    digest = hashlib.sha256(b"dce-secagg-mask" + secret + round_.to_bytes(8, "big") + attempt.to_bytes(8, "big"))
    key = np.frombuffer(digest.digest(), dtype=np.uint64)[:2].copy()
    return np.random.Generator(np.random.Philox(key=key)).bit_generator.random_raw(length).astype(np.uint64)


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


def masked(values: np.ndarray, me: str, shared: dict[str, bytes], participants: list[str], round_: int,
           attempt: int) -> np.ndarray:
    """`values` encoded and masked towards every other participant; the masks cancel in the sum over all."""
    out = encode(values, len(participants), where=f"partition '{me}'")
    for peer in participants:
        if peer == me:
            continue
        if peer not in shared:
            raise DataError(f"secure aggregation: partition '{me}' has no key agreed with '{peer}'")
        m = mask(shared[peer], round_, attempt, out.shape[0])
        # uint64 arithmetic wraps around: exactly arithmetic mod 2^64.
        if me < peer:
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
