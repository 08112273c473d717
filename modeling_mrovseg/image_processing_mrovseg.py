"""Image processor of MROVSeg: resize, normalise, pad to a sliding-window grid, emit global view and slices.

Pure PIL/numpy (plus torch for the antialiased global-view downsampling), no torchvision.

Input conventions (documented fallbacks rather than errors):
* any PIL mode becomes RGB: EXIF orientation is applied first; transparency (RGBA, LA, P with a transparent
  index) is composited onto white; 16-bit images (I;16) are scaled from their 16-bit range (a warning names 8- or
  12-bit values in a 16-bit file, which read nearly black); 32-bit integer
  images (I) hold whatever range their maker stored (`convert("I")` keeps an 8-bit image's 0..255), so they are
  read as 8-bit when all values lie in 0..255, else as 16-bit, and values outside 0..65535 are a `ValueError`;
  float images (F) and float arrays are read as [0, 1] when all values lie there, else as [0, 255]; integer arrays
  are 8-bit (0..255) unless their dtype is uint16; values outside those ranges are a `ValueError`, never clipped;
* numpy arrays may be HWC or CHW (torch tensors CHW first), with 1 (grey), 2 (grey + alpha), 3 (RGB) or
  4 (RGBA) channels; anything else, NaN/inf values or an empty image is a `ValueError` naming the problem;
* extreme aspect ratios are resized so the longest edge fits `longest_edge`, keeping at least one pixel.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

# first: under an older transformers it names the version needed (the imports below would fail)
from .configuration_mrovseg import IGNORE_INDEX, near_name, with_hint

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

from .slicing import SliceGrid, slice_windows, stitch_windows

logger = logging.get_logger(__name__)


class MROVSegImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    slice_size (`int`): side of the sliding windows and of the global view (CLIP's input size).
    slice_overlap (`int`): overlap of neighbouring windows in pixels.
    do_reduce_labels (`bool`): map label 0 to the ignore index and shift the others down by one.
    ignore_index (`int`): label value of padding and unlabelled pixels.
    return_pixel_mask (`bool`): also return `pixel_mask` (B x H x W), whose shape fixes the canvas for a compiled
        forward (`torch.compile` without a host read of `slice_grid`).
    """

    slice_size: int
    slice_overlap: int
    do_reduce_labels: bool
    ignore_index: int
    return_pixel_mask: bool


def _scale_32_bit(values: np.ndarray, where: str) -> np.ndarray:
    """A PIL "I" image's values in [0, 1] by the range rule of the module docstring."""
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 65535:
        raise ValueError(f"{where} is a 32-bit integer image with values in {low}..{high}; expected 0..255 (8-bit) or "
                         "0..65535 (16-bit): scale it to one of those ranges first.")
    return values.astype(np.float64) / (255.0 if high <= 255 else 65535.0)


