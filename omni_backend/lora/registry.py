"""The LoRA adapters of one model: which exist, which are resident on the transformer, which is active.

Adapters live under ``lora_dir``, one folder per name (diffusers' ``save_lora_weights`` layout).
They are loaded next to the base weights, never merged into them (no ``fuse_lora``): a request
without an adapter runs the base layers alone.

Who calls what, and on which thread:

- ``check`` (Triton's ``execute`` thread): a request's ``lora_name`` names an adapter, else
  INVALID_ARG. Reads the folder, so adapters copied in later are served without a reload.
- ``admits`` (the scheduler, engine thread): a request joins the running set only while at most
  ``max_loras`` adapters are in use by running requests, so every running request's adapter can
  be resident at once and an eviction never hits one in use.
- ``acquire`` (the runner, at admission, engine thread): load the adapter if it is not resident,
  evicting the least recently used one that no running request uses. Never during a transformer call.
- ``activate`` (the runner, before each transformer call): the batching key holds the adapter,
  so one call runs one adapter at one scale, or the base weights.
- ``describe`` (any thread): available, resident (least recently used first) and pinned names.

The family supplies the transformer-side verbs (load, activate, delete): a ``LoraAdapter`` from
``PipelineStages.lora_adapter()`` (see omni_backend/lora/adapter.py).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

from omni_backend.config import ConfigError, LoraConfig, ModelConfig
from omni_backend.engine.observer import AccelerationObserver
from omni_backend.lora.names import AdapterNameError, adapter_path, available_adapters
from omni_backend.pipelines.base import Component, PipelineStages
from omni_backend.request import DiffusionRequest, InvalidRequestError, LoraSelection

logger = logging.getLogger(__name__)

_UNSET = object()  # "no activation applied yet" (None means the base weights)


class LoraAdapter(Protocol):
    """What the registry needs of a family's transformer (``PipelineStages.lora_adapter``)."""

    def load(self, adapter_id: str, folder: Path) -> None:
        """Load the adapter in ``folder`` next to the base weights under the internal name ``adapter_id``."""

    def activate(self, adapter_id: str | None, scale: float) -> None:
        """Run the next calls with this adapter at ``scale``, or with the base weights (None)."""

    def delete(self, adapter_id: str) -> None:
        """Free an adapter's weights."""


class LoraRegistry:
    def __init__(self, config: LoraConfig, adapter: LoraAdapter, observer: AccelerationObserver | None = None):
        self.root = Path(config.lora_dir)
        self.max_loras = config.max_loras
        self.pinned = config.pinned
        self._adapter = adapter
        self._observer = observer or AccelerationObserver()
        # name -> internal adapter id (peft module keys can't hold the '.' a name may), least recently used first
        self._resident: OrderedDict[str, str] = OrderedDict()
        self._ids = itertools.count()
        self._active: Any = _UNSET
        self._lock = threading.Lock()  # describe() reads from other threads
        for name in self.pinned:
            self._load(name)

    # ------------------------------------------------------------------ request validation

    def check(self, name: str) -> None:
        """InvalidRequestError naming ``lora_name`` unless ``name`` is an adapter this model can run."""
        try:
            adapter_path(self.root, name)
        except AdapterNameError as exc:
            raise InvalidRequestError("lora_name", str(exc)) from None
        if name not in self.pinned and len(self.pinned) >= self.max_loras:
            raise InvalidRequestError(
                "lora_name", f"{name!r} is not pinned and all max_loras={self.max_loras} slots are pinned"
            )

    # ------------------------------------------------------------------ engine thread

    def admits(self, request: DiffusionRequest, running: Collection[DiffusionRequest]) -> bool:
        """Whether ``request`` may join ``running`` with every adapter in use still resident."""
        if request.lora is None or request.lora.name in self.pinned:
            return True
        in_use = {r.lora.name for r in running if r.lora is not None and r.lora.name not in self.pinned}
        return request.lora.name in in_use or len(in_use) < self.max_loras - len(self.pinned)

    def acquire(self, name: str, in_use: Collection[str]) -> None:
        """Make ``name`` resident (most recently used), evicting an unpinned adapter not ``in_use`` if full."""
        if name in self._resident:
            with self._lock:
                self._resident.move_to_end(name)
            return
        if len(self._resident) >= self.max_loras:
            victim = next((n for n in self._resident if n not in self.pinned and n not in in_use), None)
            if victim is None:  # admits() keeps this from happening
                raise RuntimeError(f"no LoRA slot free: all {self.max_loras} resident adapters are in use")
            self._evict(victim)
        self._load(name)

    def activate(self, selection: LoraSelection | None) -> None:
        """Set the transformer up for one call: this adapter at this scale, or the base weights."""
        wanted = None if selection is None else (self._resident[selection.name], selection.scale)
        if selection is not None:
            with self._lock:
                self._resident.move_to_end(selection.name)  # used now: the last to be evicted
        if wanted == self._active:
            return
        if wanted is None:
            self._adapter.activate(None, 0.0)
        else:
            self._adapter.activate(*wanted)
        self._active = wanted

    def _load(self, name: str) -> None:
        adapter_id = f"omni_lora_{next(self._ids)}"
        self._active = _UNSET  # loading may change which adapters peft runs
        self._adapter.load(adapter_id, adapter_path(self.root, name))
        with self._lock:
            self._resident[name] = adapter_id
        logger.info("loaded LoRA adapter %r (%d resident)", name, len(self._resident))
        self._observer.on_lora_resident(len(self._resident))

    def _evict(self, name: str) -> None:
        with self._lock:
            adapter_id = self._resident.pop(name)
        self._active = _UNSET
        self._adapter.delete(adapter_id)
        logger.info("evicted LoRA adapter %r (least recently used)", name)
        self._observer.on_lora_resident(len(self._resident))

    # ------------------------------------------------------------------ introspection

    def describe(self) -> dict[str, Any]:
        """Available, resident (least recently used first) and pinned adapters, and the slot count."""
        with self._lock:
            resident = list(self._resident)
        return {
            "available": available_adapters(self.root),
            "resident": resident,
            "pinned": list(self.pinned),
            "max_loras": self.max_loras,
        }


def create_lora_registry(
    config: ModelConfig, stages: PipelineStages, components: Component, observer: AccelerationObserver | None = None
) -> LoraRegistry | None:
    """The model's registry with its pinned adapters loaded, or None without ``lora_dir``."""
    if not config.lora.enabled:
        return None
    if Component.TRANSFORMER not in components:
        raise ConfigError("lora_dir: only applies to models that run the transformer (not text-encoder or VAE stages)")
    try:
        adapter = stages.lora_adapter()
    except NotImplementedError:
        raise ConfigError(f"lora_dir: the {config.family} family does not support LoRA adapters") from None
    try:
        return LoraRegistry(config.lora, adapter, observer)
    except Exception as exc:
        raise ConfigError(f"pinned_loras: loading failed: {exc}") from exc


def validate_lora(registry: LoraRegistry | None, selection: LoraSelection | None) -> None:
    """A request's adapter selection against the model's registry (InvalidRequestError naming ``lora_name``)."""
    if selection is None:
        return
    if registry is None:
        raise InvalidRequestError("lora_name", "this model serves no LoRA adapters (its config sets no lora_dir)")
    registry.check(selection.name)
