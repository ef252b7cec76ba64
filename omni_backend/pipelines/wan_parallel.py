"""What distributed/ needs to know about Wan2.2 A14B's transformers (text- and image-to-video).

- Two experts, ``transformer`` (high noise) and ``transformer_2`` (low noise): every rank holds both,
  parallelized the same way; a transformer call runs the states whose step belongs to one of them.
- Ulysses / Ring: diffusers' ``_cp_plan`` for Wan splits the video tokens (and the 3D rotary tables)
  and leaves the text whole: self-attention runs over the sequence group, cross-attention to the
  text stays local. Token counts the degree does not divide are padded with whole latent frames at
  the end (frame-major order: the real tokens keep their positions and rotary angles) and those keys
  are masked out of self-attention, which Wan's blocks call without a mask (``_KeyMaskProcessor``).
- Tensor parallel: diffusers has no ``_tp_plan`` for Wan; ours shards the attention and feed-forward
  Linears column/row-wise. Wan's query/key RMSNorm spans all heads (``rms_norm_across_heads``), so
  on a rank holding some heads it becomes ``_ShardedRMSNorm`` (sum of squares all-reduced).
- Pipeline parallel: ``embed`` / ``run_block`` / ``head`` restate ``WanTransformer3DModel.forward``
  (diffusers 0.42) for Wan2.2 A14B (1-D timesteps, no image embedding); the text stream never
  changes across blocks, so it is recomputed on every rank instead of sent (``Carry.context`` None).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from omni_backend.config import ConfigError
from omni_backend.distributed.groups import ParallelGroups
from omni_backend.distributed.spec import Carry
from omni_backend.pipelines.base import DenoiseState, PipelineStages

# Within every block: attention and feed-forward Linears. The cross-attention's keys and values come
# from the (whole) text, so they shard by heads like the queries.
_TP_PLAN = {
    **{f"blocks.*.{attn}.{proj}": "colwise" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")},
    "blocks.*.attn1.to_out.0": "rowwise",
    "blocks.*.attn2.to_out.0": "rowwise",
    "blocks.*.ffn.net.0.proj": "colwise",
    "blocks.*.ffn.net.2": "rowwise",
}


class _ShardedRMSNorm(torch.nn.Module):
    """An RMSNorm over a feature dimension split across the ``tp`` ranks (this rank: one contiguous shard)."""

    def __init__(self, norm: torch.nn.RMSNorm, group: dist.ProcessGroup, rank: int, ranks: int):
        super().__init__()
        (self.features,) = norm.normalized_shape
        shard = self.features // ranks
        self.weight = torch.nn.Parameter(norm.weight.detach()[rank * shard : (rank + 1) * shard].clone())
        self.eps = norm.eps
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.float().pow(2).sum(-1, keepdim=True)
        dist.all_reduce(squares, group=self.group)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return (x.float() * torch.rsqrt(squares / self.features + eps)).type_as(x) * self.weight


class _KeyMaskProcessor(WanAttnProcessor):
    """Self-attention with a mask over this rank's keys (padding tokens False) while one is set."""

    key_mask: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        mask = self.key_mask if attention_mask is None else attention_mask
        return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)


