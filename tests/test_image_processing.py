import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from modeling_mrovseg import MROVSegImageProcessor, SliceGrid, slice_windows, stitch_windows
from modeling_mrovseg.image_processing_mrovseg import resized_size
from modeling_mrovseg.modeling_mrovseg import MROVSegOutput
from tests.helpers import random_image

PATCH = 8


# ---------------------------------------------------------------- geometry, property-based
@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 400), width=st.integers(1, 400), window_patches=st.integers(1, 6),
       overlap_patches=st.integers(0, 5))
def test_grid_covers_every_pixel_exactly(height, width, window_patches, overlap_patches):
    window = window_patches * PATCH
    overlap = min(overlap_patches, window_patches - 1) * PATCH
    grid = SliceGrid.covering(height, width, window, overlap)
    assert grid.height >= height and grid.width >= width
    # smallest such grid: one row/column fewer would not reach the edge
    assert grid.rows == 1 or grid.height - grid.stride < height
    assert grid.cols == 1 or grid.width - grid.stride < width
    coverage = np.zeros((grid.height, grid.width), dtype=int)
    for top, left in grid.offsets():
        assert top + window <= grid.height and left + window <= grid.width
        coverage[top : top + window, left : left + window] += 1
    assert coverage.min() >= 1
    last_top, last_left = grid.offsets()[-1]
    assert last_top + window == grid.height and last_left + window == grid.width  # flush with the edge


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 4), window_patches=st.integers(1, 4),
       overlap_patches=st.integers(0, 3), channels=st.integers(1, 3))
def test_stitch_inverts_slice(rows, cols, window_patches, overlap_patches, channels):
    window = window_patches * PATCH
    overlap = min(overlap_patches, window_patches - 1) * PATCH
    grid = SliceGrid(rows, cols, window, window - overlap)
    canvas = torch.randn(2, channels, grid.height, grid.width, dtype=torch.float64)
    windows = slice_windows(canvas, grid)
    assert windows.shape == (2, rows * cols, channels, window, window)
    for k, (top, left) in enumerate(grid.offsets()):
        assert torch.equal(windows[:, k], canvas[..., top : top + window, left : left + window])
    torch.testing.assert_close(stitch_windows(windows, grid), canvas, rtol=0, atol=1e-12)
    # numpy and torch slicing agree
    np.testing.assert_array_equal(slice_windows(canvas.numpy(), grid), windows.numpy())
    # the same grid in token units stitches token maps
    tokens = grid.scaled(PATCH)
    token_canvas = torch.randn(1, 4, tokens.height, tokens.width)
    torch.testing.assert_close(stitch_windows(slice_windows(token_canvas, tokens), tokens), token_canvas)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 5), window=st.integers(1, 7), stride=st.integers(1, 7))
def test_stitch_averages_distinct_overlapping_windows(rows, cols, window, stride):
    """Windows that disagree where they overlap (CLIP tokens of neighbouring slices): each position is the mean of the
    windows covering it, however many (up to ceil(window / stride)^2)."""
    stride = min(stride, window)
    grid = SliceGrid(rows, cols, window, stride)
    windows = torch.randn(2, grid.num_slices, 3, window, window, dtype=torch.float64)
    total = torch.zeros(2, 3, grid.height, grid.width, dtype=torch.float64)
    count = torch.zeros(grid.height, grid.width, dtype=torch.float64)
    for k, (top, left) in enumerate(grid.offsets()):
        total[..., top : top + window, left : left + window] += windows[:, k]
        count[top : top + window, left : left + window] += 1
    torch.testing.assert_close(stitch_windows(windows, grid), total / count, rtol=0, atol=1e-12)
    pixels = (windows.abs() * 100).clamp(max=255).to(torch.uint8)  # integers average without overflow
    expected = torch.zeros_like(total)
    for k, (top, left) in enumerate(grid.offsets()):
        expected[..., top : top + window, left : left + window] += pixels[:, k]
    stitched = stitch_windows(pixels, grid)
    torch.testing.assert_close(stitched.double(), expected / count, rtol=0, atol=1e-4)


@pytest.mark.parametrize("grid", [SliceGrid(4, 5, 8, 8), SliceGrid(3, 4, 8, 6), SliceGrid(2, 3, 4, 1)],
                         ids=["no-overlap", "overlap", "overlap-beyond-half"])
def test_stitch_compiles_with_inductor_on_cpu(grid):
    """`compile=True` on a CPU: inductor's code for `F.fold` over the model's channels-last windows wrote out of bounds
    (heap corruption, then a crash or wrong maps); stitching now reshapes and pads, and compiles to the eager values."""
    torch._dynamo.reset()
    tokens = torch.randn(1 + grid.num_slices, 1 + grid.window**2, 16)[1:, 1:]  # the model's slice of CLIP states

    def stitch(states):
        windows = states.reshape(1, grid.num_slices, grid.window, grid.window, -1).permute(0, 1, 4, 2, 3)
        return stitch_windows(windows, grid)

    compiled = torch.compile(stitch, dynamic=False, fullgraph=True)
    assert torch.equal(compiled(tokens), stitch(tokens))
    torch._dynamo.reset()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(8, 300), st.integers(8, 300)), min_size=1, max_size=3),
       overlap_patches=st.integers(0, 3), shortest=st.sampled_from([64, 100, 128]))
