"""A small CLIP BPE tokenizer that the project builds itself (no download).

It has CLIP's byte-level alphabet (256 bytes, each also in its end-of-word form) and one merge chain per
word of a fixed word list (every word of the DreamBench prompts and classes, plus common identifiers), so
prompts encode to a handful of tokens and any other text still encodes, character by character.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

# Words that appear in DreamBench prompts, classes and the usual identifiers.
WORDS = """
a an the of in on with and at to top it its around background photo picture
jungle snow beach cobblestone street pink fabric wooden floor city mountain blue house purple rug forest
wheat field tree autumn leaves eiffel tower floating water ocean milk green grass sunflowers mirror
sidewalk crowded dirt road white red shiny wet cube shaped wearing hat santa rainbow scarf black
monocle chef outfit firefighter police glasses yellow shirt wizard
backpack stuffed animal bowl can candle cat clock sneaker dog toy boot cartoon teapot vase
sks xjy zwx olis qwe vbn rare
""".split()


@lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's (and GPT-2's) reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab_and_merges(words: list[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if not re.fullmatch(r"[a-z]+", word) or len(word) < 2:
            continue
        # Merge left to right: "d o" -> "do", "do g</w>" -> "dog</w>".
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        acc = parts[0]
        for nxt in parts[1:]:
            merge = f"{acc} {nxt}"
            acc = acc + nxt
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(acc)
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def learn_merges(words: list[str]) -> list[str]:
    """BPE merges learned on `words` until every word is one symbol: each step merges the most frequent adjacent
    pair (a word counted once per occurrence in `words`, each split as HF's Whitespace pre-tokenizer splits, its
    last symbol in end-of-word form), and of equally frequent pairs the lexicographically first.

    HF tokenizers' BpeTrainer, used here until 2026-12-08, breaks those ties by ids it hands out in hash-map order,
    so the same words gave other merges, hence other token ids and another model=toy, on every build
    (huggingface/tokenizers#1794; 10 builds of the toy tokenizer, 10 vocabularies). The toy world's words nearly
    all tie (each occurs once), so this small, deterministic learner replaces it."""
    from collections import Counter
    from itertools import pairwise

    pieces = Counter(p for w in words for p in re.findall(r"\w+|[^\w\s]+", w))
    seqs = [(list(p[:-1]) + [p[-1] + "</w>"], n) for p, n in sorted(pieces.items())]
    merges: list[str] = []
    while True:
        counts: Counter = Counter()
        for seq, n in seqs:
            for pair in pairwise(seq):
                counts[pair] += n
        if not counts:
            return merges
        a, b = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(f"{a} {b}")
        for seq, _ in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == a and seq[i + 1] == b:
                    seq[i:i + 2] = [a + b]
                i += 1


def trained_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """CLIP's byte alphabet plus BPE merges *learned* on `words` (`learn_merges`): unlike the merge chains above,
    whose global ranks let one word's merge cut into another's ("b l" of "black" splits "cobblestone" into 7
    tokens), learned merges encode every word of the list as one token."""
    merges = learn_merges(words)
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tiny_tokenizer(save_dir: str | Path | None = None, model_max_length: int = 77,
                         words: list[str] | None = None) -> CLIPTokenizer:
    """words=None: model=tiny's tokenizer (fixed merge chains of WORDS); a list: merges learned on it."""
    vocab, merges = tiny_vocab_and_merges() if words is None else trained_vocab_and_merges(words)
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], model_max_length=model_max_length)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def build_tiny_t5_tokenizer(save_dir: str | Path | None = None, words: list[str] = WORDS,
                            model_max_length: int = 512):
    """A small T5 (SentencePiece-style unigram) tokenizer that the project builds itself, for the T5 slots of SD 3.5
    and Flux: T5's special tokens at T5's ids (<pad> 0, </s> 1, <unk> 2), "▁word" pieces for `words` and every
    letter / digit with and without "▁" (so any text still encodes), Metaspace pre-tokenizing, and </s> appended
    to every sequence as T5's tokenizer does. A `T5TokenizerFast`, saved as tokenizer.json where `save_dir` is
    given."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    pieces = [f"▁{w}" for w in dict.fromkeys(words)]
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    pieces += [c for c in chars] + [f"▁{c}" for c in chars] + ["▁"]
    # Log-probabilities: whole words are preferred to spelling them out letter by letter.
    vocab = [(s, 0.0) for s in specials] + [(p, -1.0 if len(p) > 2 else -8.0) for p in dict.fromkeys(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         extra_ids=0, model_max_length=model_max_length)
    if save_dir is not None:
        t5.save_pretrained(str(save_dir))
    return t5
