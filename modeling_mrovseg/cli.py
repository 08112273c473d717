"""`mrovseg segment IMAGE_OR_FOLDER [...] --model PATH_OR_ID --labels "sky,road,car" --out DIR`.

Per image it writes `<name>_labels.png` (palette PNG of class indices; 16-bit grey past 255 classes, 65535
unlabelled), `<name>_overlay.png` (colours over the photo with a legend) and `<name>.json` (labels, per-class
pixel share and score). Files that cannot be read are reported and skipped; the exit code is 1 when any image
failed, 2 for unusable arguments.
Labels are comma-separated; to give synonyms, separate classes with ";" instead ("sofa, couch; lamp; floor").
Without --labels the checkpoint's own vocabulary (`config.id2label`, what pipeline("image-segmentation") uses) is used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from .configuration_mrovseg import NotAnMROVSegCheckpoint, one_line

# HEIC/HEIF (phone photos) read with the optional pillow-heif; without it each is reported with the line to install it
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".heic", ".heif"}


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def hidden(relative: Path) -> bool:
    """Whether a path below a searched folder is hidden there (itself or a folder on the way)."""
    return any(part.startswith(".") for part in relative.parts)


def files_below(folder: Path, suffixes: set[str]) -> list[Path]:
    """Regular files below `folder`, sub-folders too, with one of these suffixes in any case (IMG_0001.PNG), none
    hidden: macOS's `._photo.jpg` beside each copied photo is no image, and `.thumbnails/` or `.ipynb_checkpoints/`
    hold copies (a named pipe called photo.jpg waited forever)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not hidden(p.relative_to(folder)))


def collect_images(sources: list[str], out: Path | None = None) -> list[tuple[str, Path]]:
    """(where to read it, its name below its source) for every image named: files as given (`photos/*.jpg`), folders
    searched recursively (`files_below`: hidden files and folders left out), http(s) URLs as given. Anything under
    `out` is left out: an output folder inside a source would otherwise have its overlays segmented on the next run.
    A file named twice (itself and in its folder) once."""
    skip = out.resolve() if out is not None else None
    found: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for source in sources:
        if is_url(source):
            name = PurePosixPath(urlparse(source).path).name
            found.append((source, Path(name if name.strip(".") else "image")))
            continue
        path = Path(source).expanduser()
        folder = path.is_dir()
        if folder:
            named = [(p, p.relative_to(path)) for p in files_below(path, IMAGE_SUFFIXES)]
        elif path.is_file():
            named = [(path, Path(path.name))]
        elif path.exists():  # a named pipe or socket: reading it would wait forever
            raise FileNotFoundError(f"{source} is not a regular file or folder")
        else:
            raise FileNotFoundError(f"{source} does not exist")
        for file, name in named:
            resolved = file.resolve()
            if resolved not in seen and not (folder and skip is not None and resolved.is_relative_to(skip)):
                seen.add(resolved)
                found.append((str(file), name))
    return found


def output_stems(names: list[Path]) -> list[str]:
    """One distinct output name per image, from its name below its source (`a/b.jpg` -> `a__b`): `photo.jpg` beside
    `photo.png` become photo_jpg / photo_png, and names that still meet (`photo.JPG` beside `photo.jpg`, `a__b.jpg`
    beside `a/b.jpg`, `x.jpg` of two folders) are numbered, so no image's outputs overwrite another's."""
    stems = [str(name.with_suffix("")).replace("/", "__") for name in names]
    taken = Counter(stems)
    result, used = [], set()
    for stem, name in zip(stems, names):
        unique = f"{stem}_{name.suffix.lstrip('.').lower()}" if taken[stem] > 1 and name.suffix else stem
        candidate, number = unique, 1
        while candidate in used:
            number += 1
            candidate = f"{unique}_{number}"
        used.add(candidate)
        result.append(candidate)
    return result


def is_hub_id(name: str) -> bool:
    """ORG/NAME that is not a local path: the one rule of the CLI, the demo, the training scripts and the card."""
    return not Path(name).expanduser().exists() and not name.startswith((".", "/", "~")) and name.count("/") == 1


