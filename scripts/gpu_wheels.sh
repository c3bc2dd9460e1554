#!/bin/sh
# The wheels a bare GPU machine needs beside its image to run scripts/gpu_check.py (and the quickstart, and a
# search): the dependencies its image lacks, for its Python 3.12, at the versions this machine's venv runs.
#
#   scripts/gpu_wheels.sh .whl        # here, where pip can download; about 8 MB
#   # there:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
#   python scripts/gpu_check.py --out gpu_check
#
# Its image has torch (CUDA), Lightning, onnx, onnxruntime, onnxscript, click, rich, matplotlib, scikit-learn,
# PyYAML and transformers; it lacks pydantic (the recipe), torch-pruning (channel pruning) and optuna (the
# search). A wheel already there in another version is left alone (typing_extensions, SQLAlchemy's greenlet).
set -e
dest=${1:-.whl}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$dest"
pins=$("$python" - <<'PY'
from importlib.metadata import version
names = ["pydantic", "pydantic_core", "annotated-types", "typing-inspection", "torch-pruning", "optuna", "alembic",
         "colorlog", "SQLAlchemy", "Mako"]
print(" ".join(f"{n}=={version(n)}" for n in names))
PY
)
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" $pins
ls -1 "$dest"
du -sh "$dest"
