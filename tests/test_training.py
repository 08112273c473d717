"""accelerate training: the loss falls, resuming is exact, two CPU processes equal one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_mrovseg import MROVSegForOpenVocabSegmentation
from processing.synthetic import write_parquet
from training import train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_queries": 8, "hidden_dim": 32, "num_decoder_heads": 4, "decoder_ffn_dim": 64, "train_num_points": 512,
        "prompt_templates": ["a photo of a {}."]}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator (mixed precision is fixed per state)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_parquet(tmp_path_factory.mktemp("synthetic"), num_train=8, num_val=2, height=256, width=256)


def args(clip, data, out, **extra):
    values = {"--model": str(clip), "--dataset": str(data), "--output_dir": str(out), "--batch_size": "2",
              "--crop_size": "128", "--eval_size": "128", "--config": json.dumps(TINY), "--no_progress": None,
              "--log_steps": "1", "--lr": "1e-3", "--max_grad_norm": "1.0"}
    values.update({f"--{k}": (None if v is None else str(v)) for k, v in extra.items()})
    return [item for key, value in values.items() for item in ([key] if value is None else [key, value])]


def weights(out, step):
    return load_file(str(Path(out) / "checkpoints" / f"step_{step}" / "model.safetensors"))


def test_training_loss_falls_and_saves_everything(tiny_clip_dir, synthetic, tmp_path):
    results = train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=40, checkpointing_steps=20, lr="3e-3"))
    losses = [record["loss"] for record in results["history"]]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # about 35 -> 24 in 40 steps
    model_dir = tmp_path / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    saved = json.loads((model_dir / "results.json").read_text())
    assert 0.0 <= saved["final_evaluation"]["mean_iou"] <= 1.0
    assert set(saved["final_evaluation"]["per_class_iou"]) == {"grass", "road", "building", "car", "sign"}
    assert saved["hub_ids"] == []  # local CLIP and data: the card names no Hub base model or dataset
    from modeling_mrovseg import MROVSegForOpenVocabSegmentation

    model = MROVSegForOpenVocabSegmentation.from_pretrained(model_dir)
    assert model.config.id2label[3] == "car"


def test_resume_gives_exactly_the_uninterrupted_weights(tiny_clip_dir, synthetic, tmp_path, monkeypatch):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train.main(args(tiny_clip_dir, synthetic, straight, max_steps=6, checkpointing_steps=3, eval_steps=2))
    train.main(args(tiny_clip_dir, synthetic, interrupted, max_steps=6, checkpointing_steps=3, stop_after_steps=3,
                    eval_steps=2))
    # killed after step 3's checkpoint, mid-way through writing step 4's line: the resume logs from its checkpoint
    with (interrupted / "log.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 1.0, "lr": 0.001}\n{"step": 5, "lo')
    assert not (interrupted / "checkpoints" / "step_6").exists()
    # another batch size, seed or learning rate would not continue the run: refused before anything loads
    with pytest.raises(SystemExit, match=r"other arguments \(--batch_size 2 -> 4; --seed 0 -> 1\)"):
        train.main(args(tiny_clip_dir, synthetic, interrupted, max_steps=6, checkpointing_steps=3, batch_size=4,
                        seed=1, resume_from_checkpoint="latest"))
    monkeypatch.chdir(synthetic.parent)  # the dataset by another spelling of its path is the same dataset
    train.main(args(tiny_clip_dir, Path(".") / synthetic.name, interrupted, max_steps=6, checkpointing_steps=3,
                    eval_steps=2, resume_from_checkpoint="latest",
                    config=json.dumps(TINY, indent=1)))  # and --config spaced out
    a, b = weights(straight, 6), weights(interrupted, 6)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the same record of the run: every step's loss and every periodic evaluation, also those before the stop
    # (results.json held only the steps and evaluations since the resume)
    def record(folder):
        saved = json.loads((folder / "model" / "results.json").read_text())
        return ([(r["step"], r["loss"]) for r in saved["history"]],
                [(r["step"], r["mean_iou"]) for r in saved["evaluations"]])

    assert record(interrupted) == record(straight)
    assert [step for step, _ in record(straight)[0]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in record(straight)[1]] == [2, 4, 6]
    assert not all(torch.equal(a[k], weights(straight, 3)[k]) for k in a)  # training did move the weights
    saved = json.loads((interrupted / "checkpoints" / "step_6" / "training_state.json").read_text())["run_args"]
    assert saved["batch_size"] == 2 and saved["seed"] == 0 and saved["max_steps"] == 6
    results = train.main(args(tiny_clip_dir, synthetic, interrupted, max_steps=8, checkpointing_steps=3,
                              resume_from_checkpoint="latest", resume_with_changed_args=None))
    assert results["stopped_at"] == 8  # continued on request, with the new schedule


def test_fine_tuning_a_checkpoint_keeps_clip_frozen(tiny_clip_dir, synthetic, tmp_path, capsys):
    """Fine-tuning a trained MROVSeg (the README's recipe starts from one) trained every CLIP weight, text tower
    included: from_pretrained had made them all trainable. CLIP stays as it was but for its position embeddings;
    weights saved in bfloat16 train as float32."""
    train.main(args(tiny_clip_dir, synthetic, tmp_path / "first", max_steps=1, eval_split="none"))
    start = tmp_path / "first" / "model"
    train.main(args(start, synthetic, tmp_path / "second", max_steps=2, eval_split="none", lr="1e-2"))
    before = load_file(str(start / "model.safetensors"))
    after = load_file(str(tmp_path / "second" / "model" / "model.safetensors"))
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(not name.startswith(("text_model.", "text_projection.", "visual_projection.", "logit_scale"))
                         for name in moved), sorted(moved)[:5]
    clip_moved = {name for name in moved if name.startswith("mrovseg.vision_model.")}
    assert clip_moved <= {"mrovseg.vision_model.embeddings.position_embedding.weight"}, sorted(clip_moved)[:5]
    # and the card says which it started from (it said "Trained from a local `model` CLIP")
    from hub_cards.card import build_card, checkpoint_results

    def card(folder):
        return " ".join(str(build_card(folder, checkpoint_results(folder, None), "acme/x")).split())

    assert f"Trained from a local `{tiny_clip_dir.name}` CLIP on" in card(start)
    assert "Fine-tuned from a local `model` MROVSeg on" in card(tmp_path / "second" / "model")

    # a checkpoint saved in bfloat16 (transformers 5 loads the saved dtype): trained in bf16, AdamW rounded small
    # updates away; it trains as float32, and says so
    from modeling_mrovseg import MROVSegForOpenVocabSegmentation

    MROVSegForOpenVocabSegmentation.from_pretrained(start, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    train.main(args(tmp_path / "bf16", synthetic, tmp_path / "third", max_steps=1, eval_split="none"))
    saved = load_file(str(tmp_path / "third" / "model" / "model.safetensors"))
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    assert "holds bfloat16 weights; they train as float32" in capsys.readouterr().out


def test_a_diverged_run_stops_before_saving_nan_weights(tiny_clip_dir, synthetic, tmp_path):
    """lr 100 without clipping: the loss went NaN, and the run saved NaN checkpoints and a NaN model, then scored it
    (argmax of NaN logits, a plausible-looking mIoU). It stops at the first record or checkpoint after, naming the
    last good checkpoint."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"the training loss became NaN or infinite by step \d+: the weights "
                                         r"diverged; the last checkpoint, .*step_\d+, was written before that\. Lower "
                                         r"--lr \(now 100\) or clip gradients"):
        train.main(args(tiny_clip_dir, synthetic, out, max_steps=40, checkpointing_steps=1, lr="100",
                        max_grad_norm="0", eval_split="none"))
    saved = sorted(out.glob("checkpoints/step_*"))
    assert saved and not (out / "model").exists()
    for checkpoint in saved:
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), checkpoint.name


