"""LongCat-Image text-to-image on the stage API, over diffusers' ``LongCatImagePipeline`` components.

LongCat-Image keeps FLUX's layout (16-channel ``AutoencoderKL``, 2x2-packed latents, flow matching
shifted by the image sequence length, the same ``prepare_latents`` / ``_unpack_latents`` and VAE
scaling) with a Qwen2.5-VL text encoder, so its stages are FLUX's (``flux.py``) where the pipelines
agree, and the pipeline's own methods where they differ:

- encode: ``encode_prompt`` wraps each prompt (split at quotation marks, as the pipeline does) in its
  captioning chat template padded to ``tokenizer_max_length`` (512) tokens and keeps the hidden
  states of all 512: every prompt gives [512, D] conditioning, so prompts never split a batch;
- denoise: one transformer call for every request of a size, text RoPE ids from the pipeline's
  ``prepare_pos_ids``, no pooled projection and no guidance embedding;
- CFG: classic, as the pipeline decides it: ``guidance_scale`` > 1 runs the negative prompt's branch
  ("" when none is given) as extra rows of the same call, combined with the pipeline's CFG renorm
  (the family options ``enable_cfg_renorm`` and ``cfg_renorm_min``, the pipeline's defaults).

Pipeline options served: ``prompt``, ``negative_prompt``, ``height``, ``width``,
``num_inference_steps``, ``guidance_scale``, ``generator`` (``seed``), ``enable_cfg_renorm`` and
``cfg_renorm_min`` (config). ``enable_prompt_rewrite`` is always off: the pipeline's default (on)
rewrites each prompt by *generating* up to 512 tokens with the text encoder, which a serving step
should not hide; a served image equals ``LongCatImagePipeline(..., enable_prompt_rewrite=False)``'s.
Not served: ``sigmas``, ``latents``, ``prompt_embeds`` inputs, ``num_images_per_prompt`` (one image
per request), ``joint_attention_kwargs``. No ``true_cfg_scale`` (the family has no true CFG knob).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import LongCatImagePipeline, LongCatImageTransformer2DModel
from diffusers.pipelines.longcat_image.pipeline_longcat_image import prepare_pos_ids

from omni_backend.config import ConfigError, RequestLimits
from omni_backend.lora.adapter import FluxLoraAdapter
from omni_backend.pipelines.base import Component, Conditioning, DenoiseState, load_pipeline
from omni_backend.pipelines.common import embeddings_from_arrays, encode_with_classic_cfg
from omni_backend.pipelines.flux import FluxCacheAdapter, FluxStages, FluxState
from omni_backend.request import DiffusionRequest, InvalidRequestError, SamplingDefaults, SamplingParams


@dataclass(frozen=True)
class LongCatImageOptions:
    """config.pbtxt parameters specific to LongCat-Image (LongCatImagePipeline's CFG renorm arguments)."""

    enable_cfg_renorm: bool = True  # rescale the guided prediction to at most the conditional one's norm
    cfg_renorm_min: float = 0.0  # lower clamp of that rescale, in [0, 1] (1 turns the renorm off)


class LongCatImageStages(FluxStages):
    options_cls = LongCatImageOptions
    transformer_cls = LongCatImageTransformer2DModel

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._text_ids: dict[tuple[int, torch.device], torch.Tensor] = {}  # see text_ids

    @classmethod
    def load(
        cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device, options: Any
    ) -> LongCatImageStages:
        if not 0 <= options.cfg_renorm_min <= 1:
            raise ConfigError(f"cfg_renorm_min: {options.cfg_renorm_min} is outside [0, 1]")
        # text_processor serves only the prompt rewriter, which stays off: never loaded (it also needs torchvision)
        unused = {"text_processor": None}
        pipe = load_pipeline(LongCatImagePipeline, checkpoint, components, dtype, device, loaded=unused)
        return cls(pipe, checkpoint, options, device)

    @property
    def text_length(self) -> int:
        """Tokens of every prompt's conditioning: the pipeline pads each prompt to this many."""
        return self.pipe.tokenizer_max_length

    @property
    def defaults(self) -> SamplingDefaults:
        return SamplingDefaults(
            height=self.default_size,  # the VAE's sample_size, as for FLUX (the pipeline's own default is 1024)
            width=self.default_size,
            num_inference_steps=50,
            guidance_scale=4.5,
            size_multiple=self.vae_scale_factor * 2,  # VAE downsampling x 2x2 latent packing
        )

    def batch_key(self, request: DiffusionRequest) -> Hashable:
        return (request.params.height, request.params.width)  # every prompt is 512 tokens long

    # ------------------------------------------------------------------ acceleration

    def module_groups(self) -> dict[str, list[torch.nn.Module]]:
        groups = {"text_encoder": self.pipe.text_encoder, "transformer": self.pipe.transformer, "vae": self.pipe.vae}
        return {name: [module] for name, module in groups.items() if module is not None}

    def encode_key(self, request: DiffusionRequest) -> Hashable:
        # the negative prompt is encoded ("" for none) only when CFG is on
        negative = (request.negative_prompt or "") if request.params.guidance_scale > 1 else None
        return (request.prompt, negative)

    def warmup_request(self, height: int, width: int) -> tuple[DiffusionRequest, Conditioning]:
        # CFG on (the default guidance): both branches' rows in the call, as most requests run
        embeds = torch.zeros(self.text_length, self.joint_attention_dim)
        conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": embeds}
        params = SamplingParams(height, width, 2, self.defaults.guidance_scale, 1.0, 0)
        return DiffusionRequest("warm-up", params, conditioning=conditioning), conditioning

    def step_cache_adapter(self) -> LongCatImageCacheAdapter:
        _register_blocks_for_diffusers_hooks()
        return LongCatImageCacheAdapter()

    def lora_adapter(self) -> FluxLoraAdapter:
        # LongCatImagePipeline has no LoRA loader mixin of its own; FLUX's reads diffusers' format and
        # injects through the transformer's PEFT integration, and LongCat's modules have FLUX's names
        return FluxLoraAdapter(self.pipe.transformer)

    # ------------------------------------------------------------------ 1. encode

    @torch.inference_mode()
    def encode(self, requests: Sequence[DiffusionRequest]) -> list[Conditioning]:
        return encode_with_classic_cfg(requests, self._encode_texts)

    def _encode_texts(self, texts: list[str]) -> list[torch.Tensor]:
        """One Qwen2.5-VL pass over many prompts, [512, D] each (padded by the pipeline, not by the batch)."""
        embeds, _ = self.pipe.encode_prompt(prompt=texts)
        return list(embeds)

    def conditioning_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Conditioning:
        shape = (self.text_length, self.joint_attention_dim)
        shapes = {name: shape for name in ("prompt_embeds", "negative_prompt_embeds")}
        return embeddings_from_arrays(arrays, shapes, required=("prompt_embeds",))

    def parse_conditioned_request(
        self, request_id: str, arrays: Mapping[str, np.ndarray], limits: RequestLimits
    ) -> DiffusionRequest:
        request = super().parse_conditioned_request(request_id, arrays, limits)
        if request.params.guidance_scale > 1 and "negative_prompt_embeds" not in request.conditioning:
            raise InvalidRequestError(
                "negative_prompt_embeds", f"is required when guidance_scale > 1 (got {request.params.guidance_scale})"
            )
        return request

    # ------------------------------------------------------------------ 2. prepare

    @torch.inference_mode()
    def prepare(self, request: DiffusionRequest, conditioning: Conditioning) -> FluxState:
        # FLUX's latents, image ids and schedule are LongCat's: the same calls with the same arguments
        state = super().prepare(request, conditioning)
        # the negative branch runs exactly when LongCatImagePipeline.do_classifier_free_guidance
        state.do_true_cfg = request.params.guidance_scale > 1
        return state

    # ------------------------------------------------------------------ 3. denoise

    def transformer_inputs(self, rows: Sequence[tuple[FluxState, str]]) -> dict[str, Any]:
        latents = torch.cat([s.latents for s, _ in rows])
        timestep = torch.stack([s.timesteps[s.step_index] for s, _ in rows]).to(latents.dtype)
        text = torch.stack([s.conditioning[f"{p}prompt_embeds"] for s, p in rows])
        return {
            "hidden_states": latents,
            "timestep": timestep / 1000,
            "encoder_hidden_states": text,
            "txt_ids": self.text_ids(text.shape[1]),
            "img_ids": rows[0][0].latent_image_ids,
        }

    def text_ids(self, length: int) -> torch.Tensor:
        """The text tokens' rotary positions on the device, made once per length: a copy from host memory
        at every step would make the engine thread wait for all queued kernels before each call."""
        key = (length, self.device)
        if key not in self._text_ids:
            ids = prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=length)
            self._text_ids[key] = ids.to(self.device)
        return self._text_ids[key]

    def guide(self, state: DenoiseState, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """LongCatImagePipeline's CFG: ``guidance_scale``, then the renorm (its float operations, in its order)."""
        guided = uncond + state.request.params.guidance_scale * (cond - uncond)
        if not self.options.enable_cfg_renorm:
            return guided
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)
        noise_norm = torch.norm(guided, dim=-1, keepdim=True)
        scale = (cond_norm / (noise_norm + 1e-8)).clamp(min=self.options.cfg_renorm_min, max=1.0)
        return guided * scale


