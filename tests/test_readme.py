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
    """transformers' Trainer, as the README shows it: a few steps on a local parquet dataset with the mean IoU at each
    evaluation, equal to `evaluate_segmentation`'s on the same images; resumed from a checkpoint, the same weights;
    the saved folder serves the zero-shot pipeline."""
    import evaluate
    import torch
    from transformers import pipeline

    from modeling_mrovseg import MEAN_IOU
    from processing.synthetic import write_parquet
    from training.evaluation import evaluate_segmentation

    monkeypatch.chdir(tmp_path)
    write_parquet(tmp_path / "data" / "mine", num_train=4, num_val=3, height=64, width=64)  # the main job's 5 classes
    code = block("trainer = Trainer(")
    for old, new in (('"openai/clip-vit-base-patch16",', f'{str(tiny_clip_dir)!r}, num_queries=8, hidden_dim=32, '
                                                          'num_decoder_heads=4,'),
                     ('["background", "crack", "rust"]', '["grass", "road", "building", "car", "sign"]'),
                     ("max_steps=2000", "max_steps=2"),
                     ("per_device_train_batch_size=8", "per_device_train_batch_size=2, save_steps=1"),
                     ("eval_steps=500", "eval_steps=1"),
                     ('"height": 640, "width": 640', '"height": 64, "width": 64')):
        assert old in code
        code = code.replace(old, new)
    namespace = run(code, {}, tiny_clip_dir)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2
    assert all(np.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)
    scores = [entry for entry in trainer.state.log_history if "eval_mean_iou" in entry]
    assert [entry["step"] for entry in scores] == [1, 2]
    validation = namespace["data"]["validation"]
    squeezed = [{"image": row["image"].resize((64, 64)), "label": row["label"].resize((64, 64), Image.NEAREST)}
                for row in validation]  # what the collator makes of them
    expected = evaluate_segmentation(trainer.model, namespace["crops"], squeezed, ["grass", "road", "building", "car",
                                     "sign"], evaluate.load(MEAN_IOU), show_progress=False)
    assert scores[-1]["eval_mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-12)
    assert scores[-1]["eval_overall_accuracy"] == pytest.approx(expected["overall_accuracy"], abs=1e-12)
    streamed = trainer.evaluate()  # batch_eval_metrics=True; the same without it
    trainer.args.batch_eval_metrics = False
    assert trainer.evaluate()["eval_mean_iou"] == pytest.approx(streamed["eval_mean_iou"], abs=1e-12)
    crops = namespace["crops"]  # predict on images alone: the post-processed class ids
    trainer.data_collator = lambda rows: crops([row["image"] for row in rows], return_tensors="pt")
    predicted = trainer.predict(validation.remove_columns("label")).predictions
    for row, ids in zip(squeezed, predicted):
        with torch.no_grad():
            expected = crops.post_process_semantic_segmentation(trainer.model(**crops(row["image"],
                                                                                     return_tensors="pt")))[0]
        np.testing.assert_array_equal(ids[:64, :64], expected.numpy())

    # resumed from step 1: the weights of the uninterrupted run
    (tmp_path / "again").mkdir()
    import shutil

    shutil.copytree(tmp_path / "runs" / "trainer" / "checkpoint-1", tmp_path / "again" / "checkpoint-1")
    code = code.replace('"runs/trainer"', '"again"').replace("trainer.train()",
                                                             "trainer.train(resume_from_checkpoint=True)")
    code = code.replace('trainer.save_model("runs/trainer/model")', "")
    resumed = run(code, {}, tiny_clip_dir)["trainer"].model.state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)

    saved = tmp_path / "runs" / "trainer" / "model"
    assert {"model.safetensors", "tokenizer.json", "processor_config.json"} <= {p.name for p in saved.iterdir()}
    result = pipeline("zero-shot-image-segmentation", model=str(saved))(Image.new("RGB", (50, 40)),
                                                                        candidate_labels="crack; rust")
    assert result["label_map"].shape == (40, 50)


def test_trainer_mean_iou_refuses_labels_of_another_vocabulary():
    """A label value that is neither a class id nor unlabelled is named, as in `training.evaluate`; Trainer's padding
    (-100) and the unlabelled value are not counted."""
    from types import SimpleNamespace

    from training.evaluation import trainer_mean_iou

    compute = trainer_mean_iou(SimpleNamespace(id2label={0: "a", 1: "b"}, ignore_index=255))["compute_metrics"]
    labels = np.array([[[0, 1, 255, -100]]])
    scores = compute(SimpleNamespace(predictions=np.array([[[0, 0, 1, -100]]]), label_ids=labels))
    assert scores == {"mean_iou": 0.25, "mean_accuracy": 0.5, "overall_accuracy": 0.5}
    for streamed in (False, True):  # a refused batch leaves nothing behind for the next evaluation
        if streamed:
            compute(SimpleNamespace(predictions=np.array([[[1, 1]]]), label_ids=np.array([[[0, 0]]])),
                    compute_result=False)
        with pytest.raises(ValueError, match=r"evaluation labels hold values \[2, 7\], neither class ids 0..1 of "
                                             r"the model's 2 classes nor unlabelled \(255\)"):
            compute(SimpleNamespace(predictions=np.zeros((1, 2, 3), int), label_ids=np.array([[[0, 0, 0], [2, 7, 0]]])))
        assert compute(SimpleNamespace(predictions=np.array([[[0, 0, 1, -100]]]), label_ids=labels)) == scores


def test_dependency_floors_agree_across_pyproject_the_floor_run_and_the_version_check():
    """pyproject.toml said transformers>=5.0 while the code needed 5.21: the floors, the versions
    scripts/test_floor.sh runs the suite against and the remote code's own check must say the same."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    from modeling_mrovseg.configuration_mrovseg import MIN_TRANSFORMERS

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    root = Path(__file__).resolve().parents[1]
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for requirement in map(Requirement, dependencies):
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        floors[requirement.name] = Version(lower[0]) if lower else None
    pinned = [Requirement(line) for line in (root / "scripts" / "floor_constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert {r.name for r in pinned} >= {"transformers", "accelerate", "datasets"}
    for requirement in pinned:
        assert floors[requirement.name] == Version(next(iter(requirement.specifier)).version), requirement
    assert floors["transformers"] == Version(".".join(map(str, MIN_TRANSFORMERS)))
