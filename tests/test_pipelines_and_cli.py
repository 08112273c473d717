import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, pipeline

from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegImageProcessor, MROVSegProcessor
from modeling_mrovseg.cli import main as cli_main
from modeling_mrovseg.pipelines import read_rgb
from modeling_mrovseg.text_classifier import parse_class_names as parse_labels
from modeling_mrovseg.visualization import draw_segmentation, palette
from tests.helpers import LABELS, TEMPLATES, png_bomb, random_image


def images():
    return [Image.fromarray(random_image(90, 120, seed=1)), Image.fromarray(random_image(60, 200, seed=2)),
            Image.fromarray(random_image(150, 70, seed=3))]


# ---------------------------------------------------------------- processor
def test_processor_round_trip_and_prompt_pooling(checkpoint, tiny_tokenizer):
    processor = AutoProcessor.from_pretrained(checkpoint)
    assert isinstance(processor, MROVSegProcessor) and processor.prompt_templates == TEMPLATES
    inputs = processor(images=images()[0], text=["sofa, couch", "lamp"])
    assert inputs["input_ids"].shape[0] == 6 and inputs["text_prompt_owners"].tolist() == [
        [0, 0], [0, 0], [0, 1], [0, 1], [1, 0], [1, 0]]
    model = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        per_call = model(**inputs).class_queries_logits
        model.set_vocabulary(["sofa, couch", "lamp"], tiny_tokenizer)
        image_only = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "text_prompt_owners")}
        stored = model(**image_only).class_queries_logits
    torch.testing.assert_close(per_call, stored, rtol=1e-5, atol=1e-5)
    # the tokenizer's settings as CLIPSeg's processor takes them change nothing (they were a TypeError naming the
    # image processor's keyword arguments)
    clipseg_style = processor(images=images()[0], text=["sofa, couch", "lamp"], padding=True, truncation=True)
    assert all(torch.equal(clipseg_style[k], v) for k, v in inputs.items()) and clipseg_style.keys() == inputs.keys()
    # class names as a string, read as the pipelines read them (it was "not a single string")
    assert torch.equal(processor(text="sofa, couch; lamp")["input_ids"], inputs["input_ids"])
    with pytest.raises(ValueError, match="Duplicate"):
        processor(text=["lamp", "lamp"])
    with pytest.raises(ValueError, match="Give `images`"):
        processor()


# ---------------------------------------------------------------- image-segmentation pipeline
def test_image_segmentation_pipeline_from_folder_and_object(checkpoint):
    """A model object needs no image_processor= (transformers' "Impossible to guess which image processor to use"
    before): it brings its checkpoint's."""
    model = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint)
    for segmenter in (pipeline("image-segmentation", model=str(checkpoint)),
                      pipeline("image-segmentation", model=model,
                               image_processor=AutoProcessor.from_pretrained(checkpoint).image_processor),
                      pipeline("image-segmentation", model=model)):
        batch = images()
        results = segmenter(batch)
        assert len(results) == 3
        for image, segments in zip(batch, results):
            assert segments and all(s["label"] in LABELS for s in segments)
            assert all(s["mask"].size == image.size for s in segments)
            coverage = sum(np.asarray(s["mask"], dtype=np.int64) for s in segments)
            assert (coverage == 255).all()  # every pixel labelled exactly once


def _awkward_files(folder) -> dict:
    """A 16-bit grey PNG, a half-transparent RGBA PNG and an EXIF-rotated JPEG, with the RGB the processor reads."""
    rng = np.random.default_rng(3)
    grey16 = (rng.integers(0, 256, (40, 60)) * 257).astype(np.uint16)
    rgba = np.dstack([random_image(40, 60, seed=4), np.where(np.arange(60) < 30, 255, 0)[None].repeat(40, 0)])
    files = {folder / "deep.png": Image.fromarray(grey16), folder / "alpha.png": Image.fromarray(rgba.astype(np.uint8))}
    for path, image in files.items():
        image.save(path)
    photo = Image.fromarray(random_image(40, 60, seed=5))
    exif = photo.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: portrait
    photo.save(folder / "phone.jpg", exif=exif)
    expected = {str(path): read_rgb(str(path)) for path in [*files, folder / "phone.jpg"]}
    assert expected[str(folder / "deep.png")].mean() < 200 and (expected[str(folder / "alpha.png")][:, 30:] == 255).all()
    assert expected[str(folder / "phone.jpg")].shape[:2] == (60, 40)
    return expected


def test_both_pipelines_read_paths_as_the_processor_does(checkpoint, zero_shot, tmp_path):
    """16-bit, transparent and EXIF-rotated files give what their correctly read RGB gives (transformers' load_image
    would make the 16-bit image nearly white and the transparent half black)."""
    stock = pipeline("image-segmentation", model=str(checkpoint))
    assert type(stock).__name__ == "MROVSegImageSegmentationPipeline"
    for path, rgb in _awkward_files(tmp_path).items():
        from_path, from_rgb = stock(path), stock(Image.fromarray(rgb))
        assert [s["label"] for s in from_path] == [s["label"] for s in from_rgb]
        for a, b in zip(from_path, from_rgb):
            assert a["mask"].size == (rgb.shape[1], rgb.shape[0])
            assert np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))
        assert np.array_equal(zero_shot(path)["label_map"], zero_shot(rgb)["label_map"])
        assert np.array_equal(zero_shot(path)["label_map"], stock_label_map(from_path))


