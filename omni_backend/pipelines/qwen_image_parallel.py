"""What distributed/ needs to know about ``QwenImageTransformer2DModel`` (Qwen-Image and Qwen-Image-Edit).

A dual-stream MMDiT: every block updates the image and the text stream; no single-stream blocks.
diffusers 0.42 declares its ``_cp_plan`` (sequence inputs split at the first block, the RoPE tables
at ``pos_embed``, the text mask at every block) and ``_tp_plan``, and its attention processor reads
the heads from the sharded projections: ``prepare`` has nothing to add. The edit's call is the same
model over a longer image sequence (the noisy latents, then the input image's).

``embed`` / ``run_block`` / ``head`` restate ``QwenImageTransformer2DModel.forward`` without the
ControlNet residuals and ``additional_t_cond``, which the stage API never passes.

Sequence parallel splits the text and the image tokens in equal chunks. Text of any length is
padded and masked (the model's own ``encoder_hidden_states_mask``; text RoPE positions follow the
image's, so padding at the end moves no real token). The image keys cannot be masked (the attention
processor builds their mask as all-valid), so the image tokens must be a multiple of the degree
(at 16 pixels a token side: any size multiple of 32 for a degree of 2 or 4), and ring attention
reuses one mask for every key chunk, so under ``ring_degree`` every row of a call needs text of one
length, a multiple of the degree; other requests fail naming the degree.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

from omni_backend.config import ConfigError, ParallelConfig
from omni_backend.distributed.spec import Carry
from omni_backend.pipelines.base import PipelineStages


class QwenImageParallelSpec:
    @staticmethod
    def transformer(stages: PipelineStages) -> QwenImageTransformer2DModel:
        return stages.pipe.transformer  # type: ignore[attr-defined]

    @staticmethod
    def prepare(transformer: QwenImageTransformer2DModel, parallel: ParallelConfig) -> None:
        # zero_cond_t (Qwen-Image-Edit-2511) doubles the timestep rows and modulates the input image's
        # tokens apart; embed / head below would have to split them as forward does
        if parallel.pipeline_parallel_size > 1 and transformer.config.zero_cond_t:
            raise ConfigError("pipeline_parallel_size: not supported for a transformer with zero_cond_t")

    @staticmethod
    def num_heads(config: dict[str, Any]) -> int:
        return config["num_attention_heads"]

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
    def run_block(block: torch.nn.Module, carry: Carry) -> None:
        carry.context, carry.hidden = block(
            hidden_states=carry.hidden, encoder_hidden_states=carry.context, **carry.extras
        )

    @staticmethod
    def head(transformer: QwenImageTransformer2DModel, carry: Carry) -> torch.Tensor:
        return transformer.proj_out(transformer.norm_out(carry.hidden, carry.extras["temb"]))

    @staticmethod
    def pad_sequences(inputs: dict[str, Any], ulysses: int, ring: int, ulysses_rank: int) -> tuple[dict[str, Any], int]:
        """Pad the text to a multiple of the sequence degree and mask it; the image must divide already.

        diffusers' CP hooks split each sequence into equal chunks (gloo cannot all-gather uneven ones)
        and the text mask at every block, and Ulysses all-gathers the local masks itself, so padding
        the text and extending its mask is all it takes. Returns the inputs and the image length.
        """
        degree = ulysses * ring
        name, value = ("ring_degree", ring) if ring > 1 else ("ulysses_degree", ulysses)
        text, image = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
        if image % degree:
            raise ValueError(
                f"{name} {value}: {image} image tokens must be a multiple of ulysses_degree x ring_degree = "
                f"{degree} (Qwen-Image's attention cannot mask image padding)"
            )
        mask = inputs["encoder_hidden_states_mask"]
        text_pad = -text % degree
        if ring > 1 and (text_pad or mask is not None):
            lengths = sorted(set(mask.sum(dim=1).tolist())) if mask is not None else [text]
            raise ValueError(
                f"ring_degree {ring}: the rows' text lengths {lengths} must be one length, a multiple of "
                f"ulysses_degree x ring_degree = {degree} (ring attention cannot mask padding)"
            )
        if not text_pad:
            return inputs, image
        states = inputs["encoder_hidden_states"]
        rows = states.shape[0]
        if mask is None:
            mask = torch.ones(rows, text, dtype=torch.long, device=states.device)
        padded = dict(inputs)
        padded["encoder_hidden_states"] = torch.cat([states, states.new_zeros(rows, text_pad, states.shape[2])], 1)
        padded["encoder_hidden_states_mask"] = torch.cat([mask, mask.new_zeros(rows, text_pad)], dim=1)
        return padded, image
