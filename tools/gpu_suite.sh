#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit one 10-minute call of a lent machine with room to spare,
# every stage writing its results into OUT_DIR as it goes (a stage cut off still leaves what it measured):
#
#   tools/gpu_suite.sh OUT_DIR STAGE...        (no stage: quick)
#
#   quick         < 8 min, the headline figures: ResNet-50 224 px model-only ceiling (bf16, channels_last,
#                 compiled) and end to end from JPEG files with DALI and with the GPU cache (fasttrain bench),
#                 the naive script on the same files, fasttrain autotune under 16 GiB twice (the second answer
#                 from the cache), then tools/gpu_targets.py -> targets.md (each target met or not, with figures)
#   data          only make (or find) the benchmark data root and log where it is
#   tests         the `gpu`-marked tests
#   model-resnet50, model-resnet18, model-smallcnn
#                 benchmarks/test_model_step.py for one model (fasttrain per precision and batch, naive)
#   loaders       benchmarks/test_loaders.py (torch, dali, cache, naive)
#   e2e           benchmarks/test_end_to_end.py (resnet50 and resnet18: torch, dali, cache, naive)
#   autotune      fasttrain autotune on ResNet-50 twice, then one epoch of the tuned config (no OOM allowed; its peak
#                 against the budget it was tuned for, in targets.md)
#   speedrun      configs/cifar10-speedrun.toml on CIFAR-10 JPEGs, twice (the second with the compile caches
#                 warm): time to 90.7% test accuracy and the whole run's wall time (issue 22); needs no DALI.
#                 A third warm run without inductor's compile-worker pool started ahead (TORCH_WARM_POOL=0)
#                 The data: ../shared/data/cifar10.tar (FASTTRAIN_SUITE_SHARED), FASTTRAIN_SUITE_CIFAR, or
#                 .xfer/cifar10.tar.gz, which tools/device_cifar.sh makes small enough (20 MB) to carry;
#                 FASTTRAIN_SUITE_SET="key=value ...": extra --set for its runs (a dry run on a small subset)
#   recipe        fasttrain bench on configs/resnet50-imagenet-fast.toml: the compiled step's samples/s at each
#                 progressive training size (160, 192 px), and the loader and end to end at the largest, on the
#                 benchmark data; needs no DALI (its loader is auto)
#   budget        the time budget on CUDA (issue 22: within +-10 %, the schedule complete): the quickstart at 60 s
#                 (benchmarks/test_time_budget.py) and cifar10-speedrun at 40 s (its data and FASTTRAIN_SUITE_SET
#                 as for speedrun); needs no DALI. Each run's train.log says its plan and re-plans
#   summary       tools/bench_summary.py over every bench-*.json present, and tools/gpu_targets.py
#
# Data: Imagenette from ../shared/data (FASTTRAIN_SUITE_SHARED) when present, else ImageNet-size JPEGs generated
# on the machine in parallel (../shared does not travel to a lent machine) under FASTTRAIN_BENCH_CACHE
# (/tmp/fasttrain-bench). Set FASTTRAIN_BENCH_DATA to use a folder of your own. Relative paths are the caller's.
# The lent machine has no `fasttrain` command and no DALI: install DALI first (../shared/device/README.md) and
# carry tomli-w (tools/device_wheels.sh); this script calls `python3 -m fasttrain`.
# On a lent machine: FASTTRAIN_SUITE_BUNDLE=$OUT/quick.tar.gz tools/gpu_suite.sh /tmp/suite quick
# Commit what it writes under benchmarks/results/<date>-<gpu>/ (checkpoints are left out of the bundle).
set -uo pipefail
out=${1:?usage: tools/gpu_suite.sh OUT_DIR [quick|data|tests|model-MODEL|loaders|e2e|autotune|speedrun|budget|recipe|summary]...}
shift
stages=${*:-quick}
here=$(cd "$(dirname "$0")/.." && pwd)
absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }  # against the caller's directory
# Every path a caller gives is made absolute before anything changes directory (data_root's merge runs in
# subshells that cd into each shard: a relative cache path would point inside the shard there).
mkdir -p "$out"
out=$(cd "$out" && pwd)
[ -n "${FASTTRAIN_BENCH_CACHE:-}" ] && FASTTRAIN_BENCH_CACHE=$(absolute "$FASTTRAIN_BENCH_CACHE")
[ -n "${FASTTRAIN_BENCH_DATA:-}" ] && FASTTRAIN_BENCH_DATA=$(absolute "$FASTTRAIN_BENCH_DATA")
[ -n "${FASTTRAIN_SUITE_CIFAR:-}" ] && FASTTRAIN_SUITE_CIFAR=$(absolute "$FASTTRAIN_SUITE_CIFAR")
shared=$(absolute "${FASTTRAIN_SUITE_SHARED:-$here/../shared/data}")
cd "$here"
export PYTHONUNBUFFERED=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# Where torch's folder is read-only (the lent machine's image), no process can keep the .pyc files it compiles: a
# profiled speed run there spent 9 s byte-compiling ~2,300 modules. A writable prefix keeps them, as an install's
# own .pyc files would (the first process still compiles them). Measured with it, a warm run reached its run folder
# about 2 s sooner (16.4 s against 18.2 s); the 10 s before the dataset index stayed, so they are not this.
torch_pyc_writable='import importlib.util as u, os, sys
d = u.find_spec("torch").submodule_search_locations[0]
sys.exit(not os.access(os.path.join(d, "__pycache__"), os.W_OK))'
if [ -z "${PYTHONPYCACHEPREFIX:-}" ] && ! python3 -c "$torch_pyc_writable" 2>/dev/null; then
  export PYTHONPYCACHEPREFIX=${FASTTRAIN_BENCH_CACHE:-/tmp/fasttrain-bench}/pycache
