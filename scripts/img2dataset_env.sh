#!/usr/bin/env bash
# A separate venv with the real img2dataset, for tests/unit/io/test_img2dataset_layouts.py.
#
# Why separate: img2dataset 1.47.0 pins webdataset<0.3 and pandas<3 and pulls in wandb and albumentations,
# none of which the project venv can take. The tests only call its `img2dataset` command as a subprocess.
#
# Idempotent: a stamp named after the version says the install finished; with it present this exits at once,
# so CI (and `make test`) can run it every time. Override the place with IMG2DATASET_VENV, uv with UV and the
# interpreter with PY.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=1.47.0
VENV=${IMG2DATASET_VENV:-.venv-img2dataset}
UV=${UV:-$(test -x .venv/bin/uv && echo .venv/bin/uv || command -v uv)}
PY=${PY:-python3.11}
STAMP="$VENV/.installed-img2dataset-$VERSION"

if [ -f "$STAMP" ] && [ -x "$VENV/bin/img2dataset" ]; then
  exit 0
fi
start=$(date +%s)
# uv writes a `.gitignore` holding `*` into the venv, so the folder never shows up in `git status`.
"$UV" venv --quiet --allow-existing --python "$PY" "$VENV"
"$UV" pip install --quiet --python "$VENV/bin/python" "img2dataset==$VERSION"
# Imports every dependency once, so a broken install fails here (albumentations' update check, a network
# call, stays off).
NO_ALBUMENTATIONS_UPDATE=1 "$VENV/bin/python" -c "import img2dataset.main"
touch "$STAMP"
echo "img2dataset $VERSION installed in $VENV in $(( $(date +%s) - start )) s"