def test_resume_refuses_a_dataset_with_other_rows(tiny_clip_dir, tmp_path, capsys):
    """The same --dataset folder converted again with more images: a resume drew another data order over the new
    rows and went on as if it continued the run. Refused, naming both counts; continued on request."""
    data = write_parquet(tmp_path / "data", num_train=4, num_val=1, height=64, width=64)
    run = tmp_path / "run"
    train.main(args(tiny_clip_dir, data, run, max_steps=2, checkpointing_steps=1, stop_after_steps=1,
                    eval_split="none"))
    assert json.loads((run / "checkpoints" / "step_1" / "training_state.json").read_text())["train_rows"] == 4
    import shutil

    shutil.rmtree(data)
    write_parquet(data, num_train=6, num_val=1, height=64, width=64)
    again = args(tiny_clip_dir, data, run, max_steps=2, checkpointing_steps=1, eval_split="none",
                 resume_from_checkpoint="latest")
    with pytest.raises(SystemExit, match=r"the train split of --dataset .* holds 6 rows, 4 when .*step_1 was written: "
                                         r"resuming would not continue that run"):
        train.main(again)
    results = train.main([*again, "--resume_with_changed_args"])
    assert results["stopped_at"] == 2 and "resuming with changed data" in capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_folder_in_use_by_another_run_is_refused(tiny_clip_dir, synthetic, tmp_path):
    """A job re-queued while the first still runs (or the command started twice): both wrote checkpoints and log lines
    into one folder. The second is refused, naming the first's process; once the first ends, it resumes."""
    pytest.importorskip("fcntl")

    train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=4, checkpointing_steps=2, stop_after_steps=2))
    holder = subprocess.Popen(  # another run, holding the folder's lock as training.train does
        [sys.executable, "-c", "import fcntl, os, sys, time\nf = open(sys.argv[1], 'a+')\n"
         "fcntl.lockf(f, fcntl.LOCK_EX, 0, 0, os.SEEK_SET)\nf.seek(0)\nf.truncate()\nf.write('4242')\nf.flush()\n"
         "print('locked', flush=True)\ntime.sleep(120)", str(tmp_path / ".run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=r"is in use by another training run \(process 4242\)"):
            train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=4, checkpointing_steps=2,
                            resume_from_checkpoint="latest"))
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_2"]
    finally:
        holder.kill()  # the other run ended
        holder.wait()
    results = train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=4, checkpointing_steps=2,
                              resume_from_checkpoint="latest"))
    assert results["stopped_at"] == 4


def test_two_cpu_processes_equal_one(tiny_clip_dir, synthetic, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = dict(max_steps=3, checkpointing_steps=3, gradient_accumulation_steps=1)
    train.main(args(tiny_clip_dir, synthetic, one, **common))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "training.train",
               *args(tiny_clip_dir, synthetic, two, **common)]
    # a session of its own: on a timeout the launcher and both ranks go (killing the launcher alone left the ranks
    # running). The hang this guards against was at exit: the DDP wrapper's Reducer freed the gloo process group
    # while keeping the GIL, and a gloo worker waited for the GIL (training.train now frees the wrapper first)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"2-process run timed out after 600 s; stdout tail:\n{stdout[-2000:]}\n"
                    f"stderr tail:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    assert "step 3" in stdout
    a, b = weights(one, 3), weights(two, 3)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)


