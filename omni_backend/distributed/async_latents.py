"""Pipeline parallel's scheduler step: the last stage steps, the first stage gets the latents late.

Only the last ``pp`` stage has the noise prediction (pipeline.py), so it alone runs the requests'
scheduler steps: each request's scheduler state (a multistep scheduler's history included) lives
there. It sends the new latents back to the first stage with isend. The first stage posts the
matching irecv, keeps it as an ``AsyncLatents`` in the request's state and returns at once (rank 0
answers the driver, which plans the next step meanwhile, and may run its stage of another batch
whose latents are there); it waits only where the latents are read: the request's next transformer
call (``resolve``), its output (``output_latents``) or its end (``release``). The stages in between
never read latents (activations reach them instead), so they only advance the step index.

This is vLLM-Omni's AsyncLatents (``vllm_omni.diffusion.distributed.pipeline_parallel``) without its
transparent tensor proxy: the latents are resolved explicitly where they are read, and code that
reads an unresolved one fails loudly (an ``AsyncLatents`` is no tensor) instead of reading stale values.

Without CFG-parallel the last stage steps each request as soon as its rows are through the pipeline
(``step_early``), inside the transformer call, and the first stage waits for a request's latents only
when that request's first row is next (the denoiser builds the rows lazily): in steady state the
first stage runs a request's next step while the last stage still runs the other requests' rows of
the current one, so the pipeline does not drain between steps. A request whose preview is due this
step is stepped in ``step`` as before (its clean latents come from the state before the step).

A first and a last stage number their messages in the order both issue them (every rank runs the
same plans over the same states in the same order); the number is the message's tag. The early
latents' numbers are taken by ``plan_sends`` before the call, on both ends, as the previews and the
other latents come later on the first stage but may come first on the last.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from omni_backend.distributed.groups import ParallelGroups
from omni_backend.pipelines.base import DenoiseState, PipelineStages

_TAG_BASE = 1 << 20  # apart from the activations' small tags (pipeline.py)


class AsyncLatents:
    """A posted receive of one request's latents; ``wait`` returns them once they have arrived."""

    def __init__(self, buffer: torch.Tensor, work: dist.Work):
        self.buffer = buffer
        self.work = work

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.buffer


