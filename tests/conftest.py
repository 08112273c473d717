import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A Hub-like folder with a random tiny CLIPModel and its tokenizer."""
    from processing.tiny_clip import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_clip_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="session")
def checkpoint(tiny_clip_dir, tiny_tokenizer, tmp_path_factory):
    """A saved tiny MROVSeg (vocabulary sky, road, car) with its processor and tokenizer: what users download."""
    from modeling_mrovseg import MROVSegForOpenVocabSegmentation, MROVSegProcessor
    from tests.helpers import LABELS, TEMPLATES, tiny_processor

    torch.manual_seed(0)
    model = MROVSegForOpenVocabSegmentation.from_clip(
        str(tiny_clip_dir), vocabulary=LABELS, tokenizer=tiny_tokenizer, num_queries=8, hidden_dim=32,
        num_decoder_heads=4, prompt_templates=TEMPLATES).eval()
    processor = MROVSegProcessor(tiny_processor(model.config), tiny_tokenizer, prompt_templates=TEMPLATES)
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