def test_the_first_frame_of_an_animation_or_a_multi_page_file_is_segmented_and_said(checkpoint, zero_shot, tmp_path,
                                                                                     capsys):
    """An animated GIF or a multi-page TIFF: its first frame is segmented, and a warning says the others are not
    (they were left out without a word); a camera's MPO (previews beside the photo) and an image a caller moved to
    another frame are read as they are, unsaid. The CLI says it in one line."""
    frames = [Image.fromarray(random_image(20, 30, seed=i)) for i in range(3)]
    for name in ("anim.gif", "pages.tif", "camera.mpo"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    for name in ("anim.gif", "pages.tif"):
        with pytest.warns(UserWarning, match=f"{name} has 3 frames .* only the first is segmented"):
            from_file = zero_shot(str(tmp_path / name))["label_map"]
        assert np.array_equal(from_file, zero_shot(read_rgb(Image.open(tmp_path / name).convert("RGB")))["label_map"])
    moved = Image.open(tmp_path / "anim.gif")
    moved.seek(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zero_shot(str(tmp_path / "camera.mpo"))
        zero_shot(moved)
    code = cli_main(["segment", str(tmp_path / "anim.gif"), "--model", str(checkpoint), "--labels", "lamp, floor",
                     "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and f"warning: {tmp_path / 'anim.gif'} has 3 frames" in err and "UserWarning" not in err, err


def test_urls_and_base64_are_read_as_files_are(tmp_path, monkeypatch):
    """A URL, a data URL and a bare base64 string of a 16-bit, transparent or EXIF-rotated file read to the same
    array as the file's path (transformers' load_image flattened them to 8-bit RGB first); bad sources are a
    ValueError naming them."""
    import base64

    from modeling_mrovseg.pipelines import httpx, open_image

    served, requests = {}, []

    def get(url, timeout=None, follow_redirects=False):
        requests.append((url, timeout))
        if url not in served:
            raise httpx.ConnectError("offline", request=httpx.Request("GET", url))
        return httpx.Response(200, content=served[url], request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", get)
    for path, rgb in _awkward_files(tmp_path).items():
        data = open(path, "rb").read()
        url = "https://example.com/" + path.rsplit("/", 1)[-1]
        served[url] = data
        encoded = base64.b64encode(data).decode()
        for source in (url, "data:image/png;base64," + encoded, encoded, data, bytearray(data)):  # file bytes too
            assert np.array_equal(read_rgb(source, timeout=5), rgb), str(source)[:40]
        # a pathlib.Path and a file opened in binary mode ("expected a path ..., got PosixPath" before)
        with open(path, "rb") as handle:
            for source in (Path(path), handle, io.BytesIO(data)):
                assert np.array_equal(read_rgb(source), rgb), repr(source)
    assert requests[0][1] == 5  # the pipeline's timeout reaches the download
    read_rgb(url)
    assert requests[-1][1] == 60  # without one a stalled server is an error after a minute, never a hang
    with pytest.raises(ValueError, match="https://example.com/gone.png cannot be downloaded"):
        open_image("https://example.com/gone.png")
    for source in ("photos/missing.jpg", "catt", base64.b64encode(b"not an image").decode()):
        with pytest.raises(ValueError, match="is not an existing file, an http\\(s\\) URL or a base64-encoded image"):
            open_image(source)
    with pytest.raises(ValueError, match="cannot be read as an image"):
        open_image("data:image/png;base64," + base64.b64encode(b"not an image").decode())
    with pytest.raises(ValueError, match="the given 12 bytes cannot be read as an image: not a format PIL reads"):
        open_image(b"not an image")
    with pytest.raises(ValueError, match="missing.jpg is not an existing regular file"):
        open_image(tmp_path / "missing.jpg")  # a Path is a file, never tried as base64
    (tmp_path / "notes.txt").write_text("text")
    with open(tmp_path / "notes.txt") as text, pytest.raises(TypeError, match="notes.txt is open in text mode"):
        open_image(text)


def stock_label_map(segments) -> np.ndarray:
    label_map = np.full(np.asarray(segments[0]["mask"]).shape, -1)
    for segment in segments:
        label_map[np.asarray(segment["mask"]) > 0] = LABELS.index(segment["label"])
    return label_map


# ---------------------------------------------------------------- zero-shot pipeline
@pytest.fixture(scope="module")
def zero_shot(checkpoint):
    return pipeline("zero-shot-image-segmentation", model=str(checkpoint))


def test_zero_shot_single_batch_and_cache(zero_shot):
    misses = zero_shot.text_cache_misses
    single = zero_shot(images()[0], candidate_labels=["cat", "dog", "sofa, couch"])
    assert single["labels"] == ["cat", "dog", "sofa, couch"] and single["label_map"].shape == (90, 120)
    for segment in single["segments"]:
        assert segment["label"] in single["labels"] and 0.0 <= segment["score"] <= 1.0
        assert segment["mask"].size == (120, 90)
    batch = zero_shot(images(), candidate_labels="cat, dog, sofa")
    assert [r["label_map"].shape for r in batch] == [(90, 120), (60, 200), (150, 70)]
    assert batch[0]["labels"] == ["cat", "dog", "sofa"]
    # one embedding per distinct vocabulary, whatever the number of images
    assert zero_shot.text_cache_misses == misses + 2
    hits = zero_shot.text_cache_hits
    zero_shot(images(), candidate_labels=["cat", "dog", "sofa, couch"])
    assert zero_shot.text_cache_misses == misses + 2 and zero_shot.text_cache_hits == hits + 3


def test_zero_shot_cache_follows_the_text_towers_weights(checkpoint):
    """The text cache was keyed by the labels alone: after the text tower changed in place (a LoRA on it trained in a
    notebook beside a live pipeline), the pipeline went on serving the old embeddings."""
    model = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint)
    segmenter = pipeline("zero-shot-image-segmentation", model=model)
    before = segmenter.text_embeddings(["cat", "dog"]).clone()
    assert torch.equal(segmenter.text_embeddings(["cat", "dog"]), before) and segmenter.text_cache_hits == 1
    with torch.no_grad():
        model.text_model.final_layer_norm.bias.add_(0.5)
    after = segmenter.text_embeddings(["cat", "dog"])
    assert segmenter.text_cache_misses == 2 and not torch.allclose(after, before)
    torch.testing.assert_close(after, model.embed_class_names(["cat", "dog"], model.clip_tokenizer))


def test_zero_shot_matches_the_model(zero_shot, tiny_tokenizer):
    image = images()[1]
    labels = ["tree", "river, stream", "house"]
    result = zero_shot(image, candidate_labels=labels)
    model, processor = zero_shot.model, zero_shot.image_processor
    with torch.inference_mode():
        outputs = model(**processor(image, return_tensors="pt"),
                        text_embeds=model.embed_class_names(labels, tiny_tokenizer))
    expected = processor.post_process_semantic_segmentation(outputs, target_sizes=[(60, 200)])[0].numpy()
    np.testing.assert_array_equal(result["label_map"], expected)


def test_zero_shot_on_stored_vocabulary_equals_image_segmentation(checkpoint, zero_shot):
    image = images()[2]
    stock = pipeline("image-segmentation", model=str(checkpoint))(image)
    ours = zero_shot(image)  # no candidate_labels: the checkpoint's vocabulary
    assert ours["labels"] == LABELS
    for segment in stock:
        index = LABELS.index(segment["label"])
        np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0, ours["label_map"] == index)


def test_zero_shot_threshold_and_errors(zero_shot):
    result = zero_shot(images()[0], candidate_labels=["a", "b"], score_threshold=1e9)
    assert (result["label_map"] == -1).all() and result["segments"] == []
    with pytest.raises(ValueError, match="empty"):
        zero_shot(images()[0], candidate_labels=[])
    with pytest.raises(ValueError, match="Duplicate"):
        zero_shot(images()[0], candidate_labels="cat, Cat")


def test_unknown_pipeline_parameters_are_refused(checkpoint, zero_shot):
    """transformers' pipelines drop parameters they do not know: `threshold=` (the stock pipeline's name) or a typo
    segmented every pixel with no threshold at all."""
    with pytest.raises(TypeError, match=r"threshold \(did you mean score_threshold\?\)"):
        zero_shot(images()[0], candidate_labels="a, b", threshold=0.5)
    with pytest.raises(TypeError, match=r"score_treshold \(did you mean score_threshold\?\)"):
        zero_shot(images()[0], candidate_labels="a, b", score_treshold=0.5)
    with pytest.raises(TypeError, match=r"labels \(did you mean candidate_labels\?\)"):
        pipeline("zero-shot-image-segmentation", model=str(checkpoint), labels=["a"])


def test_images_by_keyword_and_an_empty_list(checkpoint, zero_shot):
    """`image=` as transformers' zero-shot pipelines name it (also `images=`, `inputs=`); an empty list of images
    (an empty folder's) gives no results in both pipelines instead of transformers' IndexError, its parameters still
    checked."""
    first = zero_shot(images()[0], candidate_labels="a, b")["label_map"]
    for name in ("image", "images", "inputs"):
        np.testing.assert_array_equal(zero_shot(**{name: images()[0]}, candidate_labels="a, b")["label_map"], first)
    with pytest.raises(TypeError, match="got an image and image="):
        zero_shot(images()[0], image=images()[1])
    with pytest.raises(TypeError, match="got none"):
        zero_shot(candidate_labels="a, b")
    assert zero_shot([], candidate_labels="a, b", batch_size=2) == []
    with pytest.raises(TypeError, match="did you mean score_threshold"):
        zero_shot([], threshold=0.5)
    stock = pipeline("image-segmentation", model=str(checkpoint))
    assert stock([]) == [] and stock([], batch_size=2) == []
    with pytest.raises(ValueError, match="score_threshold"):
        stock([], threshold=0.5)


def test_candidate_labels_never_read_a_file(zero_shot, tmp_path):
    """A service passing its users' text as candidate_labels must not hand them the lines of a file they name."""
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n")
    result = zero_shot(images()[0], candidate_labels=str(secret))
    assert result["labels"] == [str(secret)] and "hunter2" not in str(result["labels"])


def test_missing_model_folder():
    with pytest.raises(OSError):
        pipeline("zero-shot-image-segmentation", model="/no/such/folder")


def test_a_loaded_model_saves_with_its_tokenizer_and_processor(checkpoint, tmp_path):
    """Load, change, save: the README's flow. The copy lost its tokenizer (the zero-shot pipeline then failed deep in
    transformers) and its processor's resolution (the default 640 px instead of the checkpoint's: other labels)."""
    model = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint)
    model.set_vocabulary(["tree", "river, stream"])  # the checkpoint's own tokenizer, no tokenizer= needed
    model.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "tokenizer.json").is_file()
    saved = AutoProcessor.from_pretrained(checkpoint).image_processor
    copied = AutoProcessor.from_pretrained(tmp_path / "copy").image_processor
    assert copied.size == saved.size == {"shortest_edge": 96, "longest_edge": 256}
    original = pipeline("zero-shot-image-segmentation", model=str(checkpoint))
    copy = pipeline("zero-shot-image-segmentation", model=str(tmp_path / "copy"))
    image = images()[1]
    np.testing.assert_array_equal(copy(image)["label_map"],
                                  original(image, candidate_labels=["tree", "river, stream"])["label_map"])
    assert copy(image, candidate_labels=["sky", "car"])["labels"] == ["sky", "car"]


def test_zero_shot_pipeline_takes_a_model_object_alone(checkpoint, tiny_clip_dir, tiny_tokenizer, zero_shot,
                                                        tmp_path):
    """pipeline(model=model) with no image_processor= was transformers' "Impossible to guess which image processor
    to use": a loaded model brings its checkpoint's processor (same labels as the folder), a new one from_clip the
    default processor for its windows."""
    loaded = pipeline("zero-shot-image-segmentation", model=MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint))
    image = images()[1]
    np.testing.assert_array_equal(loaded(image, candidate_labels="cat; dog")["label_map"],
                                  zero_shot(image, candidate_labels="cat; dog")["label_map"])
    fresh = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=["sky", "road"],
                                                      tokenizer=tiny_tokenizer, num_queries=8, hidden_dim=32,
                                                      num_decoder_heads=4, prompt_templates=TEMPLATES)
    segmenter = pipeline("zero-shot-image-segmentation", model=fresh)
    assert segmenter.image_processor.to_dict() == MROVSegImageProcessor.from_model_config(fresh.config).to_dict()
    stock = pipeline("image-segmentation", model=fresh)  # the stock task too
    assert stock.image_processor.to_dict() == segmenter.image_processor.to_dict()
    assert {segment["label"] for segment in stock(image)} <= {"sky", "road"}
    assert segmenter(image, candidate_labels="cat; dog")["label_map"].shape == (60, 200)
    # a folder saved without a processor: the defaults, said (the checkpoint's resolution is unknown)
    import shutil

    bare = tmp_path / "no-processor"
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("*processor_config.json"))
    with pytest.warns(UserWarning, match="has no usable MROVSeg image processor; images are resized as the defaults"):
        pipeline("zero-shot-image-segmentation", model=str(bare))


def test_another_models_image_processor_is_named(checkpoint):
    """image_processor= CLIP's (it cuts no slices): "Subtask None is not supported" or a TypeError about
    return_pixel_mask before; one message naming the processor MROVSeg needs."""
    from transformers import CLIPImageProcessor

    clip = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    for task in ("image-segmentation", "zero-shot-image-segmentation"):
        with pytest.raises(ValueError, match="MROVSeg needs its own image processor"):
            pipeline(task, model=str(checkpoint), image_processor=clip)


