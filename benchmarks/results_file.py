"""Write one benchmark's section of benchmarks/RESULTS.md between its markers, leaving the others alone."""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    return (f"{platform.machine()}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {datetime.now(timezone.utc):%Y-%m-%d}")


def write_section(name: str, markdown: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)
