"""MROVSeg: open-vocabulary semantic segmentation with one CLIP at two resolutions (arXiv 2408.14776).

`MROVSegModel` is the multi-resolution feature extractor (one CLIP over a global view and full-resolution slices,
Multi-Res Adapters, hierarchical pixel decoder, query decoder); `MROVSegForOpenVocabSegmentation` holds it under
`base_model_prefix` and adds the multi-grained masked attention, the open-vocabulary classifier and the loss.

Shapes: B images, K slices, W CLIP width, D decoder width, E joint image-text width, N queries, C classes,
(g, g) the global token grid, (h, w) the stitched high-resolution token grid.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# first: under an older transformers it names the version needed (the imports below would fail)
from .configuration_mrovseg import MROVSegConfig, NotAnMROVSegCheckpoint, near_name, with_hint

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPMLP,
    CLIPPreTrainedModel,
    CLIPTextEmbeddings,
    CLIPVisionEmbeddings,
)
from transformers.utils import ModelOutput, TransformersKwargs, logging

from .layers import MROVSegQuickGELU
from .loss_mrovseg import MROVSegLoss
from .mask_decoder import MROVSegMaskHead, MROVSegPixelDecoder, MROVSegQueryDecoder
from .masked_attention import MROVSegAttentionBiasDecoder, MROVSegMultiGrainedMaskedAttention
from .multi_res_adapter import MROVSegMultiResAdapter
from .slicing import SliceGrid, stitch_windows
from .text_classifier import MROVSegOpenVocabClassifier, embed_class_names, pool_prompt_embeddings, validate_labels

logger = logging.get_logger(__name__)

REMOTE_PIPELINE_TASK = "mrovseg-zero-shot-image-segmentation"
# beside a LoRA adapter saved by training.train: the base model, config overrides and class names it was trained with
ADAPTER_RECIPE = "mrovseg_base.json"
# `from_pretrained` arguments that say where a checkpoint's files are; its tokenizer and processor load with them too
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")
# the weights of MROVSegForOpenVocabSegmentation outside its feature extractor (`mrovseg.`)
HEAD_KEYS = (r"^(classifier|logit_scale|mask_head|masked_attention|text_model|text_projection|visual_projection"
             r"|vocabulary_embeds)(\.|$)")
# what other APIs call the class names (the training scripts, the zero-shot pipeline): `vocabulary` here
VOCABULARY_ALIASES = ("class_names", "candidate_labels", "labels", "classes")


def hub_kwargs(kwargs: dict) -> dict:
    return {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}


def refuse_training_adapter(*folders) -> None:
    """transformers' peft integration loads an adapter folder as its base plus the LoRA weights (the auto classes and
    pipelines pass the adapter as `adapter_kwargs`): for one saved by training.train that model has the base's class
    names, not those the adapter was trained on, and the pipelines labelled with them. A ValueError naming the
    merged checkpoint instead."""
    for candidate in folders:
        folder = Path(str(candidate)).expanduser()
        if candidate is not None and (folder / ADAPTER_RECIPE).is_file():
            raise ValueError(f"{folder} is a LoRA adapter saved by training.train, not a checkpoint: use the merged "
                             f"checkpoint saved beside it ({folder.parent / 'model'}), or make one with `python -m "
                             f"training.merge_lora --adapter {folder} --out DIR`.")


def check_forward_kwargs(forward, kwargs: dict) -> None:
    """Arguments a forward does not take: transformers' own (Trainer's `num_items_in_batch`, `output_attentions`, which
    transformers' common tests pass to every model: no maps, as masked attention never materialises them) are let
    through, any other is refused, since a misspelt `pixel_value_slices` silently ran the single-resolution ablation."""
    unknown = sorted(set(kwargs) - set(TransformersKwargs.__annotations__))
    if unknown:
        known = [name for name in inspect.signature(forward).parameters if name != "kwargs"]
        hints = [with_hint(name, near_name(name, known)) for name in unknown]
        raise TypeError(f"{type(forward.__self__).__name__}.forward got unexpected argument(s) {', '.join(hints)}; "
                        f"it takes {', '.join(known)}")


def weights_not_loaded(info: dict) -> list[str]:
    """The weights a `from_pretrained(..., output_loading_info=True)` left random: missing from the checkpoint, or
    there in another shape. transformers fills them and only logs it."""
    mismatched = (str(key[0]) if isinstance(key, tuple) else str(key) for key in info["mismatched_keys"])
    return sorted(info["missing_keys"]) + sorted(mismatched)


# Checkpoints written before the base model / head split: their keys, renamed to today's layout on load.
LEGACY_KEY_MAPPING = {
    r"^vision_model\.": "mrovseg.vision_model.",
    r"^adapters\.": "mrovseg.adapters.",
    r"^pixel_decoder\.": "mrovseg.pixel_decoder.",
    r"^query_decoder\.": "mrovseg.query_decoder.",
    r"^attention_mask_decoder\.": "masked_attention.bias_decoder.",
}


@dataclass
class MROVSegModelOutput(ModelOutput):
    """
    Outputs of [`MROVSegModel`]: multi-resolution features for dense prediction.

    Args:
        pixel_decoder_last_hidden_state: (B, c, h * 2^T, w * 2^T) final pixel features of the hierarchical decoder.
        fused_features: the Multi-Res Adapter outputs (B, D, h, w), one per tapped layer, shallow to deep.
        query_decoder_hidden_states: the query decoder's (B, N, D) outputs, one per layer (the last one is final).
        cls_token: (B, W) CLIP's [CLS] token at `query_layer`: the seed of the masked-attention queries.
        clip_global_tokens: per CLIP layer after `query_layer`, the (B, g*g, W) global-view tokens it was given.
        clip_high_res_maps: per CLIP layer after `query_layer`, the (B, W, h, w) stitched high-resolution map it was
            given (None for the single-resolution ablation).
        hidden_states: CLIP hidden states of the global view, embeddings then every layer the backbone runs
            (all but the last, which only the queries pass through), on request.
    """

    pixel_decoder_last_hidden_state: torch.FloatTensor | None = None
    fused_features: tuple[torch.FloatTensor, ...] | None = None
    query_decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cls_token: torch.FloatTensor | None = None
    clip_global_tokens: tuple[torch.FloatTensor, ...] | None = None
    clip_high_res_maps: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MROVSegOutput(ModelOutput):
    """
    Outputs of [`MROVSegForOpenVocabSegmentation`].

    Args:
        loss: total set-prediction loss over the final and auxiliary outputs (when `labels` are given).
        class_queries_logits: (B, N, C + 1) cosine logits against the vocabulary plus "no object".
        masks_queries_logits: (B, N, H', W') mask logits on the padded canvas, H' = (H / p) * 2^stages.
        auxiliary_logits: per intermediate query-decoder layer, a dict with both logits (for deep supervision).
        image_sizes: (B, 4) valid height, valid width, padded height, padded width of each canvas in pixels.
        loss_dict: the named loss terms of the final output.
        hidden_states: CLIP hidden states of the global view, embeddings then every layer the backbone runs
            (all but the last, which only the queries pass through), on request.
        fused_features: the Multi-Res Adapter outputs, shallow to deep (on request).
        pixel_decoder_last_hidden_state: the final pixel features (on request).
    """

    loss: torch.FloatTensor | None = None
    class_queries_logits: torch.FloatTensor | None = None
    masks_queries_logits: torch.FloatTensor | None = None
    auxiliary_logits: list[dict[str, torch.FloatTensor]] | None = None
    image_sizes: torch.LongTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    fused_features: tuple[torch.FloatTensor, ...] | None = None
    pixel_decoder_last_hidden_state: torch.FloatTensor | None = None


@dataclass
class MROVSegFeatures(ModelOutput):
    """One CLIP pass at two resolutions: per needed CLIP layer, global tokens (B, g*g, W) and high-res maps (B, W, h, w)."""

    global_tokens: dict[int, torch.Tensor] | None = None
    global_hidden_states: tuple[torch.Tensor, ...] | None = None
    high_res_maps: dict[int, torch.Tensor] | None = None
    cls_token: torch.Tensor | None = None
    global_grid: tuple[int, int] | None = None
    high_res_grid: tuple[int, int] | None = None


class MROVSegPreTrainedModel(PreTrainedModel):
    config_class = MROVSegConfig
    config: MROVSegConfig
    base_model_prefix = "mrovseg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "CLIPTextEmbeddings"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, but weights load only from safetensors: pickled weights (`*.bin`) can
        run arbitrary code when unpickled, so they are refused unless `allow_pickle=True` (for sources you trust).
        Checkpoints saved before the base model / head split load through `LEGACY_KEY_MAPPING`. Class names given
        as `id2label=` (or by a `config=` with other labels) become the vocabulary: embedded with the checkpoint's
        CLIP tokenizer, as `set_vocabulary` does, not written over the saved names. CLIP comes frozen but for its
        position embeddings, as in a new model (`freeze_clip`); `model.requires_grad_(True)` would train all of it.
        """
        refuse_training_adapter(pretrained_model_name_or_path,
                                (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path"))
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise ValueError("use_safetensors=False loads pickled weights: also pass allow_pickle=True to confirm.")
            kwargs["use_safetensors"] = True
        kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
        # open-vocabulary heads: class names asked for are embedded, not written over the saved ones
        open_vocabulary = hasattr(cls, "set_vocabulary")
        names = cls._requested_vocabulary(pretrained_model_name_or_path, kwargs) if open_vocabulary else None
        wants_info = kwargs.pop("output_loading_info", False)
        from safetensors import SafetensorError

        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except NotAnMROVSegCheckpoint as error:  # named by its path, not as "this config"
            raise NotAnMROVSegCheckpoint(error.model_type, str(pretrained_model_name_or_path)) from None
        except SafetensorError as error:  # neither an OSError nor a ValueError: the CLI and scripts showed a traceback
            raise OSError(f"the weights of {pretrained_model_name_or_path} are damaged or incomplete (a download or "
                          f"save that was cut short?): {error}; download or save them again") from None
        except OSError as error:
            folder = Path(str(pretrained_model_name_or_path))
            if not allow_pickle and folder.is_dir() and any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
                raise ValueError(
                    f"{folder} holds only pickled weights ({', '.join(p.name for p in folder.glob('*.bin'))}); "
                    "MROVSeg loads safetensors only. If you trust the source, pass allow_pickle=True, then re-save "
                    "with save_pretrained() to get model.safetensors."
                ) from error
            raise
        model, info = loaded
        # transformers builds the loaded weights as new parameters, each trainable: CLIP frozen in __init__ came back
        # fully trainable, so fine-tuning a checkpoint trained all of CLIP (its open-vocabulary prior) and its text tower
        model.freeze_clip()
        # weights the checkpoint lacked are random: fine to train from, never to segment with (`check_complete`)
        model._weights_missing_on_load = weights_not_loaded(info)
        # its tokenizer and image processor (resolution) stay the model's: set_vocabulary and save_pretrained use them
        if pretrained_model_name_or_path is not None:
            model._checkpoint_source = (str(pretrained_model_name_or_path), hub_kwargs(kwargs))
        if names is not None and names != model.vocabulary:
            if model.clip_tokenizer is None:
                raise ValueError(f"id2label names new classes {names[:5]}, which need the CLIP tokenizer, and "
                                 f"{pretrained_model_name_or_path} has none; load without id2label and call "
                                 "model.set_vocabulary(names, tokenizer).")
            model.set_vocabulary(names)
        return (model, info) if wants_info else model

    def check_complete(self) -> None:
        """A model loaded from a checkpoint that lacked some of its weights (saved by another version of the code, or
        only the base MROVSegModel) holds random ones there: transformers logs them and goes on, and its labels
        were noise. The pipelines, the CLI, evaluation and export call this; training from such a start is fine."""
        missing = getattr(self, "_weights_missing_on_load", None)
        if missing:
            source = getattr(self, "_checkpoint_source", ("the checkpoint",))[0]
            raise ValueError(f"{source} lacks {len(missing)} of this model's weights ({', '.join(missing[:3])}, ...), "
                             "which are random now: it is no complete MROVSeg checkpoint for this version of the "
                             "code. Train from it, or use a checkpoint saved with all weights.")

    @classmethod
    def _requested_vocabulary(cls, source, kwargs: dict) -> list[str] | None:
        """Class names asked of `from_pretrained` (`id2label=`, or a `config=` whose labels differ from the saved
        ones), taken out of `kwargs` so the saved text embeddings load; the caller embeds them afterwards.

        For a closed-set model `id2label` renames the head's outputs; here a name is what the model looks for, so
        renaming the stored embeddings would label "sky" pixels "a". `num_labels` or `label2id` alone: an error."""
        config = kwargs.get("config")
        if "id2label" in kwargs:
            id2label = {int(k): v for k, v in kwargs.pop("id2label").items()}
            kwargs.pop("label2id", None)
            kwargs.pop("num_labels", None)
        elif "num_labels" in kwargs or "label2id" in kwargs:  # label2id alone was dropped: the saved names stayed
            given = "num_labels" if "num_labels" in kwargs else "label2id"
            raise ValueError(f"{given}= cannot name classes for an open-vocabulary model: pass id2label= (the "
                             "class names) or call model.set_vocabulary(names, tokenizer) after loading.")
        elif isinstance(config, PretrainedConfig) and getattr(config, "id2label", None) and source is not None:
            try:
                saved = cls.config_class.from_pretrained(source, **hub_kwargs(kwargs))
            except (OSError, ValueError):  # no saved config (weights from a state dict, say): nothing to compare
                return None
            if dict(config.id2label) == dict(saved.id2label):
                return None
            id2label = {int(k): v for k, v in config.id2label.items()}
            config = copy.deepcopy(config)
            config.id2label, config.label2id = dict(saved.id2label), dict(saved.label2id)
            config.fit_ignore_index()
            kwargs["config"] = config
        else:
            return None
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label must number the classes 0..{len(id2label) - 1}, got ids {sorted(id2label)}")
        return [id2label[i] for i in range(len(id2label))]

    def save_pretrained(self, save_directory, *args, image_processor=None, tokenizer=None, push_to_hub: bool = False,
                        **kwargs):
        """
        Save the model so the folder works on its own in both pipelines and the CLI: weights and config, plus (unless
        the folder has them already) the image processor matching this model's slices (for a loaded model the
        checkpoint's own, resolution included) and the CLIP tokenizer it knows (given to it, or the loaded
        checkpoint's); `image_processor=` / `tokenizer=` override those. `auto_map` also maps
        AutoModelForSemanticSegmentation, so the stock image-segmentation pipeline loads the remote code too.
        `push_to_hub=True` (with `repo_id=`, `commit_message=`, `private=`, `token=`) uploads all of it.
        """
        from .image_processing_mrovseg import MROVSegImageProcessor
        from .processing_mrovseg import MROVSegProcessor

        # transformers would upload inside its own save, before the processor and tokenizer below exist
        main_process = kwargs.get("is_main_process", True)
        push = self._prepare_push(save_directory, kwargs) if push_to_hub and main_process else None

        module = type(self).__module__.split(".")[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.update(AutoModel=f"{module}.MROVSegModel",
                        AutoModelForSemanticSegmentation=f"{module}.MROVSegForOpenVocabSegmentation")
        self.config.auto_map = auto_map
        # The zero-shot pipeline travels with the checkpoint under its own task name: without this package,
        # pipeline(REMOTE_PIPELINE_TASK, model=..., trust_remote_code=True) loads it. (Not under
        # "zero-shot-image-segmentation": transformers would then demand trust_remote_code from installed users too.)
        self.config.custom_pipelines = {REMOTE_PIPELINE_TASK: {
            "impl": "pipelines.MROVSegZeroShotSegmentationPipeline", "pt": ["AutoModelForSemanticSegmentation"],
            "tf": [], "type": "multimodal"}}
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from transformers.dynamic_module_utils import custom_object_save

            from .pipelines import MROVSegZeroShotSegmentationPipeline

            custom_object_save(MROVSegZeroShotSegmentationPipeline, save_directory)  # pipelines.py + its imports
        if kwargs.get("is_main_process", True):
            folder = Path(save_directory)
            tokenizer = tokenizer if tokenizer is not None else getattr(self, "clip_tokenizer", None)
            if image_processor is not None or not (folder / "preprocessor_config.json").exists():
                image_processor = (image_processor or self._checkpoint_image_processor()
                                   or MROVSegImageProcessor.from_model_config(self.config))
                if tokenizer is not None:
                    MROVSegProcessor(image_processor, tokenizer,
                                     prompt_templates=self.config.prompt_templates).save_pretrained(folder)
                else:
                    image_processor.save_pretrained(folder)
            elif tokenizer is not None and not (folder / "tokenizer_config.json").exists():
                tokenizer.save_pretrained(folder)
        if push is not None:
            repo_id, timestamps, hub = push
            self._upload_modified_files(save_directory, repo_id, timestamps, **hub)
        return result

    def _prepare_push(self, save_directory, kwargs: dict) -> tuple[str, dict, dict]:
        """(repo id, the folder's file times before saving, upload arguments), the repo created: what transformers'
        `save_pretrained(push_to_hub=True)` does first, so the files written after its save are uploaded too."""
        from huggingface_hub import create_repo

        hub = {"commit_message": kwargs.pop("commit_message", None), "create_pr": kwargs.pop("create_pr", False),
               "token": kwargs.get("token")}
        repo = kwargs.pop("repo_id", Path(save_directory).name)
        repo_id = create_repo(repo, exist_ok=True, token=hub["token"], private=kwargs.pop("private", None)).repo_id
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        return repo_id, self._get_files_timestamps(save_directory), hub

    _checkpoint_source: tuple[str, dict] | None = None  # (folder or Hub id, hub kwargs) of `from_pretrained`

    def _checkpoint_image_processor(self):
        """The image processor saved with the checkpoint this model was loaded from (its resolution, say), when its
        windows are this model's; None otherwise. Re-saving a loaded model keeps it instead of the defaults."""
        from .image_processing_mrovseg import MROVSegImageProcessor

        if self._checkpoint_source is None:
            return None
        source, hub = self._checkpoint_source
        try:
            stored, _ = MROVSegImageProcessor.get_image_processor_dict(source, **hub)
        except (OSError, ValueError):
            return None
        if stored.get("image_processor_type") != MROVSegImageProcessor.__name__:
            return None
        processor = MROVSegImageProcessor.from_dict(stored)
        if (processor.slice_size, processor.slice_overlap) != (self.config.slice_size, self.config.slice_overlap):
            return None
        processor.ignore_index = self.config.ignore_index  # a new vocabulary may have moved it (`fit_ignore_index`)
        return processor

    @property
    def clip_vision(self) -> CLIPVisionModel:
        return self.mrovseg.vision_model if hasattr(self, "mrovseg") else self.vision_model

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (CLIPVisionEmbeddings, CLIPTextEmbeddings, CLIPAttention, CLIPMLP)):
            CLIPPreTrainedModel._init_weights(self.clip_vision, module)
            return
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MROVSegMultiResAdapter):
            # Start as identity on the stitched map and an even blend of both scales; training moves away from it.
            init.zeros_(module.seam_pointwise.weight)
            init.zeros_(module.seam_pointwise.bias)
            if module.scale_attention is not None:
                init.zeros_(module.scale_attention.weight)
                init.zeros_(module.scale_attention.bias)
        elif isinstance(module, MROVSegMultiGrainedMaskedAttention):
            init.normal_(module.query_embeddings, std=std)
        elif isinstance(module, MROVSegOpenVocabClassifier):
            init.normal_(module.no_object_embedding, std=std)
        elif isinstance(module, MROVSegAttentionBiasDecoder):
            init.ones_(module.scale)
            init.zeros_(module.shift)
        elif isinstance(module, MROVSegForOpenVocabSegmentation):
            init.constant_(module.logit_scale, self.config.logit_scale_init)
            init.copy_(module.vocabulary_embeds, placeholder_vocabulary(*module.vocabulary_embeds.shape))

    def get_input_embeddings(self) -> nn.Module:
        return self.clip_vision.embeddings.patch_embedding


def placeholder_vocabulary(num_classes: int, dim: int) -> torch.Tensor:
    """Fixed, distinct unit vectors standing in for class embeddings until `set_vocabulary` is called."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    return F.normalize(torch.randn(num_classes, dim, generator=generator, device="cpu"), dim=-1)


class MROVSegModel(MROVSegPreTrainedModel):
    r"""
    The multi-resolution feature extractor of MROVSeg: one CLIP encodes a global view and full-resolution slices
    in one batched pass, Multi-Res Adapters fuse the two resolutions at every tapped layer, a hierarchical pixel
    decoder upsamples the fused maps and a light query decoder reads them.

    `forward_features` stops after the adapters (timm's convention); `forward` also runs both decoders.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from modeling_mrovseg import MROVSegConfig, MROVSegImageProcessor, MROVSegModel
    >>> config = MROVSegConfig.from_preset("tiny")
    >>> model = MROVSegModel(config).eval()
    >>> processor = MROVSegImageProcessor.from_model_config(config, size={"shortest_edge": 128, "longest_edge": 512})
    >>> inputs = processor(np.zeros((100, 150, 3), dtype=np.uint8), return_tensors="pt")
    >>> with torch.inference_mode():
    ...     fused = model.forward_features(inputs["pixel_values"], inputs["pixel_values_slices"], inputs["slice_grid"])
    >>> [tuple(f.shape) for f in fused]  # (B, D, h, w) per tapped layer on the 128 x 192 canvas's 16 x 24 token grid
    [(1, 256, 16, 24), (1, 256, 16, 24), (1, 256, 16, 24)]
    ```
    """

    # a whole checkpoint loaded as the feature extractor (AutoModel) leaves the head's weights unused by design;
    # transformers listed each of them as UNEXPECTED
    _keys_to_ignore_on_load_unexpected = [HEAD_KEYS]

    def __init__(self, config: MROVSegConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel._from_config(config.vision_config)
        if config.vision_config.hidden_act == "quick_gelu":  # the backward to the position embeddings keeps less
            for layer in self.vision_model.encoder.layers:
                layer.mlp.activation_fn = MROVSegQuickGELU()
        self.adapters = nn.ModuleList(MROVSegMultiResAdapter(config) for _ in config.feature_layers)
        self.pixel_decoder = MROVSegPixelDecoder(config)
        self.query_decoder = MROVSegQueryDecoder(config)
        self.post_init()
        self.freeze_clip()

    def freeze_clip(self) -> None:
        """CLIP stays frozen (it is the open-vocabulary prior); only its position embeddings may adapt."""
        self.vision_model.requires_grad_(False)
        position = self.vision_model.embeddings.position_embedding
        position.requires_grad_(bool(self.config.train_position_embeddings))

    # ------------------------------------------------------------------ 1. one CLIP, two resolutions
    def _needed_layers(self) -> list[int]:
        depth = self.config.vision_config.num_hidden_layers
        return sorted(set(self.config.feature_layers) | set(range(self.config.query_layer, depth)))

    def encode_multi_resolution(
        self,
        pixel_values: torch.Tensor,
        pixel_values_slices: torch.Tensor | None = None,
        slice_grid: torch.Tensor | Sequence[int] | None = None,
        output_hidden_states: bool = False,
        canvas_size: tuple[int, int] | None = None,
    ) -> MROVSegFeatures:
        """
        The global view and all slices through CLIP in one batched pass (chunked by `slice_batch_size`), keeping the
        hidden states of the tapped layers and of every layer the queries will read; slice tokens are stitched to
        the high-resolution token grid.
        """
        config = self.config
        self.check_pixel_values(pixel_values)
        batch = pixel_values.shape[0]
        patch = config.patch_size
        grid = None
        if pixel_values_slices is None and config.use_high_res:  # inputs from CLIP's processor, or pixel_values alone
            logger.warning_once("MROVSeg got no pixel_values_slices: it runs its single-resolution ablation (the "
                                "global view only). Prepare inputs with MROVSegImageProcessor for full resolution.")
        if pixel_values_slices is not None and config.use_high_res:
            grid = self.check_slice_geometry(slice_grid, pixel_values_slices, canvas_size)
            if config.high_res_encoding == "full_image":
                return self._encode_full_image(pixel_values_slices, grid)
        images = pixel_values if grid is None else torch.cat([pixel_values, pixel_values_slices.flatten(0, 1)], dim=0)
        needed = self._needed_layers()
        depth = config.vision_config.num_hidden_layers
        run = sorted(set(needed) | set(range(depth))) if output_hidden_states else needed
        states = self._run_clip(images.to(self.vision_model.dtype), run)
        hidden_states = tuple(states[layer][:batch] for layer in range(depth)) if output_hidden_states else None

        side = pixel_values.shape[-1] // patch
        global_tokens = {layer: states[layer][:batch, 1:] for layer in needed}
        cls_token = states[config.query_layer][:batch, 0]
        high_res_maps = {}
        token_grid = None
        if grid is not None:
            token_grid = grid.scaled(patch)
            for layer in needed:
                tokens = states[layer][batch:, 1:]  # (B*K, t*t, W)
                width = tokens.shape[-1]
                windows = tokens.reshape(batch, grid.num_slices, side, side, width).permute(0, 1, 4, 2, 3)
                high_res_maps[layer] = stitch_windows(windows, token_grid)
                states[layer] = None  # free the per-slice copy
        return MROVSegFeatures(
            global_tokens=global_tokens,
            global_hidden_states=hidden_states,
            high_res_maps=high_res_maps or None,
            cls_token=cls_token,
            global_grid=(side, side),
            high_res_grid=(token_grid.height, token_grid.width) if token_grid is not None else None,
        )

    def _encode_full_image(self, pixel_values_slices: torch.Tensor, grid: SliceGrid) -> MROVSegFeatures:
        """The baseline MROVSeg improves on: one CLIP pass over the whole canvas (position embeddings interpolated),
        quadratic in pixels; the global tokens are its map pooled to the global grid."""
        config = self.config
        patch, side = config.patch_size, config.slice_size // config.patch_size
        canvas = stitch_windows(pixel_values_slices, grid)
        needed = self._needed_layers()
        states = self._run_clip(canvas.to(self.vision_model.dtype), needed)
        height, width = canvas.shape[-2] // patch, canvas.shape[-1] // patch
        maps, global_tokens = {}, {}
        for layer, tokens in states.items():
            maps[layer] = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, height, width)
            global_tokens[layer] = F.adaptive_avg_pool2d(maps[layer], side).flatten(2).transpose(1, 2)
        return MROVSegFeatures(global_tokens=global_tokens, high_res_maps=maps,
                               cls_token=states[config.query_layer][:, 0], global_grid=(side, side),
                               high_res_grid=(height, width))

    def _run_clip(self, images: torch.Tensor, needed: list[int]) -> dict[int, torch.Tensor]:
        """Hidden states (M, 1 + T, W) of `needed` layers (0 = embeddings) for a stack of M images.

        Chunked by `slice_batch_size` at inference only. In training, autograd keeps every chunk's activations for the
        backward when anything in CLIP trains (its position embeddings by default, LoRA), so chunks would bound no
        memory and only multiply kernel launches; and a batch of crops is small.
        """
        vision = self.vision_model
        interpolate = images.shape[-1] != self.config.vision_config.image_size or images.shape[-2] != images.shape[-1]
        last = max(needed)
        chunk = images.shape[0] if self.training else self.config.slice_batch_size or images.shape[0]
        collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in needed}
        for start in range(0, images.shape[0], chunk):
            hidden = vision.embeddings(images[start : start + chunk], interpolate_pos_encoding=interpolate)
            hidden = vision.pre_layrnorm(hidden)
            if 0 in collected:
                collected[0].append(hidden)
            for index, layer in enumerate(vision.encoder.layers[:last]):
                hidden = layer(hidden, None)
                if index + 1 in collected:
                    collected[index + 1].append(hidden)
        return {layer: torch.cat(parts) if len(parts) > 1 else parts[0] for layer, parts in collected.items()}

    # ------------------------------------------------------------------ 2. Multi-Res Adapters
    def fuse(self, features: MROVSegFeatures) -> list[torch.Tensor]:
        """One Multi-Res Adapter per tapped layer: (B, D, h, w) fused maps, shallow to deep."""
        # (B, g*g, W) tokens as a (B, W, g, g) view with channels-last strides at every batch size: a reshape gave a
        # batch of one a batch stride that reads as channels-first, so the adapters' upsampling took the CUDA kernel
        # that gives each output pixel one thread looping over all 768 channels (1.7 of 14 ms at 640^2 on an H200)
        global_maps = {
            layer: features.global_tokens[layer].unflatten(1, features.global_grid).permute(0, 3, 1, 2)
            for layer in self.config.feature_layers
        }
        high_res = features.high_res_maps
        return [
            adapter(global_maps[layer], high_res[layer] if high_res else None)
            for adapter, layer in zip(self.adapters, self.config.feature_layers)
        ]

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        pixel_values_slices: torch.Tensor | None = None,
        slice_grid: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """The fused multi-resolution maps (B, D, h, w) of every tapped layer, without running the decoders."""
        return self.fuse(self.encode_multi_resolution(pixel_values, pixel_values_slices, slice_grid))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_slices: torch.Tensor | None = None,
        slice_grid: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> MROVSegModelOutput | tuple:
        r"""
        pixel_values (B, 3, S, S): the global view. pixel_values_slices (B, K, 3, S, S) and slice_grid (B, 4: rows,
        cols, slice size, stride): the full-resolution windows; without them the single-resolution ablation runs.
        pixel_mask (B, H, W) or image_sizes (B, 4: valid and canvas height and width): the canvas the grid must tile
        (checked); pixel_mask's shape gives it to a compiled forward without a host read.
        """
        if kwargs:
            check_forward_kwargs(self.forward, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        # 1. One CLIP, two resolutions: global view and stitched slices.
        canvas_size = self._canvas_size(pixel_mask, image_sizes)
        features = self.encode_multi_resolution(pixel_values, pixel_values_slices, slice_grid, output_hidden_states,
                                                canvas_size)
        # 2. Multi-Res Adapters fuse both resolutions at every tapped layer.
        fused = self.fuse(features)
        # 3. Hierarchical mask decoding and the light query decoder.
        pixel_features = self.pixel_decoder(fused)
        query_states = self.query_decoder(fused[-1])

        remaining = range(self.config.query_layer, self.config.vision_config.num_hidden_layers)
        high_res = features.high_res_maps
        output = MROVSegModelOutput(
            pixel_decoder_last_hidden_state=pixel_features,
            fused_features=tuple(fused),
            query_decoder_hidden_states=tuple(query_states),
            cls_token=features.cls_token,
            clip_global_tokens=tuple(features.global_tokens[i] for i in remaining),
            clip_high_res_maps=tuple(high_res[i] for i in remaining) if high_res else None,
            hidden_states=features.global_hidden_states,
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def _canvas_size(pixel_mask: torch.Tensor | None, image_sizes: torch.Tensor | None) -> tuple[int, int] | None:
        """The padded canvas of the batch: from pixel_mask's shape (no host read), else read from image_sizes."""
        if pixel_mask is not None:
            return tuple(pixel_mask.shape[-2:])
        if image_sizes is None or torch.compiler.is_compiling():
            return None
        sizes = torch.as_tensor(image_sizes)
        if sizes.dim() != 2 or sizes.shape[-1] != 4:
            raise ValueError(f"image_sizes must be (B, 4): valid height, valid width, canvas height, canvas width; "
                             f"got shape {tuple(sizes.shape)}.")
        canvases = {tuple(row[2:]) for row in sizes.tolist()}
        if len(canvases) != 1:
            raise ValueError(f"The images of a batch lie on canvases of different sizes {sorted(canvases)}; "
                             "MROVSegForOpenVocabSegmentation runs such a batch one slice grid at a time.")
        return canvases.pop()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.slice_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values must be the global view (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "prepare images with the model's own processor: AutoImageProcessor.from_pretrained(checkpoint) or "
                "MROVSegImageProcessor.from_model_config(model.config)."
            )

    def check_slice_geometry(self, slice_grid, slices: torch.Tensor,
                             canvas_size: tuple[int, int] | None = None) -> SliceGrid:
        """
        The processor's slice geometry must be the model's: a mismatch would stitch tokens to the wrong places.

        With `canvas_size` (the padded canvas, e.g. `pixel_mask.shape[-2:]`) the grid follows from shapes alone and
        `slice_grid` is checked on the device: no host sync, so a compiled forward has no graph break here.
        """
        config = self.config
        if slices.dim() != 5 or slices.shape[-1] != config.slice_size or slices.shape[-2] != config.slice_size:
            raise ValueError(
                f"pixel_values_slices must be (B, K, 3, {config.slice_size}, {config.slice_size}), got "
                f"{tuple(slices.shape)}; the image processor's slice_size must match the model's "
                "(MROVSegImageProcessor.from_model_config(model.config))."
            )
        if slice_grid is None:
            raise ValueError("pixel_values_slices need `slice_grid` (rows, cols, slice size, stride), as returned by "
                             "the image processor.")
        if isinstance(slice_grid, SliceGrid):  # a fixed geometry (exported programs, or read once by the head)
            found = slice_grid
        else:
            grid = torch.as_tensor(slice_grid)
            if grid.dim() == 1:
                grid = grid[None]
            if grid.dim() != 2 or grid.shape[-1] != 4:
                raise ValueError(f"slice_grid must be (B, 4): rows, cols, slice size, stride per image; got shape "
                                 f"{tuple(grid.shape)}. Prepare inputs with MROVSegImageProcessor.")
            if canvas_size is not None and torch.compiler.is_compiling():
                expected = self._grid_of_canvas(*canvas_size, slices.shape[1])
                wanted = torch.tensor([expected.rows, expected.cols, expected.window, expected.stride],
                                      device=grid.device)
                torch._assert_async(torch.all(grid == wanted), "slice_grid does not match the model's slice geometry; "
                                    "prepare inputs with MROVSegImageProcessor.from_model_config(model.config)")
                return expected
            rows = grid.tolist()  # the one host read of an eager forward
            if any(row != rows[0] for row in rows):
                raise ValueError("All images of a batch must share one slice grid (the processor pads them together); "
                                 "MROVSegForOpenVocabSegmentation runs a batch of mixed grids one grid at a time.")
            found = SliceGrid(*(int(v) for v in rows[0]))
        if (found.window, found.stride) != (config.slice_size, config.slice_stride):
            raise ValueError(
                f"The inputs were sliced with windows of {found.window} px at stride {found.stride} (overlap "
                f"{found.window - found.stride}), the model expects {config.slice_size} px at stride "
                f"{config.slice_stride} (slice_overlap={config.slice_overlap}); build the processor with "
                "MROVSegImageProcessor.from_model_config(model.config)."
            )
        if found.rows < 1 or found.cols < 1 or found.num_slices != slices.shape[1]:
            raise ValueError(f"slice_grid {found.rows} x {found.cols} does not match the {slices.shape[1]} slices given.")
        expected = None if canvas_size is None else self._grid_of_canvas(*canvas_size, slices.shape[1])
        if expected is not None and found != expected:
            raise ValueError(f"slice_grid {found.rows} x {found.cols} does not tile the {canvas_size[0]} x "
                             f"{canvas_size[1]} canvas ({expected.rows} x {expected.cols} windows would).")
        return found

    def _grid_of_canvas(self, height: int, width: int, num_slices: int) -> SliceGrid:
        """The model's windows tiling a padded canvas exactly (as the image processor pads it)."""
        size, stride = self.config.slice_size, self.config.slice_stride
        if height < size or width < size or (height - size) % stride or (width - size) % stride:
            raise ValueError(f"A {height} x {width} canvas is not tiled by {size} px windows at stride {stride}: "
                             "pixel_mask must come from MROVSegImageProcessor.from_model_config(model.config).")
        grid = SliceGrid((height - size) // stride + 1, (width - size) // stride + 1, size, stride)
        if grid.num_slices != num_slices:
            raise ValueError(f"The {height} x {width} canvas holds {grid.rows} x {grid.cols} windows, but "
                             f"{num_slices} slices were given.")
        return grid


class MROVSegForOpenVocabSegmentation(MROVSegPreTrainedModel):
    r"""
    MROVSeg: a global view and full-resolution slices go through one CLIP; Multi-Res Adapters fuse the two; a
    hierarchical decoder predicts masks; [CLS]-seeded queries classify them through CLIP's last layers under
    multi-grained attention masks, against text embeddings of any class names.

    Example:

    ```python
    >>> import numpy as np, torch
    >>> from modeling_mrovseg import MROVSegConfig, MROVSegForOpenVocabSegmentation, MROVSegImageProcessor
    >>> config = MROVSegConfig.from_preset("tiny", id2label={0: "sky", 1: "road"}, label2id={"sky": 0, "road": 1})
    >>> model = MROVSegForOpenVocabSegmentation(config).eval()
    >>> processor = MROVSegImageProcessor.from_model_config(config, size={"shortest_edge": 128, "longest_edge": 512})
    >>> inputs = processor(np.zeros((100, 150, 3), dtype=np.uint8), return_tensors="pt")
    >>> with torch.inference_mode():
    ...     outputs = model(**inputs)
    >>> processor.post_process_semantic_segmentation(outputs, target_sizes=[(100, 150)])[0].shape
    torch.Size([100, 150])
    ```
    """

    input_modalities = ("image", "text")

    def __init__(self, config: MROVSegConfig):
        super().__init__(config)
        self.mrovseg = MROVSegModel(config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

        self.mask_head = MROVSegMaskHead(config)
        self.masked_attention = MROVSegMultiGrainedMaskedAttention(config)
        self.classifier = MROVSegOpenVocabClassifier(config.projection_dim)
        placeholder = placeholder_vocabulary(config.num_labels, config.projection_dim).to(self.logit_scale.device)
        self.register_buffer("vocabulary_embeds", placeholder, persistent=True)
        self.criterion = MROVSegLoss(config)
        self._clip_tokenizer = None
        self.post_init()
        # post_init gathered the feature extractor's pattern: here such keys are the model's own and never unused
        self._keys_to_ignore_on_load_unexpected.discard(HEAD_KEYS)
        self.freeze_clip()

    # ------------------------------------------------------------------ parameter groups
    def freeze_clip(self) -> None:
        """CLIP stays frozen (it is the open-vocabulary prior); only its position embeddings may adapt."""
        self.mrovseg.freeze_clip()
        for module in (self.visual_projection, self.text_model, self.text_projection):
            module.requires_grad_(False)
        self.logit_scale.requires_grad_(False)

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """Parameter counts (total and trainable) of CLIP vision, CLIP text and the new MROVSeg modules."""
        groups = {"clip_vision": [self.mrovseg.vision_model, self.visual_projection],
                  "clip_text": [self.text_model, self.text_projection]}
        clip_ids = {id(p) for modules in groups.values() for m in modules for p in m.parameters()}
        clip_ids.add(id(self.logit_scale))
        summary = {}
        for name, modules in groups.items():
            params = [p for m in modules for p in m.parameters()]
            summary[name] = {"total": sum(p.numel() for p in params),
                             "trainable": sum(p.numel() for p in params if p.requires_grad)}
        new = [p for p in self.parameters() if id(p) not in clip_ids]
        summary["mrovseg_modules"] = {"total": sum(p.numel() for p in new),
                                      "trainable": sum(p.numel() for p in new if p.requires_grad)}
        return summary

    def print_trainable_parameters(self) -> str:
        """Print (and return) the trainable / total counts, per part, like peft's helper of the same name."""
        summary = self.parameter_summary()
        total = sum(v["total"] for v in summary.values()) + 1
        trainable = sum(v["trainable"] for v in summary.values()) + int(self.logit_scale.requires_grad)
        lines = [f"{name}: {v['trainable']:,} trainable of {v['total']:,}" for name, v in summary.items()]
        lines.append(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
        text = "\n".join(lines)
        print(text)
        return text

    # ------------------------------------------------------------------ text side
    _tokenizer_read = False

    @property
    def clip_tokenizer(self):
        """The CLIP tokenizer that new class names and `save_pretrained` use: the one given to `from_clip` or
        `set_vocabulary`, else (read on first use) the checkpoint's own; None where neither exists."""
        if self._clip_tokenizer is None and self._checkpoint_source is not None and not self._tokenizer_read:
            from transformers import AutoTokenizer

            self._tokenizer_read = True
            source, hub = self._checkpoint_source
            try:
                # CLIP's tokenizer needs no remote code: never a prompt on stdin asking to run the folder's
                self._clip_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **hub)
            except Exception as error:  # noqa: BLE001 - tokenizers raises its own types for a damaged tokenizer.json
                # a checkpoint saved without one (or offline): no tokenizer; files that are there but do not load
                # (a copy cut short) are named where a tokenizer is needed
                names = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
                if not Path(source).is_dir() or any((Path(source) / name).is_file() for name in names):
                    lines = str(error).strip().splitlines() or [type(error).__name__]
                    self._tokenizer_problem = f"its tokenizer does not load: {lines[-1]}"
        return self._clip_tokenizer

    _tokenizer_problem: str | None = None

    def missing_tokenizer(self) -> str:
        """Why this model has no CLIP tokenizer, for the errors that need one."""
        return self._tokenizer_problem or "none was given or saved with it"

    @clip_tokenizer.setter
    def clip_tokenizer(self, tokenizer) -> None:
        self._clip_tokenizer = tokenizer
        self._tokenizer_read = True  # None set here means none, not "read the checkpoint's"

    @property
    def vocabulary(self) -> list[str]:
        """The stored class names, in class-id order (`config.id2label`)."""
        return [self.config.id2label[i] for i in range(len(self.config.id2label))]

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (..., L) -> unit-norm CLIP text embeddings (..., E)."""
        shape = input_ids.shape[:-1]
        flat_ids = input_ids.reshape(-1, input_ids.shape[-1])
        flat_mask = None if attention_mask is None else attention_mask.reshape(-1, attention_mask.shape[-1])
        pooled = self.text_model(input_ids=flat_ids, attention_mask=flat_mask).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1).reshape(*shape, -1)

    def compile_regions(self, **compile_kwargs) -> None:
        """
        Regional compilation, in place (`nn.Module.compile`): CLIP's encoder layers, the Multi-Res Adapters and the
        query decoder's layers (blocks of one class and shape share one build), the pixel decoder, the mask head and
        the masked attention, each its own graph; the glue between them and the loss stay eager. A fraction of the
        build of `torch.compile(model)` (a third for a ViT-B/16-shaped training step on a CPU); parameter names, and
        so checkpoints, are unchanged. `training.train --compile regional`.
        """
        core = self.mrovseg
        regions = [*core.vision_model.encoder.layers, *core.adapters, *core.query_decoder.layers, core.pixel_decoder,
                   self.mask_head, self.masked_attention]
        for region in regions:
            region.compile(**compile_kwargs)

    @torch.no_grad()
    def embed_class_names(self, labels: Sequence[str], tokenizer=None) -> torch.Tensor:
        """(C, E) embeddings: every name (and synonym) in every prompt template, averaged and normalised."""
        tokenizer = tokenizer if tokenizer is not None else self.clip_tokenizer
        if tokenizer is None:
            raise ValueError(f"New class names need the CLIP tokenizer ({self.missing_tokenizer()}): pass `tokenizer=` "
                             "(AutoTokenizer.from_pretrained of the checkpoint or of its CLIP), or precomputed "
                             "`text_embeds`.")
        return embed_class_names(self.encode_text, labels, tokenizer, self.config.prompt_templates,
                                 self.text_projection.weight.device, self.config.text_config.max_position_embeddings)

    def set_vocabulary(self, labels: Sequence[str], tokenizer=None, text_embeds: torch.Tensor | None = None) -> None:
        """Make `labels` the default vocabulary: embeds them (or takes `text_embeds`), updates id2label/label2id."""
        labels = validate_labels(labels)
        if tokenizer is not None:
            self.clip_tokenizer = tokenizer
        if text_embeds is None:
            text_embeds = self.embed_class_names(labels)
        if text_embeds.shape != (len(labels), self.config.projection_dim):
            raise ValueError(
                f"text_embeds has shape {tuple(text_embeds.shape)}, expected ({len(labels)}, {self.config.projection_dim})."
            )
        buffer = F.normalize(text_embeds.detach().float(), dim=-1).to(self.vocabulary_embeds.device)
        self.register_buffer("vocabulary_embeds", buffer, persistent=True)
        self.config.id2label = dict(enumerate(labels))
        self.config.label2id = {label: i for i, label in enumerate(labels)}
        self.config.fit_ignore_index()  # 847 classes: unlabelled is 65535, 255 a class

    def _resolve_text_embeds(self, text_embeds, input_ids, attention_mask, owners=None) -> torch.Tensor:
        if text_embeds is not None:
            if text_embeds.shape[-1] != self.config.projection_dim or text_embeds.dim() not in (2, 3):
                raise ValueError(
                    f"text_embeds must be (C, {self.config.projection_dim}) or (B, C, {self.config.projection_dim}), "
                    f"got {tuple(text_embeds.shape)}."
                )
            return text_embeds
        if input_ids is not None:
            embeds = self.encode_text(input_ids, attention_mask)
            if owners is not None:  # prompt ensemble with synonyms, as built by MROVSegProcessor
                owners = [tuple(pair) for pair in owners.tolist()]
                return pool_prompt_embeddings(embeds, owners, max(pair[0] for pair in owners) + 1)
            if embeds.dim() == 3:  # (C, templates, E): prompt ensemble
                embeds = F.normalize(embeds.mean(dim=1), dim=-1)
            return embeds
        return self.vocabulary_embeds

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor,
        pixel_values_slices: torch.Tensor | None = None,
        slice_grid: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        text_prompt_owners: torch.Tensor | None = None,
        output_auxiliary_logits: bool | None = None,
        loss_seeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> MROVSegOutput | tuple:
        r"""
        pixel_values (B, 3, S, S): the global view. pixel_values_slices (B, K, 3, S, S) and slice_grid (B, 4: rows,
        cols, slice size, stride): the full-resolution windows; without them the model runs the single-resolution
        ablation. Images with different grids in one batch (single images collated by a pipeline, slices padded
        along K) run one grid at a time, as they would alone; their mask logits are padded to the largest canvas by
        repeating edge values, and only the logits and `image_sizes` are returned. image_sizes (B, 4: valid height,
        valid width, canvas height, canvas width) and/or pixel_mask (B, H, W: 1 on image pixels of the padded
        canvas) say where the image lies; post-processing crops with them. labels (B, H, W): semantic class ids
        on the canvas (ignore 255). input_ids / attention_mask (text token ids and their padding mask: (C, L),
        (C, templates, L), or (T, L) prompts with `text_prompt_owners` (T, 2) from `MROVSegProcessor`) or
        text_embeds ((C, E) or (B, C, E)): a per-call vocabulary; by default the stored one (`set_vocabulary`).
        output_auxiliary_logits: also return the intermediate decoder layers' predictions (default: when training
        or given labels; inference skips those full-resolution masks). loss_seeds (B,): per-image seeds of the
        loss's point sampling, for a loss that is reproducible call to call.
        """
        if kwargs:
            check_forward_kwargs(self.forward, kwargs)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        if pixel_values_slices is not None and slice_grid is not None and image_sizes is None and pixel_mask is None:
            # post-processing would take the padded canvas for the image and stretch the padding into the labels
            raise ValueError("pixel_values_slices need image_sizes (or pixel_mask) beside them, as the image processor "
                             "returns them: they say where the image lies on its padded canvas. Call model(**inputs).")
        if labels is not None:
            self._check_labels(labels, pixel_values, pixel_mask, image_sizes)
        vocabulary = self._resolve_text_embeds(text_embeds, input_ids, attention_mask, text_prompt_owners)
        grids = self._read_slice_grids(pixel_values_slices, slice_grid)
        if grids is not None and len(set(grids)) > 1:
            if labels is not None:
                raise ValueError("A training batch needs one slice grid: pad its images together by calling the image "
                                 "processor on the whole batch (labels of different canvases cannot be stacked).")
            output = self._forward_per_grid(pixel_values, pixel_values_slices, grids, image_sizes, vocabulary,
                                            output_auxiliary_logits)
            return output if return_dict else output.to_tuple()
        if grids:  # read once here; the base model checks it against the model and the canvas without a new read
            slice_grid = SliceGrid(*grids[0])

        # 1-3. One CLIP at two resolutions, Multi-Res Adapters, hierarchical pixel decoder and query decoder.
        base = self.mrovseg(pixel_values, pixel_values_slices, slice_grid, pixel_mask,
                            output_hidden_states=output_hidden_states, return_dict=True, image_sizes=image_sizes)
        query_states = base.query_decoder_hidden_states
        if output_auxiliary_logits is None:
            output_auxiliary_logits = self.training or labels is not None
        decoded = query_states if output_auxiliary_logits else query_states[-1:]
        mask_logits = [self.mask_head(q, base.pixel_decoder_last_hidden_state) for q in decoded]

        # 4. Multi-grained masked attention through CLIP's remaining layers, then open-vocabulary classification.
        vision = self.mrovseg.vision_model
        queries = self.masked_attention(
            base.cls_token,
            list(vision.encoder.layers[self.config.query_layer :]),
            base.clip_global_tokens,
            base.clip_high_res_maps,
            query_states[-1],
            base.fused_features[-1],
        )
        query_embeds = F.normalize(self.visual_projection(vision.post_layernorm(queries)), dim=-1)
        class_logits = self.classifier(query_embeds, vocabulary.to(query_embeds.dtype), self.logit_scale)

        auxiliary = [
            {"class_queries_logits": class_logits, "masks_queries_logits": masks} for masks in mask_logits[:-1]
        ]
        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict = self.criterion(class_logits, mask_logits[-1], labels, auxiliary, loss_seeds)

        output = MROVSegOutput(
            loss=loss,
            class_queries_logits=class_logits,
            masks_queries_logits=mask_logits[-1],
            auxiliary_logits=auxiliary or None,  # None, not [], so pipelines can unbatch the outputs
            image_sizes=image_sizes if image_sizes is not None else self.image_sizes_from_pixel_mask(pixel_mask),
            loss_dict=loss_dict,
            hidden_states=base.hidden_states,
            fused_features=base.fused_features if output_hidden_states else None,
            pixel_decoder_last_hidden_state=base.pixel_decoder_last_hidden_state if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ batches of mixed slice grids
    def _read_slice_grids(self, pixel_values_slices, slice_grid) -> list[tuple[int, ...]] | None:
        """Eager: every image's (rows, cols, window, stride) in one host read (None when compiling, where the canvas
        shape fixes the grid, or when there is nothing well-formed to read; the base model then checks)."""
        if (pixel_values_slices is None or not self.config.use_high_res or not isinstance(slice_grid, torch.Tensor)
                or torch.compiler.is_compiling()):
            return None
        grid = slice_grid[None] if slice_grid.dim() == 1 else slice_grid
        if grid.dim() != 2 or grid.shape[-1] != 4 or grid.is_floating_point():
            return None
        return [tuple(row) for row in grid.tolist()]

    def _forward_per_grid(self, pixel_values, pixel_values_slices, grids, image_sizes, vocabulary,
                          output_auxiliary_logits) -> MROVSegOutput:
        """Each slice grid of the batch as its own batch (exactly what those images give alone); mask logits padded
        to the batch's largest canvas with edge values, so bilinear post-processing reads what it reads alone."""
        for rows, cols, window, stride in grids:
            if rows < 1 or cols < 1 or rows * cols > pixel_values_slices.shape[1]:
                raise ValueError(f"slice_grid {rows} x {cols} does not fit the {pixel_values_slices.shape[1]} slices "
                                 "given; prepare inputs with MROVSegImageProcessor.")
        canvases = [(window + (rows - 1) * stride, window + (cols - 1) * stride) for rows, cols, window, stride in grids]
        height, width = max(h for h, _ in canvases), max(w for _, w in canvases)
        sizes = [[h, w] for h, w in canvases] if image_sizes is None else [row[:2] for row in image_sizes.tolist()]
        groups: dict[tuple, list[int]] = {}
        for i, grid in enumerate(grids):
            groups.setdefault(grid, []).append(i)

        batch = pixel_values.shape[0]
        class_logits: list = [None] * batch
        mask_logits: list = [None] * batch
        auxiliary: list = [None] * batch
        for grid, members in groups.items():
            index = torch.tensor(members, device=pixel_values.device)
            grid = SliceGrid(*grid)
            out = self(pixel_values[index], pixel_values_slices[index, : grid.num_slices], grid,
                       image_sizes=None if image_sizes is None else image_sizes[index],
                       text_embeds=vocabulary[index] if vocabulary.dim() == 3 else vocabulary,
                       output_auxiliary_logits=output_auxiliary_logits, return_dict=True)
            canvas = canvases[members[0]]
            pad = lambda masks: self._pad_to_canvas(masks, canvas, (height, width))  # noqa: E731
            for j, i in enumerate(members):
                class_logits[i] = out.class_queries_logits[j]
                mask_logits[i] = pad(out.masks_queries_logits[j : j + 1])[0]
                auxiliary[i] = [(aux["class_queries_logits"][j], pad(aux["masks_queries_logits"][j : j + 1])[0])
                                for aux in out.auxiliary_logits or []]
        layers = len(auxiliary[0])
        return MROVSegOutput(
            class_queries_logits=torch.stack(class_logits),
            masks_queries_logits=torch.stack(mask_logits),
            auxiliary_logits=[{"class_queries_logits": torch.stack([aux[k][0] for aux in auxiliary]),
                               "masks_queries_logits": torch.stack([aux[k][1] for aux in auxiliary])}
                              for k in range(layers)] or None,
            image_sizes=torch.tensor([[h, w, height, width] for h, w in sizes], device=pixel_values.device),
        )

    @staticmethod
    def _pad_to_canvas(masks: torch.Tensor, canvas: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
        """(b, N, h, w) mask logits of a `canvas` (pixels) -> those of a larger `target` canvas, edge values repeated."""
        low_h, low_w = masks.shape[-2:]
        full_h, full_w = low_h * target[0] // canvas[0], low_w * target[1] // canvas[1]
        if (full_h, full_w) == (low_h, low_w):
            return masks
        return F.pad(masks, (0, full_w - low_w, 0, full_h - low_h), mode="replicate")

    # ------------------------------------------------------------------ input checks
    def _check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor, pixel_mask, image_sizes) -> None:
        if labels.dim() != 3 or labels.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"labels must be (B, H, W) class-id maps, got {tuple(labels.shape)}.")
        if pixel_mask is not None and labels.shape[-2:] != pixel_mask.shape[-2:]:
            raise ValueError(f"labels {tuple(labels.shape)} and pixel_mask {tuple(pixel_mask.shape)} differ in size.")
        canvas = None if pixel_mask is not None else MROVSegModel._canvas_size(None, image_sizes)
        if canvas is not None and tuple(labels.shape[-2:]) != canvas:
            raise ValueError(f"labels {tuple(labels.shape)} do not cover the {canvas[0]} x {canvas[1]} canvas of "
                             "image_sizes: pass the labels the image processor returns with the images.")

    @staticmethod
    def image_sizes_from_pixel_mask(pixel_mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 4) valid height, valid width, padded height, padded width of each canvas (post-processing crops with it)."""
        if pixel_mask is None:
            return None
        valid = pixel_mask.bool()
        heights = valid.any(dim=2).sum(dim=1)
        widths = valid.any(dim=1).sum(dim=1)
        padded = torch.tensor(pixel_mask.shape[-2:], device=pixel_mask.device).expand(pixel_mask.shape[0], 2)
        return torch.cat([heights[:, None], widths[:, None], padded], dim=1).long()

    # ------------------------------------------------------------------ construction from CLIP
    @classmethod
    def from_clip(
        cls,
        name_or_path: str,
        vocabulary: Sequence[str] | None = None,
        tokenizer=None,
        **config_overrides,
    ) -> "MROVSegForOpenVocabSegmentation":
        """
        An untrained MROVSeg around pretrained CLIP weights (a Hub id such as "openai/clip-vit-base-patch16" or a
        local folder holding a `CLIPModel`); `vocabulary` (class names) is embedded with CLIP's own tokenizer.
        """
        from transformers import AutoConfig, AutoTokenizer, CLIPModel

        # before the download; `class_names=` is the likeliest slip (the training scripts' name)
        unknown = MROVSegConfig.unknown_fields(config_overrides, dict.fromkeys(VOCABULARY_ALIASES, "vocabulary"))
        if unknown:
            raise TypeError(f"from_clip() got unknown keyword(s) {', '.join(unknown)}; it takes vocabulary (the class "
                            "names), tokenizer and MROVSegConfig fields.")
        # another model (a SigLIP, a trained MROVSeg) printed a long load report, then "ignore_mismatched_sizes"
        clip_config = AutoConfig.from_pretrained(name_or_path)
        model_type = getattr(clip_config, "model_type", None)
        if model_type != "clip":
            hint = ("an MROVSeg checkpoint: load it with from_pretrained" if model_type == "mrovseg" else
                    f"a {model_type!r} checkpoint, not a CLIP: from_clip takes a CLIPModel (a Hub id such as "
                    "openai/clip-vit-base-patch16, or a folder)")
            raise ValueError(f"{name_or_path} is {hint}")
        clip, info = CLIPModel.from_pretrained(name_or_path, config=clip_config, output_loading_info=True)
        # a vision-only CLIP (or another model) gave a random text tower: every class name embedded to noise
        lacking = weights_not_loaded(info)
        if lacking:
            raise ValueError(f"{name_or_path} does not hold a whole CLIP (CLIPModel): {len(lacking)} of its weights "
                             f"are missing or of another shape ({', '.join(lacking[:3])}, ...); MROVSeg needs both "
                             "towers, the text one to embed class names.")
        if vocabulary is not None:
            labels = validate_labels(vocabulary)
            config_overrides.setdefault("id2label", dict(enumerate(labels)))
            config_overrides.setdefault("label2id", {label: i for i, label in enumerate(labels)})
        config = MROVSegConfig.from_clip_config(clip.config, **config_overrides)
        model = cls(config)
        model.mrovseg.vision_model.load_state_dict(clip.vision_model.state_dict())
        for name in ("visual_projection", "text_model", "text_projection"):
            getattr(model, name).load_state_dict(getattr(clip, name).state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(clip.logit_scale)
        model.freeze_clip()
        model.clip_tokenizer = tokenizer or AutoTokenizer.from_pretrained(name_or_path)
        if vocabulary is not None:
            model.set_vocabulary(vocabulary)
        return model


__all__ = ["MROVSegPreTrainedModel", "MROVSegModel", "MROVSegForOpenVocabSegmentation", "MROVSegModelOutput",
           "MROVSegOutput", "MROVSegFeatures", "LEGACY_KEY_MAPPING"]
