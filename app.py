"""MROVSeg demo page (Gradio; also the Hugging Face Space entry point).

    pip install -e ".[demo]"
    python app.py --model DIR_OR_HUB_ID [--port 7860] [--device cuda] [--dtype bfloat16] [--host 127.0.0.1]

Upload or pick an image, type class names (comma separated or one per line; synonyms of one class with ";" between
classes, as in the CLI: "sofa, couch; lamp"), choose the resolution and an optional score threshold: the page shows
the overlay with its legend, a per-class table (pixel share, score) and a downloadable label PNG (pixel value = class
number). Without --model it serves $MROVSEG_MODEL, the checkpoint a Space folder names, or the main job's
(outputs/run/model). It binds 127.0.0.1 unless --host says otherwise, and Gradio's analytics stay off.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from the page's server

ROOT = Path(__file__).resolve().parent
MAIN_JOB_MODEL = ROOT / "outputs" / "run" / "model"
TABLE_HEADERS = ["class", "pixel share (%)", "score"]
# class names one request may ask for (ADE20K-847's fit): each is embedded by CLIP's text encoder on the shared
# server, and 100,000 names pasted into a public page held it for everyone for many minutes
MAX_CLASSES = 1000
# label PNGs kept for download (the newest requests'): a public page writing one per request filled its disk
KEEP_DOWNLOADS = 64
# gradio's own copies of uploads and outputs: swept hourly of files older than an hour (and on restart)
GRADIO_CACHE_SWEEP = (3600, 3600)


class Segmenter:
    """One loaded zero-shot pipeline shared by all requests (one image at a time: requests queue, the page stays live)."""

    def __init__(self, model: str, device: str | None = None, dtype: str = "auto"):
        from modeling_mrovseg.cli import check_device, emulated_precision_note, load_pipeline
        from modeling_mrovseg.pipelines import heif_support

        heif_support()  # gradio opens each upload with PIL before the page's function: phones' HEIC photos too
        check_device(device)
        self.pipeline = load_pipeline(model, device, resolution=None, slice_batch_size=None, dtype=dtype)
        note = emulated_precision_note(self.pipeline.model)
        if note:
            print(f"note: {note}", file=sys.stderr)
        self.default_resolution = self.pipeline.image_processor.size.get("shortest_edge") or 640
        # the page opens on the served checkpoint's own classes (a Space for cracks and rust showed the main job's)
        self.default_labels = vocabulary_text(self.pipeline.model.vocabulary)
        # the page's own default text is always taken, however many classes the checkpoint knows
        self.max_classes = max(MAX_CLASSES, len(self.pipeline.model.vocabulary))
        self.lock = threading.Lock()
        self.outputs = Path(tempfile.mkdtemp(prefix="mrovseg-demo-"))
        atexit.register(shutil.rmtree, self.outputs, ignore_errors=True)

    def __call__(self, image_path: str | None, labels_text: str, resolution: float, threshold: float | None):
        """-> overlay image, per-class table rows, label PNG path, a one-line summary. Bad input: `ValueError`."""
        import numpy as np

        from modeling_mrovseg import MROVSegImageProcessor
        from modeling_mrovseg.cli import one_class_note
        from modeling_mrovseg.pipelines import read_rgb
        from modeling_mrovseg.text_classifier import parse_class_names
        from modeling_mrovseg.visualization import colorize, draw_segmentation

        if not image_path:
            raise ValueError("Upload an image or pick an example first.")
        size = MROVSegImageProcessor.size_for_resolution(int(resolution))
        threshold = None if threshold is None or threshold <= 0 else float(threshold)
        # the resolution lives on the shared processor; the warnings (a synonym of two classes, an animation's first
        # frame, a truncated prompt) are this request's, shown in its summary instead of the server's log
        with self.lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            labels = parse_class_names(labels_text or "", allow_files=False)  # never a file of the server
            if len(labels) > self.max_classes:
                raise ValueError(f"{len(labels)} class names: this page takes at most {self.max_classes} per request "
                                 "(the CLI and the pipelines take any number).")
            image = read_rgb(str(image_path))  # as the CLI reads it; an unreadable file or a bomb is a ValueError
            self.pipeline.image_processor.size = size
            result = self.pipeline(image, candidate_labels=labels, score_threshold=threshold)
        shown = Path(str(image_path)).name  # the upload's name, not the server's copy of it
        notes = list(dict.fromkeys(str(w.message).replace(str(image_path), shown).rstrip(".") for w in caught
                                   if issubclass(w.category, UserWarning)))
        label_map = result["label_map"]
        overlay = draw_segmentation(image, label_map, labels)
        # a folder per request: two uploads named image.png must not share (and overwrite) one download
        path = Path(tempfile.mkdtemp(dir=self.outputs)) / f"{Path(str(image_path)).stem}_labels.png"
        colorize(label_map, len(labels)).save(path)
        self.prune_downloads()
        total = label_map.size
        rows = [[s["label"], round(100 * s["pixels"] / total, 2), round(s["score"], 3)] for s in result["segments"]]
        unlabelled = int((label_map < 0).sum())
        if unlabelled:
            rows.append(["unlabelled", round(100 * unlabelled / total, 2), None])
        found = len(result["segments"])
        summary = (f"{image.shape[1]} x {image.shape[0]} px, {len(labels)} classes, resolution {int(resolution)}: "
                   f"{found} {'class' if found == 1 else 'classes'} found"
                   + (f", {100 * unlabelled / total:.1f}% below the threshold" if unlabelled else "") + ".")
        notes.append(one_class_note(labels, threshold, flag="score threshold"))
        summary += "".join(f" Note: {note}." for note in notes if note)
        return np.asarray(overlay), rows, str(path), summary

    def prune_downloads(self) -> None:
        """Keep the label PNGs of the newest `KEEP_DOWNLOADS` requests; older ones have been downloaded or never
        will be."""
        folders = sorted(self.outputs.iterdir(), key=lambda folder: folder.stat().st_mtime_ns)
        for folder in folders[: max(0, len(folders) - KEEP_DOWNLOADS)]:
            shutil.rmtree(folder, ignore_errors=True)


def vocabulary_text(labels: list[str]) -> str:
    """Class names as the text box takes them: ", " between names, "; " once a name carries synonyms."""
    return ("; " if any("," in label for label in labels) else ", ").join(labels)


def build_demo(segmenter: Segmenter, examples: list[str] | None = None):
    import gradio as gr

    def run(image_path, labels_text, resolution, threshold):
        try:
            return segmenter(image_path, labels_text, resolution, threshold)
        except (ValueError, OSError) as error:  # shown in the page, never a stack trace
            raise gr.Error(str(error), print_exception=False) from None

    with gr.Blocks(title="MROVSeg: open-vocabulary segmentation at full resolution", analytics_enabled=False,
                   delete_cache=GRADIO_CACHE_SWEEP) as demo:
        gr.Markdown("# MROVSeg\nOpen-vocabulary semantic segmentation at full resolution: type any class names.")
        with gr.Row():
            with gr.Column():
                # image_mode=None: the uploaded file itself, read as the CLI reads it (EXIF orientation, transparency
                # onto white, 16-bit range); gradio's default "RGB" re-saves a converted copy that drops both
                image = gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"])
                labels = gr.Textbox(value=segmenter.default_labels, label="Class names",
                                    info='comma separated, or one per line; synonyms of one class: '
                                         '"sofa, couch; lamp"')
                resolution = gr.Slider(64, 2048, value=segmenter.default_resolution, step=32,
                                       label="Resolution (shortest edge, px)")
                threshold = gr.Number(value=0, minimum=0, label="Score threshold (0: label every pixel)")
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                # no toolbar: its icons would cover the legend's first row (the label PNG has its own download)
                overlay = gr.Image(label="Overlay", type="numpy", format="png", interactive=False, buttons=[])
                summary = gr.Markdown()
                table = gr.Dataframe(headers=TABLE_HEADERS, label="Classes found", interactive=False)
                download = gr.File(label="Label PNG (pixel value = class number)")
        if examples:
            gr.Examples(examples=[[path] for path in examples], inputs=[image])
        button.click(run, [image, labels, resolution, threshold], [overlay, table, download, summary],
                     api_name="segment", concurrency_limit=1)
    return demo.queue(default_concurrency_limit=1, max_size=16)


def default_model() -> str | None:
    """$MROVSEG_MODEL, else the checkpoint a Space folder names (hub_cards.space), else the main job's."""
    space = ROOT / "mrovseg_space.json"
    if os.environ.get("MROVSEG_MODEL"):
        return os.path.expanduser(os.environ["MROVSEG_MODEL"])  # set in a Space's settings, no shell expands it
    if space.is_file():
        return json.loads(space.read_text())["model"]
    return str(MAIN_JOB_MODEL) if (MAIN_JOB_MODEL / "config.json").is_file() else None