def test_processor_slices_are_crops_of_the_normalised_canvas(sizes, overlap_patches, shortest):
    processor = MROVSegImageProcessor(slice_size=32, slice_overlap=overlap_patches * PATCH,
                                      size={"shortest_edge": shortest, "longest_edge": 320})
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    out = processor(images, return_pixel_mask=True, return_tensors="pt")
    assert "pixel_mask" not in processor(images, return_tensors="pt")  # only on request (compiled forwards)
    batch = len(images)
    rows, cols, window, stride = out["slice_grid"][0].tolist()
    assert (window, stride) == (32, 32 - overlap_patches * PATCH)
    grid = SliceGrid(rows, cols, 32, 32 - overlap_patches * PATCH)
    assert out["pixel_values"].shape == (batch, 3, 32, 32)
    assert out["pixel_values_slices"].shape == (batch, rows * cols, 3, 32, 32)
    assert out["pixel_mask"].shape == (batch, grid.height, grid.width)
    assert (out["slice_grid"] == torch.tensor([rows, cols, window, stride])).all()
    canvas = processor.stitch(out["pixel_values_slices"], out["slice_grid"][0])
    mean = torch.tensor(processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_std).view(3, 1, 1)
    for i, image in enumerate(images):
        h, w = resized_size(*image.shape[:2], processor.size)
        expected = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
        expected = (torch.from_numpy(expected).permute(2, 0, 1) - mean) / std
        torch.testing.assert_close(canvas[i, :, :h, :w], expected, rtol=0, atol=1e-5)
        assert not canvas[i, :, h:, :].any() and not canvas[i, :, :, w:].any()
        mask = out["pixel_mask"][i]
        assert mask[:h, :w].all() and mask.sum() == h * w
        assert out["image_sizes"][i].tolist() == [h, w, grid.height, grid.width]
        # each slice is the crop of the canvas
        for k, (top, left) in enumerate(grid.offsets()):
            torch.testing.assert_close(out["pixel_values_slices"][i, k], canvas[i, :, top : top + 32, left : left + 32])


def test_global_view_is_the_downsampled_canvas():
    processor = MROVSegImageProcessor(slice_size=32, size={"height": 64, "width": 96})
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[:, :48] = 255  # left half white
    out = processor(image, return_tensors="pt")
    view = out["pixel_values"][0]
    assert view.shape == (3, 32, 32)
    # canvas is 64 x 96 (grid 2 x 3); the white half maps to the left half of the global view
    assert (view[:, :, :15] > 1.5).all() and (view[:, :, 17:] < 0).all()


def test_resize_modes():
    assert resized_size(480, 640, {"shortest_edge": 640, "longest_edge": 2560}) == (640, 853)
    assert resized_size(100, 20000, {"shortest_edge": 640, "longest_edge": 2560}) == (13, 2560)
    assert resized_size(20000, 10, {"shortest_edge": 640, "longest_edge": 2560}) == (2560, 1)
    assert resized_size(1, 1, {"shortest_edge": 640, "longest_edge": 2560}) == (640, 640)
    assert resized_size(300, 200, {"height": 50, "width": 70}) == (50, 70)


def test_labels_nearest_padding_and_reduce_labels():
    processor = MROVSegImageProcessor(slice_size=32, size={"height": 40, "width": 40})
    label = np.zeros((20, 20), dtype=np.uint8)
    label[:10] = 3
    label[10:, 10:] = 7
    out = processor(random_image(20, 20), segmentation_maps=label, return_tensors="pt")
    labels = out["labels"][0]
    assert labels.shape == (64, 64) and labels.dtype == torch.int64
    assert set(labels[:40, :40].unique().tolist()) == {0, 3, 7}
    assert (labels[:20, :40] == 3).all() and (labels[20:40, 20:40] == 7).all()
    assert (labels[40:] == 255).all() and (labels[:, 40:] == 255).all()
    reduced = processor(random_image(20, 20), segmentation_maps=label, do_reduce_labels=True, return_tensors="pt")
    assert set(reduced["labels"][0, :40, :40].unique().tolist()) == {255, 2, 6}


