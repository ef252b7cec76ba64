"""Model repository information."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """One entry of the server's model repository index.

    Attributes:
        name: Model name.
        version: Model version ("" when the server reports none, e.g. for unloaded models).
        state: Model state, e.g. ``"READY"``, ``"UNAVAILABLE"``, ``"LOADING"`` ("" if unknown).
        reason: Reason given by the server for the state (e.g. a load error), may be "".
    """

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""

    @property
    def ready(self) -> bool:
        """Whether the index reports the model as ``READY``."""
        return self.state.upper() == "READY"


def parse_repository_index(index: Any) -> list[ModelInfo]:
    """Normalises a repository index from any tritonclient flavour.

    Args:
        index: HTTP list of dicts, gRPC ``as_json`` dict with a ``models`` key, or the gRPC
            ``RepositoryIndexResponse`` protobuf.

    Returns:
        Models sorted by name then version.
    """
    if isinstance(index, dict):
        entries: Any = index.get("models", [])
    elif hasattr(index, "models"):
        entries = index.models
    else:
        entries = index or []
    models = []
    for entry in entries:
        if isinstance(entry, dict):
            get = entry.get
        else:

            def get(key: str, default: str = "", _e: Any = entry) -> Any:
                return getattr(_e, key, default)

        models.append(
            ModelInfo(
                name=str(get("name", "")),
                version=str(get("version", "") or ""),
                state=str(get("state", "") or ""),
                reason=str(get("reason", "") or ""),
            )
        )
    return sorted(models, key=lambda m: (m.name, m.version))
