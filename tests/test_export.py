"""Exports round-trip: each format of each method, written from a tiny run, loads back through the public loader
(`from_single_file`, `load_lora_weights`, `load_textual_inversion`) and generates the image the run's own `model/`
generates. Plus the model card (parsed by huggingface_hub) and `dreambench.push` (dry run; the upload call with
huggingface_hub's HfApi intercepted at its two methods, since no Hub server can be reached or installed here)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.methods_helpers import env_defaults, render, tiny_cfg

# Fusing LoRA into the base weights (W + s B A once, instead of W x + s B (A x) every call) changes float
# rounding only: measured 1.2e-6 on [0, 1] pixels. Every other format must match bit for bit.
FUSED_ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dreambench.train import train

    root = tmp_path_factory.mktemp("export")
    env_defaults(root)
    out = {}
    for method, extra in [
        # alpha != rank: an export that loses alpha loads at the wrong strength and the image differs.
        ("lora", ["method.rank=4", "method.alpha=8", "method.lr=1e-2", "model.train_text_encoder=true",
                  "train.export=[diffusers,single_file,kohya]"]),
        ("textual_inversion", ["train.export=[all]"]),
        # The text encoder trained too: the single file must carry it (the base folder's would not do).
        ("dreambooth", ["trainer.max_steps=3", "model.train_text_encoder=true", "optimizer.lr=1e-3"]),
    ]:
        cfg = tiny_cfg(root / method, f"method={method}", *extra)
        out[method] = (root / method, cfg, train(cfg))
    return out


def _base(cfg):
    from dreambench.methods.runs import load_base_pipeline

    pipe = load_base_pipeline(dict(cfg.model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _maxdiff(a, b) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _from_single_file(path, config):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), safety_checker=None,
                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k} differs"


def test_single_file_of_a_dreambooth_run_is_the_run_bit_for_bit(runs):
    from dreambench.exporters import export_run
    from dreambench.methods import load_run_pipeline

    run, cfg, metrics = runs["dreambooth"]
    (path,) = export_run(run, ["single_file"])["single_file"]
    keys = load_file(str(path)).keys()
    # The original layout, by the keys other tools look for: LDM UNet, VAE, CLIP.
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in keys)
    for k in ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "model.diffusion_model.out.2.weight",
              "model.diffusion_model.output_blocks.1.2.conv.weight",  # upsampler after res + attention
              "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
              "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert k in keys, k
    # Loaded offline with the BASE model's folder as config (what a user has), not the run's model/.
    tuned, loaded = load_run_pipeline(run), _from_single_file(path, cfg.model.pretrained)
    _same_weights(loaded, tuned)
    prompt = metrics["instance_prompt"]
    image = render(loaded, prompt)
    np.testing.assert_array_equal(image, render(tuned, prompt))
    assert _maxdiff(image, render(_base(cfg), prompt)) > 1e-3  # the trained weights came from the file


def test_single_file_of_a_lora_run_is_the_merged_model(runs):
    from dreambench.methods import load_run_pipeline

    run, cfg, metrics = runs["lora"]
    (path,) = list((run / "export" / "single_file").glob("*.safetensors"))  # written by train.export
    loaded, prompt = _from_single_file(path, cfg.model.pretrained), metrics["instance_prompt"]
    image = render(loaded, prompt)
    assert _maxdiff(image, render(load_run_pipeline(run), prompt)) <= FUSED_ATOL
    assert _maxdiff(image, render(_base(cfg), prompt)) > 1e-3


def test_kohya_lora_keys_alpha_and_round_trip(runs):
    from safetensors.torch import save_file

    from dreambench.methods import load_run_pipeline

    run, cfg, metrics = runs["lora"]
    (path,) = list((run / "export" / "kohya").glob("*.safetensors"))
    sd = load_file(str(path))
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight",
                                                                          ".alpha")) for k in sd)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in sd  # SD 1.x: lora_te_, not te1
    alphas = {k: float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {8.0}  # the trained alpha, not the rank (4)
    assert len(alphas) * 3 == len(sd)

    prompt = metrics["instance_prompt"]
    want = render(load_run_pipeline(run), prompt)
    pipe = _base(cfg)
    pipe.load_lora_weights(str(path))
    np.testing.assert_array_equal(render(pipe, prompt), want)
    # Control: the same file with alpha = rank (what diffusers' convert_state_dict_to_kohya writes) does not match.
    wrong = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    save_file(wrong, str(run / "wrong_alpha.safetensors"))
    pipe = _base(cfg)
    pipe.load_lora_weights(str(run / "wrong_alpha.safetensors"))
    assert _maxdiff(render(pipe, prompt), want) > 1e-3


def test_a1111_embedding_round_trip(runs):
    from dreambench.methods import load_run_pipeline

    run, cfg, metrics = runs["textual_inversion"]
    (path,) = list((run / "export" / "a1111").glob("*.pt"))  # train.export=[all] for textual inversion
    assert path.name == "sks-dog.pt"  # the file name is the trigger word in A1111 / ComfyUI
    data = torch.load(path, weights_only=True)  # no pickle code: plain tensors, strings, ints
    learned = load_file(str(run / "model" / "learned_embeds.safetensors"))["<sks>"]
    assert torch.equal(data["string_to_param"]["*"], learned) and data["name"] == "sks-dog"
    assert not (run / "export" / "kohya").exists() and not (run / "export" / "single_file").exists()

    prompt = metrics["instance_prompt"]
    pipe = _base(cfg)
    pipe.load_textual_inversion(str(path), token="<sks>")
    np.testing.assert_array_equal(render(pipe, prompt), render(load_run_pipeline(run), prompt))


def test_sd2_text_encoder_goes_out_in_open_clip_layout(runs, tmp_path):
    """SD 2.x's text encoder (OpenCLIP, GELU) has its own original layout: q, k, v fused into in_proj."""
    from dreambench.exporters import sd

    _, cfg, _ = runs["dreambooth"]
    pipe = _base(cfg)
    pipe.text_encoder.config.hidden_act = "gelu"  # what marks SD 2.x's encoder; weights unchanged
    pipe.save_pretrained(tmp_path / "sd2ish", safe_serialization=True)
    state = sd.to_original(pipe)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "sd2ish.safetensors"))
    loaded = _from_single_file(tmp_path / "sd2ish.safetensors", tmp_path / "sd2ish")
    _same_weights(loaded, pipe)


