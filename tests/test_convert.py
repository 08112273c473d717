"""Each converter on a tiny fixture in its raw format, read back through the training loader."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from training.data import as_arrays, load_segmentation_dataset
from processing import convert
from processing.class_names import ADE20K_150, COCO_STUFF_171, PASCAL_CONTEXT_59, PASCAL_VOC_20, PASCAL_VOC_21

ROOT = Path(__file__).resolve().parents[1]


def image(height=12, width=16, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def read_back(out, split="validation"):
    dataset, names = load_segmentation_dataset(str(out), split)
    return [as_arrays(row)[1] for row in dataset], names


def write_table(folder, split, label_column, labels):
    import datasets

    rows = {"image": [image(*lab.shape, seed=i) for i, lab in enumerate(labels)],
            label_column: [Image.fromarray(lab.astype(np.uint8)) for lab in labels]}
    features = datasets.Features({"image": datasets.Image(), label_column: datasets.Image()})
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))


def test_coco_stuff_ids_to_171_classes(tmp_path, capsys):
    raw = np.array([[0, 255, 12, 89], [91, 181, 255, 0]] * 3, dtype=np.int64)
    write_table(tmp_path / "raw", "validation", "mask", [raw])
    convert.convert_coco_stuff(str(tmp_path / "raw"), tmp_path / "out", "validation")
    (label,), names = read_back(tmp_path / "out")
    assert names == COCO_STUFF_171 and len(names) == 171
    # 0 person -> 0; 255 unlabelled; 12 (stop sign) -> 11; 89 (toothbrush) -> 79; 91 (banner) -> 80; 181 (wood) -> 170
    assert label[0].tolist() == [0, 255, 11, 79] and label[1].tolist() == [80, 170, 255, 0]
    assert names[11] == "stop sign" and names[79] == "toothbrush" and names[80] == "banner" and names[170] == "wood"
    # masks in another id scheme (contiguous 0..170, or 1-based) hold ids the raw scheme never uses (11, 90, 182):
    # refused, not shifted class by class with those pixels unlabelled
    for other in (11, 90, 182):
        write_table(tmp_path / f"other{other}", "validation", "mask", [np.full((4, 4), other)])
        fails_with(capsys, ["coco-stuff", "--source", str(tmp_path / f"other{other}"), "--out", str(tmp_path / "o"),
                            "--splits", "validation"], f"holds mask values [{other}], which are no ids of this source")


def test_ade20k_150_reduces_labels(tmp_path):
    raw = np.array([[0, 1, 150, 75]] * 4)
    write_table(tmp_path / "raw" / "data", "validation", "annotation", [raw])
    convert.convert_ade20k_150(str(tmp_path / "raw"), tmp_path / "out", "validation")
    (label,), names = read_back(tmp_path / "out")
    assert names == ADE20K_150 and label[0].tolist() == [255, 0, 149, 74]
    # splits as datasets finds them: "pretrain" files are no "train" split (a substring match took them)
    write_table(tmp_path / "raw" / "data", "pretrain", "annotation", [raw, raw])
    with pytest.raises(FileNotFoundError, match=r"no parquet file for split 'train' in .*Should be one of"):
        convert.convert_ade20k_150(str(tmp_path / "raw"), tmp_path / "out2", "train")
    write_table(tmp_path / "reduced", "validation", "annotation", [np.full((4, 4), 255)])  # labels reduced already
    with pytest.raises(ValueError, match=r"holds mask values \[255\]"):
        convert.convert_ade20k_150(str(tmp_path / "reduced"), tmp_path / "out2", "validation")


def test_ade20k_847_from_raw_files(tmp_path):
    folder = tmp_path / "ADE20K_2021_17_01" / "images" / "ADE" / "validation" / "cultural" / "apse"
    folder.mkdir(parents=True)
    image(4, 4).save(folder / "ADE_val_00000001.jpg")
    seg = np.zeros((4, 4, 3), dtype=np.uint8)
    seg[0, :] = (10, 5, 0)   # class 1 * 256 + 5 = 261
    seg[1, :] = (0, 7, 0)    # class 7
    seg[2, :] = (20, 0, 0)   # class 512: not in the list
    Image.fromarray(seg).save(folder / "ADE_val_00000001_seg.png")
    (tmp_path / "list.tsv").write_text("7\twall\n261\tbuilding, edifice\n")
    convert.convert_ade20k_847(str(tmp_path / "ADE20K_2021_17_01"), tmp_path / "out", "validation",
                               str(tmp_path / "list.tsv"))
    (label,), names = read_back(tmp_path / "out")
    assert names == ["wall", "building, edifice"]
    assert label[:, 0].tolist() == [1, 0, 255, 255]


def pascal_context_fixture(root):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "trainval").mkdir()
    names = ["accordion", "aeroplane"] + [n for n in PASCAL_CONTEXT_59 if n != "aeroplane"] + ["zebra"]
    (root / "labels.txt").write_text("".join(f"{i + 1}: {name}\n" for i, name in enumerate(names)))
    (root / "val.txt").write_text("2008_000002\n")
    image(3, 4).save(root / "JPEGImages" / "2008_000002.jpg")
    label = np.array([[0, 1, 2, 3], [61, 2, 2, 2], [1, 1, 1, 1]])  # 0 unlabelled, 1 accordion, 2 aeroplane, 3 bag
    savemat(str(root / "trainval" / "2008_000002.mat"), {"LabelMap": label.astype(np.uint16)})
    return names


@pytest.mark.parametrize("variant", [59, 459])
def test_pascal_context(tmp_path, variant):
    names = pascal_context_fixture(tmp_path / "VOC2010")
    convert.convert_pascal_context(str(tmp_path / "VOC2010"), tmp_path / "out", "validation", variant)
    (label,), got = read_back(tmp_path / "out")
    if variant == 459:
        assert got == names and label[0].tolist() == [255, 0, 1, 2] and label[1, 0] == 60
    else:
        assert got == PASCAL_CONTEXT_59
        assert label[0].tolist() == [255, 255, 0, 1] and label[1, 0] == 255  # accordion / zebra not in PC-59


@pytest.mark.parametrize("variant,expected,names", [(21, [0, 1, 20, 255], PASCAL_VOC_21),
                                                    (20, [255, 0, 19, 255], PASCAL_VOC_20)])
def test_pascal_voc(tmp_path, variant, expected, names):
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
    image(2, 4).save(root / "JPEGImages" / "2007_000033.jpg")
    palette_label = Image.fromarray(np.array([[0, 1, 20, 255]] * 2, dtype=np.uint8), mode="P")
    palette_label.putpalette([0, 0, 0, 128, 0, 0] * 128)
    palette_label.save(root / "SegmentationClass" / "2007_000033.png")
    convert.convert_pascal_voc(str(root), tmp_path / "out", "validation", variant)
    (label,), got = read_back(tmp_path / "out")
    assert got == names and label[0].tolist() == expected


def fails_with(capsys, argv, message: str) -> None:
    """A conversion that cannot run ends with one line naming the problem (exit status 1), not a traceback."""
    with pytest.raises(SystemExit) as error:
        convert.main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after datasets' progress bars
    assert error.value.code == 1 and last.startswith("error: ") and message in last and "is unchanged." in last, last
    assert ".;" not in last, last  # a message ending in a period, then "; ... is unchanged"


def test_cli_and_missing_source(tmp_path, capsys):
    fails_with(capsys, ["pascal-voc", "--source", str(tmp_path), "--variant", "20", "--out", str(tmp_path / "o")],
               "split list")
    fails_with(capsys, ["folder", "--source", str(tmp_path / "nowhere"), "--class-names", "a,b", "--out",
                        str(tmp_path / "o")], "nowhere not found")
    fails_with(capsys, ["folder", "--source", str(tmp_path), "--class-names", "a,b", "--out",
                        str(tmp_path / "o")], "has no images/ folder")
    assert not (tmp_path / "o").exists()


def own_folder(root, suffix: str):
    """my_data/images/img{i}.<suffix> (8 x 10) with label PNGs of class i % 3, as a user's folder dataset."""
    for sub in ("images", "labels"):
        (root / "mine" / sub).mkdir(parents=True)
    for i in range(5):
        image(8, 10, seed=i).save(root / "mine" / "images" / f"img{i}.{suffix}")
        Image.fromarray(np.full((8, 10), i % 3, dtype=np.uint8)).save(root / "mine" / "labels" / f"img{i}.png")


