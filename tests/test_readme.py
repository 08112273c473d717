"""The README's Python snippets run as written: only the Hub id (a tiny local CLIP instead) and the photos' files (made
here, one a phone photo stored sideways) are swapped. The "save, then pipeline" flow once failed for users while every
unit test passed; the snippets are what users copy."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def block(first_line: str) -> str:
    """The README's Python block that contains `first_line` (so a reordered README still finds its snippets)."""
    found = [code for code in python_blocks() if first_line in code]
    assert len(found) == 1, f"README has {len(found)} Python blocks with {first_line!r}"
    return found[0]


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """street.jpg as a phone stores a portrait photo (landscape pixels, EXIF orientation 6), a.jpg and b.jpg."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    street = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    exif = street.getexif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 90 x 60 upright
    street.save("street.jpg", exif=exif)
    for name, size in (("a.jpg", (40, 70)), ("b.jpg", (50, 50))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(name)
    return tmp_path


def run(code: str, namespace: dict, clip: Path) -> dict:
    exec(compile(code.replace("openai/clip-vit-base-patch16", str(clip)), "README.md", "exec"), namespace)
    return namespace


def test_use_and_pipelines_snippets(photos, tiny_clip_dir):
    """Build from CLIP, segment a phone photo, change the vocabulary, save, load with new names, save again; then
    both pipelines on the saved folder, batched and with per-image class names."""
    namespace = run(block('vocabulary=["sky", "road", "car", "sofa, couch"]'), {}, tiny_clip_dir)
    assert namespace["segmentation"].shape == (90, 60)  # the photo as shown, not as stored
    assert namespace["model"].vocabulary == ["tree", "river, stream"]
    for folder in ("my-mrovseg", "my-mrovseg-trees"):
        assert {"model.safetensors", "tokenizer.json", "processor_config.json"} <= {p.name for p in
                                                                                    Path(folder).iterdir()}
    namespace = run(block('pipeline("image-segmentation", model="my-mrovseg")'), namespace, tiny_clip_dir)
    assert {segment["label"] for segment in namespace["segments"]} <= {"cyclist", "traffic cone", "road"}
    first, second = namespace["result"]
    assert first["label_map"].shape == (40, 70) and second["label_map"].shape == (50, 50)
    assert first["labels"] == ["road", "cyclist", "sofa, couch"]


def test_export_snippet(photos, tiny_clip_dir):
    pytest.importorskip("onnxruntime")
    from modeling_mrovseg import MROVSegForOpenVocabSegmentation
    from modeling_mrovseg.export import main as export_main

    MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=["sky", "road"]).save_pretrained("m")
    export_main(["--model", "m", "--height", "64", "--width", "96", "--out", "mrovseg.onnx"])  # the README's command
    namespace = run(block("ExportedSegmenter("), {}, tiny_clip_dir)
    assert namespace["label_map"].shape == (90, 60) and set(np.unique(namespace["label_map"])) <= {0, 1}


def test_trainer_snippet(tmp_path, monkeypatch, tiny_clip_dir):
    """transformers' Trainer, as the README shows it: a few steps on a local parquet split, then the saved folder
    serves the zero-shot pipeline."""
    from transformers import pipeline

    from processing.synthetic import write_parquet

    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path / "data" / "mine", num_train=4, num_val=1, height=64, width=64)  # the main job's 5 classes
    code = block("trainer = Trainer(")
    for old, new in (('"openai/clip-vit-base-patch16",', f'{str(tiny_clip_dir)!r}, num_queries=8, hidden_dim=32, '
                                                          'num_decoder_heads=4,'),
                     ('["background", "crack", "rust"]', '["grass", "road", "building", "car", "sign"]'),
                     ("max_steps=2000", "max_steps=2"),
                     ("per_device_train_batch_size=8", "per_device_train_batch_size=2"),
                     ('"height": 640, "width": 640', '"height": 64, "width": 64')):
        assert old in code
        code = code.replace(old, new)
    namespace = run(code, {}, tiny_clip_dir)
    assert namespace["trainer"].state.global_step == 2
    assert all(np.isfinite(entry["loss"]) for entry in namespace["trainer"].state.log_history if "loss" in entry)
    saved = tmp_path / "runs" / "trainer" / "model"
    assert {"model.safetensors", "tokenizer.json", "processor_config.json"} <= {p.name for p in saved.iterdir()}
    result = pipeline("zero-shot-image-segmentation", model=str(saved))(Image.new("RGB", (50, 40)),
                                                                        candidate_labels="crack; rust")
    assert result["label_map"].shape == (40, 50)
