"""Train MROVSeg with accelerate (one process, several CPU processes, GPUs or machines).

    accelerate launch -m training.train --model openai/clip-vit-base-patch16 --dataset DIR_OR_HUB_ID \
        --output_dir runs/coco-stuff --max_steps 60000 --batch_size 4 --mixed_precision bf16

`--model` is a CLIP (Hub id or folder holding a CLIPModel: a new MROVSeg is built around it) or an MROVSeg
checkpoint to continue from. Checkpoints (`accelerator.save_state`) go to OUTPUT_DIR/checkpoints/step_N every
`--checkpointing_steps`; `--resume_from_checkpoint latest` continues the newest one exactly. Ctrl-C or SIGTERM (a
cluster's preemption) stops the run after the step in progress with a checkpoint of it (a second Ctrl-C stops at
once). At the end the model (safetensors, remote code), its processor and results.json are written to
OUTPUT_DIR/model.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import signal
import shutil
import sys
import threading
import time
from pathlib import Path

from modeling_mrovseg import MEAN_IOU
from modeling_mrovseg.cli import check_source, is_hub_id, one_line, write_atomically

import torch

DEFAULTS = dict(lr=1e-4, weight_decay=1e-4, max_grad_norm=0.01, crop_size=640, max_steps=60000, batch_size=32)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=os.path.expanduser, required=True,
                        help="CLIP id/folder, or an MROVSeg checkpoint")
    parser.add_argument("--dataset", type=os.path.expanduser, required=True,
                        help="folder of parquet files, a DatasetDict.save_to_disk folder or a Hub dataset id")
    parser.add_argument("--class_names", default=None,
                        help="class names: a JSON list, a file (JSON list, id2label.json, class table .csv, one "
                             "per line) or comma-separated (default: from the dataset)")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--eval_split", default="validation", help='split to evaluate on ("none": no evaluation)')
    parser.add_argument("--output_dir", required=True, type=os.path.expanduser)
    parser.add_argument("--max_steps", type=int, default=DEFAULTS["max_steps"])
    parser.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"], help="global batch per step")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--weight_decay", type=float, default=DEFAULTS["weight_decay"])
    parser.add_argument("--poly_power", type=float, default=0.9)
    parser.add_argument("--max_grad_norm", type=float, default=DEFAULTS["max_grad_norm"], help="0 disables clipping")
    parser.add_argument("--crop_size", type=int, default=DEFAULTS["crop_size"])
    parser.add_argument("--eval_size", type=int, default=640, help="shortest edge at evaluation")
    # default None: an explicit "no" here overrode `accelerate launch --mixed_precision bf16` (fp32, silently)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                        help="default: accelerate's (accelerate launch --mixed_precision, or `accelerate "
                             "config`; no without them)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--compile", nargs="?", const="whole", default=None, choices=["whole", "regional"],
                        help="torch.compile the model (accelerate's inductor backend): pays off on a GPU over many "
                             "steps of one crop size; the first steps are slow while it compiles. `--compile "
                             "regional` compiles CLIP's layers (one build for all) and the decoders apart, the glue "
                             "between them eager: a third of the build on a CPU")
    parser.add_argument("--checkpointing_steps", type=int, default=1000)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None,
                        help="keep only the newest N checkpoints (default: all; one of ViT-B/16 with its optimizer "
                             "takes about 0.7 GB)")
    parser.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder or "latest"')
    parser.add_argument("--resume_with_changed_args", action="store_true",
                        help="resume although run-defining arguments (batch size, lr, seed, data ...) differ from "
                             "the checkpoint's run")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="start over in an OUTPUT_DIR that holds an earlier run (its checkpoints, model and log "
                             "are deleted); without it such a folder is refused unless resuming")
    parser.add_argument("--stop_after_steps", type=int, default=None,
                        help="stop (resumably) after this many steps, e.g. to fit a time slot")
    parser.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    parser.add_argument("--eval_max_samples", type=int, default=None)
    parser.add_argument("--metric", default=MEAN_IOU,
                        help="evaluate metric: this package's streaming mean_iou (default) or the Hub id mean_iou")
    parser.add_argument("--log_steps", type=int, default=10)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="{}", help='JSON of MROVSegConfig overrides, e.g. {"num_queries": 50}')
    parser.add_argument("--lora_rank", type=int, default=0, help="LoRA rank on CLIP attention (0: no LoRA)")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA scaling numerator (default 2 x rank)")
    parser.add_argument("--lora_targets", default="vision", choices=["vision", "text", "both"])
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "crop_size", "eval_size",
                 "checkpointing_steps", "log_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("stop_after_steps", "eval_max_samples", "checkpoints_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_steps", "lora_rank", "num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    # NaN passes every comparison: a NaN --max_grad_norm turned every gradient into NaN without a word
    for name, low, low_allowed in (("lr", 0, False), ("weight_decay", 0, True), ("poly_power", 0, True),
                                   ("max_grad_norm", 0, True), ("lora_alpha", 0, False)):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < low or (value == low and not low_allowed)):
            parser.error(f"--{name} must be a finite number {'>=' if low_allowed else '>'} {low}, got {value}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must lie in [0, 2**32 - 1], got {args.seed}")
    try:
        overrides = json.loads(args.config)
    except ValueError as error:
        parser.error(f"--config is not JSON: {error}")
    if not isinstance(overrides, dict):
        parser.error(f'--config must be a JSON object of MROVSegConfig fields, e.g. {{"num_queries": 50}}, '
                     f"got {args.config}")
    from modeling_mrovseg import MROVSegConfig

    unknown = MROVSegConfig.unknown_fields(overrides)
    if unknown:  # a config keeps any name as an attribute: a typo would have trained the default silently
        parser.error(f"--config names no MROVSegConfig field: {', '.join(unknown)}")
    args.config_overrides = overrides  # parsed once; `config` keeps the text as given
    check_source(parser, "--model", args.model, "a CLIP or MROVSeg checkpoint folder")
    check_source(parser, "--dataset", args.dataset, "a folder of parquet files or a save_to_disk folder")
    return args


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into a kernel or two per step on CUDA (torch's default there, multi-tensor `foreach`, launches
    several per parameter chunk); elsewhere torch's default, so CPU runs keep their values. The state is the same
    either way: a checkpoint resumes on the other kind of device."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if device.type == "cuda" else None)


def build_model(model: str, config_overrides: dict, class_names: list[str]):
    """(MROVSeg, tokenizer) from a CLIP (a new MROVSeg around it) or an MROVSeg checkpoint, with `class_names`."""
    from transformers import AutoConfig, AutoTokenizer

    from modeling_mrovseg import MROVSegForOpenVocabSegmentation

    config = AutoConfig.from_pretrained(model)
    if config.model_type not in ("mrovseg", "clip"):  # a SegFormer, say: "Couldn't instantiate the backend tokenizer"
        raise ValueError(f"{model} is a {config.model_type!r} checkpoint: training starts from a CLIP (a CLIPModel "
                         "folder or Hub id such as openai/clip-vit-base-patch16) or an MROVSeg checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(model)
    if config.model_type == "mrovseg":
        try:
            mrovseg = MROVSegForOpenVocabSegmentation.from_pretrained(model, **config_overrides)
        except RuntimeError as error:  # transformers' "You set `ignore_mismatched_sizes` to `False`", after its table
            if "ignore_mismatched_sizes" not in str(error):
                raise
            changed = [f"{name} {getattr(config, name, None)} -> {value}" for name, value in config_overrides.items()
                       if getattr(config, name, None) != value]
            raise ValueError(f"--config changes {'; '.join(changed)}, which changes the shapes of the checkpoint's "
                             "weights (the table above): a trained MROVSeg fine-tunes with its own architecture; to "
                             "change it, train a new one from a CLIP") from None
        mrovseg.clip_tokenizer = tokenizer
        if mrovseg.vocabulary != list(class_names):
            mrovseg.set_vocabulary(class_names)
    else:
        mrovseg = MROVSegForOpenVocabSegmentation.from_clip(model, vocabulary=class_names, tokenizer=tokenizer,
                                                            **config_overrides)
    return mrovseg, tokenizer


def read_checkpoint(path: Path) -> dict:
    """The training state of a checkpoint that can be resumed from, else a ValueError saying why not: a checkpoint is
    written before its training_state.json, and every file must be readable."""
    from safetensors import safe_open

    try:
        state = json.loads((path / "training_state.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"training_state.json is missing or unreadable ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("training_state.json holds no step")
    for weights in sorted(path.glob("*.safetensors")) or [path / "model.safetensors"]:
        try:  # opening checks the header and that the file covers every tensor it declares (truncation)
            with safe_open(str(weights), "pt"):
                pass
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{weights.name} is unreadable ({error})") from None
    return state


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of OUTPUT_DIR/checkpoints/step_N, newest first (folders set aside or named otherwise left out)."""
    found = [(p.name.split("_")[1], p) for p in (output_dir / "checkpoints").glob("step_*")]
    return sorted(((int(step), path) for step, path in found if step.isdigit()), reverse=True)


