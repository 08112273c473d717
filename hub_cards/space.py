"""Build (and push) a Hugging Face Space serving the demo page for a published MROVSeg checkpoint.

    python -m hub_cards.space --model ORG/mrovseg-vit-b16 --repo-id ORG/mrovseg-demo [--out space/] [--no-push]

The Space folder holds `app.py`, the `modeling_mrovseg` library it imports (and its `LICENSE`), `requirements.txt`, a
`mrovseg_space.json` naming the checkpoint, and a README whose YAML header (`sdk: gradio`, `app_file: app.py`) makes
the Hub run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from modeling_mrovseg.cli import is_hub_id

from .card import checkpoint_config, stamped
from .push import hub_card_edited, hub_errors_exit

ROOT = Path(__file__).resolve().parents[1]
# what the page runs on: the library's own dependencies (not the training ones), then the demo's extras
SPACE_PACKAGES = ("torch", "transformers", "safetensors", "huggingface_hub", "pillow", "numpy", "scipy", "tqdm")


def space_requirements() -> list[str]:
    """The Space's requirements.txt lines with pyproject.toml's floors (a copy here said transformers>=5.0 when the
    code needed 5.21): SPACE_PACKAGES from its dependencies, gradio and pillow-heif (phones' HEIC uploads) from the
    demo's extras."""
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same reader as the tomli package
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    listed = project["dependencies"] + extras["demo"] + extras["heif"]
    return [line for line in listed if Requirement(line).name in (*SPACE_PACKAGES, "gradio", "pillow-heif")]


def build_space(model: str, out: str | Path, title: str = "MROVSeg demo") -> Path:
    """Write the Space folder for `model` (a Hub id or a folder that the Space can reach) into `out`."""
    import gradio
    from huggingface_hub import SpaceCard, SpaceCardData

    if not is_hub_id(model):  # a local folder by its absolute path: the page starts from the Space folder
        model = str(Path(model).expanduser().resolve())
    out = Path(out)
    if out.exists():  # rebuilt in place only if this tool built it: `--out .` must never empty a project
        if not out.is_dir() or (any(out.iterdir()) and not (out / "mrovseg_space.json").is_file()):
            raise FileExistsError(f"{out} exists and is not a Space folder built by this tool (it has no "
                                  "mrovseg_space.json); give a new or empty folder as --out.")
        shutil.rmtree(out)
    shutil.copytree(ROOT / "modeling_mrovseg", out / "modeling_mrovseg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "app.py", out / "app.py")
    shutil.copy2(ROOT / "LICENSE", out / "LICENSE")  # the code's, which the Space redistributes
    shutil.copytree(ROOT / "docs" / "examples", out / "docs" / "examples")  # the page's example images
    (out / "requirements.txt").write_text("\n".join(space_requirements()) + "\n")
    (out / "mrovseg_space.json").write_text(json.dumps({"model": model}, indent=1))
    data = SpaceCardData(title=title, sdk="gradio", sdk_version=gradio.__version__, app_file="app.py",
                         license="apache-2.0", tags=["image-segmentation", "open-vocabulary", "mrovseg"],
                         models=[model] if "/" in model and not Path(model).exists() else None)
    body = (f"# {title}\n\nOpen-vocabulary semantic segmentation at full resolution with [MROVSeg]"
            f"(https://arxiv.org/abs/2408.14776), serving `{model}`. Type any class names; synonyms of one class are "
            "separated by commas, classes by semicolons when a name needs a comma.\n")
    card = SpaceCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + body)
    (out / "README.md").write_text(stamped(str(card)), encoding="utf-8")  # stamped: an edit on the Hub is told apart
    return out


def push_space(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
               regenerate_card: bool = False) -> str | None:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    ignored = ["__pycache__/*", "*.pyc"]
    # its settings page edits it
    if not regenerate_card and hub_card_edited(api, repo_id, Path(folder) / "README.md", repo_type="space"):
        ignored.append("README.md")
        print(f"kept the README.md of the Space {repo_id}: it was written or edited on the Hub (its title, emoji or "
              "colours, say); --regenerate-card replaces it")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="space",
                             ignore_patterns=ignored, commit_message="Upload MROVSeg demo")
    return getattr(info, "commit_url", None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=os.path.expanduser, required=True,
                        help="the checkpoint the Space serves (a Hub id)")
    parser.add_argument("--repo-id", required=True, help="the Space, ORG/NAME")
    parser.add_argument("--out", default="space", type=os.path.expanduser, help="where to build the Space folder")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--no-push", action="store_true", help="only build the folder")
    parser.add_argument("--token", default=None)
    parser.add_argument("--regenerate-card", action="store_true",
                        help="replace the Space's README.md even where it was edited on the Hub")
    args = parser.parse_args(argv)
    if not args.no_push and not is_hub_id(args.model):  # the Space runs on the Hub: a local folder is not there
        parser.error(f"--model {args.model} is not a Hub id: a pushed Space could not load it. Push the checkpoint "
                     "first (python -m hub_cards.push) and give its ORG/NAME, or build locally with --no-push.")
    if not is_hub_id(args.model):
        if not (Path(args.model).expanduser() / "config.json").is_file():
            parser.error(f"--model {args.model} is neither a Hub id (ORG/NAME) nor a checkpoint folder (no "
                         "config.json): the Space would fail at its start")
        try:  # a CLIP folder: a page that failed at its start
            checkpoint_config(Path(args.model).expanduser())
        except ValueError as error:
            parser.error(f"--model {error}")
    try:
        folder = build_space(args.model, args.out)
    except FileExistsError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"built {folder}")
    if not args.no_push:
        with hub_errors_exit(parser, f"the Space folder {folder} is built, nothing was uploaded"):
            url = push_space(folder, args.repo_id, args.private, args.token, args.regenerate_card)
        print(f"pushed to {args.repo_id}" + (f": {url}" if url else " (no change)"))


if __name__ == "__main__":
    main()
