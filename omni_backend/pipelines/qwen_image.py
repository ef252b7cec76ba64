"""Qwen-Image text-to-image on the stage API, over diffusers' ``QwenImagePipeline`` components.

Each stage reuses the methods ``QwenImagePipeline.__call__`` uses (``encode_prompt``,
``prepare_latents``, ``_unpack_latents``, ``calculate_shift``, ``retrieve_timesteps``), so a
served image equals what the pipeline returns for the same checkpoint, seed and parameters.

What differs is batching. Qwen's prompt embeddings have the length of the prompt (the
Qwen2.5-VL hidden states of its tokens, the chat template dropped), so requests of one image
size share a transformer call with their text zero-padded to the longest and masked
(``encoder_hidden_states_mask``; text RoPE positions start after the image's, so padding at the
end moves no real token). The true-CFG negative branch rides in the same call as extra rows and
is combined with diffusers' norm-preserving rescale.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from omni_backend.config import ConfigError, RequestLimits
from omni_backend.lora.adapter import DiffusersLoraAdapter
from omni_backend.lora.names import WEIGHTS_FILE
from omni_backend.pipelines.base import Component, Conditioning, DenoiseState, PipelineStages, load_pipeline
from omni_backend.pipelines.common import (
    cache_row,
    embeddings_from_arrays,
    loaded_groups,
    pad_sequences,
    tensor_from_array,
)
from omni_backend.pipelines.qwen_image_cache import QwenImageCacheAdapter
from omni_backend.request import DiffusionRequest, InvalidRequestError, SamplingDefaults, SamplingParams

MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline refuses longer max_sequence_length
# Text length of the warm-up's placeholder prompt: text of any length is padded to the longest of a
# batch, so no length is "the" one; a short prompt's is what most requests bring.
WARMUP_TEXT_LENGTH = 32


@dataclass(frozen=True)
class QwenImageOptions:
    """config.pbtxt parameters specific to Qwen-Image."""

    max_sequence_length: int = 512  # prompt tokens kept after the template; QwenImagePipeline's default


@dataclass
class QwenImageState(DenoiseState):
    """A Qwen-Image request between steps."""

    conditioning: Conditioning | None = None
    # (frames, latent rows / 2, latent cols / 2) of each image in the sequence, for the RoPE: the one being
    # denoised, then (edit) the input image
    img_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    image_latents: torch.Tensor | None = None  # edit: the packed input-image latents appended to the sequence
    do_true_cfg: bool = False  # negative prompt given and true_cfg_scale > 1, as QwenImagePipeline decides


class QwenImageStages(PipelineStages):
    options_cls = QwenImageOptions
    pipeline_cls: type = QwenImagePipeline
    max_sequence_cap = MAX_SEQUENCE_LENGTH  # the largest max_sequence_length the config may set

    def __init__(self, pipe: Any, checkpoint: str, options: QwenImageOptions, device: torch.device):
        self.pipe = pipe
        self.options = options
        self.device = device
        # Stages that skip the VAE or the transformer still need their shapes: read the configs.
        vae_config = (
            pipe.vae.config if pipe.vae is not None else AutoencoderKLQwenImage.load_config(checkpoint, subfolder="vae")
        )
        self.vae_scale_factor = 2 ** len(vae_config["temperal_downsample"])
        self.latent_channels = vae_config["z_dim"]
        pipe.vae_scale_factor = self.vae_scale_factor
        transformer_config = (
            pipe.transformer.config
            if pipe.transformer is not None
            else QwenImageTransformer2DModel.load_config(checkpoint, subfolder="transformer")
        )
        self.joint_attention_dim = transformer_config["joint_attention_dim"]

    @classmethod
    def load(
        cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device, options: Any
    ) -> QwenImageStages:
        if not 1 <= options.max_sequence_length <= cls.max_sequence_cap:
            raise ConfigError(
                f"max_sequence_length: {options.max_sequence_length} is outside [1, {cls.max_sequence_cap}]"
            )
        return cls(cls.load_pipe(checkpoint, components, dtype, device), checkpoint, options, device)

    @classmethod
    def load_pipe(cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device) -> Any:
        return load_pipeline(cls.pipeline_cls, checkpoint, components, dtype, device)

    @property
    def defaults(self) -> SamplingDefaults:
        size = self.pipe.default_sample_size * self.vae_scale_factor
        return SamplingDefaults(
            height=size,
            width=size,
            num_inference_steps=50,
            guidance_scale=1.0,  # used only by guidance-distilled checkpoints (guidance_embeds), as in diffusers
            true_cfg_scale=4.0,
            size_multiple=self.vae_scale_factor * 2,  # VAE downsampling x 2x2 latent packing
        )

    def batch_key(self, request: DiffusionRequest) -> Hashable:
        return (request.params.height, request.params.width)  # text of any length: padded and masked

    def module_groups(self) -> dict[str, list[torch.nn.Module]]:
        pipe = self.pipe
        return loaded_groups(text_encoder=[pipe.text_encoder], transformer=[pipe.transformer], vae=[pipe.vae])

    def encode_key(self, request: DiffusionRequest) -> Hashable:
        # the negative prompt is only encoded (and so only part of the output) when true CFG is on
        wants_cfg = _wants_true_cfg(request.negative_prompt, request.params.true_cfg_scale)
        negative = request.negative_prompt if wants_cfg else None
        return (request.prompt, negative, self.options.max_sequence_length)

    def step_cache_adapter(self) -> QwenImageCacheAdapter:
        return QwenImageCacheAdapter(self.pipe.transformer)

    def lora_adapter(self) -> DiffusersLoraAdapter:
        # QwenImageLoraLoaderMixin, which QwenImageEditPipeline shares (the same transformer)
        return DiffusersLoraAdapter(self.pipeline_cls, {WEIGHTS_FILE: self.pipe.transformer})

    def warmup_request(self, height: int, width: int) -> tuple[DiffusionRequest, Conditioning]:
        # true CFG on (the default scale, diffusers' example's " " negative prompt when the text encoder
        # runs), so the call carries both branches, as most requests' do
        embeds = torch.zeros(WARMUP_TEXT_LENGTH, self.joint_attention_dim)
        conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": embeds}
        defaults = self.defaults
        params = SamplingParams(height, width, 2, defaults.guidance_scale, defaults.true_cfg_scale, 0)
        request = DiffusionRequest("warm-up", params, negative_prompt=" ", conditioning=conditioning)
        return request, conditioning

    def warmup_latents(self, height: int, width: int) -> torch.Tensor:
        scale = self.vae_scale_factor
        return torch.zeros(1, self.latent_channels, 1, height // scale, width // scale)

    # ------------------------------------------------------------------ 1. encode

    @torch.inference_mode()
    def encode(self, requests: Sequence[DiffusionRequest]) -> list[Conditioning]:
        return self._encode_prompts(requests, None)

    def _encode_prompts(self, requests: Sequence[DiffusionRequest], images: list[Any] | None) -> list[Conditioning]:
        """Prompt (and true-CFG negative) embeddings of each request; ``images``: the edit's, one per request."""
        texts = [r.prompt for r in requests]
        out: list[Conditioning] = [{"prompt_embeds": e} for e in self._encode_texts(texts, images)]
        cfg_rows = [i for i, r in enumerate(requests) if _wants_true_cfg(r.negative_prompt, r.params.true_cfg_scale)]
        if cfg_rows:
            negative_images = None if images is None else [images[i] for i in cfg_rows]
            negatives = self._encode_texts([requests[i].negative_prompt for i in cfg_rows], negative_images)
            for i, embeds in zip(cfg_rows, negatives, strict=True):
                out[i]["negative_prompt_embeds"] = embeds
        return out

    def _encode_texts(self, texts: list[str], images: list[Any] | None) -> list[torch.Tensor]:
        """One Qwen2.5-VL pass over many prompts; each keeps only its own tokens (no padding)."""
        with_images = {} if images is None else {"image": images}
        embeds, mask = self.pipe.encode_prompt(
            prompt=texts, device=self.device, max_sequence_length=self.options.max_sequence_length, **with_images
        )
        lengths = [embeds.shape[1]] * len(texts) if mask is None else mask.sum(dim=1).tolist()
        return [embeds[i, :n] for i, n in enumerate(lengths)]

    def conditioning_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Conditioning:
        text = ("sequence length", 1, self.options.max_sequence_length)
        shapes = {name: (text, self.joint_attention_dim) for name in ("prompt_embeds", "negative_prompt_embeds")}
        return embeddings_from_arrays(arrays, shapes, required=("prompt_embeds",))

    # ------------------------------------------------------------------ 2. prepare

    @torch.inference_mode()
    def prepare(self, request: DiffusionRequest, conditioning: Conditioning) -> QwenImageState:
        params = request.params
        dtype = self.pipe.transformer.dtype
        conditioning = {k: v.to(self.device, dtype) for k, v in conditioning.items()}
        # Same draw as QwenImagePipeline(generator=torch.Generator("cpu").manual_seed(seed)).
        generator = torch.Generator("cpu").manual_seed(params.seed)
        latents = self._initial_latents(params.height, params.width, dtype, generator)
        scheduler, timesteps = self._schedule(params.num_inference_steps, latents.shape[1])
        patch = self.vae_scale_factor * 2
        return QwenImageState(
            request=request,
            latents=latents,
            timesteps=timesteps,
            scheduler=scheduler,
            conditioning=conditioning,
            img_shapes=[(1, params.height // patch, params.width // patch)],
            do_true_cfg=params.true_cfg_scale > 1 and "negative_prompt_embeds" in conditioning,
        )

    def _initial_latents(self, height: int, width: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        channels = self.pipe.transformer.config.in_channels // 4
        return self.pipe.prepare_latents(1, channels, height, width, dtype, self.device, generator)

    def _schedule(self, steps: int, image_seq_len: int) -> tuple[Any, torch.Tensor]:
        """A scheduler of the request's own and its timesteps, shifted by the image sequence length."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        mu = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / steps, steps)
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    # ------------------------------------------------------------------ 3. denoise

    @torch.inference_mode()
    def denoise(self, states: Sequence[DenoiseState]) -> list[torch.Tensor]:
        rows = self.denoise_rows(states)
        inputs = self.transformer_inputs(rows)
        if self.step_cache is not None:
            out = self.step_cache.forward([cache_row(s, bool(p)) for s, p in rows], inputs)
        else:
            out = self.pipe.transformer(**inputs, return_dict=False)[0]
        return self.combine_rows(states, out)

    # The three pieces of ``denoise``, also driven by distributed/ to split the rows over ranks.

    def denoise_rows(self, states: Sequence[DenoiseState]) -> list[tuple[QwenImageState, str]]:
        """Transformer batch rows: every request's conditional branch, then the true-CFG ones' negative branch."""
        qwen_states: list[QwenImageState] = list(states)  # type: ignore[arg-type]
        return [(s, "") for s in qwen_states] + [(s, "negative_") for s in qwen_states if s.do_true_cfg]

    def transformer_inputs(self, rows: Sequence[tuple[QwenImageState, str]]) -> dict[str, Any]:
        """Keyword arguments of one transformer call over (state, branch prefix) rows: the state's latents
        (and the edit's input-image latents), that branch's text."""
        latents = torch.cat([_model_input(s) for s, _ in rows])
        timestep = torch.stack([s.timesteps[s.step_index] for s, _ in rows]).to(latents.dtype)
        text, mask = pad_sequences([s.conditioning[f"{p}prompt_embeds"] for s, p in rows])
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor(
                [s.request.params.guidance_scale for s, _ in rows], device=self.device, dtype=torch.float32
            )
        return {
            "hidden_states": latents,
            "timestep": timestep / 1000,
            "guidance": guidance,
            "encoder_hidden_states_mask": mask,
            "encoder_hidden_states": text,
            "img_shapes": [s.img_shapes for s, _ in rows],
        }

    def combine_rows(self, states: Sequence[DenoiseState], out: torch.Tensor) -> list[torch.Tensor]:
        """One noise prediction per state from the rows' outputs (true CFG combined)."""
        qwen_states: list[QwenImageState] = list(states)  # type: ignore[arg-type]
        # the edit's input-image latents follow the noisy ones in the sequence; only the latter are predicted
        noise = out[:, : qwen_states[0].latents.shape[1]]
        preds = [noise[i : i + 1] for i in range(len(qwen_states))]
        negative = len(qwen_states)
        for i, state in enumerate(qwen_states):
            if state.do_true_cfg:
                preds[i] = _true_cfg(preds[i], noise[negative : negative + 1], state.request.params.true_cfg_scale)
                negative += 1
        return preds

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
        if array.ndim != 4 or array.shape[:2] != (channels, 1):
            raise InvalidRequestError("latents", f"expected shape [{channels}, 1, H/8, W/8], got {list(array.shape)}")
        height, width = (side * self.vae_scale_factor for side in array.shape[2:])
        if height * width > limits.max_pixels or min(height, width) == 0:
            raise InvalidRequestError(
                "latents", f"decodes to {height}x{width}, outside (0, {limits.max_pixels}] pixels"
            )
        return tensor_from_array("latents", array, tuple(array.shape))[None]

    @torch.inference_mode()
    def decode(self, latents: Sequence[torch.Tensor]) -> list[np.ndarray]:
        vae = self.pipe.vae
        batch = torch.cat([x.to(self.device, vae.dtype) for x in latents])
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(batch)
        std = torch.tensor(vae.config.latents_std).view(shape).to(batch)
        # QwenImagePipeline divides by 1/std: the same float operations give the same pixels
        image = vae.decode(batch / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]
        pixels = self.pipe.image_processor.postprocess(image, output_type="np")
        # the same rounding as diffusers' numpy_to_pil, so PIL output and ours agree exactly
        return [(p * 255).round().astype(np.uint8) for p in pixels]


def _model_input(state: QwenImageState) -> torch.Tensor:
    if state.image_latents is None:
        return state.latents
    return torch.cat([state.latents, state.image_latents], dim=1)


def _wants_true_cfg(negative_prompt: str | None, true_cfg_scale: float) -> bool:
    return negative_prompt is not None and true_cfg_scale > 1


def _true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """QwenImagePipeline's true CFG: the guided prediction rescaled to the conditional one's norm."""
    combined = uncond + scale * (cond - uncond)
    return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