def test_save_and_load_round_trip(tmp_path):
    from transformers import AutoImageProcessor

    from tests.helpers import tiny_config

    processor = MROVSegImageProcessor(slice_size=48, slice_overlap=16, size={"shortest_edge": 100, "longest_edge": 300})
    processor.save_pretrained(tmp_path)
    tiny_config().save_pretrained(tmp_path)  # AutoImageProcessor resolves the class through the model type
    for loaded in (MROVSegImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, MROVSegImageProcessor)
        assert loaded.to_dict() == processor.to_dict()
    image = random_image(70, 90)
    a, b = processor(image, return_tensors="pt"), loaded(image, return_tensors="pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- input kinds and bad input
def _process(image, **kwargs):
    processor = MROVSegImageProcessor(slice_size=32, size={"shortest_edge": 32, "longest_edge": 256})
    return processor(image, return_tensors="pt", **kwargs)


def _pil(mode, size=(40, 30), **info):
    image = Image.new(mode, size)
    image.info.update(info)
    return image


@pytest.mark.parametrize("image", [
    _pil("L"), _pil("LA"), _pil("RGBA"), _pil("CMYK"), _pil("I;16"), _pil("I"), _pil("F"), _pil("1"),
    _pil("P", transparency=0), _pil("P"), _pil("YCbCr"), _pil("PA"), _pil("RGBa"), _pil("La"), _pil("HSV"),
])
def test_any_pil_mode_becomes_rgb(image):
    out = _process(image)
    assert out["pixel_values"].shape == (1, 3, 32, 32) and torch.isfinite(out["pixel_values"]).all()


def test_transparency_composited_onto_white_and_16_bit_scaled():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    white = _process(Image.new("RGB", (8, 8), (255, 255, 255)))
    torch.testing.assert_close(_process(rgba)["pixel_values"], white["pixel_values"])
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    torch.testing.assert_close(_process(grey16)["pixel_values"], white["pixel_values"])
    # premultiplied grey ("La": PIL converts it to LA only, and said "conversion from La to L not supported")
    grey = Image.new("LA", (8, 8), (100, 128))
    torch.testing.assert_close(_process(grey.convert("La"))["pixel_values"], _process(grey)["pixel_values"],
                               atol=2 / 255 / 0.27, rtol=0)  # premultiplying rounds by a grey level


def test_16_bit_images_of_8_or_12_bit_values_are_read_by_the_rule_and_named():
    """A 16-bit file holding 8- or 12-bit values (a uint8 array cast to uint16, a microscope's 12 bits) reads nearly
    black by the 16-bit rule, as viewers show it: silently so before; now with a warning saying how to scale it."""
    from transformers.testing_utils import CaptureLogger

    from modeling_mrovseg import image_processing_mrovseg

    eight = np.random.default_rng(0).integers(1, 256, (8, 8)).astype(np.uint16)
    for picture, message in ((eight, "values below 256 (8-bit data in a 16-bit file?)"),
                             (Image.fromarray(eight * 16), "values below 4096 (12-bit data in a 16-bit file?)"),
                             (eight * 257, None), (np.zeros((8, 8), np.uint16), None)):  # full range; black
        image_processing_mrovseg.logger.warning_once.cache_clear()
        with CaptureLogger(image_processing_mrovseg.logger) as captured:
            read = image_processing_mrovseg.to_rgb_uint8(picture)
        assert (message in captured.out) if message else captured.out == ""
        if message:
            assert read.max() <= 16  # the rule is kept: nearly black
            assert "scale it to 0..65535 first" in captured.out


def test_32_bit_images_read_by_their_range(tmp_path):
    """A 32-bit "I" image keeps whatever range it was made with: convert("I") of an 8-bit photo stores 0..255 (it
    read almost black when scaled as 16-bit), of a 16-bit one 0..65535; a TIFF round trip keeps the mode."""
    photo = Image.fromarray(random_image(16, 16)).convert("L")
    reference = _process(photo)["pixel_values"]
    photo.convert("I").save(tmp_path / "eight.tif")
    sixteen = Image.fromarray(np.asarray(photo).astype(np.uint16) * 257)
    with Image.open(tmp_path / "eight.tif") as eight:
        assert eight.mode == "I"
        torch.testing.assert_close(_process(eight)["pixel_values"], reference)
    torch.testing.assert_close(_process(sixteen.convert("I"))["pixel_values"], reference)
    for values in (-1, 70000):
        with pytest.raises(ValueError, match=f"32-bit integer image with values in .*{values}"):
            _process(Image.fromarray(np.full((8, 8), values, dtype=np.int32), mode="I"))


def test_exif_orientation_applied():
    image = Image.fromarray(random_image(20, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    out = MROVSegImageProcessor(slice_size=32, do_resize=False)(loaded, return_tensors="pt")
    assert out["image_sizes"][0, :2].tolist() == [40, 20]  # now portrait


def test_post_processing_refuses_a_target_size_turned_by_90_degrees():
    """`image.size` of a PIL image is (width, height), and of a phone photo the size before its EXIF orientation:
    either as `target_sizes` would stretch the labels across the wrong axes."""
    stored = Image.fromarray(random_image(300, 400))  # a landscape sensor image, shown portrait
    exif = stored.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    photo = Image.open(buffer)
    processor = MROVSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}, slice_size=32)
    sizes = processor(photo, return_tensors="pt")["image_sizes"]
    assert sizes[0, :2].tolist() == [85, 64]
    outputs = _outputs(batch=1, size=(32, 32), image_sizes=sizes)
    for wrong in (photo.size[::-1], ImageOps.exif_transpose(photo).size):
        with pytest.raises(ValueError, match=r"only turned by 90 degrees.*exif_transpose\(image\).size\[::-1\]"):
            processor.post_process_semantic_segmentation(outputs, target_sizes=[wrong])
    right = ImageOps.exif_transpose(photo).size[::-1]
    assert processor.post_process_semantic_segmentation(outputs, target_sizes=[right])[0].shape == (400, 300)
    for other in [(85, 64), (86, 64), (1, 1), (640, 480)]:  # rounding of the resize, or another aspect: no error
        assert processor.post_process_semantic_segmentation(outputs, target_sizes=[other])[0].shape == other
    exact = MROVSegImageProcessor(size={"height": 64, "width": 48}, slice_size=32)  # squashes: no aspect to keep
    assert exact.post_process_semantic_segmentation(outputs, target_sizes=[(64, 85)])[0].shape == (64, 85)


@pytest.mark.parametrize("array", [
    np.zeros((30, 40), np.uint8), np.zeros((30, 40, 1), np.uint8), np.zeros((30, 40, 2), np.uint8),
    np.zeros((30, 40, 4), np.uint8), np.zeros((3, 30, 40), np.uint8), np.zeros((30, 40, 3), np.float32),
    np.full((30, 40, 3), 200.0), np.zeros((30, 40, 3), np.uint16), np.zeros((30, 40, 3), bool),
    torch.zeros(3, 30, 40), torch.zeros(30, 40, 3, dtype=torch.uint8),
])
def test_array_and_tensor_layouts(array):
    out = _process(array)
    assert out["image_sizes"][0, :2].tolist() == [32, round(40 * 32 / 30)]


def test_float_in_unit_range_equals_uint8():
    image = random_image(16, 16)
    torch.testing.assert_close(_process(image)["pixel_values"], _process(image / 255.0)["pixel_values"])


def test_integer_dtypes_read_by_range_rule():
    image = random_image(16, 16)
    reference = _process(image)["pixel_values"]
    for dtype in (np.int64, np.int32, np.uint32, np.int16):  # wide dtypes holding 8-bit values stay 8-bit
        torch.testing.assert_close(_process(image.astype(dtype))["pixel_values"], reference)
    torch.testing.assert_close(_process(image.astype(np.uint16) * 257)["pixel_values"], reference)  # 16-bit


def test_batch_of_mixed_kinds_and_sizes():
    images = [Image.fromarray(random_image(30, 50)), random_image(60, 20), torch.zeros(3, 40, 40)]
    out = _process(images)
    assert out["pixel_values"].shape[0] == 3 and out["pixel_values_slices"].shape[0] == 3


@pytest.mark.parametrize("bad,message", [
    ([], "empty"),
    (np.zeros((0, 10, 3), np.uint8), "empty"),
    (Image.new("RGB", (0, 5)), "empty"),
    (np.full((10, 10, 3), np.nan, np.float32), "NaN"),
    (np.zeros((10, 10, 5), np.uint8), "channels"),
    (np.zeros((5, 10, 10, 3, 1), np.uint8), "dimensions"),
    ("not an image", "unsupported type"),
    (np.array([[[0, 128, 256]]] * 4, np.int64), r"integer values in \[0, 256\].*uint16"),
    (np.full((4, 4, 3), -7, np.int32), r"integer values in \[-7, -7\]"),
    (np.random.default_rng(0).normal(0, 1, (4, 4, 3)), r"float values in .*\[0, 1\] or \[0, 255\]"),
    (np.full((4, 4, 3), 300.0), r"float values in \[300, 300\]"),
])
def test_bad_input_is_a_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        _process(bad)


def test_edge_sizes_are_handled():
    tiny = _process(np.zeros((1, 1, 3), np.uint8))
    assert tiny["image_sizes"][0].tolist() == [32, 32, 32, 32]
    strip = MROVSegImageProcessor(slice_size=32)(np.zeros((20000, 10, 3), np.uint8), return_tensors="pt")
    assert strip["image_sizes"][0].tolist() == [2560, 1, 2560, 32]
    assert strip["pixel_values_slices"].shape[1] == 80  # 80 x 1 windows


def test_segmentation_map_size_mismatch():
    with pytest.raises(ValueError, match="segmentation map 0 has size"):
        _process(random_image(20, 30), segmentation_maps=np.zeros((30, 20), np.uint8))
    with pytest.raises(ValueError, match="2 images but 1 segmentation maps"):
        _process([random_image(20, 30)] * 2, segmentation_maps=[np.zeros((20, 30), np.uint8)])


def test_invalid_overlap_and_misspelt_settings():
    with pytest.raises(ValueError, match="slice_overlap"):
        MROVSegImageProcessor(slice_size=32, slice_overlap=32)
    # transformers keeps unknown keywords as attributes: slice_sise=32 sliced 224 px windows without a word
    with pytest.raises(TypeError, match=r"slice_sise \(did you mean slice_size\?\)"):
        MROVSegImageProcessor(slice_sise=32)
    with pytest.raises(TypeError, match=r"do_resise \(did you mean do_resize\?\)"):
        MROVSegImageProcessor(do_resise=False)
    # what transformers saves beside the settings still loads
    assert MROVSegImageProcessor(image_processor_type="MROVSegImageProcessor", auto_map={}).slice_size == 224


# ---------------------------------------------------------------- post-processing
def _outputs(batch=2, queries=4, classes=3, size=(16, 24), image_sizes=None):
    torch.manual_seed(0)
    return MROVSegOutput(
        class_queries_logits=torch.randn(batch, queries, classes + 1),
        masks_queries_logits=torch.randn(batch, queries, *size),
        image_sizes=image_sizes,
    )


def test_post_process_contract():
    processor = MROVSegImageProcessor()
    outputs = _outputs()
    maps = processor.post_process_semantic_segmentation(outputs)
    assert len(maps) == 2 and maps[0].shape == (16, 24) and maps[0].dtype == torch.int64
    assert maps[0].min() >= 0 and maps[0].max() < 3
    resized = processor.post_process_semantic_segmentation(outputs, target_sizes=[(5, 7), (9, 3)])
    assert resized[0].shape == (5, 7) and resized[1].shape == (9, 3)
    scored = processor.post_process_semantic_segmentation(outputs, target_sizes=[(5, 7), (9, 3)],
                                                          return_segmentation_scores=True)
    assert torch.equal(scored[0].segmentation, resized[0]) and scored[0].segmentation_scores.shape == (3, 5, 7)
    with pytest.raises(ValueError, match="as many target sizes"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(5, 7)])