def test_own_folder_of_images_and_label_pngs(tmp_path, capsys):
    own_folder(tmp_path, "jpg")
    convert.main(["folder", "--source", str(tmp_path / "mine"), "--class-names", "background, crack, rust",
                  "--val-fraction", "0.2", "--out", str(tmp_path / "out")])
    train, names = read_back(tmp_path / "out", "train")
    validation, _ = read_back(tmp_path / "out", "validation")
    assert names == ["background", "crack", "rust"] and len(train) == 4 and len(validation) == 1
    (tmp_path / "mine" / "labels" / "img0.png").unlink()
    Image.fromarray(np.full((8, 10), 7, dtype=np.uint8)).save(tmp_path / "mine" / "labels" / "img0.png")
    fails_with(capsys, ["folder", "--source", str(tmp_path / "mine"), "--class-names", "a,b,c", "--out",
                        str(tmp_path / "bad")], "outside 0..2")
    colour = np.zeros((8, 10, 3), dtype=np.uint8)
    colour[:4] = 255  # white on black: 0 and 255 only, as a colour mask of one class often is
    Image.fromarray(colour).save(tmp_path / "mine" / "labels" / "img0.png")
    fails_with(capsys, ["folder", "--source", str(tmp_path / "mine"), "--class-names", "a,b,c", "--out",
                        str(tmp_path / "bad")], "is grey in 3 channels and holds 255: class ids with 255 unlabelled, "
               "or a white-on-black colour mask?")
    colour[:4] = (200, 30, 30)
    Image.fromarray(colour).save(tmp_path / "mine" / "labels" / "img0.png")
    fails_with(capsys, ["folder", "--source", str(tmp_path / "mine"), "--class-names", "a,b,c", "--out",
                        str(tmp_path / "bad")], "has 3 channels (a colour mask?)")
    # images in sub-folders, labels at the same place below labels/ (only the top folder's were read: the others
    # were left out without a word, or "missing []" when all were in sub-folders)
    (tmp_path / "nested" / "images" / "day1").mkdir(parents=True)
    (tmp_path / "nested" / "labels" / "day1").mkdir(parents=True)
    for i, where in enumerate(("", "day1/")):
        image(8, 10, seed=i).save(tmp_path / "nested" / "images" / f"{where}img.jpg")  # one name in two folders
        Image.fromarray(np.full((8, 10), i, dtype=np.uint8)).save(tmp_path / "nested" / "labels" / f"{where}img.png")
    convert.main(["folder", "--source", str(tmp_path / "nested"), "--class-names", "a, b", "--val-fraction", "0",
                  "--out", str(tmp_path / "nested_out")])
    nested, _ = read_back(tmp_path / "nested_out", "train")
    assert sorted(int(label[0, 0]) for label in nested) == [0, 1]
    # labels saved as JPEG: named as such (it said only that labels/img0.png was missing)
    (tmp_path / "mine" / "labels" / "img0.png").rename(tmp_path / "mine" / "labels" / "img0.jpg")
    fails_with(capsys, ["folder", "--source", str(tmp_path / "mine"), "--class-names", "a,b,c", "--out",
                        str(tmp_path / "bad")], "labels such as img0.jpg are JPEGs")


def test_folder_labels_named_apart_from_their_images_and_grey_labels_saved_as_rgb(tmp_path, capsys):
    """Labels named `<image>_mask.png` (and DeepGlobe's 119_sat.jpg / 119_mask.png) pair with their images by that
    shared ending, with a note (each image was "missing" its label); a grey label map saved as RGB (cv2.imwrite of a
    3-channel array) reads as its one channel, as training reads it (it was refused as a colour mask)."""
    for layout, (image_ending, label_ending) in {"mask": ("", "_mask"), "deepglobe": ("_sat", "_mask")}.items():
        root = tmp_path / layout
        for sub in ("images", "labels"):
            (root / sub / "b1").mkdir(parents=True)
        for i in range(4):
            where = "b1/" if i % 2 else ""
            image(8, 10, seed=i).save(root / "images" / f"{where}{i + 100}{image_ending}.jpg")
            grey = np.full((8, 10, 3), i % 3, dtype=np.uint8)
            Image.fromarray(grey).save(root / "labels" / f"{where}{i + 100}{label_ending}.png")
        Image.fromarray(np.zeros((8, 10), np.uint8)).save(root / "labels" / "legend.png")  # not a label of one
        convert.main(["folder", "--source", str(root), "--class-names", "a, b, c", "--val-fraction", "0",
                      "--out", str(tmp_path / f"{layout}_out")])
        assert (f"labels are paired with images by name as 100{image_ending}.jpg -> 100{label_ending}.png"
                in capsys.readouterr().err)
        train, _ = read_back(tmp_path / f"{layout}_out", "train")
        assert sorted(int(label[0, 0]) for label in train) == [0, 0, 1, 2] and train[0].shape == (8, 10)
    (tmp_path / "mask" / "labels" / "102_mask.png").rename(tmp_path / "mask" / "labels" / "102_label.png")
    fails_with(capsys, ["folder", "--source", str(tmp_path / "mask"), "--class-names", "a,b,c", "--out",
                        str(tmp_path / "bad")], "missing ['")  # endings that differ pair nothing
    # white on black in 3 equal channels is a one-class mask with --binary-masks
    for i, path in enumerate(sorted((tmp_path / "deepglobe" / "labels").rglob("*.png"))):
        Image.fromarray(np.repeat(np.array([[0] * 10, [255] * 10] * 4, np.uint8)[..., None], 3, axis=2)).save(path)
    convert.main(["folder", "--source", str(tmp_path / "deepglobe"), "--class-names", "land, water",
                  "--binary-masks", "--val-fraction", "0", "--out", str(tmp_path / "binary_out")])
    train, _ = read_back(tmp_path / "binary_out", "train")
    assert all(label[:, 0].tolist() == [0, 1] * 4 for label in train)