def replace_atomically(path: Path, write) -> None:
    """Replace `path` only with a complete file: `write(partial)` writes it beside `path`, then it is renamed over it.
    A run killed while writing leaves the earlier file, or none, never a truncated one; a write that fails (a full
    disk, Ctrl-C) leaves no partial file behind."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, text: str) -> None:
    """`text` as the file `path`, complete or not at all (`replace_atomically`)."""
    replace_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8", newline=""))  # same bytes


def check_source(parser: argparse.ArgumentParser, flag: str, value: str, kind: str) -> None:
    """A usage error (exit 2) when `value` is neither an existing path nor shaped like a Hub id ORG/NAME."""
    if not is_hub_id(value) and not Path(value).expanduser().exists():
        parser.error(f"{flag} {value!r} not found (give {kind} or a Hub id ORG/NAME)")


def check_is_mrovseg(model: str) -> None:
    """A missing folder, a folder without config.json, or another kind of checkpoint (a CLIP folder, what training
    starts from, which would otherwise fail deep in the pipeline with "Can't load image processor"): an error
    naming it."""
    from transformers import AutoConfig

    local = Path(model).expanduser()
    if not is_hub_id(model) and not local.is_dir():
        raise FileNotFoundError(f"model folder {model!r} not found (give a checkpoint folder or a Hub id ORG/NAME)")
    if not is_hub_id(model) and not (local / "config.json").is_file():
        from .modeling_mrovseg import refuse_training_adapter

        refuse_training_adapter(model)  # an adapter folder: where its merged model is
        raise FileNotFoundError(f"{model} has no config.json: not a saved checkpoint")
    model_type = AutoConfig.from_pretrained(model if is_hub_id(model) else str(local)).model_type
    if model_type != "mrovseg":
        raise NotAnMROVSegCheckpoint(model_type, model)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_pipeline(model: str, device: str | None, resolution: int | None, slice_batch_size: int | None,
                  compile: bool | str = False, dtype: str = "auto"):
    """The zero-shot pipeline on `device` with weights in `dtype` ("auto": as saved); inputs follow the weights'
    dtype, post-processing runs in float32."""
    import torch
    from transformers import pipeline

    from . import register_pipelines
    from .image_processing_mrovseg import MROVSegImageProcessor

    register_pipelines()
    check_is_mrovseg(model)
    try:
        segmenter = pipeline("zero-shot-image-segmentation",
                             model=model if is_hub_id(model) else str(Path(model).expanduser()), device=device,
                             compile=compile, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except ValueError as error:  # transformers wraps a failed load in "Could not load model ..." and its tracebacks
        text = str(error).strip()
        if not text.startswith("Could not load model"):
            raise
        raise OSError(re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])) from None  # the cause: the last line
    if resolution is not None:
        segmenter.image_processor.size = MROVSegImageProcessor.size_for_resolution(resolution)
    if slice_batch_size is not None:
        segmenter.model.config.slice_batch_size = slice_batch_size
    return segmenter


def emulated_precision_note(model) -> str | None:
    """A note when the model runs on a CPU in a half precision that CPU has no instructions for: its ops are then
    emulated, several times slower than float32 (a ViT-B/16 forward at 640^2: 40 s in bfloat16 against 6 s in float32
    on an AVX2 machine)."""
    import torch

    if model.device.type != "cpu" or model.dtype not in (torch.bfloat16, torch.float16):
        return None
    checks = (("_is_avx512_bf16_supported", "_is_amx_tile_supported") if model.dtype == torch.bfloat16
              else ("_is_amx_fp16_supported",))
    if any(getattr(torch.cpu, check, lambda: True)() for check in checks):  # unknown to this torch: say nothing
        return None
    name = str(model.dtype).removeprefix("torch.")
    return (f"{name} weights on this CPU ({torch.backends.cpu.get_cpu_capability()}, without {name} instructions) run "
            f"emulated, several times slower than float32: --dtype float32 runs faster here.")


def stored_vocabulary_note(labels: list[str]) -> str:
    """Without --labels the checkpoint's own class names label the images: say which."""
    shown = ", ".join(labels[:8]) + (f", ... ({len(labels)} in all)" if len(labels) > 8 else "")
    return f"no --labels: the checkpoint's vocabulary of {len(labels)} class(es): {shown}"