def test_post_process_scores_and_padding_crop():
    processor = MROVSegImageProcessor()
    # one query, certain of class 1, whose mask covers only the right half of the *padding* region
    class_logits = torch.tensor([[[-10.0, 10.0, -10.0, -10.0], [10.0, -10.0, -10.0, -10.0]]])
    masks = torch.full((1, 2, 8, 8), -10.0)
    masks[0, 1] = 10.0  # query 1 (class 0) everywhere
    masks[0, 0, :, 6:] = 20.0  # query 0 (class 1) only in columns 6-7: padding
    image_sizes = torch.tensor([[32, 24, 32, 32]])  # valid 32 x 24 of a 32 x 32 canvas
    outputs = MROVSegOutput(class_queries_logits=class_logits, masks_queries_logits=masks, image_sizes=image_sizes)
    seg = processor.post_process_semantic_segmentation(outputs, target_sizes=[(10, 10)])[0]
    assert (seg == 0).all()  # the padding-only class never leaks into the image
    thresholded = processor.post_process_semantic_segmentation(outputs, score_threshold=1.5)[0]
    assert thresholded.shape == (32, 24) and (thresholded == -1).all()


@pytest.mark.parametrize("budget", [None, 4 * 21 * 5])  # boundary pixels blended at once; 5 at a time
def test_one_resampling_equals_full_scores(monkeypatch, budget):
    from modeling_mrovseg import image_processing_mrovseg as module

    if budget is not None:
        monkeypatch.setattr(module, "POSTPROCESS_BUDGET_ELEMENTS", budget)
    processor = MROVSegImageProcessor()
    outputs = _outputs(batch=2, queries=12, classes=21, size=(12, 20),
                       image_sizes=torch.tensor([[40, 70, 48, 80], [48, 80, 48, 80]]))
    plain = processor.post_process_semantic_segmentation(outputs, target_sizes=[(33, 51), (20, 30)])
    scored = processor.post_process_semantic_segmentation(outputs, target_sizes=[(33, 51), (20, 30)],
                                                          return_segmentation_scores=True)
    for a, b in zip(plain, scored):
        assert torch.equal(a, b.segmentation) and torch.equal(a, b.segmentation_scores.argmax(0))
    assert len(plain[0].unique()) > 2  # several segments, so boundaries between them
    # at the image's own size the one resampling samples where "upsample to the canvas, crop the padding" does
    canvas = F.interpolate(module.semantic_scores(outputs)[:1], size=(48, 80), mode="bilinear", align_corners=False)
    own = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)[0]
    torch.testing.assert_close(own.segmentation_scores, canvas[0, :, :40, :70], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("low,out", [((7, 11), (61, 15)), ((7, 11), (115, 30)), ((12, 20), (67, 111)), ((5, 3), (1, 2))])
def test_any_target_size_is_met_exactly(low, out):
    """out / low in floats can fall a hair short of the integer (61 / 7 * 7 = 60.999...): sizes must still match."""
    processor = MROVSegImageProcessor()
    outputs = _outputs(batch=1, queries=4, classes=3, size=low)
    assert processor.post_process_semantic_segmentation(outputs, target_sizes=[out])[0].shape == out


def test_compiled_post_processing_equals_eager():
    processor = MROVSegImageProcessor()
    outputs = _outputs(batch=1, queries=8, classes=3, size=(24, 32), image_sizes=torch.tensor([[90, 120, 96, 128]]))
    eager = processor.post_process_semantic_segmentation(outputs, target_sizes=[(70, 100)])[0]
    compiled = processor.post_process_semantic_segmentation(outputs, target_sizes=[(70, 100)], compiled=True)[0]
    assert (compiled == eager).float().mean() >= 0.999


def _blobs(classes=12, size=(20, 28), seed=0):
    """(C, h, w) smooth class scores with segments, as a trained model gives (random noise is all boundary)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, classes, max(1, size[0] // 4), max(1, size[1] // 4), generator=generator) * 3
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0].softmax(dim=0)


@pytest.mark.parametrize("size,geometry,out", [
    ((20, 28), None, (77, 113)),  # upsampled
    ((20, 28), (70, 100, 80, 112), (70, 100)),  # padding cropped at the image's own size
    ((20, 28), (70, 100, 80, 112), (13, 9)),  # downsampled
    ((20, 28), None, (20, 28)),  # the mask resolution itself
    ((1, 28), None, (5, 50)),  # one row: every vertical tap is clamped
    ((6, 9), None, (301, 419)),  # ~50x: groups of 50 x 47 pixels
])
def test_labels_from_corners_equal_full_resampling(size, geometry, out):
    """Inside a segment the label comes from the low-resolution winners; it must equal the argmax of the full
    resampling everywhere, and the winner's score and the class sum must equal the resampled maps'."""
    from modeling_mrovseg.image_processing_mrovseg import label_scores

    score = _blobs(size=size)
    full = label_scores(score, geometry, out, keep_scores=True, with_shares=True)
    fast = label_scores(score, geometry, out, with_shares=True)
    assert fast.scores is None and full.scores.shape == (12, *out)
    assert torch.equal(fast.segmentation, full.segmentation)
    torch.testing.assert_close(fast.best, full.best, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.class_shares, full.class_shares, rtol=1e-5, atol=1e-6)
    values = full.best.flatten().sort().values  # a threshold in the widest gap of the middle half of the scores
    middle = values[len(values) // 4 : 3 * len(values) // 4 + 1]
    gap = int(middle.diff().argmax())
    threshold = float(middle[gap] + middle[gap + 1]) / 2
    assert torch.equal(label_scores(score, geometry, out, score_threshold=threshold).segmentation,
                       label_scores(score, geometry, out, score_threshold=threshold, keep_scores=True).segmentation)


def test_labels_from_corners_many_images_and_ties():
    """Over many random scenes labels agree with the full resampling except where two classes tie to float
    rounding; exact ties go to the first class, as argmax does."""
    from modeling_mrovseg.image_processing_mrovseg import label_scores

    differing = total = 0
    for seed in range(20):
        score = _blobs(classes=30, size=(24, 36), seed=seed)
        full = label_scores(score, None, (101, 150), keep_scores=True)
        fast = label_scores(score, None, (101, 150))
        wrong = fast.segmentation != full.segmentation
        differing, total = differing + int(wrong.sum()), total + wrong.numel()
        if wrong.any():  # only where the two winners' resampled scores are equal to float rounding
            maps = full.scores.permute(1, 2, 0)[wrong]
            picked = maps.gather(1, fast.segmentation[wrong][:, None])[:, 0]
            torch.testing.assert_close(picked, maps.max(dim=1).values, rtol=1e-6, atol=1e-7)
    assert differing <= total * 1e-4
    tied = _blobs(classes=3)
    tied[2] = tied[1]  # classes 1 and 2 tie everywhere: class 1 must win wherever either would
    full = label_scores(tied, None, (50, 70), keep_scores=True)
    fast = label_scores(tied, None, (50, 70))
    assert torch.equal(fast.segmentation, full.segmentation) and not (fast.segmentation == 2).any()


@pytest.mark.parametrize("low,out,most", [(1024, 2048, 2), (320, 640, 2), (7, 61, 9), (20, 13, 1), (1, 5, 3),
                                           (28, 28, 1), (80, 1000, 13)])
def test_pixel_groups_partition_the_output_by_their_two_source_pixels(low, out, most):
    """Boundary blending reads four class vectors per group of output pixels: the groups must hold every output pixel
    once, each pixel with its own taps and weights, and be no larger than the scale needs (the pixels before the
    first source pixel's centre get their own group, else the first group would hold half a scale more)."""
    from modeling_mrovseg.image_processing_mrovseg import _bilinear_taps, _covering_scale, _pixel_groups

    scale = _covering_scale(low, out / low, out)
    taps, weights = _bilinear_taps(low, out, scale)
    index, group_weights, sources = _pixel_groups(low, out, scale)
    assert index.shape == group_weights.shape[:2] and index.shape[0] == low + 1 and index.shape[1] == most
    valid = index >= 0
    assert sorted(index[valid].tolist()) == list(range(out))  # every pixel exactly once
    assert (index[~valid] * max(out, 4096) + out < 0).all()  # unused slots stay negative as flat offsets
    group = np.broadcast_to(np.arange(low + 1)[:, None], index.shape)[valid]
    pixels = index[valid]
    assert np.array_equal(taps[pixels], sources[group])
    assert np.array_equal(group_weights[valid], weights[pixels])


def test_device_taps_are_reused_for_the_next_image_of_the_same_size_and_left_unchanged():
    """The bilinear taps of a size go to the device once (a host-to-GPU copy waits for the GPU's queue); reusing
    them must not change the labels of later images, so post-processing must never write into them."""
    from modeling_mrovseg.image_processing_mrovseg import _device_taps, label_scores

    _device_taps.cache_clear()
    first = label_scores(_blobs(seed=1), None, (61, 83), with_shares=True)
    assert _device_taps.cache_info().currsize == 2  # rows and columns
    hits = _device_taps.cache_info().hits
    again = label_scores(_blobs(seed=1), None, (61, 83), with_shares=True)
    assert _device_taps.cache_info().hits >= hits + 2  # rows and columns, from the cache
    assert torch.equal(first.segmentation, again.segmentation) and torch.equal(first.best, again.best)
    other = label_scores(_blobs(seed=2), None, (61, 83))  # another image of that size, against the full resampling
    assert torch.equal(other.segmentation, label_scores(_blobs(seed=2), None, (61, 83), keep_scores=True).segmentation)


def test_many_classes_are_labelled_from_the_factors_never_the_dense_maps(monkeypatch):
    """3,000 class names made a 200 x 300 image take 5.2 GB in the zero-shot pipeline (the dense (C, h, w) scores of
    a 512 x 768 mask); past the post-processing budget each pixel's class vector is built a chunk of pixels at a time
    from the probabilities and masks: the same labels, best scores and class shares, and no dense scores built."""
    from modeling_mrovseg import image_processing_mrovseg as module
    from modeling_mrovseg.image_processing_mrovseg import FactoredScores, image_scores, label_scores

    torch.manual_seed(0)
    masks = F.interpolate(torch.randn(2, 20, 6, 9) * 4, size=(36, 54), mode="bilinear")  # smooth segments
    outputs = MROVSegOutput(class_queries_logits=torch.randn(2, 20, 301) * 3, masks_queries_logits=masks,
                            image_sizes=torch.tensor([[36, 50, 36, 54], [30, 54, 36, 54]]))
    dense = module.semantic_scores(outputs)
    expected = MROVSegImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(90, 125), (75, 135)])
    monkeypatch.setattr(module, "POSTPROCESS_BUDGET_ELEMENTS", 5000)  # the batch's 1.2M scores pass it
    scores = image_scores(outputs)
    assert all(isinstance(score, FactoredScores) and score.shape == (300, 36, 54) for score in scores)
    for i, (score, geometry, size) in enumerate(zip(scores, outputs.image_sizes.tolist(), [(90, 125), (75, 135)])):
        fast = label_scores(score, geometry, size, with_shares=True)
        full = label_scores(dense[i], geometry, size, with_shares=True)
        assert torch.equal(fast.segmentation, full.segmentation) and len(fast.segmentation.unique()) > 5
        torch.testing.assert_close(fast.best, full.best, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.class_shares, full.class_shares, rtol=1e-5, atol=1e-6)
        threshold = float(full.best.median())
        assert torch.equal(label_scores(score, geometry, size, score_threshold=threshold).segmentation,
                           label_scores(dense[i], geometry, size, score_threshold=threshold).segmentation)
    monkeypatch.setattr(module, "semantic_scores", None)  # post-processing must not build the dense scores
    labels = MROVSegImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=[(90, 125), (75, 135)])
    assert all(torch.equal(a, b) for a, b in zip(labels, expected))
    with pytest.raises(ValueError, match="pass dense scores"):
        label_scores(scores[0], None, (36, 54), keep_scores=True)