class PipelineStepper:
    """The scheduler-step half of pipeline parallel on one rank, over the family's own stage methods."""

    def __init__(self, stages: PipelineStages, groups: ParallelGroups):
        self.stages = stages
        stage, last = groups.local_rank("pp"), groups.size("pp") - 1
        self.is_first, self.is_last = stage == 0, stage == last
        # the other end of this rank's latents: the last stage of its pipeline, or the first
        self.peer = groups.global_rank(pp=last if self.is_first else 0)
        self.pending: dict[str, AsyncLatents] = {}  # first stage: request id -> its latents in flight
        self._messages = 0
        self._early_tags: dict[str, int] = {}  # request id -> tag of its latents, for those stepped early
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []  # last stage: early sends, awaited in ``step``
        # the family's methods (bound), which ``install`` replaces on this rank's stages
        self._step = stages.step
        self._clean = stages.predicted_clean_latents
        self._output = stages.output_latents
        self._release = stages.release

    def install(self) -> None:
        """Route the stages' step, preview, output and release through this rank's role."""
        self.stages.step = self.step  # type: ignore[method-assign]
        self.stages.predicted_clean_latents = self.predicted_clean_latents  # type: ignore[method-assign]
        self.stages.output_latents = self.output_latents  # type: ignore[method-assign]
        self.stages.release = self.release  # type: ignore[method-assign]

    def resolve(self, states: Sequence[DenoiseState]) -> None:
        """Wait for the latents of ``states`` still in flight (their transformer call is next)."""
        for state in states:
            pending = self.pending.pop(state.request.request_id, None)
            if pending is not None:
                state.latents = pending.wait()

    def plan_sends(self, states: Sequence[DenoiseState], early: bool) -> None:
        """Every rank, before a transformer call over ``states``: with ``early``, the requests without a
        preview due this step will be stepped during the call, and their latents' tags are taken now."""
        due = [s.request.request_id for s in states if early and not s.preview_due]
        self._early_tags = {request_id: self._tag() for request_id in due}

    def step_early(self, state: DenoiseState, noise_pred: torch.Tensor) -> None:
        """Last stage, inside the transformer call: step ``state`` now and send its latents without waiting.

        Its step index moves in ``step``, where the runner expects the step (the runner reads it
        between the two calls, e.g. whether a preview is due)."""
        tag = self._early_tags.get(state.request.request_id)
        if not self.is_last or tag is None:
            return
        self._step_and_cast([state], [noise_pred])
        state.step_index -= 1
        latents = state.latents.contiguous()
        self._in_flight.append((dist.isend(latents, self.peer, tag=tag), latents))

    def step(self, states: Sequence[DenoiseState], noise_preds: Sequence[torch.Tensor | None]) -> None:
        early, self._early_tags = self._early_tags, {}
        if self.is_last:
            late = [(s, p) for s, p in zip(states, noise_preds, strict=True) if s.request.request_id not in early]
            if late:
                self._step_and_cast([s for s, _ in late], [p for _, p in late])  # type: ignore[misc]
                self._send([s.latents for s, _ in late])
            for state in states:
                if state.request.request_id in early:
                    state.step_index += 1
            for handle, _ in self._in_flight:  # the first stage has posted these receives by now
                handle.wait()
            self._in_flight.clear()
            return
        for state in states:
            if self.is_first:
                buffer = torch.empty_like(state.latents)
                pending = AsyncLatents(buffer, self._receive(buffer, early.get(state.request.request_id)))
                self.pending[state.request.request_id] = pending  # by id: release gets ids only
                state.latents = pending  # type: ignore[assignment]  # no tensor: unresolved reads fail loudly
            state.step_index += 1

    def _step_and_cast(self, states: Sequence[DenoiseState], noise_preds: Sequence[torch.Tensor]) -> None:
        # the first stage receives into a buffer typed like the latents before the step; every family's
        # scheduler keeps that dtype (FlowMatch returns the model's, in which the families prepare their
        # latents; UniPC the sample's), the cast only keeps both ends equal if one did not
        dtypes = [s.latents.dtype for s in states]
        self._step(states, noise_preds)
        for state, dtype in zip(states, dtypes, strict=True):
            state.latents = state.latents.to(dtype)

    def predicted_clean_latents(self, state: DenoiseState, noise_pred: torch.Tensor | None) -> torch.Tensor:
        """The preview's clean latents: computed by the last stage, waited for by the first (which decodes)."""
        like = self._output(state)
        if self.is_last:
            clean = self._clean(state, noise_pred).to(like.dtype)  # type: ignore[arg-type]
            self._send([clean])
            return clean
        if self.is_first:
            buffer = torch.empty_like(like)
            self._receive(buffer).wait()
            return buffer
        return torch.zeros_like(like)  # a stage in between: its previews are never sent

    def output_latents(self, state: DenoiseState) -> torch.Tensor:
        self.resolve([state])
        return self._output(state)

    def release(self, request_ids: Sequence[str]) -> None:
        """Requests that ended: their receive in flight completes (the last stage has sent) before it is dropped."""
        for request_id in request_ids:
            pending = self.pending.pop(request_id, None)
            if pending is not None:
                pending.wait()
        self._release(request_ids)

    def _tag(self) -> int:
        self._messages += 1
        return _TAG_BASE + self._messages

    def _send(self, tensors: list[torch.Tensor]) -> None:
        sends = [dist.isend(x.contiguous(), self.peer, tag=self._tag()) for x in tensors]
        for handle in sends:  # the first stage has posted (or is about to post) these receives
            handle.wait()

    def _receive(self, buffer: torch.Tensor, tag: int | None = None) -> dist.Work:
        return dist.irecv(buffer, self.peer, tag=self._tag() if tag is None else tag)
