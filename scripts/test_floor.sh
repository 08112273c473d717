#!/usr/bin/env bash
# The test suite against the oldest versions pyproject.toml allows (scripts/floor_constraints.txt), in .venv-floor:
# run it when a floor moves. Not part of CI (a second install and a second suite run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# two tests of transformers 5.21 itself, not of this package: SegFormer's image processor needs torchvision there
# (never installed here), and that sdist's own mixin test imports a module its sdist lacks
export VENV=.venv-floor PIP_CONSTRAINT=scripts/floor_constraints.txt
exec bash scripts/test.sh \
  --deselect tests/test_pipelines_and_cli.py::test_the_stock_task_serves_other_models_as_before \
  --deselect tests/test_transformers_mixins.py::MROVSegImageProcessingTest::test_pil_can_load_without_torchvision "$@"