def one_class_note(labels: list[str], score_threshold: float | None, flag: str = "--score-threshold") -> str | None:
    """Every pixel gets the best of the classes given: with one class and no threshold, all of the image is it."""
    if len(labels) != 1 or score_threshold is not None:
        return None
    return (f"with one class and no {flag} every pixel is labelled {labels[0]!r}; add the other things in the "
            f"picture (\"background\" at least) or a {flag}")


def check_device(device: str | None) -> None:
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError as error:
        raise ValueError(f"--device {device!r} is not a device name ({error})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "leave --device out to run on the CPU.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine.")


def prepare_output(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mrovseg-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {out} cannot be written: {error.strerror or error}") from None


def segment_command(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .text_classifier import parse_class_names

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        labels = parse_class_names(args.labels)  # None: the checkpoint's vocabulary, once it is loaded
        out = Path(args.out)
        folders = [Path(source) for source in args.sources if not is_url(source) and Path(source).is_dir()]
        for source in folders:
            if source.resolve().is_relative_to(out.resolve()):
                raise ValueError(f"--out {out} holds the source folder {source}: the next run would read its overlays "
                                 f"as photos; give a folder outside it (or inside it, such as {source / 'segmented'})")
        images = collect_images(args.sources, out)
        others = sorted((p.relative_to(source) for source in folders for p in source.rglob("*")  # not collected
                         if p.is_file() and (p.suffix.lower() not in IMAGE_SUFFIXES or hidden(p.relative_to(source)))
                         and not p.resolve().is_relative_to(out.resolve())), key=Path.as_posix)
        if not images:
            raise ValueError(f"no images found in {', '.join(args.sources)} (looked for "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))}"
                             + (f"; {len(others)} other files, such as {others[0].as_posix()}" if others else "")
                             + ("; hidden files and folders are not searched" if any(map(hidden, others)) else "")
                             + ")")
        prepare_output(out)
        stems = output_stems([name for _, name in images])
        others_outputs = outputs_of_other_images(out, images, stems)
        if others_outputs and not args.overwrite:
            (stem, earlier, path), more = others_outputs[0], len(others_outputs) - 1
            raise ValueError(f"--out {out} holds outputs of other images under the names this run writes: {stem}.json "
                             f"and its PNGs are {earlier}'s, not {path}'s" + (f" ({more} more such)" if more else "")
                             + "; give another --out, or --overwrite to replace them")
        check_device(args.device)
        segmenter = load_pipeline(args.model, args.device, args.resolution, args.slice_batch_size, args.compile,
                                  args.dtype)
        stored = labels is None
        labels = segmenter.model.vocabulary if stored else labels
        segmenter.text_embeddings(labels)  # once, before any image: a checkpoint that cannot embed them stops here
        notes = [stored_vocabulary_note(labels) if stored else None, emulated_precision_note(segmenter.model),
                 one_class_note(labels, args.score_threshold)]
        shown = [other for other in others if not hidden(other)]
        if shown:  # a phone's videos, sidecar files: said once, so "segmented 40 of 40" is not a surprise
            notes.append(f"left out {len(shown)} file(s) in {', '.join(map(str, folders))} that are not images "
                         f"(such as {shown[0].as_posix()})")
        for note in notes:
            if note and not args.quiet:
                print(f"note: {note}", file=sys.stderr)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed, skipped, done = [], 0, 0
    bar = tqdm(images, desc="segmenting", unit="image", disable=len(images) < 2 or args.quiet)
    try:
        for (path, _), stem in zip(bar, stems):
            if args.skip_done and is_done(out, stem, path, labels, args.score_threshold):
                skipped += 1
            elif segment_one(segmenter, path, stem, labels, out, args, single=len(images) == 1):
                done += 1
            else:
                failed.append(path)
    except KeyboardInterrupt:  # Ctrl-C: what is done stays done (--skip-done continues), no traceback
        print(f"\ninterrupted: segmented {done} of {len(images)} images into {out}; run again with --skip-done to "
              "continue", file=sys.stderr)
        return 130
    except OutputNotWritten as error:  # a full disk or a lost network share: every later image would fail alike
        print(f"error: {error}; segmented {done} of {len(images)} images into {out}; make room (or fix the folder) "
              "and run again with --skip-done to continue", file=sys.stderr)
        return 1
    print(f"segmented {done} of {len(images)} images into {out}" + (f"; {len(failed)} failed" if failed else "")
          + (f"; {skipped} done before (--skip-done)" if skipped else ""))
    return 1 if failed else 0


