"""The toy world (dreambench.world, issue 12): deterministic, in DreamBench's layout, read by the same tools, and
built so that a subject is more than its class."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from helpers import compose

from dreambench.world.scene import CLASSES, CONTEXTS, Scene, render
from dreambench.world.world import (
    PHOTO_SIZE,
    PROMPTS,
    WORDS,
    member,
    photo,
    prompt_scene,
    subjects,
    write_world,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world") / "toy-world", seed=0, progress=False)


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_world_is_the_same_every_time_and_another_seed_is_another_world(world, tmp_path):
    again = write_world(tmp_path / "again", seed=0, progress=False)
    assert _digest(again) == _digest(world)
    other = {k: v for k, v in _digest(write_world(tmp_path / "other", seed=1, progress=False)).items()
             if k.endswith(".png")}
    mine = {k: v for k, v in _digest(world).items() if k.endswith(".png")}
    assert set(mine.values()).isdisjoint(other.values())


def test_the_world_is_a_dreambench_folder_every_tool_reads(world):
    from dreambench.data import dreambench as db
    from dreambench.data.images import validate_image_folder

    subs = db.subjects(world)
    assert len(subs) == 20 and {s.class_noun for s in subs} == set(CLASSES)
    assert not any(s.live for s in subs)
    for s in subs:
        photos = validate_image_folder(s.folder, min_size=PHOTO_SIZE)
        assert 3 <= len(photos) <= 6, s.name
        assert len(s.prompt_templates) == 25
    assert db.fill_prompt(subs[0].prompt_templates[0], "sks", "ball") == "a sks ball in the jungle"
    # Every tool takes it by path: the training config's own preflight (keys, data set, photos, class images).
    from dreambench.train import preflight
    cfg = compose(["model=tiny", f"paths.dataset_dir={world}", "data.subject=toy_cup2", "data.class_noun=cup",
                   "data.live=false", "logger=csv"])
    preflight(cfg)


def test_members_never_show_an_emblem_and_subjects_always_do():
    # The class prior cannot produce a subject: only subjects carry an emblem (and a non-plain pattern).
    scenes = [member(0, i)[0] for i in range(400)]
    assert all(s.thing.mark is None for s in scenes)
    assert {s.thing.cls for s in scenes} == set(CLASSES) and {s.context for s in scenes} == set(CONTEXTS)
    subs = subjects(0)
    assert all(t.mark is not None and t.pattern != "plain" for t in subs.values())
    # Two subjects of a class differ in how they look, not only in name.
    for cls in CLASSES:
        a, b = (t for t in subs.values() if t.cls == cls)
        assert (a.colour, a.pattern, a.mark) != (b.colour, b.pattern, b.mark)


def test_captions_say_what_is_drawn():
    for i in range(300):
        scene, caption = member(0, i)
        words = caption.split()
        assert scene.thing.cls in words
        assert (scene.accessory or "") in caption and ("shiny" in words) == scene.shiny
        if scene.context and scene.context not in caption:
            assert caption.endswith(scene.thing.cls) or scene.accessory


def test_the_emblem_and_the_context_change_the_picture():
    subject = subjects(0)["toy_ball1"]
    with_mark = np.asarray(render(Scene(subject, "in the snow"), 64), dtype=np.float32)
    from dataclasses import replace
    without = np.asarray(render(Scene(replace(subject, mark=None), "in the snow"), 64), dtype=np.float32)
    elsewhere = np.asarray(render(Scene(subject, "at night"), 64), dtype=np.float32)
    changed = np.abs(with_mark - without).max(-1) > 30
    assert 10 < changed.sum() < 200  # a small emblem: visible, not the whole object
    assert np.abs(with_mark - elsewhere).mean() > 30


def test_prompts_draw_what_they_say():
    subject = subjects(0)["toy_car2"]
    assert len(PROMPTS) == 25
    jungle = prompt_scene(subject, PROMPTS[0], 0)
    assert jungle.context == "in the jungle" and jungle.thing == subject
    hat = prompt_scene(subject, "a {0} {1} wearing a santa hat", 0)
    assert hat.accessory == "wearing a santa hat" and hat.context == ""
    red = prompt_scene(subject, "a red {0} {1}", 0)
    assert red.thing.colour != subject.colour and red.thing.mark == subject.mark
    assert prompt_scene(subject, "a shiny {0} {1}", 0).shiny


def test_photos_vary_in_pose_and_background():
    subject = subjects(0)["toy_fish1"]
    shots = [photo(subject, 0, 16, k) for k in range(6)]
    assert len({(s.x, s.tilt, s.mirror) for s in shots}) == 6 and len({s.seed for s in shots}) == 6


def test_the_toy_tokenizer_has_one_token_for_every_word_of_the_world():
    from dreambench.models.toy import IDENTIFIERS, build_tokenizer
    tok = build_tokenizer()
    for word in [*WORDS, *IDENTIFIERS]:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_the_toy_tokenizer_is_the_same_on_every_build():
    # HF tokenizers' BpeTrainer gave another vocabulary on every build (ties broken in hash-map order), hence other
    # token ids and another model=toy from the same recipe; the project's own learner breaks ties by the pair.
    import json
    import subprocess
    import sys

    from dreambench.models.tokenizer import learn_merges
    from dreambench.models.toy import build_tokenizer
    vocab = json.dumps(sorted(build_tokenizer().get_vocab().items()))
    assert all(json.dumps(sorted(build_tokenizer().get_vocab().items())) == vocab for _ in range(4))
    probe = ("import json; from dreambench.models.toy import build_tokenizer; "
             "print(json.dumps(sorted(build_tokenizer().get_vocab().items())))")
    for hash_seed in ("1", "2"):  # other processes, other hash seeds
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout.strip().splitlines()[-1]
        assert out == vocab
    # The most frequent pair first; of equally frequent ones, the lexicographically first.
    assert learn_merges(["cd", "ab", "cd"]) == ["c d</w>", "a b</w>"]
    assert learn_merges(["cd", "ab"]) == ["a b</w>", "c d</w>"]
    assert learn_merges(["abc", "abd"]) == ["a b", "ab c</w>", "ab d</w>"]


def test_every_subject_of_the_world_has_its_experiment_in_step_with_the_world():
    from helpers import CONF
    from omegaconf import OmegaConf

    from dreambench.world.world import experiment_yaml
    names = subjects(0)
    shipped = {p.stem for p in (CONF / "experiment").glob("toy_*.yaml")}
    assert shipped == set(names)  # `python -m dreambench.world configs` rewrites them
    for name, thing in names.items():
        assert (CONF / "experiment" / f"{name}.yaml").read_text() == experiment_yaml(name, thing), name
    cfg = compose(["+experiment=toy_lamp2", "paths.run_dir=/tmp/x", "paths.cache_dir=/tmp/cache"])
    assert "experiment" not in cfg and not OmegaConf.missing_keys(cfg)
    assert (cfg.data.subject, cfg.data.class_noun, cfg.model.name) == ("toy_lamp2", "lamp", "toy")
    assert cfg.paths.dataset_dir == "/tmp/cache/toy-world-v1-seed0" and cfg.data.resolution == 32
    assert compose(["+experiment=toy_lamp2", "model=tiny"]).model.name == "tiny"  # the command line still wins


def test_a_world_not_built_yet_is_one_line_that_says_how_to_build_it(tmp_path):
    from dreambench.errors import UserError
    from dreambench.train import preflight
    cfg = compose(["+experiment=toy_cup1", f"paths.cache_dir={tmp_path}", "logger=csv"])
    with pytest.raises(UserError, match=r"toy world's data set is not at .*toy-world-v1-seed0.*"
                                        r"python -m dreambench.world build"):
        preflight(cfg)


def test_a_world_folder_from_before_a_subject_changed_is_written_again(tmp_path):
    import json

    from dreambench.world.world import ensure_world
    root = ensure_world(tmp_path, progress=False)
    meta = json.loads((root / "world.json").read_text())
    meta["subjects"] = {k.removeprefix("toy_"): v for k, v in meta["subjects"].items()}  # the names of an older world
    (root / "world.json").write_text(json.dumps(meta))
    (root / "toy_cup1").rename(root / "cup1")
    root = ensure_world(tmp_path, progress=False)
    assert (root / "toy_cup1").is_dir() and not (root / "cup1").exists()


def test_every_photo_has_its_objects_silhouette_as_its_loss_mask(world, tmp_path):
    # loss.mask=true on the world reads <photo>.mask.png (dreambench.data.sidecars): white where the object is.
    import json

    from PIL import Image

    from dreambench.data.sidecars import MASK_SUFFIX
    from dreambench.world.world import ensure_world
    from dreambench.world.world import world_folder as folder_of

    thing = subjects(0)["toy_cup2"]
    si = list(subjects(0)).index("toy_cup2")
    scene = photo(thing, 0, si, 0)
    mask = np.asarray(Image.open(world / "toy_cup2" / f"00{MASK_SUFFIX}")).astype(np.float32) / 255
    assert mask.shape == (PHOTO_SIZE, PHOTO_SIZE)
    # Hand check: the photo drawn on two different backdrops differs only where the object is not.
    from dataclasses import replace
    a = np.asarray(render(replace(scene, context=""), PHOTO_SIZE), dtype=np.float32)  # grey studio
    b = np.asarray(render(replace(scene, context="in the jungle"), PHOTO_SIZE), dtype=np.float32)
    moved = np.abs(a - b).max(-1) > 8
    assert 0.03 < mask.mean() < 0.6                      # an object, not the whole picture, not nothing
    assert mask[~moved].mean() > 0.9                     # where the backdrop does not show, the mask is the object
    assert mask[moved].mean() < 0.1                      # where it shows, the mask is (nearly) empty
    n_photos = sum(1 for p in world.rglob("*.png") if not p.name.endswith(MASK_SUFFIX))
    assert sum(1 for _ in world.rglob(f"*{MASK_SUFFIX}")) == n_photos
    # A world folder written before the masks existed is written again (no version bump: models stay valid).
    root = ensure_world(tmp_path, progress=False)
    meta = json.loads((root / "world.json").read_text())
    del meta["masks"]
    (root / "world.json").write_text(json.dumps(meta))
    for m in root.rglob(f"*{MASK_SUFFIX}"):
        m.unlink()
    assert ensure_world(tmp_path, progress=False) == folder_of(tmp_path)
    assert (root / "toy_cup2" / f"00{MASK_SUFFIX}").is_file()


def test_path_prints_a_built_part_and_refuses_a_missing_one(world, tmp_path, capsys):
    # `python -m dreambench.world path` is what scripts (experiments/*.sh --toy) ask for the world's folder.
    import shutil

    from dreambench.world.__main__ import main
    from dreambench.world.world import world_folder
    with pytest.raises(SystemExit) as e:
        main(["path", "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no toy world at" in err and "python -m dreambench.world build" in err
    shutil.copytree(world, world_folder(tmp_path))
    main(["path", "world", "--cache", str(tmp_path)])
    assert capsys.readouterr().out.strip() == str(world_folder(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["path", "dino", "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no toy encoder at" in err and "dino-v" in err


def test_the_check_compares_the_subjects_photos_and_never_their_silhouettes(world):
    # `world check` scores the encoders on each subject's photos; the silhouette beside each photo
    # (<photo>.mask.png) is not one of them, or "own photos" would pair photos with black-and-white masks.
    from PIL import Image

    from dreambench.data import dreambench as db
    from dreambench.data.sidecars import MASK_SUFFIX
    from dreambench.world.check import subject_photos

    photos = subject_photos(db.subjects(world))
    assert sorted(photos) == sorted(subjects(0))
    for name, ims in photos.items():
        files = sorted(p for p in (world / name).glob("*.png") if not p.name.endswith(MASK_SUFFIX))
        assert len(ims) == len(files) >= 3, name
        for im, f in zip(ims, files, strict=True):
            assert np.array_equal(np.asarray(im), np.asarray(Image.open(f).convert("RGB"))), f