def test_folder_of_phone_photos_in_heic(tmp_path, capsys):
    """A dataset of iPhone photos (HEIC, rotated by the file's transform) labelled upright: converted, each photo
    stored as the PNG the model reads; a damaged one is named."""
    import datasets
    import pillow_heif

    pillow_heif.register_heif_opener()  # to write them
    for folder in ("images", "labels"):
        (tmp_path / "phone" / folder).mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 10 wide and 8 tall, shown 8 wide and 10 tall
    pixels = [np.asarray(image(8, 10, seed=i)) for i in range(2)]
    for i, stored in enumerate(pixels):
        Image.fromarray(stored).save(tmp_path / "phone" / "images" / f"IMG_{i}.HEIC", format="HEIF",
                                     exif=exif.tobytes(), quality=100)
        Image.fromarray(np.full((10, 8), i, dtype=np.uint8)).save(tmp_path / "phone" / "labels" / f"IMG_{i}.png")
    convert.main(["folder", "--source", str(tmp_path / "phone"), "--class-names", "a, b", "--val-fraction", "0",
                  "--out", str(tmp_path / "out")])
    dataset, _ = load_segmentation_dataset(str(tmp_path / "out"), "train")
    for row in dataset:
        photo, label = as_arrays(row)
        assert photo.shape == (10, 8, 3) and label.shape == (10, 8)  # upright, as the labels were drawn
    stored = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    assert all(cell["bytes"].startswith(b"\x89PNG") for cell in stored)  # readable wherever pillow-heif is not
    (tmp_path / "phone" / "images" / "IMG_1.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    fails_with(capsys, ["folder", "--source", str(tmp_path / "phone"), "--class-names", "a, b", "--out",
                        str(tmp_path / "bad")],
               "IMG_1.HEIC cannot be read as an image: a HEIC/HEIF file that pillow-heif cannot decode")


def test_colour_coded_labels_and_a_cvat_export(tmp_path, capsys):
    """Annotation tools export colour-coded masks (CVAT's "Segmentation mask": JPEGImages/, SegmentationClass/ of RGB
    PNGs and a labelmap.txt): "has 3 channels (a colour mask?)" was the end of the road. A CVAT export converts as
    it is, names and colours from its labelmap.txt; colours can be given for images/ + labels/ too (a colour named
    void is left unlabelled), and a colour the map lacks is named with its pixel count."""
    export = tmp_path / "cvat"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (export / folder).mkdir(parents=True)
    (export / "labelmap.txt").write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncar:250,50,83::\n"
                                         "person:51,221,255::\n")
    expected = []
    for i in range(3):
        image(8, 10, seed=i).save(export / "JPEGImages" / f"frame_{i}.jpg")
        ids = np.zeros((8, 10), np.int64)
        ids[: 2 + i] = 1
        ids[6:, :3] = 2
        colours = np.array([(0, 0, 0), (250, 50, 83), (51, 221, 255)], np.uint8)[ids]
        Image.fromarray(colours).save(export / "SegmentationClass" / f"frame_{i}.png")
        expected.append(ids)
    convert.main(["folder", "--source", str(export), "--val-fraction", "0", "--out", str(tmp_path / "out")])
    labels, names = read_back(tmp_path / "out", "train")
    assert names == ["background", "car", "person"]
    assert sorted(label.tolist() for label in labels) == sorted(ids.tolist() for ids in expected)

    mine = tmp_path / "mine"  # images/ + labels/ with colours given inline, one of them "void"
    (mine / "images").mkdir(parents=True)
    (mine / "labels").mkdir()
    image(8, 10).save(mine / "images" / "a.png")
    colours = np.zeros((8, 10, 3), np.uint8)
    colours[:4] = (255, 0, 0)
    colours[:, -2:] = (224, 224, 192)  # VOC's boundary colour
    Image.fromarray(colours).save(mine / "labels" / "a.png")
    spec = '{"sky": [0, 0, 0], "crack": [255, 0, 0], "void": [224, 224, 192]}'
    assert convert.color_classes(convert.read_label_colors("sky:0,0,0::\ncar:1,1,1::\ncar:2,2,2::")) == ["sky", "car"]
    convert.main(["folder", "--source", str(mine), "--label-colors", spec, "--val-fraction", "0", "--out",
                  str(tmp_path / "mine_out")])
    (label,), names = read_back(tmp_path / "mine_out", "train")
    assert names == ["sky", "crack"] and label[0, 0] == 1 and label[7, 0] == 0 and (label[:, -2:] == 255).all()
    colours[0, 0] = (254, 0, 0)  # an anti-aliased edge
    Image.fromarray(colours).save(mine / "labels" / "a.png")
    fails_with(capsys, ["folder", "--source", str(mine), "--label-colors", spec, "--out", str(tmp_path / "bad")],
               "a.png has colours that --label-colors does not name: (254, 0, 0) (1 pixels)")
    fails_with(capsys, ["folder", "--source", str(mine), "--label-colors", spec, "--class-names", "sky, road", "--out",
                        str(tmp_path / "bad")], "--class-names ['sky', 'road'] differ from the label colours' classes")
    fails_with(capsys, ["folder", "--source", str(mine), "--out", str(tmp_path / "bad")],
               "no class names for")
    fails_with(capsys, ["folder", "--source", str(mine), "--class-names", "sky, crack", "--out", str(tmp_path / "bad")],
               "or give their colours with --label-colors")


def test_a_roboflow_export_converts_with_its_splits_and_classes(tmp_path, capsys):
    """Roboflow's "Semantic Segmentation Masks" export (train/, valid/, test/, each image beside its <stem>_mask.png
    of class ids, and a _classes.csv) was "has no images/ folder": it converts with its own splits and class names."""
    export = tmp_path / "roboflow"
    expected = {}
    for folder, count in (("train", 3), ("valid", 2)):
        (export / folder).mkdir(parents=True)
        (export / folder / "_classes.csv").write_text("Pixel Value, Class\n0, background\n1, pothole\n")
        for i in range(count):
            stem = f"road{i}_jpg.rf.{folder}{i}"  # Roboflow's names
            image(8, 10, seed=i).save(export / folder / f"{stem}.jpg")
            mask = np.zeros((8, 10), np.uint8)
            mask[: i + 1] = 1
            Image.fromarray(mask).save(export / folder / f"{stem}_mask.png")
            expected.setdefault(folder, []).append(mask.tolist())
    convert.main(["folder", "--source", str(export), "--out", str(tmp_path / "out")])
    assert "is a Roboflow export: its own splits and _classes.csv are used" in capsys.readouterr().err
    train, names = read_back(tmp_path / "out", "train")
    validation, _ = read_back(tmp_path / "out", "validation")
    assert names == ["background", "pothole"]
    assert sorted(label.tolist() for label in train) == sorted(expected["train"])
    assert sorted(label.tolist() for label in validation) == sorted(expected["valid"])
    (export / "valid" / "_classes.csv").write_text("Pixel Value, Class\n0, background\n1, crack\n")
    fails_with(capsys, ["folder", "--source", str(export), "--out", str(tmp_path / "bad")],
               "_classes.csv of")
    (export / "valid" / "_classes.csv").write_text("Pixel Value, Class\n0, background\n1, pothole\n")
    (export / "train" / "road0_jpg.rf.train0.jpg").unlink()
    fails_with(capsys, ["folder", "--source", str(export), "--out", str(tmp_path / "bad")],
               "road0_jpg.rf.train0_mask.png has no image road0_jpg.rf.train0.<jpg|png> beside it")