def test_the_stock_task_serves_other_models_as_before(tmp_path):
    """`import modeling_mrovseg` swaps the stock image-segmentation class for a subclass: a SegFormer still runs through
    it with its own processor, unchecked."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    config = SegformerConfig(num_labels=3, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=16)
    segmenter = pipeline("image-segmentation", model=SegformerForSemanticSegmentation(config).eval(),
                         image_processor=SegformerImageProcessor(size={"height": 64, "width": 64}))
    segments = segmenter(Image.fromarray(random_image(50, 60)))
    assert segments and all(s["mask"].size == (60, 50) for s in segments)
    assert segmenter(Image.fromarray(random_image(50, 60)), threshold=0.5)  # its thresholds are its own business
    # without a processor it fails as in transformers (MROVSeg's model objects bring theirs)
    with pytest.raises(Exception, match="Impossible to guess which image processor to use"):
        pipeline("image-segmentation", model=SegformerForSemanticSegmentation(config).eval())
    SegformerForSemanticSegmentation(config).save_pretrained(tmp_path)  # a folder without one: transformers' error
    with pytest.raises(OSError, match="Can't load image processor for"):
        pipeline("image-segmentation", model=str(tmp_path))


def test_stock_thresholds_that_do_nothing_for_mrovseg_are_refused(checkpoint):
    """transformers drops `threshold=` for semantic segmentation: every pixel was labelled as without it."""
    stock = pipeline("image-segmentation", model=str(checkpoint))
    for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold"):
        with pytest.raises(ValueError, match=f"{name} does nothing for MROVSeg's semantic segmentation"):
            stock(images()[0], **{name: 0.5})
    labels = [segment["label"] for segment in stock(images()[0])]
    assert [segment["label"] for segment in stock(images()[0], subtask="semantic")] == labels


def test_a_checkpoint_without_tokenizer_serves_its_vocabulary_in_both_pipelines(checkpoint, tmp_path, monkeypatch):
    """No tokenizer files: the zero-shot pipeline failed to construct (transformers' tokenizer error), and looking
    for a video processor made both pipelines ask on stdin whether to run the folder's code."""
    model = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint)
    model.clip_tokenizer = None  # none, not the checkpoint's
    model.save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "tokenizer_config.json").exists()
    monkeypatch.setattr("builtins.input", lambda *args: pytest.fail("a pipeline asked on stdin"))
    image = images()[0]
    stock = pipeline("image-segmentation", model=str(tmp_path / "bare"))(image)
    zero_shot = pipeline("zero-shot-image-segmentation", model=str(tmp_path / "bare"))
    result = zero_shot(image)
    assert result["labels"] == LABELS
    for segment in stock:
        np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0,
                                      result["label_map"] == LABELS.index(segment["label"]))
    with pytest.raises(ValueError, match="no CLIP tokenizer"):
        zero_shot(image, candidate_labels=["tree"])


# ---------------------------------------------------------------- CLI and visualisation
def test_cli_without_labels_segments_the_checkpoints_vocabulary(checkpoint, tmp_path, capsys):
    """`--labels` was required, though a checkpoint carries its vocabulary (what pipeline("image-segmentation")
    serves): without it the CLI labels with that vocabulary, says so, and writes what the stock pipeline finds; a
    checkpoint without a tokenizer works too (its stored embeddings)."""
    image = tmp_path / "street.png"
    Image.fromarray(random_image(90, 120)).save(image)
    stock = pipeline("image-segmentation", model=str(checkpoint))(str(image))
    bare = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint)
    bare.clip_tokenizer = None
    bare.save_pretrained(tmp_path / "bare")
    for model in (checkpoint, tmp_path / "bare"):
        out = tmp_path / model.name / "out"
        assert cli_main(["segment", str(image), "--model", str(model), "--out", str(out)]) == 0
        assert f"no --labels: the checkpoint's vocabulary of {len(LABELS)} class(es): {', '.join(LABELS)}" in \
            capsys.readouterr().err
        assert json.loads((out / "street.json").read_text())["labels"] == LABELS
        label_map = np.asarray(Image.open(out / "street_labels.png"))
        for segment in stock:
            np.testing.assert_array_equal(np.asarray(segment["mask"]) > 0, label_map == LABELS.index(segment["label"]))
        # --skip-done knows a run without --labels as one with the vocabulary's names
        assert cli_main(["segment", str(image), "--model", str(model), "--out", str(out), "--skip-done",
                         "--labels", ",".join(LABELS)]) == 0
        assert "1 done before" in capsys.readouterr().out


def test_cli_on_a_folder_with_a_corrupt_file(checkpoint, tmp_path, capsys):
    source = tmp_path / "photos"
    (source / "nested").mkdir(parents=True)
    Image.fromarray(random_image(90, 120)).save(source / "street.jpg")
    Image.fromarray(random_image(64, 80)).save(source / "nested" / "park.png")
    (source / "broken.png").write_bytes(b"this is not a png")
    (source / "notes.txt").write_text("ignored: not an image suffix")
    # hidden files and folders are no photos of the folder: macOS's AppleDouble `._street.jpg` (which failed and made
    # the run exit 1), thumbnails and notebook checkpoints (which were segmented as copies)
    (source / "._street.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (source / ".thumbnails").mkdir()
    Image.fromarray(random_image(20, 20)).save(source / ".thumbnails" / "street.png")
    out = tmp_path / "out"
    code = cli_main(["segment", str(source), "--model", str(checkpoint), "--labels", "sofa, couch; lamp; floor",
                     "--out", str(out), "--quiet"])
    assert code == 1  # one file failed
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "broken.png" in captured.err and "2 of 3" in captured.out
    assert "._street" not in captured.err and not list(out.glob(".*"))
    # named, a hidden folder is searched; a folder holding only hidden files says they are not searched
    assert cli_main(["segment", str(source / ".thumbnails"), "--model", str(checkpoint), "--labels", "lamp", "--out",
                     str(tmp_path / "one"), "--quiet"]) == 0
    assert (tmp_path / "one" / "street.json").is_file()
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07")
    assert cli_main(["segment", str(tmp_path / "copied"), "--model", str(checkpoint), "--labels", "lamp", "--out",
                     str(tmp_path / "none")]) == 2
    assert "1 other files, such as ._IMG_0001.jpg; hidden files and folders are not searched)" in capsys.readouterr().err
    summary = json.loads((out / "street.json").read_text())
    assert summary["labels"] == ["sofa, couch", "lamp", "floor"]
    assert abs(sum(c["pixel_share"] for c in summary["classes"].values()) - 1.0) < 1e-6
    labels_png = Image.open(out / "street_labels.png")
    assert labels_png.mode == "P" and labels_png.size == (120, 90)
    assert Image.open(out / "street_overlay.png").width > 120  # legend panel
    assert (out / "nested__park_overlay.png").exists()


@pytest.mark.parametrize("has_instructions", [False, True])
def test_cli_notes_half_precision_emulated_on_this_cpu(checkpoint, tmp_path, monkeypatch, capsys, has_instructions):
    """bfloat16 on a CPU without bf16 instructions runs emulated, 6.5x slower than float32 on this project's AVX2
    machine: the CLI says so (and how to avoid it) instead of leaving the user to wait; with them, or in float32,
    not."""
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, check, lambda: has_instructions)
    image = tmp_path / "street.png"
    Image.fromarray(random_image(90, 120)).save(image)
    args = ["segment", str(image), "--model", str(checkpoint), "--labels", "sky,road,car"]
    for dtype in ("bfloat16", "float16", "float32"):
        assert cli_main([*args, "--out", str(tmp_path / dtype), "--dtype", dtype]) == 0
        err = capsys.readouterr().err
        expected = not has_instructions and dtype != "float32"
        assert (f"note: {dtype} weights on this CPU" in err) == expected, err
        if expected:
            assert "--dtype float32" in err
    assert cli_main([*args, "--out", str(tmp_path / "quiet"), "--dtype", "bfloat16", "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_cli_dtype_loads_reduced_precision_weights(checkpoint, tmp_path):
    """--dtype bfloat16 (GPU users' choice) loads the weights in bf16; inputs follow them, scores stay float32."""
    from modeling_mrovseg.cli import load_pipeline

    image = tmp_path / "street.png"
    Image.fromarray(random_image(90, 120)).save(image)
    summaries = {}
    for dtype in ("auto", "bfloat16", "float16"):
        out = tmp_path / dtype
        args = ["segment", str(image), "--model", str(checkpoint), "--labels", "sky,road,car", "--out", str(out)]
        assert cli_main([*args, "--dtype", dtype, "--quiet"]) == 0
        summaries[dtype] = json.loads((out / "street.json").read_text())["classes"]
    for dtype in ("bfloat16", "float16"):
        assert summaries[dtype].keys() == summaries["auto"].keys()
        for name, entry in summaries[dtype].items():
            assert entry["score"] == pytest.approx(summaries["auto"][name]["score"], rel=0.05)
    assert load_pipeline(str(checkpoint), None, None, None).model.dtype == torch.float32  # as saved
    segmenter = load_pipeline(str(checkpoint), None, None, None, dtype="bfloat16")
    assert segmenter.model.dtype == torch.bfloat16
    result = segmenter(random_image(90, 120), candidate_labels=["sky", "road"])
    assert result["label_map"].shape == (90, 120) and all(isinstance(s["score"], float) for s in result["segments"])


@pytest.mark.parametrize("argv,message", [
    (["--labels", ""], "empty"),
    (["--labels", "cat,cat"], "Duplicate"),
    (["--model", "/no/such/model"], "not found"),
    (["--model", "TMP"], "has no config.json: not a saved checkpoint"),
    (["--model", "CLIP"], "is a 'clip' checkpoint, not an MROVSeg model"),  # what training starts from
])
def test_cli_argument_errors(checkpoint, tiny_clip_dir, tmp_path, capsys, argv, message):
    image = tmp_path / "x.png"
    Image.fromarray(random_image(30, 30)).save(image)
    args = {"--model": str(checkpoint), "--labels": "cat,dog", "--out": str(tmp_path / "o")}
    args.update(dict(zip(argv[::2], argv[1::2])))
    args["--model"] = {"TMP": str(tmp_path), "CLIP": str(tiny_clip_dir)}.get(args["--model"], args["--model"])
    assert cli_main(["segment", str(image), *sum(args.items(), ())]) == 2
    assert message in capsys.readouterr().err


def test_cli_version_is_the_packages(capsys):
    """`mrovseg --version`, as command-line tools answer it: the installed package's version, one source."""
    import importlib.metadata

    import modeling_mrovseg

    with pytest.raises(SystemExit) as done:
        cli_main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"mrovseg {modeling_mrovseg.__version__}\n"
    assert modeling_mrovseg.__version__ == importlib.metadata.version("mrovseg")


def test_cli_single_non_image_file(checkpoint, tmp_path, capsys):
    bogus = tmp_path / "photo.jpg"
    bogus.write_text("plain text")
    assert cli_main(["segment", str(bogus), "--model", str(checkpoint), "--labels", "cat", "--out",
                     str(tmp_path / "o")]) == 1
    assert "skipped" in capsys.readouterr().err


def test_one_class_without_a_threshold_is_noted(checkpoint, tmp_path, capsys):
    """`--labels car` labels every pixel car (each pixel gets the best class given): the CLI says so, and how to get
    a car/not-car map; with a second class or a threshold it says nothing."""
    image = tmp_path / "street.png"
    Image.fromarray(random_image(30, 40)).save(image)
    base = ["segment", str(image), "--model", str(checkpoint), "--out", str(tmp_path / "o")]
    assert cli_main([*base, "--labels", "car"]) == 0
    assert "note: with one class and no --score-threshold every pixel is labelled 'car'" in capsys.readouterr().err
    for extra in (["--labels", "car, background"], ["--labels", "car", "--score-threshold", "0.5"]):
        assert cli_main([*base, *extra]) == 0
        assert "note:" not in capsys.readouterr().err


def test_cli_continues_an_interrupted_run_with_skip_done(checkpoint, tmp_path, capsys, monkeypatch):
    """Ctrl-C in a long folder run was a traceback and a re-run started over: the CLI says how far it got, and
    --skip-done leaves out the images a run with the same labels and threshold completed (their JSON is written
    last, atomically)."""
    from modeling_mrovseg import cli

    source = tmp_path / "photos"
    source.mkdir()
    for seed in range(3):
        Image.fromarray(random_image(30, 40, seed=seed)).save(source / f"p{seed}.png")
    out = tmp_path / "out"
    base = ["segment", str(source), "--model", str(checkpoint), "--labels", "cat; dog", "--out", str(out), "--quiet"]
    real, calls = cli.segment_one, []

    def interrupted_at_the_second(*arguments, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*arguments, **kwargs)

    monkeypatch.setattr(cli, "segment_one", interrupted_at_the_second)
    assert cli_main(base) == 130
    assert "interrupted: segmented 1 of 3 images" in capsys.readouterr().err
    monkeypatch.setattr(cli, "segment_one", real)
    assert cli_main([*base, "--skip-done"]) == 0
    assert "segmented 2 of 3 images into" in capsys.readouterr().out  # "...; 1 done before (--skip-done)"
    assert cli_main([*base, "--skip-done"]) == 0
    assert "segmented 0 of 3 images" in capsys.readouterr().out
    assert len(list(out.glob("*.json"))) == 3
    # other labels or threshold: nothing is done yet
    assert cli_main([*base, "--labels", "cat; bird", "--skip-done"]) == 0  # the last --labels counts
    assert "segmented 3 of 3 images" in capsys.readouterr().out


def test_cli_refuses_to_replace_another_images_outputs(checkpoint, tmp_path, capsys, monkeypatch):
    """`mrovseg segment day2/ --out seg` after `day1/` replaced day1's img1 outputs with day2's img1 without a word:
    refused before the model loads, naming both images, unless --overwrite; the same image named by another path
    (absolute after relative) is no other image, and --skip-done knows it as done."""
    for day, seed in (("day1", 0), ("day2", 1)):
        (tmp_path / day).mkdir()
        Image.fromarray(random_image(30, 40, seed=seed)).save(tmp_path / day / "img1.png")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "seg"

    def run(*argv):
        return cli_main(["segment", *argv, "--model", str(checkpoint), "--labels", "cat; dog", "--out", str(out),
                         "--quiet"])

    assert run("day1") == 0
    first = (out / "img1_labels.png").read_bytes()
    assert run("day2") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out} holds outputs of other images under the names this run writes: img1.json and its PNGs "
        "are day1/img1.png's, not day2/img1.png's; give another --out, or --overwrite to replace them")
    assert (out / "img1_labels.png").read_bytes() == first and "day1" in (out / "img1.json").read_text()
    assert run(str(tmp_path / "day1"), "--skip-done") == 0  # day1 again, by its absolute path: done before
    assert "segmented 0 of 1 images into" in capsys.readouterr().out
    (out / "other.json").write_text("[1, 2]")  # a JSON of someone else's beside ours: not a run's summary
    Image.fromarray(random_image(30, 40, seed=2)).save(tmp_path / "day2" / "other.png")
    assert run("day2", "--overwrite", "--skip-done") == 0
    assert json.loads((out / "img1.json").read_text())["image"] == "day2/img1.png"


