"""LoRA on a diffusers transformer through its PEFT integration (``PeftAdapterMixin``).

The family names its pipeline's LoRA loader (``FluxPipeline`` for FLUX): its ``lora_state_dict``
reads diffusers' format (and the Kohya / XLabs variants it converts), its
``load_lora_into_transformer`` injects the adapter, the same code ``load_lora_weights`` runs.
What ``load_lora_weights`` does beyond that is refused rather than done:

- text-encoder LoRA weights: the prompt embeddings would depend on the adapter, which the text
  encoder stage of an ensemble never sees and the prompt-embedding cache does not key on;
- Control-LoRA norm layers and input-expanding weights: they replace base modules, so requests
  without the adapter would no longer run the base weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omni_backend.lora.names import WEIGHTS_FILE

_TRANSFORMER_PREFIX = "transformer."


class DiffusersLoraAdapter:
    """``LoraAdapter`` over a diffusers transformer and its pipeline's LoRA loader mixin."""

    def __init__(self, transformer: torch.nn.Module, loader: Any):
        self.transformer = transformer
        self.loader = loader  # a pipeline class with lora_state_dict / load_lora_into_transformer

    def load(self, adapter_id: str, folder: Path) -> None:
        state_dict, alphas, metadata = self.loader.lora_state_dict(
            str(folder), weight_name=WEIGHTS_FILE, return_alphas=True, return_lora_metadata=True
        )
        foreign = sorted(k for k in state_dict if not k.startswith(_TRANSFORMER_PREFIX))
        if foreign:
            raise ValueError(f"holds weights for other modules than the transformer ({foreign[0]}, ...)")
        not_lora = sorted(k for k in state_dict if "lora" not in k)
        if not_lora:
            raise ValueError(f"holds weights that would replace base weights ({not_lora[0]}, ...)")
        self.loader.load_lora_into_transformer(
            state_dict, network_alphas=alphas, transformer=self.transformer, adapter_name=adapter_id, metadata=metadata
        )

    def activate(self, adapter_id: str | None, scale: float) -> None:
        if adapter_id is None:
            self.transformer.disable_lora()  # the base layers alone; the adapters stay loaded
            return
        self.transformer.enable_lora()
        self.transformer.set_adapters([adapter_id], [scale])

    def delete(self, adapter_id: str) -> None:
        self.transformer.delete_adapters(adapter_id)