def test_unmapped_weight_is_an_error_not_a_silent_drop():
    from dreambench.exporters.sd import unet_key

    with pytest.raises(KeyError, match="no place"):
        unet_key("add_embedding.linear_1.weight", {"layers_per_block": 1, "up_block_types": []})


def test_bad_export_requests_are_one_line_errors(runs, tmp_path):
    from dreambench.errors import UserError
    from dreambench.exporters import export_run

    run = runs["dreambooth"][0]
    with pytest.raises(UserError, match="unknown export format.*'ckpt'"):
        export_run(run, ["ckpt"])
    with pytest.raises(UserError, match="format=kohya does not apply to a dreambooth run"):
        export_run(run, ["kohya"])
    with pytest.raises(UserError, match="no model/ folder"):
        export_run(tmp_path, ["single_file"])
    from dreambench.train import prepare
    # Checked at start-up, before any model loads.
    with pytest.raises(UserError, match="format=a1111 does not apply to a lora run"):
        prepare(tiny_cfg(tmp_path / "r", "method=lora", "train.export=[a1111]"))


def test_export_cli_exit_code_and_one_line(runs):
    from tests.helpers import run_cli

    p = run_cli("dreambench.export", [f"run={runs['textual_inversion'][0]}", "format=single_file"], timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == ("dreambench: error: format=single_file does not apply to a "
                                                 "textual_inversion run (it applies to dreambooth, lora)")


def test_model_card_parses_and_names_the_run(runs):
    from huggingface_hub import ModelCard

    run, cfg, metrics = runs["lora"]
    card = ModelCard.load(run / "README.md")  # written at the end of training
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"dreambooth", "lora", "text-to-image"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"  # conf/model/tiny.yaml
    assert "base_model" not in data  # a local folder is not a Hub id the Hub could link
    assert data["instance_prompt"] == metrics["instance_prompt"] == "a sks dog"
    assert data["trigger_words"] == ["sks"]
    assert "export/kohya/dog-lora.safetensors" in card.text
    assert "![samples](samples/before_after.png)" in card.text  # the first grid beside the last
    # The learning rate LoRA trained at (method.lr=1e-2), not optimizer.lr; the method's settings in words.
    assert "| learning rate | 0.01 |" in card.text and "| method | lora (rank=4, alpha=8" in card.text


def test_model_card_base_model_is_a_hub_id_only():
    from dreambench.card import _hub_id

    assert _hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert _hub_id("/models/sd15") is None and _hub_id("./sd15") is None and _hub_id("sd15") is None


def _push_cfg(*overrides):
    from tests.helpers import compose

    return compose(list(overrides), config_name="push")


def test_push_dry_run_lists_the_files_and_contacts_nothing(runs, monkeypatch):
    import huggingface_hub

    from dreambench.push import push

    def forbidden(*a, **k):
        raise AssertionError("a dry run must not call the Hub")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", forbidden)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", forbidden)
    run = runs["textual_inversion"][0]
    files, url = push(_push_cfg(f"run={run}", "repo_id=me/dog-ti", "dry_run=true"))
    assert url is None
    assert files == ["README.md", "config.yaml", "export/a1111/sks-dog.pt", "metrics.json",
                     "model/learned_embeds.safetensors", "model/method.json",
                     *sorted(p.relative_to(run).as_posix() for p in (run / "samples").glob("*.png"))]


