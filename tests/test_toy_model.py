"""model=toy (dreambench/models/toy.py): built by the project in diffusers' format, loaded by the same code as
SD 1.5, named by its recipe; a missing one is one line that says how to build it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose

from dreambench.models.toy import MAX_TOKENS, Recipe, ensure_toy_model, folder_name

MICRO = Recipe(members=48, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4)


def test_a_toy_model_is_a_diffusers_folder_that_loads_like_sd15(tmp_path):
    from dreambench.models.loading import load_components
    folder = ensure_toy_model(tmp_path, MICRO, progress=False)
    assert folder == tmp_path / folder_name(MICRO)
    stamp = folder.stat().st_mtime_ns
    assert ensure_toy_model(tmp_path, MICRO, progress=False) == folder and folder.stat().st_mtime_ns == stamp
    c = load_components(str(folder))
    assert c.vae.config.scaling_factor == pytest.approx(0.18215)
    assert c.tokenizer.model_max_length == MAX_TOKENS == c.text_encoder.config.max_position_embeddings
    assert c.noise_scheduler.config.prediction_type == "epsilon"
    # The latents have SD's scale: std 1 / 0.18215 before the scaling factor is applied.
    from dreambench.world.scene import Scene, render
    from dreambench.world.world import subjects
    x = torch.stack([torch.from_numpy(np.array(render(Scene(t), 32))) for t in subjects(0).values()])
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        std = c.vae.encode(x).latent_dist.mean.std().item()
    assert 2.5 < std < 11, std
    assert len(list(folder.rglob("*.bin"))) == 0 and len(list(folder.rglob("*.safetensors"))) == 3
    # Which CPU kernels built it (the suite's are AVX2: tests/conftest.py): other kernels, other weights.
    assert json.loads((folder / "toy.json").read_text())["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()


def test_the_build_command_pins_the_avx2_kernels_before_torch_loads():
    # A model=toy built on AVX-512 kernels has other weights than one built on AVX2 kernels from the same recipe
    # (docs/TOY_WORLD.md): `python -m dreambench.world build` pins AVX2 before torch loads, unless the user chose.
    import platform
    import subprocess
    import sys

    from dreambench.utils.kernels import AVX2
    clean = {k: v for k, v in os.environ.items() if k not in AVX2}

    def run(code: str, **env: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                              check=True).stdout.split()

    probe = ("from dreambench.utils.kernels import pin_avx2_kernels; first = pin_avx2_kernels(); import torch; "
             "print(first, pin_avx2_kernels(), torch.backends.cpu.get_cpu_capability())")
    # What the build command's build() finds: the variable set, torch not yet loaded.
    cli = ("import os, sys; import dreambench.world.__main__ as m; "
           "m.build = lambda *a: print(os.environ.get('ATEN_CPU_CAPABILITY'), 'torch' in sys.modules); "
           "m.main(['build', '--no-model'])")
    if platform.machine().lower() not in ("x86_64", "amd64"):  # no AVX2 to pin: nothing is set
        assert run(probe)[0] == "False" and run(cli) == ["None", "False"]
        return
    assert run(probe) == ["True", "False", "AVX2"]  # pinned; once torch is loaded it is too late, and says so
    assert run(probe, ATEN_CPU_CAPABILITY="default") == ["True", "False", "DEFAULT"]  # the user's choice wins
    assert run(cli) == ["avx2", "False"]


def test_another_recipe_is_another_folder():
    assert folder_name(MICRO) != folder_name(Recipe()) != folder_name(Recipe(seed=1))


def test_the_config_names_the_default_recipe():
    cfg = compose(["model=toy", "+experiment=dog"])
    assert Path(cfg.model.pretrained).name == folder_name(Recipe())
    assert cfg.model.resolution == Recipe().resolution


def test_a_missing_toy_model_is_one_line_that_says_how_to_build_it(tmp_path, dataset_root):
    from dreambench.errors import UserError
    from dreambench.train import preflight
    cfg = compose(["model=toy", "+experiment=dog", f"paths.cache_dir={tmp_path}", "logger=csv",
                   "metrics=tiny", "prior=none"])
    with pytest.raises(UserError, match=r"no diffusers model folder there .*python -m dreambench.world build"):
        preflight(cfg)


def test_toy_encoders_load_through_the_papers_encoder_classes(tmp_path):
    from dreambench.metrics.encoders import ClipEncoder, DinoEncoder
    from dreambench.world.encoders import EncoderRecipe, ensure_encoders
    from dreambench.world.scene import Scene, render
    from dreambench.world.world import subjects
    micro = EncoderRecipe(instances=210, dino_steps=2, dino_batch=8, captioned=520, clip_steps=2, clip_batch=8)
    out = ensure_encoders(tmp_path, micro, progress=False)
    images = [render(Scene(t), 64) for t in list(subjects(0).values())[:3]]
    dino = DinoEncoder(str(out["dino"]), resize=32, crop=32, device="cpu")
    clip = ClipEncoder(str(out["clip"]), device="cpu")
    assert dino.embed(images).shape == (3, 96) and clip.embed_images(images).shape == (3, 64)
    assert clip.embed_texts(["a sks cup on top of a purple rug in a forest wearing a black top hat"]).shape == (1, 64)
    assert clip.processor.crop_size == {"height": 32, "width": 32}


def test_the_metrics_config_names_the_default_encoders():
    from dreambench.world.encoders import EncoderRecipe, folder
    cfg = compose(["model=toy", "metrics=toy", "+experiment=dog"])
    assert Path(cfg.metrics.dino.name_or_path).name == folder(".", EncoderRecipe(), "dino").name
    assert Path(cfg.metrics.clip.name_or_path).name == folder(".", EncoderRecipe(), "clip").name


def test_the_worlds_lpips_is_an_lpips_state_dict_that_div_loads_and_the_config_names(tmp_path):
    from safetensors.torch import load_file

    from dreambench.metrics.lpips import LPIPSDistance, load_lpips
    from dreambench.world.encoders import LPIPS_FILE, LpipsRecipe, ensure_lpips, lpips_folder
    from dreambench.world.scene import Scene, render
    from dreambench.world.world import subjects
    micro = LpipsRecipe(members=520, steps=3, batch=8)
    path = ensure_lpips(tmp_path, micro, progress=False)
    assert path == lpips_folder(tmp_path, micro) / LPIPS_FILE and lpips_folder(tmp_path, micro).name.startswith("lpips-v")
    keys = set(load_file(str(path)))
    assert {"scaling_layer.shift", "net.slice1.0.weight", "lin4.model.1.weight", "lins.4.model.1.weight"} <= keys
    div = load_lpips(str(path), size=64)
    assert isinstance(div, LPIPSDistance)
    things = list(subjects(0).values())
    a = render(Scene(things[0], "in the snow"), 32)
    assert div.group_mean([a, a]) == pytest.approx(0, abs=1e-6)
    assert div.group_mean([a, render(Scene(things[5], "at night"), 32)]) > 0.01
    cfg = compose(["model=toy", "metrics=toy", "+experiment=dog"])
    assert Path(cfg.metrics.lpips.weights).parent.name == lpips_folder(".", LpipsRecipe()).name
    assert cfg.metrics.lpips.size == LpipsRecipe().size


def test_check_names_what_is_missing_and_builds_nothing(tmp_path, capsys):
    from dreambench.world.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["check", "--cache", str(tmp_path), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "no toy model at" in capsys.readouterr().err
    (tmp_path / folder_name(Recipe())).mkdir()
    (tmp_path / folder_name(Recipe()) / "toy.json").write_text("{}")  # a model, as far as the check can tell
    with pytest.raises(SystemExit) as e:
        main(["check", "--cache", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no toy encoder at" in err and "python -m dreambench.world build" in err
    assert not (tmp_path / "toy-encoders").exists() and not (tmp_path / "out").exists()


def test_build_without_encoders_builds_what_training_needs_and_no_encoder(tmp_path, monkeypatch, capsys):
    # `make demo`'s first step: the data set and model=toy, not the 20-minute encoders (training does not use them).
    import dreambench.world.encoders as encoders
    from dreambench.world.__main__ import main
    from dreambench.world.world import is_built as world_built
    from dreambench.world.world import world_folder

    def forbidden(*args, **kwargs):
        raise AssertionError("build --no-encoders started building the encoders")

    monkeypatch.setattr(encoders, "ensure_encoders", forbidden)
    (tmp_path / folder_name(Recipe())).mkdir()
    (tmp_path / folder_name(Recipe()) / "toy.json").write_text("{}")  # model=toy, as far as the build can tell
    main(["build", "--cache", str(tmp_path), "--no-encoders"])
    out = capsys.readouterr().out
    assert world_built(world_folder(tmp_path), 0) and f"toy model: {tmp_path / folder_name(Recipe())}" in out
    assert "toy encoders" not in out and not (tmp_path / "toy-encoders").exists()
    with pytest.raises(AssertionError, match="started building the encoders"):  # without the flag it would
        main(["build", "--cache", str(tmp_path)])


def test_the_denoiser_loss_weights_the_objects_latent_pixels_by_its_silhouette():
    from dreambench.models.toy import object_weights, render_members
    sil = np.zeros((1, 32, 32), np.uint8)
    sil[0, 12:20, 12:20] = 255  # an 8 x 8 object: latent pixels 6..9, dilated by one: 5..10
    w = object_weights(sil, 3.0)[0, 0]
    assert w.shape == (16, 16)
    assert torch.all(w[5:11, 5:11] == 4) and w.sum() == 256 + 3 * 36  # the object and its edge, nothing else
    # The members come with their silhouettes: some of each picture is the object, most is not.
    members = render_members(0, 16, 32, progress=False)
    assert members.silhouettes.shape == (16, 32, 32) and 0.03 < (members.silhouettes > 127).mean() < 0.5
    # A weighted mean per picture: uniform weights give v3's plain loss; with the silhouette's, an error on the
    # object costs 1 + weight times the same error on the background.
    from dreambench.models.toy import per_picture_loss
    sq = torch.rand(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = per_picture_loss(sq, None)
    assert torch.equal(plain, sq.mean(dim=(1, 2, 3)))
    assert torch.equal(per_picture_loss(sq, torch.ones(16, 1, 16, 16)), plain)
    assert torch.allclose(per_picture_loss(sq, torch.full((16, 1, 16, 16), 2.5)), plain)
    ws = object_weights(members.silhouettes, 3.0)
    on = (ws == 4).expand(-1, 4, -1, -1).float()
    off = (ws == 1).expand(-1, 4, -1, -1).float()
    assert torch.all(on.sum(dim=(1, 2, 3)) > 0) and torch.all(off.sum(dim=(1, 2, 3)) > 0)
    err_on = per_picture_loss(on / on.sum(dim=(1, 2, 3), keepdim=True), ws)
    err_off = per_picture_loss(off / off.sum(dim=(1, 2, 3), keepdim=True), ws)
    assert torch.allclose(err_on, 4 * err_off)
