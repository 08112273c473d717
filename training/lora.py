"""LoRA on CLIP's attention with peft, the MROVSeg decoder trained fully.

    from training.lora import apply_lora, merge_lora
    peft_model = apply_lora(model, rank=8, alpha=16, targets="vision")   # a peft.PeftModel
    ...train...
    peft_model.save_pretrained("adapter")       # adapter_model.safetensors: LoRA + the trained decoder modules
    merged = merge_lora(peft_model)             # a plain MROVSegForOpenVocabSegmentation, no peft needed
    merged.save_pretrained("merged")

Targets are picked by an anchored regular expression over full module names, so only CLIP's q/k/v/out
projections are adapted: the query decoder's own attention (`mrovseg.query_decoder.layers.N.self_attn.out_proj`) and
every other module can never match. The decoder, adapters and query modules are `modules_to_save` under names
that occur once in the model.
"""

from __future__ import annotations

import contextlib
import warnings

from typing import Literal

TOWERS = {"vision": (r"mrovseg\.vision_model",), "text": ("text_model",),
          "both": (r"mrovseg\.vision_model", "text_model")}
DECODER_MODULES = ["mrovseg.adapters", "mrovseg.pixel_decoder", "mrovseg.query_decoder", "mask_head",
                   "masked_attention", "classifier"]


def target_pattern(targets: Literal["vision", "text", "both"] = "vision") -> str:
    """Regex (full match) for the attention projections of the chosen CLIP tower(s)."""
    if targets not in TOWERS:
        raise ValueError(f"lora targets must be one of {sorted(TOWERS)}, got {targets!r}")
    towers = "|".join(TOWERS[targets])
    return rf"^(?:{towers})\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj)$"


def lora_config(model, rank: int = 8, alpha: float | None = None, targets: str = "vision", dropout: float = 0.0):
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    from torch import nn

    modules_to_save = []
    for name in DECODER_MODULES:  # peft cannot wrap a ModuleList: list its members ("adapters.0", ...)
        module = model.get_submodule(name)
        modules_to_save += [f"{name}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [name]
    if model.config.train_position_embeddings:
        modules_to_save.append("mrovseg.vision_model.embeddings.position_embedding")
    return LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                      target_modules=target_pattern(targets), modules_to_save=modules_to_save, bias="none")


def apply_lora(model, rank: int = 8, alpha: float | None = None, targets: str = "vision", dropout: float = 0.0):
    """Wrap `model` in a peft `PeftModel`: LoRA on CLIP attention, the MROVSeg modules trained in full."""
    from peft import get_peft_model

    with _quiet_peft():
        return get_peft_model(model, lora_config(model, rank, alpha, targets, dropout))


def merge_lora(peft_model):
    """Fold the LoRA weights into CLIP and return the plain MROVSeg model (loads and saves without peft)."""
    return peft_model.merge_and_unload()


def load_lora(base_model, adapter_dir: str, is_trainable: bool = False):
    """A base MROVSeg plus a saved adapter (LoRA and decoder weights) -> `PeftModel`."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=is_trainable)


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning users cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


__all__ = ["apply_lora", "merge_lora", "load_lora", "lora_config", "target_pattern", "DECODER_MODULES"]
