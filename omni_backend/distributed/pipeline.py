"""Pipeline parallel: the transformer's blocks split into contiguous stages, one per ``pp`` rank.

Per call the rows run as micro-batches (one row each: a request's branch), so while rank 1 runs the
blocks of micro-batch 0, rank 0 already runs micro-batch 1. Activations travel with async
isend/irecv: a stage posts the receives of all its micro-batches up front and only waits for one
when it is about to use it; sends are waited for at the end of the call. Timestep embeddings and
rotary tables are cheap and depend only on inputs every rank holds, so each rank computes them
instead of receiving them. Only the last stage has the noise prediction: it runs the scheduler step
and sends the new latents back to the first stage (async_latents.py), which waits for them only
when it uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from omni_backend.distributed.groups import ParallelGroups
from omni_backend.distributed.spec import Carry, ParallelSpec


def split_blocks(num_blocks: int, stages: int) -> list[range]:
    """Contiguous, balanced slices of the blocks (the first stages take one more when uneven)."""
    base, extra = divmod(num_blocks, stages)
    bounds, start = [], 0
    for stage in range(stages):
        stop = start + base + (1 if stage < extra else 0)
        bounds.append(range(start, stop))
        start = stop
    return bounds


def _sent(carry: Carry) -> list[torch.Tensor]:
    """The activations a stage hands to the next: the streams the blocks change."""
    return [carry.hidden] if carry.context is None else [carry.hidden, carry.context]


class PipelineStage:
    """This rank's slice of the transformer and the send/receive schedule around it."""

    def __init__(self, transformer: torch.nn.Module, spec: ParallelSpec, groups: ParallelGroups):
        self.transformer = transformer
        self.spec = spec
        self.groups = groups
        self.stage = groups.local_rank("pp")
        self.num_stages = groups.size("pp")
        blocks = spec.blocks(transformer)
        self.blocks = [blocks[i] for i in split_blocks(len(blocks), self.num_stages)[self.stage]]
        self.prev = groups.global_rank(pp=self.stage - 1) if self.stage > 0 else None
        self.next = groups.global_rank(pp=self.stage + 1) if self.stage < self.num_stages - 1 else None

    @property
    def is_last(self) -> bool:
        return self.next is None

    def forward(
        self,
        micro_batches: Sequence[Callable[[], dict[str, Any]]],
        on_output: Callable[[int, torch.Tensor], None] | None = None,
    ) -> torch.Tensor | None:
        """Noise predictions of all micro-batches, concatenated, on the last stage; None on the others.

        Each micro-batch makes its transformer inputs when called. The first stage calls each one only
        when it is about to run it (its latents may still be on their way: async_latents.py); a later
        stage calls them all first, to post every receive. The last stage hands each micro-batch's
        prediction to ``on_output`` as soon as it has it."""
        later = self.prev is not None
        carries = [self.spec.embed(self.transformer, make()) for make in micro_batches] if later else []
        receives = [  # a later stage posts every receive now and waits for each only when it is needed
            [dist.irecv(x, self.prev, tag=2 * i + j) for j, x in enumerate(_sent(carry))]
            for i, carry in enumerate(carries)
        ]
        sends, outputs = [], []
        for i, make in enumerate(micro_batches):
            if later:
                carry = carries[i]
                for handle in receives[i]:
                    handle.wait()
            else:
                carry = self.spec.embed(self.transformer, make())
            for block in self.blocks:
                self.spec.run_block(block, carry)
            if self.next is not None:
                sends += [dist.isend(x.contiguous(), self.next, tag=2 * i + j) for j, x in enumerate(_sent(carry))]
            else:
                outputs.append(self.spec.head(self.transformer, carry))
                if on_output is not None:
                    on_output(i, outputs[-1])
        for handle in sends:
            handle.wait()
        return torch.cat(outputs) if self.is_last else None
