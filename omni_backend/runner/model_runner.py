"""Model runner: owns the loaded pipeline stages and the per-request state, executes step plans.

The same ``execute`` serves the one-model pipeline (finished requests are decoded to ``image``)
and the ensemble's transformer stage (finished requests hand back ``latents`` for the VAE stage).
A fault inside a step fails the requests of that step, never the engine; a batch that runs out of
device memory is retried one request at a time (runner/oom.py). With LoRA adapters configured, a
joining request's adapter is loaded at admission (between transformer calls) and each call runs
with its batch's adapter activated (omni_backend/lora/registry.py). With ``background_decode`` the
finished requests' images are decoded on a second thread (runner/decoder.py) while the next steps
run; they leave the batch at once and come back through ``StepResult.decoding``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from omni_backend.config import ModelConfig
from omni_backend.engine.control import ControlRefusedError
from omni_backend.engine.observer import AccelerationObserver
from omni_backend.engine.scheduler import Decoding, StepPlan, StepProgress, StepResult
from omni_backend.lora.registry import LoraRegistry
from omni_backend.pipelines.base import Component, DenoiseState, PipelineStages
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionOutput, DiffusionRequest
from omni_backend.runner.acceleration import Acceleration, apply_acceleration
from omni_backend.runner.control import RunnerControl
from omni_backend.runner.decoder import DecodeThread
from omni_backend.runner.oom import Failed, free_device_memory, is_oom, oom_message, run_batched

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunnerOutput(enum.Enum):
    """What a finished request leaves as."""

    IMAGE = "image"  # decoded pixels (the family's output_name: image or video): the one-model pipeline
    LATENTS = "latents"  # VAE-ready latents: the ensemble's transformer stage


PREVIEW_MAX_SIDE = 256  # previews are for a progress UI: small, cheap to send


def downscale_preview(pixels: np.ndarray) -> np.ndarray:
    """An image [H, W, 3], or each frame of a video [frames, H, W, 3], at most PREVIEW_MAX_SIDE on its long side."""
    height, width = pixels.shape[-3:-1]
    scale = PREVIEW_MAX_SIDE / max(height, width)
    if scale >= 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    frames = pixels if pixels.ndim == 4 else pixels[None]
    small = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in frames])
    return small if pixels.ndim == 4 else small[0]


def resolve_device(setting: str, instance_kind: str, device_id: int) -> torch.device:
    """``auto`` follows Triton's instance kind: KIND_GPU -> cuda:<device id>, else the CPU."""
    if setting == "auto":
        use_gpu = instance_kind.upper() in ("GPU", "KIND_GPU") and torch.cuda.is_available()
        return torch.device(f"cuda:{device_id}") if use_gpu else torch.device("cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device: {setting!r} requested but CUDA is not available on this machine")
    return torch.device(setting)


def load_stages(
    config: ModelConfig, components: Component, device: torch.device, observer: AccelerationObserver | None = None
) -> PipelineStages:
    return load_accelerated(config, components, device, observer or AccelerationObserver())[0]


def load_accelerated(
    config: ModelConfig, components: Component, device: torch.device, observer: AccelerationObserver
) -> tuple[PipelineStages, Acceleration]:
    """The stages with the config's acceleration applied, and what was applied (tests, benchmarks)."""
    stages_cls = resolve_family(config.family)
    # with offload, weights load into host memory and the offload policy places them: the whole
    # pipeline never has to fit on the device, not even while loading
    load_device = torch.device("cpu") if config.acceleration.offload != "none" else device
    checkpoint, dtype = config.resolve_checkpoint(), _DTYPES[config.dtype]
    stages = stages_cls.load(checkpoint, components, dtype, load_device, config.options)
    stages.device = device
    return stages, apply_acceleration(stages, config, device, observer)