def outputs_of_other_images(out: Path, images: list[tuple[str, Path]], stems: list[str]) -> list[tuple[str, str, str]]:
    """(stem, earlier image, this run's image) for each output name whose JSON an earlier run wrote for another image:
    `mrovseg segment day2/ --out seg` after `day1/` replaced day1's img1 outputs with day2's without a word."""
    found = []
    for (path, _), stem in zip(images, stems):
        earlier = (written_summary(out, stem) or {}).get("image")
        if isinstance(earlier, str) and not same_source(earlier, path):
            found.append((stem, earlier, path))
    return found


def written_summary(out: Path, stem: str) -> dict | None:
    """The JSON an earlier run wrote for `stem`, or None (none, or not one of ours)."""
    try:
        written = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return written if isinstance(written, dict) else None


def same_source(first: str, second: str) -> bool:
    """One image named twice: the same string, or local paths to the same file (relative and absolute)."""
    if first == second:
        return True
    if is_url(first) or is_url(second):
        return False
    return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()


def is_done(out: Path, stem: str, path: str, labels: list[str], score_threshold: float | None) -> bool:
    """The image's outputs are complete and from the same request: its JSON (written last) names the same image,
    labels and threshold, and both pictures are there."""
    written = written_summary(out, stem)
    if written is None:
        return False
    image = written.get("image")
    same = (isinstance(image, str) and same_source(image, path)
            and (written.get("labels"), written.get("score_threshold")) == (labels, score_threshold))
    return same and all((out / f"{stem}_{kind}.png").is_file() for kind in ("labels", "overlay"))


def segment_one(segmenter, path: str, stem: str, labels: list[str], out: Path, args, single: bool) -> bool:
    """Segment one image into its three files (the JSON last); False, with a line saying why, if it cannot be read."""
    from tqdm.auto import tqdm

    from .pipelines import read_rgb
    from .visualization import colorize, draw_segmentation

    try:
        image = read_rgb(path)  # EXIF orientation, 16-bit and alpha as the model sees them (URLs fetched)
        if not args.quiet and single:
            print(f"segmenting {path} ({image.shape[1]} x {image.shape[0]})", file=sys.stderr, flush=True)
        result = segmenter(image, candidate_labels=labels, score_threshold=args.score_threshold)
    except (OSError, ValueError) as error:
        shown = path if path.isprintable() else repr(path)[1:-1]  # a newline in a file name would split the line
        reason = one_line(ValueError(str(error).replace(path, shown)))
        # above the progress bar, not appended to it; the path once ("skipped a.png cannot be read as an image: ...")
        tqdm.write(f"skipped {reason if reason.startswith(shown) else f'{shown}: {reason}'}", file=sys.stderr)
        return False
    label_map = result["label_map"]
    written(out / f"{stem}_labels.png", lambda partial: colorize(label_map, len(labels)).save(partial, format="PNG"))
    # zlib's fastest level: a picture for the eye, 20-25% larger, 4x faster to write (31 s for 120 megapixels)
    overlay = draw_segmentation(image, label_map, labels)
    written(out / f"{stem}_overlay.png", lambda partial: overlay.save(partial, format="PNG", compress_level=1))
    total = label_map.size
    summary = {
        "image": path,
        "labels": labels,
        "score_threshold": args.score_threshold,
        "classes": {s["label"]: {"pixel_share": s["pixels"] / total, "score": s["score"]} for s in result["segments"]},
        "unlabelled_share": float((label_map < 0).sum() / total),
    }
    text = json.dumps(summary, indent=2)  # last: the image's outputs are complete
    written(out / f"{stem}.json", lambda partial: partial.write_text(text, encoding="utf-8", newline=""))
    return True


class OutputNotWritten(Exception):
    """An output file could not be written (no space left, a folder gone read-only): the run stops, naming it."""