def coco_file(images: list[tuple[int, str, int, int]], annotations: list[dict], categories=None) -> dict:
    categories = categories or [{"id": 0, "name": "walls", "supercategory": "none"},  # Roboflow's project entry
                                {"id": 1, "name": "crack", "supercategory": "walls"},
                                {"id": 3, "name": "rust", "supercategory": "walls"}]
    return {"images": [{"id": i, "file_name": name, "height": h, "width": w} for i, name, h, w in images],
            "annotations": [{"id": k, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
            "categories": categories}


def test_coco_annotations_polygons_and_rle_become_label_maps(tmp_path, capsys):
    """COCO instance annotations, as CVAT, Roboflow and Label Studio export them (polygons, compressed and
    uncompressed RLE, category ids with gaps): each pixel the class of the annotation on top, smaller over larger."""
    import json

    from pycocotools import mask as coco_mask

    source = tmp_path / "cvat"
    (source / "images").mkdir(parents=True)
    (source / "annotations").mkdir()
    for name in ("a.jpg", "b.png"):
        image(10, 12).save(source / "images" / name)
    rust = np.zeros((10, 12), np.uint8, order="F")
    rust[6:9, 1:4] = 1
    compressed = coco_mask.encode(rust)
    compressed["counts"] = compressed["counts"].decode()  # as JSON holds it
    flat = rust.flatten(order="F")  # uncompressed RLE: run lengths, column-major, starting with zeros
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    annotations = [
        {"image_id": 1, "category_id": 1, "segmentation": [[0, 0, 12, 0, 12, 10, 0, 10]], "area": 120},  # all
        {"image_id": 1, "category_id": 3, "segmentation": compressed, "area": 9},  # on top of the larger crack
        {"image_id": 2, "category_id": 3, "segmentation": {"size": [10, 12], "counts": runs}, "iscrowd": 1},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 2, 2]},  # a box alone labels nothing
    ]
    data = coco_file([(1, "a.jpg", 10, 12), (2, "b.png", 10, 12)], annotations)
    (source / "annotations" / "instances_default.json").write_text(json.dumps(data))
    convert.main(["coco", "--source", str(source), "--out", str(tmp_path / "out"), "--val-fraction", "0"])
    assert "pixels outside every annotation are unlabelled (255)" in capsys.readouterr().err
    labels, names = read_back(tmp_path / "out", "train")
    assert names == ["crack", "rust"]  # in id order, Roboflow's project entry left out
    first = np.zeros((10, 12), np.int64)
    first[rust.astype(bool)] = 1
    second = np.where(rust.astype(bool), 1, 255)
    assert [label.tolist() for label in labels] == [first.tolist(), second.tolist()]
    # --background: a class for the pixels no annotation covers
    convert.main(["coco", "--source", str(source), "--out", str(tmp_path / "bg"), "--background", "wall",
                  "--val-fraction", "0"])
    labels, names = read_back(tmp_path / "bg", "train")
    assert names == ["wall", "crack", "rust"] and labels[1].tolist() == np.where(rust.astype(bool), 2, 0).tolist()
    (source / "images" / "b.png").unlink()
    fails_with(capsys, ["coco", "--source", str(source), "--out", str(tmp_path / "bad")], "names the image b.png")
    broken = {**data, "annotations": [{"image_id": 1, "segmentation": []}]}
    (source / "annotations" / "instances_default.json").write_text(json.dumps(broken))
    fails_with(capsys, ["coco", "--source", str(source), "--out", str(tmp_path / "bad")],
               "an entry of its annotations lacks category_id")
    import importlib.util

    find_spec = importlib.util.find_spec  # where pycocotools is not installed: one line saying what to install
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "pycocotools" else
                      find_spec(name, *rest))
        fails_with(capsys, ["coco", "--source", str(source), "--out", str(tmp_path / "bad")],
                   "pip install pycocotools")


def test_a_roboflow_coco_export_converts_with_its_splits(tmp_path, capsys):
    import json

    export = tmp_path / "roboflow-coco"
    for folder, count in (("train", 2), ("valid", 1)):
        (export / folder).mkdir(parents=True)
        entries = [(i, f"p{i}_jpg.rf.{folder}.jpg", 8, 10) for i in range(count)]
        for _, name, h, w in entries:
            image(h, w).save(export / folder / name)
        annotations = [{"image_id": i, "category_id": 1, "segmentation": [[0, 0, 10, 0, 10, 4, 0, 4]]}
                       for i in range(count)]
        (export / folder / "_annotations.coco.json").write_text(json.dumps(coco_file(entries, annotations)))
    convert.main(["coco", "--source", str(export), "--out", str(tmp_path / "out"), "--background", "road"])
    train, names = read_back(tmp_path / "out", "train")
    validation, _ = read_back(tmp_path / "out", "validation")
    assert names == ["road", "crack", "rust"] and len(train) == 2 and len(validation) == 1
    assert "1 class(es) appear in no label: rust" in capsys.readouterr().err
    assert validation[0].tolist() == [[1] * 10] * 4 + [[0] * 10] * 4


def test_scratch_folders_of_killed_conversions_are_removed_by_the_next(tmp_path, capsys):
    """A conversion killed with -9 (no `finally` runs) left its hidden scratch folder, a whole dataset's parquet
    files, beside --out for good; the next conversion into that folder removes it, not a running one's."""
    own_folder(tmp_path, "png")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed, old, running = (tmp_path / f".out.partial-{name}" for name in ("killed", "old", "running"))
    for folder in (killed, old, running):
        folder.mkdir()
        (folder / "train.parquet").write_bytes(b"\0" * 1000)
    (killed / ".owner-pid").write_text(gone.stdout.strip())  # its process has exited
    (running / ".owner-pid").write_text(str(os.getppid()))  # alive: another conversion still writing
    os.utime(old, (0, 0))  # no owner (written before owners were), untouched for decades
    convert.main(["folder", "--source", str(tmp_path / "mine"), "--class-names", "a, b, c", "--out",
                  str(tmp_path / "out")])
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == [".out.partial-running"]
    assert "removed" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["class_names.json", "train.parquet"]


def test_training_reads_a_hub_datasets_layout_from_a_local_copy(tmp_path):
    """A downloaded or cloned Hub dataset keeps its parquet files as data/<split>-00000-of-0000N.parquet: training
    found "no parquet file for split 'train'" in it; a folder of raw images is still refused (datasets would have
    made it an imagefolder labelled by subfolder), saying how to convert it."""
    own_folder(tmp_path, "png")
    convert.main(["folder", "--source", str(tmp_path / "mine"), "--class-names", "a, b, c", "--val-fraction", "0.4",
                  "--out", str(tmp_path / "converted")])
    hub = tmp_path / "hub-copy"
    (hub / "data").mkdir(parents=True)
    for split in ("train", "validation"):
        (tmp_path / "converted" / f"{split}.parquet").rename(hub / "data" / f"{split}-00000-of-00001.parquet")
    (tmp_path / "converted" / "class_names.json").rename(hub / "class_names.json")
    train, names = read_back(hub, "train")
    assert names == ["a", "b", "c"] and len(train) == 3 and len(read_back(hub, "validation")[0]) == 2
    with pytest.raises(FileNotFoundError, match=r"no parquet file for split 'test' in .*Should be one of"):
        load_segmentation_dataset(str(hub), "test")
    with pytest.raises(FileNotFoundError, match=r"no parquet file for split 'train' in .*mine: it holds images "
                                                r"\(images/.*\); make them a dataset first: python -m "
                                                r"processing.convert folder --source .*mine --class-names"):
        load_segmentation_dataset(str(tmp_path / "mine"), "train")
    photo = next((tmp_path / "mine" / "images").iterdir())
    with pytest.raises(ValueError, match=r"is no parquet file; give a dataset folder"):  # "Parquet magic bytes ..."
        load_segmentation_dataset(str(photo), "train", ["a", "b", "c"])
    # a split file without rows: named (datasets said 'Instruction "train" corresponds to no data!')
    import datasets

    empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image()}))
    (tmp_path / "empty").mkdir()
    empty.to_parquet(str(tmp_path / "empty" / "train.parquet"))
    with pytest.raises(ValueError, match="the 'train' split in .*empty holds no rows"):
        load_segmentation_dataset(str(tmp_path / "empty"), "train", ["a", "b"])