fi
ft=(python3 -m fasttrain)
extra=()  # FASTTRAIN_SUITE_SET's words, never glob patterns ([160,192] stays as it is): --set for the speed runs
read -ra sets <<< "${FASTTRAIN_SUITE_SET:-}"
for kv in ${sets[@]+"${sets[@]}"}; do extra+=(--set "$kv"); done
startup_probe='import time
t0 = time.perf_counter()
import fasttrain.cli, fasttrain.engine, fasttrain.prepare, torch._dynamo, torchvision
t1 = time.perf_counter()
import torch
cuda = torch.cuda.is_available()  # not in a dry run on the CPU
if cuda:
    torch.zeros(1, device="cuda").sum().item()
t2 = time.perf_counter()
print(f"startup probe: imports {t1 - t0:.2f} s, CUDA start and first kernel {t2 - t1:.2f} s (cuda={cuda})")'
status=0

note() {  # log a line; with FASTTRAIN_SUITE_BUNDLE set, re-pack OUT_DIR into that one file (a lent machine
          # returns at most 8 files, so everything travels as one archive, refreshed after every step)
  echo "[$(date +%H:%M:%S)] $*" | tee -a "$out/suite.log" >&2  # stderr: data_root's stdout is its answer
  if [ -n "${FASTTRAIN_SUITE_BUNDLE:-}" ]; then
    tar czf "$FASTTRAIN_SUITE_BUNDLE.part" --exclude='*.pt' -C "$out" . && mv "$FASTTRAIN_SUITE_BUNDLE.part" "$FASTTRAIN_SUITE_BUNDLE"
  fi
}

needs_dali=0
for stage in $stages; do
  # model-*: the step alone; autotune and recipe: data.loader = auto takes the cache or the torch loader without it
  case $stage in quick|tests|loaders|e2e) needs_dali=1 ;; esac
done
SUITE_NEEDS_DALI=$needs_dali python3 - <<'EOF' || exit 2
import importlib.util, os, sys
import torch
needed = ("tomli_w", "pynvml") + (("nvidia.dali",) if os.environ["SUITE_NEEDS_DALI"] == "1" else ())
missing = [m for m in needed if importlib.util.find_spec(m) is None]
if not torch.cuda.is_available() and not os.environ.get("FASTTRAIN_SUITE_CPU"):  # set: a dry run of the script
    sys.exit("no CUDA device: nothing to do")
if missing:
    sys.exit(f"missing on this machine: {', '.join(missing)} (tools/device_wheels.sh, ../shared/device/README.md)")
EOF
[ -f "$out/environment.json" ] || {
  nvidia-smi > "$out/nvidia-smi.txt" 2>&1
  python3 -c "import json; from fasttrain.runtime import environment; print(json.dumps(environment(), indent=2))" \
    > "$out/environment.json"
}

