"""What distributed/ needs to know about ``QwenImageTransformer2DModel`` (Qwen-Image and Qwen-Image-Edit).

A dual-stream MMDiT: every block updates the image and the text stream; no single-stream blocks.
diffusers 0.42 declares its ``_cp_plan`` (sequence inputs split at the first block, the RoPE tables
at ``pos_embed``, the text mask at every block) and ``_tp_plan``, and its attention processor reads
the heads from the sharded projections: tensor parallel needs nothing added. The edit's call is the same
model over a longer image sequence (the noisy latents, then the input image's).

``embed`` / ``run_block`` / ``head`` restate ``QwenImageTransformer2DModel.forward`` without the
ControlNet residuals and ``additional_t_cond``, which the stage API never passes.

Sequence parallel splits the text and the image tokens in equal chunks, so lengths the degree does not
divide are padded at the end and the padded keys masked, for Ulysses: the text through the model's own
``encoder_hidden_states_mask`` (text RoPE positions follow the image's, so padding at the end moves no
real token); the image through ``image_mask``, which diffusers' attention processor lacks (it builds the
image keys' mask as all-valid): ``prepare_model_parallel`` installs one that takes it, and pads the image RoPE table to
the padded length before the context-parallel hook splits it. Ring attention reuses one mask for every
key chunk, so under ``ring_degree`` every row of a call needs text of one length, and it and the image
tokens must be multiples of the degree; other requests fail naming ``ring_degree``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
    compute_text_seq_len_from_mask,
)

from omni_backend.config import ConfigError
from omni_backend.distributed.groups import ParallelGroups
from omni_backend.distributed.spec import Carry
from omni_backend.pipelines.flux_parallel import FluxParallelSpec


class QwenImageParallelSpec(FluxParallelSpec):
    """FLUX's joint-stream pieces (one transformer, heads, ``run_block``, ``head``, the padded sequence-parallel
    call); Qwen's blocks, embeddings and padding rules."""

    @staticmethod
    def prepare_model_parallel(transformer: QwenImageTransformer2DModel, groups: ParallelGroups) -> None:
        parallel = groups.parallel
        # zero_cond_t (Qwen-Image-Edit-2511) doubles the timestep rows and modulates the input image's
        # tokens apart; embed / head below would have to split them as forward does
        if parallel.pipeline_parallel_size > 1 and transformer.config.zero_cond_t:
            raise ConfigError("pipeline_parallel_size: not supported for a transformer with zero_cond_t")
        degree = parallel.ulysses_degree * parallel.ring_degree
        if degree > 1:
            _pad_image_rotary(transformer.pos_embed, degree)
            for block in transformer.transformer_blocks:
                block.attn.set_processor(ImageMaskedAttnProcessor())

    @staticmethod
    def num_blocks(config: dict[str, Any]) -> int:
        return config["num_layers"]

    @staticmethod
    def blocks(transformer: QwenImageTransformer2DModel) -> list[torch.nn.Module]:
        return list(transformer.transformer_blocks)

    @staticmethod
    def embed(transformer: QwenImageTransformer2DModel, inputs: dict[str, Any]) -> Carry:
        hidden = transformer.img_in(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype)  # arrives / 1000: time_proj scales it back
        context = transformer.txt_in(transformer.txt_norm(inputs["encoder_hidden_states"]))
        text_length, _, mask = compute_text_seq_len_from_mask(context, inputs["encoder_hidden_states_mask"])
        guidance = inputs["guidance"]
        if guidance is None:
            temb = transformer.time_text_embed(timestep, hidden)
        else:
            temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, hidden)
        rotary = transformer.pos_embed(inputs["img_shapes"], max_txt_seq_len=text_length, device=hidden.device)
        extras = {"encoder_hidden_states_mask": mask, "temb": temb, "image_rotary_emb": rotary}
        return Carry(hidden=hidden, context=context, extras=extras)

    @staticmethod
    def pad_sequences(inputs: dict[str, Any], ulysses: int, ring: int, ulysses_rank: int) -> tuple[dict[str, Any], int]:
        """Pad text and image tokens to multiples of the sequence degree; mask the padded keys.

        diffusers' CP hooks split each sequence into equal chunks (gloo cannot all-gather uneven ones),
        and the text mask at every block; the image mask is this rank's chunk, passed to the attention
        processor (Ulysses all-gathers the local masks itself). Returns the inputs and the image length.
        """
        degree = ulysses * ring
        states, mask = inputs["encoder_hidden_states"], inputs["encoder_hidden_states_mask"]
        rows, text, image = states.shape[0], states.shape[1], inputs["hidden_states"].shape[1]
        text_pad, image_pad = -text % degree, -image % degree
        if ring > 1 and (text_pad or image_pad or mask is not None):
            lengths = sorted(set(mask.sum(dim=1).tolist())) if mask is not None else [text]
            raise ValueError(
                f"ring_degree {ring}: text of {lengths} tokens (one length wanted) and {image} image tokens must "
                f"be multiples of ulysses_degree x ring_degree = {degree} (ring attention cannot mask padding)"
            )
        padded = dict(inputs)
        if text_pad:
            if mask is None:
                mask = torch.ones(rows, text, dtype=torch.long, device=states.device)
            padded["encoder_hidden_states"] = torch.cat([states, states.new_zeros(rows, text_pad, states.shape[2])], 1)
            padded["encoder_hidden_states_mask"] = torch.cat([mask, mask.new_zeros(rows, text_pad)], dim=1)
        if image_pad:
            hidden = inputs["hidden_states"]
            padded["hidden_states"] = torch.cat([hidden, hidden.new_zeros(rows, image_pad, hidden.shape[2])], dim=1)
            chunk = (image + image_pad) // degree
            keep = torch.arange(chunk, device=hidden.device) + ulysses_rank * chunk < image
            padded["attention_kwargs"] = {"image_mask": keep.expand(rows, -1)}
        return padded, image