def test_failed_rerun_leaves_the_earlier_conversion_untouched(tmp_path, capsys):
    """Validation is written first; a bad train label then fails the run: the old folder must be exactly as it was."""
    own_folder(tmp_path, "png")
    out = tmp_path / "out"
    args = ["folder", "--source", str(tmp_path / "mine"), "--val-fraction", "0.2", "--out", str(out)]
    convert.main([*args, "--class-names", "background, crack, rust"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"train.parquet", "validation.parquet", "class_names.json"}

    validation_index = int(np.random.default_rng(0).permutation(5)[0])  # convert_folder's seeded split
    for i in range(5):  # new pixels everywhere; every train label also gets a value outside the 4 classes
        value = 1 if i == validation_index else 9
        Image.fromarray(np.full((8, 10), value, dtype=np.uint8)).save(tmp_path / "mine" / "labels" / f"img{i}.png")
    # another dataset's names into the used folder: refused before converting, unless --overwrite
    fails_with(capsys, [*args, "--class-names", "a, b, c, d"], "holds another dataset (3 classes: background, crack")
    fails_with(capsys, [*args, "--class-names", "a, b, c, d", "--overwrite"], "outside 0..3")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []  # no scratch folder left behind

    (out / "validation.parquet").write_bytes(b"")  # a used folder is replaced file by file on success
    for i in range(5):
        Image.fromarray(np.full((8, 10), 3, dtype=np.uint8)).save(tmp_path / "mine" / "labels" / f"img{i}.png")
    convert.main([*args, "--class-names", "a, b, c, d", "--overwrite"])
    validation, names = read_back(out)
    assert names == ["a", "b", "c", "d"] and validation[0].min() == validation[0].max() == 3
    with pytest.raises(SystemExit):
        convert.main([*args[:-1], str(out / "class_names.json"), "--class-names", "a"])


def test_synthetic_generator_never_replaces_another_dataset(tmp_path, capsys):
    from processing import synthetic

    own_folder(tmp_path, "png")
    convert.main(["folder", "--source", str(tmp_path / "mine"), "--class-names", "a,b,c", "--out", str(tmp_path / "d")])
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    with pytest.raises(SystemExit) as error:
        synthetic.main(["--out", str(tmp_path / "d"), "--num-train", "1", "--num-val", "1", "--height", "32",
                        "--width", "32"])
    assert error.value.code == 2 and "holds another dataset" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before
    for _ in range(2):  # its own folder is written again
        synthetic.main(["--out", str(tmp_path / "s"), "--num-train", "1", "--num-val", "1", "--height", "32",
                        "--width", "32"])


def test_photos_are_stored_as_shown_and_their_labels_follow(tmp_path, capsys):
    """A phone photo (EXIF orientation 6: stored on its side) trains on what every viewer, `datasets` and the image
    processor show; its label counts as drawn over the photo as shown, or, when it fits only the stored pixels (the
    size says so), is turned with the photo. A 16-bit PNG is scaled, not clipped to white."""
    shown = np.zeros((40, 30, 3), dtype=np.uint8)
    shown[...] = (0, 0, 255)
    shown[:20, :15] = (255, 0, 0)  # red top-left corner of the upright photo: class 1
    shown_label = np.where(shown[..., 0] > 128, 1, 0).astype(np.uint8)
    stored = Image.fromarray(shown).transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back (ROTATE_270)
    assert stored.size == (40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "mine" / "images").mkdir(parents=True)
    (tmp_path / "mine" / "labels").mkdir()
    for name, suffix in (("drawn_shown", "jpg"), ("drawn_stored", "jpg"), ("png_photo", "png")):
        stored.save(tmp_path / "mine" / "images" / f"{name}.{suffix}", exif=exif, quality=95)
    label_image = Image.fromarray(shown_label)
    label_image.save(tmp_path / "mine" / "labels" / "drawn_shown.png")
    label_image.save(tmp_path / "mine" / "labels" / "png_photo.png")
    label_image.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "mine" / "labels" / "drawn_stored.png")
    deep = (np.linspace(0, 65535, 40 * 30).reshape(40, 30)).astype(np.uint16)  # a 16-bit grey ramp
    Image.fromarray(deep).save(tmp_path / "mine" / "images" / "deep.png")
    label_image.save(tmp_path / "mine" / "labels" / "deep.png")

    convert.main(["folder", "--source", str(tmp_path / "mine"), "--class-names", "sky, roof", "--val-fraction", "0",
                  "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "1 label(s) fit the unrotated pixels" in err and "no validation split" in err
    dataset, _ = load_segmentation_dataset(str(tmp_path / "out"), "train")
    rows = [as_arrays(row) for row in dataset]
    assert len(rows) == 4
    for pixels, label in rows:
        assert label.shape == (40, 30) and np.array_equal(label, shown_label)
        if pixels[..., 0].std() > 0 and not np.array_equal(pixels[..., 0], pixels[..., 2]):  # a photo
            assert np.abs(pixels.astype(int) - shown).mean() < 8  # upright, and JPEG-close (edges blur)
            assert pixels[5, 5].tolist()[0] > 200 and pixels[30, 25].tolist()[2] > 200
        else:  # the 16-bit ramp, scaled to 8 bits: dark to bright, not clipped to white
            assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255 and 100 < pixels.mean() < 155


def test_training_reads_one_channel_of_a_grey_label_saved_as_rgb_and_refuses_a_colour_mask():
    grey = np.repeat(np.array([[0, 1], [2, 255]], dtype=np.uint8)[..., None], 3, axis=2)
    _, label = as_arrays({"image": image(2, 2), "label": Image.fromarray(grey)})
    assert label.tolist() == [[0, 1], [2, 255]]
    opaque = np.concatenate([grey, np.full((2, 2, 1), 255, np.uint8)], axis=2)  # RGBA: the alpha channel aside
    assert as_arrays({"image": image(2, 2), "label": Image.fromarray(opaque)})[1].tolist() == [[0, 1], [2, 255]]
    colour = grey.copy()
    colour[0, 0] = (200, 30, 30)  # a palette colour: its red channel is no class id
    with pytest.raises(ValueError, match="3 different colour channels"):
        as_arrays({"image": image(2, 2), "label": Image.fromarray(colour)})
    # float labels (a float32 TIFF, an Array2D of floats): whole numbers read as ids, others were truncated
    assert as_arrays({"image": image(2, 2), "label": np.array([[0.0, 1.0], [2.0, 255.0]])})[1].tolist() == [
        [0, 1], [2, 255]]
    for blurred in (np.array([[0.0, 0.5], [1.0, 2.0]], np.float32), Image.fromarray(np.array([[0, 1.5], [1, 1]],
                                                                                             np.float32))):
        with pytest.raises(ValueError, match=r"no whole numbers \(a label map resized with bilinear interpolation"):
            as_arrays({"image": image(2, 2), "label": blurred})


def test_rows_without_a_label_or_with_damaged_image_bytes_are_named():
    """A parquet row written without its label (None) failed deep in numpy ("int() argument must be ... not
    'NoneType'", a traceback) and damaged bytes were "cannot identify image file <_io.BytesIO object at 0x...>":
    each is now a ValueError that training and evaluation report with the row's index."""
    import datasets

    from training.data import row_arrays

    png = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(png, format="PNG")
    label = {"bytes": png.getvalue(), "path": None}
    rows = {"image": [image(2, 2), None, {"bytes": b"not an image", "path": None}, image(2, 2)],
            "label": [label, label, label, None]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    dataset = datasets.Dataset.from_dict(rows, features=features)
    assert row_arrays(dataset, 0)[1].tolist() == [[0, 0], [0, 0]]
    for index, message in ((1, "its image is missing (None)"), (3, "its label is missing (None)"),
                           (2, "its image or label holds bytes that are no image PIL reads")):
        with pytest.raises(ValueError, match=re.escape(message)):
            row_arrays(dataset, index)


def test_folder_of_0_255_masks_hidden_files_and_name_twins(tmp_path, capsys):
    """0/255 masks (255 is unlabelled) would train nothing but the first class: refused, and read as two classes
    with --binary-masks; macOS `._` copies are skipped; two images of one name, a label of nothing but 255 and a
    validation share of 1 are refused."""
    own_folder(tmp_path, "png")
    source, labels = tmp_path / "mine", tmp_path / "mine" / "labels"
    for i in range(5):
        mask = np.zeros((8, 10), dtype=np.uint8)
        mask[: i + 2] = 255
        Image.fromarray(mask).save(labels / f"img{i}.png")
    (source / "images" / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # no label, not an image
    args = ["folder", "--source", str(source), "--val-fraction", "0.2", "--out", str(tmp_path / "out")]
    fails_with(capsys, [*args, "--class-names", "background, crack"], "pass --binary-masks")
    fails_with(capsys, [*args, "--class-names", "a, b, c", "--binary-masks"], "3 class names")
    convert.main([*args, "--class-names", "background, crack", "--binary-masks"])
    train, names = read_back(tmp_path / "out", "train")
    assert names == ["background", "crack"] and len(train) == 4
    assert all(set(np.unique(label).tolist()) == {0, 1} for label in train)
    assert "appear in no label" not in capsys.readouterr().err
    # a named pipe called pipe.png, with a label: opening it waited forever (run in a process of its own, so that a
    # hang fails the test instead of stopping the suite)
    os.mkfifo(source / "images" / "pipe.png")
    Image.fromarray(np.zeros((8, 10), np.uint8)).save(labels / "pipe.png")
    subprocess.run([sys.executable, "-m", "processing.convert", *args, "--class-names", "background, crack",
                    "--binary-masks"], check=True, timeout=120, capture_output=True, cwd=ROOT)
    assert len(read_back(tmp_path / "out", "train")[0]) == 4  # the pipe left out
    (source / "images" / "pipe.png").unlink()
    (labels / "pipe.png").unlink()

    Image.fromarray(np.full((8, 10), 255, dtype=np.uint8)).save(labels / "img0.png")
    for i in range(1, 5):
        Image.fromarray(np.full((8, 10), 255 if i % 2 else 1, dtype=np.uint8)).save(labels / f"img{i}.png")
    convert.main([*args, "--class-names", "background, crack, rust", "--overwrite"])
    assert "2 class(es) appear in no label: background, rust" in capsys.readouterr().err
    for i in range(5):
        Image.fromarray(np.full((8, 10), 255, dtype=np.uint8)).save(labels / f"img{i}.png")
    fails_with(capsys, [*args, "--class-names", "a, b", "--overwrite"], "every label pixel is 255")
    image(8, 10).save(source / "images" / "img1.jpg")
    fails_with(capsys, [*args, "--class-names", "a, b", "--overwrite"], "would share one label file")
    (source / "images" / "img1.jpg").unlink()
    # label suffixes in capitals (IMG_0001.PNG from a camera or a Windows tool) were "missing"; one name twice is not
    for i in range(5):
        Image.fromarray(np.full((8, 10), i % 2, dtype=np.uint8)).save(labels / f"img{i}.png")
    (labels / "img3.png").rename(labels / "img3.PNG")
    convert.main([*args, "--class-names", "a, b", "--overwrite"])
    assert len(read_back(tmp_path / "out", "train")[0]) == 4
    Image.fromarray(np.zeros((8, 10), dtype=np.uint8)).save(labels / "img3.png")
    fails_with(capsys, [*args, "--class-names", "a, b", "--overwrite"], "name one image twice")
    with pytest.raises(SystemExit) as error:
        convert.main([*args[:-4], "--val-fraction", "1", "--out", str(tmp_path / "o"), "--class-names", "a, b"])
    assert error.value.code == 2 and "--val-fraction must lie in [0, 1)" in capsys.readouterr().err


def test_vocabularies_past_255_classes_keep_class_255_and_beyond(tmp_path, capsys):
    """ADE20K-847 and Pascal Context-459 hold classes 255 and up: their labels are 16-bit PNGs with 65535 unlabelled
    (8-bit maps wrapped class 300 to 44 and read class 255 as unlabelled); a label that an 8-bit map cannot hold is
    refused, never wrapped."""
    folder = tmp_path / "ADE20K_2021_17_01" / "images" / "ADE" / "validation" / "cultural" / "apse"
    folder.mkdir(parents=True)
    image(4, 4).save(folder / "ADE_val_00000001.jpg")
    seg = np.zeros((4, 4, 3), dtype=np.uint8)
    seg[0, :] = (10, 5, 0)   # raw class 261 -> benchmark class 255
    seg[1, :] = (20, 1, 0)   # raw 513 -> benchmark class 300
    seg[2, :] = (0, 7, 0)    # raw 7 -> benchmark class 0
    Image.fromarray(seg).save(folder / "ADE_val_00000001_seg.png")  # row 3: raw 0, not in the list: unlabelled
    raw = [7] + [1000 + i for i in range(254)] + [261] + [2000 + i for i in range(44)] + [513] + [3000 + i for i in
                                                                                                 range(546)]
    (tmp_path / "list.tsv").write_text("".join(f"{r}\tclass {i}\n" for i, r in enumerate(raw)))
    convert.convert_ade20k_847(str(tmp_path / "ADE20K_2021_17_01"), tmp_path / "out", "validation",
                               str(tmp_path / "list.tsv"))
    (label,), names = read_back(tmp_path / "out")
    assert len(names) == 847 and label[:, 0].tolist() == [255, 300, 0, 65535]

    # a folder of 16-bit label PNGs with 300 classes; an 8-bit dataset cannot hold class 300
    own_folder(tmp_path, "png")
    wide = np.array([[0, 255, 299, 65535, 7] * 2] * 8, dtype=np.uint16)
    for i in range(5):
        Image.fromarray(wide).save(tmp_path / "mine" / "labels" / f"img{i}.png")
    many = ", ".join(f"thing {i}" for i in range(300))
    convert.main(["folder", "--source", str(tmp_path / "mine"), "--class-names", many, "--val-fraction", "0",
                  "--out", str(tmp_path / "wide")])
    train_labels, _ = read_back(tmp_path / "wide", "train")
    assert all(np.array_equal(label, wide) for label in train_labels)
    # another dataset into that folder, its names known only once converted: refused then, the folder unchanged
    before = {p.name: p.read_bytes() for p in (tmp_path / "wide").iterdir()}
    fails_with(capsys, ["ade20k-847", "--source", str(tmp_path / "ADE20K_2021_17_01"), "--class-list",
                        str(tmp_path / "list.tsv"), "--out", str(tmp_path / "wide")],
               "holds another dataset (300 classes")
    assert {p.name: p.read_bytes() for p in (tmp_path / "wide").iterdir()} == before
    with pytest.raises(ValueError, match=r"row 1 of the validation split: the label holds \[300\], neither one of "
                                         r"the 171 classes nor the unlabelled value 255"):
        convert.write_split(tmp_path / "x", "validation", lambda: iter(
            [(image(2, 2), np.zeros((2, 2))), (image(2, 2), np.full((2, 2), 300))]), COCO_STUFF_171)
    # the file to fix is named (the message gave two sizes and no name)
    own_folder(tmp_path / "sizes", "jpg")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "sizes" / "mine" / "labels" / "img3.png")
    fails_with(capsys, ["folder", "--source", str(tmp_path / "sizes" / "mine"), "--class-names", "a,b,c",
                        "--out", str(tmp_path / "sizes" / "out")], "img3.jpg: image (8, 10) and label (4, 4) differ")


def test_a_parquet_written_with_pandas_reads_as_images(tmp_path):
    """pandas writes image columns as file paths or {"bytes", "path"} dicts, which datasets reads back as strings and
    dicts, and array columns read back as nested lists: training and evaluation stopped at the first row with "image 0
    has unsupported type str" (or list). They are images now, relative paths read from the dataset's folder, and
    paths that name no file are refused up front."""
    import io
    import json

    import pandas as pd

    labels = [np.random.default_rng(i).integers(0, 3, (12, 16)) for i in range(3)]
    (tmp_path / "paths" / "files").mkdir(parents=True)
    (tmp_path / "bytes").mkdir()
    path_rows, byte_rows = [], []
    for i, label in enumerate(labels):
        image(seed=i).save(tmp_path / "paths" / "files" / f"{i}.jpg")
        Image.fromarray(label.astype(np.uint8)).save(tmp_path / "paths" / "files" / f"{i}.png")
        path_rows.append({"image": f"files/{i}.jpg", "label": str(tmp_path / "paths" / "files" / f"{i}.png")})
        encoded = {}
        pictures = (("image", image(seed=i), "JPEG"), ("label", Image.fromarray(label.astype(np.uint8)), "PNG"))
        for column, picture, kind in pictures:
            buffer = io.BytesIO()
            picture.save(buffer, kind)
            encoded[column] = {"bytes": buffer.getvalue(), "path": None}
        byte_rows.append(encoded)
    for folder, rows in (("paths", path_rows), ("bytes", byte_rows)):
        pd.DataFrame(rows).to_parquet(tmp_path / folder / "validation.parquet")
        (tmp_path / folder / "class_names.json").write_text(json.dumps(["a", "b", "c"]))
    from_paths, names = read_back(tmp_path / "paths")
    from_bytes, _ = read_back(tmp_path / "bytes")
    assert names == ["a", "b", "c"]
    for label, one, other in zip(labels, from_paths, from_bytes):
        np.testing.assert_array_equal(one, label)
        np.testing.assert_array_equal(other, label)
    dataset, _ = load_segmentation_dataset(str(tmp_path / "paths"), "validation")
    np.testing.assert_array_equal(as_arrays(dataset[0])[0], as_arrays(load_segmentation_dataset(
        str(tmp_path / "bytes"), "validation")[0][0])[0])  # the same JPEG decoded either way
    # arrays (an Array3D column, or nested sequences): datasets gives nested lists, which read as arrays
    import datasets

    arrays = datasets.Dataset.from_dict(
        {"image": [np.asarray(image(seed=i)) for i in range(3)], "label": [label.astype(np.uint8) for label in labels]},
        features=datasets.Features({"image": datasets.Array3D((12, 16, 3), "uint8"),
                                    "label": datasets.Array2D((12, 16), "uint8")}))
    (tmp_path / "arrays").mkdir()
    arrays.to_parquet(str(tmp_path / "arrays" / "validation.parquet"))
    (tmp_path / "arrays" / "class_names.json").write_text(json.dumps(["a", "b", "c"]))
    dataset, _ = load_segmentation_dataset(str(tmp_path / "arrays"), "validation")
    for i, (row, label) in enumerate(zip(dataset, labels)):
        picture, read = as_arrays(row)
        np.testing.assert_array_equal(picture, np.asarray(image(seed=i)))
        np.testing.assert_array_equal(read, label)
    (tmp_path / "paths" / "files" / "2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 image paths name no file \(the first: 'files/2.jpg'\); "
                                                r"relative paths are read from .*paths"):
        load_segmentation_dataset(str(tmp_path / "paths"), "validation")


def test_synthetic_generator_refuses_sizes_it_cannot_draw(tmp_path, capsys):
    """--height 8 ended in numpy's "high <= 0" traceback; --num-train 0 wrote a split training then refused."""
    from processing import synthetic

    for flags, message in ((["--height", "8"], "--height must be >= 32, got 8"),
                           (["--num-train", "0"], "--num-train must be >= 1, got 0"),
                           (["--seed", "-1"], "--seed must be >= 0, got -1")):
        with pytest.raises(SystemExit) as error:
            synthetic.main(["--out", str(tmp_path / "s"), "--num-train", "1", "--num-val", "1", *flags])
        assert error.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    synthetic.main(["--out", str(tmp_path / "s"), "--num-train", "1", "--num-val", "1", "--height", "32",
                    "--width", "32"])
    assert (tmp_path / "s" / "train.parquet").is_file()


def test_a_save_to_disk_folder_reads_as_its_parquet(tmp_path):
    """`DatasetDict.save_to_disk` is how datasets users keep data; such a folder said "no parquet file for split
    'train'". It loads with `load_from_disk`; one `Dataset` saved alone serves only the split it was saved from."""
    import datasets

    labels = [np.random.default_rng(i).integers(0, 3, (12, 16)) for i in range(3)]
    for split in ("train", "validation"):
        write_table(tmp_path / "parquet", split, "label", labels)
    (tmp_path / "parquet" / "class_names.json").write_text('["a", "b", "c"]')
    splits = datasets.load_dataset("parquet", data_dir=str(tmp_path / "parquet"))
    splits.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "disk" / "class_names.json").write_text('["a", "b", "c"]')
    for split in ("train", "validation"):
        from_disk, names = load_segmentation_dataset(str(tmp_path / "disk"), split)
        from_parquet, _ = load_segmentation_dataset(str(tmp_path / "parquet"), split)
        assert names == ["a", "b", "c"] and len(from_disk) == 3
        for one, other in zip(from_disk, from_parquet):
            for a, b in zip(as_arrays(one), as_arrays(other)):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match=r"no split 'test' in .*disk \(a save_to_disk folder with the "
                                                r"split\(s\) train, validation\)"):
        load_segmentation_dataset(str(tmp_path / "disk"), "test")
    # one split's folder: its own split, never another (the same rows would train and evaluate)
    one, _ = load_segmentation_dataset(str(tmp_path / "disk" / "train"), "train", ["a", "b", "c"])
    assert len(one) == 3
    with pytest.raises(ValueError, match=r"holds the 'train' split \(Dataset.save_to_disk\), not the 'validation' "
                                         r"split: give the folder above it, .*disk, and name the split"):
        load_segmentation_dataset(str(tmp_path / "disk" / "train"), "validation", ["a", "b", "c"])
    datasets.Dataset.from_dict({"image": [image()], "label": [image()]}).save_to_disk(str(tmp_path / "alone"))
    with pytest.raises(ValueError, match=r"holds one dataset without a split name .* save a DatasetDict"):
        load_segmentation_dataset(str(tmp_path / "alone"), "train", ["a"])


def test_split_slices_in_every_local_layout(tmp_path):
    """`--split "validation[:100]"` (datasets' slice syntax) worked on parquet folders only; a save_to_disk folder said
    "no split 'validation[:100]'". Every layout slices the same rows, as `load_dataset` does, and a slice past the
    end is an error naming the split's size."""
    import datasets

    labels = [np.random.default_rng(i).integers(0, 3, (12, 16)) for i in range(4)]
    for split in ("train", "validation"):
        write_table(tmp_path / "parquet", split, "label", labels if split == "train" else labels[::-1])
    (tmp_path / "parquet" / "class_names.json").write_text('["a", "b", "c"]')
    datasets.load_dataset("parquet", data_dir=str(tmp_path / "parquet")).save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "disk" / "class_names.json").write_text('["a", "b", "c"]')
    for spec, expected in (("validation[:3]", labels[::-1][:3]), ("validation[50%:]", labels[::-1][2:]),
                           ("validation[-1:]", labels[:1]), ("train[:1]+validation[:1]", [labels[0], labels[3]])):
        native = datasets.load_dataset("parquet", data_dir=str(tmp_path / "parquet"), split=spec)
        assert [np.asarray(row["label"]).tolist() for row in native] == [label.tolist() for label in expected]
        for layout in ("parquet", "disk", "disk/validation"):
            if layout == "disk/validation" and "train" in spec:
                continue
            rows, _ = load_segmentation_dataset(str(tmp_path / layout), spec, ["a", "b", "c"])
            got = [as_arrays(row)[1].tolist() for row in rows]
            assert got == [label.tolist() for label in expected], (layout, spec)
    with pytest.raises(ValueError, match=r"split 'validation\[9:\]' selects no rows of .*disk \(validation: 4 rows\)"):
        load_segmentation_dataset(str(tmp_path / "disk"), "validation[9:]")
    with pytest.raises(ValueError, match=r"split 'validation\[:x\]' is not a split or a slice of one"):
        load_segmentation_dataset(str(tmp_path / "disk"), "validation[:x]")


