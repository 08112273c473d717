"""Configuration of MROVSeg: one CLIP over a global view plus full-resolution slices."""

from __future__ import annotations

import dataclasses
import difflib
import math
import string
import sys
import unicodedata
from collections.abc import Iterable
from typing import Any

import transformers
from packaging.version import InvalidVersion, Version
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, PretrainedConfig


MIN_TRANSFORMERS = (5, 21)  # pyproject.toml's floor: the oldest release whose configs, CLIP and loaders this code uses


def check_transformers_version(version: str = transformers.__version__) -> None:
    """Remote code run with an older transformers (a Hub checkpoint loaded with `trust_remote_code=True`) failed deep
    in transformers: "cannot import name 'initialization'" (4.x), "'dict' object has no attribute
    'num_hidden_layers'" (5.0-5.19, before dataclass sub-configs), no `create_subconfig` (5.20). Name the version to
    install instead. Every module of the package imports this one before transformers' newer names."""
    try:
        release = Version(version).release
    except InvalidVersion:  # a build naming itself otherwise: let it try
        return
    if release[:2] < MIN_TRANSFORMERS:
        sys.modules.pop(__name__, None)  # transformers' module loader keeps a failed module: check again next time
        needed = ".".join(map(str, MIN_TRANSFORMERS))
        raise ImportError(f"MROVSeg's code needs transformers {needed} or newer, and this Python has transformers "
                          f"{version}: pip install -U 'transformers>={needed}'")


check_transformers_version()

# Label value of unlabelled and padding pixels: the one default of the config, the image processor and the metric.
IGNORE_INDEX = 255
# ... for vocabularies of more than 255 classes (ADE20K-847, Pascal Context-459), where 255 is a class: 16-bit maps
WIDE_IGNORE_INDEX = 65535


def unlabelled_value(num_classes: int) -> int:
    """The label value of unlabelled pixels for `num_classes` classes: 255 in 8-bit label maps up to 255 classes,
    else 65535 in 16-bit ones (the convention of detectron2's ADE20K-847 preparation)."""
    return IGNORE_INDEX if num_classes <= IGNORE_INDEX else WIDE_IGNORE_INDEX

# How the full-resolution branch is encoded: MROVSeg's CLIP-sized slices, or (the baseline it improves on, kept for
# benchmarks) one CLIP pass over the whole canvas with interpolated position embeddings.
HIGH_RES_ENCODINGS = ("slices", "full_image")

# The 14 prompt templates of ViLD (Gu et al., 2022), the usual ensemble for open-vocabulary segmentation.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# Shapes of the public OpenAI CLIP checkpoints, so a config can be built without any download.
CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "vit-b-16": {
        "hub_id": "openai/clip-vit-base-patch16",
        "projection_dim": 512,
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=16),
        "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    },
    "vit-l-14": {
        "hub_id": "openai/clip-vit-large-patch14",
        "projection_dim": 768,
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    },
    "vit-l-14-336": {
        "hub_id": "openai/clip-vit-large-patch14-336",
        "projection_dim": 768,
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    },
    # A few-kilobyte model for tests, demos and CPU smoke runs.
    "tiny": {
        "hub_id": None,
        "projection_dim": 32,
        "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       image_size=64, patch_size=8),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     vocab_size=1000, max_position_embeddings=32,
                     bos_token_id=998, eos_token_id=999, pad_token_id=999),
    },
}


