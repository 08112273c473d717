"""Export of the image path to ONNX and torch.export: parity with PyTorch on fresh images, sizes refused clearly."""

import numpy as np
import pytest
import torch

from modeling_mrovseg import MROVSegForOpenVocabSegmentation
from modeling_mrovseg.export import ExportedSegmenter, example_inputs, export, main
from tests.helpers import tiny_config

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MROVSegForOpenVocabSegmentation(tiny_config()).eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return {fmt: export(model, 100, 150, folder / name, fmt)
            for fmt, name in (("onnx", "m.onnx"), ("torch-export", "m.pt2"))}


@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
def test_logits_and_labels_match_pytorch_on_fresh_images(model, exported, fmt):
    segmenter = ExportedSegmenter(exported[fmt])
    assert segmenter.labels == model.vocabulary
    agree = total = 0
    for seed in range(1, 4):
        inputs = example_inputs(segmenter.processor, 100, 150, seed=seed)
        class_logits, mask_logits = segmenter.logits(inputs)
        with torch.no_grad():
            reference = model(**inputs)
        assert (class_logits - reference.class_queries_logits).abs().max() <= 1e-4
        assert (mask_logits - reference.masks_queries_logits).abs().max() <= 1e-4
        image = np.random.default_rng(seed).integers(0, 256, (77, 131, 3), dtype=np.uint8)  # any size: resized
        labels = segmenter(image)
        with torch.no_grad():
            expected = segmenter.processor.post_process_semantic_segmentation(
                model(**segmenter.processor(image, return_tensors="pt")), target_sizes=[(77, 131)])[0].numpy()
        assert labels.shape == (77, 131)
        agree, total = agree + (labels == expected).sum(), total + labels.size
    assert agree / total >= 0.999


def test_other_sizes_and_foreign_files_are_refused(model, exported, tmp_path):
    from modeling_mrovseg import MROVSegImageProcessor

    segmenter = ExportedSegmenter(exported["onnx"])
    other = MROVSegImageProcessor.from_model_config(model.config, size={"height": 200, "width": 150})
    inputs = other(np.zeros((200, 150, 3), np.uint8), return_tensors="pt")
    with pytest.raises(ValueError, match=r"serves images resized to 100 x 150 \(2 x 3 slices\)"):
        segmenter.logits(inputs)
    import onnx

    plain = onnx.load(str(exported["onnx"]))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(ValueError, match="not written by modeling_mrovseg.export"):
        ExportedSegmenter(tmp_path / "plain.onnx")
    with pytest.raises(FileNotFoundError):
        ExportedSegmenter(tmp_path / "missing.onnx")
    # a file cut short (a copy or download interrupted): protobuf's DecodeError and zipfile's BadZipFile before
    for name in ("cut.onnx", "cut.pt2"):
        data = exported["onnx" if name.endswith(".onnx") else "torch-export"].read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 3])
        with pytest.raises(ValueError, match=f"{name} cannot be read as an exported model .damaged, cut short"):
            ExportedSegmenter(tmp_path / name)


def test_command_line(model, tmp_path, capsys):
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--height", "64", "--width", "64",
                 "--out", str(tmp_path / "small.pt2")]) == 0
    assert "serves images resized to 64 x 64 (1 x 1 slices)" in capsys.readouterr().out
    assert main(["--model", str(tmp_path / "nowhere"), "--height", "64", "--width", "64",
                 "--out", str(tmp_path / "x.onnx")]) == 2
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "ckpt"), "--height", "0", "--width", "64", "--out", str(tmp_path / "x.onnx")])
    # the --out suffix says how the file is read back: anything else, a conflicting --format or a folder is a usage
    # error before exporting (an ONNX file named .txt was written, then failed to load as torch.export; a folder
    # failed after the export)
    (tmp_path / "folder.onnx").mkdir()
    for out, extra, message in (("m.txt", [], "must end in .onnx"),
                                ("m.onnx", ["--format", "torch-export"], "does not match"),
                                ("folder.onnx", [], "is a folder")):
        with pytest.raises(SystemExit) as error:
            main(["--model", str(tmp_path / "ckpt"), "--height", "64", "--width", "64", "--out", str(tmp_path / out),
                  *extra])
        assert error.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m.txt").exists() and not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_saved_in_bfloat16_exports_in_float32(model, tmp_path, capsys):
    """Weights saved in bfloat16 (loaded that way for a GPU, then saved) made an ONNX file onnxruntime refused to load
    (no bfloat16 convolutions): the command line loads float32, and export() names the dtype instead."""
    import copy

    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert main(["--model", str(tmp_path / "bf16"), "--height", "64", "--width", "64",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    labels = ExportedSegmenter(tmp_path / "m.onnx")(np.zeros((64, 64, 3), np.uint8))
    assert labels.shape == (64, 64)
    with pytest.raises(ValueError, match="the model's weights are torch.bfloat16; export a float32 model"):
        export(copy.deepcopy(model).to(torch.bfloat16), 64, 64, tmp_path / "n.onnx")


@pytest.mark.parametrize("fmt,name", [("onnx", "m.onnx"), ("torch-export", "m.pt2")])
def test_a_failed_export_leaves_the_earlier_file_whole(model, exported, tmp_path, monkeypatch, fmt, name):
    """Re-exporting over a file wrote it in place: a run that failed or was killed while writing left a truncated file
    where a working one had been. The new file is written beside it and moved in when complete."""
    import shutil

    out = tmp_path / name
    shutil.copy(exported[fmt], out)
    before = out.read_bytes()

    def half_written(self_or_program, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    if fmt == "onnx":
        monkeypatch.setattr(torch.onnx.ONNXProgram, "save", half_written)
    else:
        monkeypatch.setattr(torch.export, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        export(model, 100, 150, out, fmt)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]
    monkeypatch.undo()
    assert export(model, 64, 64, out, fmt) == out
    assert ExportedSegmenter(out).describe().startswith(f"{name} serves images resized to 64 x 64")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