def test_a_synonym_of_two_classes_is_warned_of_once(checkpoint):
    """A pipeline call checks its class names when reading them and again when embedding them: the shared-synonym
    warning came from two call sites, so Python printed it twice."""
    segmenter = pipeline("zero-shot-image-segmentation", model=str(checkpoint))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per place and text
        for _ in range(2):
            segmenter(random_image(20, 30), candidate_labels=["lane, street", "street"])
    assert [str(w.message) for w in caught if "names class" in str(w.message)] == [
        "'street' names class 0 ('lane, street') and class 1 ('street'): what it describes is split between the "
        "two; give each class its own names."]


def test_parse_labels():
    assert parse_labels("sky, road ,car") == ["sky", "road", "car"]
    assert parse_labels("sofa, couch; lamp") == ["sofa, couch", "lamp"]
    many = ", ".join(f"thing {i}" for i in range(300))  # longer than a file name may be: not 'File name too long'
    # a NUL byte (no file name holds one) is no file either, and as a control character it counts as a space
    assert len(parse_labels(many)) == 300 and parse_labels("a\x00b, c") == ["a b", "c"]
    # the scripts' help says "JSON list": '["sky", "sofa, couch"]' read as text gave the names '["sky"' and ' "sofa'
    assert parse_labels('["sky", "sofa, couch"]') == ["sky", "sofa, couch"]
    with pytest.raises(ValueError, match="is not a JSON list of names"):
        parse_labels('["sky", "road"')
    # a mapping gave its keys ({"cat": 0} -> ["cat"]; id2label's ints an odd error), a number "not iterable"
    # bytes gave their byte values ("Class names must be strings, got int: 115")
    for value, kind in (({"cat": 0, "dog": 1}, "dict"), (5, "int"), (b"sky,road", "bytes")):
        with pytest.raises(ValueError, match=f"class names are a list of names or a string, got {kind}"):
            parse_labels(value)
    # a config's id2label (what a user has at hand: model.config.id2label) is taken in id order
    assert parse_labels({1: "road", 0: "sky"}) == ["sky", "road"]
    with pytest.raises(ValueError, match=r"maps the ids \[0, 2\]: class ids must run from 0 to N - 1"):
        parse_labels({0: "sky", 2: "road"})
    assert parse_labels(("sky", "road")) == ["sky", "road"] and parse_labels(np.array(["sky"])) == ["sky"]
    # a class-name file's text given as a string (`open("labels.txt").read()`, a paste into the demo's box) is read as
    # the file is: "car\nroad\ngrass" was one class named "car road grass" that took every pixel
    assert parse_labels("car\nroad\r\nsofa, couch\n") == ["car", "road", "sofa, couch"]
    # a comma list wrapped over lines stays a list (its lines end in the separator)
    assert parse_labels("car, road,\ngrass, sky") == ["car", "road", "grass", "sky"]
    assert parse_labels("sofa, couch;\nlamp") == ["sofa, couch", "lamp"]


def test_class_names_from_tables_and_numbered_lines(tmp_path):
    """Class lists as datasets ship them: a table's header was a class and each row a class whose numbers were its
    synonyms ("1, 0.1576, 11664, 1172, wall"); numbered lines were classes named "0 road"."""
    (tmp_path / "objectInfo150.csv").write_text(  # ADE20K's, synonyms joined by ";"
        "Idx,Ratio,Train,Val,Name\n1,0.1576,11664,1172,wall\n2,0.1072,6046,612,building;edifice\n")
    (tmp_path / "_classes.csv").write_text("Pixel Value, Class\n0, background\n1, car\n")  # Roboflow's
    (tmp_path / "names.tsv").write_text("id\tname\n0\troad\n1\t\"traffic cone\"\n")
    (tmp_path / "plain.csv").write_text("road\nsky\n")
    assert parse_labels(str(tmp_path / "objectInfo150.csv")) == ["wall", "building, edifice"]
    assert parse_labels(str(tmp_path / "_classes.csv")) == ["background", "car"]
    assert parse_labels(str(tmp_path / "names.tsv")) == ["road", "traffic cone"]
    assert parse_labels(str(tmp_path / "plain.csv")) == ["road", "sky"]
    (tmp_path / "shuffled.csv").write_text("id,name\n1,sky\n0,road\n")
    with pytest.raises(ValueError, match=r"numbers its rows \[1, 0\] in its 'id' column: they must run from 0 or 1"):
        parse_labels(str(tmp_path / "shuffled.csv"))
    (tmp_path / "empty.csv").write_text("\n\n")  # was an IndexError
    with pytest.raises(ValueError, match="class-name table '.*empty.csv' is empty"):
        parse_labels(str(tmp_path / "empty.csv"))
    (tmp_path / "counts.csv").write_text("Ratio,Train\n0.1,5\n")
    with pytest.raises(ValueError, match="has no column of class names \\(its columns: Ratio, Train\\)"):
        parse_labels(str(tmp_path / "counts.csv"))
    assert parse_labels("0 road\n1: sidewalk\n2\tsky") == ["road", "sidewalk", "sky"]
    assert parse_labels("1 road\n2 sky") == ["road", "sky"]
    # numbers that are part of names, or not a count from 0 or 1, stay
    assert parse_labels("2 wheeler\n3d printer") == ["2 wheeler", "3d printer"]
    assert parse_labels("5 road\n6 sky") == ["5 road", "6 sky"]


