#!/usr/bin/env bash
# Everything that needs a GPU, in as few calls as a lent machine allows, with its outputs in one folder:
#   tools/gpu_suite.sh OUT_DIR [tests] [bench] [autotune] [e2e]     (no stage named: all of them)
# - tests:    the `gpu`-marked tests (AMP, channels_last, compile, DALI mixed decode, the cache, the probe)
# - bench:    pytest benchmarks/ --bench-size=gpu -> results.json, summary.md, summary.png
# - autotune: `fasttrain autotune` on ResNet-50 224 px under the default 16 GiB budget, twice (the second answer
#             comes from the cache), then the tuned config trained for one epoch (no OOM allowed)
# - e2e:      `fasttrain bench` on the same config: loader-only, model-only, end to end
# Data: Imagenette from ../shared/data (or $FASTTRAIN_BENCH_DATA), else generated ImageNet-size JPEGs.
# On the lent machine DALI must be installed first (../shared/device/README.md); then run with OUT_DIR=$OUT.
# Commit what it writes under benchmarks/results/<date>-<gpu>/ with the environment it records.
set -uo pipefail
out=${1:?usage: tools/gpu_suite.sh OUT_DIR [tests] [bench] [autotune] [e2e]}
shift
stages=${*:-tests bench autotune e2e}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to do')" || exit 2
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import json; from fasttrain.runtime import environment; print(json.dumps(environment(), indent=2))" \
  > "$out/environment.json"
status=0

data_root() {  # an ImageFolder root with train/ and val/
  if [ -n "${FASTTRAIN_BENCH_DATA:-}" ]; then echo "$FASTTRAIN_BENCH_DATA"; return; fi
  local cache=${FASTTRAIN_BENCH_CACHE:-/tmp/fasttrain-bench}
  mkdir -p "$cache"
  if [ -f ../shared/data/imagenette224.tar ]; then
    [ -d "$cache/imagenette224" ] || tar xf ../shared/data/imagenette224.tar -C "$cache"
    echo "$cache/imagenette224"
  else
    [ -d "$cache/imagenet-like" ] || fasttrain make-data imagenet "$cache/imagenet-like" --n 8000 --val 1000 >&2
    echo "$cache/imagenet-like"
  fi
}

for stage in $stages; do
  case $stage in
    tests)
      python3 -m pytest tests -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.txt" || status=1 ;;
    bench)
      python3 -m pytest benchmarks --bench-size=gpu -q -p no:cacheprovider --benchmark-json="$out/results.json" \
        2>&1 | tee "$out/benchmarks.txt" || status=1
      python3 tools/bench_summary.py "$out/results.json" -o "$out/summary.md" --plot "$out/summary.png" || status=1 ;;
    autotune)
      root=$(data_root)
      for run in 1 2; do
        /usr/bin/time -f "autotune call $run: %e s wall" fasttrain autotune resnet50-imagenet \
          --set "data.root=$root" --set "train.runs_dir=$out/runs" --out "$out/autotune-$run" 2>&1 \
          | tee "$out/autotune-$run.txt" || status=1
      done
      tuned=$(ls "$out"/autotune-1/*.tuned.toml 2>/dev/null | head -1)
      [ -n "$tuned" ] && { fasttrain train "$tuned" --set train.epochs=1 --set "train.runs_dir=$out/runs" -q \
        2>&1 | tee "$out/tuned-epoch.txt" || status=1; } ;;
    e2e)
      root=$(data_root)
      fasttrain bench resnet50-imagenet --set "data.root=$root" --json "$out/bench-resnet50.json" 2>&1 \
        | tee "$out/bench-resnet50.txt" || status=1 ;;
    *) echo "unknown stage $stage (tests, bench, autotune, e2e)" >&2; status=2 ;;
  esac
done
exit $status
