"""Publish an MROVSeg checkpoint to the Hugging Face Hub.

    python -m hub_cards.push --checkpoint runs/x/model --repo-id ORG/NAME [--private] [--results a.json ...]
                             [--license mit]

Uploads `model.safetensors`, `config.json`, the processor and tokenizer files, the remote-code modules named in
`auto_map` (so `trust_remote_code=True` works without this package) and a model card whose `model-index`
carries the evaluation results. Pickled weights are never uploaded. Pushing the same checkpoint again uploads
nothing (the Hub reports every file unchanged and no commit is made).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from modeling_mrovseg.cli import one_line
from modeling_mrovseg.modeling_mrovseg import refuse_training_adapter

from .card import (DEFAULT_LICENSE, add_license_argument, build_card, checkpoint_config, checkpoint_results,
                   edited_by_hand, write_card)

# training.train's arguments that name local files or folders (Hub ids stay as they are: they are not absolute)
PATH_ARGS = ("model", "dataset", "output_dir", "resume_from_checkpoint", "class_names", "metric")
ALLOWED = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors", "config.json",
           "preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "*.py", "README.md", "results.json"]


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse folders that hold no MROVSeg checkpoint, or one without safetensors weights or without the remote-code
    modules its config names."""
    if not (checkpoint / "config.json").is_file():
        refuse_training_adapter(checkpoint)  # an adapter folder: where its merged model is
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a saved checkpoint")
    config = checkpoint_config(checkpoint)
    if not any(checkpoint.glob("model*.safetensors")):
        pickled = [p.name for p in checkpoint.glob("*.bin")] + [p.name for p in checkpoint.glob("*.pt")]
        raise ValueError(f"{checkpoint} has no safetensors weights{f' (only {pickled})' if pickled else ''}; "
                         "re-save with model.save_pretrained(..., safe_serialization=True)")
    auto_map = config.get("auto_map", {})
    missing = sorted({ref.split(".")[0] + ".py" for ref in auto_map.values() if isinstance(ref, str)}
                     - {p.name for p in checkpoint.glob("*.py")})
    if missing:
        raise ValueError(f"remote-code modules {missing} named in auto_map are missing from {checkpoint}")


def public_results(text: str) -> str:
    """
    A training results.json as published: the run's absolute local paths (its model, dataset, output folder, and
    where they recur, such as in an error message) shortened to what follows their folder, as the card names them,
    and anything else under the home folder to `~/`. The record held the machine's user name and folder layout.
    """
    data = json.loads(text)
    args = data.get("args") if isinstance(data, dict) else None
    paths = [value for key, value in (args or {}).items() if key in PATH_ARGS and isinstance(value, str)]
    prefixes = sorted({os.path.dirname(path.rstrip("/")) + "/" for path in paths if os.path.isabs(path)}, key=len,
                      reverse=True)
    replacements = [(prefix, "") for prefix in prefixes if prefix != "/"] + [(str(Path.home()) + "/", "~/")]

    def public(value):
        if isinstance(value, str):
            for prefix, short in replacements:
                value = value.replace(prefix, short)
            return value
        if isinstance(value, list):
            return [public(item) for item in value]
        if isinstance(value, dict):
            return {key: public(item) for key, item in value.items()}
        return value

    published = public(data)
    return text if published == data else json.dumps(published, indent=2)


@contextlib.contextmanager
def public_folder(checkpoint: Path):
    """The folder to upload: the checkpoint itself, or, where its results.json names local paths, a staging folder
    beside it of links to its files and the `public_results` version of that record (the checkpoint is left as is)."""
    record = checkpoint / "results.json"
    text = record.read_text() if record.is_file() else None
    published = public_results(text) if text is not None else None
    if published == text:
        yield checkpoint
        return
    beside = checkpoint.resolve().parent  # resolved: `--checkpoint .` has no parent of its own
    prefix = f".{checkpoint.resolve().name}.push-"
    for stale in beside.glob(prefix + "*"):  # left by a push that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:  # beside the checkpoint: on its filesystem, files are linked, not copied
        staging = tempfile.TemporaryDirectory(prefix=prefix, dir=beside)
    except OSError:
        staging = tempfile.TemporaryDirectory(prefix="mrovseg-push-")
    with staging as folder:
        for file in checkpoint.iterdir():
            if file.is_file() and file.name != record.name:
                try:
                    os.link(file, Path(folder) / file.name)
                except OSError:
                    shutil.copy2(file, Path(folder) / file.name)
        (Path(folder) / record.name).write_text(published)
        yield Path(folder)