def test_class_names_from_files(tmp_path):
    """A JSON list, or one class per line (synonyms comma-separated within a line), as a labels.txt holds them."""
    (tmp_path / "names.json").write_text('["sky", "sofa, couch"]')
    (tmp_path / "labels.txt").write_text("sky\nsofa, couch\n\ntraffic cone\n")
    (tmp_path / "numbers.json").write_text("[1, 2]")
    assert parse_labels(str(tmp_path / "names.json")) == ["sky", "sofa, couch"]
    assert parse_labels(str(tmp_path / "labels.txt")) == ["sky", "sofa, couch", "traffic cone"]
    with pytest.raises(ValueError, match="must be a JSON list of names"):
        parse_labels(str(tmp_path / "numbers.json"))
    with pytest.raises(ValueError, match="not found"):
        parse_labels(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="class-name file 'labels.TXT' not found"):  # not one class "labels.TXT"
        parse_labels("labels.TXT")
    assert parse_labels(str(tmp_path / "labels.txt"), allow_files=False) == [str(tmp_path / "labels.txt")]
    # saved by Windows Notepad: a byte-order mark and CRLF lines (the BOM became part of the first name, "\ufeffsky",
    # and a JSON file with one was refused)
    (tmp_path / "notepad.txt").write_bytes("\ufeffsky\r\nsofa, couch\r\n".encode("utf-8"))
    (tmp_path / "notepad.json").write_bytes('\ufeff["sky", "road"]'.encode("utf-8"))
    assert parse_labels(str(tmp_path / "notepad.txt")) == ["sky", "sofa, couch"]
    assert parse_labels(str(tmp_path / "notepad.json")) == ["sky", "road"]
    # Windows PowerShell's `"sky", "road" > labels.txt` writes UTF-16 with a BOM (it said "is not text"); a Latin-1
    # file is named as not UTF-8
    (tmp_path / "powershell.txt").write_bytes("sky\r\nroad\r\n".encode("utf-16"))
    assert parse_labels(str(tmp_path / "powershell.txt")) == ["sky", "road"]
    (tmp_path / "latin1.txt").write_bytes("café\nroad\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8 text \(invalid continuation byte at byte 3\): "
                                         r"save it as UTF-8"):
        parse_labels(str(tmp_path / "latin1.txt"))


def test_palette_is_distinct_and_legend_is_drawn():
    colors = palette(30).astype(int)
    distances = np.sqrt(((colors[:, None] - colors[None]) ** 2).sum(-1))
    assert distances[np.triu_indices(30, 1)].min() > 25
    segmentation = np.zeros((100, 150), dtype=np.int64)
    segmentation[:, 75:] = 2
    picture = draw_segmentation(Image.fromarray(random_image(100, 150)), segmentation, ["a", "b", "c"])
    assert picture.width > 150 and picture.height >= 100
    legend = np.asarray(picture)[:, 150:]
    assert (legend == palette(3)[0]).all(-1).any() and (legend == palette(3)[2]).all(-1).any()
    assert not (legend == palette(3)[1]).all(-1).any()  # absent classes are left out of the legend
    with pytest.raises(ValueError, match="segmentation has shape"):
        draw_segmentation(Image.fromarray(random_image(10, 10)), segmentation, ["a"])
    # 150 classes on a small photo: the legend fits beside it in LEGEND_MIN_ROWS rows (it was 3,300 px tall), the
    # largest classes each with a swatch, the rest in one row
    from modeling_mrovseg.visualization import LEGEND_MIN_ROWS

    many = np.random.default_rng(0).integers(0, 150, (120, 160))
    many[:60] = 7  # the largest class
    picture = draw_segmentation(Image.fromarray(random_image(120, 160)), many, [f"class {i}" for i in range(150)])
    row = int(14 * 1.6)
    assert picture.height <= row * (LEGEND_MIN_ROWS + 1)
    assert (np.asarray(picture)[:, 160:] == palette(150)[7]).all(-1).any()
    tall = draw_segmentation(Image.fromarray(random_image(2000, 60)), many.repeat(17, 0)[:2000, :60],
                             [f"class {i}" for i in range(150)])
    assert tall.height == 2000  # a tall image has room for every class present