data_root() {  # an ImageFolder root with train/ and val/, made once per machine
  if [ -n "${FASTTRAIN_BENCH_DATA:-}" ]; then echo "$FASTTRAIN_BENCH_DATA"; return; fi
  local cache=${FASTTRAIN_BENCH_CACHE:-/tmp/fasttrain-bench}
  mkdir -p "$cache"
  if [ -f "$shared/imagenette224.tar" ]; then
    [ -d "$cache/imagenette224" ] || tar xf "$shared/imagenette224.tar" -C "$cache"
    echo "$cache/imagenette224"
    return
  fi
  local root=$cache/imagenet-like
  if [ ! -d "$root" ]; then
    # 8 generators in parallel (one is ~100 images/s), merged into one tree under unique names.
    local shards=8 per=${FASTTRAIN_SUITE_PER_SHARD:-1000} k
    local val=$((per / 8))
    rm -rf "$cache/shards"
    for k in $(seq 0 $((shards - 1))); do
      "${ft[@]}" make-data imagenet "$cache/shards/$k" --n $per --val $val --seed "$k" > /dev/null &
    done
    wait
    for k in $(seq 0 $((shards - 1))); do
      (cd "$cache/shards/$k" && find . -name '*.jpg' | while read -r f; do
        d="$cache/merge/$(dirname "$f")"; mkdir -p "$d"; mv "$f" "$d/s${k}_$(basename "$f")"; done)
    done
    mv "$cache/merge" "$root" && rm -rf "$cache/shards"
    note "generated $(find "$root" -name '*.jpg' | wc -l) JPEGs in $root"
  fi
  echo "$root"
}

cifar_root() {  # CIFAR-10 JPEG class folders (train/, test/), extracted once per machine
  local cache=${FASTTRAIN_BENCH_CACHE:-/tmp/fasttrain-bench} src="" tmp
  if [ -n "${FASTTRAIN_SUITE_CIFAR:-}" ]; then
    src=$FASTTRAIN_SUITE_CIFAR
    [ -f "$src" ] || { note "FASTTRAIN_SUITE_CIFAR: $src is not a file"; return 1; }
  else
    for src in "$shared/cifar10.tar" "$here/.xfer/cifar10.tar.gz" ""; do
      [ -n "$src" ] && [ -f "$src" ] && break
    done
  fi
  if [ -z "$src" ]; then
    note "no CIFAR-10 tar: set FASTTRAIN_SUITE_CIFAR, or carry .xfer/cifar10.tar.gz (tools/device_cifar.sh)"
    return 1
  fi
  mkdir -p "$cache"
  if [ ! -d "$cache/cifar10" ]; then  # extracted aside, then renamed: a call cut off mid-way leaves no half tree
    tmp=$(mktemp -d "$cache/.cifar10.XXXXXX")
    tar xf "$src" -C "$tmp" && mv "$tmp/cifar10" "$cache/cifar10" || { rm -rf "$tmp"; return 1; }  # any compression
    rm -rf "$tmp"
  fi
  echo "$cache/cifar10"
}

pytest_bench() {  # pytest_bench NAME ARGS...: one benchmark file or selection, results as they come
  local name=$1; shift
  rm -f "$out/bench-$name.json" "$out/bench-$name.jsonl"  # a stage run again: its per-case log is appended to
  FASTTRAIN_BENCH_DATA=$(data_root) FASTTRAIN_BENCH_LOG="$out/bench-$name.jsonl" \
    python3 -m pytest "$@" --bench-size=gpu -q -rs -p no:cacheprovider -p no:randomly \
    --benchmark-json="$out/bench-$name.json" 2>&1 | tee "$out/bench-$name.txt" || status=1
}

timed() {  # timed NAME CMD...: run, keep its output and wall time (to 0.01 s: a speed run takes seconds)
  local name=$1; shift
  local t0 wall
  t0=$(date +%s.%N)
  "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  echo "wall_s=$wall rc=$rc" >> "$out/$name.txt"
  [ "$rc" -eq 0 ] || status=1
  note "$name: rc=$rc in $wall s"
}