class WanParallelSpec:
    @staticmethod
    def transformers(stages: PipelineStages) -> list[torch.nn.Module]:
        return stages.experts()  # type: ignore[attr-defined]

    @staticmethod
    def expert(stages: PipelineStages, state: DenoiseState) -> int:
        return stages.expert_index(state)  # type: ignore[attr-defined]

    @staticmethod
    def num_heads(config: dict[str, Any]) -> int:
        return config["num_attention_heads"]

    @staticmethod
    def num_blocks(config: dict[str, Any]) -> int:
        return config["num_layers"]

    @staticmethod
    def blocks(transformer: WanTransformer3DModel) -> list[torch.nn.Module]:
        return list(transformer.blocks)

    @staticmethod
    def embed(transformer: WanTransformer3DModel, inputs: dict[str, Any]) -> Carry:
        video = inputs["hidden_states"]
        rotary = transformer.rope(video)
        hidden = transformer.patch_embedding(video).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, text, _ = transformer.condition_embedder(
            inputs["timestep"], inputs["encoder_hidden_states"], None, timestep_seq_len=None
        )
        block_inputs = {
            "encoder_hidden_states": text,
            "temb": timestep_proj.unflatten(1, (6, -1)),
            "rotary_emb": rotary,
        }
        # the text is every block's input and never changes: each rank embeds it, none sends it
        return Carry(hidden=hidden, context=None, extras={"block": block_inputs, "temb": temb, "shape": video.shape})

    @staticmethod
    def run_block(block: torch.nn.Module, carry: Carry) -> None:
        carry.hidden = block(carry.hidden, **carry.extras["block"])

    @staticmethod
    def head(transformer: WanTransformer3DModel, carry: Carry) -> torch.Tensor:
        temb = carry.extras["temb"]
        shift, scale = (transformer.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = carry.hidden
        hidden = (transformer.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = transformer.proj_out(hidden)
        batch, _, frames, height, width = carry.extras["shape"]
        p_t, p_h, p_w = transformer.config.patch_size
        hidden = hidden.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    @staticmethod
    def prepare_model_parallel(transformer: WanTransformer3DModel, groups: ParallelGroups) -> None:
        if groups.size("ulysses") * groups.size("ring") > 1:
            for block in transformer.blocks:
                block.attn1.set_processor(_KeyMaskProcessor())
        ranks = groups.size("tp")
        if ranks == 1:
            return
        if transformer.config.added_kv_proj_dim is not None:
            raise ConfigError("tensor_parallel_size: Wan checkpoints with image cross-attention are not supported")
        transformer._tp_plan = _TP_PLAN  # read by enable_parallelism
        rank, group = groups.local_rank("tp"), groups.group("tp")
        for block in transformer.blocks:
            for attn in (block.attn1, block.attn2):
                attn.heads //= ranks  # the processor splits the local projections into this many heads
                attn.norm_q = _ShardedRMSNorm(attn.norm_q, group, rank, ranks)
                attn.norm_k = _ShardedRMSNorm(attn.norm_k, group, rank, ranks)

    @staticmethod
    def sequence_parallel_forward(
        transformer: WanTransformer3DModel, inputs: dict[str, Any], ulysses: int, ring: int, ulysses_rank: int
    ) -> torch.Tensor:
        """Pad whole latent frames until the degree divides the video tokens; mask the padding's keys.

        Ring attention reuses one mask for every key chunk of the ring, so it cannot mask padding:
        uneven token counts with ``ring_degree`` > 1 fail the request (as for FLUX).
        """
        degree = ulysses * ring
        video = inputs["hidden_states"]
        p_t, p_h, p_w = transformer.config.patch_size
        frames, per_frame = video.shape[2] // p_t, (video.shape[3] // p_h) * (video.shape[4] // p_w)
        tokens = frames * per_frame
        if tokens % degree == 0:
            return transformer(**inputs, return_dict=False)[0]
        if ring > 1:
            raise ValueError(
                f"ring_degree {ring}: {tokens} video tokens must be a multiple of ulysses_degree x ring_degree = "
                f"{degree} (ring attention cannot mask padding)"
            )
        extra = -frames % (degree // math.gcd(per_frame, degree))  # patch frames to add
        pad = video.new_zeros((*video.shape[:2], extra * p_t, *video.shape[3:]))
        padded = {**inputs, "hidden_states": torch.cat([video, pad], dim=2)}
        chunk = (frames + extra) * per_frame // degree
        keep = (torch.arange(chunk, device=video.device) + ulysses_rank * chunk) < tokens
        processors = [block.attn1.processor for block in transformer.blocks]
        for processor in processors:
            processor.key_mask = keep.expand(video.shape[0], -1)
        try:
            return transformer(**padded, return_dict=False)[0][:, :, : video.shape[2]]
        finally:
            for processor in processors:
                processor.key_mask = None
