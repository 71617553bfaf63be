#!/usr/bin/env bash
# fasttrain's pure-Python dependencies that the lent GPU machine's image lacks (it has torch, torchvision, numpy,
# pillow, tqdm, matplotlib, nvidia-ml-py, pytest, pytest-benchmark; not tomli-w), as wheels in .whl/ (ignored
# by git) for a `run` call to carry. Run here, from the project's root, once per session:
#   bash tools/device_wheels.sh
# then in the call that installs DALI (the last of ../shared/device/README.md's five), carry ".whl" too and add
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
root=$(git rev-parse --show-toplevel)
mkdir -p "$root/.whl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d "$root/.whl" "tomli-w>=1.0" 2> >(grep -v "^WARNING: Location" >&2)
ls "$root/.whl"
