"""The decode thread: requests that finished denoising are decoded while the next steps run.

A finished request's VAE pass (10-40% of a short request's work at small sizes) would otherwise hold
every running request's next step back, and decodes are hardly cheaper batched: requests finish one
by one in step-level batching. On a second thread it overlaps the transformer calls (torch releases
the GIL inside its kernels). On CUDA both threads share the default stream, so kernels stay in order
(the latents are ready when the VAE reads them); what overlaps is the host-side work of the two
threads. On a CPU the two threads' kernels only fight over the same cores (measured 25-45% slower),
so ``background_decode: auto`` uses this thread on a GPU only.

One thread, jobs in submission order. ``vae_lock`` makes the VAE exclusive: diffusers' video VAEs
keep per-call caches on the module (AutoencoderKLWan's feature cache), so the engine thread takes
it too whenever it uses the VAE itself (previews, input images).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class DecodeThread:
    def __init__(self) -> None:
        self.vae_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None  # started by the first job

    def submit(self, job: Callable[..., T], *args: object) -> Future[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omni-decode")
        return self._executor.submit(job, *args)

    def wait_idle(self) -> None:
        """Return once every job submitted so far has run (they run in order)."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()

    def close(self) -> None:
        """Run the jobs already submitted, then stop the thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
