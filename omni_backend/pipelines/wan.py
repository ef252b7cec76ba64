"""Wan2.2 text-to-video on the stage API, over diffusers' ``WanPipeline`` components.

Each stage reuses what ``WanPipeline.__call__`` uses (``encode_prompt``, ``prepare_latents``, its
scheduler's ``set_timesteps``, the VAE's latent mean/std and ``video_processor``), so a served
video equals, frame for frame, what the pipeline returns for the same checkpoint, seed and
parameters.

Wan2.2 A14B has two experts: ``transformer`` denoises the high-noise steps (t >= boundary_ratio x
1000) with ``guidance_scale``, ``transformer_2`` the rest with ``guidance_scale_2``. Requests of one
size and frame count share a step; within it each expert gets one call holding every request
whose current timestep is its own (conditional rows, then the CFG rows). Wan's prompt embeddings
are padded to ``max_sequence_length`` by the pipeline itself, so text never splits a batch.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from omni_backend.config import ConfigError, RequestLimits
from omni_backend.lora.adapter import DiffusersLoraAdapter
from omni_backend.lora.names import TRANSFORMER_2_WEIGHTS_FILE, WEIGHTS_FILE
from omni_backend.pipelines.base import Component, Conditioning, DenoiseState, PipelineStages, load_pipeline
from omni_backend.pipelines.common import (
    cache_row,
    embeddings_from_arrays,
    encode_with_classic_cfg,
    loaded_groups,
    tensor_from_array,
)
from omni_backend.pipelines.wan_cache import WAN_T2V_TEA_CACHE, WanCacheAdapter
from omni_backend.request import DiffusionRequest, InvalidRequestError, SamplingDefaults, SamplingParams

MAX_SEQUENCE_LENGTH = 512  # UMT5 tokens; WanPipeline's default


@dataclass(frozen=True)
class WanOptions:
    """config.pbtxt parameters specific to Wan."""

    max_sequence_length: int = MAX_SEQUENCE_LENGTH  # text embeddings are padded to this length


@dataclass
class WanState(DenoiseState):
    """A Wan request between steps."""

    conditioning: Conditioning | None = None
    do_cfg: bool = False  # guidance_scale > 1, as WanPipeline decides (for both experts)


class WanT2VStages(PipelineStages):
    options_cls = WanOptions
    output_name = "video"
    preview_name = "preview_video"
    pipeline_cls: type = WanPipeline

    def __init__(self, pipe: Any, checkpoint: str, options: WanOptions, device: torch.device):
        self.pipe = pipe
        self.options = options
        self.device = device
        # Stages that skip the VAE or the transformers still need their shapes: read the configs.
        vae_config = (
            pipe.vae.config if pipe.vae is not None else AutoencoderKLWan.load_config(checkpoint, subfolder="vae")
        )
        self.latent_channels = vae_config["z_dim"]
        self.temporal_factor = vae_config["scale_factor_temporal"]
        self.spatial_factor = vae_config["scale_factor_spatial"]
        pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial = self.temporal_factor, self.spatial_factor
        experts = [m for m in (pipe.transformer, pipe.transformer_2) if m is not None]
        transformer_config = (
            experts[0].config if experts else WanTransformer3DModel.load_config(checkpoint, subfolder="transformer")
        )
        self.text_dim = transformer_config["text_dim"]
        self.in_channels = transformer_config["in_channels"]
        self.patch = transformer_config["patch_size"]
        ratio = pipe.config.boundary_ratio
        self.boundary_timestep = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps

    @classmethod
    def load(
        cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device, options: Any
    ) -> WanT2VStages:
        if not 1 <= options.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ConfigError(
                f"max_sequence_length: {options.max_sequence_length} is outside [1, {MAX_SEQUENCE_LENGTH}]"
            )
        return cls(cls.load_pipe(checkpoint, components, dtype, device), checkpoint, options, device)

    @classmethod
    def load_pipe(cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device) -> Any:
        experts = ("transformer", "transformer_2")
        return load_pipeline(cls.pipeline_cls, checkpoint, components, dtype, device, transformer_modules=experts)

    @property
    def defaults(self) -> SamplingDefaults:
        return SamplingDefaults(
            height=480,
            width=832,
            num_inference_steps=50,
            guidance_scale=5.0,
            size_multiple=self.spatial_factor * self.patch[1],  # VAE downsampling x the transformer's patch
            num_frames=81,
            frame_step=self.temporal_factor,
            takes_guidance_scale_2=True,
        )

    def batch_key(self, request: DiffusionRequest) -> Hashable:
        params = request.params
        text_len = (
            request.conditioning["prompt_embeds"].shape[0]
            if request.conditioning is not None
            else self.options.max_sequence_length
        )
        return (params.height, params.width, params.num_frames, text_len)

    def module_groups(self) -> dict[str, list[torch.nn.Module]]:
        pipe = self.pipe
        return loaded_groups(
            text_encoder=[pipe.text_encoder], transformer=[pipe.transformer, pipe.transformer_2], vae=[pipe.vae]
        )

    def encode_key(self, request: DiffusionRequest) -> Hashable:
        # with CFG on, WanPipeline encodes the negative prompt, "" when none is given
        negative = (request.negative_prompt or "") if request.params.guidance_scale > 1 else None
        return (request.prompt, negative, self.options.max_sequence_length)

    def step_cache_adapter(self) -> WanCacheAdapter:
        return WanCacheAdapter(WAN_T2V_TEA_CACHE)

    def lora_adapter(self) -> DiffusersLoraAdapter:
        # WanLoraLoaderMixin: one file per expert, as load_lora_weights(..., load_into_transformer_2=True)
        # loads the low-noise expert's (omni_backend/lora/adapter.py). load_lora_weights' T2V-to-I2V
        # padding only concerns transformers with CLIP image inputs (image_dim), which Wan2.2's lack.
        experts = {WEIGHTS_FILE: self.pipe.transformer}
        if self.pipe.transformer_2 is not None:
            experts[TRANSFORMER_2_WEIGHTS_FILE] = self.pipe.transformer_2
        return DiffusersLoraAdapter(self.pipeline_cls, experts)

    def warmup_request(self, height: int, width: int) -> tuple[DiffusionRequest, Conditioning]:
        # the default frame count and CFG on: both rows of the call, and with two steps both experts
        embeds = torch.zeros(self.options.max_sequence_length, self.text_dim)
        conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": embeds}
        defaults = self.defaults
        params = SamplingParams(height, width, 2, defaults.guidance_scale, 1.0, 0, num_frames=defaults.num_frames)
        return DiffusionRequest("warm-up", params, conditioning=conditioning), conditioning

    def warmup_latents(self, height: int, width: int) -> torch.Tensor:
        frames = (self.defaults.num_frames - 1) // self.temporal_factor + 1
        return torch.zeros(1, self.latent_channels, frames, height // self.spatial_factor, width // self.spatial_factor)

    # ------------------------------------------------------------------ 1. encode

    @torch.inference_mode()
    def encode(self, requests: Sequence[DiffusionRequest]) -> list[Conditioning]:
        return encode_with_classic_cfg(requests, self._encode_texts)

    def _encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(
            prompt=texts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.options.max_sequence_length,
            device=self.device,
        )
        return list(embeds)

    def conditioning_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Conditioning:
        text = ("sequence length", 1, self.options.max_sequence_length)
        shapes = {name: (text, self.text_dim) for name in ("prompt_embeds", "negative_prompt_embeds")}
        cond = embeddings_from_arrays(arrays, shapes, required=("prompt_embeds",))
        length = cond["prompt_embeds"].shape[0]
        if "negative_prompt_embeds" in cond and cond["negative_prompt_embeds"].shape[0] != length:
            raise InvalidRequestError("negative_prompt_embeds", f"sequence length must equal prompt_embeds' ({length})")
        return cond

    # ------------------------------------------------------------------ 2. prepare

    @torch.inference_mode()
    def prepare(self, request: DiffusionRequest, conditioning: Conditioning) -> WanState:
        params = request.params
        dtype = self.experts()[0].dtype
        conditioning = {k: v.to(self.device, dtype) for k, v in conditioning.items()}
        # Same draw as WanPipeline(generator=torch.Generator("cpu").manual_seed(seed)); latents stay float32.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents = self._initial_latents(params, generator)
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        return WanState(
            request=request,
            latents=latents,
            timesteps=scheduler.timesteps,
            scheduler=scheduler,
            conditioning=conditioning,
            do_cfg=params.guidance_scale > 1 and "negative_prompt_embeds" in conditioning,
        )

    def _initial_latents(self, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        return self.pipe.prepare_latents(
            1, self.in_channels, params.height, params.width, params.num_frames, torch.float32, self.device, generator
        )

    def experts(self) -> list[torch.nn.Module]:
        """The loaded experts, high noise first: ``expert_index`` indexes this list (parallel specs too)."""
        return [m for m in (self.pipe.transformer, self.pipe.transformer_2) if m is not None]

    # ------------------------------------------------------------------ 3. denoise

    @torch.inference_mode()
    def denoise(self, states: Sequence[DenoiseState]) -> list[torch.Tensor]:
        wan_states: list[WanState] = list(states)  # type: ignore[arg-type]
        preds: list[torch.Tensor | None] = [None] * len(wan_states)
        experts = self.experts()
        for expert, model in enumerate(experts):
            group = [i for i, s in enumerate(wan_states) if self.expert_index(s) == expert]
            if group:
                group_states = [wan_states[i] for i in group]
                rows = self.denoise_rows(group_states)
                inputs = self.transformer_inputs(rows)
                if self.step_cache is not None:  # one cache per expert
                    noise = self.step_cache.forward([cache_row(s, bool(p)) for s, p in rows], inputs, expert)
                else:
                    noise = model(**inputs, return_dict=False)[0]
                for i, pred in zip(group, self.combine_rows(group_states, noise), strict=True):
                    preds[i] = pred
        return preds  # type: ignore[return-value]

    def expert_index(self, state: WanState) -> int:
        """0: ``transformer`` (high noise, t >= boundary), 1: ``transformer_2``."""
        t = state.timesteps[state.step_index]
        return 0 if self.boundary_timestep is None or bool(t >= self.boundary_timestep) else 1

    # The three pieces of one expert's call, also driven by distributed/ to split the rows over ranks.

    def denoise_rows(self, states: Sequence[DenoiseState]) -> list[tuple[WanState, str]]:
        """Transformer batch rows: every request's conditional branch, then the CFG ones' negative branch."""
        wan_states: list[WanState] = list(states)  # type: ignore[arg-type]
        return [(s, "") for s in wan_states] + [(s, "negative_") for s in wan_states if s.do_cfg]

    def transformer_inputs(self, rows: Sequence[tuple[WanState, str]]) -> dict[str, Any]:
        """Keyword arguments of one expert call over ``rows`` (both experts share dtype and inputs)."""
        dtype = self.experts()[0].dtype
        return {
            "hidden_states": torch.cat([self._model_input(s) for s, _ in rows]).to(dtype),
            "timestep": torch.stack([s.timesteps[s.step_index] for s, _ in rows]),
            "encoder_hidden_states": torch.stack([s.conditioning[f"{p}prompt_embeds"] for s, p in rows]),
        }

    def combine_rows(self, states: Sequence[DenoiseState], noise: torch.Tensor) -> list[torch.Tensor]:
        """One prediction per state; CFG with the scale of the expert the states' step belongs to."""
        wan_states: list[WanState] = list(states)  # type: ignore[arg-type]
        preds = [noise[i : i + 1] for i in range(len(wan_states))]
        negative = len(wan_states)
        for i, state in enumerate(wan_states):
            if state.do_cfg:
                params = state.request.params
                scale = params.guidance_scale
                if self.expert_index(state) == 1 and params.guidance_scale_2 is not None:
                    scale = params.guidance_scale_2
                uncond = noise[negative : negative + 1]
                preds[i] = uncond + scale * (preds[i] - uncond)
                negative += 1
        return preds

    def _model_input(self, state: WanState) -> torch.Tensor:
        """What the transformer sees of one request: its latents (image-to-video adds the image condition)."""
        return state.latents

    # ------------------------------------------------------------------ 4. decode

    def predicted_clean_latents(self, state: DenoiseState, noise_pred: torch.Tensor) -> torch.Tensor:
        # flow matching: x_t = (1 - sigma) x0 + sigma noise and the model predicts v = noise - x0
        sigma = state.scheduler.sigmas[state.step_index]
        return state.latents - sigma * noise_pred.float()

    def output_latents(self, state: DenoiseState) -> torch.Tensor:
        return state.latents

    def latents_from_array(self, array: np.ndarray | None, limits: RequestLimits) -> torch.Tensor:
        if array is None:
            raise InvalidRequestError("latents", "is required")
        channels = self.latent_channels
        if array.ndim != 4 or array.shape[0] != channels or min(array.shape) == 0:
            raise InvalidRequestError(
                "latents", f"expected shape [{channels}, latent frames, H/8, W/8], got {list(array.shape)}"
            )
        frames = (array.shape[1] - 1) * self.temporal_factor + 1
        height, width = (side * self.spatial_factor for side in array.shape[2:])
        if frames > limits.max_frames or frames * height * width > limits.max_video_pixels:
            raise InvalidRequestError(
                "latents", f"decodes to {frames} frames of {height}x{width}, beyond this model's limits"
            )
        return tensor_from_array("latents", array, tuple(array.shape))[None]

    @torch.inference_mode()
    def decode(self, latents: Sequence[torch.Tensor]) -> list[np.ndarray]:
        vae = self.pipe.vae
        batch = torch.cat([x.to(self.device, vae.dtype) for x in latents])
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(batch)
        std = torch.tensor(vae.config.latents_std).view(shape).to(batch)
        # WanPipeline divides by 1/std: the same float operations give the same pixels
        video = vae.decode(batch / (1.0 / std) + mean, return_dict=False)[0]
        frames = self.pipe.video_processor.postprocess_video(video, output_type="np")
        return [(f * 255).round().astype(np.uint8) for f in frames]
