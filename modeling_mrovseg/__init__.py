"""MROVSeg for Hugging Face Transformers: open-vocabulary segmentation at full resolution with one CLIP."""

from pathlib import Path

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
    AutoProcessor,
)

from .configuration_mrovseg import CLIP_PRESETS, IGNORE_INDEX, VILD_TEMPLATES, MROVSegConfig

# The streaming mean-IoU `evaluate` module installed with the package: `evaluate.load(MEAN_IOU)` from any folder.
MEAN_IOU = str(Path(__file__).resolve().parent / "metrics" / "mean_iou")
from .image_processing_mrovseg import MROVSegImageProcessor
from .modeling_mrovseg import (
    MROVSegForOpenVocabSegmentation,
    MROVSegModel,
    MROVSegModelOutput,
    MROVSegOutput,
    MROVSegPreTrainedModel,
)
from .pipelines import MROVSegZeroShotSegmentationPipeline, register_pipelines
from .processing_mrovseg import MROVSegProcessor
from .slicing import SliceGrid, slice_windows, stitch_windows

AutoConfig.register(MROVSegConfig.model_type, MROVSegConfig, exist_ok=True)
AutoImageProcessor.register(MROVSegConfig, image_processor_classes={"pil": MROVSegImageProcessor}, exist_ok=True)
AutoModel.register(MROVSegConfig, MROVSegModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(MROVSegConfig, MROVSegForOpenVocabSegmentation, exist_ok=True)
AutoProcessor.register(MROVSegConfig, MROVSegProcessor, exist_ok=True)

# `save_pretrained` then writes `auto_map` and copies the module files, so Hub copies load with
# `trust_remote_code=True` without this package installed.
MROVSegConfig.register_for_auto_class()
MROVSegImageProcessor.register_for_auto_class("AutoImageProcessor")
MROVSegModel.register_for_auto_class("AutoModel")
MROVSegForOpenVocabSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
MROVSegProcessor.register_for_auto_class("AutoProcessor")
register_pipelines()

__all__ = [
    "MEAN_IOU",
    "__version__",
    "CLIP_PRESETS",
    "IGNORE_INDEX",
    "VILD_TEMPLATES",
    "MROVSegConfig",
    "MROVSegImageProcessor",
    "MROVSegForOpenVocabSegmentation",
    "MROVSegModel",
    "MROVSegModelOutput",
    "MROVSegOutput",
    "MROVSegPreTrainedModel",
    "MROVSegProcessor",
    "MROVSegZeroShotSegmentationPipeline",
    "SliceGrid",
    "slice_windows",
    "stitch_windows",
]