def test_bf16_mixed_precision_and_accumulation_run(tiny_clip_dir, synthetic, tmp_path):
    results = train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=2, checkpointing_steps=2,
                              mixed_precision="bf16", gradient_accumulation_steps=2, gradient_checkpointing=None))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in results["history"])


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_regional_compile_trains_as_eager_does_and_resumes_without_it(tiny_clip_dir, synthetic, tmp_path, monkeypatch,
                                                                      lora_rank):
    """`--compile regional` compiles the model's regions in place: its steps equal eager ones (within float
    rounding), its checkpoints hold the same parameter names, so a run resumes without it (LoRA too)."""
    compile_regions, compiled = MROVSegForOpenVocabSegmentation.compile_regions, []

    def without_inductor(self, **kwargs):  # the same graphs, without minutes of inductor's C++ builds on a CPU
        compile_regions(self, backend="aot_eager")
        compiled.append(self.mrovseg.vision_model.encoder.layers[0]._compiled_call_impl is not None)

    monkeypatch.setattr(MROVSegForOpenVocabSegmentation, "compile_regions", without_inductor)
    common = dict(max_steps=4, checkpointing_steps=2, eval_split="none", lora_rank=lora_rank)
    train.main(args(tiny_clip_dir, synthetic, tmp_path / "eager", stop_after_steps=2, **common))
    train.main(args(tiny_clip_dir, synthetic, tmp_path / "regional", stop_after_steps=2, compile="regional", **common))
    assert compiled == [True]
    eager, regional = weights(tmp_path / "eager", 2), weights(tmp_path / "regional", 2)
    assert sorted(regional) == sorted(eager)
    for name, value in eager.items():
        torch.testing.assert_close(regional[name], value, rtol=1e-4, atol=1e-6)
    results = train.main(args(tiny_clip_dir, synthetic, tmp_path / "regional", resume_from_checkpoint="latest",
                              **common))
    assert results["stopped_at"] == 4 and compiled == [True]
    torch._dynamo.reset()


class _StopAfterFirstForward(Exception):
    pass


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_every_batch_tensor_reaches_the_accelerator_device(tiny_clip_dir, synthetic, tmp_path, monkeypatch, lora_rank):
    """On a GPU the loader's CPU batches must be moved to the device; here the accelerator's device is made `meta`
    (the model is moved there by `prepare`), and a pre-hook records where every input of the first forward lives."""
    from accelerate import Accelerator

    from modeling_mrovseg import MROVSegForOpenVocabSegmentation

    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    seen = {}

    def record(module, args_, kwargs):
        seen.update({name: value.device for name, value in kwargs.items() if isinstance(value, torch.Tensor)})
        seen.update({f"arg{i}": value.device for i, value in enumerate(args_) if isinstance(value, torch.Tensor)})
        seen["model"] = next(module.parameters()).device
        raise _StopAfterFirstForward

    original_init = MROVSegForOpenVocabSegmentation.__init__

    def init_with_hook(self, config):
        original_init(self, config)
        self.register_forward_pre_hook(record, with_kwargs=True)

    monkeypatch.setattr(MROVSegForOpenVocabSegmentation, "__init__", init_with_hook)
    with pytest.raises(_StopAfterFirstForward):
        train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=2, lora_rank=lora_rank))
    assert {"pixel_values", "pixel_values_slices", "labels", "loss_seeds", "model"} <= set(seen)
    assert set(seen.values()) == {torch.device("meta")}, seen


def test_adamw_is_fused_on_cuda_with_the_same_steps_and_state():
    """training.train fuses AdamW on CUDA (fewer kernels per step) and keeps torch's default elsewhere; both take the
    same step, and a checkpoint's optimizer state moves between them (here the fused kernel runs on the CPU)."""
    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]

    fused_params, plain_params = params(), params()
    fused = train.adamw(fused_params, 1e-2, 1e-2, torch.device("cuda"))
    plain = train.adamw(plain_params, 1e-2, 1e-2, torch.device("cpu"))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for step in range(3):
        for group, optimizer in ((fused_params, fused), (plain_params, plain)):
            for p in group:
                p.grad = torch.sin(p.detach() * (step + 1))
            optimizer.step()
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    plain.load_state_dict(fused.state_dict())
    assert plain.state_dict()["state"][0]["step"] == 3

