"""The decode thread: requests that finished denoising are decoded while the next steps run.

A finished request's VAE pass (10-40% of a short request's work at small sizes) would otherwise hold
every running request's next step back, and decodes are hardly cheaper batched: requests finish one
by one in step-level batching. On a second thread it overlaps the transformer calls (torch releases
the GIL inside its kernels). On a CPU the two threads' kernels only fight over the same cores
(measured 25-45% slower), so ``background_decode: auto`` uses this thread on a GPU only.

On CUDA the decodes run on a stream of their own. On the default stream, which the engine thread
keeps filling, a VAE pass would queue behind every transformer call launched before it and the
copy back of its pixels would wait for all of them; on its own (high-priority) stream it waits only
for an event recorded, on the submitting thread's stream, right after its latents were made.

One thread, jobs in submission order. ``vae_lock`` makes the VAE exclusive: diffusers' video VAEs
keep per-call caches on the module (AutoencoderKLWan's feature cache), so the engine thread takes
it too whenever it uses the VAE itself (previews, input images).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class DecodeThread:
    def __init__(self) -> None:
        self.vae_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # started by the first job
        self._streams: dict[torch.device, torch.cuda.Stream] = {}  # per CUDA device, made by its first job

    def submit(self, job: Callable[[Sequence[torch.Tensor]], T], tensors: Sequence[torch.Tensor]) -> Future[T]:
        """Run ``job(tensors)`` on the thread; ``tensors`` are as the submitting thread's stream leaves them."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omni-decode")
        device = tensors[0].device if tensors else torch.device("cpu")
        if device.type != "cuda":
            return self._executor.submit(job, tensors)
        if device not in self._streams:  # high priority: a finished request's few VAE kernels go first
            self._streams[device] = torch.cuda.Stream(device, priority=-1)
        stream = self._streams[device]
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))
        for tensor in tensors:  # the caching allocator must not hand their memory out while the stream reads it
            tensor.record_stream(stream)
        return self._executor.submit(self._on_stream, stream, ready, job, tensors)

    @staticmethod
    def _on_stream(
        stream: torch.cuda.Stream,
        ready: torch.cuda.Event,
        job: Callable[[Sequence[torch.Tensor]], T],
        tensors: Sequence[torch.Tensor],
    ) -> T:
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            return job(tensors)

    def wait_idle(self) -> None:
        """Return once every job submitted so far has run (they run in order)."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        for stream in self._streams.values():  # what they queued is done too (a control op may move weights)
            stream.synchronize()

    def close(self) -> None:
        """Run the jobs already submitted, then stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
