"""Prompt-embedding cache: an LRU of text-encoder outputs, so a repeated prompt skips the encoders.

Keyed on what decides the encoder output: the family's ``encode_key`` (prompt, negative prompt
when it is encoded, every encoder parameter such as the sequence length). Entries are the per-request
conditioning dicts ``encode`` returns; tensors are never modified downstream (``prepare`` copies
them to the device), so a hit hands the same tensors out again. It is safe when several threads
encode at once: one lock guards the entries, another serializes the misses' encoder calls, because
the encoders are not thread-safe (a fast tokenizer's padding and truncation state is set per call,
so two concurrent calls can pad to each other's length).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from omni_backend.engine.observer import AccelerationObserver
from omni_backend.pipelines.base import Conditioning
from omni_backend.request import DiffusionRequest

EncodeFn = Callable[[Sequence[DiffusionRequest]], list[Conditioning]]


class PromptEmbedCache:
    def __init__(self, capacity: int, key: Callable[[DiffusionRequest], Hashable], observer: AccelerationObserver):
        self.capacity = capacity
        self.key = key
        self.observer = observer
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Conditioning] = OrderedDict()
        self._lock = threading.Lock()  # the entries and counters
        self._encoding = threading.Lock()  # one encoder call at a time

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, requests: Sequence[DiffusionRequest], encode: EncodeFn) -> list[Conditioning]:
        """``encode`` through the cache: only the distinct missing keys reach the text encoders."""
        keys = [self.key(r) for r in requests]
        found: dict[Hashable, Conditioning] = {}
        with self._lock:
            for key in keys:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    found[key] = self._entries[key]
        missing: dict[Hashable, DiffusionRequest] = {}
        for key, request in zip(keys, requests, strict=True):
            if key not in found:
                missing.setdefault(key, request)  # the same prompt twice in a batch is encoded once
        if missing:
            with self._encoding:
                encoded = encode(list(missing.values()))
            found.update(zip(missing, encoded, strict=True))
        hits = len(requests) - len(missing)
        with self._lock:
            for key in missing:
                self._entries[key] = found[key]
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            self.hits += hits
            self.misses += len(missing)
            self.observer.on_prompt_cache(hits, len(missing))
        return [dict(found[key]) for key in keys]  # a dict per request: callers may add to theirs