def latest_checkpoint(output_dir: Path, log=print) -> tuple[Path, dict] | None:
    """The newest complete checkpoint and its training state; incomplete or damaged newer ones are reported and
    skipped."""
    for _, path in checkpoint_steps(output_dir):
        try:
            return path, read_checkpoint(path)
        except ValueError as problem:
            log(f"checkpoint {path} cannot be resumed from: {problem}; trying the one before it")
    return None


def set_aside_later_checkpoints(output_dir: Path, step: int, log=print) -> Path | None:
    """Checkpoints past the one resumed from belong to the run before it (a resume from an explicit earlier
    checkpoint, with a lower learning rate, say), or are a killed save's: "latest" would later have picked one of them
    over this run's, and this run would have written its own into their folders file by file. They are moved, whole,
    to checkpoints/set_aside_after_step_N[_K]/, which no resume reads; nothing is deleted."""
    later = [path for number, path in checkpoint_steps(output_dir) if number > step]
    if not later:
        return None
    aside, number = output_dir / "checkpoints" / f"set_aside_after_step_{step}", 1
    while aside.exists():
        number += 1
        aside = output_dir / "checkpoints" / f"set_aside_after_step_{step}_{number}"
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    log(f"moved {len(later)} later checkpoint(s) ({', '.join(sorted(p.name for p in later))}) to {aside}: resuming "
        f"from step {step} continues from there")
    return aside


