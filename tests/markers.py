"""`needs`: what a fixture declares that the tests using it need; tests/conftest.py turns it into markers."""

from __future__ import annotations

from collections.abc import Callable

KINDS = ("ray", "train", "own_cluster", "slow")


def needs(*kinds: str) -> Callable:
    """Declare on a fixture function what the tests that use it need: "ray", "train", "own_cluster", "slow"."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; use {KINDS}")

    def mark(fn: Callable) -> Callable:
        fn._dce_needs = kinds
        return fn

    return mark
