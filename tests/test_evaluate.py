"""`dreambench.evaluate` end to end on tiny encoders: the real-images row on the actual DreamBench images, a
folder of images, a tiny fake trained run, and bad input. Includes an independent numpy re-computation."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from dreambench.evaluate import evaluate
from dreambench.metrics.scorer import EvalInputError

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DATA = Path(os.environ.get("DREAMBENCH_DATA", REPO.parent / "shared" / "dreambench-dataset"))
if not (DATA / "prompts_and_classes.txt").is_file():
    DATA = Path("/work/shared/dreambench-dataset")
needs_data = pytest.mark.skipif(not (DATA / "prompts_and_classes.txt").is_file(),
                                reason="DreamBench data set not found (set DREAMBENCH_DATA)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dreambench-cache")


@pytest.fixture()
def env(cache_dir, monkeypatch):
    monkeypatch.setenv("DREAMBENCH_CACHE", str(cache_dir))
    monkeypatch.setenv("DREAMBENCH_DATA", str(DATA))


def make_cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("evaluate", overrides=["metrics=tiny", "eval.progress=false", *overrides])


def synthetic(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)).resize(size)


def tiny_pipeline(seed: int = 0):
    """A tiny random Stable Diffusion (as in diffusers' own tests), with the project's tiny tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambench.models.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    tok = build_tiny_tokenizer()
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=16, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, layers_per_block=1, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def make_fake_run(folder: Path, subject: str = "dog", class_noun: str = "dog", live: bool = True,
                  identifier: str = "xjy") -> Path:
    """A run folder as the trainer writes it: config.yaml, metrics.json, model/ (diffusers, safetensors)."""
    folder.mkdir(parents=True)
    tiny_pipeline().save_pretrained(str(folder / "model"), safe_serialization=True)
    cfg = {"seed": 0,
           "data": {"subject": subject, "class_noun": class_noun, "live": live, "identifier": "rare",
                    "instance_dir": None},
           "guidance": {"scheduler": "DDIMScheduler", "num_inference_steps": 50, "guidance_scale": 7.5,
                        "negative_prompt": "", "height": 32, "width": 32}}
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps({"identifier": identifier, "train/loss": 0.1}))
    return folder


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------- modes

@needs_data
def test_real_mode_on_the_dreambench_images(env, tmp_path):
    res = evaluate(make_cfg("mode=real", "subjects=[dog,backpack,cat2]", f"out_dir={tmp_path}"))
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["summary"]["eval/dino"] == pytest.approx(res["summary"]["eval/dino"])
    assert set(m["metrics"]["dino"]["per_subject"]) == {"dog", "backpack", "cat2"}
    assert m["summary"]["eval/clip_t"].startswith("n/a")
    rows = read_csv(tmp_path / "eval" / "scores.csv")
    n_real = sum(len(list((DATA / s).glob("*.jpg"))) for s in ("dog", "backpack", "cat2"))
    assert len(rows) == n_real == m["protocol"]["image_counts"]["real"]
    # Per subject, the mean of the per-image means over the other images is the distinct-pair mean.
    dog = [float(r["dino"]) for r in rows if r["subject"] == "dog"]
    assert np.mean(dog) == pytest.approx(m["metrics"]["dino"]["per_subject"]["dog"], abs=1e-6)
    assert (tmp_path / "eval" / "contact_sheets" / "dog.png").is_file()
    card = m["protocol"]
    assert "distinct pair" in card["pairing"] and card["encoders"]["dino"]["layer_norm_eps"] == 1e-6