for stage in $stages; do
  note "stage $stage"
  case $stage in
    quick)
      root=$(data_root)
      for backend in dali cache; do  # model-only ceiling, loader alone and end to end, one compile each
        rm -f "$out/quick-bench-$backend.json"  # bench --json never replaces a file: a rerun wrote a -2 beside it
        timed "quick-bench-$backend" "${ft[@]}" bench resnet50-imagenet --set "data.root=$root" \
          --set "data.loader=$backend" --json "$out/quick-bench-$backend.json"
      done
      pytest_bench quick-naive benchmarks/test_end_to_end.py -k "naive and resnet50"
      for run in 1 2; do
        rm -rf "$out/quick-autotune-$run"  # gpu_targets reads the first report in it
        timed "quick-autotune-$run" "${ft[@]}" autotune resnet50-imagenet --set "data.root=$root" \
          --set "train.runs_dir=$out/runs" --out "$out/quick-autotune-$run"
      done
      python3 tools/gpu_targets.py "$out" -o "$out/targets.md" || status=1 ;;
    data)
      root=$(data_root) && note "data root: $root" ;;
    tests)
      python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider -p no:randomly 2>&1 | tee "$out/gpu-tests.txt" \
        || status=1 ;;
    model-*)
      pytest_bench "$stage" benchmarks/test_model_step.py -k "${stage#model-}" ;;
    loaders)
      pytest_bench loaders benchmarks/test_loaders.py ;;
    e2e)
      pytest_bench e2e benchmarks/test_end_to_end.py ;;
    autotune)
      root=$(data_root)
      for run in 1 2; do
        rm -rf "$out/autotune-$run"
        timed "autotune-$run" "${ft[@]}" autotune resnet50-imagenet --set "data.root=$root" \
          --set "train.runs_dir=$out/runs" --out "$out/autotune-$run"
      done
      tuned=$(ls "$out"/autotune-1/*.tuned.toml 2>/dev/null | head -1)
      [ -n "$tuned" ] && timed tuned-epoch "${ft[@]}" train "$tuned" --set train.epochs=1 \
        --set "train.runs_dir=$out/tuned-epoch" -q  # gpu_targets: its peak against the budget
      python3 tools/gpu_targets.py "$out" -o "$out/targets.md" || status=1 ;;
    speedrun)
      if cifar=$(cifar_root); then
        for run in 1 2; do  # the second run finds the compile caches warm (airbench leaves compiling out)
          timed "speedrun-$run" "${ft[@]}" train cifar10-speedrun --set "data.root=$cifar" \
            --set "train.runs_dir=$out/speedrun-$run" ${extra[@]+"${extra[@]}"} -q
        done
        # A third, warm, without inductor's compile-worker pool started ahead (TORCH_WARM_POOL=0: torch starts it at
        # the first kernel it must compile, and a warm run compiles none): the pool is a sidecar process and one
        # worker per core (16), each importing torch beside the run, and shut down at exit; an H200 warm run spent
        # 2 s between its last log line and its exit. speedrun-2 against speedrun-3 says what the pool costs.
        TORCH_WARM_POOL=0 timed speedrun-3 "${ft[@]}" train cifar10-speedrun --set "data.root=$cifar" \
          --set "train.runs_dir=$out/speedrun-3" ${extra[@]+"${extra[@]}"} -q
        # The run's start-up record splits off its imports; this says which (warm, as run 2 found them) and what
        # CUDA's first use costs: `sort -t'|' -k2 -n speedrun-imports.txt | tail` lists the slowest.
        python3 -X importtime -c "$startup_probe" > "$out/speedrun-imports.txt" 2>&1 || status=1
      else
        status=1
      fi
      python3 tools/gpu_targets.py "$out" -o "$out/targets.md" || status=1 ;;
    budget)
      python3 -m pytest benchmarks/test_time_budget.py --bench-size=gpu -q -rs -p no:cacheprovider -p no:randomly \
        --benchmark-json="$out/bench-budget.json" 2>&1 | tee "$out/bench-budget.txt" || status=1
      if cifar=$(cifar_root); then
        timed speedrun-budget "${ft[@]}" train cifar10-speedrun --set "data.root=$cifar" --time-budget 40s \
          --set "train.runs_dir=$out/speedrun-budget" ${extra[@]+"${extra[@]}"} -q
      else
        status=1
      fi
      python3 tools/gpu_targets.py "$out" -o "$out/targets.md" || status=1 ;;
    recipe)  # the compiled step at 160 and 192 px (autotune's size figures are eager, at a 16 GiB batch)
      rm -f "$out/recipe-bench.json"
      timed recipe-bench "${ft[@]}" bench resnet50-imagenet-fast --set "data.root=$(data_root)" \
        --json "$out/recipe-bench.json"
      python3 tools/gpu_targets.py "$out" -o "$out/targets.md" || status=1 ;;
    summary)
      for f in "$out"/bench-*.json; do
        [ -f "$f" ] && { python3 tools/bench_summary.py "$f" -o "${f%.json}.md" --plot "${f%.json}.png" || status=1; }
      done
      python3 tools/gpu_targets.py "$out" -o "$out/targets.md" || status=1 ;;
    *) echo "unknown stage $stage" >&2; status=2 ;;
  esac
  note "stage $stage done (status so far $status)"
done
exit $status
