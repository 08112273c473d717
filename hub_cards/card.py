"""Model cards for MROVSeg checkpoints, filled from training/evaluation results JSON files.

    python -m hub_cards.card --checkpoint runs/x/model --results results/ade150.json results/pc59.json
writes CHECKPOINT/README.md whose `model-index` carries the mIoU of every benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path

from modeling_mrovseg.cli import is_hub_id, one_line, write_atomically
from modeling_mrovseg.configuration_mrovseg import MIN_TRANSFORMERS

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
DEFAULT_LICENSE = "apache-2.0"  # the code's (LICENSE)
# the last line of a generated card: the digest of everything above it, so a card edited by hand is recognised
STAMP = "<!-- written by hub_cards.card (sha256 {}): a card edited by hand is kept -->"
STAMP_PATTERN = re.compile(r"\n<!-- written by hub_cards\.card \(sha256 ([0-9a-f]{64})\): [^\n]*-->\n?$")


def stamped(text: str) -> str:
    text = text.rstrip("\n") + "\n"
    return text + "\n" + STAMP.format(hashlib.sha256(text.encode()).hexdigest()) + "\n"


# what transformers writes when no person did: `push_to_hub`'s placeholder card and `Trainer`'s draft (whose comment
# asks to be removed once a person has completed it)
MACHINE_CARD_MARKS = ("This model card has been automatically generated.",
                      "This model card has been generated automatically according to the information the Trainer")


def edited_by_hand(text: str) -> bool:
    """Whether a README.md is someone's work: not stamped by `write_card`, or changed since, and not one of
    transformers' machine-written cards."""
    match = STAMP_PATTERN.search(text)
    if match is None:
        return not any(mark in text for mark in MACHINE_CARD_MARKS)
    return hashlib.sha256(text[: match.start()].encode()).hexdigest() != match.group(1)


def write_card(card, checkpoint: str | Path, regenerate: bool = False) -> bool:
    """CHECKPOINT/README.md from `card`, unless the README there was written or edited by a person (then it is kept
    and said so; `regenerate` replaces it). Returns whether the card was written."""
    path = Path(checkpoint) / "README.md"
    if path.is_file() and not regenerate and edited_by_hand(path.read_text(encoding="utf-8")):
        print(f"kept {path}: it was edited by hand or not written by hub_cards (--regenerate-card replaces it)")
        return False
    # whole or not at all: a card cut short by a kill would lose its stamp and pass for a person's from then on
    write_atomically(path, stamped(str(card)))
    return True


def load_results(paths: list[str | Path], allow_unscored: bool = False) -> list[dict]:
    """Evaluation records from results JSON files (training's results.json or evaluate.py's output).

    A record without an mIoU (training with `--eval_split none` or a failed final evaluation, or images without a
    labelled pixel) is an error for a file asked for by name; `allow_unscored` keeps it (its training record still
    describes the run), as for the checkpoint's own results.json."""
    records = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except ValueError as error:
            raise ValueError(f"{path} is not a results JSON file ({error})") from None
        if "final_evaluation" in data:  # training results: the final evaluation on its eval split
            final = dict(data["final_evaluation"] or {})
            final.setdefault("benchmark", Path(str(data.get("dataset", "validation"))).name)
            final.setdefault("split", data.get("eval_split", "validation"))
            final.setdefault("eval_size", data.get("args", {}).get("eval_size"))
            final["training"] = {k: data["args"][k] for k in ("model", "dataset", "max_steps", "batch_size", "lr",
                                                              "crop_size", "lora_rank", "lora_targets")
                                 if k in data.get("args", {})}
            if "hub_ids" in data:  # runs since it was recorded; older ones are judged by the names alone
                final["training"]["hub_ids"] = list(data["hub_ids"])
            final["training"]["started_from"] = data.get("started_from", "clip")
            records.append(final)
            if data.get("final_evaluation_error"):  # training saved the model, but its final evaluation failed
                why = f"its final evaluation failed ({data['final_evaluation_error']})"
                final["evaluation_failed"] = True
            elif data["final_evaluation"] is None:
                why = "the run had no final evaluation"
            else:
                why = "its evaluation images had no labelled pixel"
        elif "mean_iou" in data:
            records.append(data)
            why = "its evaluation images had no labelled pixel"
        else:
            raise ValueError(f"{path} holds no mean_iou results")
        if records[-1].get("mean_iou") is None and not allow_unscored:
            raise ValueError(f"{path} holds no mIoU: {why}")
    return records


