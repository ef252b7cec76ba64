"""Tiny CLIP / T5 / Qwen2 tokenizers trained locally (no hub access) on a built-in English corpus.

Both use the ``tokenizers`` library (normalizers, pre-tokenizers, BPE / Unigram models) wrapped in
the transformers classes that ``FluxPipeline`` expects. In transformers >= 5 ``CLIPTokenizer`` and
``T5TokenizerFast`` *are* the ``tokenizers``-backed implementations (there is no separate "slow"
class; ``T5TokenizerFast`` is an alias of ``T5Tokenizer``).

The merges / pieces are learned by the small BPE learner below rather than by
``tokenizers.trainers``: those trainers break frequency ties through Rust hash-map order, which
changes from process to process, so the vocabulary (and thus the text encoders' embedding shapes)
would not be reproducible.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Iterable

from transformers import CLIPTokenizer, Qwen2Tokenizer, T5TokenizerFast

# Short prompt-like sentences about shapes, colors and scenes; deterministic training data.
CORPUS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a blue square on a white background",
    "a green triangle next to a yellow star",
    "a photo of a cat",
    "a photo of a dog playing in the snow",
    "a black cat sleeping on a red sofa",
    "an orange sunset over the calm ocean",
    "a small wooden house in a pine forest",
    "a purple flower in a glass vase",
    "a white horse running across a green field",
    "two red apples on a wooden table",
    "a city street at night with bright neon lights",
    "a snowy mountain under a clear blue sky",
    "a bowl of fruit: bananas, grapes and oranges",
    "an astronaut riding a horse on the moon",
    "a watercolor painting of a sailing boat",
    "a portrait of an old man with a gray beard",
    "a yellow taxi driving through the rain",
    "a pink cake with candles on a birthday party",
    "a close-up photo of a butterfly on a leaf",
    "three blue circles and one red square",
    "a striped pattern of black and white lines",
    "a dark cave lit by a single torch",
    "a robot reading a book in a library",
    "the desert at noon with tall cacti",
    "a lighthouse on a rocky coast during a storm",
    "a bright rainbow above a waterfall",
    "a cozy kitchen with copper pots and plants",
    "a red car parked beside a brick wall",
    "a child flying a kite on the beach",
    "a minimalist logo with a golden hexagon",
    "a cup of coffee next to a laptop",
    "a frog sitting on a lily pad in a pond",
    "an oil painting of sunflowers in a field",
    "a silver spaceship flying above the clouds",
    "a tiger walking through tall grass",
    "a map of an island with a treasure chest",
    "a pixel art castle with 8 towers",
    "a macro shot of water drops on glass",
    "a teddy bear wearing a blue scarf",
    "it's a sunny day, isn't it? we're happy!",
    "photo 4k, highly detailed, 35mm, f/1.8",
)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# Printable ASCII (letters, digits, punctuation) so plain English never needs the T5 unk token.
_ASCII = [c for c in string.printable if not c.isspace()]


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode table, in CLIP's vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def learn_bpe(words: Iterable[tuple[str, ...]], num_merges: int) -> list[tuple[tuple[str, str], int]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties -> smallest pair).

    Returns ``[(pair, count_when_merged), ...]`` in merge order; stops early when nothing is left.
    """
    vocab = Counter(words)
    merges: list[tuple[tuple[str, str], int]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in vocab.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append((best, pairs[best]))
        merged: Counter[tuple[str, ...]] = Counter()
        for word, n in vocab.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        vocab = merged
    return merges


def build_clip_tokenizer(vocab_size: int = 1000, corpus: Iterable[str] = CORPUS) -> CLIPTokenizer:
    """Byte-level BPE with CLIP's conventions (lowercase, ``</w>`` suffix, 77 tokens).

    Vocabulary layout mirrors openai/clip: 256 byte symbols, the same with ``</w>``, the
    merges, then ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids (CLIP's
    text model pools at the eos position). Every byte is in the vocabulary, so any unicode
    text (emoji, CJK, ...) tokenizes without unknown tokens. ``corpus`` is what the merges are
    learned from (the demo model adds its captions so that each of their words is one token).
    """
    template = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer + pre-tokenizer
    words = [
        (*piece[:-1], piece[-1] + "</w>")
        for text in corpus
        for piece, _ in template.pre_tokenizer.pre_tokenize_str(template.normalizer.normalize_str(text))
    ]
    byte_syms = _bytes_to_unicode()
    merges = [pair for pair, _ in learn_bpe(words, vocab_size - 2 * len(byte_syms) - 2)]
    vocab: dict[str, int] = {}
    for tok in [*byte_syms, *(s + "</w>" for s in byte_syms), *(a + b for a, b in merges)]:
        vocab.setdefault(tok, len(vocab))
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer(vocab_size: int = 500, corpus: Iterable[str] = CORPUS) -> T5TokenizerFast:
    """Unigram tokenizer with T5's conventions (``<pad>``=0, ``</s>``=1, ``<unk>``=2, 512 tokens).

    Pieces are the characters (printable ASCII + corpus) and the BPE merges of ``▁``-prefixed
    words; each scores ``log(frequency / total)``. Characters outside that alphabet map to
    ``<unk>`` (as with real T5). No sentinel ``<extra_id_*>`` tokens (``extra_ids=0``).
    """
    template = T5TokenizerFast(extra_ids=0).backend_tokenizer  # T5's Metaspace pre-tokenizer
    words = [tuple(piece) for text in corpus for piece, _ in template.pre_tokenizer.pre_tokenize_str(text)]
    freq: Counter[str] = Counter({c: 1 for c in _ASCII})  # add-one so unseen ASCII is still known
    freq.update(c for word in words for c in word)
    merges = learn_bpe(words, vocab_size - 3 - len(freq))
    for (a, b), n in merges:
        freq[a + b] = max(freq[a + b], n)
    total = sum(freq.values())
    pieces = sorted(freq, key=lambda piece: (-freq[piece], piece))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, math.log(freq[piece] / total)) for piece in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


# Qwen2.5-VL's special tokens, in the order of its vocabulary (ids follow the learned merges).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The chat templates the Qwen-Image pipelines wrap prompts in, so their words are whole tokens as in Qwen's
# own vocabulary (the pipelines drop a fixed number of template tokens from the encoder output).
QWEN_TEMPLATE_TEXT = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:\nuser\nassistant\n",
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image that "
    "meets the user's requirements while maintaining consistency with the original input where appropriate.",
)


def build_qwen2_tokenizer(vocab_size: int = 1000) -> Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's pre-tokenizer and chat special tokens (``<|im_start|>`` ...).

    Like Qwen's own vocabulary: 256 byte symbols, the merges, then the special tokens; the
    pad / eos token is ``<|endoftext|>``. Any unicode text tokenizes without unknown tokens.
    """
    template = Qwen2Tokenizer().backend_tokenizer  # Qwen2's NFC normalizer + split regex + byte level
    words = [
        tuple(piece)
        for text in (*CORPUS, *QWEN_TEMPLATE_TEXT)
        for piece, _ in template.pre_tokenizer.pre_tokenize_str(template.normalizer.normalize_str(text))
    ]
    byte_syms = _bytes_to_unicode()
    merges = [pair for pair, _ in learn_bpe(words, vocab_size - len(byte_syms) - len(QWEN_SPECIAL_TOKENS))]
    vocab: dict[str, int] = {}
    for tok in [*byte_syms, *(a + b for a, b in merges)]:
        vocab.setdefault(tok, len(vocab))
    first_special = len(vocab)
    for i, tok in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[tok] = first_special + i
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=32768,
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
