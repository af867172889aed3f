"""Class images are cached by content: a hit on an identical key, a miss on any changed field, no stale reuse."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from PIL import Image

from dreambench.prior import ClassImageCache, ClassImageSpec, cache_key

BASE = ClassImageSpec(model={"ref": "/models/sd15", "digest": "abc"}, prompt="a dog", negative_prompt="",
                      scheduler="DDIMScheduler", scheduler_config={"beta_end": 0.012}, num_inference_steps=50,
                      guidance_scale=7.5, height=32, width=32, seed=0, count=3)
CHANGES = {"model": {"ref": "/models/sd21", "digest": "abc"}, "prompt": "a cat", "negative_prompt": "blurry",
           "scheduler": "EulerDiscreteScheduler", "scheduler_config": {"beta_end": 0.02}, "num_inference_steps": 25,
           "guidance_scale": 5.0, "height": 64, "width": 64, "seed": 1, "count": 4, "guidance_rescale": 0.7,
           "pipeline_kwargs": {"max_sequence_length": 77}}


class Renderer:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts, seeds):
        self.calls.append(list(seeds))
        return [Image.new("RGB", (8, 8), (s % 256, 0, 0)) for s in seeds]


def test_every_field_is_in_the_key():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(ClassImageSpec)}
    for field, value in CHANGES.items():
        assert cache_key(dataclasses.replace(BASE, **{field: value})) != cache_key(BASE), field


def test_hit_on_identical_key_generates_nothing(tmp_path):
    cache, r = ClassImageCache(tmp_path), Renderer()
    paths, hit = cache.get_or_create(BASE, r, batch_size=2, progress=False)
    assert not hit and len(paths) == 3 and r.calls == [[BASE.image_seed(0), BASE.image_seed(1)], [BASE.image_seed(2)]]
    again, hit = cache.get_or_create(dataclasses.replace(BASE), Renderer(), progress=False)
    assert hit and again == paths
    manifest = json.loads((paths[0].parent / "manifest.json").read_text())
    assert manifest["key"] == cache_key(BASE) and manifest["spec"]["prompt"] == "a dog"


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_any_changed_field_misses(tmp_path, field):
    cache = ClassImageCache(tmp_path)
    first, _ = cache.get_or_create(BASE, Renderer(), progress=False)
    r = Renderer()
    changed = dataclasses.replace(BASE, **{field: CHANGES[field]})
    paths, hit = cache.get_or_create(changed, r, progress=False)
    assert not hit and r.calls and paths[0].parent != first[0].parent


def test_unsealed_or_mismatched_folders_are_never_reused(tmp_path):
    cache = ClassImageCache(tmp_path)
    folder = cache.folder(BASE)
    folder.mkdir(parents=True)
    for i in range(3):  # the right number of images, but no manifest: diffusers would reuse these
        Image.new("RGB", (8, 8)).save(folder / f"{i:05d}.png")
    assert cache.lookup(BASE) is None
    (folder / "manifest.json").write_text(json.dumps({"key": cache_key(BASE), "spec": {"prompt": "a cat"}}))
    assert cache.lookup(BASE) is None  # the full spec is compared, not just the key
    r = Renderer()
    paths, hit = cache.get_or_create(BASE, r, progress=False)
    assert not hit and sum(map(len, r.calls)) == 3 and cache.lookup(BASE) == paths


def test_killed_generation_resumes_from_complete_images(tmp_path):
    cache = ClassImageCache(tmp_path)
    partial = cache.folder(BASE).with_name(cache.folder(BASE).name + ".partial")
    partial.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(partial / "00000.png")
    (partial / ".00001.png.tmp-123").write_bytes(b"half a png")  # a write cut off by a kill
    r = Renderer()
    paths, hit = cache.get_or_create(BASE, r, progress=False)
    assert not hit and sorted(sum(r.calls, [])) == [BASE.image_seed(1), BASE.image_seed(2)]
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]


def test_images_do_not_depend_on_batch_size_or_ranks(tmp_path):
    seeds_by_layout = []
    for batch, world in [(1, 1), (3, 1), (2, 2)]:
        r = Renderer()
        cache = ClassImageCache(tmp_path / f"{batch}-{world}")
        for rank in reversed(range(world)):  # rank 0 last: it seals once every share is there
            if rank == 0:
                cache.get_or_create(BASE, r, batch_size=batch, rank=0, world_size=world, progress=False)
            else:
                try:
                    cache.get_or_create(BASE, r, batch_size=batch, rank=rank, world_size=world, progress=False)
                except RuntimeError:  # a lone non-zero rank finds the set unsealed, as it should
                    pass
        seeds_by_layout.append(sorted(sum(r.calls, [])))
    assert seeds_by_layout[0] == seeds_by_layout[1] == seeds_by_layout[2]


class _SlowRenderer(Renderer):
    def __call__(self, prompts, seeds):
        import time
        time.sleep(0.2)  # long enough for the other process to see the same miss
        return super().__call__(prompts, seeds)


def _get_or_create_in_a_process(root, start, results):
    r = _SlowRenderer()
    start.wait()
    try:
        paths, hit = ClassImageCache(root).get_or_create(BASE, r, batch_size=1, progress=False)
        results.put((hit, sum(len(c) for c in r.calls), [str(p) for p in paths]))
    except Exception as e:  # noqa: BLE001 -- reported to the test, which names it
        results.put(("error", repr(e), []))


def test_two_runs_missing_the_same_class_at_once_render_it_once(tmp_path):
    # experiments/tables.sh JOBS=2 trains two subjects of one class side by side: both miss the cache at the same
    # moment. The second must wait for the first and reuse its images, not render the same set into the same
    # partial folder (and fail when the first renames it into place).
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    start, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_get_or_create_in_a_process, args=(tmp_path, start, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = sorted((results.get(timeout=60) for _ in procs), key=lambda g: str(g[0]))
    for p in procs:
        p.join(timeout=60)
    assert all(g[0] != "error" for g in got), got
    assert [g[0] for g in got] == [False, True]  # one rendered, the other found the sealed set
    assert sum(g[1] for g in got) == BASE.count  # each image rendered once in all
    assert got[0][2] == got[1][2] and all(os.path.isfile(p) for p in got[0][2])
