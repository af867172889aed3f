"""The metric arithmetic of shared/docs/PROTOCOL.md on tiny random encoders: pairing, aggregation, CLIP-T text,
DINO preprocessing, state merging, LPIPS. No pretrained weights, no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from dreambench.metrics.encoders import ClipEncoder, DinoEncoder, _features, dino_preprocess
from dreambench.metrics.functional import bootstrap_ci, clip_t_text, strip_identifier
from dreambench.metrics.lpips import CHANNELS, LPIPSDistance, load_lpips
from dreambench.metrics.scorer import MetricSet, build_scorer
from dreambench.metrics.scores import CLIPIScore, CLIPTScore, DINOScore, DIVScore

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dreambench-cache")


@pytest.fixture()
def metrics_cfg(cache_dir, monkeypatch):
    # conf/metrics/tiny.yaml as the CLI composes it, with the tiny encoders under this session's cache.
    monkeypatch.setenv("DREAMBENCH_CACHE", str(cache_dir))
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["metrics=tiny"])
    return cfg.metrics


@pytest.fixture()
def scorer(metrics_cfg):
    return build_scorer(metrics_cfg)


def synthetic(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(a).resize(size, Image.NEAREST)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------------------------- arithmetic

def test_pairing_and_aggregation_on_hand_made_embeddings():
    rng = np.random.default_rng(0)
    real = {"a": rng.normal(size=(4, 8)), "b": rng.normal(size=(6, 8))}
    gen = {"a": rng.normal(size=(3, 8)), "b": rng.normal(size=(5, 8))}
    m = DINOScore(["a", "b", "c"])
    for s in ("a", "b"):
        m.update(torch.tensor(gen[s]), torch.tensor(real[s]), s)
    out = m.compute()
    cos = {s: unit(gen[s]) @ unit(real[s]).T for s in ("a", "b")}
    per_subject = {s: cos[s].mean() for s in cos}
    all_pairs = np.concatenate([cos[s].ravel() for s in cos]).mean()
    assert cos["a"].size == 12 and cos["b"].size == 30  # every generated x every real image
    assert float(out["mean"]) == pytest.approx(np.mean(list(per_subject.values())), abs=1e-12)
    assert float(out["mean_over_pairs"]) == pytest.approx(all_pairs, abs=1e-12)
    assert abs(float(out["mean"]) - float(out["mean_over_pairs"])) > 1e-4  # 4 vs 6 real images: they differ
    assert m.per_subject() == pytest.approx(per_subject)  # "c" has no data: left out, not counted as 0
    assert torch.isnan(out["per_subject"][2])


def test_distinct_pairs_for_the_real_images_row():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 8))
    m = CLIPIScore(["s"])
    m.update(torch.tensor(x), torch.tensor(x), "s", distinct=True)
    cos = unit(x) @ unit(x).T
    expected = (cos.sum() - np.trace(cos)) / 20
    assert float(m.compute()["mean"]) == pytest.approx(expected, abs=1e-12)


def test_permutation_changes_nothing_and_scale_is_raw_cosine():
    rng = np.random.default_rng(2)
    g, r = torch.tensor(rng.normal(size=(7, 16))), torch.tensor(rng.normal(size=(4, 16)))
    a, b = DINOScore(["s"]), DINOScore(["s"])
    a.update(g, r, "s")
    b.update(g[torch.randperm(7)], r[torch.randperm(4)], "s")
    assert float(a.compute()["mean"]) == pytest.approx(float(b.compute()["mean"]), abs=1e-12)
    # Opposite embeddings give -1 (no clamp at 0, no x100).
    c = DINOScore(["s"])
    c.update(-r[:1], r[:1], "s")
    assert float(c.compute()["mean"]) == pytest.approx(-1.0, abs=1e-12)


def test_clip_t_pairs_rows_and_states_merge():
    rng = np.random.default_rng(3)
    img, txt = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    full = MetricSet(["a", "b"])
    halves = [MetricSet(["a", "b"]), MetricSet(["a", "b"])]
    for i, s in enumerate(["a", "a", "a", "b", "b", "b"]):
        target = halves[i % 2]
        for ms in (full, target):
            ms.clip_t.update(torch.tensor(img[i:i + 1]), torch.tensor(txt[i:i + 1]), s)
            ms.dino.update(torch.tensor(img[i:i + 1]), torch.tensor(txt), s)
            ms.div.update(torch.tensor([float(i)]), s)
    halves[0].merge(halves[1])
    for name, m in full.items():
        merged = getattr(halves[0], name)
        if name in ("pres", "clip_i"):  # never updated here
            continue
        torch.testing.assert_close(merged.compute()["per_subject"], m.compute()["per_subject"])
    # Row-wise: image i with text i only.
    expected = np.mean([(unit(img[i]) * unit(txt[i])).sum() for i in range(3)])
    assert full.clip_t.per_subject()["a"] == pytest.approx(expected)
    assert full.div.per_subject() == pytest.approx({"a": 1.0, "b": 4.0})


def test_manual_state_sum_equals_merge():
    rng = np.random.default_rng(4)
    x, y = torch.tensor(rng.normal(size=(4, 8))), torch.tensor(rng.normal(size=(3, 8)))
    a, b, c = DINOScore(["s"]), DINOScore(["s"]), DINOScore(["s"])
    a.update(x[:2], y, "s")
    b.update(x[2:], y, "s")
    c.update(x, y, "s")
    # What a DDP all-reduce does with dist_reduce_fx="sum": add the states.
    summed = DINOScore(["s"])
    summed.update(x[:1], y, "s")  # any update, then overwrite the states with the sums
    summed.total, summed.count = a.total + b.total, a.count + b.count
    a.merge_state({"total": b.total, "count": b.count})
    for m in (a, summed):
        assert float(m.compute()["mean"]) == pytest.approx(float(c.compute()["mean"]), abs=1e-12)


def test_clip_t_text_rule():
    assert clip_t_text("a sks dog in the jungle", "sks") == "a dog in the jungle"
    assert clip_t_text("a sks dog in the jungle", "sks", "with_identifier") == "a sks dog in the jungle"
    assert strip_identifier("a sks dog with a sksoup", "sks") == "a dog with a sksoup"  # whole words only
    assert clip_t_text("a sks xjy dog", "sks xjy") == "a dog"
    with pytest.raises(ValueError):
        clip_t_text("a dog", "sks", "drop_everything")


def test_bootstrap_is_seeded_and_brackets_the_mean():
    v = [0.1, 0.5, 0.7, 0.9, 0.3]
    lo, hi = bootstrap_ci(v, samples=2000, seed=0)
    assert (lo, hi) == bootstrap_ci(v, samples=2000, seed=0)
    assert lo < np.mean(v) < hi
    assert bootstrap_ci([0.4]) == (0.4, 0.4)


# ---------------------------------------------------------------------------------------------- encoders

def test_features_accepts_tensors_and_output_objects():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.ones(2, 3)
    assert _features(t) is t
    assert _features(BaseModelOutputWithPooling(pooler_output=t)) is t


def test_identical_image_sets_give_one(scorer):
    im = synthetic(0)
    gen, real = scorer.embed([im] * 3), scorer.embed([im.copy()] * 2)
    ms = MetricSet(["s"])
    ms.dino.update(gen["dino"], real["dino"], "s")
    ms.clip_i.update(gen["clip"], real["clip"], "s")
    assert float(ms.dino.compute()["mean"]) == pytest.approx(1.0, abs=1e-5)
    assert float(ms.clip_i.compute()["mean"]) == pytest.approx(1.0, abs=1e-5)
    other = scorer.embed([synthetic(1)])
    ms2 = DINOScore(["s"])
    ms2.update(other["dino"], real["dino"], "s")
    assert float(ms2.compute()["mean"]) < 1.0 - 1e-4  # and it can fail: different images give less


def test_dino_uses_explicit_resize_crop_and_the_cls_token(metrics_cfg):
    from transformers import ViTImageProcessor, ViTModel

    enc = DinoEncoder(**{k: v for k, v in metrics_cfg.dino.items() if k != "_target_"}, device="cpu")
    # Non-square, with different content at the sides: the crop drops the sides, the squash keeps them.
    a = np.zeros((200, 400, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 300:] = (0, 0, 255)
    a[:, 100:300] = np.random.default_rng(0).integers(0, 255, (200, 200, 3))
    im = Image.fromarray(a)

    # Hand computation: 200x400 -> 256x512 bicubic, crop the centre 224x224, ImageNet normalisation.
    r = np.asarray(im.resize((512, 256), Image.BICUBIC), np.float32)[16:240, 144:368] / 255.0
    r = (r - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    x = torch.tensor(r, dtype=torch.float32).permute(2, 0, 1)[None]
    torch.testing.assert_close(dino_preprocess([im]), x, atol=1e-5, rtol=0)
    model = ViTModel.from_pretrained(metrics_cfg.dino.name_or_path, add_pooling_layer=False, layer_norm_eps=1e-6)
    with torch.no_grad():
        cls = model(pixel_values=x).last_hidden_state[:, 0]
    expected = cls / cls.norm(dim=-1, keepdim=True)
    got = enc.embed([im])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    # The processor's 224 squash gives another embedding.
    squash = ViTImageProcessor(size={"height": 224, "width": 224}, image_mean=[0.485, 0.456, 0.406],
                               image_std=[0.229, 0.224, 0.225])(images=[im], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        s = model(pixel_values=squash).last_hidden_state[:, 0]
    assert (got - s / s.norm()).abs().max() > 1e-3
    # pooler_output (a random pooler on this checkpoint) is not what is taken.
    with_pooler = ViTModel.from_pretrained(metrics_cfg.dino.name_or_path, layer_norm_eps=1e-6)
    with torch.no_grad():
        p = with_pooler(pixel_values=x).pooler_output
    assert (got - p / p.norm()).abs().max() > 1e-3


def test_tiny_encoders_are_saved_as_safetensors_and_reloaded(metrics_cfg, scorer):
    for key in ("dino", "clip"):
        folder = Path(metrics_cfg[key].name_or_path)
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    # Built once, seeded: a second load gives the same weights, so the same embeddings.
    again = ClipEncoder(metrics_cfg.clip.name_or_path, tiny={"seed": 0}, device="cpu")
    torch.testing.assert_close(again.embed_texts(["a dog"]), scorer.clip.embed_texts(["a dog"]))


# ------------------------------------------------------------------------------------------------- LPIPS

def write_random_lpips(path: Path, seed: int = 0) -> Path:
    # Random weights with the key layout of lpips.LPIPS(net="alex").state_dict(), linear layers twice.
    from safetensors.torch import save_file

    from dreambench.metrics.lpips import LPIPSAlex

    torch.manual_seed(seed)
    m = LPIPSAlex()
    state = {"scaling_layer.shift": m.shift.clone(), "scaling_layer.scale": m.scale.clone()}
    state |= {f"net.{k}": v.clone() for k, v in m.net.state_dict().items()}
    for i, c in enumerate(CHANNELS):
        w = torch.rand(1, c, 1, 1)  # lpips keeps these non-negative
        state[f"lin{i}.model.1.weight"] = w
        state[f"lins.{i}.model.1.weight"] = w.clone()
    save_file(state, str(path))
    return path


def test_lpips_port_and_unavailable(tmp_path):
    assert load_lpips(None).startswith("unavailable")
    assert load_lpips(str(tmp_path / "nope.safetensors")).startswith("unavailable")
    d = load_lpips(str(write_random_lpips(tmp_path / "lpips.safetensors")), size=64)
    assert isinstance(d, LPIPSDistance)
    a, b = synthetic(0, (64, 64)), synthetic(1, (64, 64))
    assert d.group_mean([a, a.copy()]) == pytest.approx(0.0, abs=1e-7)
    assert d.group_mean([a, b]) > 0
    assert d.group_mean([a, b]) == pytest.approx(d.group_mean([b, a]), rel=1e-5)
    # 4 images -> the mean over the 6 pairs.
    ims = [synthetic(i, (64, 64)) for i in range(4)]
    pairs = [d.group_mean([ims[i], ims[j]]) for i in range(4) for j in range(i + 1, 4)]
    assert d.group_mean(ims) == pytest.approx(np.mean(pairs), rel=1e-5)
    m = DIVScore(["s"])
    m.update(torch.tensor([d.group_mean(ims)]), "s")
    assert float(m.compute()["mean"]) == pytest.approx(np.mean(pairs), rel=1e-5)


def test_clip_t_metric_and_scorer_text_rule(scorer):
    ims = [synthetic(i) for i in range(2)]
    emb = scorer.embed(ims)["clip"]
    texts = scorer.embed_texts(["a dog in the jungle", "a dog in the snow"])
    m = CLIPTScore(["s"])
    m.update(emb, texts, "s")
    expected = np.mean([(unit(emb[i].numpy()) * unit(texts[i].numpy())).sum() for i in range(2)])
    assert float(m.compute()["mean"]) == pytest.approx(expected, abs=1e-6)
    # The cached text embeddings are the same as a fresh batch.
    torch.testing.assert_close(scorer.clip.embed_texts(["a dog in the snow"])[0], texts[1])