def test_legend_draws_class_names_of_any_script_or_says_which_it_cannot(monkeypatch):
    """PIL's bundled font has ASCII only: "café", "Straße", "кошка" were drawn as boxes. An installed font that has
    them is used; where none does, a warning names the characters (once), never silent boxes."""
    from PIL import ImageFont

    from modeling_mrovseg import visualization

    assert visualization.missing_glyphs(ImageFont.load_default(size=20), "café Straße") == {"é", "ß"}
    assert visualization.legend_font(["road  50.0%"], 20).getname()[0] == "Aileron"  # ASCII: the default, as before
    names = ["café", "Straße", "кошка"]
    if visualization._font_for(frozenset("".join(names)))[0] is None:
        pytest.skip("no installed font draws accented Latin and Cyrillic (Debian: fonts-dejavu-core)")
    segmentation = np.repeat(np.arange(3), 40)[None].repeat(30, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        picture = draw_segmentation(np.full((30, 120, 3), 255, np.uint8), segmentation, names)
    font = visualization.legend_font([f"{name}  33.3%" for name in names], 14)
    assert not visualization.missing_glyphs(font, "".join(names))
    texts = np.asarray(picture.convert("L"))[:, 120 + 32:] < 128  # right of the swatches: the names as that font draws
    assert texts.any() and np.array_equal(texts, np.asarray(draw_with(font, picture.size, names))[:, 32:] < 128)

    # nothing installed draws them: the default font, and one warning naming the characters
    visualization._font_for.cache_clear()
    monkeypatch.setattr(visualization.shutil, "which", lambda name: None)
    monkeypatch.setattr(visualization, "FALLBACK_FONTS", ())
    monkeypatch.setattr(visualization, "_reported_missing", set())
    with pytest.warns(UserWarning, match="no installed font draws 'éß'"):
        draw_segmentation(np.full((30, 120, 3), 255, np.uint8), segmentation, ["café", "Straße", "road"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not per image of a folder
        draw_segmentation(np.full((30, 120, 3), 255, np.uint8), segmentation, ["café", "Straße", "road"])
    visualization._font_for.cache_clear()


def draw_with(font, size: tuple[int, int], names: list[str]):
    """The texts of `draw_segmentation`'s legend panel (beside a 120 px wide image) redrawn with `font`."""
    from PIL import ImageDraw

    panel = Image.new("L", (size[0] - 120, size[1]), 255)
    draw, row = ImageDraw.Draw(panel), int(14 * 1.6)
    for k, name in enumerate(names):
        draw.text((row // 2 + int(14 * 1.5), row // 2 + k * row), f"{name}  33.3%", fill=0, font=font)
    return panel


def test_overlay_reads_the_image_as_the_model_does():
    """The labels the model gives a photo stored upside down (EXIF orientation 3: same size, so no shape error would
    catch it) land on the upright photo, and a float image in [0, 1] is not truncated to black."""
    upright = np.zeros((20, 30, 3), dtype=np.uint8)
    upright[:10] = 255  # white top half, labelled 1 by a model that saw it upright
    segmentation = np.zeros((20, 30), dtype=np.int64)
    segmentation[:10] = 1
    exif = Image.Exif()
    exif[0x0112] = 3
    buffer = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_180).save(buffer, format="PNG", exif=exif)
    photo = Image.open(buffer)
    picture = np.asarray(draw_segmentation(photo, segmentation, ["dark", "light"], alpha=0.5))[:, :30].astype(int)
    expected_top = np.rint(0.5 * 255 + 0.5 * palette(2)[1])  # white blended with class 1's colour
    assert np.abs(picture[:10] - expected_top).max() <= 1
    floats = draw_segmentation(upright.astype(np.float32) / 255, segmentation, ["dark", "light"])
    assert np.array_equal(np.asarray(floats)[:, :30], np.asarray(draw_segmentation(upright, segmentation,
                                                                                    ["dark", "light"]))[:, :30])

def test_cli_folder_of_phone_photos_bombs_and_name_twins(checkpoint, tmp_path, capsys):
    """An EXIF-rotated JPEG, a PNG declaring 50000 x 50000 and photo.jpg beside photo.png: all handled, none lost."""
    source = tmp_path / "photos"
    source.mkdir()
    rotated = Image.fromarray(random_image(60, 100))  # stored landscape, displayed portrait (EXIF orientation 6)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(source / "phone.jpg", exif=exif)
    Image.fromarray(random_image(40, 50, seed=1)).save(source / "photo.jpg")
    Image.fromarray(random_image(40, 50, seed=2)).save(source / "photo.png")

    (source / "bomb.png").write_bytes(png_bomb())
    out = tmp_path / "out"
    code = cli_main(["segment", str(source), "--model", str(checkpoint), "--labels", "cat; dog", "--out", str(out),
                     "--quiet"])
    captured = capsys.readouterr()
    assert code == 1 and "3 of 4" in captured.out  # the bomb is skipped with its name, the rest segmented
    assert "bomb.png" in captured.err and "pixels" in captured.err
    assert Image.open(out / "phone_labels.png").size == (60, 100)  # portrait, as displayed
    assert (out / "photo_jpg_labels.png").exists() and (out / "photo_png_labels.png").exists()
    assert json.loads((out / "photo_png.json").read_text())["image"].endswith("photo.png")


def test_cli_folder_of_heic_avif_photos_and_videos(checkpoint, tmp_path, capsys):
    """An iPhone's folder: HEIC photos (read with pillow-heif, which applies their rotation), an AVIF, a Live Photo's
    video (left out with a note) and a damaged HEIC (reported, the rest segmented)."""
    import pillow_heif

    pillow_heif.register_heif_opener()  # to write the photos
    source = tmp_path / "DCIM"
    source.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed portrait
    Image.fromarray(random_image(48, 64)).save(source / "IMG_0001.HEIC", format="HEIF", exif=exif.tobytes())
    Image.fromarray(random_image(40, 50, seed=1)).save(source / "IMG_0002.avif", format="AVIF")
    (source / "IMG_0001.MOV").write_bytes(b"\x00\x00\x00\x14ftypqt  ")
    (source / "IMG_0003.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    out = tmp_path / "out"
    code = cli_main(["segment", str(source), "--model", str(checkpoint), "--labels", "cat; dog", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1 and "segmented 2 of 3 images" in captured.out, captured
    assert "note: left out 1 file(s) in " in captured.err and "(such as IMG_0001.MOV)" in captured.err
    assert "IMG_0003.HEIC cannot be read as an image: a HEIC/HEIF file that pillow-heif cannot decode" in captured.err
    assert Image.open(out / "IMG_0001_labels.png").size == (48, 64)  # portrait, as the phone shows it
    assert Image.open(out / "IMG_0002_labels.png").size == (50, 40)


def test_reading_heic_without_pillow_heif_names_the_package(tmp_path):
    """Where pillow-heif is not installed a HEIC photo is one line saying what to install (in a fresh interpreter:
    this one has registered the opener with PIL)."""
    import subprocess
    import sys

    import pillow_heif

    pillow_heif.register_heif_opener()  # to write the photo
    photo = tmp_path / "IMG_0001.HEIC"
    Image.fromarray(random_image(20, 30)).save(photo, format="HEIF")
    script = ("import sys; sys.modules['pillow_heif'] = None\n"
              "from modeling_mrovseg.pipelines import read_rgb\n"
              "try:\n    read_rgb(sys.argv[1])\nexcept ValueError as error:\n    print(error)\n")
    run = subprocess.run([sys.executable, "-c", script, str(photo)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.stdout.strip() == (f"{photo} cannot be read as an image: a HEIC/HEIF photo (iPhones' format), which PIL "
                                  "reads with the pillow-heif package: pip install pillow-heif"), run.stderr


def test_cli_max_pixels_reads_big_images_you_trust(checkpoint, tmp_path, capsys):
    """An aerial photo past PIL's decompression-bomb limit said "raise PIL.Image.MAX_IMAGE_PIXELS", which no CLI user
    can: `--max-pixels` sets the limit for the run (and PIL's alarm about images past half of it is left out)."""
    photo = tmp_path / "aerial.png"
    Image.fromarray(random_image(200, 300)).save(photo)  # 60,000 pixels
    base = ["segment", str(photo), "--model", str(checkpoint), "--labels", "field; road", "--quiet"]
    before = Image.MAX_IMAGE_PIXELS
    assert cli_main([*base, "--out", str(tmp_path / "a"), "--max-pixels", "50000"]) == 1
    err = capsys.readouterr().err
    assert "exceeds limit of 50000 pixels" in err and "mrovseg segment --max-pixels" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # 60,000 > 100,000 / 2: PIL warns, not the CLI
        assert cli_main([*base, "--out", str(tmp_path / "b"), "--max-pixels", "100000"]) == 0
    assert Image.open(tmp_path / "b" / "aerial_labels.png").size == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == before  # the library's limit is the CLI run's only


def test_cli_full_disk_stops_with_a_line_and_leaves_no_truncated_file(checkpoint, tmp_path, capsys, monkeypatch):
    """No space left while writing an overlay ended in PIL's traceback with a truncated PNG in --out; now the run
    stops with one line naming the file and how to continue, the PNG is written whole or not at all, and
    --skip-done finishes the rest."""
    import errno

    source = tmp_path / "photos"
    source.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(random_image(30, 40, seed=ord(name))).save(source / f"{name}.png")
    save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if "b_overlay" in str(fp):
            Path(fp).write_bytes(b"\x89PNG half")  # what a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    argv = ["segment", str(source), "--model", str(checkpoint), "--labels", "cat; dog", "--out", str(out), "--quiet"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out / 'b_overlay.png'}: No space left on device; segmented 1 of 3 images" in err
    assert "--skip-done" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a_labels.png", "a_overlay.png", "b_labels.png"]
    monkeypatch.setattr(Image.Image, "save", save)  # room again
    assert cli_main([*argv, "--skip-done"]) == 0
    assert "segmented 2 of 3 images" in capsys.readouterr().out and (out / "b_overlay.png").is_file()


def test_cli_output_inside_the_source_folder_and_names_that_meet(checkpoint, tmp_path, capsys):
    """`--out photos/segmented` run twice segments the photos, never the last run's overlays; photo.JPG beside
    photo.jpg and a/b.jpg beside a__b.jpg each keep their own outputs."""
    source = tmp_path / "photos"
    (source / "a").mkdir(parents=True)
    for seed, name in enumerate(["photo.jpg", "photo.JPG", "a/b.jpg", "a__b.jpg"]):
        Image.fromarray(random_image(30, 40, seed=seed)).save(source / name, format="JPEG")
    out = source / "segmented"
    for _ in range(2):
        code = cli_main(["segment", str(source), "--model", str(checkpoint), "--labels", "cat; dog", "--out",
                         str(out), "--quiet"])
        assert code == 0 and "segmented 4 of 4" in capsys.readouterr().out
    summaries = sorted(out.glob("*.json"))
    assert len(summaries) == 4 and len(list(out.glob("*_overlay.png"))) == 4
    for same in (source, tmp_path):  # the source folder itself, or one holding it: refused, nothing written
        assert cli_main(["segment", str(source), "--model", str(checkpoint), "--labels", "cat", "--out", str(same),
                         "--quiet"]) == 2
        assert "holds the source folder" in capsys.readouterr().err
    assert len(list(source.glob("*.png"))) == 0
    assert sorted(Path(json.loads(p.read_text())["image"]).relative_to(source).as_posix() for p in summaries) == [
        "a/b.jpg", "a__b.jpg", "photo.JPG", "photo.jpg"]

def test_cli_with_more_than_255_classes_writes_16_bit_labels(checkpoint, tmp_path, capsys):
    """ADE20K-847's names: the palette PNG had no room past 256 entries, so every image was 'skipped: invalid palette
    size' (and uint8 ids would have wrapped): the labels are a 16-bit grey PNG of class ids, 65535 unlabelled."""
    image = tmp_path / "street.png"
    Image.fromarray(random_image(40, 60)).save(image)
    names = tmp_path / "names.json"
    names.write_text(json.dumps([f"thing {i}" for i in range(300)]))
    out = tmp_path / "out"
    code = cli_main(["segment", str(image), "--model", str(checkpoint), "--labels", str(names), "--out", str(out),
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    labels = Image.open(out / "street_labels.png")
    summary = json.loads((out / "street.json").read_text())
    assert labels.mode == "I;16" and labels.size == (60, 40)
    ids = np.unique(np.asarray(labels))
    assert {f"thing {i}" for i in ids} == set(summary["classes"])
    assert Image.open(out / "street_overlay.png").width > 60


def test_cli_takes_several_files_folders_and_urls(checkpoint, tmp_path, capsys, monkeypatch):
    """`mrovseg segment photos/*.jpg`: the shell hands over many files (argparse refused the second), folders and
    URLs mix; each image once, every output its own name."""
    from modeling_mrovseg.pipelines import httpx

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        for seed, name in enumerate(["x.jpg", "y.png"]):
            Image.fromarray(random_image(30, 40, seed=seed)).save(tmp_path / folder / name)
    served = io.BytesIO()
    Image.fromarray(random_image(30, 40, seed=9)).save(served, format="PNG")
    monkeypatch.setattr(httpx, "get", lambda url, timeout=None, follow_redirects=False: httpx.Response(
        200, content=served.getvalue(), request=httpx.Request("GET", url)))
    out = tmp_path / "out"
    sources = [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.jpg"), str(tmp_path / "b"),
               "https://example.com/photos/street.png?size=large"]
    code = cli_main(["segment", *sources, "--model", str(checkpoint), "--labels", "cat; dog", "--out", str(out),
                     "--quiet"])
    assert code == 0 and "segmented 4 of 4" in capsys.readouterr().out  # b/x.jpg named twice, segmented once
    assert sorted(p.name for p in out.glob("*.json")) == ["street.json", "x_jpg.json", "x_jpg_2.json", "y.json"]
    assert json.loads((out / "street.json").read_text())["image"] == sources[-1]
    assert Image.open(out / "street_labels.png").size == (40, 30)


def test_cli_says_in_one_line_why_a_url_is_skipped(checkpoint, tmp_path, capsys, monkeypatch):
    """A 404 printed httpx's two lines (the second a link about status codes), a web page in place of the photo
    "cannot identify image file <_io.BytesIO object at 0x...>", and each line was glued onto the progress bar."""
    from modeling_mrovseg.pipelines import httpx

    pages = {"https://example.com/gone.png": (404, "text/html", b"<html>gone</html>"),
             "https://example.com/photo-page": (200, "text/html; charset=utf-8", b"<html>a photo</html>"),
             "https://example.com/odd.bin": (200, "application/octet-stream", b"GIF89a but not really")}

    def get(url, timeout=None, follow_redirects=False):
        status, kind, body = pages[url]
        return httpx.Response(status, content=body, headers={"content-type": kind}, request=httpx.Request("GET", url))

    monkeypatch.setattr(httpx, "get", get)
    code = cli_main(["segment", *pages, "--model", str(checkpoint), "--labels", "cat, dog", "--out", str(tmp_path)])
    lines = [line.strip("\r ") for line in capsys.readouterr().err.splitlines() if line.startswith(("skipped", "\r"))]
    skipped = [line for line in lines if line.startswith("skipped")]
    assert code == 1 and skipped == [
        "skipped https://example.com/gone.png cannot be downloaded: Client error '404 Not Found' for url "
        "'https://example.com/gone.png'",
        "skipped https://example.com/photo-page is not an image: the server sent text/html",
        "skipped https://example.com/odd.bin cannot be read as an image: not a format PIL reads"]


@pytest.mark.parametrize("argv,message", [
    (["--resolution", "-5"], "--resolution"),
    (["--resolution", "100000"], "--resolution"),
    (["--slice-batch-size", "-1"], "--slice-batch-size"),
    (["--score-threshold", "nan"], "--score-threshold"),
    (["--dtype", "int8"], "--dtype"),
    (["--compile", "fastest"], "--compile: give one of torch.compile's modes"),
])
def test_cli_out_of_range_numbers_are_usage_errors(checkpoint, tmp_path, capsys, argv, message):
    image = tmp_path / "x.png"
    Image.fromarray(random_image(30, 30)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["segment", str(image), "--model", str(checkpoint), "--labels", "cat", "--out", str(tmp_path / "o"),
                  *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_damaged_files_are_named_in_one_line(checkpoint, tmp_path, capsys):
    """A model.safetensors cut short (an interrupted download or save): safetensors' own error is neither an OSError
    nor a ValueError, and the pipeline wrapped it with its traceback; the CLI printed a traceback."""
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(OSError, match="the weights of .*damaged are damaged or incomplete"):
        MROVSegForOpenVocabSegmentation.from_pretrained(damaged)
    image = tmp_path / "x.png"
    Image.fromarray(random_image(30, 30)).save(image)
    assert cli_main(["segment", str(image), "--model", str(damaged), "--labels", "cat", "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the weights of") and "Traceback" not in err and len(err.splitlines()) == 1
    # a tokenizer.json cut short: named (it said "no CLIP tokenizer"), once before any image (it was once per image)
    shutil.copy(checkpoint / "model.safetensors", damaged / "model.safetensors")
    text = (damaged / "tokenizer.json").read_text()
    (damaged / "tokenizer.json").write_text(text[: len(text) // 2])
    Image.fromarray(random_image(30, 30)).save(tmp_path / "y.png")
    assert cli_main(["segment", str(image), str(tmp_path / "y.png"), "--model", str(damaged), "--labels", "cat",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: This checkpoint has no CLIP tokenizer (its tokenizer does not load: ")
    assert len(err.splitlines()) == 1 and not (tmp_path / "o" / "x.json").exists()


def test_cli_unusable_out_and_missing_cuda(checkpoint, tmp_path, capsys, monkeypatch):
    image = tmp_path / "x.png"
    Image.fromarray(random_image(30, 30)).save(image)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("not a folder")
    base = ["segment", str(image), "--model", str(checkpoint), "--labels", "cat"]
    assert cli_main([*base, "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli_main([*base, "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert cli_main([*base, "--out", str(tmp_path / "o"), "--device", "toaster"]) == 2
    assert "not a device name" in capsys.readouterr().err
    iphone = tmp_path / "iphone"  # a phone's videos only: the message says what was looked for and found
    iphone.mkdir()
    (iphone / "IMG_0001.MOV").write_bytes(b"\x00\x00\x00\x14ftypqt  ")
    assert cli_main(["segment", str(iphone), *base[2:], "--out", str(tmp_path / "o")]) == 2
    assert ("(looked for .avif, .bmp, .gif, .heic, .heif, .jfif, .jpeg, .jpg, .png, .tif, .tiff, .webp; 1 other files, "
            "such as IMG_0001.MOV)") in capsys.readouterr().err


MIXED_SIZES = ((90, 120), (60, 200), (90, 120), (150, 80), (40, 40))


@pytest.mark.parametrize("sizes", [((90, 120),) * 3, MIXED_SIZES], ids=["same-size", "mixed-sizes"])
def test_stock_pipeline_batched_equals_one_at_a_time(checkpoint, sizes):
    """transformers' own collate pads the processor's per-image outputs; the model runs mixed grids per grid."""
    images = [Image.fromarray(random_image(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
    stock = pipeline("image-segmentation", model=str(checkpoint))
    singles = [stock(image) for image in images]
    for batch_size in (2, 3):
        for one, batched in zip(singles, stock(images, batch_size=batch_size), strict=True):
            assert [s["label"] for s in one] == [s["label"] for s in batched]
            for a, b in zip(one, batched):
                assert a["mask"].size == b["mask"].size
                assert np.array_equal(np.asarray(a["mask"]), np.asarray(b["mask"]))


def test_model_runs_a_collated_batch_of_mixed_grids_per_grid(checkpoint):
    """Single-image inputs padded along K (as pipelines collate them) give each image's own logits; mask logits are
    padded with edge values to the largest canvas and image_sizes place each image in it."""
    from transformers.pipelines.base import pad_collate_fn

    model = MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint).eval()
    processor = MROVSegImageProcessor.from_pretrained(checkpoint)
    items = [dict(processor(random_image(h, w, seed=h), return_tensors="pt")) for h, w in ((90, 120), (60, 200))]
    batch = pad_collate_fn(None, processor)(items)
    assert "pixel_mask" not in batch and batch["pixel_values_slices"].shape[1] == max(
        item["pixel_values_slices"].shape[1] for item in items)
    with torch.inference_mode():
        together = model(**batch)
        alone = [model(**item) for item in items]
    height, width = (max(item["image_sizes"][0, k].item() for item in items) for k in (2, 3))
    for i, single in enumerate(alone):
        assert torch.allclose(together.class_queries_logits[i], single.class_queries_logits[0], atol=1e-5)
        low_h, low_w = single.masks_queries_logits.shape[-2:]
        assert torch.allclose(together.masks_queries_logits[i, :, :low_h, :low_w], single.masks_queries_logits[0],
                              atol=1e-5)
        assert together.image_sizes[i].tolist() == [*single.image_sizes[0, :2].tolist(), height, width]
    labels = processor.post_process_semantic_segmentation(together, target_sizes=[(90, 120), (60, 200)])
    for label, single in zip(labels, alone):
        assert torch.equal(label, processor.post_process_semantic_segmentation(single, target_sizes=[label.shape])[0])
    with pytest.raises(ValueError, match="one slice grid"):
        model(**batch, labels=torch.zeros(2, 10, 10, dtype=torch.long))


def test_zero_shot_pipeline_batched_equals_one_at_a_time(zero_shot):
    """batch_size=2 with mixed sizes: images of one size run together, the others alone; results identical."""
    mixed = [Image.fromarray(random_image(h, w, seed=h)) for h, w in ((90, 120), (60, 200), (90, 120), (150, 80))]
    singles = [zero_shot(image, candidate_labels="cat; dog; sofa") for image in mixed]
    batched = zero_shot(mixed, candidate_labels="cat; dog; sofa", batch_size=2)
    for one, many in zip(singles, batched):
        assert np.array_equal(one["label_map"], many["label_map"])
        assert [(s["label"], round(s["score"], 5)) for s in one["segments"]] == \
            [(s["label"], round(s["score"], 5)) for s in many["segments"]]
    # a generator (a stream of images, as transformers' pipelines take): it had no len() and crashed the loader
    for batch_size in (1, 2):
        streamed = list(zero_shot((image for image in mixed), candidate_labels="cat; dog; sofa", batch_size=batch_size))
        assert len(streamed) == 4
        assert all(np.array_equal(one["label_map"], many["label_map"]) for one, many in zip(singles, streamed))


def test_zero_shot_pipeline_takes_dicts_with_their_own_labels(zero_shot):
    """[{"image", "candidate_labels"}, ...] as transformers' zero-shot detection takes them: each image its own names,
    batched or not, equal to calling with those names; a dict without an image is a clear error."""
    images = [Image.fromarray(random_image(90, 120, seed=s)) for s in range(3)]
    names = ["cat; dog", "road; sky; car", "cat; dog"]
    singles = [zero_shot(image, candidate_labels=labels) for image, labels in zip(images, names)]
    for batch_size in (1, 2):
        dicts = zero_shot([{"image": i, "candidate_labels": n} for i, n in zip(images, names)], batch_size=batch_size)
        for one, many in zip(singles, dicts):
            assert one["labels"] == many["labels"] and np.array_equal(one["label_map"], many["label_map"])
    default = zero_shot({"image": images[0]}, candidate_labels="cat; dog")  # the call's names as the fallback
    assert default["labels"] == ["cat", "dog"] and np.array_equal(default["label_map"], singles[0]["label_map"])
    with pytest.raises(ValueError, match="holds 'image' and optionally 'candidate_labels'"):
        zero_shot({"picture": images[0]})

def test_zero_shot_pipeline_compile_flag(checkpoint):
    """compile=True wraps the model's calls in torch.compile (nn.Module.compile) and the post-processing too; the
    compiled forward itself is tested in test_modeling (one graph, equal to eager)."""
    compiled = pipeline("zero-shot-image-segmentation", model=str(checkpoint), compile=True)
    assert compiled.compiled is True and compiled.model._compiled_call_impl is not None
    plain = pipeline("zero-shot-image-segmentation", model=str(checkpoint))
    assert plain.compiled is False and plain.model._compiled_call_impl is None


def test_zero_shot_pipeline_compile_modes(checkpoint, zero_shot, monkeypatch):
    """compile="reduce-overhead" (CUDA graphs): each model call begins a graph step and its outputs are copied out
    before the next call, since a replay writes into the memory of the last one. A stand-in for the replay (outputs
    written into the same tensors every call) over a batch of mixed sizes (several calls per `_forward`) gives the
    plain pipeline's results; without the copies it would not. Unknown modes are a clear error."""
    graphed = pipeline("zero-shot-image-segmentation", model=str(checkpoint), compile="reduce-overhead")
    assert graphed.compiled and graphed.cuda_graphs and graphed.model._compiled_call_impl is not None
    assert not pipeline("zero-shot-image-segmentation", model=str(checkpoint), compile=True).cuda_graphs
    with pytest.raises(ValueError, match="one of torch.compile's modes"):
        pipeline("zero-shot-image-segmentation", model=str(checkpoint), compile="fastest")

    graphed.model._compiled_call_impl = None  # the graphs themselves need a GPU: an eager model that reuses memory
    eager_forward, steps, replayed = graphed.model.forward, [], {}

    def replay(*args, **kwargs):
        outputs = eager_forward(*args, **kwargs)
        for name in ("class_queries_logits", "masks_queries_logits"):
            fresh = getattr(outputs, name)
            static = replayed.setdefault(name, torch.empty(0))
            static.resize_(fresh.shape).copy_(fresh)  # the same storage every call (grown where needed)
            setattr(outputs, name, static)
            outputs[name] = static
        return outputs

    monkeypatch.setattr(graphed.model, "forward", replay)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    mixed = [Image.fromarray(random_image(h, w, seed=h)) for h, w in ((90, 120), (60, 200), (150, 80))]
    expected = [zero_shot(image, candidate_labels="cat; dog; sofa") for image in mixed]
    results = graphed(mixed, candidate_labels="cat; dog; sofa", batch_size=3)
    assert len(steps) == 3  # one graph step per model call: three sizes, three calls in one batch
    for one, many in zip(expected, results, strict=True):
        assert np.array_equal(one["label_map"], many["label_map"])
        assert [(s["label"], round(s["score"], 5)) for s in one["segments"]] == \
            [(s["label"], round(s["score"], 5)) for s in many["segments"]]


@pytest.mark.parametrize("argv,mode", [([], False), (["--compile"], True), (["--compile", "reduce-overhead"],
                                                                          "reduce-overhead")])
def test_cli_compile_flag_takes_an_optional_mode(checkpoint, tmp_path, monkeypatch, argv, mode):
    """`--compile` alone compiles in the default mode, `--compile reduce-overhead` with CUDA graphs; the mode reaches
    the pipeline as its `compile=` argument."""
    import modeling_mrovseg.cli as cli

    seen = []

    def record(model, device, resolution, slice_batch_size, compile, dtype):
        seen.append(compile)
        raise ValueError("stop here")  # the CLI reports it and exits 2: no model is loaded

    monkeypatch.setattr(cli, "load_pipeline", record)
    image = tmp_path / "x.png"
    Image.fromarray(random_image(30, 30)).save(image)
    assert cli_main(["segment", str(image), "--model", str(checkpoint), "--labels", "cat", "--out",
                     str(tmp_path / "o"), *argv]) == 2
    assert seen == [mode]


def test_files_are_replaced_whole_or_not_at_all(tmp_path):
    """write_atomically (the CLI's JSON, the model card, training's results): a write that fails half-way leaves the
    earlier file as it was; the bytes are UTF-8 with "\\n" line ends on every system (the card's stamp hashes them)."""
    from modeling_mrovseg.cli import write_atomically

    path = tmp_path / "README.md"
    write_atomically(path, "café\nline two\n")
    assert path.read_bytes() == "café\nline two\n".encode("utf-8")
    with pytest.raises(UnicodeEncodeError):
        write_atomically(path, "half\ud800")  # a lone surrogate cannot be encoded: the write fails midway
    assert path.read_bytes() == "café\nline two\n".encode("utf-8")


def test_cli_leaves_named_pipes_alone(checkpoint, tmp_path, capsys):
    """A named pipe called photo.jpg is no photo: reading it waits for a writer forever. In a folder it is left out;
    named on its own it is a usage error (was "does not exist")."""
    import os

    Image.fromarray(random_image(30, 40)).save(tmp_path / "real.png")
    os.mkfifo(tmp_path / "pipe.jpg")
    base = ["--model", str(checkpoint), "--labels", "cat, dog", "--out", str(tmp_path / "out"), "--quiet"]
    assert cli_main(["segment", str(tmp_path), *base]) == 0
    assert "segmented 1 of 1" in capsys.readouterr().out
    assert cli_main(["segment", str(tmp_path / "pipe.jpg"), *base]) == 2
    assert "pipe.jpg is not a regular file or folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pipe.jpg is not a regular file"):  # the pipelines' reading too
        read_rgb(str(tmp_path / "pipe.jpg"))


def test_a_checkpoint_that_lacks_weights_is_refused_for_segmenting(checkpoint, tmp_path, capsys):
    """transformers fills weights a checkpoint lacks with random ones and only logs a report: both pipelines, the CLI
    and evaluation segmented with a random head. Loading it (to train from) still works and says what is missing."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, broken / "model.safetensors",
              metadata={"format": "pt"})
    model, info = MROVSegForOpenVocabSegmentation.from_pretrained(broken, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.no_object_embedding"]
    message = "lacks 1 of this model's weights (classifier.no_object_embedding, ...), which are random now"
    with pytest.raises(ValueError, match=re.escape(message)):
        model.check_complete()
    for task in ("zero-shot-image-segmentation", "image-segmentation"):
        with pytest.raises(ValueError, match=re.escape(message)):
            pipeline(task, model=str(broken))
    Image.fromarray(random_image(30, 40)).save(tmp_path / "photo.png")
    assert cli_main(["segment", str(tmp_path / "photo.png"), "--model", str(broken), "--labels", "a, b", "--out",
                     str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    MROVSegForOpenVocabSegmentation.from_pretrained(checkpoint).check_complete()  # a whole one passes


def test_a_clip_folder_where_an_mrovseg_checkpoint_is_needed(tiny_clip_dir, tmp_path, capsys):
    """The CLIP that training starts from, given to evaluation or export: a traceback ending in "MROVSegConfig has no
    field(s) logit_scale_init_value" (transformers builds the config from CLIP's with a warning); to the zero-shot
    pipeline: "'CLIPModel' object has no attribute 'check_complete'". One message naming the folder and from_clip."""
    from modeling_mrovseg.export import main as export_main
    from training import evaluate

    message = rf"{re.escape(str(tiny_clip_dir))} is a 'clip' checkpoint, not an MROVSeg model: .*from_clip"
    with pytest.raises(ValueError, match=message):
        MROVSegForOpenVocabSegmentation.from_pretrained(tiny_clip_dir)
    with pytest.raises(ValueError, match=message):
        pipeline("zero-shot-image-segmentation", model=str(tiny_clip_dir))
    assert export_main(["--model", str(tiny_clip_dir), "--height", "64", "--width", "64",
                        "--out", str(tmp_path / "x.onnx")]) == 2
    assert re.search(message, capsys.readouterr().err)
    from processing.synthetic import write_parquet

    data = write_parquet(tmp_path / "data", num_train=1, num_val=1, height=64, width=64)
    with pytest.raises(SystemExit, match=f"error: cannot load --model .*{message}"):
        evaluate.main(["--model", str(tiny_clip_dir), "--dataset", str(data), "--no_progress"])


def test_home_relative_paths_after_an_equals_sign(checkpoint, tmp_path, monkeypatch, capsys):
    """The shell leaves `--out=~/results` as it is: the CLI wrote into a folder named "~" in the working directory.
    Every path argument of the scripts now expands it (here the CLI's image, model and output)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    Image.fromarray(random_image(30, 40)).save(tmp_path / "photo.png")
    import shutil

    shutil.copytree(checkpoint, tmp_path / "model")
    assert cli_main(["segment", "~/photo.png", "--model=~/model", "--labels", "cat", "--out=~/results", "--quiet"]) == 0
    assert (tmp_path / "results" / "photo.json").is_file() and not (tmp_path / "~").exists()
    from training import evaluate, train

    (tmp_path / "data").mkdir()
    parsed = train.parse_args(["--model=~/model", "--dataset=~/data", "--output_dir=~/run"])
    assert (parsed.model, parsed.dataset, parsed.output_dir) == tuple(str(tmp_path / name) for name in
                                                                      ("model", "data", "run"))
    parsed = evaluate.parse_args(["--model=~/model", "--dataset=~/data", "--output=~/eval.json"])
    assert parsed.output == str(tmp_path / "eval.json")
