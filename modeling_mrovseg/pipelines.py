"""`pipeline("zero-shot-image-segmentation")`: label every pixel with class names chosen per call.

The stock `pipeline("image-segmentation")` already works on the vocabulary stored in a checkpoint (this module only
makes it read images as the image processor does); the zero-shot one
takes `candidate_labels` (a list, where one entry may carry synonyms as "sofa, couch", or a string of names
separated by "," or, to allow synonyms, by ";"). Text embeddings are cached per (labels, templates), so a folder of
images with one vocabulary runs the text encoder once. With `batch_size > 1`, images of one size and one vocabulary
run as one batch; others run one by one, so a batched result equals the one-at-a-time result.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import os
import warnings
from collections import OrderedDict
from collections.abc import Sequence

# first: under an older transformers it names the version needed (the imports below would fail)
from .configuration_mrovseg import NotAnMROVSegCheckpoint, near_name, one_line, with_hint

import numpy as np
import PIL
import torch
from PIL import Image, features
from transformers import ImageSegmentationPipeline, Pipeline

try:  # the HTTP client of transformers' load_image: httpx, or httpx2 with newer huggingface_hub
    from huggingface_hub.utils import httpx
except ImportError:
    import httpx

from .text_classifier import parse_class_names


def parse_candidate_labels(candidate_labels: str | Sequence[str] | None, fallback: Sequence[str]) -> list[str]:
    """`parse_class_names`, with None meaning `fallback` (the stored vocabulary). A string is never read as a file
    path: a service passing its users' text here would hand them the lines of any file they name."""
    labels = parse_class_names(candidate_labels, allow_files=False)
    return list(fallback) if labels is None else labels


def open_image(image, timeout: float | None = None) -> Image.Image:
    """
    A path (a string or `pathlib.Path`), URL (`http://`, `https://`), data URL, base64 string, the bytes of an image
    file (an upload, a response body) or a file opened in binary mode opens with PIL as it is: 16-bit, alpha and EXIF
    orientation are left to the image processor, which handles them (transformers' `load_image` would flatten them
    to 8-bit RGB first). Unreadable inputs and decompression bombs raise a `ValueError` naming the input.
    """
    if isinstance(image, (Image.Image, np.ndarray, torch.Tensor)):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open_pil(io.BytesIO(image), f"the given {len(image)} bytes")
    if isinstance(image, os.PathLike):  # pathlib.Path: a file, never read as a URL or base64
        path = os.fsdecode(image)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not an existing regular file.")
        return _open_pil(path, path)
    if hasattr(image, "read"):  # an open file or buffer (a web framework's upload)
        name = str(getattr(image, "name", "the given file object"))
        data = None if isinstance(image, io.TextIOBase) else image.read()  # text mode: read() fails to decode
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"{name} is open in text mode; open the image with open(path, 'rb')")
        return _open_pil(io.BytesIO(data), name)
    if not isinstance(image, str):
        raise TypeError(f"expected a path (str or pathlib.Path), URL, base64 string, file bytes, binary file object, "
                        f"PIL image, numpy array or tensor, got {type(image)}")
    name = image if len(image) <= 200 else image[:60] + f"... ({len(image)} characters)"
    not_a_source = f"{name} is not an existing file, an http(s) URL or a base64-encoded image."
    if image.startswith(("http://", "https://")):
        return _open_pil(io.BytesIO(download(image, timeout)), name)
    if image.startswith("data:"):
        return _open_pil(io.BytesIO(decode_base64_image(image, not_a_source)), name)
    if not os.path.exists(image):  # a bare base64 string, or more likely a mistyped path that happens to be valid base64
        return _open_pil(io.BytesIO(decode_base64_image(image, not_a_source)), name, instead=not_a_source)
    if not os.path.isfile(image):  # a folder, or a named pipe, which would be waited on forever
        raise ValueError(f"{name} is not a regular file.")
    return _open_pil(image, name)


HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}  # ISO-BMFF `ftyp` brands


