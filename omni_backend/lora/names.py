"""Adapter names: what a ``lora_name`` may be and the folder it stands for under ``lora_dir``.

A name is a plain folder name (no separators, no leading dot, so no ``..``), and the folder it
resolves to, symlinks followed, must sit directly inside ``lora_dir`` and hold diffusers' LoRA
weights file. Only the safetensors file is accepted: a ``.bin`` adapter is a pickle, and loading
one would run whatever code it carries.
"""

from __future__ import annotations

import re
from pathlib import Path

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes
# Wan2.2 A14B's low-noise expert (``transformer_2``): its weights, optional, beside the high-noise expert's
TRANSFORMER_2_WEIGHTS_FILE = "pytorch_lora_weights_transformer_2.safetensors"
MAX_NAME_LENGTH = 64
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
_LISTED = 20  # available names quoted in an "unknown adapter" message


class AdapterNameError(ValueError):
    """A name is malformed, escapes ``lora_dir`` or names no adapter; the message says which."""


def adapter_path(lora_dir: Path, name: str) -> Path:
    """The adapter folder ``name`` stands for, or AdapterNameError."""
    if not name:
        raise AdapterNameError("is empty")
    if not _NAME.fullmatch(name):
        raise AdapterNameError(
            f"{name[:MAX_NAME_LENGTH]!r} is not an adapter name: a folder name of at most {MAX_NAME_LENGTH} "
            "letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    folder = _resolve(lora_dir, name)
    if folder is None:
        raise AdapterNameError(f"{name!r} resolves outside lora_dir")
    if not (folder / WEIGHTS_FILE).is_file():
        listed = available_adapters(lora_dir)
        shown = ", ".join(listed[:_LISTED]) + (", ..." if len(listed) > _LISTED else "")
        raise AdapterNameError(f"unknown adapter {name!r} (available: {shown or 'none'})")
    return folder


def available_adapters(lora_dir: Path) -> list[str]:
    """Names of the adapters under ``lora_dir``, sorted."""
    names = []
    for entry in sorted(lora_dir.iterdir()) if lora_dir.is_dir() else []:
        folder = _resolve(lora_dir, entry.name) if _NAME.fullmatch(entry.name) else None
        if folder is not None and (folder / WEIGHTS_FILE).is_file():
            names.append(entry.name)
    return names


def weights_file(folder: Path, file_name: str) -> Path | None:
    """``folder / file_name`` if it is a file, None if absent; ValueError if a link takes it out of ``folder``."""
    path = folder / file_name
    if not path.is_file():
        return None
    if path.resolve().parent != folder.resolve():
        raise ValueError(f"{file_name} resolves outside the adapter folder")
    return path


def _resolve(lora_dir: Path, name: str) -> Path | None:
    """The folder of ``name`` with links followed, None if it or its weights file lies outside ``lora_dir``."""
    root = lora_dir.resolve()
    try:
        folder = (root / name).resolve()
        weights = (folder / WEIGHTS_FILE).resolve()
    except (OSError, RuntimeError):  # a link loop
        return None
    return folder if folder.parent == root and weights.parent == folder else None