def warn_if_several_frames(image: Image.Image, name: str) -> None:
    """A GIF's animation or a TIFF's pages: the frame the image is at (the first, as opened) is the one read; said,
    rather than leaving the others out without a word. A camera's MPO (previews beside the photo) is one photo."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO" and image.tell() == 0:
        warnings.warn(f"{name} has {frames} frames (an animation or a multi-page file): only the first is "
                      "segmented", stacklevel=3)


def to_rgb_uint8(image: Any, index: int = 0, channels_first_hint: bool | None = None) -> np.ndarray:
    """Turn one PIL image, numpy array or torch tensor into an H x W x 3 uint8 array (see module docstring)."""
    where = f"image {index}"
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{where} is empty (size {image.width} x {image.height}).")
        warn_if_several_frames(image, getattr(image, "filename", "") or where)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            _warn_if_few_bits(np.asarray(image))
            return to_rgb_uint8(np.asarray(image).astype(np.float64) / 65535.0, index)
        if image.mode == "I":
            return to_rgb_uint8(_scale_32_bit(np.asarray(image), where), index)
        if image.mode == "F":
            return to_rgb_uint8(np.asarray(image, dtype=np.float32), index)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode == "La":  # premultiplied grey: PIL converts it to LA only
            image = image.convert("LA")
        if image.mode in ("RGBA", "LA", "PA", "RGBa"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)

    if isinstance(image, torch.Tensor):
        array = image.detach().cpu()
        array = (array.float() if array.dtype in (torch.bfloat16, torch.float16) else array).numpy()
        channels_first_hint = True if channels_first_hint is None else channels_first_hint
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(
            f"{where} has unsupported type {type(image).__name__}; pass a PIL image, numpy array or torch tensor."
        )

    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        first_ok, last_ok = array.shape[0] in (1, 2, 3, 4), array.shape[-1] in (1, 2, 3, 4)
        if first_ok and (channels_first_hint or not last_ok):
            array = np.moveaxis(array, 0, -1)
        elif not last_ok:
            raise ValueError(
                f"{where} has shape {array.shape}: expected 1 (grey), 2 (grey+alpha), 3 (RGB) or 4 (RGBA) channels "
                "in the first or last dimension."
            )
    else:
        raise ValueError(f"{where} has {array.ndim} dimensions; expected H x W, H x W x C or C x H x W.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where} is empty (size {array.shape[0]} x {array.shape[1]}).")

    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{where} contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        # [0, 1] or [0, 255], each with half a grey level of slack for resampling round-off; nothing else is guessed
        scale = 255.0 if low >= -0.5 / 255 and high <= 1.0 + 0.5 / 255 else 1.0
        if low * scale < -0.5 or high * scale > 255.5:
            raise ValueError(f"{where} has float values in [{low:g}, {high:g}]: float images must lie in [0, 1] or "
                             "[0, 255]. Undo any normalisation first (the processor normalises itself).")
        array = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if array.dtype == np.uint16:  # a 16-bit image: its dtype says so
            _warn_if_few_bits(array)
            array = np.rint(array.astype(np.float64) / 257.0)
        elif low < 0 or high > 255:
            raise ValueError(f"{where} has integer values in [{low}, {high}] ({array.dtype}): integer images hold 0..255; "
                             "pass a uint16 array for a 16-bit image, or floats in [0, 1].")
        array = array.astype(np.uint8)
    else:
        raise ValueError(f"{where} has unsupported dtype {array.dtype}.")

    channels = array.shape[-1]
    if channels in (2, 4):  # composite the alpha channel onto white
        alpha = array[..., -1:].astype(np.float32) / 255.0
        color = array[..., :-1].astype(np.float32)
        array = np.rint(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        channels -= 1
    if channels == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _warn_if_few_bits(values: np.ndarray) -> None:
    """A 16-bit image whose values all lie below 256 or 4096 most likely holds 8- or 12-bit data (a uint8 array cast
    to uint16, a camera's or microscope's 12 bits): read by its 16-bit range it is the nearly black picture image
    viewers show, and so is what the model sees. The rule stays (the file says 16-bit); the user is told."""
    high = int(values.max()) if values.size else 0
    for bits in (8, 12):
        if 0 < high < 2**bits:
            logger.warning_once(
                f"a 16-bit image holds only values below {2**bits} ({bits}-bit data in a 16-bit file?): read by "
                f"its 16-bit range it is nearly black, as image viewers show it; scale it to 0..65535 first "
                f"(x {65535 // (2**bits - 1)})")
            return


def _to_label_map(segmentation_map: Any, index: int) -> np.ndarray:
    """A 2-D integer label map from a PIL image (L, P, I), numpy array or tensor."""
    if isinstance(segmentation_map, Image.Image):
        array = np.asarray(segmentation_map)
    elif isinstance(segmentation_map, torch.Tensor):
        array = segmentation_map.detach().cpu().numpy()
    elif isinstance(segmentation_map, np.ndarray):
        array = segmentation_map
    else:
        raise ValueError(f"segmentation map {index} has unsupported type {type(segmentation_map).__name__}.")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:2])
    if array.ndim != 2:
        raise ValueError(f"segmentation map {index} must be 2-D (H x W) class ids, got shape {array.shape}.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or (array != np.round(array)).any():
            raise ValueError(f"segmentation map {index} must hold integer class ids.")
    return array.astype(np.int64)


def resized_size(height: int, width: int, size: SizeDict | dict) -> tuple[int, int]:
    """Output (height, width): exact `{height, width}`, or aspect-preserving `{shortest_edge[, longest_edge]}`."""
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    shortest, longest = get("shortest_edge"), get("longest_edge")
    if not shortest and not longest:
        raise ValueError(f"size must give 'height' and 'width' or 'shortest_edge'/'longest_edge', got {dict(size)}.")
    scale = shortest / min(height, width) if shortest else float("inf")
    if longest:
        scale = min(scale, longest / max(height, width))
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


class MROVSegImageProcessor(PilBackend):
    r"""
    Prepares images (and optional semantic label maps) for [`MROVSegForOpenVocabSegmentation`].

    Each image is resized keeping its aspect ratio (`size={"shortest_edge": 640, "longest_edge": 2560}`) or to an
    exact `{"height", "width"}`, normalised with CLIP's statistics and padded (bottom/right) to one canvas for the
    whole batch whose sliding-window grid covers it exactly. Returns

    * `pixel_values` (B x 3 x S x S): the global view, i.e. the padded canvas downsampled to CLIP's input size S;
    * `pixel_values_slices` (B x K x 3 x S x S): the K = rows x cols windows of the canvas, row-major;
    * `slice_grid` (B x 4): rows, cols, slice size, stride (the model checks them against its own);
    * `image_sizes` (B x 4): valid height, valid width, canvas height, canvas width (post-processing crops with it);
    * `pixel_mask` (B x H x W, with `return_pixel_mask=True`): 1 on image pixels, 0 on padding; its shape gives a
      compiled forward the canvas without reading `slice_grid` on the host;
    * `labels` (B x H x W) when `segmentation_maps` are given (nearest resize, padding = `ignore_index`).

    Every output of one image collates with another image's by padding along its second dimension, as
    transformers' pipelines do with `batch_size > 1`: the model runs such a batch of mixed grids per grid.

    Example:

    ```python
    >>> import numpy as np
    >>> from modeling_mrovseg import MROVSegImageProcessor
    >>> processor = MROVSegImageProcessor(slice_size=224)
    >>> inputs = processor(np.zeros((480, 640, 3), dtype=np.uint8), return_tensors="pt")
    >>> tuple(inputs["pixel_values_slices"].shape), inputs["slice_grid"].tolist()
    ((1, 12, 3, 224, 224), [[3, 4, 224, 224]])
    ```
    """

    valid_kwargs = MROVSegImageProcessorKwargs
    model_input_names = ["pixel_values", "pixel_values_slices", "slice_grid", "image_sizes", "pixel_mask"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"shortest_edge": 640, "longest_edge": 2560}
    default_to_square = False
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_pad = True
    rescale_factor = 1 / 255
    slice_size = 224
    slice_overlap = 0
    do_reduce_labels = False
    ignore_index = IGNORE_INDEX
    return_pixel_mask = False
    padding_value = 0.0  # what pipelines' collate pads missing slices with (the model never reads them)

    def __init__(self, **kwargs: Unpack[MROVSegImageProcessorKwargs]):
        # transformers keeps any other keyword as an attribute (saved bookkeeping such as image_processor_type), so a
        # misspelt setting (`slice_sise=`, `do_resise=`) processed with the default silently: names near a setting
        # are refused
        settings = self.valid_kwargs.__annotations__
        misspelt = [with_hint(name, near) for name in kwargs
                    if name not in settings and (near := near_name(name, settings, cutoff=0.8))]
        if misspelt:
            raise TypeError(f"MROVSegImageProcessor got unknown setting(s) {', '.join(misspelt)}")
        super().__init__(**kwargs)
        _check_overlap(self.slice_size, self.slice_overlap)

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs):
        # another model's processor (CLIP's, most likely, beside the weights `from_clip` reads) loaded as this class:
        # its 224 px size and crop became MROVSeg's resolution without a word, the full-resolution view lost
        other = image_processor_dict.get("image_processor_type") or image_processor_dict.get("feature_extractor_type")
        if other and other.removesuffix("Fast") != cls.__name__:
            raise ValueError(f"this is a {other} configuration, another model's image processor, not MROVSeg's: build "
                             f"MROVSeg's with {cls.__name__}.from_model_config(model.config), or load it from an "
                             "MROVSeg checkpoint.")
        return super().from_dict(image_processor_dict, **kwargs)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> "MROVSegImageProcessor":
        """A processor whose windows and unlabelled value match the model's (`slice_size`, `slice_overlap`,
        `ignore_index`); `kwargs` set the rest."""
        kwargs.setdefault("ignore_index", config.ignore_index)
        return cls(slice_size=config.slice_size, slice_overlap=config.slice_overlap, **kwargs)

    # ------------------------------------------------------------------ entry point
    def preprocess(
        self,
        images: Any,
        segmentation_maps: Any | None = None,
        **kwargs: Unpack[MROVSegImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        segmentation_maps (`ImageInput`, *optional*): semantic label maps, one per image and of the same size.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _preprocess_image_like_inputs(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        images = self._as_list(images, "images")
        rgb = [to_rgb_uint8(image, i) for i, image in enumerate(images)]
        maps = None
        if segmentation_maps is not None:
            maps = self._as_list(segmentation_maps, "segmentation_maps")
            if len(maps) != len(rgb):
                raise ValueError(f"Got {len(rgb)} images but {len(maps)} segmentation maps.")
            maps = [_to_label_map(m, i) for i, m in enumerate(maps)]
            for i, (image, label) in enumerate(zip(rgb, maps)):
                if image.shape[:2] != label.shape:
                    raise ValueError(
                        f"segmentation map {i} has size {label.shape} but its image has size {image.shape[:2]}."
                    )
        return self._preprocess(rgb, segmentation_maps=maps, **kwargs)

    @staticmethod
    def _as_list(inputs: Any, name: str) -> list:
        if isinstance(inputs, (list, tuple)):
            items = list(inputs)
        elif isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4:
            items = list(inputs)
        else:
            items = [inputs]
        if not items:
            raise ValueError(f"`{name}` is empty: pass at least one image.")
        return items

    # ------------------------------------------------------------------ the pipeline
    def _preprocess(
        self,
        images: list[np.ndarray],
        segmentation_maps: list[np.ndarray] | None = None,
        do_resize: bool = True,
        size: SizeDict | None = None,
        resample: PILImageResampling | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        slice_size: int | None = None,
        slice_overlap: int | None = None,
        do_reduce_labels: bool | None = None,
        ignore_index: int | None = None,
        return_pixel_mask: bool | None = None,
        return_tensors: str | TensorType | None = None,
        **kwargs,
    ) -> BatchFeature:
        slice_size = self.slice_size if slice_size is None else slice_size
        slice_overlap = self.slice_overlap if slice_overlap is None else slice_overlap
        ignore_index = self.ignore_index if ignore_index is None else ignore_index
        return_pixel_mask = self.return_pixel_mask if return_pixel_mask is None else return_pixel_mask
        resample = PILImageResampling.BICUBIC if resample is None else resample
        mean = np.asarray(image_mean if image_mean is not None else OPENAI_CLIP_MEAN, dtype=np.float32).reshape(-1)
        std = np.asarray(image_std if image_std is not None else OPENAI_CLIP_STD, dtype=np.float32).reshape(-1)
        if mean.size != 3 or std.size != 3:
            raise ValueError(f"image_mean and image_std need 3 values (images are RGB), got {mean.size} and {std.size}.")

        _check_overlap(slice_size, slice_overlap)  # also for per-call overrides

        # transformers' PIL backend resizes (to MROVSeg's aspect-kept size), rescales and normalises each image
        resized, resized_maps = [], []
        for i, image in enumerate(images):
            height, width = image.shape[:2]
            target = resized_size(height, width, size) if do_resize else (height, width)
            pixels = image.transpose(2, 0, 1)
            if target != (height, width):
                pixels = self.resize(pixels, SizeDict(height=target[0], width=target[1]), resample=resample)
            if do_rescale:
                pixels = self.rescale(pixels, rescale_factor)
            if do_normalize:
                pixels = self.normalize(pixels.astype(np.float32), mean, std)
            resized.append(pixels.astype(np.float32, copy=False))
            if segmentation_maps is not None:
                label = segmentation_maps[i]
                if do_reduce_labels:
                    label = np.where(label == 0, ignore_index, label - 1)
                    label = np.where(label == ignore_index - 1, ignore_index, label)
                if target != label.shape:
                    label = _resize_nearest(label, target)
                resized_maps.append(label[None])

        # one canvas for the batch, the smallest that S x S windows at stride S - overlap cover exactly
        grid = SliceGrid.covering(max(p.shape[1] for p in resized), max(p.shape[2] for p in resized),
                                  slice_size, slice_overlap)
        canvas_size = SizeDict(height=grid.height, width=grid.width)
        padded, masks = self.pad(resized, pad_size=canvas_size, fill_value=0, return_mask=True)
        canvas = np.stack(padded)
        batch = len(resized)
        data = {
            "pixel_values": global_view(canvas, slice_size),
            "pixel_values_slices": np.require(slice_windows(canvas, grid), requirements=["C", "W"]),
            "slice_grid": np.tile(np.array([[grid.rows, grid.cols, grid.window, grid.stride]], dtype=np.int64),
                                  (batch, 1)),
            "image_sizes": np.array([[p.shape[1], p.shape[2], grid.height, grid.width] for p in resized],
                                    dtype=np.int64),
        }
        if return_pixel_mask:
            data["pixel_mask"] = np.stack(masks)
        if segmentation_maps is not None:
            labels = self.pad(resized_maps, pad_size=canvas_size, fill_value=ignore_index)
            data["labels"] = np.concatenate(labels).astype(np.int64)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------ geometry helpers
    @staticmethod
    def size_for_resolution(resolution: int) -> dict[str, int]:
        """The size rule of evaluation, the CLI and the demo: shortest edge `resolution`, longest at most 4x it."""
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 1 <= resolution <= 8192:
            raise ValueError(f"resolution={resolution!r} must be an integer number of pixels in [1, 8192].")
        return {"shortest_edge": resolution, "longest_edge": 4 * resolution}

    def stitch(self, slices: torch.Tensor, slice_grid: Sequence[int]) -> torch.Tensor:
        """Inverse of slicing: (B, K, ch, S, S) windows of ch channels back to the (B, ch, H, W) canvas, overlaps averaged."""
        rows, cols, window, stride = (int(v) for v in slice_grid)
        return stitch_windows(torch.as_tensor(slices), SliceGrid(rows, cols, window, stride))

    # ------------------------------------------------------------------ post-processing
    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
        score_threshold: float | None = None,
        compiled: bool = False,
    ):
        """
        Turn model outputs into one class-id map per image.

        Per-class scores are `sum_q softmax(class_logits)[q, :C] * sigmoid(mask_logits)[q]`, sampled bilinearly once
        at every pixel of `target_sizes[i]` (default: the resized image) from the image's part of the padded canvas
        (`outputs.image_sizes`); see `label_scores`.
        With `score_threshold`, pixels whose best score is below it get the label `-1` (unlabelled); without it
        every pixel gets a class of the vocabulary. `compiled=True` resamples every class map and takes the
        class maximum in one `torch.compile`d graph with no host read; slower than the default on an H200 (9.7 against
        2.8 ms at 2048 x 2048 with 150 classes, benchmarks/RESULTS.md).

        Returns a list of `(height, width)` `torch.LongTensor`, or of `SemanticSegmentationPostProcessorOutput`
        (`segmentation`, `segmentation_scores`) when `return_segmentation_scores=True`. The scores are every class's
        full-size float32 map (150 classes at 2048 x 2048: 2.5 GB); the labels alone never build them.
        """
        from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput

        # full-size maps (kept scores, the compiled path) are resampled channels-last, from pixel-major scores: a
        # class-major layout would be transposed first (11.9 -> 14.2 ms at 2048^2 with 150 classes on an H200)
        if return_segmentation_scores or compiled:  # full-size maps of every class: dense scores
            scores = list(semantic_scores(outputs, class_major=False))
        else:
            scores = image_scores(outputs)
        target_sizes = _check_target_sizes(target_sizes, len(scores))
        image_sizes = getattr(outputs, "image_sizes", None)
        image_sizes = None if image_sizes is None else image_sizes.tolist()  # one host read for the whole batch
        if target_sizes is not None and image_sizes is not None and "shortest_edge" in (self.size or {}):
            _check_not_turned(target_sizes, image_sizes)
        results = []
        for i in range(len(scores)):
            geometry = None if image_sizes is None else image_sizes[i]
            size = None if target_sizes is None else target_sizes[i]
            labelled = label_scores(scores[i], geometry, size, score_threshold, keep_scores=return_segmentation_scores,
                                    compiled=compiled)
            results.append(SemanticSegmentationPostProcessorOutput(
                data={"segmentation": labelled.segmentation, "segmentation_scores": labelled.scores}))
        if not return_segmentation_scores:
            return [r.segmentation for r in results]
        return results


@dataclass
class LabelledScores:
    """One image's labels: `segmentation` (H, W) class ids (-1 below the threshold), `best` (H, W) the winning score,
    `class_shares` (C,) each class's mean share of the evidence over its own pixels (0 if absent; on request), `scores` the
    (C, H, W) score maps when asked for."""

    segmentation: torch.Tensor
    best: torch.Tensor
    class_shares: torch.Tensor | None = None
    scores: torch.Tensor | None = None


# Score-map elements resampled or gathered at once: 2^28 floats = 1 GB (the full score maps of 150 classes up to
# 1300 x 1300 px when they are asked for; the class vectors of boundary pixels otherwise).
POSTPROCESS_BUDGET_ELEMENTS = 1 << 28


def label_scores(score: torch.Tensor, geometry: Sequence[int] | None, size: Sequence[int] | None,
                 score_threshold: float | None = None, keep_scores: bool = False,
                 with_shares: bool = False, compiled: bool = False) -> LabelledScores:
    """
    (C, h, w) per-class scores at mask resolution -> labels at `size`, as the argmax of one bilinear resampling
    (`with_shares`: also each class's mean share of the evidence over its pixels, as the zero-shot pipeline reports).

    The padding crop (`geometry`: valid h, valid w, padded h, padded w of the canvas) and the resize to `size` are
    one resampling: the whole canvas is resampled at the scale that maps the image's part of it onto `size`, and the
    padding's rows and columns are dropped (never a resize of a resize).

    The full-size score maps are only built when asked for (`keep_scores`) or with `compiled=True`, which fuses the
    resampling and the class maximum through `torch.compile`. Otherwise `_label_from_corners` labels every pixel
    whose four source pixels agree on the winner from the low-resolution winners alone, and resamples all classes
    only at the other pixels (segment boundaries): the same labels, a fraction of the work.
    """
    num_classes, low_h, low_w = score.shape
    if isinstance(score, FactoredScores) and (keep_scores or compiled):
        raise ValueError("keep_scores and compiled resample every class map: pass dense scores (semantic_scores).")
    if geometry is None:
        valid_h, valid_w, padded_h, padded_w = low_h, low_w, low_h, low_w
    else:
        valid_h, valid_w, padded_h, padded_w = (int(v) for v in geometry)
    out_h, out_w = (valid_h, valid_w) if size is None else (int(size[0]), int(size[1]))
    # output pixel y samples the mask-resolution row (y + 0.5) / scale - 0.5, as F.interpolate maps pixel centres
    scale = (_covering_scale(low_h, out_h * padded_h / (valid_h * low_h), out_h),
             _covering_scale(low_w, out_w * padded_w / (valid_w * low_w), out_w))
    with _float32(score.device):
        score = score if isinstance(score, FactoredScores) else score.float()
        return _label_scores_float32(score, scale, out_h, out_w, score_threshold, keep_scores, with_shares, compiled)


def _label_scores_float32(score: torch.Tensor, scale: tuple[float, float], out_h: int, out_w: int,
                          score_threshold: float | None, keep_scores: bool, with_shares: bool,
                          compiled: bool) -> LabelledScores:
    num_classes = score.shape[0]
    total = maps = None
    if keep_scores or compiled:
        resample = _compiled_resample_max() if compiled and not keep_scores else _resample_max
        # (1, C, h, w) with channels-last strides (score[None] would be ambiguous, and F.interpolate then copies it
        # to channels-first and back: 10x slower on a CPU); semantic_scores' padded class rows are copied out once
        batched = score.permute(1, 2, 0).contiguous()[None].permute(0, 3, 1, 2)
        best, segmentation, total, maps = resample(batched, scale, out_h, out_w, with_shares, keep_scores)
    else:
        segmentation, best, total = _label_from_corners(score, scale, out_h, out_w,
                                                        with_best=with_shares or score_threshold is not None,
                                                        with_total=with_shares)
    kept = None if score_threshold is None else best >= score_threshold
    class_shares = None
    if with_shares:  # a block of rows at a time: full-size temporaries took 2.4 GB for a 120-megapixel photo
        sums = torch.zeros(num_classes, device=score.device)
        counts = torch.zeros(num_classes, device=score.device)
        step = max(1, 2**22 // out_w)
        for top in range(0, out_h, step):
            rows = slice(top, top + step)
            weight = torch.ones_like(best[rows]) if kept is None else kept[rows].float()
            share = best[rows] / total[rows].clamp(min=1e-6) * weight  # the winner's share of all classes' evidence
            flat = segmentation[rows].flatten()
            sums.index_add_(0, flat, share.flatten())
            counts.index_add_(0, flat, weight.flatten())
        class_shares = sums / counts.clamp(min=1)
    if kept is not None:
        segmentation = segmentation.masked_fill_(~kept, -1)
    return LabelledScores(segmentation=segmentation, best=best, class_shares=class_shares, scores=maps)


def _resample(part: torch.Tensor, scale: tuple[float, float], out_h: int, out_w: int) -> torch.Tensor:
    """(1, c, h, w) maps resampled bilinearly at `scale`, the first out_h x out_w pixels."""
    if part.shape[-2:] != (out_h, out_w) or scale != (1.0, 1.0):
        part = F.interpolate(part, scale_factor=scale, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)
    return part[..., :out_h, :out_w]


def _resample_max(part: torch.Tensor, scale: tuple[float, float], out_h: int, out_w: int, with_sum: bool,
                  keep: bool):
    """(1, c, h, w) scores -> per-pixel best score and class (and the class sum, the resampled maps) at out_h x out_w."""
    part = _resample(part, scale, out_h, out_w)[0]
    best, label = part.max(dim=0)
    return best, label, (part.sum(dim=0) if with_sum else None), (part if keep else None)


def _bilinear_taps(low: int, out: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """F.interpolate's bilinear taps along one axis (align_corners=False, `scale_factor=scale`, its float32
    arithmetic) for the first `out` output pixels: (out, 2) source indices and (out, 2) weights. Computed on the
    host: they depend on the sizes only."""
    source = np.maximum((np.arange(out, dtype=np.float32) + np.float32(0.5)) * np.float32(1.0 / scale)
                        - np.float32(0.5), np.float32(0))
    first = np.minimum(source.astype(np.int64), low - 1)
    second = np.minimum(first + 1, low - 1)
    weight = np.minimum(source - first, np.float32(1)).astype(np.float32)
    return np.stack([first, second], axis=1), np.stack([1 - weight, weight], axis=1)


def _pixel_groups(low: int, out: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `out` output pixels along one axis grouped by the two source pixels they blend: group 0 holds the pixels
    before the first source pixel's centre (both taps on it), group i + 1 those whose first tap is i, so a group holds
    about `scale` pixels. Returns (G = low + 1, K) output indices (K the most any group holds; a group's unused slots
    hold -2^40, which stays negative through offset arithmetic), (G, K, 2) their tap weights and (G, 2) each group's
    two source pixels."""
    taps, weights = _bilinear_taps(low, out, scale)
    raw = (np.arange(out, dtype=np.float32) + np.float32(0.5)) * np.float32(1.0 / scale) - np.float32(0.5)
    group = np.where(raw < 0, 0, taps[:, 0] + 1)  # nondecreasing along the axis: groups are contiguous runs
    counts = np.bincount(group, minlength=low + 1)
    slot = np.arange(max(1, int(counts.max())))
    index = (np.cumsum(counts) - counts)[:, None] + slot
    unused = slot >= counts[:, None]
    group_weights = weights[np.minimum(index, out - 1)]
    first = np.maximum(np.arange(low + 1) - 1, 0)
    return np.where(unused, -(1 << 40), index), group_weights, np.stack([first, np.minimum(first + 1, low - 1)], 1)