def written(path: Path, write) -> None:
    """One output of the CLI, complete or not at all (`replace_atomically`: a full disk left a truncated PNG that
    image viewers show half grey); a write that fails is `OutputNotWritten` naming the file."""
    try:
        replace_atomically(path, write)
    except OSError as error:
        raise OutputNotWritten(f"cannot write {path}: {error.strerror or error}") from None


def _positive_int(upper: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not 1 <= value <= upper:
            raise argparse.ArgumentTypeError(f"{value} must lie in [1, {upper}]")
        return value
    return parse


def _threshold(text: str) -> float:
    from .pipelines import check_score_threshold

    try:
        return check_score_threshold(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _compile_mode(text: str) -> str:
    """A mode torch.compile knows (the installed torch's own list, as the pipeline checks it)."""
    from .pipelines import compile_mode

    try:
        compile_mode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace(f"compile={text!r}: give True, False or", "give")) from None
    return text


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="mrovseg", description="MROVSeg open-vocabulary segmentation")
    parser.add_argument("--version", action="version", version=f"mrovseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment an image or a folder of images",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    segment.add_argument("sources", nargs="+", metavar="IMAGE_OR_FOLDER", type=os.path.expanduser,
                         help="image files (photos/*.jpg), folders (searched recursively, hidden files left out) "
                              "or http(s) URLs")
    segment.add_argument("--model", type=os.path.expanduser, required=True, help="checkpoint folder or Hub id")
    segment.add_argument("--labels", default=None, help='class names, e.g. "sky,road,car" or "sofa, couch; lamp", or '
                         "a file: a JSON list, an id2label.json, a class table (.csv with a name column) or one "
                         "class per line (default: the checkpoint's vocabulary)")
    segment.add_argument("--out", required=True, type=os.path.expanduser, help="output folder")
    segment.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cpu)")
    segment.add_argument("--resolution", type=_positive_int(8192), default=None,
                         help="shortest edge the image is resized to (longest at most 4x it), 1..8192")
    segment.add_argument("--slice-batch-size", type=_positive_int(4096), default=None,
                         help="slices per CLIP call (memory bound)")
    segment.add_argument("--score-threshold", type=_threshold, default=None,
                         help="leave pixels whose best class score is below this unlabelled")
    segment.add_argument("--dtype", choices=DTYPES, default="auto",
                         help="weights' dtype (default: as saved); bfloat16 is the fast choice on a GPU")
    segment.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE", type=_compile_mode,
                         help="torch.compile the model: faster for many images of one size, slow for the first; "
                              "MODE reduce-overhead adds CUDA graphs (the fastest on a GPU for small images)")
    segment.add_argument("--skip-done", action="store_true",
                         help="skip images whose outputs a run with the same labels and threshold completed (an "
                              "interrupted run continues)")
    segment.add_argument("--overwrite", action="store_true",
                         help="replace outputs in --out that an earlier run wrote for other images of the same name "
                              "(refused without it)")
    segment.add_argument("--quiet", action="store_true", help="no progress bars or loading messages")
    segment.add_argument("--max-pixels", type=_positive_int(10**11), default=None, metavar="N",
                         help="largest image read, in pixels (default: PIL's decompression-bomb limit, 178,956,970); "
                              "raise it for aerial or scanned images you trust (about 30 bytes of memory per pixel)")
    args = parser.parse_args(argv)
    with image_pixel_limit(args.max_pixels), warnings_as_lines():
        return segment_command(args)


@contextlib.contextmanager
def warnings_as_lines():
    """While the CLI runs, the package's and its libraries' UserWarnings (an animated GIF's other frames, a legend
    font without the names' characters) as one line each, "warning: ...", above the progress bar; Python's form
    named a line of this package's source and quoted it. Other warnings keep Python's form."""
    from tqdm.auto import tqdm

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning):
            tqdm.write(f"warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def image_pixel_limit(max_pixels: int | None):
    """PIL's decompression-bomb limit set to `max_pixels` (None: PIL's own) while the CLI runs. Its warning about
    images past half that limit is left out: the CLI reads the images it was asked to, and refuses bombs anyway."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            if max_pixels is not None:  # PIL refuses images of more than twice MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


if __name__ == "__main__":
    sys.exit(main())