def test_used_output_dir_refused_damaged_checkpoints_skipped_nothing_unpickled(tiny_clip_dir, synthetic, tmp_path,
                                                                               capsys):
    train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=4, checkpointing_steps=2))
    assert not list(tmp_path.rglob("custom_checkpoint_*"))  # nothing that resume would unpickle with weights_only=False
    state = json.loads((tmp_path / "checkpoints" / "step_4" / "training_state.json").read_text())
    assert state["step"] == 4 and state["lr_schedule"]["last_epoch"] == 4  # the schedule lives in JSON
    with pytest.raises(SystemExit, match="holds an earlier run"):  # a finished run is not overwritten silently
        train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=4))
    # fine-tuning its model into the same folder: --overwrite_output_dir deleted the model it started from
    for overwrite in ({}, {"overwrite_output_dir": None}):
        with pytest.raises(SystemExit, match=r"--model .*model is part of the earlier run in .* \(model\), which a "
                                             r"new run there replaces: give another --output_dir"):
            train.main(args(tmp_path / "model", synthetic, tmp_path, max_steps=4, **overwrite))
    assert (tmp_path / "model" / "model.safetensors").is_file()

    # a damaged newest checkpoint is named and skipped; an explicit damaged one is an error naming it
    (tmp_path / "checkpoints" / "step_4" / "model.safetensors").write_bytes(b"\x00" * 5)
    path, state = train.latest_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step_2" and state["step"] == 2
    assert "step_4 cannot be resumed from: model.safetensors" in capsys.readouterr().out
    (tmp_path / "checkpoints" / "step_2" / "training_state.json").write_text("")
    assert train.latest_checkpoint(tmp_path) is None
    with pytest.raises(SystemExit, match="cannot resume from .*step_2: training_state.json"):
        train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=4,
                        resume_from_checkpoint=tmp_path / "checkpoints" / "step_2"))

    with pytest.raises(SystemExit) as error:
        train.main(args(tiny_clip_dir, synthetic, tmp_path / "other", max_steps=0))
    assert error.value.code == 2 and "--max_steps must be >= 1" in capsys.readouterr().err
    # NaN passes `< 0` checks (a NaN --max_grad_norm made every gradient NaN); the others were tracebacks
    for flag, value, message in (("max_grad_norm", "nan", "--max_grad_norm must be a finite number >= 0, got nan"),
                                 ("lr", "inf", "--lr must be a finite number > 0, got inf"),
                                 ("poly_power", "-1", "--poly_power must be a finite number >= 0"),
                                 ("seed", "-1", "--seed must lie in [0, 2**32 - 1]"),
                                 ("num_workers", "-1", "--num_workers must be >= 0"),
                                 # a config keeps any name: the misspelt field trained the default number of queries
                                 ("config", '{"num_querys": 8}',
                                  "--config names no MROVSegConfig field: num_querys (did you mean num_queries?)")):
        with pytest.raises(SystemExit) as error:
            train.main(args(tiny_clip_dir, synthetic, tmp_path / "other", **{flag: value}))
        assert error.value.code == 2 and message in capsys.readouterr().err
    # a batch that does not split: refused before --overwrite_output_dir deletes the earlier run (it was after)
    with pytest.raises(SystemExit, match="--batch_size 2 must be divisible by --gradient_accumulation_steps x"):
        train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=2, gradient_accumulation_steps=4,
                        overwrite_output_dir=None))
    assert (tmp_path / "checkpoints" / "step_4").is_dir() and (tmp_path / "model").is_dir()

    # a dataset or model that cannot be loaded: one line naming it, and the earlier run --overwrite_output_dir would
    # replace is still there (it is deleted only once both have loaded)
    for flags, message in (({"dataset": "acme/not-downloadable"}, "cannot load --dataset acme/not-downloadable: "),
                           ({"model": "acme/no-such-clip"}, "cannot load --model acme/no-such-clip: "),
                           ({"dataset": tmp_path / "missing"}, "not found (give a folder of parquet files")):
        values = {"clip": tiny_clip_dir, "data": synthetic} | {
            {"dataset": "data", "model": "clip"}[k]: v for k, v in flags.items()}
        with pytest.raises(SystemExit) as error:
            train.main(args(values["clip"], values["data"], tmp_path, max_steps=2, overwrite_output_dir=None))
        assert message in str(error.value.code) + capsys.readouterr().err
        assert (tmp_path / "checkpoints" / "step_4").is_dir() and (tmp_path / "model").is_dir()

    # fine-tuning the trained model with another architecture: one line, not a traceback after transformers' table
    with pytest.raises(SystemExit, match="--model .*--config changes num_queries 8 -> 5, which changes the shapes"):
        train.main(args(tmp_path / "model", synthetic, tmp_path / "other", max_steps=1,
                        config=json.dumps({"num_queries": 5})))

    # another kind of model: named (it was "Couldn't instantiate the backend tokenizer")
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    SegformerForSemanticSegmentation(SegformerConfig(hidden_sizes=[8, 8, 8, 8], decoder_hidden_size=8)).save_pretrained(
        tmp_path / "segformer")
    with pytest.raises(SystemExit, match="segformer is a 'segformer' checkpoint: training starts from a CLIP"):
        train.main(args(tmp_path / "segformer", synthetic, tmp_path / "other", max_steps=1))

    results = train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=2, checkpointing_steps=2,
                              overwrite_output_dir=None))
    assert results["stopped_at"] == 2 and not (tmp_path / "checkpoints" / "step_4").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_checkpoints_total_limit_and_a_full_disk(tiny_clip_dir, synthetic, tmp_path, monkeypatch):
    """Every checkpoint was kept (60 of 0.7 GB in the ViT-B/16 recipe) and the disk that filled up ended the run in
    safetensors' traceback. `--checkpoints_total_limit` keeps the newest N once a newer one is complete (a resume
    continues exactly); a checkpoint that cannot be written stops the run naming the last one and what to do."""
    import errno

    base = args(tiny_clip_dir, synthetic, tmp_path, max_steps=3, checkpointing_steps=1, checkpoints_total_limit=2,
                eval_split="none")
    train.main(base)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]
    (tmp_path / "checkpoints" / "step_1").mkdir()  # damaged (a killed save): no resume reads it
    train.main([*args(tiny_clip_dir, synthetic, tmp_path, max_steps=5, checkpointing_steps=1,
                      checkpoints_total_limit=2, eval_split="none"), "--resume_from_checkpoint", "latest",
                "--resume_with_changed_args"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_5"]
    assert train.older_checkpoints(tmp_path, 5, 1) == [tmp_path / "checkpoints" / "step_4"]
    assert train.older_checkpoints(tmp_path, 4, 1) == []  # a later step's is never the one to go

    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def full_disk(self, output_dir=None, **kwargs):
        if output_dir.endswith("step_2"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    out = tmp_path / "full"
    with pytest.raises(SystemExit) as stop:
        train.main(args(tiny_clip_dir, synthetic, out, max_steps=3, checkpointing_steps=1, eval_split="none"))
    last = out / "checkpoints" / "step_1"
    assert str(stop.value) == (f"error: cannot write the checkpoint of step 2 (No space left on device); the last one "
                               f"is {last}. Make room (--checkpoints_total_limit N keeps only the newest N) and "
                               "continue with the same command and --resume_from_checkpoint latest")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]  # the half-written one removed
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    results = train.main([*args(tiny_clip_dir, synthetic, out, max_steps=3, checkpointing_steps=1, eval_split="none"),
                          "--resume_from_checkpoint", "latest"])
    assert results["stopped_at"] == 3 and (out / "model" / "model.safetensors").is_file()


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tiny_clip_dir, synthetic, tmp_path, capsys):
    """Resumed from step_2 of a run that reached step_4 (to redo it with a lower learning rate), the run's own step_3
    was written into the old step_3 folder, and a later "latest" picked the old step_4 over it: a silent return to
    the abandoned run. The later checkpoints are moved aside, whole, and "latest" is this run's."""
    run = dict(max_steps=4, checkpointing_steps=1, eval_split="none")
    train.main(args(tiny_clip_dir, synthetic, tmp_path, **run))
    old_step_4 = weights(tmp_path, 4)
    capsys.readouterr()
    train.main([*args(tiny_clip_dir, synthetic, tmp_path, lr="5e-4", stop_after_steps=3, **run),
                "--resume_from_checkpoint", str(tmp_path / "checkpoints" / "step_2"), "--resume_with_changed_args"])
    aside = tmp_path / "checkpoints" / "set_aside_after_step_2"
    assert f"moved 2 later checkpoint(s) (step_3, step_4) to {aside}: resuming from step 2" in capsys.readouterr().out
    assert sorted(p.name for p in aside.iterdir()) == ["step_3", "step_4"]
    assert all(torch.equal(old_step_4[k], v) for k, v in load_file(str(aside / "step_4" / "model.safetensors")).items())
    path, state = train.latest_checkpoint(tmp_path)
    assert path == tmp_path / "checkpoints" / "step_3" and state["run_args"]["lr"] == 5e-4


def test_evaluate_script_scores_a_checkpoint_and_names_what_it_cannot_load(tiny_clip_dir, synthetic, tmp_path,
                                                                           capsys, monkeypatch):
    from training import evaluate as evaluate_script

    train.main(args(tiny_clip_dir, synthetic, tmp_path / "run", max_steps=1, checkpointing_steps=1))
    model = tmp_path / "run" / "model"
    base = ["--model", str(model), "--dataset", str(synthetic), "--eval_size", "128", "--no_progress"]
    results = evaluate_script.main([*base, "--output", str(tmp_path / "eval.json")])
    assert 0 <= results["mean_iou"] <= 1 and json.loads((tmp_path / "eval.json").read_text())["num_images"] == 2
    with pytest.raises(SystemExit) as error:  # a local path that is not there: a usage error, before anything loads
        evaluate_script.main(["--model", str(tmp_path / "nowhere"), *base[2:]])
    assert error.value.code == 2 and "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="cannot load --dataset acme/offline-dataset: "):  # offline in the tests
        evaluate_script.main([*base[:2], "--dataset", "acme/offline-dataset", *base[4:]])
    with pytest.raises(SystemExit, match=f"cannot load --model {tmp_path}: "):  # a folder that is no checkpoint
        evaluate_script.main(["--model", str(tmp_path), *base[2:]])
    # other names for the dataset's classes are taken (prompt wording); another number of names would shift them
    renamed = evaluate_script.main([*base, "--class_names", json.dumps(["lawn", "street", "house", "auto", "sign"])])
    assert list(renamed["per_class_iou"]) == ["lawn", "street", "house", "auto", "sign"]
    with pytest.raises(SystemExit, match="4 class names given, but the dataset's labels number 5 classes"):
        evaluate_script.main([*base, "--class_names", json.dumps(["grass", "road", "building", "car"])])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a checkpoint saved without its tokenizer: one line
        (model / name).unlink()
    with pytest.raises(SystemExit, match=r"has no CLIP tokenizer \(none was given or saved with it\) to embed"):
        evaluate_script.main([*base, "--class_names", json.dumps(["lawn", "street", "house", "auto", "sign"])])
    with pytest.raises(SystemExit, match="cannot load --metric mean_iou: "):  # the Hub module, offline: one line
        evaluate_script.main([*base, "--metric", "mean_iou"])
    for bad, message in ((["--max_samples", "-3"], "--max_samples must be >= 1"),  # was 'mIoU nan% over -3 images'
                         (["--eval_size", "0"], "--eval_size must be >= 1"),
                         (["--output", str(tmp_path)], "is a folder"),  # found after the evaluation, results lost
                         (["--output", str(tmp_path / "eval.json" / "x.json")], "cannot be written")):
        with pytest.raises(SystemExit) as error:
            evaluate_script.main([*base, *bad])
        assert error.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "run"]  # no probe or partial file left
    import errno

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(evaluate_script, "write_atomically", full_disk)  # the disk filled up while it evaluated
    with pytest.raises(SystemExit, match=r"cannot write --output .*late.json \(No space left on device\); the scores "
                                         r"are printed above"):
        evaluate_script.main([*base, "--output", str(tmp_path / "late.json")])
    assert "mIoU " in capsys.readouterr().out