class AxisTaps(NamedTuple):
    """One axis's resampling tables on the device (`_device_taps`). Offsets are flat: source pixels times the
    source's stride along the axis, output pixels times the output's."""

    first: torch.Tensor  # (out,) each output pixel's first source pixel
    group_targets: torch.Tensor  # (G, K) each group's output pixels, as offsets; negative in unused slots
    group_weights: torch.Tensor  # (G, K, 2) their weights
    group_sources: torch.Tensor  # (G, 2) the group's two source pixels, as offsets
    group_first: torch.Tensor  # (G,) its first source pixel
    group_used: torch.Tensor  # (G,) it holds output pixels


@functools.lru_cache(maxsize=32)
def _device_taps(low: int, out: int, scale: float, device: torch.device, source_stride: int = 1,
                 out_stride: int = 1) -> AxisTaps:
    """`_bilinear_taps` and `_pixel_groups` on `device`, kept for the next image of the same size: a copy from the
    host to a GPU waits for the GPU to finish its queue, so each uncached one stalls post-processing (a few hundred KB
    at most)."""
    taps = _bilinear_taps(low, out, scale)[0]
    targets, group_weights, sources = _pixel_groups(low, out, scale)
    arrays = (taps[:, 0], targets * out_stride, group_weights, sources * source_stride, sources[:, 0],
              targets[:, 0] >= 0)
    return AxisTaps(*(torch.from_numpy(np.ascontiguousarray(array)).to(device) for array in arrays))


