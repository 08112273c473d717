"""A saved checkpoint must load with trust_remote_code where this package is not importable at all."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from modeling_mrovseg import MROVSegForOpenVocabSegmentation
from tests.helpers import random_image, tiny_config, tiny_processor

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mrovseg"] = None  # any import of the package now fails
    try:
        import modeling_mrovseg  # noqa: F401
        raise SystemExit("package still importable")
    except ImportError:
        pass
    import numpy as np, torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
    folder, out = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    assert type(base).__name__ == "MROVSegModel", type(base).__name__
    model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    image = np.load(folder + "/image.npy")
    inputs = processor(image, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**inputs)
    torch.save({"class": outputs.class_queries_logits, "masks": outputs.masks_queries_logits,
                "type": type(model).__name__, "config": type(config).__name__}, out)
    """
)


def test_remote_code_loads_without_the_package(tmp_path):
    torch.manual_seed(0)
    config = tiny_config()
    model = MROVSegForOpenVocabSegmentation(config).eval()
    processor = tiny_processor(config)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"].endswith("MROVSegModel")
    assert saved["auto_map"]["AutoModelForSemanticSegmentation"].endswith("MROVSegForOpenVocabSegmentation")
    assert "AutoImageProcessor" in json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]
    import numpy as np

    image = random_image(90, 150)
    np.save(folder / "image.npy", image)
    with torch.inference_mode():
        expected = model(**processor(image, return_tensors="pt"))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(tmp_path / "out.pt")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["type"] == "MROVSegForOpenVocabSegmentation" and got["config"] == "MROVSegConfig"
    torch.testing.assert_close(got["class"], expected.class_queries_logits, rtol=1e-5, atol=1e-5)  # other process, other thread count
    torch.testing.assert_close(got["masks"], expected.masks_queries_logits, rtol=1e-5, atol=1e-5)  # other process, other thread count


PIPELINE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mrovseg"] = None  # as on a machine without this package
    import numpy as np
    from transformers import pipeline
    folder = sys.argv[1]
    segmenter = pipeline("mrovseg-zero-shot-image-segmentation", model=folder, trust_remote_code=True)
    assert type(segmenter).__module__.startswith("transformers_modules"), type(segmenter).__module__
    result = segmenter(np.load(folder + "/image.npy"), candidate_labels="cat; dog, puppy")
    np.save(folder + "/remote_labels.npy", result["label_map"])
    """
)


def test_checkpoint_carries_its_zero_shot_pipeline(checkpoint, tmp_path):
    import shutil

    import numpy as np
    from transformers import pipeline

    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, folder)
    assert (folder / "pipelines.py").is_file()
    image = random_image(70, 110)
    np.save(folder / "image.npy", image)
    local = pipeline("zero-shot-image-segmentation", model=str(folder))  # installed: no trust_remote_code needed
    expected = local(image, candidate_labels="cat; dog, puppy")["label_map"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.array_equal(np.load(folder / "remote_labels.npy"), expected)


OLD_TRANSFORMERS_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_mrovseg"] = None  # as on a machine without this package
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, AutoProcessor, pipeline
    folder = sys.argv[1]
    loaders = {"AutoImageProcessor": lambda: AutoImageProcessor.from_pretrained(folder, trust_remote_code=True),
               "AutoProcessor": lambda: AutoProcessor.from_pretrained(folder, trust_remote_code=True),
               "AutoConfig": lambda: AutoConfig.from_pretrained(folder, trust_remote_code=True),
               "model": lambda: AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True),
               "pipeline": lambda: pipeline("mrovseg-zero-shot-image-segmentation", model=folder,
                                            trust_remote_code=True)}
    # what the remote code reads (transformers swaps its module in sys.modules on first use, so set it after that);
    # each loader twice: a module that failed once is not left half-loaded
    for version in ("4.57.6", "5.20.0", "5.20.0"):
        sys.modules["transformers"].__version__ = version
        for name, load in loaders.items():
            try:
                load()
                raise SystemExit(f"{name} loaded")
            except ImportError as error:
                print(name, str(error).strip().splitlines()[-1])
    """
)


def test_remote_code_under_an_older_transformers_names_the_version_it_needs(checkpoint, tmp_path):
    """With transformers 4, a Hub checkpoint's remote code failed inside transformers' module loader ("cannot import
    name 'initialization' from 'transformers'"), and with 5.0-5.20 (which pyproject allowed) inside its configs
    ("'dict' object has no attribute 'num_hidden_layers'"); every way of loading it now names the version to
    install, each time it is tried (checked by hand with transformers 4.57.6, 5.0, 5.12, 5.18-5.20; 5.21 works)."""
    import shutil

    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-c", OLD_TRANSFORMERS_SCRIPT, str(folder)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 15, result.stdout
    for line, version in zip(lines, ["4.57.6"] * 5 + ["5.20.0"] * 10):
        assert line.endswith(f" MROVSeg's code needs transformers 5.21 or newer, and this Python has transformers "
                             f"{version}: pip install -U 'transformers>=5.21'"), line
