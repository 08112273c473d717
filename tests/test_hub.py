"""Publishing to a Hub stand-in on 127.0.0.1, and loading a downloaded-snapshot layout every way users do."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import pipeline

from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegProcessor
from tests.fake_hub import FakeHub
from tests.helpers import LABELS, random_image, tiny_processor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tiny_clip_dir, tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = MROVSegForOpenVocabSegmentation.from_clip(
        str(tiny_clip_dir), vocabulary=LABELS, tokenizer=tiny_tokenizer, num_queries=8, hidden_dim=32,
        num_decoder_heads=4, prompt_templates=["a photo of a {}."]).eval()
    folder = tmp_path_factory.mktemp("to-push")
    model.save_pretrained(folder)
    MROVSegProcessor(tiny_processor(model.config), tiny_tokenizer,
                     prompt_templates=model.config.prompt_templates).save_pretrained(folder)
    (folder / "ade150.json").write_text(json.dumps({"mean_iou": 0.3125, "benchmark": "ade20k-150", "split": "validation",
                                                    "num_images": 2000, "eval_size": 640}))
    (folder / "pc59.json").write_text(json.dumps({"mean_iou": 0.5, "benchmark": "pascal-context-59",
                                                  "split": "validation", "num_images": 5105}))
    (folder / "stale.bin").write_bytes(b"pickled weights must never be uploaded")
    return folder


def hub_env(endpoint: str) -> dict:
    """The environment of a publishing command against the Hub at `endpoint` (online, a test token)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN="hf_test_token", PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    return env