def push(checkpoint: str | Path, repo_id: str, private: bool = False, results: list[str] | None = None,
         token: str | None = None, endpoint: str | None = None, commit_message: str | None = None,
         regenerate_card: bool = False, license: str = DEFAULT_LICENSE) -> str | None:
    """Create the repo if needed, write the card (a README.md edited by hand is kept and uploaded as it is), upload
    the allowed files; returns the commit URL (None if no-op)."""
    from huggingface_hub import HfApi

    checkpoint = Path(checkpoint)
    check_checkpoint(checkpoint)
    card = build_card(checkpoint, checkpoint_results(checkpoint, results), repo_id, license)
    card.validate()
    write_card(card, checkpoint, regenerate_card)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    ignored = ["*.bin", "*.pt", "*.pkl", "checkpoints/*"]
    if not regenerate_card and hub_card_edited(api, repo_id, checkpoint / "README.md"):
        ignored.append("README.md")
        print(f"kept the README.md of {repo_id} on the Hub: it was written or edited there (--regenerate-card "
              f"replaces it; to go on editing it here, download it into {checkpoint})")
    with public_folder(checkpoint) as folder:
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                 allow_patterns=ALLOWED, ignore_patterns=ignored,
                                 commit_message=commit_message or "Upload MROVSeg checkpoint")
    url = getattr(info, "commit_url", None)
    print(f"pushed {checkpoint} to {repo_id}" + (f": {url}" if url else " (no change)"))
    return url


def hub_card_edited(api, repo_id: str, local: Path, repo_type: str = "model") -> bool:
    """Whether the repo's README.md on the Hub is a person's work (edited in the Hub's editor or a Space's settings,
    say: not a card these tools wrote, nor transformers' placeholder) that differs from the one about to go up:
    uploading would replace it."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        remote = Path(api.hf_hub_download(repo_id, "README.md", repo_type=repo_type)).read_text(encoding="utf-8")
    except EntryNotFoundError:  # a new repo, or one without a card
        return False
    ours = local.read_text(encoding="utf-8") if local.is_file() else None
    return remote != ours and edited_by_hand(remote)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=os.path.expanduser, required=True)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--results", nargs="*", default=None, help="evaluation results JSON files for the card")
    parser.add_argument("--token", default=None, help="default: the saved login / HF_TOKEN")
    parser.add_argument("--regenerate-card", action="store_true",
                        help="replace a README.md edited by hand with a generated card")
    add_license_argument(parser)
    args = parser.parse_args(argv)
    try:
        check_checkpoint(Path(args.checkpoint))
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    with hub_errors_exit(parser, "nothing was uploaded"):
        push(args.checkpoint, args.repo_id, args.private, args.results, args.token,
             regenerate_card=args.regenerate_card, license=args.license)


@contextlib.contextmanager
def hub_errors_exit(parser: argparse.ArgumentParser, outcome: str):
    """A Hub that cannot be reached (offline, no network), refuses the token or the repo, or rejects the card, or a
    results file that cannot be read: one line naming the problem and exit status 1, not a traceback through the
    HTTP client."""
    from huggingface_hub.utils import httpx

    try:
        yield
    except (OSError, ValueError, httpx.HTTPError) as error:  # huggingface_hub's errors are OSErrors or ValueErrors
        parser.exit(1, f"error: {one_line(error)} ({type(error).__name__}); {outcome}.\n")


if __name__ == "__main__":
    main()