@functools.cache
def heif_support() -> bool:
    """Whether PIL reads HEIC/HEIF, the photos of iPhones (and many Android phones): with the optional pillow-heif
    package (`pip install pillow-heif`, or `mrovseg[heif]`), whose opener applies the file's rotation itself."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def unread_format_hint(source) -> str | None:
    """What to install for a file PIL could not identify, from its first bytes: HEIC/HEIF without pillow-heif, AVIF
    with a Pillow built without it."""
    if hasattr(source, "seek"):
        source.seek(0)
        head = source.read(12)
    else:
        with open(source, "rb") as file:
            head = file.read(12)
    brand = head[8:12] if head[4:8] == b"ftyp" else None
    if brand in HEIF_BRANDS:
        return ("a HEIC/HEIF file that pillow-heif cannot decode (damaged or truncated?)" if heif_support() else
                "a HEIC/HEIF photo (iPhones' format), which PIL reads with the pillow-heif package: "
                "pip install pillow-heif")
    if brand in (b"avif", b"avis"):
        return ("an AVIF file that Pillow cannot decode (damaged or truncated?)" if features.check("avif") else
                f"an AVIF image, which this Pillow ({PIL.__version__}) does not read: pip install 'pillow>=11.3'")
    return None


def _open_pil(source, name: str, instead: str | None = None) -> Image.Image:
    """PIL's reading of `source` (a path or a buffer); what it cannot read is a ValueError naming the input (`instead`:
    the message to give in its place)."""
    from .image_processing_mrovseg import warn_if_several_frames

    heif_support()
    try:
        with Image.open(source) as opened:
            opened.load()
            warn_if_several_frames(opened, name)  # the copy below knows nothing of the other frames
            return opened.copy()
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name}: {error} Resize it first, or raise the limit if you trust it "
                         "(PIL.Image.MAX_IMAGE_PIXELS; mrovseg segment --max-pixels).") from None
    except (OSError, SyntaxError) as error:
        if instead is not None:
            raise ValueError(instead) from None
        # PIL names an in-memory buffer ("cannot identify image file <_io.BytesIO object at 0x...>")
        unidentified = isinstance(error, Image.UnidentifiedImageError)
        reason = (unread_format_hint(source) or "not a format PIL reads") if unidentified else error
        raise ValueError(f"{name} cannot be read as an image: {reason}") from None


DOWNLOAD_TIMEOUT = 60.0  # seconds a URL may stall when the caller gives no timeout: an error, never a hang


def download(url: str, timeout: float | None) -> bytes:
    """The body of `url` (with transformers' own HTTP client), or a `ValueError` naming the URL."""
    try:
        response = httpx.get(url, timeout=DOWNLOAD_TIMEOUT if timeout is None else timeout, follow_redirects=True)
        response.raise_for_status()
    except httpx.HTTPError as error:  # its first line (httpx adds one with a link about status codes)
        raise ValueError(f"{url} cannot be downloaded: {one_line(error)}") from None
    kind = response.headers.get("content-type", "")
    if kind.startswith(("text/", "application/json")):  # a web page (a photo's page, a login) rather than the photo
        raise ValueError(f"{url} is not an image: the server sent {kind.split(';')[0]}")
    return response.content


def decode_base64_image(text: str, message: str) -> bytes:
    """The bytes of a data URL (`data:image/png;base64,...`) or a bare base64 string, else a `ValueError(message)`."""
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(message) from None


def model_image_processor(model):
    """The image processor of a model given without one: the checkpoint it was loaded from keeps its own (resolution
    included); otherwise one with the model's windows at the default resolution."""
    from .image_processing_mrovseg import MROVSegImageProcessor

    checkpoint = getattr(model, "_checkpoint_image_processor", lambda: None)()
    if checkpoint is not None:
        return checkpoint
    default = MROVSegImageProcessor.from_model_config(model.config)
    source = getattr(model, "_checkpoint_source", None)
    if source is not None:  # a folder saved without one, or with one that does not load: say which resolution
        warnings.warn(f"{source[0]} has no usable MROVSeg image processor; images are resized as the defaults say "
                      f"({dict(default.size)})", stacklevel=3)
    return default


def check_image_processor(processor) -> None:
    """MROVSeg reads the slices its own processor cuts; another model's processor (CLIP's, say) cuts none, and the
    pipeline then failed with "Subtask None is not supported" or a TypeError about `return_pixel_mask`."""
    if getattr(processor, "slice_size", None) is None:
        raise ValueError(f"MROVSeg needs its own image processor (MROVSegImageProcessor), got "
                         f"{type(processor).__name__}: leave image_processor= out, or pass "
                         "AutoImageProcessor.from_pretrained(<the MROVSeg checkpoint>).")


def read_rgb(image, timeout: float | None = None) -> np.ndarray:
    """Any image input (path, URL, base64, PIL image, array, tensor) as the H x W x 3 uint8 array the model sees: EXIF
    orientation applied, 16-bit scaled, transparency on white. The one reading of the pipeline, CLI, demo and export."""
    from .image_processing_mrovseg import to_rgb_uint8

    return to_rgb_uint8(open_image(image, timeout=timeout))


class MROVSegZeroShotSegmentationPipeline(Pipeline):
    """
    Example:

    ```python
    >>> from transformers import pipeline
    >>> import modeling_mrovseg  # registers the task
    >>> segmenter = pipeline("zero-shot-image-segmentation", model="path/or/hub-id")
    >>> result = segmenter("street.jpg", candidate_labels=["road", "cyclist", "traffic cone"])
    >>> [(segment["label"], round(segment["score"], 2)) for segment in result["segments"]]
    ```

    Inputs may also be dicts `{"image": ..., "candidate_labels": [...]}`, each with its own class names (as in
    transformers' zero-shot object detection); in a batch, images with the same names and size run together.

    Returns per image a dict: `segments` (one `{"label", "score", "mask", "pixels"}` per class present, largest
    first; `score` is the mean class probability inside the mask, `mask` a PIL "L" image), `label_map` (H x W
    int64 array of indices into `labels`, -1 where `score_threshold` left a pixel unlabelled) and `labels`.

    `compile=True` runs the model through `torch.compile` (one graph per input size); `compile="reduce-overhead"`
    adds CUDA graphs on a GPU, the fastest for small images (outputs are copied out of the graph's memory per call).
    """

    _load_processor = False
    _load_image_processor = None  # optional: a model object comes without one (see __init__)
    _load_feature_extractor = False
    _load_tokenizer = None  # optional: a checkpoint saved without one still serves its stored vocabulary
    _load_video_processor = False  # (transformers would look for one and ask whether to run remote code to find it)

    def __init__(self, *args, text_cache_size: int = 32, compile: bool | str = False, **kwargs):
        super().__init__(*args, **kwargs)
        model_type = getattr(self.model.config, "model_type", None)
        if model_type != "mrovseg":  # a CLIP folder loads as CLIPModel, which failed on the next line
            raise NotAnMROVSegCheckpoint(model_type, self.model.name_or_path or type(self.model).__name__)
        self.model.check_complete()  # a checkpoint that lacked weights segments with random ones
        if self.image_processor is None:  # pipeline(..., model=model_object), or a folder saved without a processor
            self.image_processor = model_image_processor(self.model)
        check_image_processor(self.image_processor)
        mode = compile_mode(compile)
        self.compiled = compile not in (False, None)
        # CUDA graphs (modes "reduce-overhead", "max-autotune"): a replay writes its outputs into the memory of the
        # last one, so each call begins a new step and its outputs are copied out (`_forward`)
        self.cuda_graphs = self.compiled and uses_cuda_graphs(mode)
        if self.compiled:  # nn.Module.compile: every call of the model goes through torch.compile (one graph per size)
            self.model.compile(mode=mode)
        self._text_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.text_cache_hits = 0
        self.text_cache_misses = 0

    def __call__(self, image=None, /, **kwargs):
        """`image`: one image (path or `Path`, URL, base64, bytes, binary file, PIL, numpy, tensor), an
        `{"image", "candidate_labels"}` dict, or a list or generator of them; also by keyword as `image=`
        (transformers' zero-shot pipelines), `images=` or `inputs=`. An empty list gives an empty list."""
        given = [(f"{name}=", kwargs.pop(name)) for name in ("image", "images", "inputs") if name in kwargs]
        given = [("an image", image)] * (image is not None) + given
        if len(given) != 1:
            raise TypeError(f"zero-shot-image-segmentation takes one image or list of images, got "
                            f"{' and '.join(name for name, _ in given) or 'none'}")
        image = given[0][1]
        if isinstance(image, (list, tuple)) and not image:  # an empty folder's images (the base class would fail)
            self._sanitize_parameters(**{k: v for k, v in kwargs.items() if k not in ("batch_size", "num_workers")})
            return []
        return super().__call__(image, **kwargs)

    # a misspelt or another pipeline's parameter would otherwise be dropped silently (transformers' pipelines ignore
    # what they do not know): `threshold=0.5` segmented without any threshold
    _SIMILAR = {"threshold": "score_threshold", "mask_threshold": "score_threshold", "labels": "candidate_labels",
                "class_names": "candidate_labels", "classes": "candidate_labels", "vocabulary": "candidate_labels"}

    def _sanitize_parameters(self, candidate_labels=None, score_threshold=None, timeout=None, **kwargs):
        if kwargs:
            known = ("candidate_labels", "score_threshold", "timeout")
            hints = [with_hint(name, self._SIMILAR.get(name) or near_name(name, known)) for name in sorted(kwargs)]
            raise TypeError(f"zero-shot-image-segmentation got unknown parameter(s) {', '.join(hints)}; it takes "
                            "candidate_labels, score_threshold, timeout, batch_size and num_workers per call "
                            "(and text_cache_size, compile when built)")
        preprocess, postprocess = {}, {}
        if candidate_labels is not None:
            preprocess["candidate_labels"] = candidate_labels
        if timeout is not None:
            preprocess["timeout"] = timeout
        if score_threshold is not None:
            postprocess["score_threshold"] = check_score_threshold(score_threshold)
        return preprocess, {}, postprocess

    def _text_state(self) -> tuple:
        """What cached embeddings were computed from besides the labels: the templates and the text tower's weights.
        Training them in place (a LoRA on the text side, in a notebook beside a live pipeline) bumps each tensor's
        version and `.to()` gives new storage; either made the cache serve stale embeddings."""
        tower = [*self.model.text_model.parameters(), *self.model.text_projection.parameters()]
        return tuple(self.model.config.prompt_templates), tuple((p.data_ptr(), p._version) for p in tower)

    def text_embeddings(self, labels: list[str]) -> torch.Tensor:
        """(C, E) embeddings of `labels`: the stored ones for the model's own vocabulary, else computed once per
        (labels, templates) and then served from a cache."""
        if list(labels) == self.model.vocabulary:  # always the live buffer: set_vocabulary may have replaced it
            return self.model.vocabulary_embeds
        key = (tuple(labels), *self._text_state())
        if key in self._text_cache:
            self.text_cache_hits += 1
            self._text_cache.move_to_end(key)
            return self._text_cache[key]
        self.text_cache_misses += 1
        tokenizer = self.tokenizer if self.tokenizer is not None else self.model.clip_tokenizer
        if tokenizer is None:
            raise ValueError(
                f"This checkpoint has no CLIP tokenizer ({self.model.missing_tokenizer()}), so it can only segment "
                f"its stored vocabulary {self.model.vocabulary}; for other candidate_labels pass `tokenizer=` (the "
                "CLIP's) to pipeline().")
        embeds = self.model.embed_class_names(labels, tokenizer)
        self._text_cache[key] = embeds
        if len(self._text_cache) > self._text_cache_size:
            self._text_cache.popitem(last=False)
        return embeds

    def preprocess(self, image, candidate_labels=None, timeout=None):
        if isinstance(image, dict):  # {"image": ..., "candidate_labels": ...}: this image's own labels
            unknown = set(image) - {"image", "candidate_labels"}
            if "image" not in image or unknown:
                raise ValueError(f"an input dict holds 'image' and optionally 'candidate_labels', got {sorted(image)}")
            candidate_labels = image.get("candidate_labels", candidate_labels)
            image = image["image"]
        labels = parse_candidate_labels(candidate_labels, self.model.vocabulary)
        image = read_rgb(image, timeout=timeout)
        inputs = self.image_processor(images=[image], return_pixel_mask=self.compiled, return_tensors="pt")
        return {**inputs, "target_size": image.shape[:2], "candidate_labels": labels}

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """As the base class, with a collate that keeps each image's own inputs (`_forward` groups equal shapes)."""
        from collections.abc import Sized

        from transformers.pipelines.base import PipelineDataset
        from transformers.pipelines.pt_utils import PipelineIterator

        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:  # a generator or other iterable: read in order by one worker, as the base class does
            dataset = PipelineIterator(inputs, self.preprocess, preprocess_params)
            num_workers = min(num_workers, 1)
        loader = torch.utils.data.DataLoader(dataset, num_workers=num_workers, batch_size=batch_size,
                                             collate_fn=lambda items: {"items": list(items)})
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _forward(self, model_inputs):
        items = model_inputs["items"] if "items" in model_inputs else [model_inputs]
        results: list[dict | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):  # one batch per (input shapes, vocabulary): same result as one by one
            key = (tuple((k, tuple(v.shape)) for k, v in item.items() if isinstance(v, torch.Tensor)),
                   tuple(item["candidate_labels"]))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            first = items[members[0]]
            labels = first["candidate_labels"]
            names = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
            batch = {k: torch.cat([items[i][k] for i in members]).to(self.device) for k in names}
            batch = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            outputs = self.model(**batch, text_embeds=self.text_embeddings(labels))
            keep = (lambda t: t.clone()) if self.cuda_graphs else (lambda t: t)  # noqa: E731
            for j, i in enumerate(members):
                results[i] = {"class_queries_logits": keep(outputs.class_queries_logits[j : j + 1]),
                              "masks_queries_logits": keep(outputs.masks_queries_logits[j : j + 1]),
                              "image_sizes": keep(outputs.image_sizes[j : j + 1]),
                              "target_size": items[i]["target_size"], "candidate_labels": labels}
        return {"results": results} if "items" in model_inputs else results[0]

    def postprocess(self, model_outputs, score_threshold=None):
        from .image_processing_mrovseg import image_scores, label_scores
        from .modeling_mrovseg import MROVSegOutput

        model_outputs = model_outputs.get("results", model_outputs)
        if isinstance(model_outputs, list):  # a list input at batch size 1 is not unbatched by the iterator
            model_outputs = model_outputs[0]
        labels = model_outputs["candidate_labels"]
        outputs = MROVSegOutput(class_queries_logits=model_outputs["class_queries_logits"],
                                masks_queries_logits=model_outputs["masks_queries_logits"],
                                image_sizes=model_outputs["image_sizes"])
        labelled = label_scores(image_scores(outputs)[0], model_outputs["image_sizes"][0].tolist(),
                                model_outputs["target_size"], score_threshold, with_shares=True)
        label_map = labelled.segmentation.cpu().numpy().astype(np.int64, copy=False)
        shares = labelled.class_shares.cpu().tolist()  # each class's mean share of the evidence over its mask
        counts = pixel_counts(label_map, len(labels))
        segments = []
        for index in np.flatnonzero(counts):
            mask = np.equal(label_map, index).view(np.uint8)
            np.multiply(mask, 255, out=mask)
            segments.append({"label": labels[index], "score": shares[index], "mask": Image.fromarray(mask, mode="L"),
                             "pixels": int(counts[index])})
        segments.sort(key=lambda s: -s["pixels"])
        return {"segments": segments, "label_map": label_map, "labels": labels}


def pixel_counts(label_map: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixels of each class in a label map (-1 unlabelled), a block of rows at a time: `np.unique` sorted a copy of
    the whole map (0.9 GB and seconds for a 120-megapixel aerial photo)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    step = max(1, 2**22 // max(1, label_map.shape[-1]))
    for top in range(0, label_map.shape[0], step):
        rows = label_map[top : top + step]
        counts += np.bincount(rows[rows >= 0], minlength=num_classes)[:num_classes]
    return counts


def compile_mode(compile: bool | str | None) -> str | None:
    """The `torch.compile` mode a `compile=` argument asks for: True (or "default") the default mode, a string one of
    inductor's modes ("reduce-overhead": CUDA graphs, the fastest for small images on a GPU); a clear error for
    anything else."""
    from torch._inductor import list_mode_options

    if compile is None or isinstance(compile, bool):
        return None
    modes = list(list_mode_options())
    if compile not in modes:
        raise ValueError(f"compile={compile!r}: give True, False or one of torch.compile's modes {modes}.")
    return None if compile == "default" else compile


def uses_cuda_graphs(mode: str | None) -> bool:
    from torch._inductor import list_mode_options

    return bool(list_mode_options().get(mode or "default", {}).get("triton.cudagraphs", False))


def check_score_threshold(value) -> float:
    """A score threshold is a finite number (scores are sums of probabilities, so >= 0)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"score_threshold={value!r} must be a finite number >= 0 (or None for no threshold).")
    return float(value)


class MROVSegImageSegmentationPipeline(ImageSegmentationPipeline):
    """
    `pipeline("image-segmentation")` once `modeling_mrovseg` is imported: for MROVSeg checkpoints, images are read as
    the image processor reads them (`read_rgb`: 16-bit scaled, transparency on white, EXIF orientation; numpy arrays
    accepted), where transformers' `load_image` would flatten them to 8-bit RGB first. For every other model it is
    transformers' `ImageSegmentationPipeline`, unchanged.
    """

    # no image-segmentation model uses a video processor; looking for one in an MROVSeg folder with a
    # preprocessor_config.json made transformers ask on stdin whether to run the folder's remote code
    _load_video_processor = False
    # optional, so that a model object comes without one (see __init__; other models still need theirs)
    _load_image_processor = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None and not self.serves_mrovseg:
            self._raise_missing_image_processor()
        if self.serves_mrovseg:
            self.model.check_complete()
            if self.image_processor is None:  # pipeline(..., model=model_object): transformers guessed none
                self.image_processor = model_image_processor(self.model)
            check_image_processor(self.image_processor)

    def _raise_missing_image_processor(self) -> None:
        """Another model without an image processor fails as in transformers: the error of loading it from the
        model's folder or Hub id (which the optional flag above swallowed), else transformers' own message."""
        from transformers import AutoImageProcessor

        source = getattr(self.model, "name_or_path", "") or ""
        if source:
            AutoImageProcessor.from_pretrained(source)
        raise Exception("Impossible to guess which image processor to use. Please provide a PreTrainedImageProcessor "
                        "class or a path/identifier to a pretrained image processor.")

    @property
    def serves_mrovseg(self) -> bool:
        return getattr(self.model.config, "model_type", None) == "mrovseg"

    def check_model_type(self, supported_models) -> None:
        if not self.serves_mrovseg:  # MROVSeg is supported: no warning
            super().check_model_type(supported_models)

    def _sanitize_parameters(self, **kwargs):
        # the stock task's thresholds steer panoptic and instance post-processing; MROVSeg's is semantic, where
        # transformers drops them silently: `threshold=0.5` labelled every pixel as if it had not been given
        ignored = sorted(k for k in ("threshold", "mask_threshold", "overlap_mask_area_threshold")
                         if kwargs.get(k) is not None)
        if ignored and self.serves_mrovseg:
            raise ValueError(f"{', '.join(ignored)} does nothing for MROVSeg's semantic segmentation; to leave pixels "
                             "with a low score unlabelled use pipeline('zero-shot-image-segmentation', ...)(image, "
                             "score_threshold=...).")
        return super()._sanitize_parameters(**kwargs)

    def __call__(self, inputs=None, **kwargs):
        if self.serves_mrovseg and isinstance(inputs, (list, tuple)) and not inputs:  # transformers: an IndexError
            self._sanitize_parameters(**kwargs)
            return []
        return super().__call__(inputs, **kwargs)

    def preprocess(self, image, subtask=None, timeout=None):
        if not self.serves_mrovseg:
            return super().preprocess(image, subtask=subtask, timeout=timeout)
        rgb = read_rgb(image, timeout=timeout)
        inputs = self.image_processor(images=[rgb], return_tensors="pt").to(self.dtype)
        inputs["target_size"] = [rgb.shape[:2]]
        return inputs


def register_pipelines() -> None:
    from transformers import AutoModelForSemanticSegmentation
    from transformers.pipelines import PIPELINE_REGISTRY

    # the stock task keeps its models and default; only its class becomes the subclass above
    PIPELINE_REGISTRY.supported_tasks["image-segmentation"]["impl"] = MROVSegImageSegmentationPipeline
    if "zero-shot-image-segmentation" not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            "zero-shot-image-segmentation",
            pipeline_class=MROVSegZeroShotSegmentationPipeline,
            pt_model=AutoModelForSemanticSegmentation,
            type="multimodal",
        )


__all__ = ["MROVSegZeroShotSegmentationPipeline", "MROVSegImageSegmentationPipeline", "parse_candidate_labels",
           "register_pipelines", "open_image", "check_score_threshold", "read_rgb"]
