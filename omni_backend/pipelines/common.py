"""Helpers several families share: module groups, classic CFG, validating tensors that arrive from another
ensemble stage."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from omni_backend.cache.base import CacheRow
from omni_backend.pipelines.base import Conditioning, DenoiseState
from omni_backend.request import DiffusionRequest, InvalidRequestError


def loaded_groups(**groups: list[torch.nn.Module | None]) -> dict[str, list[torch.nn.Module]]:
    """``PipelineStages.module_groups`` from a pipeline's components: the loaded ones (a stage loads only
    its own), and only the groups that have any."""
    present = {name: [m for m in modules if m is not None] for name, modules in groups.items()}
    return {name: modules for name, modules in present.items() if modules}


def cache_row(state: DenoiseState, negative: bool) -> CacheRow:
    """The step cache's view of one transformer row: ``state``'s conditional or negative (CFG) branch."""
    return CacheRow(
        request_id=state.request.request_id,
        branch="uncond" if negative else "cond",
        step_index=state.step_index,
        num_steps=len(state.timesteps),
        threshold=state.request.params.cache_threshold,
    )


def with_vae_in_encode(groups: dict[str, list[torch.nn.Module]], vae: torch.nn.Module | None) -> dict:
    """``module_groups`` of a family whose ``encode`` also VAE-encodes the input image: the VAE rides
    with the text encoders too, so model offload puts it on the device for both stages."""
    if "text_encoder" in groups and vae is not None:
        groups["text_encoder"] = [*groups["text_encoder"], vae]
    return groups


def input_image_key(image: np.ndarray | None) -> tuple[tuple[int, ...], str]:
    """The input image's part of a prompt-embedding cache key: its shape and a digest of its pixels."""
    assert image is not None  # the family's parse_request requires it
    return image.shape, hashlib.sha256(image.tobytes()).hexdigest()


# One dimension of an expected shape: a fixed size, or (name, low, high) for a bounded free size.
Dim = int | tuple[str, int, int]


def tensor_from_array(name: str, array: np.ndarray, shape: tuple[Dim, ...]) -> torch.Tensor:
    """``array`` as float32 if it has ``shape`` and only finite values, else InvalidRequestError naming ``name``."""
    array = np.asarray(array)
    wanted = [d if isinstance(d, int) else d[0] for d in shape]
    if array.ndim != len(shape):
        raise InvalidRequestError(name, f"expected shape {wanted}, got {list(array.shape)}")
    for dim, size in zip(shape, array.shape, strict=True):
        if isinstance(dim, int):
            if size != dim:
                raise InvalidRequestError(name, f"expected shape {wanted}, got {list(array.shape)}")
        elif not dim[1] <= size <= dim[2]:
            raise InvalidRequestError(name, f"{dim[0]} = {size} is outside [{dim[1]}, {dim[2]}]")
    if not np.isfinite(array).all():
        raise InvalidRequestError(name, "contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def embeddings_from_arrays(
    arrays: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[Dim, ...]], required: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Validate the conditioning tensors named in ``shapes`` that are present; ``required`` ones must be."""
    cond = {name: tensor_from_array(name, arrays[name], shape) for name, shape in shapes.items() if name in arrays}
    for name in required:
        if name not in cond:
            raise InvalidRequestError(name, "is required")
    return cond


def pad_sequences(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack [L_i, D] sequences into [N, max L, D] zero-padded at the end, with a mask (None if none is padded)."""
    longest = max(s.shape[0] for s in sequences)
    if all(s.shape[0] == longest for s in sequences):
        return torch.stack(sequences), None
    padded = torch.stack([torch.cat([s, s.new_zeros(longest - s.shape[0], s.shape[1])]) for s in sequences])
    mask = torch.stack([torch.arange(longest, device=padded.device) < s.shape[0] for s in sequences]).to(torch.long)
    return padded, mask


def encode_with_classic_cfg(
    requests: Sequence[DiffusionRequest], encode_texts: Callable[[list[str]], list[torch.Tensor]]
) -> list[Conditioning]:
    """``prompt_embeds`` of every request; ``negative_prompt_embeds`` of those with ``guidance_scale`` > 1.

    Classic CFG as WanPipeline and LongCatImagePipeline decide it: the negative prompt is encoded only
    when guidance is on, and "" stands for a missing one. ``encode_texts``: one encoder pass over texts.
    """
    out: list[Conditioning] = [{"prompt_embeds": e} for e in encode_texts([r.prompt for r in requests])]
    cfg_rows = [i for i, r in enumerate(requests) if r.params.guidance_scale > 1]
    if cfg_rows:
        negatives = encode_texts([requests[i].negative_prompt or "" for i in cfg_rows])
        for i, negative in zip(cfg_rows, negatives, strict=True):
            out[i]["negative_prompt_embeds"] = negative
    return out
