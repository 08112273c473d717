"""transformers' own common test mixins, from the source distribution of the installed transformers version.

The mixins ship in the sdist on PyPI, not in the wheel. They are downloaded once (pinned to the installed
version) into `.cache/`, never committed. Three modules they import are absent from the sdist and are replaced
by minimal stand-ins written here: `ExportTesterMixin` and `GenerationTesterMixin` (empty: MROVSeg neither
generates nor is covered by the export suite), `config_common_kwargs` (our own list of common config fields),
and `fetch_hub_objects_for_ci.url_to_local_path` (identity; the tests that fetch Hub fixtures are skipped).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

VERSION = transformers.__version__
ROOT = Path(__file__).resolve().parents[1] / ".cache" / f"transformers-{VERSION}-common-tests"
PACKAGE = "hf_common_tests"

STUBS = {
    "exporters/__init__.py": "",
    "exporters/test_export.py": "class ExportTesterMixin:\n    pass\n",
    "generation/__init__.py": "",
    "generation/test_utils.py": "class GenerationTesterMixin:\n    pass\n",
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        "config_common_kwargs = {\n"
        "    'return_dict': False, 'output_hidden_states': True, 'chunk_size_feed_forward': 5,\n"
        "    'architectures': ['MROVSegForOpenVocabSegmentation'], 'problem_type': 'regression',\n"
        "    'id2label': {0: 'label'}, 'label2id': {'label': 0},\n"
        "}\n"
    ),
}


def _fetch() -> None:
    package = ROOT / PACKAGE
    if (package / "test_modeling_common.py").exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             f"transformers=={VERSION}", "-d", tmp],
            capture_output=True, text=True, timeout=600,
        )
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            # loudly: a silent skip would drop transformers' whole common suite from the run
            raise RuntimeError(f"could not download the transformers {VERSION} sdist for its common tests (needs the "
                               f"package registry): {result.stderr[-500:]}")
        package.mkdir(parents=True, exist_ok=True)
        prefix = f"{archives[0].name[: -len('.tar.gz')]}/tests/"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                name = member.name[len(prefix) :] if member.name.startswith(prefix) else None
                if name and "/" not in name and name.endswith(".py") and member.isfile():
                    (package / name).write_bytes(archive.extractfile(member).read())
    (package / "__init__.py").write_text("")
    for relative, text in STUBS.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
    (ROOT / "fetch_hub_objects_for_ci.py").write_text("def url_to_local_path(url):\n    return url\n")


def load(module: str):
    """Import `hf_common_tests.<module>` (e.g. "test_modeling_common"), fetching the sdist on first use."""
    _fetch()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"{PACKAGE}.{module}")