class ModelRunner:
    def __init__(
        self,
        stages: PipelineStages,
        output: RunnerOutput,
        synchronize: bool = False,
        control: RunnerControl | None = None,
        loras: LoraRegistry | None = None,
        background_decode: bool = False,
    ):
        self.stages = stages
        self.output = output
        # images only: the ensemble's transformer stage hands back latents, nothing to decode
        self._decoder = DecodeThread() if background_decode and output is RunnerOutput.IMAGE else None
        # whoever uses the VAE holds this (the decode thread too): see runner/decoder.py
        self._vae: contextlib.AbstractContextManager = (
            self._decoder.vae_lock if self._decoder else contextlib.nullcontext()
        )
        self.control = control  # sleep / wake / profiling (None: no control ops, e.g. unit tests)
        self.loras = loras  # the model's LoRA adapters, None without lora_dir
        self.states: dict[str, DenoiseState] = {}
        # CUDA runs asynchronously: stage timings are only true if each stage waits for the device
        self._synchronize = synchronize and torch.cuda.is_available()
        # after an OOM, free the cache once the exception (whose traceback holds the tensors) is gone
        self._free_memory = False

    def _clock(self) -> float:
        if self._synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def run_control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run a validated control op (engine/control.py) between steps; ControlRefusedError if refused."""
        if self.control is None:
            raise ControlRefusedError("control", "this runner takes no control ops")
        return self.control.handle(op, args)

    def execute(self, plan: StepPlan) -> StepResult:
        try:
            return self._execute(plan)
        finally:
            if self.control is not None:
                self.control.on_step()  # a running profile counts the step (and stops at its limit)

    def _execute(self, plan: StepPlan) -> StepResult:
        if self._free_memory:
            self._free_memory = False
            free_device_memory()
        result = StepResult()
        failed = self._admit(plan.admitted, result)
        running = [self.states[i] for i in plan.running_ids if i not in failed]
        if not running:
            return result
        started = self._clock()
        try:
            if self.loras is not None:  # one batching key, so one adapter setting for the whole call
                self.loras.activate(running[0].request.lora)
            noise_preds = run_batched(self.stages.denoise, running, "denoising")
        except Exception as exc:  # a fault in the shared call fails every request in it
            self._fail(running, "denoising step", exc, result)
            return result
        for state, pred in zip(running, noise_preds, strict=True):
            if isinstance(pred, Failed):
                self._fail_one(state.request.request_id, pred.message, result)
        kept = [(s, p) for s, p in zip(running, noise_preds, strict=True) if not isinstance(p, Failed)]
        running, noise_preds = [s for s, _ in kept], [p for _, p in kept]
        if not running:
            return result
        try:
            # previews come from the clean latents predicted at this step, before the update
            due = [(s, p) for s, p in zip(running, noise_preds, strict=True) if s.preview_due]
            clean = [self.stages.predicted_clean_latents(s, p) for s, p in due]
            self.stages.step(running, noise_preds)
        except Exception as exc:
            self._fail(running, "denoising step", exc, result)
            return result
        elapsed = self._clock() - started
        for state in running:
            state.timings.denoise_s += elapsed
            state.timings.steps += 1
        self._report_progress(running, [s for s, _ in due], clean, result)
        done = [s for s in running if s.finished]
        if done:
            self._finish(done, result)
        return result

    def _report_progress(
        self, running: list[DenoiseState], previewed: list[DenoiseState], clean: list, result: StepResult
    ) -> None:
        previews: dict[str, np.ndarray] = {}
        if previewed:
            try:
                with self._vae:
                    images = self.stages.decode(clean)
                previews = {
                    s.request.request_id: downscale_preview(img) for s, img in zip(previewed, images, strict=True)
                }
            except Exception:  # a preview is best effort: the request itself goes on
                logger.exception("preview decoding failed")
        for state in running:
            request_id = state.request.request_id
            result.progress.append(
                StepProgress(request_id, state.step_index, len(state.timesteps), previews.get(request_id))
            )

    def _admit(self, joining: Sequence[DiffusionRequest], result: StepResult) -> set[str]:
        """Encode (one batched pass) and prepare the requests joining now; return the ids that failed."""
        requests = self._acquire_loras(joining, result)
        if not requests:
            return {r.request_id for r in joining}
        started = self._clock()
        # edit and image-to-video families encode their input images with the VAE (encode, prepare)
        vae = self._vae if any(r.input_image is not None for r in requests) else contextlib.nullcontext()
        try:
            with vae:
                self._encode_and_prepare(requests, result)
        except Exception as exc:  # one batched encode: its fault fails every joiner
            answered = {o.request_id for o in result.finished}
            ids = [r.request_id for r in requests if r.request_id not in answered]
            logger.exception("requests %s failed while encoding", ", ".join(ids))
            message = oom_message("text encoding", exc) if is_oom(exc) else f"encoding failed: {exc}"
            self._free_memory |= is_oom(exc)
            for request_id in ids:
                self.states.pop(request_id, None)
                result.finished.append(DiffusionOutput(request_id, error=message))
            self.stages.release(ids)
            return {r.request_id for r in joining}
        elapsed = self._clock() - started
        for request in requests:
            if request.request_id in self.states:
                self.states[request.request_id].timings.encode_s = elapsed
        return {r.request_id for r in joining if r.request_id not in self.states}

    def _encode_and_prepare(self, requests: list[DiffusionRequest], result: StepResult) -> None:
        to_encode = [r for r in requests if r.conditioning is None]
        encoded = iter(run_batched(self.stages.encode, to_encode, "text encoding") if to_encode else [])
        for request in requests:
            conditioning = request.conditioning if request.conditioning is not None else next(encoded)
            if isinstance(conditioning, Failed):
                self._fail_one(request.request_id, conditioning.message, result)
            else:
                self.states[request.request_id] = self.stages.prepare(request, conditioning)

    def _acquire_loras(self, joining: Sequence[DiffusionRequest], result: StepResult) -> list[DiffusionRequest]:
        """Make the joiners' adapters resident; a request whose adapter fails to load fails alone."""
        if self.loras is None:
            return list(joining)
        in_use = {r.lora.name for r in [s.request for s in self.states.values()] + list(joining) if r.lora}
        kept = []
        for request in joining:
            name = request.lora.name if request.lora is not None else None
            try:
                if name is not None:
                    self.loras.acquire(name, in_use)
            except Exception as exc:
                logger.exception("request %s: loading LoRA adapter %r failed", request.request_id, name)
                self._fail_one(request.request_id, f"loading LoRA adapter {name!r} failed: {exc}", result)
                continue
            kept.append(request)
        return kept

    def _finish(self, done: list[DenoiseState], result: StepResult) -> None:
        try:
            latents = [self.stages.output_latents(s) for s in done]
            arrays = [x[0].float().cpu().numpy() for x in latents] if self.output is RunnerOutput.LATENTS else []
        except Exception as exc:
            self._fail(done, "decoding", exc, result)
            return
        ids = [s.request.request_id for s in done]
        for request_id in ids:
            del self.states[request_id]
        self.stages.release(ids)
        if self.output is RunnerOutput.LATENTS:
            result.finished += [self._output(s, self.output.value, a) for s, a in zip(done, arrays, strict=True)]
        elif self._decoder is None:
            result.finished += self._decode(done, latents)
        else:
            result.decoding.append(Decoding(ids, self._decoder.submit(partial(self._decode, done), latents)))

    def _decode(self, done: list[DenoiseState], latents: list[torch.Tensor]) -> list[DiffusionOutput]:
        """Decode finished requests (one batched VAE pass); every fault becomes an error output."""
        started = self._clock()
        try:
            with self._vae:
                arrays = run_batched(self.stages.decode, latents, "decoding")
        except Exception as exc:
            self._free_memory |= is_oom(exc)
            message = oom_message("decoding", exc) if is_oom(exc) else f"decoding failed: {exc}"
            logger.exception("decoding requests %s failed", ", ".join(s.request.request_id for s in done))
            return [DiffusionOutput(s.request.request_id, error=message) for s in done]
        elapsed = self._clock() - started
        outputs = []
        for state, array in zip(done, arrays, strict=True):
            if isinstance(array, Failed):
                logger.error("request %s failed: %s", state.request.request_id, array.message)
                outputs.append(DiffusionOutput(state.request.request_id, error=array.message))
                continue
            state.timings.decode_s = elapsed
            outputs.append(self._output(state, self.stages.output_name, array))
        return outputs

    @staticmethod
    def _output(state: DenoiseState, name: str, array: np.ndarray) -> DiffusionOutput:
        return DiffusionOutput(state.request.request_id, {name: array}, timings=state.timings)

    def _fail(self, states: list[DenoiseState], where: str, exc: Exception, result: StepResult) -> None:
        message = oom_message(where, exc) if is_oom(exc) else f"{where} failed: {exc}"
        for state in states:
            self._fail_one(state.request.request_id, message, result)
        self._free_memory |= is_oom(exc)

    def _fail_one(self, request_id: str, message: str, result: StepResult) -> None:
        logger.error("request %s failed: %s", request_id, message)
        self.states.pop(request_id, None)
        self.stages.release([request_id])
        result.finished.append(DiffusionOutput(request_id, error=message))

    def abort(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.states.pop(request_id, None)
        self.stages.release(request_ids)

    def wait_decoded(self) -> None:
        """Return once the background decodes submitted so far are done (before control ops touch weights)."""
        if self._decoder is not None:
            self._decoder.wait_idle()

    def close(self) -> None:
        """Finish the background decodes and stop their thread."""
        if self._decoder is not None:
            self._decoder.close()
