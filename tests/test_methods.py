"""Each method trains on the tiny model, exports its artefact, and the artefact loads back through the diffusers
API (from_pretrained / load_lora_weights / load_textual_inversion) and changes what the model generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.methods_helpers import env_defaults, render, tiny_cfg


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    env_defaults(tmp_path_factory.mktemp("methods"))


def _base(cfg):
    from dreambench.methods.runs import load_base_pipeline

    return load_base_pipeline(dict(cfg.model))


def _differs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def test_lora_trains_exports_adapter_only_and_loads_back(tmp_path):
    from dreambench.methods import load_run_pipeline
    from dreambench.train import train

    run = tmp_path / "run"
    # alpha != rank: the loader must apply alpha / rank from the file's metadata.
    cfg = tiny_cfg(
        run,
        "method=lora",
        "method.rank=4",
        "method.alpha=8",
        "method.lr=1e-2",
        "model.train_text_encoder=true",
        "train.checkpoint_every_n_steps=3",
    )
    metrics = train(cfg)
    assert metrics["method"]["name"] == "lora" and metrics["steps"] == 6
    files = sorted(p.name for p in (run / "model").iterdir())
    assert files == ["method.json", "pytorch_lora_weights.safetensors"]  # no copy of the base model
    info = json.loads((run / "model" / "method.json").read_text())
    assert info["method"] == "lora" and info["base_model"]["pretrained"] == cfg.model.pretrained

    saved = load_file(str(run / "model" / "pytorch_lora_weights.safetensors"))
    assert saved and all("lora" in k for k in saved)
    assert any(k.startswith("unet.") for k in saved) and any(k.startswith("text_encoder.") for k in saved)
    assert any(
        v.abs().max() > 0 for k, v in saved.items() if "lora.up" in k or "lora_B" in k
    )  # B moved from 0
    ckpt = torch.load(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])  # adapters only

    base = _base(cfg)
    tuned = load_run_pipeline(run)
    # The adapter really is attached with the trained scale (alpha / r = 2).
    assert tuned.unet.peft_config and next(iter(tuned.unet.peft_config.values())).lora_alpha == 8
    prompt = metrics["instance_prompt"]
    assert _differs(render(tuned, prompt), render(base, prompt)) > 1e-3
    # Unloading the adapter gives the base model back exactly: the difference is the adapter's.
    tuned.unload_lora_weights()
    np.testing.assert_array_equal(render(tuned, prompt), render(base, prompt))


def test_textual_inversion_learns_one_row_only_and_loads_back(tmp_path, monkeypatch):
    from dreambench.methods import TextualInversion, load_run_pipeline
    from dreambench.train import train

    captured = {}
    real_export = TextualInversion.export

    def export(self, module, folder):  # keep the trained module to compare every weight with the base
        captured["module"] = module
        real_export(self, module, folder)

    monkeypatch.setattr(TextualInversion, "export", export)
    run = tmp_path / "run"
    cfg = tiny_cfg(run, "method=textual_inversion", "train.checkpoint_every_n_steps=3")
    metrics = train(cfg)
    assert metrics["identifier"] == "<sks>" and metrics["instance_prompt"] == "a <sks> dog"

    m, base = captured["module"], _base(cfg)
    tid = m.method.token_id
    assert tid == len(base.tokenizer)  # one new row, appended
    for name in ("unet", "vae"):
        got, ref = getattr(m, name).state_dict(), getattr(base, name).state_dict()
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k].cpu(), ref[k]), f"{name}.{k} changed"
    got, ref = m.text_encoder.state_dict(), base.text_encoder.state_dict()
    emb_key = next(k for k in ref if k.endswith("token_embedding.weight"))
    for k in ref:
        if k != emb_key:
            assert torch.equal(got[k].cpu(), ref[k]), f"text_encoder.{k} changed"
    assert torch.equal(got[emb_key][:tid].cpu(), ref[emb_key])  # every old row bit-identical
    init = ref[emb_key][base.tokenizer("dog", add_special_tokens=False).input_ids].mean(0)
    learned = got[emb_key][tid].cpu()
    assert not torch.allclose(learned, init)  # the new row was trained

    # Checkpoints keep only the embedding matrix; the export is the one row in diffusers' format.
    ckpt = torch.load(next((run / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    assert list(ckpt["state_dict"]) == [f"text_encoder.{emb_key}"]
    # ...with the old rows as they are, not as the step's weight decay left them before they were copied back
    # (a resumed run's first step reads them): seen failing when the copy ran after the checkpoint callback.
    assert torch.equal(ckpt["state_dict"][f"text_encoder.{emb_key}"][:tid], ref[emb_key])
    saved = load_file(str(run / "model" / "learned_embeds.safetensors"))
    assert list(saved) == ["<sks>"] and torch.equal(saved["<sks>"][0], learned)

    tuned = load_run_pipeline(run)
    assert tuned.tokenizer.convert_tokens_to_ids("<sks>") == tid
    torch.testing.assert_close(tuned.text_encoder.get_input_embeddings().weight[tid], learned, rtol=0, atol=0)
    prompt = metrics["instance_prompt"]
    trained = render(tuned, prompt)
    assert _differs(trained, render(base, prompt)) > 1e-3
    np.testing.assert_array_equal(render(tuned, "a dog"), render(base, "a dog"))  # no token: the base model
    # With the row put back to its initial value the image changes: the learned row makes the difference.
    with torch.no_grad():
        tuned.text_encoder.get_input_embeddings().weight[tid] = init
    assert _differs(render(tuned, prompt), trained) > 1e-3


def test_dreambooth_run_loads_through_the_same_function(tmp_path):
    from dreambench.methods import load_run_pipeline
    from dreambench.train import train

    run = tmp_path / "run"
    cfg = tiny_cfg(run, "method=dreambooth", "trainer.max_steps=3", "data.identifier=rare")
    metrics = train(cfg)
    assert (run / "model" / "model_index.json").is_file()
    # data.identifier=rare: the picked token (paper §3.2), not the word "rare", is what the run used and recorded.
    ident = metrics["identifier"]
    assert ident != "rare" and metrics["instance_prompt"] == f"a {ident} dog"
    assert json.loads((run / "metrics.json").read_text())["identifier"] == ident
    tuned = load_run_pipeline(run)
    prompt = metrics["instance_prompt"]
    assert _differs(render(tuned, prompt), render(_base(cfg), prompt)) > 1e-3


def test_textual_inversion_refuses_an_existing_token(tmp_path):
    from dreambench.train import train

    # "dog" is a word of the tokenizer: adding it as the new token would silently shadow it.
    with pytest.raises(ValueError, match="already in the tokenizer"):
        train(tiny_cfg(tmp_path / "run", "method=textual_inversion", "method.placeholder=dog"))


def test_load_run_pipeline_says_what_is_missing(tmp_path):
    from dreambench.methods import load_run_pipeline

    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="neither model_index.json nor method.json"):
        load_run_pipeline(tmp_path)
    (tmp_path / "model" / "method.json").write_text(json.dumps({"method": "hypernetwork", "base_model": {}}))
    with pytest.raises(ValueError, match="unknown method 'hypernetwork'"):
        load_run_pipeline(tmp_path)
