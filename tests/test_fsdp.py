"""trainer=fsdp: a full fine-tune sharded across two CPU processes (FSDP2 over gloo, Lightning's
ModelParallelStrategy): each rank holds half the UNet, a run resumed from a checkpoint ends bit for bit where the
uninterrupted run does, and the export holds the trained weights, whole."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
from helpers import TINY, compose, equal, run_cli

N = 4
ARGS = ["+experiment=dog", *[o for o in TINY if not o.startswith(("trainer.max_steps", "train.checkpoint_every"))],
        "trainer=fsdp", "trainer.accelerator=cpu", f"trainer.max_steps={N}", "train.checkpoint_every_n_steps=2",
        "train.keep_checkpoints=2", "train.samples=false", "prior.num_images=4", "threads=1"]


def _run(out: Path, *extra: str) -> tuple[Path, str]:
    # The text encoder is trained too, so that both kinds of trained module (diffusers' UNet, transformers' CLIP
    # text model) are sharded, gathered and exported.
    r = run_cli("dreambench.train", [*ARGS, "method.train_text_encoder=true", f"paths.output_dir={out}", *extra],
                timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    (run,) = list((out / "dog").iterdir())
    return run, r.stdout + r.stderr


def _ckpt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step={step:06d}.ckpt", weights_only=True)


def _rows(run: Path) -> list[dict]:
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_sharded_run_resumed_from_its_checkpoint_ends_bit_for_bit_where_the_uninterrupted_run_does(tmp_path):
    full, logs = _run(tmp_path / "full")
    held = {int(r): int(k.replace(",", "")) for r, k in
            re.findall(r"trainer=fsdp: rank (\d) of 2 holds unet ([\d,]+), text_encoder [\d,]+ parameters", logs)}
    total = sum(p.numel() for k, p in _ckpt(full, N)["state_dict"].items() if k.startswith("unet."))
    assert sorted(held) == [0, 1] and sum(held.values()) == total  # the UNet split in two, nothing held twice
    assert max(held.values()) < 0.55 * total
    resumed, _ = _run(tmp_path / "resumed", f'resume="{full / "checkpoints" / "step=000002.ckpt"}"')
    a, b = _ckpt(full, N), _ckpt(resumed, N)
    assert a["global_step"] == b["global_step"] == N
    assert equal(a["state_dict"], b["state_dict"])  # the trained UNet, gathered whole to rank 0
    assert equal(a["optimizer_states"], b["optimizer_states"])  # AdamW moments, gathered
    assert equal(a["lr_schedulers"], b["lr_schedulers"])
    assert equal(a["dreambench_rng"], b["dreambench_rng"])  # both ranks' RNGs
    assert len(a["dreambench_rng"]["ranks"]) == 2
    assert not equal(a["state_dict"], _ckpt(full, 2)["state_dict"])  # steps 3-4 trained something
    rows = _rows(resumed)
    assert [r["step"] for r in rows] == ["2", "3"] and rows == _rows(full)[2:]  # the same losses, to the bit
    # The export is the trained UNet and text encoder, whole (gathered to rank 0 at the end), in diffusers' format.
    from safetensors.torch import load_file
    for part in ("unet", "text_encoder"):
        (weights,) = (full / "model" / part).glob("*.safetensors")
        exported = load_file(weights)
        assert set(exported) == {k[len(part) + 1:] for k in a["state_dict"] if k.startswith(f"{part}.")}, part
        assert all(torch.equal(exported[k], a["state_dict"][f"{part}.{k}"]) for k in exported), part


def test_fsdp_refuses_what_a_sharded_model_cannot_run_in_one_message_before_models_load():
    from dreambench.errors import UserError
    from dreambench.train import check_parallel
    ok = compose(ARGS)
    check_parallel(ok)  # the test's own settings are accepted
    with pytest.raises(UserError) as e:
        check_parallel(compose([*ARGS, "method=lora", "train.samples=true", "train.ema.enabled=true"]))
    msg = str(e.value)
    assert msg.startswith("trainer=fsdp cannot run these settings")
    assert "method=lora" in msg and "train.samples=True" in msg and "train.ema.enabled=True" in msg
    assert "train.drift" not in msg  # off, so not named
    check_parallel(compose([a for a in ARGS if not a.startswith("trainer=")] + ["train.samples=true"]))  # DDP: fine
