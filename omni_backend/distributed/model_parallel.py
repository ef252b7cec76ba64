"""Sequence parallel (Ulysses / Ring) and tensor parallel of a transformer, through diffusers.

diffusers' ``enable_parallelism`` does the work: ContextParallelConfig hooks split the sequence
inputs and gather the output (``_cp_plan``) and its templated attention runs the Ulysses all-to-all
and the Ring; TensorParallelConfig shards the Linears of ``_tp_plan`` with DTensor. That is what runs
on GPUs with NCCL. Three small shims make the same path run over gloo on CPUs, where the tests run:

1. ``_resolve_parallel_config`` derives the device as ``rank % torch.accelerator.device_count()``
   (ZeroDivisionError without an accelerator) and builds its own mesh; we hand it our mesh and device.
2. Ring attention needs each partial attention's log-sum-exp, and every diffusers backend that
   returns it is CUDA-only (the native SDPA backend raises on ``return_lse``); on the CPU we give the
   native backend's CP forward op a math attention that returns the LSE.
3. ``apply_tensor_parallel`` refuses mesh device type "cpu" although DTensor's Colwise/Rowwise
   styles work over gloo; we allow it for CPU meshes.

Sequence lengths that the degree does not divide are handled one level up (``sequence.py``).
"""

from __future__ import annotations

import types

import torch
from diffusers import ContextParallelConfig
from diffusers.hooks import tensor_parallel as diffusers_tp
from diffusers.models import attention_dispatch
from diffusers.models._modeling_parallel import ParallelConfig as DiffusersParallelConfig
from diffusers.models._modeling_parallel import TensorParallelConfig

from omni_backend.distributed.groups import ParallelGroups

_native_forward_op = attention_dispatch._native_attention_forward_op


def _forward_op_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
    """The native CP forward op, plus a math path returning (out, lse) for Ring on the CPU (shim 2)."""
    if not return_lse:
        return _native_forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                  return_lse, _save_ctx=_save_ctx, _parallel_config=_parallel_config)  # fmt: skip
    if query.device.type != "cpu":
        raise ValueError("return_lse on an accelerator: set a flash/cuDNN attention backend for ring attention")
    q, k, v = (x.permute(0, 2, 1, 3).float() for x in (query, key, value))  # [B, H, S, D]
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(~attn_mask, -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, S]
    out = torch.softmax(scores, dim=-1) @ v
    return out.permute(0, 2, 1, 3).to(query.dtype), lse.permute(0, 2, 1)  # [B, S, H, D], [B, S, H]


def _install_cpu_shims() -> None:
    attention_dispatch._native_attention_forward_op = _forward_op_with_lse
    if "cpu" not in diffusers_tp._SUPPORTED_TP_DEVICES:
        diffusers_tp._SUPPORTED_TP_DEVICES = (*diffusers_tp._SUPPORTED_TP_DEVICES, "cpu")


def apply_model_parallel(transformer: torch.nn.Module, groups: ParallelGroups) -> None:
    """Enable Ulysses/Ring or tensor parallel on ``transformer`` for this rank (no-op when neither is set)."""
    parallel = groups.parallel
    if parallel.ulysses_degree * parallel.ring_degree > 1:
        config: ContextParallelConfig | TensorParallelConfig = ContextParallelConfig(
            ring_degree=parallel.ring_degree, ulysses_degree=parallel.ulysses_degree
        )
        mesh = groups.mesh["ring", "ulysses"]
    elif parallel.tensor_parallel_size > 1:
        config = TensorParallelConfig(tp_degree=parallel.tensor_parallel_size)
        mesh = groups.mesh["tp"]
    else:
        return
    if groups.device.type == "cpu":
        _install_cpu_shims()

    def resolve(self: torch.nn.Module, cfg: ContextParallelConfig | TensorParallelConfig) -> DiffusersParallelConfig:
        # shim 1: our mesh (a sub-mesh of the instance's) and our device, on CPUs and GPUs alike
        if isinstance(cfg, ContextParallelConfig):
            resolved = DiffusersParallelConfig(context_parallel_config=cfg)
        else:
            resolved = DiffusersParallelConfig(tensor_parallel_config=cfg)
        resolved.setup(groups.rank, groups.world_size, groups.device, mesh=mesh)
        self._parallel_config = resolved
        return resolved

    transformer._resolve_parallel_config = types.MethodType(resolve, transformer)
    transformer.enable_parallelism(config=config)