def _hand_dino(path: str, images: list[Image.Image]) -> np.ndarray:
    # Written out again here, independently of dreambench.metrics.encoders.
    from transformers import ViTModel

    model = ViTModel.from_pretrained(path, add_pooling_layer=False, layer_norm_eps=1e-6).eval()
    xs = []
    for im in images:
        w, h = im.size  # torchvision Resize(256): short side 256, long side truncated
        im = im.resize((256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256), Image.BICUBIC)
        w, h = im.size
        left, top = round((w - 224) / 2), round((h - 224) / 2)
        a = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255
        xs.append((a - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    with torch.no_grad():
        out = model(pixel_values=torch.tensor(np.stack(xs), dtype=torch.float32).permute(0, 3, 1, 2))
    return out.last_hidden_state[:, 0].numpy().astype(np.float64)


def _hand_clip(path: str, images: list[Image.Image] | None = None, texts: list[str] | None = None) -> np.ndarray:
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(path).eval()
    with torch.no_grad():
        if images is not None:
            px = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
            out = model.get_image_features(pixel_values=px)
        else:
            enc = CLIPTokenizer.from_pretrained(path)(texts, padding=True, return_tensors="pt")
            out = model.get_text_features(**enc)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return out.numpy().astype(np.float64)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@needs_data
def test_folder_mode_matches_an_independent_numpy_recomputation(env, tmp_path):
    from dreambench.data.images import load_image

    folder = tmp_path / "method"
    layout = {"dog": (3, 2), "backpack": (2, 2)}  # subject: (prompts, images per prompt)
    for subject, (n_p, n_i) in layout.items():
        (folder / subject).mkdir(parents=True)
        for p in range(n_p):
            for k in range(n_i):
                synthetic(100 * p + k + len(subject), (80, 48)).save(folder / subject / f"{p:02d}_{k}.png")
        for k in range(2):
            synthetic(900 + k).save(folder / subject / f"class_{k:02d}.png")
    cfg = make_cfg("mode=folder", f"folder={folder}")
    res = evaluate(cfg)
    m = json.loads((folder / "eval" / "metrics.json").read_text())
    assert m["summary"] == json.loads(json.dumps(res["summary"]))
    assert m["summary"]["eval/div"].startswith("unavailable")  # no LPIPS weights configured: no number

    dino_path, clip_path = cfg.metrics.dino.name_or_path, cfg.metrics.clip.name_or_path
    from dreambench.data.dreambench import load_index

    index = load_index(DATA)
    per_subject = {k: {} for k in ("dino", "clip_i", "clip_t", "pres")}
    pairs = {k: [] for k in ("dino", "clip_i")}
    for subject, (n_p, n_i) in layout.items():
        real = [load_image(p) for p in sorted((DATA / subject).glob("*.jpg"))]
        gen_files = [folder / subject / f"{p:02d}_{k}.png" for p in range(n_p) for k in range(n_i)]
        gen = [load_image(f) for f in gen_files]
        cls = [load_image(folder / subject / f"class_{k:02d}.png") for k in range(2)]
        d = _unit(_hand_dino(dino_path, gen)) @ _unit(_hand_dino(dino_path, real)).T
        c = _unit(_hand_clip(clip_path, gen)) @ _unit(_hand_clip(clip_path, real)).T
        templates = index.live_prompts if subject == "dog" else index.object_prompts
        # The CLIP-T text: the prompt without the identifier ("a sks dog ..." -> "a dog ...").
        texts = [" ".join(templates[p].format("", subject).split()) for p in range(n_p) for _ in range(n_i)]
        t = (_unit(_hand_clip(clip_path, gen)) * _unit(_hand_clip(clip_path, texts=texts))).sum(1)
        pres = _unit(_hand_dino(dino_path, cls)) @ _unit(_hand_dino(dino_path, real)).T
        per_subject["dino"][subject], per_subject["clip_i"][subject] = d.mean(), c.mean()
        per_subject["clip_t"][subject], per_subject["pres"][subject] = t.mean(), pres.mean()
        pairs["dino"].append(d.ravel())
        pairs["clip_i"].append(c.ravel())
        rows = [r for r in read_csv(folder / "eval" / "scores.csv") if r["subject"] == subject]
        assert {r["clip_t_text"] for r in rows if r["prompt_index"] != "class"} == set(texts)
    for k, values in per_subject.items():
        assert m["metrics"][k]["mean"] == pytest.approx(np.mean(list(values.values())), abs=1e-5), k
        assert m["metrics"][k]["per_subject"] == pytest.approx(values, abs=1e-5), k
    for k in pairs:
        assert m["metrics"][k]["mean_over_pairs"] == pytest.approx(np.concatenate(pairs[k]).mean(), abs=1e-5)
    assert len(m["per_prompt"]) == 5
    assert (folder / "eval" / "contact_sheets" / "backpack.png").is_file()


@needs_data
def test_folder_mode_with_lpips_weights_gives_div(env, tmp_path):
    from test_metrics import write_random_lpips

    folder = tmp_path / "m"
    (folder / "dog").mkdir(parents=True)
    for k in range(3):
        synthetic(k).save(folder / "dog" / f"00_{k}.png")
    (folder / "prompts.json").write_text(json.dumps({"identifier": "olis"}))
    weights = write_random_lpips(tmp_path / "lpips.safetensors")
    evaluate(make_cfg("mode=folder", f"folder={folder}", f"metrics.lpips.weights={weights}", "metrics.lpips.size=64"))
    m = json.loads((folder / "eval" / "metrics.json").read_text())
    assert isinstance(m["summary"]["eval/div"], float) and m["summary"]["eval/div"] > 0
    assert m["per_prompt"][0]["prompt"] == "a olis dog in the jungle"
    assert m["summary"]["eval/pres"].startswith("n/a")


@needs_data
def test_run_mode_end_to_end_on_a_tiny_fake_run(env, tmp_path):
    run = make_fake_run(tmp_path / "runs" / "dog-1")
    overrides = ["mode=run", f"runs=[{run}]", "eval.prompts_limit=2", "eval.images_per_prompt=2",
                 "eval.num_inference_steps=2", "eval.pres_images=2"]
    res = evaluate(make_cfg(*overrides))
    images = run / "eval" / "images" / "dog"
    assert sorted(p.name for p in images.glob("*.png")) == ["00_0.png", "00_1.png", "01_0.png", "01_1.png",
                                                             "class_00.png", "class_01.png"]
    m = json.loads((run / "eval" / "metrics.json").read_text())
    for k in ("dino", "clip_i", "clip_t", "pres"):
        assert -1.0 <= m["summary"][f"eval/{k}"] <= 1.0
    gen = m["protocol"]["generation"]
    assert gen["guidance"]["num_inference_steps"] == 2 and gen["guidance"]["guidance_scale"] == 7.5
    assert m["protocol"]["eval_overrides"]["prompts_limit"] == 2
    # The identifier the trainer recorded (xjy), not the config's "rare".
    assert m["per_prompt"][0]["prompt"] == "a xjy dog in the jungle"
    rows = read_csv(run / "eval" / "scores.csv")
    assert {r["seed"] for r in rows} == {"0", "1", "1000", "1001", "1000000", "1000001"}
    assert rows[0]["clip_t_text"] == "a dog in the jungle"
    assert res["summary"]["eval/dino"] == m["summary"]["eval/dino"]
    from huggingface_hub import ModelCard  # evaluate rewrites the run's model card with these scores
    card = {r.metric_type: r.metric_value for r in ModelCard.load(run / "README.md").data.eval_results}
    assert card["dino"] == pytest.approx(m["summary"]["eval/dino"], abs=1e-6) and set(card) >= {"clip_i", "clip_t"}

    # Fixed seeds: a second evaluation reuses the images; regenerating gives the same pixels and numbers.
    before = (images / "00_1.png").stat().st_mtime_ns
    evaluate(make_cfg(*overrides))
    assert (images / "00_1.png").stat().st_mtime_ns == before
    # A run folder moved elsewhere (its files' times kept) is the same run: its images are reused there too.
    moved = tmp_path / "elsewhere" / "dog-1"
    moved.parent.mkdir()
    shutil.move(run, moved)
    run, images = moved, moved / "eval" / "images" / "dog"
    overrides[1] = f"runs=[{run}]"
    evaluate(make_cfg(*overrides))
    assert (images / "00_1.png").stat().st_mtime_ns == before
    pixels = np.asarray(Image.open(images / "00_1.png"))
    again = evaluate(make_cfg(*overrides, "eval.regenerate=true"))
    assert np.array_equal(np.asarray(Image.open(images / "00_1.png")), pixels)
    assert again["summary"]["eval/dino"] == pytest.approx(m["summary"]["eval/dino"], abs=1e-6)


@needs_data
def test_run_mode_over_a_folder_of_runs_writes_a_combined_table(env, tmp_path):
    parent = tmp_path / "runs"
    make_fake_run(parent / "a", subject="dog", class_noun="dog", live=True)
    make_fake_run(parent / "b", subject="backpack", class_noun="backpack", live=False, identifier="sks")
    res = evaluate(make_cfg("mode=run", f"runs=[{parent}]", "eval.prompts_limit=1", "eval.images_per_prompt=1",
                            "eval.num_inference_steps=1", "eval.pres_images=0", "eval.contact_sheet=false"))
    combined = json.loads((parent / "eval" / "metrics.json").read_text())
    per_run = [json.loads((parent / r / "eval" / "metrics.json").read_text()) for r in ("a", "b")]
    assert combined["metrics"]["dino"]["per_subject"] == {
        "dog": per_run[0]["summary"]["eval/dino"], "backpack": per_run[1]["summary"]["eval/dino"]}
    assert combined["summary"]["eval/dino"] == pytest.approx(np.mean([r["summary"]["eval/dino"] for r in per_run]))
    assert len(res["runs"]) == 2


# --------------------------------------------------------------------------------------------- bad input

@needs_data
@pytest.mark.parametrize("case, message", [
    ("missing", "image folder not found"),
    ("empty", "no subject folders"),
    ("no_images", "no images named"),
    ("corrupt", "cannot read image"),
    ("unknown_subject", "is not in DreamBench"),
])
def test_bad_folder_input_gives_a_clear_message(env, tmp_path, case, message):
    folder = tmp_path / "m"
    if case != "missing":
        folder.mkdir()
    if case == "no_images":
        (folder / "dog").mkdir()
        (folder / "dog" / "notes.txt").write_text("hi")
    if case == "corrupt":
        (folder / "dog").mkdir()
        synthetic(0).save(folder / "dog" / "00_0.png")
        (folder / "dog" / "00_1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    if case == "unknown_subject":
        (folder / "my_mug").mkdir()
        synthetic(0).save(folder / "my_mug" / "00_0.png")
    with pytest.raises(EvalInputError, match=message) as e:
        evaluate(make_cfg("mode=folder", f"folder={folder}"))
    assert "\n" not in str(e.value)


@needs_data
def test_bad_run_input(env, tmp_path):
    with pytest.raises(EvalInputError, match="run folder not found"):
        evaluate(make_cfg("mode=run", f"runs=[{tmp_path / 'nope'}]"))
    run = tmp_path / "r"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({"data": {"subject": "unicorn", "class_noun": "horse", "live": False},
                                     "guidance": {"scheduler": "DDIMScheduler"}}), run / "config.yaml")
    with pytest.raises(EvalInputError, match="'unicorn' is not in DreamBench"):
        evaluate(make_cfg("mode=run", f"runs=[{run}]"))
    with pytest.raises(EvalInputError, match="missing config value.*mode"):
        evaluate(make_cfg())


def test_missing_dataset_is_a_clear_message(cache_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("DREAMBENCH_CACHE", str(cache_dir))
    monkeypatch.setenv("DREAMBENCH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(EvalInputError, match="DreamBench data set not found"):
        evaluate(make_cfg("mode=real"))


@needs_data
def test_cli_exits_non_zero_with_one_line(cache_dir, tmp_path):
    env = {**os.environ, "DREAMBENCH_CACHE": str(cache_dir), "DREAMBENCH_DATA": str(DATA),
           "DREAMBENCH_OUTPUT": str(tmp_path / "out"), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "dreambench.evaluate", "mode=folder", f"folder={tmp_path / 'none'}",
                        "metrics=tiny"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("dreambench.evaluate: error: image folder not found"), p.stderr
    assert "Traceback" not in p.stderr


@needs_data
def test_run_mode_takes_the_data_set_the_run_was_trained_on(cache_dir, monkeypatch, tmp_path, caplog):
    # No DREAMBENCH_DATA: a run's own paths.dataset_dir (a toy-world run's world folder) is the data set, and a
    # run configured with other encoders than the evaluation's is named in a warning.
    monkeypatch.setenv("DREAMBENCH_CACHE", str(cache_dir))
    monkeypatch.delenv("DREAMBENCH_DATA", raising=False)
    run = tmp_path / "r"
    run.mkdir()
    OmegaConf.save(OmegaConf.create({"data": {"subject": "unicorn", "class_noun": "horse", "live": False},
                                     "guidance": {"scheduler": "DDIMScheduler"},
                                     "paths": {"dataset_dir": str(DATA)},
                                     "metrics": {"dino": {"name_or_path": "/models/toy-dino"}}}),
                   run / "config.yaml")
    with caplog.at_level("WARNING", logger="dreambench.evaluate"), \
            pytest.raises(EvalInputError, match="'unicorn' is not in DreamBench"):
        evaluate(make_cfg("mode=run", f"runs=[{run}]"))
    assert "metrics.dino=/models/toy-dino" in caplog.text
    with pytest.raises(EvalInputError, match="DreamBench data set not found"):
        evaluate(make_cfg("mode=run", f"runs=[{run}]", f"paths.dataset_dir={tmp_path / 'nowhere'}"))