def test_push_uploads_exactly_the_listed_files_and_never_writes_the_token(runs, monkeypatch):
    import huggingface_hub

    from dreambench.errors import UserError
    from dreambench.push import push

    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["repo"] = (repo_id, kw)

    def create_commit(self, repo_id, operations, **kw):
        calls["ops"] = [(op.path_in_repo, op.path_or_fileobj) for op in operations]
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    run = runs["lora"][0]
    token = "hf_dreambenchTESTtoken0123456789"
    monkeypatch.setenv("HF_TOKEN", token)
    dry, _ = push(_push_cfg(f"run={run}", "repo_id=me/dog-lora", "format=[kohya]", "dry_run=true"))
    files, url = push(_push_cfg(f"run={run}", "repo_id=me/dog-lora", "format=[kohya]", "private=true"))
    assert files == dry and url.endswith("/commit/abc")
    assert calls["repo"] == ("me/dog-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert [p for p, _ in calls["ops"]] == files and "export/kohya/dog-lora.safetensors" in files
    assert not any(f.startswith(("model/", "export/single_file/")) for f in files)  # only the chosen export
    assert all(src == str(run / p) for p, src in calls["ops"])
    for f in run.rglob("*"):
        if f.is_file():
            assert token.encode() not in f.read_bytes(), f
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(run / "no-login"))  # no stored login
    with pytest.raises(UserError, match="no Hugging Face token"):
        push(_push_cfg(f"run={run}", "repo_id=me/dog-lora", "format=[kohya]"))
    with pytest.raises(UserError, match="repo_id='not a repo'"):
        push(_push_cfg(f"run={run}", "repo_id=not a repo", "dry_run=true"))


def test_evaluated_card_carries_the_scores(runs, tmp_path):
    """evaluate rewrites the card; here the eval/metrics.json evaluate writes is given, to test the card alone."""
    from huggingface_hub import ModelCard

    from dreambench.card import write_card

    run = runs["dreambooth"][0]
    ev = {"mode": "run", "metrics": {"dino": {"mean": 0.61, "ci95": [0.5, 0.7]}, "clip_t": {"mean": 0.3,
          "ci95": [0.25, 0.35]}, "div": "unavailable: no LPIPS weights"}, "protocol": {"protocol": "DreamBench"}}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "metrics.json").write_text(json.dumps(ev))
    card = ModelCard.load(write_card(run))
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"dino": 0.61, "clip_t": 0.3}
    assert "| dino | 0.6100 | [0.5000, 0.7000] |" in card.text and "Protocol card" in card.text


