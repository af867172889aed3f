"""Model families (dreambench.models.families, docs/FAMILIES.md): SD 1.x/2.x and SDXL through one seam.

The prior-preservation loss of every family is checked against a hand computation that uses diffusers' own
pipeline code for the conditioning (`encode_prompt`, SDXL's `_get_add_time_ids`) and runs the two halves of the
batch through the UNet separately; each known way of getting it wrong (the class half conditioned on the instance
prompt, on the instance's pooled embeddings or time ids, the loss split along the channel axis) is applied to the
module and must make the comparison fail."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, compose, torch_threads
from PIL import Image

MODELS = {"sd": "model=tiny", "sdxl": "model=tiny_sdxl", "sd3": "model=tiny_sd3", "flux": "model=tiny_flux"}


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def build(run_dir: Path, family: str, *extra: str):
    """A DreamBoothModule as train() builds it, attached to a CPU Trainer, setup() run (latents, embeddings)."""
    from hydra.utils import instantiate

    from dreambench.models.loading import load_components
    from dreambench.module import DreamBoothModule
    from dreambench.train import model_options, prepare
    cfg = compose(["+experiment=dog", *TINY, MODELS[family], "logger=none", f"paths.run_dir={run_dir}", *extra])
    plan = prepare(cfg)
    comps = load_components(plan.model_ref, prediction_type=cfg.model.prediction_type, family=cfg.model.family,
                            options=model_options(cfg))
    module = DreamBoothModule(comps, cfg, plan.instance_paths, plan.prior, "sks", instantiate(cfg.method))
    module.trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=int(cfg.trainer.max_steps), logger=False,
                               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module.setup("fit")
    module.log = lambda *a, **k: None
    return module, cfg


def evaluate_cfg(run: Path):
    """`dreambench.evaluate mode=run` on one run, at the smallest size (tiny encoders, 1 prompt x 1 image)."""
    from helpers import CONF
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("evaluate", overrides=[
            "metrics=tiny", "eval.progress=false", "mode=run", f"runs=[{run}]", "eval.prompts_limit=1",
            "eval.images_per_prompt=1", "eval.num_inference_steps=2", "eval.pres_images=1"])


def hand_geometry(path: Path, res: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(original size (h, w), crop top-left (y, x)) of a short-side resize to `res` and a centre crop."""
    w, h = Image.open(path).size
    s = res / min(w, h)
    rw, rh = max(res, round(w * s)), max(res, round(h * s))
    return (h, w), ((rh - res) // 2, (rw - res) // 2)


@torch.no_grad()
def module_and_hand_loss(module, cfg) -> tuple[float, float, dict, dict]:
    """The module's training loss at step 0 and the conditioning its UNet received, and the same computed by hand
    from the same draws: diffusers' pipeline encodes each half's prompt, each half goes through the UNet on its
    own, L = MSE_inst + λ MSE_class. (A random tiny UNet barely reacts to its prompt, so the conditioning is
    compared itself, not only through the loss.)"""
    import diffusers
    seen: dict[str, torch.Tensor] = {}

    def capture(_, args, kwargs):
        if len(args) > 2:  # UNet(x, t, hidden, added_cond_kwargs=...)
            seen["encoder_hidden_states"] = args[2]
            seen.update(kwargs.get("added_cond_kwargs") or {})
        else:  # SD3's transformer, all keywords
            seen.update({k: kwargs[k] for k in ("encoder_hidden_states", "pooled_projections")})
    g = module.noise_generator.manual_seed(1234)  # every call draws the same
    state = g.get_state()
    handle = module.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        loss = float(module.training_step(0, 0))
    finally:
        handle.remove()
    g.set_state(state)
    latents, _, b, _ = module._draw(0)  # the same latents (the generator is back where it was)
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype)
    fam = module.family
    if fam.name == "sd3":  # rectified flow, by diffusers' own functions and scheduler (train_dreambooth_sd3.py)
        from diffusers.training_utils import compute_density_for_timestep_sampling
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(module.components.scheduler_config)
        u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], logit_mean=0.0, logit_std=1.0,
                                                  generator=g)
        i = (u * sched.config.num_train_timesteps).long()
        t, sigma = sched.timesteps[i], sched.sigmas[i].view(-1, 1, 1, 1)
        noisy, target = (1 - sigma) * latents + sigma * noise, noise - latents
        parts = {k: v for k, v in module.parts().items() if k != "unet"}
        pipe = diffusers.StableDiffusion3Pipeline(transformer=module.unet, scheduler=sched, **parts)
    elif fam.name == "flux":  # rectified flow with Flux's resolution-dependent shift, as its pipeline samples
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        from diffusers.training_utils import compute_density_for_timestep_sampling
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(module.components.scheduler_config)
        u = compute_density_for_timestep_sampling("logit_normal", latents.shape[0], logit_mean=0.0, logit_std=1.0,
                                                  generator=g)
        h, w = latents.shape[-2:]
        mu = calculate_shift((h // 2) * (w // 2), 256, 4096, 0.5, 1.15)
        sigma = sched.time_shift(mu, 1.0, sched.sigmas[(u * 1000).long()]).view(-1, 1, 1, 1)
        t = sigma.flatten() * 1000
        noisy, target = (1 - sigma) * latents + sigma * noise, noise - latents
        parts = {k: v for k, v in module.parts().items() if k != "unet"}
        pipe = diffusers.FluxPipeline(transformer=module.unet, scheduler=sched, **parts)
    else:
        t = torch.randint(0, module.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
        noisy, target = module.noise_scheduler.add_noise(latents, noise, t), noise
        pipe_cls = getattr(diffusers, fam.pipeline_class)
        pipe = pipe_cls(**module.parts(), scheduler=diffusers.DDPMScheduler(), **fam.pipeline_init_kwargs)
    res = int(cfg.data.resolution)
    idx = module._indices(len(module.instance_bank), int(cfg.seed), 0, b).tolist()
    halves = [(module.instance_prompt, [module.instance_paths[i] for i in idx]),
              (module.class_prompt, [None] * b)]  # class images: rendered at res x res, no crop
    preds, conds = [], []
    for k, (prompt, paths) in enumerate(halves):
        sl = slice(k * b, (k + 1) * b)
        if fam.name == "sd":
            emb, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
            pred = module.unet(noisy[sl], t[sl], emb.repeat(b, 1, 1)).sample
            conds.append({"encoder_hidden_states": emb.repeat(b, 1, 1)})
        elif fam.name == "sd3":
            emb, _, pooled, _ = pipe.encode_prompt(prompt, None, None, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False,
                                                   max_sequence_length=int(cfg.model.max_sequence_length))
            cond = {"encoder_hidden_states": emb.repeat(b, 1, 1), "pooled_projections": pooled.repeat(b, 1)}
            pred = module.unet(hidden_states=noisy[sl], timestep=t[sl], return_dict=False, **cond)[0]
            conds.append(cond)
        elif fam.name == "flux":
            emb, pooled, text_ids = pipe.encode_prompt(prompt, None, device="cpu", num_images_per_prompt=1,
                                                       max_sequence_length=int(cfg.model.max_sequence_length))
            cond = {"encoder_hidden_states": emb.repeat(b, 1, 1), "pooled_projections": pooled.repeat(b, 1)}
            c, h, w = noisy.shape[1:]
            f = pipe.vae_scale_factor
            out = module.unet(hidden_states=diffusers.FluxPipeline._pack_latents(noisy[sl], b, c, h, w),
                              timestep=t[sl] / 1000, guidance=torch.full((b,), 3.5), txt_ids=text_ids,
                              img_ids=diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu",
                                                                                      noisy.dtype),
                              return_dict=False, **cond)[0]
            pred = diffusers.FluxPipeline._unpack_latents(out, h * f, w * f, f)
            conds.append(cond)
        else:
            emb, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
            ids = []
            for p in paths:
                orig, crop = hand_geometry(p, res) if p is not None else ((res, res), (0, 0))
                ids.append(pipe._get_add_time_ids(orig, crop, (res, res), dtype=torch.float32,
                                                  text_encoder_projection_dim=module.text_encoder_2.config.projection_dim))
            cond = {"encoder_hidden_states": emb.repeat(b, 1, 1), "text_embeds": pooled.repeat(b, 1),
                    "time_ids": torch.cat(ids)}
            pred = module.unet(noisy[sl], t[sl], cond["encoder_hidden_states"],
                               added_cond_kwargs={k: cond[k] for k in ("text_embeds", "time_ids")}).sample
            conds.append(cond)
        preds.append(pred)
    hand = F.mse_loss(preds[0], target[:b]) + float(cfg.prior.weight) * F.mse_loss(preds[1], target[b:])
    return loss, float(hand), seen, {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _split_on_channels(pred, target, num_instance, prior_weight, *rest):
    """The bug: the batch [instance; class] split along the channel axis instead of the batch axis."""
    (pi, pc), (ti, tc) = pred.float().chunk(2, dim=1), target.float().chunk(2, dim=1)
    li, lc = F.mse_loss(pi, ti), F.mse_loss(pc, tc)
    return li + prior_weight * lc, li, lc


BROKEN = {
    "class half gets the instance prompt": lambda m, mp: setattr(m, "class_emb", m.instance_emb),
    "loss split along the channel axis": lambda m, mp: mp.setattr("dreambench.module.losses.weighted_loss",
                                                                  _split_on_channels),
    "class half gets the instance's pooled embedding": lambda m, mp: setattr(
        m, "class_emb", {**m.class_emb, **{k: m.instance_emb[k] for k in ("text_embeds", "pooled_projections")
                                            if k in m.class_emb}}),
    "class half gets the instance's time ids": lambda m, mp: setattr(
        m.class_bank, "geometry", m.instance_bank.geometry[:len(m.class_bank)]),
}
APPLIES = {"sd": list(BROKEN)[:2], "sdxl": list(BROKEN), "sd3": list(BROKEN)[:3], "flux": list(BROKEN)[:3]}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_prior_preservation_loss_is_the_hand_computation_and_each_known_bug_breaks_it(family, tmp_path, monkeypatch):
    module, cfg = build(tmp_path / "run", family, "data.batch_size=2", "data.hflip=false", "prior.weight=0.7")
    loss, hand, cond, hand_cond = module_and_hand_loss(module, cfg)
    assert loss == pytest.approx(hand, rel=1e-5), (loss, hand)
    assert max_difference(cond, hand_cond) < 1e-5
    for name in APPLIES[family]:
        with monkeypatch.context() as mp:
            saved = (module.class_emb, module.class_bank.geometry)
            BROKEN[name](module, mp)
            broken, hand_again, broken_cond, _ = module_and_hand_loss(module, cfg)
            module.class_emb, module.class_bank.geometry = saved
        assert hand_again == pytest.approx(hand, rel=1e-6)  # the hand side does not read what was broken
        noticed = abs(broken - hand) > 1e-3 * hand or max_difference(broken_cond, hand_cond) > 1e-3
        assert noticed, f"{family}: {name!r} went unnoticed ({broken} vs {hand})"


# The losses of SD's code before the family seam (commit 94252c6), 4 steps of a tiny dog run on one thread,
# (train/loss, loss_instance, loss_prior) per step: the seam must not change a draw or an operation for SD 1.x/2.x.
# Exact on the machine they were measured on; 1e-6 allows another CPU's kernels, a changed draw or formula moves
# them by 1e-2 or more.
PINNED_RUNS = {
    "sd_prior": [],
    "sd_te": ["model.train_text_encoder=true"],
    "sd_v": ["model.prediction_type=v_prediction", "data.caption_dropout=0.5"],
}
PINNED = {
    "sd_prior": [
        (2.143712043762207, 1.0931304693222046, 1.0505815744400024),
        (1.962397813796997, 0.9817335605621338, 0.9806642532348633),
        (1.923072099685669, 0.9835160970687866, 0.9395560026168823),
        (1.6761690378189087, 0.8862407803535461, 0.7899282574653625),
    ],
    "sd_te": [
        (2.143712043762207, 1.0931304693222046, 1.0505815744400024),
        (1.963129997253418, 0.9816921353340149, 0.9814378023147583),
        (1.9186286926269531, 0.9777846336364746, 0.9408440589904785),
        (1.6781972646713257, 0.8836268186569214, 0.7945704460144043),
    ],
    "sd_v": [
        (1.7316573858261108, 1.2611135244369507, 0.47054383158683777),
        (1.686266303062439, 1.1714470386505127, 0.5148192644119263),
        (1.6294276714324951, 0.9300913214683533, 0.6993363499641418),
        (1.3227019309997559, 0.8435698747634888, 0.4791320562362671),
    ],
}


@pytest.mark.parametrize("name", list(PINNED_RUNS))
def test_sd_losses_are_those_of_the_code_before_families(name, tmp_path):
    import csv

    from dreambench.train import train
    run = tmp_path / name
    train(compose(["+experiment=dog", *TINY, f"paths.run_dir={run}", "trainer.max_steps=4", "threads=1",
                   *PINNED_RUNS[name]]))
    with open(run / "logs" / "metrics.csv") as f:
        got = [tuple(float(r[k]) for k in ("train/loss", "train/loss_instance", "train/loss_prior"))
               for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(got) == len(PINNED[name])
    for step, (a, b) in enumerate(zip(got, PINNED[name])):
        assert a == pytest.approx(b, rel=1e-6, abs=0), f"{name} step {step}: {a} != {b}"


def test_family_of_a_folder_must_match_the_config(tmp_path):
    """A local diffusers folder says what it is: model.family=sd on an SDXL folder is one clear error."""
    from dreambench.models.loading import ModelNotFoundError, check_family
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelNotFoundError, match="model.family=sdxl"):
        check_family(str(folder), "sd")
    check_family(str(folder), "sdxl")


def _render(pipe, prompt: str = "a sks dog", seed: int = 0):
    import numpy as np
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(out, dtype=np.float64)


def test_sdxl_dreambooth_trains_both_text_encoders_and_reloads_with_diffusers_own_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from dreambench.train import train
    run = tmp_path / "run"
    cfg = compose(["+experiment=dog", *TINY, "model=tiny_sdxl", f"paths.run_dir={run}", "trainer.max_steps=4",
                   "model.train_text_encoder=true", "train.checkpoint_every_n_steps=2"])
    metrics = train(cfg)
    assert metrics["steps"] == 4 and metrics["train/loss_prior"] > 0
    state = torch.load(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}  # no VAE

    tuned = StableDiffusionXLPipeline.from_pretrained(run / "model", use_safetensors=True)
    base = StableDiffusionXLPipeline.from_pretrained(cfg.model.pretrained, use_safetensors=True)
    for part in ("unet", "text_encoder", "text_encoder_2"):
        a = load_file(str(next((run / "model" / part).glob("*.safetensors"))))
        b = load_file(str(next((Path(cfg.model.pretrained) / part).glob("*.safetensors"))))
        assert any(not torch.equal(a[k], b[k]) for k in a), f"{part} did not train"
    a = load_file(str(next((run / "model" / "vae").glob("*.safetensors"))))
    b = load_file(str(next((Path(cfg.model.pretrained) / "vae").glob("*.safetensors"))))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the frozen VAE is the base model's, bit for bit
    assert abs(_render(tuned) - _render(base)).max() > 1e-3
    assert (run / "samples" / "before_after.png").is_file()


def test_sdxl_lora_exports_what_diffusers_loads_and_generate_and_evaluate_use_it(tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from dreambench.evaluate import evaluate
    from dreambench.methods import load_run_pipeline
    from dreambench.train import train
    run = tmp_path / "runs" / "dog-xl"
    cfg = compose(["+experiment=dog", *TINY, "model=tiny_sdxl", f"paths.run_dir={run}", "trainer.max_steps=4",
                   "method=lora", "method.lr=1e-2", "model.train_text_encoder=true"])
    train(cfg)
    saved = load_file(str(run / "model" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder", "text_encoder_2"}

    base = StableDiffusionXLPipeline.from_pretrained(cfg.model.pretrained, use_safetensors=True)
    before = _render(base)
    base.load_lora_weights(str(run / "model"), weight_name="pytorch_lora_weights.safetensors")  # diffusers' own
    after = _render(base)
    assert abs(after - before).max() > 1e-3
    ours = load_run_pipeline(run)
    assert type(ours).__name__ == "StableDiffusionXLPipeline"
    assert abs(_render(ours) - after).max() < 1e-5

    from helpers import run_cli
    out = tmp_path / "gen"
    r = run_cli("dreambench.generate", [f"run={run}", "num_images=1", "guidance.num_inference_steps=2",
                                        "progress=false", f"out={out}", "prompts=['a {identifier} {class_noun}']"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(out.glob("0*.png"))) == 1

    res = evaluate(evaluate_cfg(run))
    for k in ("dino", "clip_i", "clip_t", "pres"):
        assert -1.0 <= res["summary"][f"eval/{k}"] <= 1.0


def test_sdxl_textual_inversion_learns_a_row_in_both_encoders_that_diffusers_loads(tmp_path):
    """One token in both tokenizers, a row learned in both encoders, every other row bit-identical; the file is
    {"clip_l", "clip_g"}, loaded the way diffusers documents SDXL embeddings (one load_textual_inversion per
    encoder), and dreambench's loader does the same."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from dreambench.methods import load_run_pipeline
    from dreambench.train import train
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("prior.")]  # prior=none: the paper's Textual Inversion has none
    cfg = compose(["+experiment=dog", *tiny, "model=tiny_sdxl", "method=textual_inversion", "method.lr=5e-1",
                   "prior=none", f"paths.run_dir={run}", "trainer.max_steps=4", "train.checkpoint_every_n_steps=4"])
    m = train(cfg)
    assert m["identifier"] == "<sks>" and m["instance_prompt"] == "a <sks> dog"
    rows = load_file(str(run / "model" / "learned_embeds.safetensors"))
    assert sorted(rows) == ["clip_g", "clip_l"] and rows["clip_l"].shape == rows["clip_g"].shape == (1, 32)
    ckpt = torch.load(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    base = StableDiffusionXLPipeline.from_pretrained(cfg.model.pretrained, use_safetensors=True)
    for name, te in (("text_encoder", base.text_encoder), ("text_encoder_2", base.text_encoder_2)):
        (trained,) = [v for k, v in ckpt["state_dict"].items()
                      if k.startswith(f"{name}.") and k.endswith("embeddings.token_embedding.weight")]
        old = te.get_input_embeddings().weight
        assert trained.shape[0] == old.shape[0] + 1 and torch.equal(trained[:-1], old)  # only the new row moved
    # Initialised from "dog" and trained away from it, in both encoders.
    for key, te, tok in (("clip_l", base.text_encoder, base.tokenizer), ("clip_g", base.text_encoder_2,
                                                                          base.tokenizer_2)):
        dog = te.get_input_embeddings().weight[tok("dog", add_special_tokens=False).input_ids].mean(0)
        assert not torch.allclose(rows[key][0], dog)
    for key, tok, te in (("clip_l", base.tokenizer, base.text_encoder), ("clip_g", base.tokenizer_2,
                                                                         base.text_encoder_2)):
        base.load_textual_inversion(rows[key], token="<sks>", text_encoder=te, tokenizer=tok)
    assert abs(_render(base, "a <sks> dog") - _render(base, "a dog")).max() > 1e-4
    ours = load_run_pipeline(run)
    assert abs(_render(ours, "a <sks> dog") - _render(base, "a <sks> dog")).max() < 1e-5


@pytest.mark.parametrize("override,message", [
    ("train.export=[single_file]", "format=single_file: no sdxl layout yet"),
    ("train.export=[kohya]", "format=kohya: no sdxl layout yet"),
])
def test_what_sdxl_does_not_have_yet_is_one_line_before_any_model_loads(override, message, tmp_path):
    from dreambench.errors import UserError
    from dreambench.train import prepare
    cfg = compose(["+experiment=dog", *TINY, "model=tiny_sdxl", override, f"paths.run_dir={tmp_path / 'r'}",
                   "model.pretrained=/nonexistent/never-loaded", *(["method=lora"] if "kohya" in override else [])])
    with pytest.raises(UserError, match=message):
        prepare(cfg)


def test_sdxl_lora_recipe_is_diffusers_published_settings_and_runs_on_the_tiny_sdxl(tmp_path):
    """conf/recipe/lora_sdxl.yaml = examples/dreambooth/README_sdxl.md's dog example (lr 1e-4 constant, batch 1 x
    accumulation 4, 500 steps, 1024 px, rank 4 on the attention projections), prior preservation kept."""
    from dreambench.train import train
    cfg = compose(["+experiment=dog", "+recipe=lora_sdxl"])
    assert (cfg.model.name, cfg.model.family, cfg.data.resolution) == ("sdxl", "sdxl", 1024)
    assert cfg.method._target_ == "dreambench.methods.LoRA" and cfg.method.rank == 4 and cfg.method.lr == 1e-4
    assert list(cfg.method.target_modules) == ["to_k", "to_q", "to_v", "to_out.0"]
    assert (cfg.trainer.max_steps, cfg.trainer.accumulate_grad_batches, cfg.data.batch_size) == (500, 4, 1)
    assert cfg.train.lr_scheduler == "constant" and cfg.prior.weight == 1.0
    m = train(compose(["+experiment=dog", "+recipe=lora_sdxl", *TINY, "model=tiny_sdxl", "trainer.max_steps=2",
                       f"paths.run_dir={tmp_path / 'run'}"]))
    assert m["steps"] == 2 and m["method"]["name"] == "lora" and m["train/loss_prior"] > 0


# ---- SD 3.5 (rectified flow) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_flow_timestep_sampling_and_weights_by_hand(scheme):
    """Indices from the scheme's density (Esser et al. 2024 §3.1, as diffusers' training_utils), the pair
    x_t = (1 - σ) x0 + σ ε with target ε - x0, and the loss weights, each against the formula written out."""
    import math

    from dreambench.losses import flow_loss_weights, flow_matching_pair, flow_timestep_indices
    g = torch.Generator().manual_seed(3)
    idx = flow_timestep_indices(4096, 1000, scheme, 0.0, 1.0, 1.29, g, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(0.0, 1.0, (4096,), generator=g))
    else:
        v = torch.rand(4096, generator=g)
        u = 1 - v - 1.29 * (torch.cos(math.pi * v / 2) ** 2 - 1 + v) if scheme == "mode" else v
    assert torch.equal(idx, (u * 1000).long())
    frac_middle = ((idx > 250) & (idx < 750)).float().mean()
    assert (frac_middle > 0.6) if scheme == "logit_normal" else True  # logit-normal favours the middle
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    xt, target = flow_matching_pair(x0, eps, sigmas)
    torch.testing.assert_close(xt[1], 0.5 * x0[1] + 0.5 * eps[1])
    torch.testing.assert_close(target, eps - x0)
    assert flow_loss_weights("none", sigmas) is None
    torch.testing.assert_close(flow_loss_weights("sigma_sqrt", sigmas), sigmas ** -2)
    torch.testing.assert_close(flow_loss_weights("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2)))


# (pipeline class, what from_pretrained must be told, checkpoint prefixes with text encoders trained, LoRA prefixes)
FLOW_E2E = {
    "sd3": ("StableDiffusion3Pipeline", {"text_encoder_3": None, "tokenizer_3": None},  # the tiny SD 3.5: no T5
            {"unet", "text_encoder", "text_encoder_2"}, {"transformer", "text_encoder", "text_encoder_2"}),
    "flux": ("FluxPipeline", {}, {"unet", "text_encoder"}, {"transformer", "text_encoder"}),  # CLIP trained, T5 never
}


@pytest.mark.parametrize("family", list(FLOW_E2E))
def test_flow_family_dreambooth_and_lora_export_what_diffusers_loads_and_generate_and_evaluate_use_it(family,
                                                                                                     tmp_path):
    """DreamBooth with the CLIP encoders trained exports a folder diffusers' own pipeline class loads; LoRA on the
    transformer (+ CLIP) exports one file its load_lora_weights applies; dreambench's loader samples with the
    run's T5 length, and evaluate scores the run."""
    import diffusers
    from safetensors.torch import load_file

    from dreambench.evaluate import evaluate
    from dreambench.methods import load_run_pipeline
    from dreambench.train import train
    pipe_name, load_kw, ckpt_prefixes, lora_prefixes = FLOW_E2E[family]
    pipe_cls = getattr(diffusers, pipe_name)
    run = tmp_path / "db"
    cfg = compose(["+experiment=dog", *TINY, MODELS[family], f"paths.run_dir={run}", "trainer.max_steps=3",
                   "model.train_text_encoder=true", "train.checkpoint_every_n_steps=3", "optimizer.lr=1e-2"])
    assert train(cfg)["train/loss_prior"] > 0
    state = torch.load(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)["state_dict"]
    assert {k.split(".")[0] for k in state} == ckpt_prefixes
    tuned = pipe_cls.from_pretrained(run / "model", use_safetensors=True, **load_kw)
    from dreambench.methods.runs import load_pipeline_folder, with_run_call_kwargs
    bare = with_run_call_kwargs(load_pipeline_folder(run / "model"), run)  # generate run=<run>/model
    assert type(bare).__name__ == pipe_name and bare._dreambench_call_kwargs == {"max_sequence_length": 8}
    base = pipe_cls.from_pretrained(cfg.model.pretrained, use_safetensors=True, **load_kw)
    kw = {"max_sequence_length": 8}
    assert abs(_render_kw(tuned, **kw) - _render_kw(base, **kw)).max() > 1e-3

    run = tmp_path / "runs" / f"dog-{family}"
    train(compose(["+experiment=dog", *TINY, MODELS[family], f"paths.run_dir={run}", "trainer.max_steps=3",
                   "method=lora", "method.lr=5e-2", "model.train_text_encoder=true"]))
    saved = load_file(str(run / "model" / "pytorch_lora_weights.safetensors"))
    assert {k.split(".")[0] for k in saved} == lora_prefixes
    before = _render_kw(base, **kw)
    base.load_lora_weights(str(run / "model"), weight_name="pytorch_lora_weights.safetensors")  # diffusers' own
    after = _render_kw(base, **kw)
    assert abs(after - before).max() > 1e-4
    ours = load_run_pipeline(run)
    assert type(ours).__name__ == pipe_name and ours._dreambench_call_kwargs == kw
    assert abs(_render_kw(ours, **kw) - after).max() < 1e-5
    res = evaluate(evaluate_cfg(run))
    for k in ("dino", "clip_i", "clip_t"):
        assert -1.0 <= res["summary"][f"eval/{k}"] <= 1.0


def _render_kw(pipe, prompt: str = "a sks dog", seed: int = 0, **kw):
    import numpy as np
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=32, width=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed), **kw).images[0]
    return np.asarray(out, dtype=np.float64)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("override", ["loss.min_snr_gamma=5", "loss.noise_offset=0.05", "train.val_loss.every_n_steps=5",
                                      "method=textual_inversion", "guidance.guidance_rescale=0.7"])
def test_what_flow_families_do_not_have_yet_is_one_line_before_any_model_loads(family, override, tmp_path):
    from dreambench.errors import UserError
    from dreambench.train import prepare
    cfg = compose(["+experiment=dog", *TINY, MODELS[family], override, f"paths.run_dir={tmp_path / 'r'}",
                   "model.pretrained=/nonexistent/never-loaded"])
    with pytest.raises(UserError, match=f"does not apply to model.family={family}"):
        prepare(cfg)


@pytest.fixture(scope="module")
def tiny_sd3_with_t5(tmp_path_factory) -> Path:
    """The tiny SD 3.5 with a T5 encoder and the project's own T5 tokenizer, saved as a diffusers folder."""
    from dreambench.models.tiny import build_tiny_sd3_pipeline, ensure_tiny_model, tiny_sd_folder_beside
    folder = tmp_path_factory.mktemp("sd3t5") / "tiny-sd3-t5"
    tiny_sd = ensure_tiny_model(tiny_sd_folder_beside(Path(compose(["+experiment=dog", "model=tiny_sd3"])
                                                           .model.pretrained)))
    with torch_threads(1):
        build_tiny_sd3_pipeline(0, tiny_sd, t5=True).save_pretrained(folder, safe_serialization=True)
    return folder


def test_sd3_with_t5_conditions_on_it_as_diffusers_does_and_reloads(tiny_sd3_with_t5, tmp_path, monkeypatch):
    """model.t5=true: T5's states appended to the CLIP ones (module = StableDiffusion3Pipeline.encode_prompt with
    its T5, to 1e-5), the prior-preservation loss by hand, and a run that reloads with its T5."""
    import diffusers
    t5 = [f"model.pretrained={tiny_sd3_with_t5}", "model.build_tiny=false", "model.t5=true",
          "model.max_sequence_length=12"]
    module, cfg = build(tmp_path / "run", "sd3", "data.batch_size=2", "data.hflip=false", *t5)
    assert module.text_encoder_3 is not None and module.instance_ids.shape[1] == 3  # CLIP-L, CLIP-G and T5 rows
    assert module.instance_emb["encoder_hidden_states"].shape[1] == 77 + 12
    loss, hand, cond, hand_cond = module_and_hand_loss(module, cfg)
    assert loss == pytest.approx(hand, rel=1e-5) and max_difference(cond, hand_cond) < 1e-5
    # T5 matters: without it (zeros in its place) the conditioning differs.
    module_off, _ = build(tmp_path / "off", "sd3", "data.hflip=false", *t5[:2], "model.t5=false",
                          "model.max_sequence_length=12")
    assert module_off.text_encoder_3 is None
    assert not torch.allclose(module_off.instance_emb["encoder_hidden_states"],
                              module.instance_emb["encoder_hidden_states"], atol=1e-3)

    from dreambench.train import train
    run = tmp_path / "trained"
    train(compose(["+experiment=dog", *TINY, "model=tiny_sd3", *t5, f"paths.run_dir={run}", "trainer.max_steps=2"]))
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(run / "model", use_safetensors=True)
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel" and pipe.tokenizer_3 is not None


def test_flux_training_sigmas_get_the_resolution_dependent_shift():
    """Flux's scheduler keeps σ unshifted (use_dynamic_shifting); training shifts them by μ of the packed sequence
    length, as FluxPipeline does when sampling at that size: more noise at larger sizes, none of it at σ = 0, 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dreambench.models.families import get_family
    fam = get_family("flux")
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    cfg = dict(sched.config)
    s = torch.tensor([0.25, 0.5, 0.75])
    small, large = fam.shift_sigmas(s, (1, 16, 64, 64), cfg), fam.shift_sigmas(s, (1, 16, 128, 128), cfg)
    assert (small > s).all() and (large > small).all()
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (32 * 32 - 256)  # 64² latents -> 32² packed tokens
    torch.testing.assert_close(small, torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + 1 / s - 1))
    assert torch.equal(get_family("sd3").shift_sigmas(s, (1, 16, 64, 64), cfg), s)  # SD 3.5: shift in its schedule


def test_class_image_key_holds_the_familys_sampling_keywords(tmp_path):
    """SD 3.5 / Flux class images depend on model.max_sequence_length (T5's slot): it is in their cache key; SD's
    and SDXL's keys, which have no such keyword, are what they were before."""
    from dreambench.prior.cache import ClassImageSpec, cache_key
    base = dict(model={"m": 1}, prompt="a dog", negative_prompt="", scheduler="DDIMScheduler")
    assert "pipeline_kwargs" not in ClassImageSpec(**base).as_dict()
    k8 = cache_key(ClassImageSpec(**base, pipeline_kwargs={"max_sequence_length": 8}))
    assert k8 != cache_key(ClassImageSpec(**base, pipeline_kwargs={"max_sequence_length": 16}))
    assert k8 != cache_key(ClassImageSpec(**base))
    module, _ = build(tmp_path / "run", "sd3")
    spec = module.prior.spec(type("Ctx", (), {"guidance": dict(module.run_cfg.guidance), "model_identity": {},
                                              "class_prompt": "a dog", "scheduler_config": {}, "resolution": 32,
                                              "pipeline_kwargs": module.family.call_kwargs()})())
    assert spec.pipeline_kwargs == {"max_sequence_length": 8}


@pytest.mark.parametrize("recipe,family,expect", [
    ("lora_sd35", "sd3", {"method.lr": 4e-4, "method.rank": 4, "trainer.accumulate_grad_batches": 4,
                          "trainer.max_steps": 500, "data.resolution": 512, "model.max_sequence_length": 77}),
    ("lora_flux", "flux", {"method.lr": 1e-4, "method.rank": 16, "method.alpha": 16, "trainer.max_steps": 2000,
                           "model.flow.guidance": 1.0, "train.ema.decay": 0.99, "data.caption_dropout": 0.05,
                           "model.gradient_checkpointing": True}),
])
def test_flow_family_lora_recipes_are_their_peers_settings_and_run_on_the_tiny_models(recipe, family, expect,
                                                                                      tmp_path):
    """conf/recipe/lora_sd35.yaml (diffusers' README_sd3.md) and lora_flux.yaml (ai-toolkit's Flux LoRA example,
    diffusers' README_flux.md): the values their comments cite, prior preservation kept, and one short run each on
    the tiny model of the family."""
    from omegaconf import OmegaConf

    from dreambench.train import train
    cfg = compose(["+experiment=dog", f"+recipe={recipe}"])
    assert cfg.model.family == family and cfg.method._target_ == "dreambench.methods.LoRA" and cfg.prior.weight == 1
    for key, value in expect.items():
        assert OmegaConf.select(cfg, key) == value, key
    tiny = MODELS[family].split("=")[1]
    m = train(compose(["+experiment=dog", f"+recipe={recipe}", *TINY, f"model={tiny}", "trainer.max_steps=2",
                       "trainer.accumulate_grad_batches=1", "data.resolution=32", "model.max_sequence_length=8",
                       f"paths.run_dir={tmp_path / 'run'}"]))
    assert m["steps"] == 2 and m["train/loss_prior"] > 0


def test_lora_base_is_cast_to_the_frozen_dtype_under_mixed_precision_and_adapters_stay_fp32(tmp_path):
    """model.frozen_dtype applies to a LoRA run's frozen denoiser base under mixed precision (as diffusers' LoRA
    scripts cast the base to the weight dtype): base bf16, adapters fp32, the step finite, the exported adapters
    fp32; the planner counts the base at 2 bytes a parameter."""
    from safetensors.torch import load_file

    from dreambench.train import train
    seen = {}
    from dreambench.module import DreamBoothModule
    original = DreamBoothModule.on_train_start

    def spy(self):
        seen["base"] = {p.dtype for p in self.unet.parameters() if not p.requires_grad}
        seen["adapters"] = {p.dtype for p in self.unet.parameters() if p.requires_grad}
        return original(self)
    DreamBoothModule.on_train_start = spy
    # The cast happens on the host, before the move: moved first, the fp32 base would sit on the device whole
    # (Flux: 67 GB against a 40 GB plan). What the LoRA denoiser's frozen base is when it is moved to the device:
    moved: set = set()
    module_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        params = list(self.parameters())
        if args and isinstance(args[0], torch.device) and any(p.requires_grad for p in params) and not all(
                p.requires_grad for p in params):
            moved.update(p.dtype for p in params if not p.requires_grad)
        return module_to(self, *args, **kwargs)
    torch.nn.Module.to = to
    try:
        run = tmp_path / "run"
        m = train(compose(["+experiment=dog", *TINY, "model=tiny_sdxl", "method=lora", "trainer.precision=bf16-mixed",
                           "model.frozen_dtype=bf16", "trainer.max_steps=2", f"paths.run_dir={run}"]))
    finally:
        DreamBoothModule.on_train_start = original
        torch.nn.Module.to = module_to
    assert seen == {"base": {torch.bfloat16}, "adapters": {torch.float32}}
    assert moved == {torch.bfloat16}
    assert m["train/loss"] == m["train/loss"]  # finite
    assert {v.dtype for v in load_file(str(run / "model" / "pytorch_lora_weights.safetensors")).values()} == {
        torch.float32}
    plan = m["memory_plan"]["parts_gb"]
    full = train(compose(["+experiment=dog", *TINY, "model=tiny_sdxl", "method=lora", "trainer.max_steps=0",
                          f"paths.run_dir={tmp_path / 'fp32'}"]))["memory_plan"]["parts_gb"]
    assert plan["weights"] < full["weights"]  # bf16 base and frozen parts vs fp32 everywhere


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_an_optuna_sweep_runs_on_the_family_unchanged(family, tmp_path):
    """`python -m dreambench.train -m +hparams_search=lr_prior model=tiny_<family>`: two trials, each a run folder
    whose objective is in the study (the sweep code knows nothing of families)."""
    from optuna.trial import TrialState
    from sweep_helpers import TINY_TRIAL, journal_study, run
    args = [a for a in TINY_TRIAL if a != "model=tiny"] + [MODELS[family], f"paths.output_dir={tmp_path}",
                                                           "hydra.sweeper.n_trials=2", "trainer.max_steps=2"]
    r = run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "sweeps" / "dog_lr_prior"
    trials = journal_study(folder / "study.journal", "dog_lr_prior").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        metrics = json.loads((folder / f"trial_{t.number}" / "metrics.json").read_text())
        assert t.value == metrics["train/loss_instance"]
        assert f"family: {family}" in (folder / f"trial_{t.number}" / "config.yaml").read_text()


@pytest.mark.parametrize("size,center", [((300, 200), True), ((306, 200), True), ((200, 333), True),
                                         ((300, 200), False)])
def test_crop_geometry_names_the_crop_the_pixels_are_and_its_mirror(size, center):
    """The time_ids' crop corner is where resize_crop really cut, and the mirrored latent (data.hflip flips the
    crop) is the crop at the mirrored corner of the flipped resized image, odd margins (306 x 200: 17 px, split 8 + 9) included."""
    import numpy as np

    from dreambench.data.latents import crop_geometry, resize_crop
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    oh, ow, top, left, th, tw = crop_geometry(im.size, (32, 32), center)
    assert (oh, ow, th, tw) == (size[1], size[0], 32, 32)
    s = 32 / min(size)
    resized = im.resize((max(32, round(size[0] * s)), max(32, round(size[1] * s))), Image.BICUBIC)
    crop = np.asarray(resize_crop(im, 32, center))
    assert np.array_equal(crop, np.asarray(resized)[top:top + 32, left:left + 32])
    _, _, mtop, mleft, _, _ = crop_geometry(im.size, (32, 32), center, mirrored=True)
    flipped = np.asarray(resized)[:, ::-1]
    assert np.array_equal(crop[:, ::-1], flipped[mtop:mtop + 32, mleft:mleft + 32])
