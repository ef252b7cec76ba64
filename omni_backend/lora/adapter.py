"""LoRA on diffusers transformers through their PEFT integration (``PeftAdapterMixin``).

The family names its pipeline's LoRA loader mixin (``QwenImagePipeline`` for Qwen-Image): its
``lora_state_dict`` reads diffusers' format (and the community variants it converts), its
``load_lora_into_transformer`` injects the adapter, the same code ``load_lora_weights`` runs.
What ``load_lora_weights`` does beyond that is refused rather than done:

- text-encoder LoRA weights: the prompt embeddings would depend on the adapter, which the text
  encoder stage of an ensemble never sees and the prompt-embedding cache does not key on;
- Control-LoRA norm layers and input-expanding weights: they replace base modules, so requests
  without the adapter would no longer run the base weights.

A pipeline with two denoisers (Wan2.2 A14B's high-noise ``transformer`` and low-noise
``transformer_2``) takes one weights file per expert, as diffusers does: ``load_lora_weights``
loads a file into ``transformer``, or into ``transformer_2`` with ``load_into_transformer_2=True``.
An adapter folder's ``pytorch_lora_weights.safetensors`` goes to the first expert and an optional
second file to the second; an expert without weights of its own runs its base weights while the
adapter is active, as it does after ``pipe.set_adapters([name])`` in diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline

from omni_backend.lora.names import WEIGHTS_FILE, weights_file

_TRANSFORMER_PREFIX = "transformer."


class DiffusersLoraAdapter:
    """``LoraAdapter`` over a pipeline's transformers and its LoRA loader mixin."""

    def __init__(self, loader: Any, transformers: Mapping[str, torch.nn.Module]):
        self.loader = loader  # a pipeline class with lora_state_dict / load_lora_into_transformer
        # weights file name in an adapter folder -> the transformer it loads into; WEIGHTS_FILE
        # (which every adapter holds) first, the others optional
        self.transformers = dict(transformers)
        self._holders: dict[str, list[torch.nn.Module]] = {}  # adapter id -> transformers holding its weights

    def load(self, adapter_id: str, folder: Path) -> None:
        # read and check every file before touching a transformer, so a bad file loads nothing
        reads = []
        for file_name, transformer in self.transformers.items():
            path = weights_file(folder, file_name)
            if path is None and file_name != WEIGHTS_FILE:
                continue  # this expert runs its base weights under the adapter
            if path is None:
                raise ValueError(f"has no {file_name}")
            state_dict, load_kwargs = self._read(path)
            _check(file_name, state_dict)
            reads.append((transformer, state_dict, load_kwargs))
        holders: list[torch.nn.Module] = []
        try:
            for transformer, state_dict, load_kwargs in reads:
                self.loader.load_lora_into_transformer(
                    state_dict, transformer=transformer, adapter_name=adapter_id, **load_kwargs
                )
                holders.append(transformer)
        except Exception:
            for transformer in holders:  # don't leave half an adapter behind
                transformer.delete_adapters(adapter_id)
            raise
        self._holders[adapter_id] = holders

    def _read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The file's state dict and what ``load_lora_into_transformer`` needs with it."""
        state_dict, metadata = self.loader.lora_state_dict(
            str(path.parent), weight_name=path.name, return_lora_metadata=True
        )
        return state_dict, {"metadata": metadata}

    def activate(self, adapter_id: str | None, scale: float) -> None:
        holders = self._holders[adapter_id] if adapter_id is not None else []
        for transformer in self.transformers.values():
            if any(transformer is h for h in holders):
                transformer.enable_lora()
                transformer.set_adapters([adapter_id], [scale])
            else:
                transformer.disable_lora()  # the base layers alone; the adapters stay loaded

    def delete(self, adapter_id: str) -> None:
        for transformer in self._holders.pop(adapter_id):
            transformer.delete_adapters(adapter_id)


class FluxLoraAdapter(DiffusersLoraAdapter):
    """FLUX's loader also returns the network alphas of the Kohya / XLabs adapters it converts."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__(FluxPipeline, {WEIGHTS_FILE: transformer})

    def _read(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state_dict, alphas, metadata = self.loader.lora_state_dict(
            str(path.parent), weight_name=path.name, return_alphas=True, return_lora_metadata=True
        )
        return state_dict, {"metadata": metadata, "network_alphas": alphas}


def _check(file_name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    foreign = sorted(k for k in state_dict if not k.startswith(_TRANSFORMER_PREFIX))
    if foreign:
        raise ValueError(f"{file_name} holds weights for other modules than the transformer ({foreign[0]}, ...)")
    not_lora = sorted(k for k in state_dict if "lora" not in k)
    if not_lora:
        raise ValueError(f"{file_name} holds weights that would replace base weights ({not_lora[0]}, ...)")
