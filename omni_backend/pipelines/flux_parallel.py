"""What distributed/ needs to know about FLUX.1's transformer: its heads and blocks, and its forward
cut into embed -> blocks -> head so pipeline parallel can run a contiguous slice of blocks per rank.

The pieces restate ``FluxTransformer2DModel.forward`` (diffusers 0.42) without the ControlNet and
IP-Adapter branches, which the stage API never passes.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from omni_backend.distributed.groups import ParallelGroups
from omni_backend.distributed.spec import Carry
from omni_backend.pipelines.base import DenoiseState, PipelineStages


class FluxParallelSpec:
    @staticmethod
    def transformers(stages: PipelineStages) -> list[torch.nn.Module]:
        return [stages.pipe.transformer]  # type: ignore[attr-defined]

    @staticmethod
    def expert(stages: PipelineStages, state: DenoiseState) -> int:
        return 0

    @staticmethod
    def num_heads(config: dict[str, Any]) -> int:
        return config["num_attention_heads"]

    @staticmethod
    def num_blocks(config: dict[str, Any]) -> int:
        return config["num_layers"] + config["num_single_layers"]

    @staticmethod
    def blocks(transformer: FluxTransformer2DModel) -> list[torch.nn.Module]:
        """Every block in call order: the double-stream (MMDiT) blocks, then the single-stream ones."""
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    @staticmethod
    def embed(transformer: FluxTransformer2DModel, inputs: dict[str, Any]) -> Carry:
        hidden = transformer.x_embedder(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype) * 1000
        guidance = inputs["guidance"]
        pooled = inputs["pooled_projections"]
        if guidance is None:
            temb = transformer.time_text_embed(timestep, pooled)
        else:
            temb = transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, pooled)
        context = transformer.context_embedder(inputs["encoder_hidden_states"])
        rotary = transformer.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
        return Carry(hidden=hidden, context=context, extras={"temb": temb, "image_rotary_emb": rotary})

    @staticmethod
    def run_block(block: torch.nn.Module, carry: Carry) -> None:
        carry.context, carry.hidden = block(
            hidden_states=carry.hidden, encoder_hidden_states=carry.context, **carry.extras
        )

    @staticmethod
    def head(transformer: FluxTransformer2DModel, carry: Carry) -> torch.Tensor:
        return transformer.proj_out(transformer.norm_out(carry.hidden, carry.extras["temb"]))

    @staticmethod
    def prepare_model_parallel(transformer: FluxTransformer2DModel, groups: ParallelGroups) -> None:
        """Nothing: diffusers' FLUX.1 has its ``_tp_plan`` and ``_cp_plan``."""

    @classmethod
    def sequence_parallel_forward(
        cls, transformer: torch.nn.Module, inputs: dict[str, Any], ulysses: int, ring: int, ulysses_rank: int
    ) -> torch.Tensor:
        inputs, length = cls.pad_sequences(inputs, ulysses, ring, ulysses_rank)  # the family's padding
        return transformer(**inputs, return_dict=False)[0][:, :length]

    @staticmethod
    def pad_sequences(inputs: dict[str, Any], ulysses: int, ring: int, ulysses_rank: int) -> tuple[dict[str, Any], int]:
        """Pad text and image tokens to multiples of the sequence degree; mask the padded keys.

        diffusers' CP hooks split each sequence into equal chunks, and its uneven variants
        (``ulysses_anything``) all-gather chunks of different sizes, which gloo cannot. So we pad and
        pass this rank's chunk of a key mask; Ulysses all-gathers local masks itself. Ring attention
        reuses one mask for every key chunk of the ring, so it cannot mask padding: uneven lengths
        with ``ring_degree`` > 1 fail the request. Returns the inputs and the real image length.
        """
        degree = ulysses * ring
        text, image = inputs["encoder_hidden_states"].shape[1], inputs["hidden_states"].shape[1]
        text_pad, image_pad = -text % degree, -image % degree
        if not text_pad and not image_pad:
            return inputs, image
        if ring > 1:
            raise ValueError(
                f"ring_degree {ring}: {text} text and {image} image tokens must be multiples of "
                f"ulysses_degree x ring_degree = {degree} (ring attention cannot mask padding)"
            )

        def pad(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
            shape = list(x.shape)
            shape[dim] = n
            return torch.cat([x, x.new_zeros(shape)], dim=dim)

        padded = dict(inputs)
        padded["encoder_hidden_states"] = pad(inputs["encoder_hidden_states"], text_pad, 1)
        padded["txt_ids"] = pad(inputs["txt_ids"], text_pad, 0)
        padded["hidden_states"] = pad(inputs["hidden_states"], image_pad, 1)
        padded["img_ids"] = pad(inputs["img_ids"], image_pad, 0)
        # this rank's chunk of each stream, in the processor's [text, image] order
        text_chunk, image_chunk = (text + text_pad) // degree, (image + image_pad) // degree
        text_pos = torch.arange(text_chunk) + ulysses_rank * text_chunk
        image_pos = torch.arange(image_chunk) + ulysses_rank * image_chunk
        keep = torch.cat([text_pos < text, image_pos < image]).to(inputs["hidden_states"].device)
        padded["joint_attention_kwargs"] = {"attention_mask": keep.expand(inputs["hidden_states"].shape[0], -1)}
        return padded, image