class LongCatImageCacheAdapter(FluxCacheAdapter):
    """What the step caches need to know about LongCatImageTransformer2DModel (see StepCacheAdapter).

    Its blocks, first-block modulation, output head and attention are FLUX's; only the inputs differ
    (no pooled projection, no guidance: the timestep alone makes ``temb``). No TeaCache polynomial or
    MagCache ratios are published for LongCat-Image: FLUX.1's (the same blocks and flow-matching
    schedule) are the defaults, ``cache_config`` overrides them.
    """

    row_inputs = ("hidden_states", "timestep", "encoder_hidden_states")

    def embed(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # the first lines of LongCatImageTransformer2DModel.forward
        hidden = transformer.x_embedder(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype) * 1000
        return hidden, transformer.time_embed(timestep, hidden.dtype)


def _register_blocks_for_diffusers_hooks() -> None:
    """Tell diffusers' cache hooks (FirstBlockCache, MagCache) where LongCat's blocks return what.

    diffusers 0.42 registers FLUX's blocks but not LongCat's, whose ``forward`` returns the same
    ``(encoder_hidden_states, hidden_states)`` pair; registering is idempotent.
    """
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
    from diffusers.models.transformers.transformer_longcat_image import (
        LongCatImageSingleTransformerBlock,
        LongCatImageTransformerBlock,
    )

    for block in (LongCatImageTransformerBlock, LongCatImageSingleTransformerBlock):
        metadata = TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0)
        TransformerBlockRegistry.register(model_class=block, metadata=metadata)
