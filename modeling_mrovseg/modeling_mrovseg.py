"""MROVSeg: open-vocabulary semantic segmentation with one CLIP at two resolutions (arXiv 2408.14776)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPMLP,
    CLIPPreTrainedModel,
    CLIPTextEmbeddings,
    CLIPVisionEmbeddings,
)
from transformers.utils import ModelOutput

from .configuration_mrovseg import MROVSegConfig
from .loss_mrovseg import MROVSegLoss
from .mask_decoder import MROVSegAttentionMaskDecoder, MROVSegMaskHead, MROVSegPixelDecoder, MROVSegQueryDecoder
from .masked_attention import MROVSegMultiGrainedMaskedAttention
from .multi_res_adapter import MROVSegMultiResAdapter
from .slicing import SliceGrid, stitch_windows
from .text_classifier import MROVSegOpenVocabClassifier, build_prompts, pool_prompt_embeddings, validate_labels


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
    """Backbone pass results: per needed CLIP layer, global tokens (B, Tg, C) and high-res maps (B, C, h, w)."""

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
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "CLIPTextEmbeddings"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_pickle: bool = False, **kwargs):
        """
        `PreTrainedModel.from_pretrained`, but weights load only from safetensors: pickled weights (`*.bin`) can
        run arbitrary code when unpickled, so they are refused unless `allow_pickle=True` (for sources you trust).
        """
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise ValueError("use_safetensors=False loads pickled weights: also pass allow_pickle=True to confirm.")
            kwargs["use_safetensors"] = True
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as error:
            folder = Path(str(pretrained_model_name_or_path))
            if not allow_pickle and folder.is_dir() and any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
                raise ValueError(
                    f"{folder} holds only pickled weights ({', '.join(p.name for p in folder.glob('*.bin'))}); "
                    "MROVSeg loads safetensors only. If you trust the source, pass allow_pickle=True, then re-save "
                    "with save_pretrained() to get model.safetensors."
                ) from error
            raise

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also map AutoModelForSemanticSegmentation in `auto_map`, so the stock image-segmentation pipeline loads
        the remote code too (`register_for_auto_class` records one auto class only)."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModelForSemanticSegmentation", f"{type(self).__module__.split('.')[-1]}.{type(self).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (CLIPVisionEmbeddings, CLIPTextEmbeddings, CLIPAttention, CLIPMLP)):
            CLIPPreTrainedModel._init_weights(self.vision_model, module)
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
        elif isinstance(module, MROVSegAttentionMaskDecoder):
            init.ones_(module.scale)
            init.zeros_(module.shift)
        elif isinstance(module, MROVSegForOpenVocabSegmentation):
            init.constant_(module.logit_scale, self.config.logit_scale_init)
            init.copy_(module.vocabulary_embeds, placeholder_vocabulary(*module.vocabulary_embeds.shape))


def placeholder_vocabulary(num_classes: int, dim: int) -> torch.Tensor:
    """Fixed, distinct unit vectors standing in for class embeddings until `set_vocabulary` is called."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    return F.normalize(torch.randn(num_classes, dim, generator=generator, device="cpu"), dim=-1)


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
    >>> processor = MROVSegImageProcessor(slice_size=64, size={"shortest_edge": 128, "longest_edge": 512})
    >>> inputs = processor(np.zeros((100, 150, 3), dtype=np.uint8), return_tensors="pt")
    >>> with torch.inference_mode():
    ...     outputs = model(**inputs)
    >>> processor.post_process_semantic_segmentation(outputs, target_sizes=[(100, 150)])[0].shape
    torch.Size([100, 150])
    ```
    """

    def __init__(self, config: MROVSegConfig):
        super().__init__(config)
        vision = config.vision_config
        self.vision_model = CLIPVisionModel._from_config(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_model = CLIPTextModel._from_config(config.text_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

        self.adapters = nn.ModuleList(MROVSegMultiResAdapter(config) for _ in config.feature_layers)
        self.pixel_decoder = MROVSegPixelDecoder(config)
        self.query_decoder = MROVSegQueryDecoder(config)
        self.mask_head = MROVSegMaskHead(config)
        num_remaining = vision.num_hidden_layers - config.query_layer
        self.attention_mask_decoder = MROVSegAttentionMaskDecoder(config, num_remaining, vision.num_attention_heads)
        self.masked_attention = MROVSegMultiGrainedMaskedAttention(config)
        self.classifier = MROVSegOpenVocabClassifier(config.projection_dim)
        placeholder = placeholder_vocabulary(config.num_labels, config.projection_dim).to(self.logit_scale.device)
        self.register_buffer("vocabulary_embeds", placeholder, persistent=True)
        self.criterion = MROVSegLoss(config)
        self.post_init()
        self.freeze_clip()

    # ------------------------------------------------------------------ parameter groups
    def freeze_clip(self) -> None:
        """CLIP stays frozen (it is the open-vocabulary prior); only its position embeddings may adapt."""
        for module in (self.vision_model, self.visual_projection, self.text_model, self.text_projection):
            module.requires_grad_(False)
        self.logit_scale.requires_grad_(False)
        position = self.vision_model.embeddings.position_embedding
        position.requires_grad_(bool(self.config.train_position_embeddings))

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """Parameter counts (total and trainable) of CLIP vision, CLIP text and the new MROVSeg modules."""
        groups = {"clip_vision": [self.vision_model, self.visual_projection],
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

    def get_input_embeddings(self) -> nn.Module:
        return self.vision_model.embeddings.patch_embedding

    # ------------------------------------------------------------------ text side
    @property
    def vocabulary(self) -> list[str]:
        """The stored class names, in class-id order (`config.id2label`)."""
        return [self.config.id2label[i] for i in range(len(self.config.id2label))]

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (..., L) -> unit-norm CLIP text embeddings (..., P)."""
        shape = input_ids.shape[:-1]
        flat_ids = input_ids.reshape(-1, input_ids.shape[-1])
        flat_mask = None if attention_mask is None else attention_mask.reshape(-1, attention_mask.shape[-1])
        pooled = self.text_model(input_ids=flat_ids, attention_mask=flat_mask).pooler_output
        return F.normalize(self.text_projection(pooled), dim=-1).reshape(*shape, -1)

    @torch.no_grad()
    def embed_class_names(self, labels: Sequence[str], tokenizer, batch_size: int = 256) -> torch.Tensor:
        """(C, P) embeddings: every name (and synonym) in every prompt template, averaged and normalised."""
        labels = validate_labels(labels)
        prompts, owners = build_prompts(labels, self.config.prompt_templates)
        max_length = self.config.text_config.max_position_embeddings
        device = self.text_projection.weight.device
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt")
            chunks.append(self.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))
        return pool_prompt_embeddings(torch.cat(chunks), owners, len(labels))

    def set_vocabulary(self, labels: Sequence[str], tokenizer=None, text_embeds: torch.Tensor | None = None) -> None:
        """Make `labels` the default vocabulary: embeds them (or takes `text_embeds`), updates id2label/label2id."""
        labels = validate_labels(labels)
        if text_embeds is None:
            if tokenizer is None:
                raise ValueError("set_vocabulary needs a CLIP tokenizer (or precomputed `text_embeds`).")
            text_embeds = self.embed_class_names(labels, tokenizer)
        if text_embeds.shape != (len(labels), self.config.projection_dim):
            raise ValueError(
                f"text_embeds has shape {tuple(text_embeds.shape)}, expected ({len(labels)}, {self.config.projection_dim})."
            )
        buffer = F.normalize(text_embeds.detach().float(), dim=-1).to(self.vocabulary_embeds.device)
        self.register_buffer("vocabulary_embeds", buffer, persistent=True)
        self.config.id2label = dict(enumerate(labels))
        self.config.label2id = {label: i for i, label in enumerate(labels)}

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
            if embeds.dim() == 3:  # (C, templates, P): prompt ensemble
                embeds = F.normalize(embeds.mean(dim=1), dim=-1)
            return embeds
        return self.vocabulary_embeds

    # ------------------------------------------------------------------ backbone pass
    def _needed_layers(self) -> list[int]:
        depth = self.config.vision_config.num_hidden_layers
        return sorted(set(self.config.feature_layers) | set(range(self.config.query_layer, depth)))

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        pixel_values_slices: torch.Tensor | None = None,
        slice_grid: torch.Tensor | Sequence[int] | None = None,
        output_hidden_states: bool = False,
    ) -> MROVSegFeatures:
        """
        The global view and all slices through CLIP in one batched pass (chunked by `slice_batch_size`), keeping the
        hidden states of the tapped layers and of every layer the queries will read; slice tokens are stitched to
        the high-resolution token grid.
        """
        config = self.config
        batch = pixel_values.shape[0]
        patch = config.patch_size
        use_slices = pixel_values_slices is not None and config.use_high_res
        images = pixel_values
        grid = None
        if use_slices:
            rows, cols = self._grid_from(slice_grid, pixel_values_slices)
            grid = SliceGrid(rows, cols, config.slice_size, config.slice_stride)
            images = torch.cat([pixel_values, pixel_values_slices.flatten(0, 1)], dim=0)
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
                tokens = states[layer][batch:, 1:]  # (B*K, t*t, C)
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

    def _grid_from(self, slice_grid, slices: torch.Tensor) -> tuple[int, int]:
        if slices.dim() != 5 or slices.shape[-1] != self.config.slice_size or slices.shape[-2] != self.config.slice_size:
            raise ValueError(
                f"pixel_values_slices must be (B, K, 3, {self.config.slice_size}, {self.config.slice_size}), got "
                f"{tuple(slices.shape)}; check that the image processor's slice_size matches the model's."
            )
        if slice_grid is None:
            raise ValueError("pixel_values_slices need `slice_grid` (rows, cols), as returned by the image processor.")
        grid = torch.as_tensor(slice_grid).reshape(-1, 2)
        if (grid != grid[0]).any():
            raise ValueError("All images of a batch must share one slice grid (the processor pads them together).")
        rows, cols = (int(v) for v in grid[0])
        if rows * cols != slices.shape[1]:
            raise ValueError(f"slice_grid {rows} x {cols} does not match the {slices.shape[1]} slices given.")
        return rows, cols

    def _run_clip(self, images: torch.Tensor, needed: list[int]) -> dict[int, torch.Tensor]:
        """Hidden states (N, 1 + T, C) of `needed` layers (0 = embeddings) for a stack of S x S images."""
        vision = self.vision_model
        interpolate = images.shape[-1] != self.config.vision_config.image_size
        last = max(needed)
        chunk = self.config.slice_batch_size or images.shape[0]
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
        **kwargs,
    ) -> MROVSegOutput | tuple:
        r"""
        pixel_values (B, 3, S, S): the global view. pixel_values_slices (B, K, 3, S, S) and slice_grid (B, 2): the
        full-resolution windows; without them the model runs the single-resolution ablation. pixel_mask (B, H, W):
        1 on image pixels of the padded canvas. labels (B, H, W): semantic class ids on the canvas (ignore 255).
        input_ids / attention_mask ((C, L), (C, templates, L), or (P, L) prompts with `text_prompt_owners` (P, 2)
        from `MROVSegProcessor`) or text_embeds ((C, P) or (B, C, P)): a per-call vocabulary; by default the
        stored one (`set_vocabulary`). output_auxiliary_logits: also return the intermediate decoder layers'
        predictions (default: when training or given labels; inference skips those full-resolution masks).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        self._check_pixel_values(pixel_values)
        if labels is not None:
            self._check_labels(labels, pixel_values, pixel_mask)
        vocabulary = self._resolve_text_embeds(text_embeds, input_ids, attention_mask, text_prompt_owners)

        # 1. One CLIP, two resolutions: global view and stitched slices.
        features = self.forward_features(pixel_values, pixel_values_slices, slice_grid, output_hidden_states)
        high_res = features.high_res_maps
        global_maps = {
            layer: tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *features.global_grid)
            for layer, tokens in features.global_tokens.items()
        }

        # 2. Multi-Res Adapters fuse both resolutions at every tapped layer.
        fused = [
            adapter(global_maps[layer], high_res[layer] if high_res else None)
            for adapter, layer in zip(self.adapters, self.config.feature_layers)
        ]

        # 3. Hierarchical mask decoding and the light query decoder.
        pixel_features = self.pixel_decoder(fused)
        query_states = self.query_decoder(fused[-1])
        if output_auxiliary_logits is None:
            output_auxiliary_logits = self.training or labels is not None
        decoded = query_states if output_auxiliary_logits else query_states[-1:]
        mask_logits = [self.mask_head(q, pixel_features) for q in decoded]

        # 4. Multi-grained masked attention through CLIP's remaining layers, then open-vocabulary classification.
        def attention_bias(layer: int) -> torch.Tensor:
            return self.attention_mask_decoder(query_states[-1], fused[-1], layer)

        remaining = list(range(self.config.query_layer, self.config.vision_config.num_hidden_layers))
        queries = self.masked_attention(
            features.cls_token,
            [self.vision_model.encoder.layers[i] for i in remaining],
            [features.global_tokens[i] for i in remaining],
            [high_res[i].flatten(2).transpose(1, 2) if high_res else None for i in remaining],
            attention_bias,
            features.global_grid,
            features.high_res_grid,
        )
        query_embeds = self.visual_projection(self.vision_model.post_layernorm(queries))
        query_embeds = F.normalize(query_embeds, dim=-1)
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
            auxiliary_logits=auxiliary,
            image_sizes=self._image_sizes(pixel_mask),
            loss_dict=loss_dict,
            hidden_states=features.global_hidden_states,
            fused_features=tuple(fused) if output_hidden_states else None,
            pixel_decoder_last_hidden_state=pixel_features if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------ input checks
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        size = self.config.slice_size
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values must be the global view (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "prepare images with MROVSegImageProcessor."
            )

    def _check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor, pixel_mask) -> None:
        if labels.dim() != 3 or labels.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"labels must be (B, H, W) class-id maps, got {tuple(labels.shape)}.")
        if pixel_mask is not None and labels.shape[-2:] != pixel_mask.shape[-2:]:
            raise ValueError(f"labels {tuple(labels.shape)} and pixel_mask {tuple(pixel_mask.shape)} differ in size.")

    @staticmethod
    def _image_sizes(pixel_mask: torch.Tensor | None) -> torch.Tensor | None:
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
        from transformers import AutoTokenizer, CLIPModel

        clip = CLIPModel.from_pretrained(name_or_path)
        if vocabulary is not None:
            labels = validate_labels(vocabulary)
            config_overrides.setdefault("id2label", dict(enumerate(labels)))
            config_overrides.setdefault("label2id", {label: i for i, label in enumerate(labels)})
        config = MROVSegConfig.from_clip_config(clip.config, **config_overrides)
        model = cls(config)
        for name in ("vision_model", "visual_projection", "text_model", "text_projection"):
            getattr(model, name).load_state_dict(getattr(clip, name).state_dict())
        with torch.no_grad():
            model.logit_scale.copy_(clip.logit_scale)
        model.freeze_clip()
        if vocabulary is not None:
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(name_or_path)
            model.set_vocabulary(vocabulary, tokenizer)
        return model


__all__ = ["MROVSegPreTrainedModel", "MROVSegForOpenVocabSegmentation", "MROVSegOutput", "MROVSegFeatures"]