def test_datasets_in_the_hubs_usual_layouts_load_as_they_are(tmp_path, monkeypatch):
    """`segments/sidewalk-semantic` (the segmentation tutorial's dataset: `pixel_values`, `label`, names in
    `id2label.json`) and `scene_parse_150`'s layout (`image`, `annotation`, a per-image scene `label`) stopped
    training with "lacks the column(s) ['image']": the usual names are renamed, and `id2label.json` gives the names,
    locally and on the Hub. A per-image class column is no label map, and is named as such."""
    import json

    import datasets
    import huggingface_hub

    from modeling_mrovseg.text_classifier import parse_class_names

    labels = [np.random.default_rng(i).integers(0, 3, (12, 16)) for i in range(3)]
    pictures = [image(seed=i) for i in range(3)]
    maps = [Image.fromarray(label.astype(np.uint8)) for label in labels]

    def table(folder, columns):
        features = datasets.Features({name: values[1] for name, values in columns.items()})
        data = datasets.Dataset.from_dict({name: values[0] for name, values in columns.items()}, features=features)
        (tmp_path / folder / "data").mkdir(parents=True)
        data.to_parquet(str(tmp_path / folder / "data" / "train-00000-of-00001.parquet"))
        return data

    sidewalk = table("sidewalk", {"pixel_values": (pictures, datasets.Image()), "label": (maps, datasets.Image())})
    (tmp_path / "sidewalk" / "id2label.json").write_text(json.dumps({"0": "unlabeled", "1": "road", "2": "car"}))
    dataset, names = load_segmentation_dataset(str(tmp_path / "sidewalk"), "train")
    assert names == ["unlabeled", "road", "car"] and dataset.column_names == ["image", "label"]
    for row, picture, label in zip(dataset, pictures, labels):
        np.testing.assert_array_equal(as_arrays(row)[0], np.asarray(picture))
        np.testing.assert_array_equal(as_arrays(row)[1], label)
    # the same through the Hub: load_dataset(id), then the repository's id2label.json (no class_names.json there)
    def download(repo_id, filename, repo_type):
        assert (repo_id, repo_type) == ("segments/sidewalk-semantic", "dataset")
        if filename != "id2label.json":
            raise huggingface_hub.errors.EntryNotFoundError(filename)
        return str(tmp_path / "sidewalk" / "id2label.json")

    with monkeypatch.context() as hub:
        hub.setattr(datasets, "load_dataset", lambda name, split: sidewalk)
        hub.setattr(huggingface_hub, "hf_hub_download", download)
        dataset, names = load_segmentation_dataset("segments/sidewalk-semantic", "train")
    assert names == ["unlabeled", "road", "car"] and dataset.column_names == ["image", "label"]

    scenes = datasets.ClassLabel(names=["bedroom", "street"])
    table("scene", {"image": (pictures, datasets.Image()), "annotation": (maps, datasets.Image()),
                    "label": ([0, 1, 0], scenes)})
    dataset, _ = load_segmentation_dataset(str(tmp_path / "scene"), "train", ["a", "b", "c"])
    assert dataset.column_names == ["image", "label"]
    np.testing.assert_array_equal(as_arrays(dataset[1])[1], labels[1])

    table("classes", {"image": (pictures, datasets.Image()), "label": ([0, 1, 0], scenes)})
    with pytest.raises(ValueError, match=r"has no label column: its 'label' column holds one value per image \(image "
                                         r"classification\?\), not a map \(its columns: image, label\)"):
        load_segmentation_dataset(str(tmp_path / "classes"), "train", ["a", "b"])
    table("other", {"photo": (pictures, datasets.Image()), "seg": (maps, datasets.Image())})
    with pytest.raises(ValueError, match=r"has no image column: none of image, pixel_values, img \(its columns: "
                                         r"photo, seg\)\. Rename yours"):
        load_segmentation_dataset(str(tmp_path / "other"), "train", ["a", "b"])

    # an id2label file given as the class names; its ids must run 0..N-1
    assert parse_class_names(str(tmp_path / "sidewalk" / "id2label.json")) == ["unlabeled", "road", "car"]
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(ValueError, match=r"maps the ids \[0, 2\]: class ids must run from 0 to N - 1, each once"):
        parse_class_names(str(tmp_path / "gap.json"))