def test_evaluation_of_images_without_a_labelled_pixel_says_so(tiny_clip_dir, synthetic, tmp_path, capsys):
    """A split whose labels are all 255 has no mIoU: null in the results (strict JSON: NaN is no JSON value), 'n/a' in
    the output, and no model card built from it (it printed 'mIoU nan%' and wrote NaN)."""
    import datasets
    from PIL import Image

    from hub_cards.card import load_results
    from training import evaluate as evaluate_script

    train.main(args(tiny_clip_dir, synthetic, tmp_path / "run", max_steps=1, checkpointing_steps=1))
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    rows = {"image": [Image.new("RGB", (40, 30), "gray")], "label": [Image.new("L", (40, 30), 255)]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "validation.parquet"))
    (folder / "class_names.json").write_text(json.dumps(["grass", "road", "building", "car", "sign"]))
    output = tmp_path / "eval.json"
    results = evaluate_script.main(["--model", str(tmp_path / "run" / "model"), "--dataset", str(folder),
                                    "--eval_size", "64", "--no_progress", "--output", str(output)])
    assert results["mean_iou"] is None and "mIoU n/a (no labelled pixel" in capsys.readouterr().out

    def no_constant(name):
        raise AssertionError(f"{name} is no JSON value")
    saved = json.loads(output.read_text(), parse_constant=no_constant)
    assert saved["mean_iou"] is None and set(saved["per_class_iou"].values()) == {None}
    with pytest.raises(ValueError, match="no labelled pixel"):
        load_results([output])