def default_feature_layers(depth: int) -> list[int]:
    """Quarter, half and three-quarter depth: 3, 6, 9 for ViT-B (12 layers) and 6, 12, 18 for ViT-L (24)."""
    layers = sorted({max(1, depth // 4), max(1, depth // 2), max(1, (3 * depth) // 4)})
    return [layer for layer in layers if layer < depth] or [max(0, depth - 1)]


def near_name(name: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The name among `known` that `name` most likely misspells (difflib's similarity at least `cutoff`), or None."""
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=cutoff)
    return match[0] if match else None


def with_hint(name: str, near: str | None) -> str:
    """`name` for an error message, with the name meant where one is near: "num_querys (did you mean num_queries?)"."""
    return f"{name} (did you mean {near}?)" if near else name


class NotAnMROVSegCheckpoint(ValueError):
    """Another model's checkpoint (most often the CLIP training starts from) where an MROVSeg one was needed:
    transformers would build MROVSegConfig from its config with a warning, then fail on a field it does not know."""

    def __init__(self, model_type: str | None, source: str = "this config"):
        self.model_type, self.source = model_type, source
        hint = ("; around a CLIP, build one with MROVSegForOpenVocabSegmentation.from_clip" if model_type == "clip"
                else "")
        kind = f"is a {model_type!r} checkpoint" if model_type else "has a config without a model_type"
        super().__init__(f"{source} {kind}, not an MROVSeg model: give a checkpoint saved by "
                         f"training.train (OUTPUT_DIR/model) or MROVSegForOpenVocabSegmentation.save_pretrained{hint}")


def one_line(error: BaseException) -> str:
    """An exception as one line for a script's `error: ...` message: its first line, or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


LEGACY_FIELD = "mask_decoder_channels"  # pixel_decoder_channels, as configs saved before the rename call it


class MROVSegConfig(PretrainedConfig):
    r"""
    Configuration of [`MROVSegForOpenVocabSegmentation`].

    Every architectural choice the paper leaves open is a field here, so that a detail learnt later is a config
    change rather than a rewrite. Layer indices count CLIP encoder layers from 1 (0 is the patch-embedding stem),
    so `feature_layers=[3, 6, 9]` taps the outputs of the 3rd, 6th and 9th layers of ViT-B.

    Args:
        vision_config / text_config: CLIP sub-configs (dicts or [`CLIPVisionConfig`] / [`CLIPTextConfig`]).
        projection_dim: width of CLIP's joint image-text space.
        logit_scale_init: initial log of CLIP's temperature (ln(1 / 0.07)); overwritten by `from_clip`.
        slice_size: side of the sliding windows in pixels (defaults to CLIP's `image_size`).
        slice_overlap: overlap of neighbouring windows in pixels; a multiple of the patch size.
        slice_batch_size: windows per CLIP call at inference, bounding memory on large images (`None`: all at once;
            training runs a batch's windows in one call, as autograd keeps every chunk's activations anyway).
        feature_layers: tapped CLIP layers, each fused by one Multi-Res Adapter.
        query_layer: layer whose [CLS] token seeds the queries; they then run through the remaining layers.
        adapter_kernel_size: kernel of the depthwise conv that repairs slice seams.
        hidden_dim: decoder width D.
        pixel_decoder_channels: output channels of each 2x upsampling stage of the pixel decoder (one stage per
            tapped layer); `mask_decoder_channels` in configs saved before the rename.
        num_queries / num_decoder_layers / num_decoder_heads / decoder_ffn_dim: the light query decoder.
        prompt_templates: templates that wrap every class name for the text encoder (ViLD's 14 by default).
        class_weight / mask_weight / dice_weight / no_object_weight: loss and matching weights.
        train_num_points / oversample_ratio / importance_sample_ratio: point sampling of the mask losses.
        balanced_sample_ratio: share of the mask-loss points drawn with every class of the image equally likely
            (at most what the uncertain ones leave; the rest is uniform), so small classes weigh in as positives
            and negatives.
        use_high_res / use_scale_attention / use_local_mask: ablation switches of the three mechanisms.
        high_res_encoding: "slices" (MROVSeg) or "full_image" (one CLIP pass over the whole canvas, the baseline).
        train_position_embeddings: keep CLIP's position embeddings trainable (the rest of CLIP stays frozen).
        ignore_index: label value that marks unlabelled pixels (255; 65535 past 255 classes, where 255 is a class).

    Example:

    ```python
    >>> from modeling_mrovseg import MROVSegConfig
    >>> config = MROVSegConfig.from_preset("vit-b-16", id2label={0: "sky", 1: "road"})
    >>> config.feature_layers, config.query_layer, config.slice_size
    ([3, 6, 9], 9, 224)
    ```
    """

    model_type = "mrovseg"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig, "text_config": CLIPTextConfig}

    vision_config: dict | CLIPVisionConfig | None = None
    text_config: dict | CLIPTextConfig | None = None
    projection_dim: int = 512
    logit_scale_init: float = 2.6592
    slice_size: int | None = None
    slice_overlap: int = 0
    slice_batch_size: int | None = 32
    feature_layers: list[int] | None = None
    query_layer: int | None = None
    adapter_kernel_size: int = 3
    hidden_dim: int = 256
    pixel_decoder_channels: list[int] | None = None
    num_queries: int = 100
    num_decoder_layers: int = 3
    num_decoder_heads: int = 8
    decoder_ffn_dim: int = 1024
    prompt_templates: list[str] | None = None
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    balanced_sample_ratio: float = 0.1
    use_high_res: bool = True
    use_scale_attention: bool = True
    use_local_mask: bool = True
    high_res_encoding: str = "slices"
    train_position_embeddings: bool = True
    ignore_index: int = IGNORE_INDEX
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "MROVSegConfig":
        other = config_dict.get("model_type")
        if other not in (None, cls.model_type):
            raise NotAnMROVSegCheckpoint(other)
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        legacy_channels = kwargs.pop(LEGACY_FIELD, None)  # the field's name before the rename
        # other keywords are kept as attributes (what transformers saves beside the fields); one near a field's name
        # (`num_querys=`, CLIP's `logit_scale_init_value=`) is a mistake that would leave the field at its default
        misspelt = [with_hint(name, near) for name in kwargs if (near := self.field_near(name))]
        if misspelt:
            raise TypeError(f"MROVSegConfig has no field(s) {', '.join(misspelt)}")
        if self.pixel_decoder_channels is None and legacy_channels is not None:
            self.pixel_decoder_channels = legacy_channels
        super().__post_init__(**kwargs)
        self._check_types()
        vision = self.vision_config
        if self.slice_size is None:
            self.slice_size = int(vision.image_size)
        if self.feature_layers is None:
            self.feature_layers = default_feature_layers(vision.num_hidden_layers)
        self.feature_layers = [int(layer) for layer in self.feature_layers]
        if self.query_layer is None and self.feature_layers:
            self.query_layer = max(self.feature_layers)
        if self.pixel_decoder_channels is None:
            self.pixel_decoder_channels = [max(8, self.hidden_dim // 2 ** (i + 1)) for i in range(len(self.feature_layers))]
        self.pixel_decoder_channels = [int(c) for c in self.pixel_decoder_channels]
        if self.prompt_templates is None:
            self.prompt_templates = list(VILD_TEMPLATES)
        self.prompt_templates = list(self.prompt_templates)
        self.fit_ignore_index()
        self.validate()

    def fit_ignore_index(self) -> None:
        """Keep a conventional `ignore_index` (255 or 65535) outside the class ids as the vocabulary grows or
        shrinks (`unlabelled_value`); a custom one is left to `validate`."""
        if self.ignore_index in (IGNORE_INDEX, WIDE_IGNORE_INDEX):
            self.ignore_index = unlabelled_value(self.num_labels)

    _INT_FIELDS = ("projection_dim", "slice_size", "slice_overlap", "slice_batch_size", "query_layer",
                   "adapter_kernel_size", "hidden_dim", "num_queries", "num_decoder_layers", "num_decoder_heads",
                   "decoder_ffn_dim", "train_num_points", "ignore_index")
    _FLOAT_FIELDS = ("logit_scale_init", "class_weight", "mask_weight", "dice_weight", "no_object_weight",
                     "oversample_ratio", "importance_sample_ratio", "balanced_sample_ratio",
                     "initializer_range")
    _BOOL_FIELDS = ("use_high_res", "use_scale_attention", "use_local_mask", "train_position_embeddings")

    def _check_types(self) -> None:
        """Wrong types fail here, by name, not as a TypeError deep inside the model (`num_queries="8"`)."""
        for field in self._INT_FIELDS:
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"MROVSegConfig.{field}={value!r} is invalid: must be an integer.")
        for field in self._FLOAT_FIELDS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"MROVSegConfig.{field}={value!r} is invalid: must be a finite number.")
        for field in self._BOOL_FIELDS:
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"MROVSegConfig.{field}={getattr(self, field)!r} is invalid: must be true or false.")
        for field in ("feature_layers", "pixel_decoder_channels"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, (list, tuple)) or any(
                    isinstance(v, bool) or not isinstance(v, int) for v in value)):
                raise ValueError(f"MROVSegConfig.{field}={value!r} is invalid: must be a list of integers.")
        templates = self.prompt_templates
        if templates is not None and (isinstance(templates, str) or any(not isinstance(t, str) for t in templates)):
            raise ValueError(f"MROVSegConfig.prompt_templates={templates!r} is invalid: must be a list of strings.")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise a `ValueError` naming the first invalid field and the range it must lie in."""
        vision = self.vision_config
        depth, patch, image_size = vision.num_hidden_layers, vision.patch_size, vision.image_size

        def fail(field: str, value: Any, allowed: str) -> None:
            raise ValueError(f"MROVSegConfig.{field}={value!r} is invalid: {allowed}.")

        if not self.feature_layers:
            fail("feature_layers", self.feature_layers, "give at least one CLIP layer to tap")
        if sorted(set(self.feature_layers)) != self.feature_layers:
            fail("feature_layers", self.feature_layers, "layers must be unique and increasing")
        for layer in self.feature_layers:
            if not 0 <= layer < depth:
                fail("feature_layers", self.feature_layers,
                     f"each tapped layer must lie in [0, {depth - 1}] (the CLIP vision tower has {depth} layers "
                     "and at least one must remain for the query tokens)")
        if not max(self.feature_layers) <= self.query_layer < depth:
            fail("query_layer", self.query_layer,
                 f"must lie in [{max(self.feature_layers)}, {depth - 1}]: not before the last tapped layer, "
                 "and at least one CLIP layer must remain for the queries")
        if self.slice_size <= 0 or self.slice_size % patch:
            fail("slice_size", self.slice_size, f"must be a positive multiple of the patch size {patch}")
        if not 0 <= self.slice_overlap < self.slice_size:
            fail("slice_overlap", self.slice_overlap, f"must lie in [0, {self.slice_size - 1}] (below slice_size)")
        if self.slice_overlap % patch:
            fail("slice_overlap", self.slice_overlap, f"must be a multiple of the patch size {patch}")
        if self.slice_batch_size is not None and self.slice_batch_size < 1:
            fail("slice_batch_size", self.slice_batch_size, "must be None or >= 1")
        if self.adapter_kernel_size < 1 or self.adapter_kernel_size % 2 == 0:
            fail("adapter_kernel_size", self.adapter_kernel_size, "must be a positive odd integer")
        if self.hidden_dim < 1 or self.hidden_dim % self.num_decoder_heads:
            fail("hidden_dim", self.hidden_dim, f"must be a positive multiple of num_decoder_heads={self.num_decoder_heads}")
        if len(self.pixel_decoder_channels) != len(self.feature_layers) or min(self.pixel_decoder_channels) < 1:
            fail("pixel_decoder_channels", self.pixel_decoder_channels,
                 f"needs {len(self.feature_layers)} positive widths, one per tapped layer")
        for field in ("num_queries", "num_decoder_layers", "num_decoder_heads", "decoder_ffn_dim", "projection_dim",
                      "train_num_points"):
            if getattr(self, field) < 1:
                fail(field, getattr(self, field), "must be >= 1")
        for field in ("class_weight", "mask_weight", "dice_weight", "no_object_weight"):
            if getattr(self, field) < 0:
                fail(field, getattr(self, field), "must be >= 0")
        if self.oversample_ratio < 1:
            fail("oversample_ratio", self.oversample_ratio, "must be >= 1")
        if not 0 <= self.importance_sample_ratio <= 1:
            fail("importance_sample_ratio", self.importance_sample_ratio, "must lie in [0, 1]")
        if not 0 <= self.balanced_sample_ratio <= 1:
            fail("balanced_sample_ratio", self.balanced_sample_ratio, "must lie in [0, 1]")
        if not self.prompt_templates or any(not _single_slot(t) for t in self.prompt_templates):
            fail("prompt_templates", self.prompt_templates,
                 "need at least one template, each with exactly one '{}' slot and no other placeholder "
                 "(write a literal brace as '{{' or '}}')")
        if self.high_res_encoding not in HIGH_RES_ENCODINGS:
            fail("high_res_encoding", self.high_res_encoding, f"must be one of {list(HIGH_RES_ENCODINGS)}")
        self._check_vocabulary()
        if not 0 <= self.ignore_index:
            fail("ignore_index", self.ignore_index, "must be >= 0")
        if self.ignore_index < self.num_labels:
            fail("ignore_index", self.ignore_index, f"is a class id of the {self.num_labels}-class vocabulary: "
                 f"unlabelled pixels would be that class; use a value >= {self.num_labels}")
        if image_size % patch:
            fail("vision_config.image_size", image_size, f"must be a multiple of the patch size {patch}")

    def _check_vocabulary(self) -> None:
        """id2label must name classes 0..C-1 and label2id must be its inverse: class ids index text embeddings."""
        id2label = self.id2label
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"MROVSegConfig.id2label={id2label!r} is invalid: it has ids {sorted(id2label)}: class ids must be 0..{len(id2label) - 1} "
                             "without gaps (they index the text embeddings).")
        expected = {label: i for i, label in id2label.items()}
        if len(expected) != len(id2label):
            raise ValueError("MROVSegConfig.id2label names a class twice.")
        if self.label2id and {label: int(i) for label, i in self.label2id.items()} != expected:
            raise ValueError(f"MROVSegConfig.label2id={dict(self.label2id)!r} is invalid: not the inverse of id2label {id2label}.")

    # ------------------------------------------------------------------ helpers
    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def slice_stride(self) -> int:
        return self.slice_size - self.slice_overlap

    @classmethod
    def field_names(cls) -> set[str]:
        return {field.name for field in dataclasses.fields(cls)} | {LEGACY_FIELD, "output_attentions"}

    @classmethod
    def field_near(cls, name: str) -> str | None:
        """The field `name` is likely a misspelling of (None for a field itself, or a name near none)."""
        known = cls.field_names()
        return None if name in known else near_name(name, known, cutoff=0.8)

    @classmethod
    def unknown_fields(cls, names: Iterable[str], meant: dict[str, str] | None = None) -> list[str]:
        """The names among `names` that are no field of this config, each with the field it is near, if any, or what
        `meant` says it stands for: a config keeps any keyword as an attribute, so a misspelt override
        (`num_querys=50`) would change nothing."""
        known, meant = cls.field_names(), meant or {}
        return [with_hint(name, meant.get(name) or cls.field_near(name)) for name in names if name not in known]

    @classmethod
    def check_field_names(cls, names: Iterable[str]) -> None:
        unknown = cls.unknown_fields(names)
        if unknown:
            raise TypeError(f"MROVSegConfig has no field(s) {', '.join(unknown)}")

    @classmethod
    def from_clip_config(cls, clip_config: CLIPConfig | dict, **kwargs) -> "MROVSegConfig":
        """Build a config around the shapes of an existing `CLIPConfig` (e.g. `CLIPConfig.from_pretrained(id)`)."""
        cls.check_field_names(kwargs)
        if isinstance(clip_config, dict):
            clip_config = CLIPConfig(**clip_config)
        kwargs.setdefault("projection_dim", clip_config.projection_dim)
        kwargs.setdefault("logit_scale_init", clip_config.logit_scale_init_value)
        return cls(vision_config=clip_config.vision_config.to_dict(), text_config=clip_config.text_config.to_dict(),
                   **kwargs)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "MROVSegConfig":
        """Shapes of a known CLIP without downloading it: one of `CLIP_PRESETS` ("vit-b-16", "vit-l-14", ...)."""
        if name not in CLIP_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(CLIP_PRESETS)}.")
        cls.check_field_names(kwargs)
        preset = CLIP_PRESETS[name]
        vision = {**preset["vision"], "projection_dim": preset["projection_dim"], "hidden_act": "quick_gelu"}
        text = {**preset["text"], "projection_dim": preset["projection_dim"], "hidden_act": "quick_gelu"}
        kwargs.setdefault("projection_dim", preset["projection_dim"])
        return cls(vision_config=vision, text_config=text, **kwargs)


def _single_slot(template: str) -> bool:
    """True when `template.format(name)` uses exactly one positional `{}` and nothing else."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError:  # unbalanced braces
        return False
    return fields == [""]


def normalize_class_name(name: str) -> str:
    """One spelling per class name: Unicode NFC and single spaces (`"traffic  cone"` == `"traffic cone"`). Control
    characters count as spaces, and the zero-width space and BOM that text copied from a web page carries are dropped
    (`"sky\u200b"` and `"sky"` were two classes, one of them drawn with a box in the legend)."""
    name = unicodedata.normalize("NFC", name).replace("\u200b", "").replace("\ufeff", "")
    return " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in name).split())


__all__ = ["MROVSegConfig", "NotAnMROVSegCheckpoint", "VILD_TEMPLATES", "CLIP_PRESETS", "IGNORE_INDEX",
           "WIDE_IGNORE_INDEX", "unlabelled_value", "HIGH_RES_ENCODINGS", "default_feature_layers",
           "normalize_class_name", "near_name", "with_hint", "one_line"]