def push(checkpoint, hub, *extra):
    env = hub_env(hub.url)
    command = [sys.executable, "-m", "hub_cards.push", "--checkpoint", str(checkpoint), "--repo-id",
               "acme/mrovseg-test", "--results", str(checkpoint / "ade150.json"), str(checkpoint / "pc59.json"), *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_push_uploads_weights_code_processor_and_card(checkpoint, tmp_path):
    with FakeHub() as hub:
        push(checkpoint, hub, "--private")
        repo = hub.repos["acme/mrovseg-test"]
        assert repo["private"] is True and len(repo["commits"]) == 1 and not hub.unknown
        files = set(repo["files"])
        assert {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "README.md",
                "modeling_mrovseg.py", "configuration_mrovseg.py", "image_processing_mrovseg.py",
                "processing_mrovseg.py", "masked_attention.py"} <= files
        assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
        card = repo["files"]["README.md"].decode()
        metadata = yaml.safe_load(card.split("---")[1])
        results = metadata["model-index"][0]["results"]
        assert {(r["dataset"]["name"], r["metrics"][0]["value"]) for r in results} == {
            ("ade20k-150", 31.25), ("pascal-context-59", 50.0)}
        assert metadata["pipeline_tag"] == "image-segmentation" and "| ade20k-150 | validation | 2000 | 31.25 |" in card
        assert 'Needs transformers 5.21 or newer (`pip install -U "transformers>=5.21"`;' in card  # MIN_TRANSFORMERS
        config = json.loads(repo["files"]["config.json"])
        assert config["auto_map"]["AutoModel"] == "modeling_mrovseg.MROVSegModel"
        assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_mrovseg.MROVSegForOpenVocabSegmentation"

        # pushing the same checkpoint again: every file unchanged, no new commit
        second = push(checkpoint, hub)
        assert len(repo["commits"]) == 1, second.stderr[-2000:]
        # a card edited by hand is kept and uploaded as it is (it was overwritten by the generated one)
        edited = (checkpoint / "README.md").read_text() + "\n## Our notes\nTrained on the night shift.\n"
        (checkpoint / "README.md").write_text(edited)
        third = push(checkpoint, hub)
        assert "kept" in third.stdout and repo["files"]["README.md"].decode() == edited
        # a card edited on the Hub (its editor) was replaced by the next push: kept, and said so
        on_hub = edited + "\n## Added on the Hub\n"
        hub.edit("acme/mrovseg-test", "README.md", on_hub.encode())
        commits = len(repo["commits"])
        (checkpoint / "ade150.json").write_text((checkpoint / "ade150.json").read_text().replace("0.3125", "0.3126"))
        fourth = push(checkpoint, hub)
        assert "kept the README.md of acme/mrovseg-test on the Hub: it was written or edited there" in fourth.stdout
        assert repo["files"]["README.md"].decode() == on_hub and len(repo["commits"]) == commits
        # transformers' placeholder (model.push_to_hub) is no one's work: replaced
        hub.edit("acme/mrovseg-test", "README.md", b"# Model Card\nThis model card has been automatically generated.\n")
        push(checkpoint, hub)
        assert repo["files"]["README.md"].decode() == edited
        hub.edit("acme/mrovseg-test", "README.md", on_hub.encode())
        push(checkpoint, hub, "--regenerate-card")  # replaces both
        assert repo["files"]["README.md"].decode() == (checkpoint / "README.md").read_text()
        assert "31.26" in repo["files"]["README.md"].decode() and not hub.unknown
        (checkpoint / "ade150.json").write_text((checkpoint / "ade150.json").read_text().replace("0.3126", "0.3125"))
        push(checkpoint, hub, "--regenerate-card")

        snapshot = tmp_path / "snapshot"
        snapshot.mkdir()
        for name, content in repo["files"].items():
            (snapshot / name).write_bytes(content)
    check_snapshot(snapshot)


def check_snapshot(snapshot: Path):
    image = random_image(70, 110)
    # the card's own usage code runs as written, on remote code alone (it loaded the base feature extractor,
    # AutoModel, whose outputs no post-processing takes)
    card = (snapshot / "README.md").read_text()
    usage = card.split("```python\n", 1)[1].split("```", 1)[0]
    Image.fromarray(image).save(snapshot / "photo.jpg")
    usage = usage.replace('"acme/mrovseg-test"', repr(str(snapshot)))
    usage = usage.replace('"photo.jpg"', repr(str(snapshot / "photo.jpg")))
    check = ("\nassert tuple(label_map.shape) == (70, 110)"
             "\nassert set(label_map.unique().tolist()) <= set(model.config.id2label)"
             "\nassert segments and result['labels'] == ['road', 'cyclist', 'traffic cone']\nprint('card ok')")
    ran = subprocess.run([sys.executable, "-c", "import sys\nsys.modules['modeling_mrovseg'] = None\n" + usage + check],
                         capture_output=True, text=True, timeout=300, cwd=snapshot.parent,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert ran.returncode == 0 and "card ok" in ran.stdout, ran.stderr[-3000:]
    (snapshot / "photo.jpg").unlink()
    model = MROVSegForOpenVocabSegmentation.from_pretrained(snapshot).eval()
    processor = MROVSegProcessor.from_pretrained(snapshot)
    with torch.inference_mode():
        expected = processor.post_process_semantic_segmentation(
            model(**processor(images=image)), target_sizes=[(70, 110)])[0].numpy()
    zero_shot = pipeline("zero-shot-image-segmentation", model=str(snapshot))(Image.fromarray(image))
    np.testing.assert_array_equal(zero_shot["label_map"], expected)
    np.save(snapshot / "expected.npy", expected)
    np.save(snapshot / "image.npy", image)
    script = textwrap.dedent("""
        import sys
        sys.modules["modeling_mrovseg"] = None
        import numpy as np, torch
        from PIL import Image
        from transformers import AutoModelForSemanticSegmentation, AutoProcessor, pipeline
        folder = sys.argv[1]
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        image = np.load(folder + "/image.npy")
        with torch.inference_mode():
            outputs = model(**processor(images=image))
        got = processor.post_process_semantic_segmentation(outputs, target_sizes=[(70, 110)])[0].numpy()
        assert (got == np.load(folder + "/expected.npy")).all(), "AutoModel differs"
        segments = pipeline("image-segmentation", model=folder, trust_remote_code=True)(Image.fromarray(image))
        labels = model.config.id2label
        for segment in segments:
            index = [k for k, v in labels.items() if v == segment["label"]][0]
            assert ((np.asarray(segment["mask"]) > 0) == (got == index)).all(), segment["label"]
        print("remote ok", type(model).__module__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script, str(snapshot)], cwd=snapshot.parent, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote ok transformers_modules" in result.stdout


def test_pickled_weights_are_refused_unless_opted_in(tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    from tests.helpers import tiny_config

    model = MROVSegForOpenVocabSegmentation(tiny_config())
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    for loader in (MROVSegForOpenVocabSegmentation, AutoModelForSemanticSegmentation):
        with pytest.raises(ValueError, match="only pickled weights"):
            loader.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="allow_pickle"):
        MROVSegForOpenVocabSegmentation.from_pretrained(tmp_path, use_safetensors=False)
    loaded = MROVSegForOpenVocabSegmentation.from_pretrained(tmp_path, allow_pickle=True)
    assert torch.equal(loaded.mrovseg.adapters[0].projection[0].weight, model.mrovseg.adapters[0].projection[0].weight)


def test_push_refuses_a_folder_without_safetensors(tmp_path):
    from hub_cards.push import check_checkpoint

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has a config without a model_type, not an MROVSeg model"):
        check_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "mrovseg"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="no safetensors weights"):
        check_checkpoint(tmp_path)


def test_publishing_tools_fail_with_one_line_and_lose_nothing(checkpoint, tmp_path):
    """An unreachable Hub, a folder that is no checkpoint and a Space --out that holds someone's files: one line
    naming the problem and a non-zero exit, never a traceback, and no file touched."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on: the Hub cannot be reached
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    env = hub_env(closed)

    def run(*command):
        return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    weights = (checkpoint / "model.safetensors").read_bytes()
    result = run("hub_cards.push", "--checkpoint", str(checkpoint), "--repo-id", "acme/x")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.strip().endswith("nothing was uploaded.")
    assert (checkpoint / "model.safetensors").read_bytes() == weights
    result = run("hub_cards.push", "--checkpoint", str(tmp_path), "--repo-id", "acme/x")
    assert result.returncode == 2 and "has no config.json" in result.stderr and "Traceback" not in result.stderr
    # a CLIP folder (what training starts from: weights and a config.json) was carded, pushed and made a Space of
    clip = tmp_path / "clip"
    from transformers import CLIPConfig

    CLIPConfig().save_pretrained(clip)
    (clip / "model.safetensors").write_bytes(weights)
    for command, code in ((("hub_cards.push", "--checkpoint", str(clip), "--repo-id", "acme/x"), 2),
                          (("hub_cards.card", "--checkpoint", str(clip)), 1),
                          (("hub_cards.space", "--model", str(clip), "--repo-id", "acme/demo", "--out",
                            str(tmp_path / "clip-space"), "--no-push"), 2)):
        result = run(*command)
        assert result.returncode == code and "is a 'clip' checkpoint, not an MROVSeg model" in result.stderr, command
    assert not (clip / "README.md").exists() and not (tmp_path / "clip-space").exists()
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    result = run("hub_cards.space", "--model", "acme/x", "--repo-id", "acme/demo", "--out", str(project))
    assert result.returncode == 2 and "not a Space folder built by this tool" in result.stderr
    assert [p.name for p in project.iterdir()] == ["notes.txt"]
    result = run("hub_cards.space", "--model", "acme/x", "--repo-id", "acme/demo", "--out", str(tmp_path / "space"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is built, nothing was uploaded" in result.stderr
    # its own folder is rebuilt in place
    result = run("hub_cards.space", "--model", "acme/y", "--repo-id", "acme/demo", "--out", str(tmp_path / "space"),
                 "--no-push")
    assert result.returncode == 0 and json.loads((tmp_path / "space" / "mrovseg_space.json").read_text()) == {
        "model": "acme/y"}
    # a local --model that is no checkpoint (a typo): refused, where it built a Space that failed at its start
    for model in (tmp_path / "no-such-model", "mrovseg"):
        result = run("hub_cards.space", "--model", str(model), "--repo-id", "acme/demo", "--out",
                     str(tmp_path / "space2"), "--no-push")
        assert result.returncode == 2 and "is neither a Hub id (ORG/NAME) nor a checkpoint folder" in result.stderr
    assert not (tmp_path / "space2").exists()
    result = run("hub_cards.space", "--model", os.path.relpath(checkpoint, ROOT), "--repo-id", "acme/demo", "--out",
                 str(tmp_path / "space2"), "--no-push")
    assert result.returncode == 0, result.stderr[-2000:]
    # by its absolute path: `python app.py` starts in the Space folder, where a relative path means another folder
    assert json.loads((tmp_path / "space2" / "mrovseg_space.json").read_text()) == {"model": str(checkpoint)}


def test_space_folder_has_its_header_and_pushes_as_a_space(tmp_path):
    from huggingface_hub import SpaceCard

    from hub_cards.space import build_space

    folder = build_space("acme/mrovseg-test", tmp_path / "space")
    card = SpaceCard.load(folder / "README.md")
    assert (card.data.sdk, card.data.app_file) == ("gradio", "app.py") and card.data.sdk_version
    assert (folder / "app.py").is_file() and (folder / "modeling_mrovseg" / "modeling_mrovseg.py").is_file()
    assert (folder / "LICENSE").read_text() == (Path(__file__).resolve().parents[1] / "LICENSE").read_text()
    assert any((folder / "docs" / "examples").iterdir())
    # pyproject's floors (the Space's own copy said transformers>=5.0 and torch>=2.4), the page's packages only
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert {"transformers>=5.21,<6", "torch>=2.6", "gradio>=5", "pillow-heif>=0.16"} <= set(requirements)
    assert not any(line.startswith(("datasets", "accelerate", "peft", "mrovseg")) for line in requirements)
    assert json.loads((folder / "mrovseg_space.json").read_text()) == {"model": "acme/mrovseg-test"}
    with FakeHub() as hub:
        env = hub_env(hub.url)
        result = subprocess.run([sys.executable, "-m", "hub_cards.space", "--model", "acme/mrovseg-test", "--repo-id",
                                 "acme/mrovseg-demo", "--out", str(tmp_path / "built")], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        files = set(hub.repos["acme/mrovseg-demo"]["files"])
        assert {"README.md", "app.py", "requirements.txt", "mrovseg_space.json", "modeling_mrovseg/cli.py"} <= files
        assert not hub.unknown
        # the Space's settings page (title, emoji, colours) edits its README: the next push keeps it, unless asked
        readme = hub.repos["acme/mrovseg-demo"]["files"]["README.md"].decode()
        edited = readme.replace("title: MROVSeg demo", "title: Our segmenter\nemoji: 🚧")
        hub.edit("acme/mrovseg-demo", "README.md", edited.encode())
        for flags, kept in (([], True), (["--regenerate-card"], False)):
            again = subprocess.run([sys.executable, "-m", "hub_cards.space", "--model", "acme/mrovseg-test",
                                    "--repo-id", "acme/mrovseg-demo", "--out", str(tmp_path / "built"), *flags],
                                   cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, again.stderr[-3000:]
            assert ("kept the README.md of the Space acme/mrovseg-demo" in again.stdout) == kept
            assert hub.repos["acme/mrovseg-demo"]["files"]["README.md"].decode() == (edited if kept else readme)
        assert not hub.unknown
        # a local checkpoint folder: the Space on the Hub could not load it (it failed there, at start); --no-push
        # builds it for a local run
        local = subprocess.run([sys.executable, "-m", "hub_cards.space", "--model", str(tmp_path), "--repo-id",
                                "acme/mrovseg-local", "--out", str(tmp_path / "local")], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
        assert local.returncode == 2 and "is not a Hub id" in local.stderr and "acme/mrovseg-local" not in hub.repos


def test_save_pretrained_with_push_to_hub_uploads_processor_and_tokenizer(checkpoint, tmp_path):
    """`model.save_pretrained(dir, push_to_hub=True)`: transformers uploaded inside its own save, before the processor
    and tokenizer were written, so the Hub copy had neither (no pipeline could load it); `push_to_hub()` had both."""
    script = ("import sys\nfrom modeling_mrovseg import MROVSegForOpenVocabSegmentation\n"
              "model = MROVSegForOpenVocabSegmentation.from_pretrained(sys.argv[1])\n"
              "model.save_pretrained(sys.argv[2], push_to_hub=True, repo_id='acme/saved', private=True)\n"
              "model.push_to_hub('acme/pushed')\n")
    with FakeHub() as hub:
        result = subprocess.run([sys.executable, "-c", script, str(checkpoint), str(tmp_path / "saved")], cwd=ROOT,
                                env=hub_env(hub.url), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        needed = {"model.safetensors", "config.json", "processor_config.json", "tokenizer.json", "pipelines.py",
                  "modeling_mrovseg.py"}
        for name in ("acme/saved", "acme/pushed"):
            assert needed <= set(hub.repos[name]["files"]), name
        assert hub.repos["acme/saved"]["private"] is True and not hub.unknown


def test_card_states_what_the_run_did_and_no_machine_paths(checkpoint, tmp_path):
    import shutil

    from hub_cards.card import build_card, load_results

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("README.md", "results.json"))
    bare = str(build_card(folder, [], "acme/x"))
    assert "No training record came with this checkpoint" in bare and "SAN recipe" not in bare
    assert "license: apache-2.0" in bare and "tiny randomly initialised one" in bare
    assert "pip install mrovseg" not in bare

    run = {"final_evaluation": {"mean_iou": 0.5, "num_images": 7}, "dataset": "/home/me/data/cracks",
           "eval_split": "validation", "args": {"model": "/home/me/clips/tiny-clip", "dataset": "/home/me/data/cracks",
                                                 "max_steps": 60, "batch_size": 2, "lr": 1e-3, "crop_size": 256,
                                                 "lora_rank": 4, "lora_targets": "vision", "eval_size": 512}}
    (folder / "results.json").write_text(json.dumps(run))
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps({"mean_iou": 0.25, "benchmark": "cracks", "split": "test", "num_images": 3}))
    card = str(build_card(folder, load_results([evaluation]), "acme/x"))  # --results given: training still read
    assert "for 60 steps, batch 2" in card and "LoRA rank 4 on CLIP's vision attention" in card
    assert "a local `tiny-clip` CLIP on a local `cracks` data" in card
    assert "/home/me" not in card and "SAN recipe" not in card
    assert "base_model" not in card  # a local CLIP is no Hub model to link

    # a run from a Hub CLIP names it as base_model; the license is the caller's
    run["args"]["model"] = "openai/clip-vit-base-patch16"
    (folder / "results.json").write_text(json.dumps(run))
    card = build_card(folder, [], "acme/x", license="mit")
    assert card.data.base_model == "openai/clip-vit-base-patch16" and card.data.license == "mit"
    assert "base_model: openai/clip-vit-base-patch16" in str(card) and "license: mit" in str(card)
    # relative local folders read like Hub ids where the card is built: the run recorded which were Hub ids
    run["args"].update(model="clips/tiny", dataset="data/cracks")
    (folder / "results.json").write_text(json.dumps({**run, "hub_ids": []}))
    card = build_card(folder, [], "acme/x")
    assert card.data.base_model is None and card.data.datasets is None
    assert "a local `tiny` CLIP on a local `cracks` data" in str(card)

    # a run whose final evaluation failed: its card says so (not "no results were supplied"), without the error's
    # paths; asked for by name, that results file is refused with the error
    run.update(final_evaluation=None, final_evaluation_error="cannot identify image file '/home/me/data/x.png'")
    (folder / "results.json").write_text(json.dumps(run))
    card = str(build_card(folder, load_results([folder / "results.json"], allow_unscored=True), "acme/x"))
    text = " ".join(card.split())
    assert "final evaluation failed" in text and "No evaluation results" not in text and "/home/me" not in text
    with pytest.raises(ValueError, match="holds no mIoU: its final evaluation failed .cannot identify image file"):
        load_results([folder / "results.json"])


def test_card_written_again_unless_edited_by_hand(checkpoint, tmp_path, capsys):
    """hub_cards.card rewrites its own card (new results show), keeps one a person edited or wrote, and replaces that
    too only with --regenerate-card."""
    import shutil

    from hub_cards import card

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("README.md", "results.json"))
    first = card.main(["--checkpoint", str(folder), "--results", str(folder / "ade150.json")]).read_text()
    assert "31.25" in first and not card.edited_by_hand(first)
    second = card.main(["--checkpoint", str(folder), "--results", str(folder / "pc59.json")]).read_text()
    assert "50.00" in second and "31.25" not in second  # its own card follows the results
    (folder / "README.md").write_text(second.replace("## Intended use", "## Intended use\n\nOur own words."))
    capsys.readouterr()
    kept = card.main(["--checkpoint", str(folder), "--results", str(folder / "ade150.json")]).read_text()
    assert "Our own words." in kept and "kept" in capsys.readouterr().out
    (folder / "README.md").write_text("# A card written by a person\n")
    assert card.main(["--checkpoint", str(folder)]).read_text() == "# A card written by a person\n"
    replaced = card.main(["--checkpoint", str(folder), "--results", str(folder / "ade150.json"),
                          "--regenerate-card"]).read_text()
    assert "31.25" in replaced and "A card written by a person" not in replaced
    # transformers' cards that no person wrote (Trainer's draft in its output folder, push_to_hub's placeholder)
    for machine in ("<!-- This model card has been generated automatically according to the information the Trainer "
                    "had access to. You should probably proofread and complete it, then remove this comment. -->\n",
                    "This model card has been automatically generated.\n"):
        (folder / "README.md").write_text("# runs\n" + machine)
        assert "31.25" in card.main(["--checkpoint", str(folder), "--results", str(folder / "ade150.json")]).read_text()


def test_card_tool_names_results_it_cannot_read(checkpoint, tmp_path, capsys):
    """`--results results/*.json` where the glob matched nothing (the shell passes it as is), or a file that is not
    JSON: one line naming it and exit status 1 (it was a traceback), the checkpoint's card untouched."""
    from hub_cards import card

    before = (checkpoint / "README.md").read_bytes() if (checkpoint / "README.md").exists() else None
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for results, message in ((str(tmp_path / "results" / "*.json"), "No such file or directory"),
                             (str(broken), "broken.json is not a results JSON file")):
        with pytest.raises(SystemExit) as exit_info:
            card.main(["--checkpoint", str(checkpoint), "--results", results])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert message in err and err.endswith("no card was written.\n") and len(err.splitlines()) == 1
    after = (checkpoint / "README.md").read_bytes() if (checkpoint / "README.md").exists() else None
    assert after == before


def test_card_and_push_take_the_weights_license(checkpoint, tmp_path, capsys):
    """The card always said apache-2.0 (the code's license), whatever the weights owe their CLIP and data; a value
    the Hub would reject after the upload began is refused first."""
    import shutil

    from hub_cards import card, push

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("README.md"))
    assert "license: cc-by-4.0" in card.main(["--checkpoint", str(folder), "--license", "CC-BY-4.0"]).read_text()
    for main in (card.main, push.main):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", str(folder), "--repo-id", "acme/x", "--license", "Apache 2"])
        assert exit_info.value.code == 2
        assert "'Apache 2' is not a license id such as apache-2.0" in capsys.readouterr().err


def test_pushed_results_name_no_machine_paths(checkpoint, tmp_path):
    """training.train's results.json went to the Hub as written: the run's absolute paths (user name, folder layout),
    also inside an error message. The pushed record names them as the card does; the local one is left as is, and
    pushing again commits nothing."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("README.md"))
    home = str(Path.home())
    run = {"final_evaluation": {"mean_iou": 0.5, "num_images": 2}, "dataset": f"{tmp_path}/data/cracks",
           "final_evaluation_error": None, "hub_ids": ["model"],
           "history": [{"step": 1, "loss": 2.0, "note": f"cache in {home}/.cache/x"}],
           "args": {"model": "openai/clip-vit-base-patch16", "dataset": f"{tmp_path}/data/cracks",
                    "output_dir": f"{tmp_path}/runs/cracks", "class_names": '["crack", "rust"]', "max_steps": 60}}
    local = json.dumps(run, indent=2)
    (folder / "results.json").write_text(local)
    (tmp_path / ".model.push-killed").mkdir()  # a push killed mid-upload left its staging folder
    with FakeHub() as hub:
        push(folder, hub)
        push(folder, hub)
        repo = hub.repos["acme/mrovseg-test"]
        assert len(repo["commits"]) == 1
        pushed_text = repo["files"]["results.json"].decode()
        weights = repo["files"]["model.safetensors"]
    pushed = json.loads(pushed_text)
    assert str(tmp_path) not in pushed_text and home + "/" not in pushed_text
    assert pushed["args"]["dataset"] == "cracks" and pushed["args"]["output_dir"] == "cracks"
    assert pushed["args"]["model"] == "openai/clip-vit-base-patch16" and pushed["dataset"] == "cracks"
    assert pushed["history"][0]["note"] == "cache in ~/.cache/x" and pushed["args"]["max_steps"] == 60
    assert (folder / "results.json").read_text() == local and weights == (folder / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".model.push-*"))  # the staging folders are gone, a killed push's too
