"""The memory planner: exact parameter counts, monotone in what grows memory, the switches that shrink it, a
plausible SD 1.5 figure, and a stop before any model loads when the estimate exceeds the device."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, compose

ARCH = REPO / "bench" / "architectures"
GB = 1e9


@pytest.fixture(scope="module")
def sd15() -> dict:
    return {k: json.loads((ARCH / f"sd15_{n}.json").read_text())
            for k, n in (("unet", "unet"), ("text_encoder", "text"), ("vae", "vae"))}


def est(configs, method=None, **kw):
    from dreambench.memory import estimate
    from dreambench.methods import DreamBooth
    kw.setdefault("resolution", 512)
    kw.setdefault("precision", "bf16-mixed")
    kw.setdefault("frozen_dtype", torch.bfloat16)
    kw.setdefault("device", "cuda")
    return estimate(configs, method or DreamBooth(), **kw)


def test_parameter_counts_come_from_the_configs(sd15):
    e = est(sd15, resolution=256)
    # The published SD 1.5 counts (bench/architectures/README.md), built on the meta device.
    assert round(e.params["unet"] / 1e6, 2) == 859.52
    assert round(e.params["vae"] / 1e6, 2) == 83.65
    assert round(e.params["text_encoder"] / 1e6, 2) == 123.06
    assert e.trainable == e.params["unet"]  # dreambooth without the text encoder trains the UNet only


def test_sd15_full_finetune_estimate_is_in_a_plausible_band(sd15):
    e = est(sd15)
    p = e.parts
    # The static part is arithmetic: fp32 UNet weights 859.5 M x 4 B = 3.44 GB, the same again for gradients,
    # AdamW's two fp32 moments 6.88 GB; frozen VAE + text encoder in bf16 0.41 GB; autocast's bf16 weight
    # copies 1.72 GB.
    assert p["gradients"] == pytest.approx(3.44 * GB, rel=0.01)
    assert p["optimizer"] == pytest.approx(6.88 * GB, rel=0.01)
    assert p["weights"] == pytest.approx(3.85 * GB, rel=0.01)
    # Activations of a 1 + 1 batch at 64² latents with fused (flash / memory-efficient) attention: published
    # diffusers DreamBooth runs put the whole step at ~15-16 GB with gradient checkpointing and 8-bit Adam, and
    # full AdamW without checkpointing beyond a 16 GB card but within 24 GB: activations of a few GB.
    assert 1.0 * GB < p["activations"] < 8.0 * GB
    assert 16 * GB < e.total < 26 * GB


def test_monotone_in_resolution_and_batch(sd15):
    fp32 = {"precision": "32-true", "frozen_dtype": None}  # one trace per estimate (mixed needs two)
    by_res = [est(sd15, resolution=r, **fp32).total for r in (256, 512, 768)]
    assert by_res == sorted(by_res) and len(set(by_res)) == 3
    by_batch = [est(sd15, resolution=256, batch_size=b, **fp32).total for b in (1, 2)]
    assert by_batch[0] < by_batch[1]
    no_prior = est(sd15, resolution=256, prior=False, **fp32).total
    assert no_prior < by_batch[0]  # the prior batch doubles what goes through the UNet


def test_switches_that_lower_memory(sd15):
    base = est(sd15, resolution=256)
    ckpt = est(sd15, resolution=256, gradient_checkpointing=True)
    assert ckpt.parts["activations"] < base.parts["activations"] / 2
    assert ckpt.total < base.total
    eight = est(sd15, resolution=256, optimizer="AdamW8bit")
    assert eight.parts["optimizer"] == pytest.approx(base.parts["optimizer"] / 4)
    fp32 = est(sd15, resolution=256, precision="32-true", frozen_dtype=None)
    assert fp32.parts["autocast_copies"] == 0 and fp32.parts["weights"] > base.parts["weights"]


def test_lora_trains_a_sliver(sd15):
    from dreambench.methods.lora import LoRA
    e = est(sd15, LoRA(rank=4), resolution=256)
    full = est(sd15, resolution=256)
    assert 0 < e.trainable < 0.01 * full.trainable
    assert e.parts["optimizer"] < 0.01 * full.parts["optimizer"]
    assert e.total < full.total / 2


def prepare_overrides(tmp_path, *extra):
    return ["+experiment=dog", "model=tiny", "prior=none", "logger=none", f"paths.run_dir={tmp_path}", *extra]


def test_prepare_reports_the_plan_for_a_tiny_run(tmp_path):
    from dreambench.train import prepare
    plan = prepare(compose(prepare_overrides(tmp_path)))
    s = plan.memory.summary()
    assert s["estimated_peak_gb"] > 0 and s["capacity_gb"] is None and s["device"] == "cpu"
    assert set(s["parts_gb"]) == {"weights", "gradients", "optimizer", "autocast_copies", "activations", "overhead"}
    assert prepare(compose(prepare_overrides(tmp_path, "memory.plan=false"))).memory is None


def test_exceeding_the_device_stops_before_any_model_loads(tmp_path, monkeypatch):
    from dreambench import train as train_mod
    from dreambench.errors import UserError
    from dreambench.models import loading

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the memory check")
    monkeypatch.setattr(loading, "load_components", no_loading)
    cfg = compose(prepare_overrides(tmp_path / "run", "memory.capacity_gb=0.001"))  # a 1 MB device
    with pytest.raises(UserError, match=r"estimated peak memory .* exceeds .* 1\.0 MB"):
        train_mod.train(cfg)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_run_that_does_not_fit_names_the_switches_that_make_it_fit(tmp_path):
    """The advice is computed by the same planner: a capacity between the full fine-tune's estimate and LoRA's
    names the switches that fit (each with its estimate) in the error, and none that would not."""
    from hydra.utils import instantiate

    from dreambench.errors import UserError
    from dreambench.memory import GB, read_configs, switch_ladder
    from dreambench.train import prepare
    cfg = compose(prepare_overrides(tmp_path / "run"))
    plan = prepare(cfg)
    ladder = switch_ladder(read_configs(plan.model_ref), instantiate(cfg.method), resolution=int(cfg.data.resolution),
                           batch_size=int(cfg.data.batch_size), prior=float(cfg.prior.get("weight", 0.0)) > 0)
    totals = {label: e.total for label, _, e in ladder}
    assert totals["LoRA + gradient checkpointing"] < totals["LoRA"] < totals["as configured"]
    assert totals["gradient checkpointing"] < totals["as configured"]
    cap = (totals["LoRA"] + totals["as configured"]) / 2
    with pytest.raises(UserError, match=r"it fits with ") as e:
        prepare(compose(prepare_overrides(tmp_path / "run2", f"memory.capacity_gb={cap / GB:.9f}")))
    named = str(e.value).split("it fits with ")[1].split(" (memory.plan")[0].split(", or ")
    fitting = [" ".join(o) for _, o, est in ladder[1:] if est.total <= cap]
    assert fitting and [n.split(" (~")[0] for n in named] == fitting[:3]  # the first three that fit, in order


def test_full_size_sdxl_plan_orders_the_switches_as_the_peers_report():
    """SDXL base at 1024², 1 + 1, bf16-mixed, from its full-size configs (bench/architectures): both text encoders
    counted, full fine-tuning between 48 and 80 GB, LoRA with gradient checkpointing within a 24 GB card and
    without checkpointing above it, each switch lowering the peak."""
    import json

    from dreambench.memory import GB, switch_ladder
    from dreambench.methods import DreamBooth
    arch = REPO / "bench" / "architectures"
    configs = {k: json.loads((arch / f"sdxl_{n}.json").read_text()) for k, n in
               (("unet", "unet"), ("vae", "vae"), ("text_encoder", "text1"), ("text_encoder_2", "text2"))}
    ladder = {label: e for label, _, e in switch_ladder(configs, DreamBooth(), resolution=1024, prior=True,
                                                         precision="bf16-mixed", frozen_dtype=torch.bfloat16,
                                                         device="cuda", capacity=int(80 * GB))}
    full, lora_ckpt = ladder["as configured"], ladder["LoRA + gradient checkpointing"]
    assert full.params["text_encoder_2"] == 694_659_840 and full.trainable == full.params["unet"]
    assert 48 * GB < full.total <= 80 * GB
    assert lora_ckpt.total <= 24 * GB < ladder["LoRA"].total
    assert ladder["gradient checkpointing + 8-bit AdamW"].total < ladder["gradient checkpointing"].total < full.total


def test_textual_inversion_is_planned_from_its_own_prepare(tmp_path):
    from dreambench.train import prepare
    plan = prepare(compose(prepare_overrides(tmp_path, "method=textual_inversion")))
    m = plan.memory
    assert m.exact
    # Only the (resized) token-embedding matrix is trained: vocabulary + 1 new token, x hidden size.
    from dreambench.memory import read_configs
    te = read_configs(plan.model_ref)["text_encoder"]
    assert m.trainable == (te["vocab_size"] + 1) * te["hidden_size"]
    assert m.parts["optimizer"] == 8 * m.trainable


def test_an_unplannable_method_reports_an_upper_bound_but_never_stops(tmp_path, monkeypatch):
    from dreambench.memory import plan_for
    from dreambench.methods import DreamBooth

    class Odd(DreamBooth):
        def prepare(self, module):
            raise RuntimeError("needs something the planner does not have")
    cfg = compose(prepare_overrides(tmp_path, "memory.capacity_gb=0.001"))
    from dreambench.models.loading import resolve_model_ref
    est = plan_for(cfg, resolve_model_ref(cfg.model), Odd())
    assert not est.exact and not est.fits  # over the 1 MB device, yet no UserError: an upper bound only
    assert any("could not be planned" in n for n in est.notes)


def test_ema_on_the_device_adds_one_copy_of_the_trained_weights(sd15, tmp_path):
    from dreambench.train import prepare
    off, on = est(sd15), est(sd15, ema=True)
    assert on.total - off.total == on.parts["ema"] == 4 * on.trainable  # fp32 master weights: 4 B per parameter
    s = prepare(compose(prepare_overrides(tmp_path, "train.ema.enabled=true"))).memory.summary()
    assert "ema" in s["parts_gb"]
    s = prepare(compose(prepare_overrides(tmp_path, "train.ema.enabled=true", "train.ema.device=cpu"))).memory.summary()
    assert "ema" not in s["parts_gb"]  # kept in host memory, moved for each update


def test_one_method_context_serves_every_rung_of_the_switch_ladder(tmp_path):
    """Textual inversion adds its token to the tokenizer it is given: each estimate works on a copy, so every rung
    of a ladder plans the method exactly (not the whole-UNet upper bound a second add_tokens would fall back to)."""
    from hydra.utils import instantiate

    from dreambench.memory import _method_context, read_configs, switch_ladder
    from dreambench.train import prepare
    cfg = compose(prepare_overrides(tmp_path, "method=textual_inversion"))
    plan = prepare(cfg)
    method = instantiate(cfg.method)
    ctx = _method_context(cfg, plan.model_ref, method)
    n_vocab = len(ctx["tokenizer"])
    ladder = switch_ladder(read_configs(plan.model_ref), method, resolution=int(cfg.data.resolution), prior=False,
                           context=ctx)
    ti = [e for label, _, e in ladder if not label.startswith("LoRA")]
    assert len(ti) == 4 and all(e.exact and e.trainable == ti[0].trainable for e in ti)
    assert len(ctx["tokenizer"]) == n_vocab  # the caller's tokenizer is left as it was


def test_fsdp_plans_one_ranks_share_of_the_trained_state(sd15, tmp_path):
    # trainer=fsdp splits the trained weights, their gradients and AdamW's moments over the ranks; the frozen VAE and
    # text encoder and the activations stay whole on each.
    from dreambench.train import prepare
    one, two = est(sd15), est(sd15, shards=2)
    assert two.parts["gradients"] == one.parts["gradients"] // 2
    assert two.parts["optimizer"] == one.parts["optimizer"] // 2
    assert one.parts["weights"] - two.parts["weights"] == one.parts["gradients"] // 2  # fp32 master weights
    assert two.parts["activations"] == one.parts["activations"]
    plain = prepare(compose(prepare_overrides(tmp_path, "trainer=ddp_cpu"))).memory
    sharded = prepare(compose(prepare_overrides(tmp_path, "trainer=fsdp", "trainer.accelerator=cpu",
                                                "train.samples=false"))).memory
    assert sharded.parts["optimizer"] == plain.parts["optimizer"] // 2