def older_checkpoints(output_dir: Path, step: int, keep: int) -> list[Path]:
    """The checkpoints to delete once step `step`'s is complete: all older than the newest `keep` complete ones up to
    it (damaged ones among them, which no resume reads). Later steps (an earlier, longer run's) are left alone."""
    steps = [(number, path) for number, path in checkpoint_steps(output_dir) if number <= step]
    kept = 0
    for index, (_, path) in enumerate(steps):
        try:
            read_checkpoint(path)
        except ValueError:
            continue
        kept += 1
        if kept == keep:
            return [older for _, older in steps[index + 1 :]]
    return []


# what makes a run the run it is: resuming with another value would not continue it (other data order, other
# schedule, other weights); the rest (evaluation, logging, workers, compile, checkpointing, accumulation) may change
RUN_ARGS = ("model", "dataset", "class_names", "train_split", "max_steps", "batch_size", "lr", "weight_decay",
            "poly_power", "max_grad_norm", "crop_size", "seed", "config", "lora_rank", "lora_alpha", "lora_targets")


def run_args(args) -> dict:
    return {name: getattr(args, name) for name in RUN_ARGS}


def changed_run_args(saved: dict, args) -> list[str]:
    """`--name saved -> now` for each run-defining argument that differs from the checkpoint's run (local paths
    compared as resolved, so `data` and `./data` are one dataset; `--config` as JSON, not as spelled)."""
    def same(name: str, before, now) -> bool:
        if name == "config":
            return json.loads(before) == json.loads(now)
        if isinstance(before, str) and isinstance(now, str) and Path(before).exists() and Path(now).exists():
            return Path(before).resolve() == Path(now).resolve()
        return before == now

    now = run_args(args)
    return [f"--{name} {saved[name]} -> {now[name]}" for name in RUN_ARGS
            if name in saved and not same(name, saved[name], now[name])]


