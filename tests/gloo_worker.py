"""A torch.distributed (gloo) worker for tests/test_dec.py: its share of the rows' DEC target, all-reduced.

A module of its own so that the spawned processes import torch and the engine only, not the test module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.models import build_model
from engine.train.refine import update_target


def target_share(rank: int, world: int, folder: str, bounds: list[int]) -> None:
    """Rows bounds[rank]:bounds[rank + 1] of setup.pt's data: two target updates, saved to rank<r>.pt."""
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        setup = torch.load(f"{folder}/setup.pt")
        model = build_model(**setup["args"])
        model.load_state_dict(setup["state"])
        shard = setup["x"][bounds[rank]:bounds[rank + 1]]

        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        first = update_target(model, shard, reduce_sum=reduce_sum)
        with torch.no_grad():
            model.centers.add_(setup["shift_centers"])  # Q and the labels move before the second update
        second = update_target(model, shard, previous=first, reduce_sum=reduce_sum)
        torch.save({"p": second.p, "record": second.record, "first": first.record}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
