"""LoRA with peft: precise targets, training that only moves LoRA and decoder weights, save/load, merge."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegProcessor
from training.lora import DECODER_MODULES, apply_lora, load_lora, merge_lora, target_pattern
from training.train import enable_activation_checkpointing
from tests.helpers import LABELS, random_image, tiny_processor

TINY = dict(num_queries=8, hidden_dim=32, num_decoder_heads=4, decoder_ffn_dim=64, train_num_points=256,
            prompt_templates=["a photo of a {}."])


@pytest.fixture()
def base(tiny_clip_dir, tiny_tokenizer):
    torch.manual_seed(0)
    return MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=LABELS, tokenizer=tiny_tokenizer,
                                                     **TINY)


def batch(config):
    label = np.zeros((96, 150), dtype=np.int64)
    label[:40] = 1
    label[60:, 50:90] = 2
    return tiny_processor(config)(random_image(96, 150), segmentation_maps=label, return_tensors="pt")


def test_targets_only_clip_attention(base):
    import re

    pattern = re.compile(target_pattern("both"))
    matched = [name for name, _ in base.named_modules() if pattern.fullmatch(name)]
    layers = base.config.vision_config.num_hidden_layers + base.config.text_config.num_hidden_layers
    assert len(matched) == 4 * layers
    assert all(name.startswith(("mrovseg.vision_model.encoder.layers.", "text_model.encoder.layers.")) for name in matched)
    assert not any(re.fullmatch(target_pattern("both"), name) for name, _ in base.named_modules()
                   if name.startswith(("mrovseg.query_decoder", "masked_attention", "mask_head")))
    with pytest.raises(ValueError, match="lora targets"):
        target_pattern("decoder")


def test_trainable_count_and_only_lora_and_decoder_change(base, capsys):
    decoder_params = sum(p.numel() for name in DECODER_MODULES for p in base.get_submodule(name).parameters())
    position = base.mrovseg.vision_model.embeddings.position_embedding.weight.numel()
    hidden, layers, rank = base.config.vision_config.hidden_size, base.config.vision_config.num_hidden_layers, 4
    model = apply_lora(base, rank=rank, targets="vision")
    expected_lora = layers * 4 * (rank * hidden + hidden * rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected_lora + decoder_params + position
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    inputs = batch(base.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(45):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert any("lora_B" in name for name in changed)
    allowed = ("lora_A", "lora_B", "modules_to_save")
    assert all(any(part in name for part in allowed) for name in changed), sorted(changed)[:5]
    frozen_clip = [name for name in before if "vision_model.encoder" in name and "lora" not in name
                   and "modules_to_save" not in name]
    assert frozen_clip and all(name not in changed for name in frozen_clip)


def test_adapter_round_trip_merge_and_pipelines(base, tiny_clip_dir, tiny_tokenizer, tmp_path):
    model = apply_lora(base, rank=4)
    inputs = batch(base.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(5):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    image_only = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.inference_mode():
        reference = model(**image_only).masks_queries_logits
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

    torch.manual_seed(123)  # a differently initialised decoder: the adapter must bring the trained one
    fresh = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=LABELS, tokenizer=tiny_tokenizer,
                                                      **TINY)
    loaded = load_lora(fresh, str(tmp_path / "adapter")).eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(**image_only).masks_queries_logits, reference, rtol=0, atol=0)
        merged = merge_lora(loaded)
        torch.testing.assert_close(merged(**image_only).masks_queries_logits, reference, rtol=1e-5, atol=1e-5)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    MROVSegProcessor(tiny_processor(merged.config), tiny_tokenizer,
                     prompt_templates=merged.config.prompt_templates).save_pretrained(tmp_path / "merged")
    plain = MROVSegForOpenVocabSegmentation.from_pretrained(tmp_path / "merged").eval()
    with torch.inference_mode():
        torch.testing.assert_close(plain(**image_only).masks_queries_logits, reference, rtol=1e-5, atol=1e-5)
    image = Image.fromarray(random_image(70, 90))
    for task, kwargs, names in (("image-segmentation", {}, set(LABELS)),
                                ("zero-shot-image-segmentation", {"candidate_labels": "a, b"}, {"a", "b"})):
        segments = pipeline(task, model=str(tmp_path / "merged"))(image, **kwargs)
        segments = segments["segments"] if isinstance(segments, dict) else segments  # zero-shot adds the label map
        masks = np.stack([np.asarray(s["mask"]) > 0 for s in segments])
        assert masks.shape[1:] == (70, 90), task  # one mask per class found, at the image's size
        assert (masks.sum(0) == 1).all(), task  # the masks partition the image
        assert {s["label"] for s in segments} <= names, task


def test_lora_with_checkpointing_and_bf16(base):
    enable_activation_checkpointing(base)
    model = apply_lora(base, rank=2, targets="both")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch(base.config)).loss
    loss.backward()
    assert loss.dtype == torch.float32 and 0 < loss.item() < 1e4
    lora_grads = {name: p.grad for name, p in model.named_parameters() if "vision_model" in name and "lora_B" in name}
    assert len(lora_grads) == 4 * base.config.vision_config.num_hidden_layers  # q, k, v, out of every layer
    assert all(g is not None and torch.isfinite(g).all() for g in lora_grads.values())
    assert all(g.abs().sum() > 0 for g in lora_grads.values()), "a LoRA matrix got no gradient through checkpointing"


def test_train_script_with_lora(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from accelerate.state import AcceleratorState

    from processing.synthetic import write_parquet
    from training import merge_lora as merge_script
    from training import train

    data = write_parquet(tmp_path / "data", num_train=4, num_val=1, height=192, width=192)
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.chdir(tiny_clip_dir.parent)  # the base by a relative path; the merge runs from elsewhere
    train.main(["--model", tiny_clip_dir.name, "--dataset", str(data), "--output_dir", str(tmp_path / "run"),
                "--max_steps", "3", "--batch_size", "2", "--crop_size", "128", "--eval_size", "128",
                "--checkpointing_steps", "3", "--lora_rank", "4", "--config", json.dumps(TINY), "--no_progress"])
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    recipe = json.loads((tmp_path / "run" / "adapter" / "mrovseg_base.json").read_text())
    assert recipe["model"] == str(tiny_clip_dir.resolve())
    monkeypatch.chdir(tmp_path)
    adapter = str(tmp_path / "run" / "adapter")
    merged_dir = merge_script.main(["--adapter", adapter, "--out", str(tmp_path / "re")])
    # never onto the adapter, the base or (unasked) a used folder; a folder that is no adapter is named
    for out in (adapter, str(tiny_clip_dir), str(tmp_path / "re")):
        with pytest.raises(SystemExit) as error:
            merge_script.main(["--adapter", adapter, "--out", out])
        assert error.value.code == 2
    with pytest.raises(SystemExit):
        merge_script.main(["--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()
    # the run folder on another machine, where the recorded base is not: named, with --base as the way on (it was
    # "cannot load --base ...: Repo id must be in the form 'repo_name'", a flag the user never gave)
    moved = json.loads((tmp_path / "run" / "adapter" / "mrovseg_base.json").read_text())
    shutil.copytree(tmp_path / "run" / "adapter", tmp_path / "moved")
    (tmp_path / "moved" / "mrovseg_base.json").write_text(json.dumps({**moved, "model": "/nowhere/tiny-clip"}))
    with pytest.raises(SystemExit) as error:
        merge_script.main(["--adapter", str(tmp_path / "moved"), "--out", str(tmp_path / "other")])
    assert error.value.code == 2 and "base model /nowhere/tiny-clip (recorded in" in capsys.readouterr().err
    assert merge_script.main(["--adapter", str(tmp_path / "moved"), "--out", str(tmp_path / "other"),
                              "--base", str(tiny_clip_dir)]) == tmp_path / "other"
    assert merge_script.main(["--adapter", adapter, "--out", str(tmp_path / "re"), "--overwrite"]) == merged_dir
    a = MROVSegForOpenVocabSegmentation.from_pretrained(tmp_path / "run" / "model")
    b = MROVSegForOpenVocabSegmentation.from_pretrained(merged_dir)
    # the adapter folder itself, directly or as transformers' auto classes and pipelines pass it (its base by name,
    # the adapter in adapter_kwargs): that loaded the base + LoRA with the base's class names, not the run's
    refused = f"{adapter} is a LoRA adapter saved by training.train, not a checkpoint: use the merged checkpoint"
    with pytest.raises(ValueError, match=re.escape(refused)):
        MROVSegForOpenVocabSegmentation.from_pretrained(adapter)
    with pytest.raises(ValueError, match=re.escape(refused)):
        MROVSegForOpenVocabSegmentation.from_pretrained(merged_dir, adapter_kwargs={"_adapter_model_path": adapter})
    from modeling_mrovseg.cli import main as cli_main

    Image.fromarray(random_image(30, 30)).save(tmp_path / "x.png")
    assert cli_main(["segment", str(tmp_path / "x.png"), "--model", adapter, "--labels", "a, b", "--out",
                     str(tmp_path / "o")]) == 2
    assert refused in capsys.readouterr().err  # was: "has no config.json: not a saved checkpoint"
    from hub_cards import push

    with pytest.raises(SystemExit) as error:
        push.main(["--checkpoint", adapter, "--repo-id", "org/name"])
    assert error.value.code == 2 and refused in capsys.readouterr().err
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