def test_evaluation_and_training_count_class_255_of_a_wide_vocabulary(tiny_clip_dir, tiny_tokenizer):
    """With 300 classes, 255 is a class and 65535 unlabelled: evaluation scores class 255's pixels (they were
    dropped as unlabelled) and the loss trains on them; the augmentation pads crops with 65535."""
    import numpy as np
    from PIL import Image

    import evaluate

    from modeling_mrovseg import MEAN_IOU, MROVSegForOpenVocabSegmentation, MROVSegImageProcessor
    from training.data import SegmentationAugment
    from training.evaluation import evaluate_segmentation

    names = [f"thing {i}" for i in range(300)]
    torch.manual_seed(0)
    model = MROVSegForOpenVocabSegmentation.from_clip(
        str(tiny_clip_dir), vocabulary=names, tokenizer=tiny_tokenizer, **TINY)
    assert model.config.ignore_index == 65535
    processor = MROVSegImageProcessor.from_model_config(model.config, size={"shortest_edge": 64, "longest_edge": 256})
    assert processor.ignore_index == 65535
    label = np.full((48, 64), 255, dtype=np.uint16)
    label[:, 32:] = 65535
    rows = [{"image": Image.new("RGB", (64, 48), "gray"), "label": Image.fromarray(label)}]
    results = evaluate_segmentation(model, processor, rows, names, evaluate.load(MEAN_IOU), show_progress=False)
    scored = {name for name, iou in results["per_class_iou"].items() if iou is not None}
    assert "thing 255" in scored and results["mean_iou"] is not None

    image, crop = SegmentationAugment(crop_size=96, scale_range=(1.0, 1.0), ignore_index=65535)(
        np.zeros((48, 64, 3), np.uint8), label.astype(np.int64), np.random.default_rng(0))
    assert set(np.unique(crop).tolist()) == {255, 65535}  # padding is unlabelled, not class 255
    inputs = processor(list(image[None]), segmentation_maps=[crop], do_resize=False, return_tensors="pt")
    assert set(inputs["labels"].unique().tolist()) == {255, 65535}
    loss = model.train()(**inputs).loss
    assert torch.isfinite(loss)


def test_a_missing_evaluation_split_is_found_before_training_and_none_trains_without(tiny_clip_dir, synthetic, tmp_path,
                                                                                     capsys):
    """A dataset without its --eval_split (a folder converted with --val-fraction 0) failed after the last step,
    before the model was saved; it is now named before training, and --eval_split none trains and saves without
    evaluation (the model card then has no numbers, and names no file as holding them)."""
    from hub_cards import card

    with pytest.raises(SystemExit, match=r"cannot load --eval_split test of .*[^.]\. Name another split"):
        train.main(args(tiny_clip_dir, synthetic, tmp_path / "a", max_steps=1, eval_split="test"))
    assert not (tmp_path / "a").exists()
    results = train.main(args(tiny_clip_dir, synthetic, tmp_path / "b", max_steps=2, eval_split="none", eval_steps=1))
    assert results["final_evaluation"] is None and results["evaluations"] == []
    model_dir = tmp_path / "b" / "model"
    assert (model_dir / "model.safetensors").is_file()
    text = card.main(["--checkpoint", str(model_dir), "--repo-id", "me/b"]).read_text()
    assert "No evaluation results were supplied." in text and "Trained from" in text
    with pytest.raises(SystemExit) as exit_info:
        card.main(["--checkpoint", str(model_dir), "--results", str(model_dir / "results.json")])
    assert exit_info.value.code == 1 and "holds no mIoU: the run had no final evaluation" in capsys.readouterr().err