def test_semantic_scores_pad_the_class_rows_without_changing_a_value():
    """The contraction runs with the class dimension padded to a multiple of 8 (aligned rows for GPU matrix kernels):
    the scores are bit-identical to the plain contraction, and labelling reads them in place."""
    from benchmarks.run import DispatchTally
    from modeling_mrovseg.image_processing_mrovseg import label_scores, semantic_scores

    for classes in (3, 8, 150):
        outputs = _outputs(batch=2, queries=16, classes=classes, size=(24, 32))
        probs = outputs.class_queries_logits.softmax(dim=-1)[..., :-1]
        masks = outputs.masks_queries_logits.sigmoid()  # the contraction as it was before the padding
        plain = torch.bmm(masks.flatten(2).transpose(1, 2), probs).view(2, 24, 32, classes).permute(0, 3, 1, 2)
        scores = semantic_scores(outputs)
        assert scores.shape == plain.shape and torch.equal(scores, plain)
        assert scores.stride()[1:] == (1, 32 * (-(-classes // 8) * 8), -(-classes // 8) * 8)  # pixel-major rows
        # labelling reads the class vectors where they lie: no more traffic than from a compact copy of the scores,
        # which copying them out first (read + write) would add
        compact = scores[0].permute(1, 2, 0).contiguous().permute(2, 0, 1)
        tallies = []
        for score in (scores[0], compact):
            with DispatchTally() as tally:
                labels = label_scores(score, None, (24, 32)).segmentation
            tallies.append(tally.bytes)
        assert abs(tallies[0] - tallies[1]) < score.numel() * 4
        assert torch.equal(labels, label_scores(scores[0], None, (24, 32)).segmentation)


def test_post_processing_in_float32_inside_autocast():
    """Evaluation post-processes inside the accelerator's autocast: scores and labels must not drop to bfloat16."""
    processor = MROVSegImageProcessor()
    outputs = _outputs(batch=1, queries=16, classes=40, size=(24, 32))
    plain = processor.post_process_semantic_segmentation(outputs, target_sizes=[(70, 100)],
                                                         return_segmentation_scores=True)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from modeling_mrovseg.image_processing_mrovseg import semantic_scores

        assert semantic_scores(outputs).dtype == torch.float32
        autocast = processor.post_process_semantic_segmentation(outputs, target_sizes=[(70, 100)],
                                                                return_segmentation_scores=True)[0]
        labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[(70, 100)])[0]
    assert torch.equal(autocast.segmentation, plain.segmentation) and torch.equal(labels, plain.segmentation)
    assert torch.equal(autocast.segmentation_scores, plain.segmentation_scores)


def test_semantic_scores_class_major_on_a_gpu_labels_as_pixel_major():
    """On a GPU the scores are laid out class-major (the class maximum is 3x faster there), on a CPU pixel-major:
    the same scores to float rounding, and labelling reads either in place (no copy of the maps) to the same labels,
    best scores and class shares."""
    from benchmarks.run import DispatchTally, boundary_cell_fraction, smooth_outputs
    from modeling_mrovseg.image_processing_mrovseg import label_scores, semantic_scores

    outputs = smooth_outputs((160, 224), num_classes=150, queries=20)
    pixel_major, class_major = semantic_scores(outputs), semantic_scores(outputs, class_major=True)
    assert pixel_major.stride(1) == 1 and class_major.is_contiguous()  # the CPU default is pixel-major
    torch.testing.assert_close(class_major, pixel_major, rtol=1e-6, atol=1e-7)
    assert boundary_cell_fraction(pixel_major[0]) > 0.02  # the scene has segments: boundary groups are blended
    results, traffic = [], []
    for scores in (pixel_major, class_major):
        with DispatchTally() as tally:
            results.append(label_scores(scores[0], None, (333, 450), with_shares=True))
        traffic.append(tally.bytes)
    assert abs(traffic[0] - traffic[1]) < scores[0].numel() * 4  # neither layout is copied first
    assert torch.equal(results[0].segmentation, results[1].segmentation)
    torch.testing.assert_close(results[1].best, results[0].best, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1].class_shares, results[0].class_shares, rtol=1e-5, atol=1e-6)


def test_another_models_processor_config_is_refused(tiny_clip_dir, checkpoint, tmp_path):
    """`MROVSegImageProcessor.from_pretrained(<a CLIP>)` took CLIP's 224 px size (and ignored its centre crop): the
    full-resolution view lost without a word. `MROVSegProcessor.from_pretrained(<a CLIP>)` held CLIP's own processor,
    whose 224 px crops ran the model's single-resolution ablation. Both name the problem; MROVSeg folders load."""
    import shutil

    from transformers import CLIPImageProcessor

    from modeling_mrovseg import MROVSegProcessor

    clip = tmp_path / "clip"  # a Hub CLIP's folder: weights, tokenizer and its image processor
    shutil.copytree(tiny_clip_dir, clip)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(clip)
    with pytest.raises(ValueError, match="this is a CLIPImageProcessor configuration, another model's image processor"):
        MROVSegImageProcessor.from_pretrained(clip)
    with pytest.raises(ValueError, match="MROVSegProcessor needs MROVSeg's image processor, got CLIPImageProcessor"):
        MROVSegProcessor.from_pretrained(clip)
    assert MROVSegImageProcessor.from_pretrained(checkpoint).slice_size == 64
    assert MROVSegProcessor.from_pretrained(checkpoint).image_processor.slice_size == 64
    legacy = MROVSegImageProcessor().to_dict() | {"feature_extractor_type": "MROVSegImageProcessor"}
    assert MROVSegImageProcessor.from_dict(legacy).slice_size == MROVSegImageProcessor().slice_size