def main(argv: list[str] | None = None) -> int:
    from modeling_mrovseg.cli import DTYPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=os.path.expanduser, default=None,
                        help="checkpoint folder or Hub id (default: the main job's)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1; a Space sets GRADIO_SERVER_NAME=0.0.0.0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' dtype (default: as saved)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port} must lie in [1, 65535]")
    model = args.model or default_model()
    if model is None:
        print(f"error: no --model given and no main-job checkpoint at {MAIN_JOB_MODEL}. Train one with "
              "`bash scripts/main_job.sh` (a few minutes on a CPU) or pass --model DIR_OR_HUB_ID.", file=sys.stderr)
        return 2
    try:
        segmenter = Segmenter(model, args.device, args.dtype)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # `kill`, `docker stop`, a Space restarting: SIGTERM ends the server as Ctrl-C does, so the exit handlers run and
    # the users' label PNGs go with it (by default SIGTERM ends Python without them, leaving the folder behind)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    folder = ROOT / "docs" / "examples"
    examples = sorted(str(p) for p in folder.iterdir() if p.suffix in (".png", ".jpg")) if folder.is_dir() else []
    try:
        build_demo(segmenter, examples).launch(server_name=args.host, server_port=args.port, show_error=True,
                                               share=False, allowed_paths=[str(segmenter.outputs)])
    except OSError as error:  # the port is taken, or the address is not this machine's
        print(f"error: cannot serve on {args.host}:{args.port} ({str(error).splitlines()[0]}); pass another --port "
              "or --host", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
