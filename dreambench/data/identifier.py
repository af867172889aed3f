"""The subject's identifier token: DreamBooth's rare-token lookup ("Rare-token Identifiers", paper §3.2).

The identifier should be a word the text encoder has a weak prior for, so fine-tuning binds it to the subject
instead of fighting (or leaking) an existing meaning. The paper samples tokens of <= 3 characters uniformly
from a rare part of the vocabulary (ids 5000..10000 of T5-XXL's for Imagen) and decodes them back to text.
"""

from __future__ import annotations

import random
import re

# Short tokens with a strong prior meaning, excluded even when they sit in the rare range. "sks" is the
# community default and an SKS rifle, which leaks into samples; the rest: weapons, sex and slurs, countries
# and currencies, web/tech words, and the few loaded ones found in CLIP's last 5000 ids (an animal, brands,
# diseases, a president, games).
BLOCKLIST = frozenset("""
sks ak ar gun mg war kkk sex xxx ass cum fck jap wtf omg lol ok
usa uk us eu usd eur gbp
www com net org pro app exe pc tv dj ssh pkg
ewe tux cov hpv ysl lbj dbz fgo mgs
""".split())

# For CLIP's byte-level BPE the vocabulary is base bytes, then merges in the order BPE learnt them, i.e. most
# frequent pair first, so the last ids are the rarest words. We take the last 5000 regular ids (~10% of CLIP's
# 49408; "sks", id 48136, falls inside), or the later half of a vocabulary too small for that (the project's
# tiny tokenizer). Of CLIP's last 5000 ids, 319 are single-token words of <= 3 lowercase letters.
RARE_TAIL = 5000


def default_rare_range(tokenizer) -> tuple[int, int]:
    special = set(tokenizer.all_special_ids)
    end = max(i for i in tokenizer.get_vocab().values() if i not in special) + 1  # specials sit at the end
    return max(end - RARE_TAIL, end // 2), end


def rare_candidates(tokenizer, max_chars: int = 3, rare_range: tuple[int, int] | None = None,
                    blocklist=BLOCKLIST) -> list[str]:
    lo, hi = rare_range if rare_range is not None else default_rare_range(tokenizer)
    if not 0 <= lo < hi:
        raise ValueError(f"rare_range must be (lo, hi) with 0 <= lo < hi (half-open), got {rare_range}")
    word = re.compile(rf"[a-z]{{1,{max_chars}}}", re.ASCII)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(lo, min(hi, len(tokenizer))) if i not in special]
    out = []
    for i, text in zip(ids, tokenizer.batch_decode([[i] for i in ids])):
        s = text.strip()
        if not word.fullmatch(s) or s in blocklist:
            continue
        # Must come back as this one token when written as a word in a prompt: rules out word-internal pieces
        # ("clich" of "cliche") that decode to letters but encode differently after a space.
        if tokenizer(" " + s, add_special_tokens=False)["input_ids"] == [i]:
            out.append((i, s))
    return [s for _, s in sorted(out)]  # sorted by id: the draw below depends only on the seed


def pick_rare_identifier(tokenizer, seed: int = 0, max_chars: int = 3,
                         rare_range: tuple[int, int] | None = None, blocklist=BLOCKLIST) -> str:
    candidates = rare_candidates(tokenizer, max_chars, rare_range, blocklist)
    if not candidates:
        raise ValueError(f"no single-token word of <= {max_chars} lowercase letters in id range "
                         f"{rare_range or default_rare_range(tokenizer)} of this tokenizer; widen rare_range")
    return random.Random(seed).choice(candidates)


def resolve_identifier(value: str, tokenizer, seed: int) -> str:
    # data.identifier: "rare" draws one with the run's seed; any other string (e.g. "sks", to reproduce
    # community results) is used as given.
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"identifier must be a non-empty string or 'rare', got {value!r}")
    if value == "rare":
        return pick_rare_identifier(tokenizer, seed=seed)
    return value
