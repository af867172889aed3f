import re
from pathlib import Path

import pytest

from dreambench.data.identifier import (BLOCKLIST, default_rare_range, pick_rare_identifier, rare_candidates,
                                        resolve_identifier)
from dreambench.models.tokenizer import build_tiny_tokenizer

CLIP_DIR = Path(__file__).resolve().parents[2] / "shared" / "clip-tokenizer"


@pytest.fixture(scope="module")
def clip():
    if not (CLIP_DIR / "vocab.json").exists():
        pytest.skip(f"real CLIP vocabulary not at {CLIP_DIR}")
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(CLIP_DIR / "vocab.json"), str(CLIP_DIR / "merges.txt"),
                         pad_token="<|endoftext|>")


def token_id(tok, s):
    ids = tok(" " + s, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (s, ids)
    return ids[0]


def test_clip_default_range_is_the_tail_before_specials(clip):
    assert default_rare_range(clip) == (49406 - 5000, 49406)


def test_clip_pick_is_rare_short_single_token_and_deterministic(clip):
    lo, hi = default_rare_range(clip)
    picks = [pick_rare_identifier(clip, seed=s) for s in range(20)]
    assert picks == [pick_rare_identifier(clip, seed=s) for s in range(20)]  # same seed, same token
    assert len(set(picks)) >= 15  # different seeds mostly differ (319 candidates)
    for s in picks:
        assert re.fullmatch(r"[a-z]{1,3}", s), s
        assert s not in BLOCKLIST and s != "sks"
        assert lo <= token_id(clip, s) < hi
        # In a real prompt it stays one token next to the class noun.
        assert len(clip(f"a photo of {s} dog", add_special_tokens=False)["input_ids"]) == 5


def test_clip_candidates(clip):
    cands = rare_candidates(clip)
    assert len(cands) > 100
    assert "sks" not in cands
    assert "sks" in rare_candidates(clip, blocklist=frozenset())  # in range; excluded only by the blocklist
    assert "dog" not in cands and "the" not in cands  # frequent words have low ids
    ids = [token_id(clip, s) for s in cands]
    assert ids == sorted(ids)
    assert all(len(s) <= 2 for s in rare_candidates(clip, max_chars=2))


def test_explicit_range_and_empty_range(clip):
    s = pick_rare_identifier(clip, seed=3, rare_range=(40000, 41000))
    assert 40000 <= token_id(clip, s) < 41000
    with pytest.raises(ValueError, match="no single-token word"):
        pick_rare_identifier(clip, rare_range=(0, 256))  # raw bytes only, not words
    with pytest.raises(ValueError, match="rare_range"):
        pick_rare_identifier(clip, rare_range=(10, 10))


def test_resolve_identifier(clip):
    assert resolve_identifier("rare", clip, seed=7) == pick_rare_identifier(clip, seed=7)
    assert resolve_identifier("sks", clip, seed=7) == "sks"  # explicit strings are used as given
    assert resolve_identifier("olis dog", clip, seed=7) == "olis dog"
    for bad in ("", "  ", None):
        with pytest.raises(ValueError, match="non-empty"):
            resolve_identifier(bad, clip, seed=0)


def test_tiny_tokenizer():
    tok = build_tiny_tokenizer()
    lo, hi = default_rare_range(tok)
    assert hi == len(tok) - 2 and lo == hi // 2  # too small for the 5000-id tail: its later half
    s = pick_rare_identifier(tok, seed=0)
    assert s == pick_rare_identifier(tok, seed=0)
    assert re.fullmatch(r"[a-z]{1,3}", s) and s != "sks"
    assert lo <= token_id(tok, s) < hi
    assert {"xjy", "zwx", "qwe", "vbn"} <= set(rare_candidates(tok))
    assert resolve_identifier("rare", tok, seed=1) == pick_rare_identifier(tok, seed=1)


def test_whole_vocabulary_gives_letters_only(clip):
    # The full range holds digits, punctuation, accents and emoji that also encode as one token each.
    for s in ("7", "!", "é", "🐶"):
        token_id(clip, s)
    cands = rare_candidates(clip, rare_range=(0, 49406))
    assert len(cands) > 3000
    assert all(re.fullmatch(r"[a-z]{1,3}", s) for s in cands)
