"""Prompt-embedding cache: a hit skips the text encoders and gives the same image; LRU; thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from omni_backend.pipelines.base import Component
from tests.acceleration.conftest import MIXED, load, make, run


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.slow
def test_hit_skips_the_encoders_and_gives_the_same_image(tiny_flux, uncached):
    stages, applied, observer = load(tiny_flux, enable_prompt_embed_cache="true")
    t5, clip = count_calls(stages.pipe.text_encoder_2), count_calls(stages.pipe.text_encoder)
    first = run(stages, [make(i, *case) for i, case in enumerate(MIXED)])
    encoder_calls = (t5[0], clip[0])
    assert (observer.hits, observer.misses) == (0, 2)
    again = run(stages, [make(i, *case) for i, case in enumerate(MIXED)])
    assert (t5[0], clip[0]) == encoder_calls, "a cache hit ran the text encoders"
    assert (observer.hits, observer.misses) == (2, 2)
    for key, image in uncached.items():
        assert (first[key] == image).all() and (again[key] == image).all()


def test_key_holds_every_encoder_input(tiny_flux):
    stages, applied, observer = load(tiny_flux, Component.TEXT_ENCODER, enable_prompt_embed_cache="true")
    cfg = make(0, "a cat", 1, "blurry", 3.0, 2)
    same_without_cfg = [make(1, "a cat", 1, None, 1.0, 2), make(2, "a cat", 9, "blurry", 1.0, 2)]  # negative unused
    stages.encode([cfg])
    out = stages.encode(same_without_cfg)
    assert observer.misses == 2 and observer.hits == 1, "negative prompt without true CFG must share the entry"
    assert "negative_prompt_embeds" not in out[0] and "negative_prompt_embeds" not in out[1]
    assert torch.equal(out[0]["prompt_embeds"], out[1]["prompt_embeds"])
    assert torch.equal(
        stages.encode([make(3, "a cat", 5, "blurry", 2.0, 9)])[0]["negative_prompt_embeds"],
        stages.encode([cfg])[0]["negative_prompt_embeds"],
    )


def test_lru_evicts_the_least_recently_used(tiny_flux):
    stages, applied, observer = load(
        tiny_flux, Component.TEXT_ENCODER, enable_prompt_embed_cache="true", prompt_embed_cache_size="2"
    )
    for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        stages.encode([make(0, prompt, 0, None, 1.0, 1)])
    assert len(applied.prompt_cache) == 2 and observer.misses == 3
    stages.encode([make(0, "a", 0, None, 1.0, 1)])
    assert observer.misses == 3
    stages.encode([make(0, "b", 0, None, 1.0, 1)])
    assert observer.misses == 4


def test_concurrent_encodes_agree(tiny_flux):
    stages, applied, observer = load(
        tiny_flux, Component.TEXT_ENCODER, enable_prompt_embed_cache="true", prompt_embed_cache_size="3"
    )
    prompts = ["one", "two", "three", "four"]
    expected = {p: stages.encode([make(0, p, 0, None, 1.0, 1)])[0]["prompt_embeds"] for p in prompts}
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for k in range(12):
                prompt = prompts[(offset + k) % len(prompts)]
                got = stages.encode([make(0, prompt, 0, None, 1.0, 1)])[0]["prompt_embeds"]
                assert torch.equal(got, expected[prompt]), prompt
        except BaseException as exc:  # re-raised on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(applied.prompt_cache) <= 3
    assert observer.hits + observer.misses == 4 + 4 * 12


def test_duplicate_prompts_in_one_batch_are_encoded_once(tiny_flux):
    stages, applied, observer = load(tiny_flux, Component.TEXT_ENCODER, enable_prompt_embed_cache="true")
    t5 = count_calls(stages.pipe.text_encoder_2)
    out = stages.encode([make(i, "same prompt", i, None, 1.0, 1) for i in range(3)])
    assert t5[0] == 1 and (observer.hits, observer.misses) == (2, 1)
    assert all(torch.equal(o["prompt_embeds"], out[0]["prompt_embeds"]) for o in out)
