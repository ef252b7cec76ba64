"""FLUX.1 on the stage API, over diffusers' ``FluxPipeline`` components.

Each stage reuses the FluxPipeline methods that diffusers' own ``__call__`` uses
(``encode_prompt``, ``prepare_latents``, ``_unpack_latents``, ``calculate_shift``,
``retrieve_timesteps``), so a served image equals what ``FluxPipeline`` returns for the same
checkpoint, seed and parameters. What differs is batching: one transformer call serves the
current step of many requests, each with its own timestep, guidance and scheduler, and the
true-CFG negative branch rides in the same call as extra rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from transformers import T5TokenizerFast

from omni_backend.config import ConfigError, RequestLimits
from omni_backend.lora.adapter import FluxLoraAdapter
from omni_backend.pipelines.base import Component, Conditioning, DenoiseState, PipelineStages, load_pipeline
from omni_backend.pipelines.common import cache_row, loaded_groups
from omni_backend.request import DiffusionRequest, InvalidRequestError, SamplingDefaults, SamplingParams

_TEXT_MODULES = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass(frozen=True)
class FluxOptions:
    """config.pbtxt parameters specific to FLUX.1."""

    # T5 tokens per prompt, at most 512 (FluxPipeline's default and maximum). 0: what the checkpoint's
    # T5 tokenizer declares (``model_max_length``; FLUX.1: 512, the 64x64 demo model: 8), capped at 512.
    max_sequence_length: int = 0


@dataclass
class FluxState(DenoiseState):
    """A FLUX request between steps."""

    conditioning: Conditioning | None = None
    latent_image_ids: torch.Tensor | None = None  # rotary positions of the packed latents
    do_true_cfg: bool = False  # negative prompt given and true_cfg_scale > 1, as FluxPipeline decides
    # [1] float32 on the device, for guidance-distilled checkpoints (None otherwise). Made once: a copy
    # from host memory at every step would make the engine thread wait for all queued kernels first.
    guidance: torch.Tensor | None = None


class FluxStages(PipelineStages):
    options_cls = FluxOptions
    transformer_cls: type = FluxTransformer2DModel  # whose config a stage without the transformer reads

    def __init__(self, pipe: FluxPipeline, checkpoint: str, options: FluxOptions, device: torch.device):
        self.pipe = pipe
        self.options = options
        self.device = device
        # Stages that skip the VAE or the transformer still need their shapes: read the configs.
        vae_config = pipe.vae.config if pipe.vae is not None else AutoencoderKL.load_config(checkpoint, subfolder="vae")
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.latent_channels = vae_config["latent_channels"]
        # The size the checkpoint was made for: FLUX.1's VAE says 1024, the 64x64 demo model 64.
        # (FluxPipeline's own default, 128 latents x 8 = 1024, ignores the checkpoint.)
        sample_size = vae_config["sample_size"]
        self.default_size = int(sample_size if isinstance(sample_size, int) else sample_size[0])
        pipe.vae_scale_factor = self.vae_scale_factor
        transformer_config = (
            pipe.transformer.config
            if pipe.transformer is not None
            else self.transformer_cls.load_config(checkpoint, subfolder="transformer")
        )
        self.joint_attention_dim = transformer_config["joint_attention_dim"]
        self.pooled_projection_dim = transformer_config["pooled_projection_dim"]

    @classmethod
    def load(
        cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device, options: Any
    ) -> FluxStages:
        if not 0 <= options.max_sequence_length <= 512:
            raise ConfigError(f"max_sequence_length: {options.max_sequence_length} is outside [0, 512]")
        pipe = load_pipeline(FluxPipeline, checkpoint, components, dtype, device, text_modules=_TEXT_MODULES)
        if options.max_sequence_length == 0:
            tokenizer = pipe.tokenizer_2 or T5TokenizerFast.from_pretrained(checkpoint, subfolder="tokenizer_2")
            options = replace(options, max_sequence_length=min(512, tokenizer.model_max_length))
        return cls(pipe, checkpoint, options, device)

    @property
    def defaults(self) -> SamplingDefaults:
        return SamplingDefaults(
            height=self.default_size,
            width=self.default_size,
            num_inference_steps=28,
            guidance_scale=3.5,
            true_cfg_scale=1.0,
            size_multiple=self.vae_scale_factor * 2,  # VAE downsampling x 2x2 latent packing
        )

    def batch_key(self, request: DiffusionRequest) -> Hashable:
        text_len = (
            request.conditioning["prompt_embeds"].shape[0]
            if request.conditioning is not None
            else self.options.max_sequence_length
        )
        return (request.params.height, request.params.width, text_len)

    # ------------------------------------------------------------------ acceleration

    def module_groups(self) -> dict[str, list[torch.nn.Module]]:
        pipe = self.pipe
        return loaded_groups(
            text_encoder=[pipe.text_encoder, pipe.text_encoder_2], transformer=[pipe.transformer], vae=[pipe.vae]
        )

    def encode_key(self, request: DiffusionRequest) -> Hashable:
        # the negative prompt is only encoded (and so only part of the output) when true CFG is on
        wants_cfg = _wants_true_cfg(request.negative_prompt, request.params.true_cfg_scale)
        negative = request.negative_prompt if wants_cfg else None
        return (request.prompt, negative, self.options.max_sequence_length)

    def step_cache_adapter(self) -> FluxCacheAdapter:
        return FluxCacheAdapter()

    def lora_adapter(self) -> FluxLoraAdapter:
        return FluxLoraAdapter(self.pipe.transformer)  # FluxLoraLoaderMixin's loader

    def warmup_request(self, height: int, width: int) -> tuple[DiffusionRequest, Conditioning]:
        length = self.options.max_sequence_length
        conditioning = {
            "prompt_embeds": torch.zeros(length, self.joint_attention_dim),
            "pooled_prompt_embeds": torch.zeros(self.pooled_projection_dim),
        }
        params = SamplingParams(height, width, 2, self.defaults.guidance_scale, 1.0, 0)
        return DiffusionRequest("warm-up", params, conditioning=conditioning), conditioning

    def warmup_latents(self, height: int, width: int) -> torch.Tensor:
        scale = self.vae_scale_factor
        return torch.zeros(1, self.latent_channels, height // scale, width // scale)

    # ------------------------------------------------------------------ 1. encode

    @torch.inference_mode()
    def encode(self, requests: Sequence[DiffusionRequest]) -> list[Conditioning]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=[r.prompt for r in requests],
            device=self.device,
            max_sequence_length=self.options.max_sequence_length,
        )
        out: list[Conditioning] = [
            {"prompt_embeds": embeds[i], "pooled_prompt_embeds": pooled[i]} for i in range(len(requests))
        ]
        cfg_rows = [i for i, r in enumerate(requests) if _wants_true_cfg(r.negative_prompt, r.params.true_cfg_scale)]
        if cfg_rows:
            neg_embeds, neg_pooled, _ = self.pipe.encode_prompt(
                prompt=[requests[i].negative_prompt for i in cfg_rows],
                device=self.device,
                max_sequence_length=self.options.max_sequence_length,
            )
            for j, i in enumerate(cfg_rows):
                out[i]["negative_prompt_embeds"] = neg_embeds[j]
                out[i]["negative_pooled_prompt_embeds"] = neg_pooled[j]
        return out

    def conditioning_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Conditioning:
        expected = {
            "prompt_embeds": (None, self.joint_attention_dim),
            "pooled_prompt_embeds": (self.pooled_projection_dim,),
            "negative_prompt_embeds": (None, self.joint_attention_dim),
            "negative_pooled_prompt_embeds": (self.pooled_projection_dim,),
        }
        cond: Conditioning = {}
        for name, shape in expected.items():
            if name not in arrays:
                continue
            array = np.asarray(arrays[name])
            if array.ndim != len(shape) or any(
                s is not None and s != a for s, a in zip(shape, array.shape, strict=True)
            ):
                wanted = ["L" if s is None else s for s in shape]
                raise InvalidRequestError(name, f"expected shape {wanted}, got {list(array.shape)}")
            if not np.isfinite(array).all():
                raise InvalidRequestError(name, "contains NaN or infinite values")
            cond[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        for required in ("prompt_embeds", "pooled_prompt_embeds"):
            if required not in cond:
                raise InvalidRequestError(required, "is required")
        length = cond["prompt_embeds"].shape[0]
        if not 1 <= length <= 512:
            raise InvalidRequestError("prompt_embeds", f"sequence length {length} is outside [1, 512]")
        negatives = {"negative_prompt_embeds", "negative_pooled_prompt_embeds"} & cond.keys()
        if len(negatives) == 1:
            raise InvalidRequestError(negatives.pop(), "the negative embeddings must come as a pair")
        if "negative_prompt_embeds" in cond and cond["negative_prompt_embeds"].shape[0] != length:
            raise InvalidRequestError("negative_prompt_embeds", f"sequence length must equal prompt_embeds' ({length})")
        return cond

    # ------------------------------------------------------------------ 2. prepare

    @torch.inference_mode()
    def prepare(self, request: DiffusionRequest, conditioning: Conditioning) -> FluxState:
        params = request.params
        transformer = self.pipe.transformer
        dtype = transformer.dtype
        conditioning = {k: v.to(self.device, dtype) for k, v in conditioning.items()}
        # Same draw as FluxPipeline(generator=torch.Generator("cpu").manual_seed(seed)): CPU generator
        # whatever the device, so a seed means the same image on every machine.
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents, latent_image_ids = self.pipe.prepare_latents(
            1, transformer.config.in_channels // 4, params.height, params.width, dtype, self.device, generator
        )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        steps = params.num_inference_steps
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            latents.shape[1],
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        guidance = None
        if transformer.config.get("guidance_embeds"):  # LongCat-Image's transformer has no such field
            guidance = torch.full((1,), params.guidance_scale, device=self.device, dtype=torch.float32)
        return FluxState(
            request=request,
            latents=latents,
            timesteps=timesteps,
            scheduler=scheduler,
            conditioning=conditioning,
            latent_image_ids=latent_image_ids,
            do_true_cfg=params.true_cfg_scale > 1 and "negative_prompt_embeds" in conditioning,
            guidance=guidance,
        )

    # ------------------------------------------------------------------ 3. denoise

    @torch.inference_mode()
    def denoise(self, states: Sequence[DenoiseState]) -> list[torch.Tensor]:
        rows = self.denoise_rows(states)
        inputs = self.transformer_inputs(rows)
        if self.step_cache is not None:
            noise = self.step_cache.forward([cache_row(s, bool(p)) for s, p in rows], inputs)
        else:
            noise = self.pipe.transformer(**inputs, return_dict=False)[0]
        return self.combine_rows(states, noise)

    # The three pieces of ``denoise``, also driven by distributed/ to split the rows over ranks.

    def denoise_rows(self, states: Sequence[DenoiseState]) -> list[tuple[FluxState, str]]:
        """Transformer batch rows: every request's conditional branch, then the CFG ones' negative branch."""
        flux_states: list[FluxState] = list(states)  # type: ignore[arg-type]
        return [(s, "") for s in flux_states] + [(s, "negative_") for s in flux_states if s.do_true_cfg]

    def transformer_inputs(self, rows: Sequence[tuple[FluxState, str]]) -> dict[str, Any]:
        """Keyword arguments of one transformer call over ``rows`` (as ``denoise_rows`` lays them out)."""
        latents = torch.cat([s.latents for s, _ in rows])
        dtype = latents.dtype
        timestep = torch.stack([s.timesteps[s.step_index] for s, _ in rows]).to(dtype)
        guidance = torch.cat([s.guidance for s, _ in rows]) if rows[0][0].guidance is not None else None
        text = torch.stack([s.conditioning[f"{p}prompt_embeds"] for s, p in rows])
        return {
            "hidden_states": latents,
            "timestep": timestep / 1000,
            "guidance": guidance,
            "pooled_projections": torch.stack([s.conditioning[f"{p}pooled_prompt_embeds"] for s, p in rows]),
            "encoder_hidden_states": text,
            "txt_ids": torch.zeros(text.shape[1], 3, device=self.device, dtype=dtype),
            "img_ids": rows[0][0].latent_image_ids,
        }

    def combine_rows(self, states: Sequence[DenoiseState], noise: torch.Tensor) -> list[torch.Tensor]:
        """One noise prediction per state from the rows' predictions (true CFG combined)."""
        flux_states: list[FluxState] = list(states)  # type: ignore[arg-type]
        preds = [noise[i : i + 1] for i in range(len(flux_states))]
        negative = len(flux_states)
        for i, state in enumerate(flux_states):
            if state.do_true_cfg:
                preds[i] = self.guide(state, preds[i], noise[negative : negative + 1])
                negative += 1
        return preds

    def guide(self, state: FluxState, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """The guided noise prediction of a request with a negative branch (FluxPipeline's true CFG)."""
        return uncond + state.request.params.true_cfg_scale * (cond - uncond)

    # ------------------------------------------------------------------ 4. decode

    def predicted_clean_latents(self, state: DenoiseState, noise_pred: torch.Tensor) -> torch.Tensor:
        # flow matching: x_t = (1 - sigma) x0 + sigma noise and the model predicts v = noise - x0
        sigma = state.scheduler.sigmas[state.step_index]
        return self._unpack(state, state.latents - sigma * noise_pred)

    def output_latents(self, state: DenoiseState) -> torch.Tensor:
        return self._unpack(state, state.latents)

    def _unpack(self, state: DenoiseState, packed: torch.Tensor) -> torch.Tensor:
        params = state.request.params
        return self.pipe._unpack_latents(packed, params.height, params.width, self.vae_scale_factor)

    def latents_from_array(self, array: np.ndarray | None, limits: RequestLimits) -> torch.Tensor:
        if array is None:
            raise InvalidRequestError("latents", "is required")
        channels = self.latent_channels
        if array.ndim != 3 or array.shape[0] != channels:
            expected = f"[{channels}, H/{self.vae_scale_factor}, W/{self.vae_scale_factor}]"
            raise InvalidRequestError("latents", f"expected shape {expected}, got {list(array.shape)}")
        height, width = (side * self.vae_scale_factor for side in array.shape[1:])
        if height * width > limits.max_pixels or min(height, width) == 0:
            raise InvalidRequestError(
                "latents", f"decodes to {height}x{width}, outside (0, {limits.max_pixels}] pixels"
            )
        if not np.isfinite(array).all():
            raise InvalidRequestError("latents", "contains NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]

    @torch.inference_mode()
    def decode(self, latents: Sequence[torch.Tensor]) -> list[np.ndarray]:
        vae = self.pipe.vae
        batch = torch.cat([x.to(self.device, vae.dtype) for x in latents])
        batch = batch / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(batch, return_dict=False)[0]
        pixels = self.pipe.image_processor.postprocess(image, output_type="np")
        # the same rounding as diffusers' numpy_to_pil, so PIL output and ours agree exactly
        return [(p * 255).round().astype(np.uint8) for p in pixels]


def _wants_true_cfg(negative_prompt: str | None, true_cfg_scale: float) -> bool:
    return negative_prompt is not None and true_cfg_scale > 1


class FluxCacheAdapter:
    """What the step caches need to know about FluxTransformer2DModel (see StepCacheAdapter)."""

    row_inputs = ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states")
    # TeaCache's rescale polynomial for FLUX.1, fitted by its authors (ali-vilab/TeaCache, TeaCache4FLUX)
    tea_cache_coefficients = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
    mag_ratios = tuple(FLUX_MAG_RATIOS.tolist())  # diffusers' calibration for FLUX.1-dev / schnell
    taylorseer_identifiers = None  # diffusers' defaults find FLUX's attention modules

    def embed(self, transformer: FluxTransformer2DModel, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # the first lines of FluxTransformer2DModel.forward
        hidden = transformer.x_embedder(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype) * 1000
        pooled = inputs["pooled_projections"]
        if inputs["guidance"] is None:
            temb = transformer.time_text_embed(timestep, pooled)
        else:
            temb = transformer.time_text_embed(timestep, inputs["guidance"].to(hidden.dtype) * 1000, pooled)
        return hidden, temb

    def modulated_input(self, transformer: FluxTransformer2DModel, hidden: torch.Tensor, temb: torch.Tensor):
        return transformer.transformer_blocks[0].norm1(hidden, emb=temb)[0]

    def head(self, transformer: FluxTransformer2DModel, hidden: torch.Tensor, temb: torch.Tensor, inputs: dict):
        return transformer.proj_out(transformer.norm_out(hidden, temb))

    def blocks_exit(self, transformer: FluxTransformer2DModel) -> torch.nn.Module:
        return transformer.norm_out

    def probe(self, transformer: FluxTransformer2DModel) -> torch.nn.Module:
        return transformer.single_transformer_blocks[-1].attn.to_q