def _pad_image_rotary(pos_embed: torch.nn.Module, degree: int) -> None:
    """Pad the image RoPE table to the padded image length (a multiple of ``degree``), as ``pad_sequences``
    pads the image tokens. Wraps ``forward`` before diffusers' context-parallel hook wraps it, so the hook
    splits the padded table. The padded rows rotate nothing: their keys are masked, their outputs dropped."""
    forward = pos_embed.forward

    @functools.wraps(forward)
    def padded(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        image, text = forward(*args, **kwargs)
        return torch.cat([image, image.new_ones(-image.shape[0] % degree, image.shape[1])]), text

    pos_embed.forward = padded


class ImageMaskedAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """diffusers' Qwen joint attention, plus ``image_mask`` [rows, image tokens]: the image keys to attend.

    Without it, diffusers' own processor runs; with it, its steps are restated (diffusers 0.42) with the
    image keys' mask where the original builds an all-valid one.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        args = (attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask)
        if image_mask is None or encoder_hidden_states is None or attention_mask is not None:
            return super().__call__(*args, image_rotary_emb)  # diffusers' own (and its errors)
        text_mask = encoder_hidden_states_mask
        if text_mask is None:
            text_mask = torch.ones(encoder_hidden_states.shape[:2], dtype=torch.bool, device=image_mask.device)
        mask = torch.cat([text_mask.bool(), image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads  # -1 below: a tensor-parallel rank's share of the heads
        image_qkv = [p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)]
        text_projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        text_qkv = [p(encoder_hidden_states).unflatten(-1, (-1, head_dim)) for p in text_projections]
        for qkv, norms in ((image_qkv, (attn.norm_q, attn.norm_k)), (text_qkv, (attn.norm_added_q, attn.norm_added_k))):
            for i, norm in enumerate(norms):
                if norm is not None:
                    qkv[i] = norm(qkv[i])
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            for qkv, freqs in ((image_qkv, image_freqs), (text_qkv, text_freqs)):
                qkv[0], qkv[1] = (apply_rotary_emb_qwen(x, freqs, use_real=False) for x in qkv[:2])
        query, key, value = (torch.cat([t, i], dim=1) for t, i in zip(text_qkv, image_qkv, strict=True))
        joint = dispatch_attention_fn(
            query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )  # fmt: skip
        joint = joint.flatten(2, 3).to(query.dtype)
        text_length = encoder_hidden_states.shape[1]
        image_out = attn.to_out[0](joint[:, text_length:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)  # dropout
        return image_out, attn.to_add_out(joint[:, :text_length].contiguous())