def uniform_cells(low_label: torch.Tensor) -> torch.Tensor:
    """(h, w) bool: the pixel of an (h, w) winner map, its right, lower and lower-right neighbours (clamped at the
    edges) share one winner, so every output pixel sampled between them takes it (`_label_from_corners`)."""
    padded = torch.cat([low_label, low_label[-1:]], dim=0)
    padded = torch.cat([padded, padded[:, -1:]], dim=1)
    corner = padded[:-1, :-1]
    return (corner == padded[:-1, 1:]) & (corner == padded[1:, :-1]) & (corner == padded[1:, 1:])


def _label_from_corners(score: torch.Tensor, scale: tuple[float, float], out_h: int, out_w: int,
                        with_best: bool, with_total: bool):
    """
    Argmax of the bilinearly resampled (C, h, w) `score` at out_h x out_w without resampling every class everywhere.

    A resampled pixel is a convex combination of its four source pixels' class vectors; when those four share the
    winning class (first maximum included), every convex combination has the same winner. So a pixel inside a
    segment takes its label from the low-resolution argmax, and only pixels whose source pixels disagree (about
    the segment boundaries) blend all C classes: a group of output pixels sharing four source pixels at a time
    (`_pixel_groups`), whose class vectors are read once for the group. Labels equal the full resampling's except
    where two classes tie to float rounding (tests/test_image_processing.py). Returns (labels, best score or None,
    class sum or None).
    """
    num_classes, low_h, low_w = score.shape
    device = score.device
    factored = isinstance(score, FactoredScores)
    flat = None if factored else score.flatten(1)  # (C, h * w): a view in either of semantic_scores' layouts
    # the first maximum, as argmax; faster on a CPU
    low_best, low_label = score.class_max() if factored else flat.max(dim=0)
    low_label = low_label.view(low_h, low_w)
    rows = _device_taps(low_h, out_h, scale[0], device, source_stride=low_w, out_stride=out_w)
    cols = _device_taps(low_w, out_w, scale[1], device)
    # every pixel's label from its first source pixel (and its best score, with_best, from the resampled
    # low-resolution maximum: a pixel whose four sources share the winner blends their maxima), in buffers with a
    # spare last slot that the groups' unused slots write to (their targets are negative, clamped to -1)
    buffer = low_label.new_empty(out_h * out_w + 1)
    labels = buffer[:-1].view(out_h, out_w)
    torch.index_select(low_label.index_select(0, rows.first), 1, cols.first, out=labels)
    best = total = best_buffer = None
    if with_best or with_total:
        best_buffer = low_best.new_empty(out_h * out_w + 1)
        best = best_buffer[:-1].view(out_h, out_w)
        best.copy_(_resample(low_best.view(1, 1, low_h, low_w), scale, out_h, out_w)[0, 0])
    uniform = uniform_cells(low_label).index_select(0, rows.group_first).index_select(1, cols.group_first)
    group_rows, group_cols = (rows.group_used[:, None] & cols.group_used & ~uniform).nonzero(as_tuple=True)
    # groups blended at once: on a GPU as many as the budget allows (fewest launches); on a CPU 16 MB of class
    # vectors at a time, which stay in cache
    budget = POSTPROCESS_BUDGET_ELEMENTS if device.type != "cpu" else min(POSTPROCESS_BUDGET_ELEMENTS, 1 << 22)
    chunk = max(1, budget // ((4 + rows.group_targets.shape[1] * cols.group_targets.shape[1]) * num_classes))
    for start in range(0, group_rows.numel(), chunk):
        gr, gc = group_rows[start : start + chunk], group_cols[start : start + chunk]
        corners = (rows.group_sources[gr][:, :, None] + cols.group_sources[gc][:, None, :]).flatten(1)  # (n, 4)
        weight = rows.group_weights[gr][:, :, None, :, None] * cols.group_weights[gc][:, None, :, None, :]
        vectors = score.class_vectors(corners) if factored else class_vectors(flat, corners)  # (n, 4, C)
        blended = torch.bmm(weight.flatten(3).flatten(1, 2), vectors)  # (n, Ky*Kx, 4) @ (n, 4, C)
        target = (rows.group_targets[gr][:, :, None] + cols.group_targets[gc][:, None, :]).flatten().clamp_(min=-1)
        if best_buffer is None:
            buffer[target] = blended.argmax(dim=2).flatten()
        else:
            winner = blended.max(dim=2)  # the first maximum, as argmax
            buffer[target] = winner.indices.flatten()
            best_buffer[target] = winner.values.flatten()
    if with_total:  # every class's evidence, resampled
        class_sum = score.class_sum() if factored else flat.sum(dim=0)
        total = _resample(class_sum.view(1, 1, low_h, low_w), scale, out_h, out_w)[0, 0]
    return labels, best, total


def class_vectors(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(*index.shape, C): the class vectors of (C, N) scores at the flat pixel indices `index`. Class-major scores are
    gathered row by row (neighbouring pixels of a row of boundary groups are read together), pixel-major ones
    vector by vector."""
    if flat.stride(1) == 1 and flat.shape[0] > 1:
        return flat.index_select(1, index.flatten()).view(flat.shape[0], *index.shape).movedim(0, -1)
    return flat.t()[index]


def _covering_scale(size: int, scale: float, needed: int) -> float:
    """`scale`, raised by the fewest float steps for which F.interpolate's output (floor(size * scale)) holds `needed`
    pixels: out / low in floating point can land a hair under the integer (61 / 7 * 7 = 60.99...)."""
    import math

    while math.floor(float(size) * scale) < needed:
        scale = math.nextafter(scale, math.inf)
    return scale


_COMPILED_RESAMPLE_MAX = None


def _compiled_resample_max():
    global _COMPILED_RESAMPLE_MAX
    if _COMPILED_RESAMPLE_MAX is None:
        _COMPILED_RESAMPLE_MAX = torch.compile(_resample_max, dynamic=False)
    return _COMPILED_RESAMPLE_MAX


def _check_target_sizes(target_sizes, batch: int) -> list[tuple[int, int]] | None:
    if target_sizes is None:
        return None
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != batch:
        raise ValueError(
            f"Make sure that you pass in as many target sizes as the batch dimension of the logits: got "
            f"{len(target_sizes)} target sizes for a batch of {batch}."
        )
    sizes = [tuple(int(s) for s in size) for size in target_sizes]
    if any(len(size) != 2 or min(size) < 1 for size in sizes):
        raise ValueError(f"target_sizes must be (height, width) pairs of positive sizes, got {target_sizes}.")
    return sizes


def _fits(size: Sequence[int], height: int, width: int) -> bool:
    """Whether an aspect-preserving resize of `size` (rounded, as `resized_size`) can give height x width."""
    low = max((height - 1) / size[0], (width - 1) / size[1])
    return low <= min((height + 1) / size[0], (width + 1) / size[1])


def _check_not_turned(target_sizes: list[tuple[int, int]], image_sizes: list[list[int]]) -> None:
    """A target size that fits the processed image only turned by 90 degrees is (width, height), or the size of a
    photo before its EXIF orientation: the labels would come back stretched across the wrong axes."""
    for i, (size, geometry) in enumerate(zip(target_sizes, image_sizes)):
        height, width = int(geometry[0]), int(geometry[1])
        if not _fits(size, height, width) and _fits(size, width, height):
            raise ValueError(
                f"target_sizes[{i}] = {tuple(size)} fits the processed image ({height} x {width}) only turned by "
                "90 degrees: give (height, width) of the image as the processor read it (PIL's image.size is "
                "(width, height), so image.size[::-1]; the processor applies a photo's EXIF orientation, so for a "
                "PIL image PIL.ImageOps.exif_transpose(image).size[::-1]).")


def semantic_scores(outputs, class_major: bool | None = None) -> torch.Tensor:
    """(B, C, h, w) per-class scores from mask-classification outputs: one contraction over the queries.

    Laid out for the class maximum that labelling takes next: pixel-major (channels-last strides, each pixel's class
    vector contiguous) on a CPU, class-major (contiguous) on a GPU (`class_major=None`: by device). On an H200, the
    maximum over 150 classes at 1M pixels took 0.23 ms class-major against 0.68 ms pixel-major, the contraction
    0.48 ms either way; on a 2-core CPU pixel-major is the faster by 4x (maximum) and 1.5x (contraction)."""
    class_logits = _checked_logits(outputs)
    with _float32(class_logits.device):
        probs = class_logits.float().softmax(dim=-1)[..., :-1]
        num_classes = probs.shape[-1]
        # zero classes pad the class dimension to a multiple of 8 (150 -> 152; the void column left a row stride of
        # 151): every pixel's class vector then starts at an aligned address, as GPU matrix kernels' fast paths
        # want; sliced off again, values unchanged (each score sums over the queries alone)
        probs = F.pad(probs, (0, -num_classes % 8))
        masks = outputs.masks_queries_logits.float().sigmoid()
        batch, _, height, width = masks.shape
        if class_major is None:
            class_major = masks.device.type == "cuda"
        if class_major:
            maps = torch.bmm(probs.transpose(1, 2), masks.flatten(2))[:, :num_classes]  # (B, C, h * w)
            return maps.view(batch, num_classes, height, width)
        pixels = torch.bmm(masks.flatten(2).transpose(1, 2), probs)[..., :num_classes]  # (B, h * w, C)
    return pixels.view(batch, height, width, num_classes).permute(0, 3, 1, 2)


class FactoredScores(NamedTuple):
    """One image's (C, h, w) scores kept as their two factors, `probs` (N, C) and `masks` (N, h * w): the score of
    class c at pixel p is sum_q probs[q, c] * masks[q, p]. Thousands of classes at mask resolution would take tens
    of GB as dense maps (3,000 classes over a 1024 x 1024 mask: 12 GB); labelling reads each pixel's class vector a
    chunk of pixels at a time instead (`image_scores`)."""

    probs: torch.Tensor
    masks: torch.Tensor
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.probs.shape[1], self.height, self.width

    @property
    def device(self) -> torch.device:
        return self.probs.device

    def _chunk(self) -> int:
        """Pixels whose class vectors are built at once: the post-processing budget (16 MB of them on a CPU)."""
        budget = POSTPROCESS_BUDGET_ELEMENTS if self.device.type != "cpu" else 1 << 22
        return max(1, budget // self.probs.shape[1])

    def class_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(h * w,) best score and first best class of every pixel, as `(C, h * w).max(dim=0)`."""
        pixels, chunk = self.masks.shape[1], self._chunk()
        best = self.masks.new_empty(pixels)
        label = torch.empty(pixels, dtype=torch.long, device=self.device)
        for start in range(0, pixels, chunk):
            stop = min(pixels, start + chunk)
            torch.max(self.masks[:, start:stop].t() @ self.probs, dim=1, out=(best[start:stop], label[start:stop]))
        return best, label

    def class_vectors(self, index: torch.Tensor) -> torch.Tensor:
        """(*index.shape, C): the class vectors at the flat pixel indices `index`, as `class_vectors` reads dense
        scores."""
        gathered = self.masks.index_select(1, index.flatten())  # (N, n)
        return (gathered.t() @ self.probs).view(*index.shape, self.probs.shape[1])

    def class_sum(self) -> torch.Tensor:
        """(h * w,) every pixel's evidence summed over the classes."""
        return self.probs.sum(dim=1) @ self.masks


def _checked_logits(outputs) -> torch.Tensor:
    """The class logits of mask-classification outputs, which must also hold mask logits."""
    class_logits = getattr(outputs, "class_queries_logits", None)
    if class_logits is None or getattr(outputs, "masks_queries_logits", None) is None:
        raise ValueError("outputs need `class_queries_logits` and `masks_queries_logits` (an MROVSegOutput).")
    return class_logits


def image_scores(outputs, class_major: bool | None = None) -> list[torch.Tensor | FactoredScores]:
    """Each image's scores for labelling: the (C, h, w) slice of `semantic_scores`, or `FactoredScores` where the
    dense maps of the batch would pass the post-processing budget (1 GB of float32: thousands of classes, or 150
    classes on images past about 2,700 x 2,700 px with ViT-B/16, whose masks have half the image's side): the same
    labels, never the maps."""
    class_logits = _checked_logits(outputs)
    masks = outputs.masks_queries_logits
    num_classes = class_logits.shape[-1] - 1
    batch, _, height, width = masks.shape
    if batch * num_classes * height * width <= POSTPROCESS_BUDGET_ELEMENTS:
        return list(semantic_scores(outputs, class_major))
    with _float32(class_logits.device):
        probs = class_logits.float().softmax(dim=-1)[..., :-1]
        return [FactoredScores(probs[i], masks[i].float().sigmoid().flatten(1), height, width)
                for i in range(batch)]


def _float32(device: torch.device):
    """Scores, their blends and maxima in float32 even inside a caller's autocast (evaluation runs under one), where
    bmm would run in bfloat16 and swap classes whose scores lie within its rounding. A caller's TF32 setting
    (`torch.backends.cuda.matmul.allow_tf32`, which benchmarks.gpu turns on) still applies to the score contraction,
    as to every float32 matmul: a global switch, left to the caller."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (meta): nothing to switch off
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def _check_overlap(slice_size: int, slice_overlap: int) -> None:
    if not 0 <= slice_overlap < slice_size:
        raise ValueError(f"slice_overlap={slice_overlap} must lie in [0, {slice_size - 1}] (below slice_size).")


def global_view(canvas: np.ndarray, size: int) -> np.ndarray:
    """Downsample the whole padded canvas (B, 3, H, W) to CLIP's S x S input, antialiased."""
    tensor = torch.from_numpy(canvas)
    if tuple(tensor.shape[-2:]) == (size, size):
        return canvas.copy()
    view = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return view.numpy()


def _resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (pixel centres), exact for any id range."""
    height, width = label.shape
    rows = np.minimum((np.arange(size[0]) + 0.5) * height / size[0], height - 1).astype(np.int64)
    cols = np.minimum((np.arange(size[1]) + 0.5) * width / size[1], width - 1).astype(np.int64)
    return label[rows[:, None], cols[None, :]]


__all__ = ["MROVSegImageProcessor", "semantic_scores", "image_scores", "FactoredScores", "label_scores",
           "LabelledScores", "resized_size"]