def check_same_rows(resume: tuple[Path, dict], rows: int, args, log=print) -> None:
    """The training split must hold as many rows as when the checkpoint was written: the data order is drawn over
    its rows, so a dataset converted again with more images (same folder, same arguments) did not continue the run
    but silently trained on another order. Refused unless `--resume_with_changed_args`."""
    path, state = resume
    before = state.get("train_rows")  # checkpoints of earlier versions did not record it
    if before is None or before == rows:
        return
    change = (f"the {args.train_split} split of --dataset {args.dataset} holds {rows} rows, {before} when {path} was "
              "written")
    if not args.resume_with_changed_args:
        raise SystemExit(f"error: {change}: resuming would not continue that run (the data order is drawn over the "
                         "rows). Restore that data, start over with --overwrite_output_dir, or pass "
                         "--resume_with_changed_args to continue on this data.")
    log(f"resuming with changed data: {change}")


def enable_activation_checkpointing(model) -> None:
    """CLIP's layers recompute their activations in the backward pass: `activation_checkpointing_enable`, as
    transformers 5.23 names it (its old name now warns), or `gradient_checkpointing_enable` before that (5.21-5.22)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def dynamo_plugin(compile: str | None):
    """`--compile` as accelerate's plugin (None leaves it to `accelerate launch` and `accelerate config`). Regional:
    the model compiles its own regions (`compile_regions`, before `prepare`) and accelerate compiles nothing more;
    accelerate's own regional compilation compiles every leaf module apart (dozens of builds of `nn.Linear` alone,
    past torch's recompile limit)."""
    from accelerate.utils import TorchDynamoPlugin

    if compile is None:
        return None
    return TorchDynamoPlugin(backend="no" if compile == "regional" else "inductor", use_regional_compilation=False)


def checkpoint_to_resume(output_dir: Path, args, log=print) -> tuple[Path, dict] | None:
    """The checkpoint `--resume_from_checkpoint` names and its training state, checked before anything loads:
    complete, and written by a run with the same run-defining arguments (`RUN_ARGS`) unless
    `--resume_with_changed_args`."""
    resume = args.resume_from_checkpoint
    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(output_dir, log)  # the newest one read_checkpoint passes
        if found is None:
            log("no checkpoint to resume from: starting from scratch")
            return None
        path, state = found
    else:
        path = Path(resume)
        try:
            state = read_checkpoint(path)
        except ValueError as problem:
            raise SystemExit(f"error: cannot resume from {path}: {problem}") from None
    changed = changed_run_args(state.get("run_args", {}), args)
    if changed and not args.resume_with_changed_args:
        raise SystemExit(f"error: {path} was written by a run with other arguments ({'; '.join(changed)}): resuming "
                         "would not continue it. Give that run's arguments, start over with --overwrite_output_dir, "
                         "or pass --resume_with_changed_args to continue with the new ones.")
    if changed:
        log(f"resuming {path} with changed arguments: {'; '.join(changed)}")
    return path, state


def read_log(path: Path) -> list[dict]:
    """The records of a run's log.jsonl (losses, and evaluations as `{"step", "evaluation"}`); a line a killed run
    left half-written is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def append_log(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def earlier_run(output_dir: Path, args) -> list[str]:
    """What an earlier run left in `output_dir` that this one would replace: a new run is refused there (like
    transformers' Trainer) unless it resumes or `--overwrite_output_dir` asks to start over."""
    if args.resume_from_checkpoint:
        return []
    earlier = [name for name in ("checkpoints", "model", "adapter", "log.jsonl") if (output_dir / name).exists()]
    source = Path(args.model).expanduser()
    inside = [name for name in earlier if source.exists() and source.resolve().is_relative_to(
        (output_dir / name).resolve())]
    if inside:  # fine-tuning runs/a/model into runs/a: starting over would delete the model it starts from
        raise SystemExit(f"error: --model {args.model} is part of the earlier run in {output_dir} ({inside[0]}), "
                         "which a new run there replaces: give another --output_dir")
    if earlier and not args.overwrite_output_dir:
        raise SystemExit(f"error: {output_dir} holds an earlier run ({', '.join(earlier)}). Continue it with "
                         "--resume_from_checkpoint latest, start over with --overwrite_output_dir, or choose "
                         "another --output_dir.")
    return earlier


# the lock file each output folder of this process holds open (a run that ended in an exception leaves its handle to
# be replaced by the next run here, not kept alive by a traceback)
_RUN_LOCKS: dict[Path, object] = {}


def lock_output_dir(output_dir: Path) -> None:
    """An advisory lock on `output_dir` for as long as this process runs in it: a second run into the same folder (a
    job re-queued while the first still runs, the command started twice) would write its checkpoints and log among the
    first one's. The operating system releases it when the process ends, however it ends. Where the file system has no
    locks (Windows, some network mounts) the run goes on unguarded."""
    try:
        import fcntl
    except ImportError:
        return
    key = output_dir.resolve()
    earlier = _RUN_LOCKS.pop(key, None)
    if earlier is not None:
        earlier.close()
    handle = open(output_dir / ".run.lock", "a+")
    try:  # a POSIX lock: held by this process alone (DataLoader workers forked from it do not inherit it)
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, 0, 0, os.SEEK_SET)
    except OSError as error:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        if error.errno not in (errno.EACCES, errno.EAGAIN):  # no locks on this file system
            return
        who = f" (process {owner})" if owner else ""
        raise SystemExit(f"error: {output_dir} is in use by another training run{who}: wait for it to end (or stop "
                         "it), then continue with --resume_from_checkpoint latest") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _RUN_LOCKS[key] = handle