def checkpoint_results(checkpoint: Path, named: list[str | Path] | None) -> list[dict]:
    """The results files named, else the checkpoint's own results.json (from training.train, which may describe a
    run without an evaluation), else none."""
    if named:
        return load_results(named)
    own = checkpoint / "results.json"
    return load_results([own], allow_unscored=True) if own.is_file() else []


def checkpoint_config(checkpoint: str | Path) -> dict:
    """The config.json of an MROVSeg checkpoint folder; another model's (a CLIP's, what training starts from) is a
    `NotAnMROVSegCheckpoint`: the card, the push and the Space builder took a CLIP folder for a model to publish."""
    from modeling_mrovseg.configuration_mrovseg import NotAnMROVSegCheckpoint

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    if config.get("model_type") != "mrovseg":
        raise NotAnMROVSegCheckpoint(config.get("model_type"), str(checkpoint))
    return config


def build_card(checkpoint: str | Path, results: list[dict], repo_id: str, license: str = DEFAULT_LICENSE):
    """A `huggingface_hub.ModelCard` for `checkpoint`, with `eval_results` for every benchmark result and, where the
    run started from a Hub model (a CLIP, or an MROVSeg it fine-tuned), that model as `base_model`: the Hub links the
    two."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = checkpoint_config(checkpoint)
    scored = [r for r in results if r.get("mean_iou") is not None]  # training records without an evaluation: no row
    labels = [config["id2label"][str(i)] for i in range(len(config.get("id2label", {})))]
    eval_results = [
        EvalResult(task_type="image-segmentation", task_name="Open-vocabulary semantic segmentation",
                   dataset_type=str(r.get("benchmark", "unknown")), dataset_name=str(r.get("benchmark", "unknown")),
                   dataset_split=str(r.get("split", "validation")), metric_type="mean_iou", metric_name="mIoU",
                   metric_value=round(100 * float(r["mean_iou"]), 2))
        for r in scored
    ]
    datasets = sorted({hub_source(r["training"], "dataset") for r in results if "training" in r} - {None})
    training = next((r["training"] for r in results if "training" in r), None)
    if training is None:  # what training.train wrote next to the weights, if anything
        training = next((r["training"] for r in checkpoint_results(Path(checkpoint), None) if "training" in r), None)
    card_data = ModelCardData(
        model_name=repo_id.split("/")[-1], license=license, library_name="transformers",
        pipeline_tag="image-segmentation", tags=["mrovseg", "open-vocabulary", "semantic-segmentation", "clip"],
        datasets=datasets or None, eval_results=eval_results or None, base_model=hub_source(training, "model"),
    )
    vision = config.get("vision_config", {})
    training_description = describe_training(training, config)
    tiny = int(vision.get("hidden_size", 768)) < 256
    extra = ("The CLIP inside is a tiny randomly initialised one (width "
             f"{vision.get('hidden_size')}, {vision.get('num_hidden_layers')} layers), not a pretrained CLIP: this "
             "checkpoint demonstrates the code path, not open-vocabulary segmentation quality.") if tiny else None
    rows = [{"name": r.get("benchmark", "?"), "split": r.get("split", "?"), "num_images": r.get("num_images", "?"),
             "miou": f"{100 * float(r['mean_iou']):.2f}"} for r in scored]
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        clip_description=f"ViT with patch {vision.get('patch_size', '?')}, width {vision.get('hidden_size', '?')}, "
                         f"{vision.get('num_hidden_layers', '?')} layers",
        num_labels=len(labels), vocabulary_preview=", ".join(labels[:20]) + (", ..." if len(labels) > 20 else ""),
        training_description=training_description, eval_rows=rows,
        eval_size=next((r.get("eval_size") for r in results if r.get("eval_size")), 640), extra_limitations=extra,
        eval_failed=any(r.get("evaluation_failed") for r in results),
        min_transformers=".".join(map(str, MIN_TRANSFORMERS)),  # what the remote code checks
    )


def hub_source(training: dict | None, name: str) -> str | None:
    """The run's `model` or `dataset` where it was a Hub id (as training.train recorded; by the name alone for runs
    that did not record it), else None."""
    value = str((training or {}).get(name) or "")
    hub = name in training["hub_ids"] if training and "hub_ids" in training else is_hub_id(value)
    return value if value and hub else None


def add_license_argument(parser) -> None:
    parser.add_argument("--license", type=license_id, default=DEFAULT_LICENSE,
                        help=f"the weights' license on the card, a Hub license id (default {DEFAULT_LICENSE}, the "
                             "code's; weights may owe their CLIP's and data's terms: mit, cc-by-4.0, other ...)")


def license_id(value: str) -> str:
    """A Hub license id is lowercase letters, digits, '.', '-' and '_' ("apache-2.0", "cc-by-nc-4.0", "other"); the
    Hub rejects a card whose license is anything else, after the upload has begun."""
    text = value.strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{value!r} is not a license id such as apache-2.0, mit, cc-by-4.0 or other")
    return text


def _source(training: dict, name: str) -> str:
    """A Hub id as is; a local path by its folder name only (a card never shows a machine's paths)."""
    hub = hub_source(training, name)
    return f"`{hub}`" if hub else f"a local `{Path(str(training.get(name))).name}`"


def describe_training(training: dict | None, config: dict) -> str:
    """The card's training section, from the run's own arguments; nothing is claimed that the run did not do."""
    if not training:
        return ("No training record came with this checkpoint (no `results.json` from `training.train`), so its "
                "data and recipe are not stated here.")
    clip_part = ("CLIP frozen except its position embeddings" if config.get("train_position_embeddings", True)
                 else "CLIP frozen")
    if int(training.get("lora_rank") or 0) > 0:
        clip_part = (f"LoRA rank {training['lora_rank']} on CLIP's {training.get('lora_targets', 'vision')} attention, "
                     "the rest of CLIP frozen")
    start = (f"Fine-tuned from {_source(training, 'model')} MROVSeg" if training.get("started_from") == "mrovseg"
             else f"Trained from {_source(training, 'model')} CLIP")
    return (f"{start} on {_source(training, 'dataset')} data for "
            f"{training.get('max_steps')} steps, batch {training.get('batch_size')}, AdamW lr {training.get('lr')} "
            f"with a poly schedule, {training.get('crop_size')} px crops after random scaling (0.5-1.5x), flips and "
            f"colour jitter; {clip_part}; Hungarian-matched class / BCE / dice losses on sampled points.")


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=os.path.expanduser, required=True)
    parser.add_argument("--results", nargs="*", default=[], help="results JSON files (default: CHECKPOINT/results.json)")
    parser.add_argument("--repo-id", default="your-name/mrovseg")
    parser.add_argument("--regenerate-card", action="store_true", help="replace a README.md edited by hand")
    add_license_argument(parser)
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    try:  # a results file that is missing or not JSON (a shell glob that matched nothing), a folder with no config
        card = build_card(checkpoint, checkpoint_results(checkpoint, args.results), args.repo_id, args.license)
        written = write_card(card, checkpoint, args.regenerate_card)
    except (OSError, ValueError) as error:
        parser.exit(1, f"error: {one_line(error).rstrip('.')}; no card was written.\n")
    if written:
        print(f"wrote {checkpoint / 'README.md'}")
    return checkpoint / "README.md"


if __name__ == "__main__":
    main()