def test_labels_outside_the_class_names_stop_an_evaluation_and_not_the_training(tiny_clip_dir, tiny_tokenizer,
                                                                                 synthetic, tmp_path, monkeypatch,
                                                                                 capsys):
    """A label value that is no class id (labels of another vocabulary) was dropped by the metric, which then scored
    the rest: a plausible, wrong mIoU. It is an error naming the image and values, the metric is left empty for the
    next evaluation, and a periodic evaluation that fails no longer ends the training run (work since the last
    checkpoint was lost)."""
    import numpy as np
    from PIL import Image

    import evaluate

    from modeling_mrovseg import MEAN_IOU, MROVSegForOpenVocabSegmentation, MROVSegImageProcessor
    from training import evaluation

    names = ["sky", "road", "car"]
    torch.manual_seed(0)
    model = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=names, tokenizer=tiny_tokenizer,
                                                      **TINY)
    processor = MROVSegImageProcessor.from_model_config(model.config, size={"shortest_edge": 64, "longest_edge": 256})
    good = np.zeros((48, 64), dtype=np.uint8)
    good[:, 32:] = 2
    bad = good.copy()
    bad[:4] = 7
    rows = [{"image": Image.new("RGB", (64, 48), "gray"), "label": Image.fromarray(label)} for label in (good, bad)]
    metric = evaluate.load(MEAN_IOU)
    with pytest.raises(ValueError, match=r"evaluation image 1: its label holds values \[7\], neither class ids 0..2"):
        evaluation.evaluate_segmentation(model, processor, rows, names, metric, show_progress=False)
    again = evaluation.evaluate_segmentation(model, processor, rows[:1], names, metric, show_progress=False)
    fresh = evaluation.evaluate_segmentation(model, processor, rows[:1], names, evaluate.load(MEAN_IOU),
                                             show_progress=False)
    assert again == fresh  # the failed evaluation's image 0 is not counted twice

    real, calls = evaluation.evaluate_segmentation, []

    def fails_first(*arguments, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("evaluation image 0: cannot be read")
        return real(*arguments, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_segmentation", fails_first)
    train.main(args(tiny_clip_dir, synthetic, tmp_path / "run", max_steps=2, eval_steps=1, checkpointing_steps=2))
    assert "step 1: evaluation failed: evaluation image 0: cannot be read; training goes on" in capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "model" / "results.json").read_text())
    assert results["evaluations"][0] == {"step": 1, "error": "evaluation image 0: cannot be read"}
    assert results["final_evaluation"]["step"] == 2 and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_the_launchers_mixed_precision_is_used(tiny_clip_dir, synthetic, tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16 -m training.train` (the README's real-scale command) trained in fp32:
    the script's own flag defaulted to an explicit "no", which overrides the launcher's environment."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision bf16 sets
    train.main(args(tiny_clip_dir, synthetic, tmp_path / "launched", max_steps=1, eval_split="none"))
    results = json.loads((tmp_path / "launched" / "model" / "results.json").read_text())
    assert results["args"]["mixed_precision"] == "bf16"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train.main(args(tiny_clip_dir, synthetic, tmp_path / "flag", max_steps=1, eval_split="none", mixed_precision="no"))
    assert json.loads((tmp_path / "flag" / "model" / "results.json").read_text())["args"]["mixed_precision"] == "no"


def test_an_unreadable_training_row_is_named_and_the_run_ends_in_one_line(tiny_clip_dir, tmp_path):
    """Row 5's label is half its image's height: the run ended with the reason in a DataLoader worker's traceback
    but not the row, so the data could not be fixed before resuming (which meets the row again)."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        label = np.zeros((96, 128), np.uint8)
        label[10:50, 20:70] = 1 + i % 2
        rows.append({"image": Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)),
                     "label": Image.fromarray(label[:48] if i == 5 else label)})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "data" / "train.parquet"))
    (tmp_path / "data" / "class_names.json").write_text('["ground", "a", "b"]')
    with pytest.raises(SystemExit) as stop:
        train.main(args(tiny_clip_dir, tmp_path / "data", tmp_path / "run", max_steps=6, checkpointing_steps=2,
                        crop_size=64, eval_split="none", num_workers=1))
    assert str(stop.value) == (
        f"error: training row 5: image (96, 128) and label (48, 128) differ in size (in {tmp_path / 'data'}); "
        "training stopped before step 3. Fix or remove that row, then continue with --resume_from_checkpoint latest.")
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "training_state.json").is_file()  # the work before it kept
    # the row fixed, another holds a class id past the 3 class names (labels of another vocabulary): named the same
    # way before its step (the loss refused it inside the step, with a traceback naming no row)
    rows[5]["label"] = rows[4]["label"]
    bad = np.asarray(rows[6]["label"]).copy()
    bad[:4, :4] = 9
    rows[6]["label"] = Image.fromarray(bad)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "data" / "train.parquet"))
    with pytest.raises(SystemExit) as stop:
        train.main(args(tiny_clip_dir, tmp_path / "data", tmp_path / "run", max_steps=6, checkpointing_steps=2,
                        crop_size=64, eval_split="none", resume_from_checkpoint="latest"))
    assert str(stop.value).startswith("error: training row 6: its label holds [9], neither class ids 0..2 of the 3 "
                                      "class names nor unlabelled (255)")


TRAINER_EVALUATION = """
import json, sys
import datasets
from transformers import Trainer, TrainingArguments
from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegImageProcessor
from training.evaluation import trainer_mean_iou

model_dir, data_dir, out_dir = sys.argv[1:4]
model = MROVSegForOpenVocabSegmentation.from_pretrained(model_dir)
crops = MROVSegImageProcessor.from_model_config(model.config, size={"height": 128, "width": 128})
collate = lambda rows: crops([r["image"] for r in rows], segmentation_maps=[r["label"] for r in rows],
                             return_tensors="pt")
validation = datasets.load_dataset("parquet", data_dir=data_dir, split="validation")
scores = {}
for streamed in (False, True):
    trainer = Trainer(model=model, eval_dataset=validation, data_collator=collate, **trainer_mean_iou(model.config),
                      args=TrainingArguments(out_dir, per_device_eval_batch_size=1, remove_unused_columns=False,
                                             report_to=[], batch_eval_metrics=streamed, use_cpu=True))
    scores[str(streamed)] = trainer.evaluate()["eval_mean_iou"]
if trainer.accelerator.is_main_process:
    print("SCORES " + json.dumps({"processes": trainer.accelerator.num_processes, **scores}), flush=True)
trainer.accelerator.end_training()  # the gloo group freed before exit, not by destructors ("terminate called ...")
"""


def test_trainer_mean_iou_in_two_processes_equals_one(tiny_clip_dir, synthetic, tmp_path):
    """Trainer gathers each batch's class-id maps across processes: int16 maps, which gloo (and NCCL) cannot gather,
    failed with "Invalid scalar type"; two CPU processes now score what one does."""
    torch.manual_seed(0)
    names = json.loads((synthetic / "class_names.json").read_text())
    model = MROVSegForOpenVocabSegmentation.from_clip(str(tiny_clip_dir), vocabulary=names, **TINY)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "evaluation.py").write_text(TRAINER_EVALUATION)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    scores = []
    for launcher in ([], ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(free_port())]):
        result = subprocess.run([sys.executable, *launcher, str(tmp_path / "evaluation.py"), str(tmp_path / "model"),
                                 str(synthetic), str(tmp_path / "trainer")], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=600, start_new_session=True)
        assert result.returncode == 0, result.stderr[-4000:]
        scores.append(json.loads(result.stdout.split("SCORES ", 1)[1].splitlines()[0]))
    assert [s["processes"] for s in scores] == [1, 2]
    assert scores[0]["False"] == scores[0]["True"] == scores[1]["False"] == scores[1]["True"]


def start_training(command: list[str], env: dict, log: Path, lines: int) -> subprocess.Popen:
    """A training process in a session of its own (a terminal's process group), once its log holds `lines` steps."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= lines):
        if process.poll() is not None or time.time() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"training did not reach step {lines}: {process.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return process


def finished(process: subprocess.Popen) -> tuple[str, str]:
    try:
        return process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"training did not stop: {process.communicate()[1][-3000:]}")


def test_ctrl_c_and_sigterm_stop_after_the_step_with_a_checkpoint(tiny_clip_dir, synthetic, tmp_path):
    """Ctrl-C (sent by a terminal to the whole process group, loader workers included) ended training with a
    traceback, losing every step since the last checkpoint (up to 1,000 by default); with loader workers even SIGTERM
    failed the step in progress. Now the run stops after the step in progress, saves it, says how to continue, and
    exits 128 + the signal; the resume goes on from there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "training.train",
               *args(tiny_clip_dir, synthetic, tmp_path, max_steps=500, num_workers=1, checkpointing_steps=1000)]
    process = start_training(command, env, tmp_path / "log.jsonl", lines=2)
    os.killpg(process.pid, signal.SIGINT)  # the terminal's Ctrl-C
    stdout, stderr = finished(process)
    assert process.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert "SIGINT: stopping after this step with a checkpoint" in stderr and "Traceback" not in stderr
    saved = [path.name for path in (tmp_path / "checkpoints").iterdir()]
    assert len(saved) == 1 and (tmp_path / "checkpoints" / saved[0] / "training_state.json").is_file()
    step = int(saved[0].removeprefix("step_"))
    assert f"SIGINT: stopped at step {step} of 500 with a checkpoint" in stdout
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"] == step
    resumed = train.main(args(tiny_clip_dir, synthetic, tmp_path, max_steps=500, num_workers=1,
                              checkpointing_steps=1000, resume_from_checkpoint="latest", stop_after_steps=step + 1))
    assert resumed["stopped_at"] == step + 1 and "interrupted_by" not in resumed


def test_a_signal_to_one_of_two_processes_stops_both_at_one_step(tiny_clip_dir, synthetic, tmp_path):
    """SIGTERM to one rank (a node's preemption): both agree on the step to stop after (at a logging step), save one
    checkpoint together and stop; one stopping alone would leave the other waiting in its next collective."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), "-m", "training.train",
               *args(tiny_clip_dir, synthetic, tmp_path, max_steps=500, log_steps=2, checkpointing_steps=1000)]
    process = start_training(command, env, tmp_path / "log.jsonl", lines=2)
    ranks = subprocess.run(["pgrep", "-f", f"python -u -m training.train .*{tmp_path}"], capture_output=True,
                           text=True).stdout.split()  # the launcher's ranks, each in a session of its own
    assert len(ranks) == 2, ranks
    os.kill(int(max(ranks, key=int)), signal.SIGTERM)
    stdout, stderr = finished(process)
    assert "SIGTERM: stopped at step" in stdout, (stdout[-2000:], stderr[-3000:])
    saved = [path.name for path in (tmp_path / "checkpoints").iterdir()]
    assert len(saved) == 1, (saved, stderr[-3000:])
    checkpoint = tmp_path / "checkpoints" / saved[0]
    assert {"training_state.json", "random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in
                                                                                      checkpoint.iterdir()}
    assert int(saved[0].removeprefix("step_")) % 2 == 0  # a logging step, where the two agreed
    assert f"SIGTERM: stopped at step {saved[0].removeprefix('step_')} of 500" in stdout