def unlock_output_dir(output_dir: Path) -> None:
    handle = _RUN_LOCKS.pop(output_dir.resolve(), None)
    if handle is not None:
        handle.close()


def prepare_output_dir(output_dir: Path, args) -> None:
    """Delete the earlier run `--overwrite_output_dir` replaces; called once the dataset and model have loaded, so a
    mistyped argument never costs the earlier run."""
    for name in earlier_run(output_dir, args):
        target = output_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import send_to_device, set_seed
    from tqdm.auto import tqdm

    import evaluate

    from modeling_mrovseg import MROVSegImageProcessor
    from training.data import (SegmentationAugment, StepBatches, TrainingRowError, load_segmentation_dataset, loading,
                               shard_indices)
    from training.evaluation import evaluate_segmentation, format_miou

    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, dynamo_plugin=dynamo_plugin(args.compile))
    set_seed(args.seed)
    args.mixed_precision = accelerator.mixed_precision  # the launcher's or the flag's: results.json says which
    world = accelerator.num_processes
    if args.batch_size % (args.gradient_accumulation_steps * world):  # before anything loads or is deleted
        raise SystemExit(f"error: --batch_size {args.batch_size} must be divisible by --gradient_accumulation_steps x "
                         f"processes = {args.gradient_accumulation_steps} x {world}")
    output_dir = Path(args.output_dir)
    earlier_run(output_dir, args)  # refused before anything loads
    if accelerator.is_main_process and output_dir.is_dir():  # before its checkpoints are read
        lock_output_dir(output_dir)
    resume = checkpoint_to_resume(output_dir, args, accelerator.print)
    with loading("--dataset", args.dataset):
        train_set, class_names = load_segmentation_dataset(args.dataset, args.train_split, args.class_names)
    if resume is not None:
        check_same_rows(resume, len(train_set), args, accelerator.print)
    # loaded now: a missing split (or metric) found after training would leave the run without its model
    eval_set = metric = None
    if args.eval_split != "none":
        try:
            eval_set, _ = load_segmentation_dataset(args.dataset, args.eval_split, class_names)
        except (OSError, ValueError) as error:
            raise SystemExit(f"error: cannot load --eval_split {args.eval_split} of {args.dataset}: "
                             f"{one_line(error).rstrip('.')}. Name another split (--eval_split train) or train "
                             "without evaluation (--eval_split none).") from None
        with loading("--metric", args.metric):  # not after the last step
            metric = evaluate.load(args.metric)
    with loading("--model", args.model):
        model, tokenizer = build_model(args.model, args.config_overrides, class_names)
    started_from = "mrovseg" if getattr(model, "_checkpoint_source", None) else "clip"  # for the card's wording
    saved_as = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.dtype != torch.float32})
    if saved_as:  # a checkpoint saved in bfloat16: AdamW on bf16 weights rounds lr-sized updates away, silently
        accelerator.print(f"note: {args.model} holds {saved_as[0]} weights; they train as float32 "
                          "(--mixed_precision bf16 computes in bfloat16)")
        model.float()
    if accelerator.is_main_process:
        prepare_output_dir(output_dir, args)
        if output_dir.resolve() not in _RUN_LOCKS:  # a new folder
            lock_output_dir(output_dir)
    accelerator.wait_for_everyone()
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    config = model.config
    if args.lora_rank:
        from training.lora import apply_lora

        model = apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
    if accelerator.is_main_process:
        model.print_trainable_parameters()
    train_processor = MROVSegImageProcessor.from_model_config(config)
    eval_processor = MROVSegImageProcessor.from_model_config(
        config, size=MROVSegImageProcessor.size_for_resolution(args.eval_size))

    per_step = args.batch_size // args.gradient_accumulation_steps
    augment = SegmentationAugment(crop_size=args.crop_size, ignore_index=config.ignore_index)  # pads as unlabelled
    batches = StepBatches(train_set, train_processor, augment, args.seed, global_batch=per_step,
                          rank=accelerator.process_index, world_size=world, num_classes=len(class_names))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, args.lr, args.weight_decay, accelerator.device)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / args.max_steps) ** args.poly_power)
    if args.compile == "regional":
        model.compile_regions()
    model, optimizer = accelerator.prepare(model, optimizer)
    # Stepped here once per optimizer step (accelerate's wrapper would step it once per process). Its state goes into
    # training_state.json, not register_for_checkpointing: accelerate unpickles those with weights_only=False, so a
    # replaced checkpoint file could run code on resume.

    start_step = 0
    if resume is not None:
        resume_path, state = resume
        accelerator.load_state(str(resume_path))
        start_step = state["step"]
        if "lr_schedule" in state:
            schedule.load_state_dict(state["lr_schedule"])
        else:  # checkpoints of earlier versions: the schedule is a function of the step
            schedule.last_epoch = start_step
            schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
        accelerator.print(f"resumed from {resume_path} at step {start_step}")

    stop_step = min(args.max_steps, args.stop_after_steps or args.max_steps)
    accum = args.gradient_accumulation_steps
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(batches, range(start_step * accum, stop_step * accum)), batch_size=None,
        num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=ignore_interrupts if args.num_workers else None)
    log_path = output_dir / "log.jsonl"
    if accelerator.is_main_process and resume is not None:
        # the log continues from the checkpoint: what a killed run logged after it is done again (and a line it left
        # half-written would swallow the next record)
        write_atomically(log_path, "".join(json.dumps(r) + "\n" for r in read_log(log_path) if r["step"] <= start_step))
        set_aside_later_checkpoints(output_dir, start_step, accelerator.print)
    accelerator.wait_for_everyone()
    history = []

    def run_evaluation(step: int) -> dict:
        count = len(eval_set) if args.eval_max_samples is None else min(len(eval_set), args.eval_max_samples)
        # eager: evaluation images differ in size, each new size would recompile
        shard = shard_indices(count, accelerator.process_index, world)
        result = evaluate_segmentation(accelerator.unwrap_model(model, keep_torch_compile=False), eval_processor,
                                       eval_set, class_names, metric, shard,
                                       show_progress=accelerator.is_main_process and not args.no_progress)
        result.update(step=step, num_images=count)
        accelerator.print(f"step {step}: mIoU {format_miou(result['mean_iou'])}")
        return result

    progress = tqdm(total=stop_step, initial=start_step, desc="training",
                    disable=not accelerator.is_main_process or args.no_progress)
    model.train()
    step, running, started = start_step, [], time.time()
    evaluations = []
    # whether every loss so far was finite, kept on the device (no host sync per step) and read before a record or a
    # checkpoint: a diverged run (NaN weights) went on to save NaN checkpoints and a NaN model, and scored it
    finite = torch.ones((), dtype=torch.bool, device=accelerator.device)
    saved_at = resume[0] if resume is not None else None

    def stop_if_diverged() -> None:
        if bool(accelerator.gather(finite[None]).all()):
            return
        since = f"the last checkpoint, {saved_at}, was written before that" if saved_at else "no checkpoint was written"
        raise SystemExit(f"error: the training loss became NaN or infinite by step {step}: the weights diverged; "
                         f"{since}. Lower --lr (now {args.lr:g}) or clip gradients (--max_grad_norm, now "
                         f"{args.max_grad_norm:g}), then start over (--overwrite_output_dir) or continue from the last "
                         "checkpoint with --resume_from_checkpoint latest --resume_with_changed_args.")

    def loader_batches():
        """The loader's batches; a training row that cannot be read ends the run with one line naming it."""
        try:
            yield from loader
        except TrainingRowError as error:  # from a worker its message holds the worker's traceback: the last line
            reason = ([one_line(error)] + re.findall(r"training row \d+: [^\n]*", str(error)))[-1]
            raise SystemExit(f"error: {reason} (in {args.dataset}); training stopped before step {step + 1}. Fix or "
                             "remove that row, then continue with --resume_from_checkpoint latest.") from None

    def save_checkpoint() -> None:
        nonlocal finite, saved_at
        # a step whose loss was finite can still have written NaN weights (an infinite gradient)
        finite &= torch.stack([torch.isfinite(p).all() for p in params]).all()
        stop_if_diverged()
        path = output_dir / "checkpoints" / f"step_{step}"
        try:
            accelerator.save_state(str(path))
            if accelerator.is_main_process:
                # plain values (the schedule's lambda is None), and the run's arguments for a resume to check
                state = {"step": step, "lr_schedule": schedule.state_dict(), "run_args": run_args(args),
                         "train_rows": len(train_set)}
                write_atomically(path / "training_state.json", json.dumps(state))  # last: a complete checkpoint
        except OSError as error:  # a full disk: safetensors' or torch's traceback said nothing of what to do
            if world == 1:
                shutil.rmtree(path, ignore_errors=True)  # incomplete: a resume would skip it anyway
            raise SystemExit(f"error: cannot write the checkpoint of step {step} ({error.strerror or error}); the "
                             f"last one is {saved_at or 'none (the run starts over)'}. Make room "
                             "(--checkpoints_total_limit N keeps only the newest N) and continue with the same "
                             "command and --resume_from_checkpoint latest") from None
        saved_at = path
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and args.checkpoints_total_limit:
            for old in older_checkpoints(output_dir, step, args.checkpoints_total_limit):
                shutil.rmtree(old)

    def stop_requested() -> bool:
        """Whether a signal asks every process to stop after this step. One process reads its own flag; several
        agree at logging steps (where they gather anyway): one stopping alone would leave the others waiting."""
        if world == 1:
            return interrupt.signum is not None
        if step % args.log_steps and step != stop_step:
            return False
        # the handler may run at any bytecode, the gather's return included: its flag is read here, never overwritten
        agreed = int(accelerator.gather(torch.tensor([interrupt.signum or 0], device=accelerator.device)).max())
        if agreed and interrupt.signum is None:  # another process's signal: this one stops for it too
            interrupt.signum = agreed
        return agreed != 0

    interrupt = Interrupt(accelerator.is_main_process)
    with interrupt.installed():
        for micro, batch in enumerate(loader_batches()):
            # StepBatches shards by itself (exact resume, N processes == 1), so the loader is not `prepare`d and its
            # CPU batches are moved here, to this process's device.
            batch = send_to_device(batch, accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    schedule.step()
                optimizer.zero_grad()
            running.append(loss.detach().float())
            finite &= torch.isfinite(running[-1])
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % args.log_steps == 0 or step == stop_step:
                stop_if_diverged()
                mean_loss = accelerator.gather(torch.stack(running).mean()[None]).mean().item()
                running = []
                record = {"step": step, "loss": mean_loss, "lr": schedule.get_last_lr()[0],
                          "seconds": round(time.time() - started, 1)}
                history.append(record)
                progress.set_postfix(loss=f"{mean_loss:.3f}")
                if accelerator.is_main_process:
                    append_log(log_path, record)
            if step % args.checkpointing_steps == 0 or step == stop_step:
                save_checkpoint()
            if step < stop_step and stop_requested():
                if step % args.checkpointing_steps:  # not saved just above
                    save_checkpoint()
                break
            if eval_set is not None and args.eval_steps and step % args.eval_steps == 0 and step < args.max_steps:
                try:
                    evaluations.append(run_evaluation(step))
                except (OSError, ValueError) as error:  # a bad evaluation image stops the evaluation, not the training
                    accelerator.print(f"step {step}: evaluation failed: {one_line(error).rstrip('.')}; training "
                                      "goes on")
                    evaluations.append({"step": step, "error": str(error)})
                if accelerator.is_main_process:  # logged: a resumed run's results hold the evaluations before it too
                    append_log(log_path, {"step": step, "evaluation": evaluations[-1]})
    progress.close()

    if accelerator.is_main_process:  # the whole run's, across interruptions (this process saw the steps since resuming)
        logged = read_log(log_path)
        history = [record for record in logged if "loss" in record]
        evaluations = [record["evaluation"] for record in logged if "evaluation" in record]
    results = {"history": history, "evaluations": evaluations, "stopped_at": step, "max_steps": args.max_steps}
    if step >= args.max_steps:
        final = None
        if eval_set is not None:
            try:
                final = run_evaluation(step)
                evaluations.append(final)
            except (OSError, ValueError) as error:  # an unreadable evaluation image: the model is saved all the same
                accelerator.print(f"final evaluation failed: {one_line(error).rstrip('.')}; saving the model "
                                  "without it")
                results["final_evaluation_error"] = str(error)
        # which sources were Hub ids here: a relative local folder ("data/mine") reads like one where the card is built
        results.update(final_evaluation=final, dataset=args.dataset, eval_split=args.eval_split,
                       class_names=class_names, args=vars(args),
                       hub_ids=[name for name in ("model", "dataset") if is_hub_id(getattr(args, name))],
                       started_from=started_from)
        if accelerator.is_main_process:
            model_dir = output_dir / "model"
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            if args.lora_rank:  # the adapter (LoRA + trained decoder), then the merged plain checkpoint
                from modeling_mrovseg.modeling_mrovseg import ADAPTER_RECIPE
                from training.lora import merge_lora

                unwrapped.save_pretrained(output_dir / "adapter")
                # a local base by its absolute path: merge_lora may run from another folder
                local = Path(args.model).expanduser()
                base = str(local.resolve()) if local.exists() else args.model
                write_atomically(output_dir / "adapter" / ADAPTER_RECIPE, json.dumps(
                    {"model": base, "config": args.config_overrides, "class_names": class_names}, indent=2))
                unwrapped = merge_lora(unwrapped)
            unwrapped.save_pretrained(model_dir, image_processor=eval_processor, tokenizer=tokenizer)
            write_atomically(model_dir / "results.json", json.dumps(results, indent=2))
            accelerator.print(f"saved {model_dir}")
    else:
        why = f"{signal.Signals(interrupt.signum).name}: " if interrupt.signum is not None else ""
        accelerator.print(f"{why}stopped at step {step} of {args.max_steps} with a checkpoint ({saved_at}); continue "
                          "with the same command and --resume_from_checkpoint latest")
        if interrupt.signum is not None:
            results["interrupted_by"] = interrupt.signum
    accelerator.wait_for_everyone()
    # the DDP wrapper goes before the process group: its Reducer would otherwise free the group last, in a destructor
    # that keeps the GIL while it joins gloo's worker threads, one of which may need the GIL to free the tensors of
    # the last collective (a hang at exit in 1 of 4 two-process CPU runs on a loaded machine; PyTorch's own process
    # group objects, freed by end_training, release the GIL there)
    model, optimizer = accelerator.free_memory(model, optimizer)
    accelerator.end_training()
    unlock_output_dir(output_dir)
    return results


class Interrupt:
    """Ctrl-C (SIGINT) and SIGTERM (a cluster's preemption, `kill`) during the training loop: the first asks for a
    stop after the step in progress, with a checkpoint (it lost up to --checkpointing_steps of work, with a
    traceback); a second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread nothing is installed."""

    # a launcher (accelerate launch, torchrun) forwards the terminal's Ctrl-C to ranks that the terminal already sent it
    # to: a second SIGINT this soon after the first is that copy, not a second press
    REPEAT_SECONDS = 2.0

    def __init__(self, talk: bool):
        self.signum: int | None = None
        self.talk = talk
        self.first = 0.0

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and time.monotonic() - self.first > self.REPEAT_SECONDS:
                raise KeyboardInterrupt
            return
        self.signum, self.first = signum, time.monotonic()
        if self.talk:
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again to stop "
                  "at once, without one)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self):
        """The handlers for the block, the previous ones restored after it."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {number: signal.signal(number, self._on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


def ignore_interrupts(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C and SIGTERM (a terminal and a cluster send them to every process of the job) to
    the training process, which stops after the step in progress and needs the worker's batches until then (a
    worker killed by them failed the step). It still ends with the training process, as PyTorch's workers do."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    finished = main()
    if finished.get("interrupted_by"):
        sys.exit(128 + finished["interrupted_by"])