def test_a_single_file_base_model_trains_like_its_diffusers_folder(runs, tmp_path):
    """model.pretrained=<file>.safetensors (with model.single_file_config=<diffusers folder>, offline): the same
    weights as the folder, and a run on it is the same run, loaded back through load_run_pipeline."""
    from safetensors.torch import save_file

    from dreambench.exporters import sd
    from dreambench.methods import load_run_pipeline
    from dreambench.models.loading import ModelNotFoundError, check_model_ref
    from dreambench.train import train

    _, cfg, _ = runs["dreambooth"]
    folder, ckpt = str(cfg.model.pretrained), tmp_path / "base.safetensors"
    save_file(sd.to_original(_base(cfg)), str(ckpt))
    from dreambench.models.loading import load_components
    a, b = load_components(folder), load_components(str(ckpt), single_file_config=folder)
    _same_weights(b, a)
    assert b.scheduler_config == a.scheduler_config
    images = []
    for name, model in [("folder", []), ("file", [f"model.pretrained={ckpt}", f"model.single_file_config={folder}",
                                                  "model.build_tiny=false"])]:
        run = tmp_path / name
        metrics = train(tiny_cfg(run, "method=lora", "method.lr=1e-2", "trainer.max_steps=2", *model))
        images.append(render(load_run_pipeline(run), metrics["instance_prompt"]))
    # Bitwise the same weights and scheduler (above), yet the two trainings agree to float rounding only
    # (measured ~1e-7 on [0, 1] pixels), not bit for bit.
    assert _maxdiff(images[1], images[0]) <= FUSED_ATOL
    with pytest.raises(ModelNotFoundError, match="no such checkpoint file"):
        check_model_ref(str(tmp_path / "missing.safetensors"))


def _generate_cfg(run, out, *overrides):
    from hydra import compose, initialize_config_dir

    from tests.methods_helpers import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("generate", overrides=[f"run={run}", f"out={out}", "num_images=1", "progress=false",
                                              "guidance.num_inference_steps=3", "guidance.guidance_scale=7.5",
                                              "guidance.scheduler=PNDMScheduler", *overrides])


@pytest.mark.parametrize("method", ["lora", "textual_inversion"])
def test_generate_samples_any_methods_run_like_the_run_itself(runs, tmp_path, method):
    from PIL import Image

    from dreambench.generate import generate_from_run
    from dreambench.methods import load_run_pipeline

    run, cfg, metrics = runs[method]
    # A plain string is one prompt (it used to be iterated letter by letter).
    out = generate_from_run(_generate_cfg(run, tmp_path / "gen", "prompts='a {identifier} {class_noun}'"))
    (entry,) = json.loads((out / "prompts.json").read_text())
    assert entry["prompt"] == metrics["instance_prompt"]  # the identifier the run trained (<sks> for TI)
    got = np.asarray(Image.open(out / entry["file"]), dtype=np.float64) / 255
    # The same pixels as the run's own loader (evaluate's), up to the PNG's 8-bit rounding; not the base model's.
    want = render(load_run_pipeline(run), entry["prompt"])
    assert _maxdiff(got, want) <= 0.5 / 255 + 1e-6
    assert _maxdiff(got, render(_base(cfg), entry["prompt"])) > 2 / 255


def test_generate_bad_input_is_one_line_before_any_model_loads(runs, tmp_path):
    from dreambench.errors import UserError
    from dreambench.generate import generate_from_run

    run, _, _ = runs["lora"]
    for overrides, message in [
        (["prompts=['a {identifer} toy']"], "bad placeholder 'identifer' (known: {identifier}, {class_noun}"),
        (["num_images=0"], "num_images=0: must be a whole number >= 1"),
        (["batch_size=-1"], "batch_size=-1: must be a whole number >= 1"),
        (["prompts=[]"], "give a list of prompts"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            generate_from_run(_generate_cfg(run, tmp_path / "never", *overrides))
    assert not (tmp_path / "never").exists()
    with pytest.raises(UserError, match="no model/ folder there"):
        generate_from_run(_generate_cfg(tmp_path, tmp_path / "never"))
