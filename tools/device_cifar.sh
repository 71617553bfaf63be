#!/usr/bin/env bash
# CIFAR-10's JPEGs for the lent GPU machine, where ../shared does not travel: ../shared/data/cifar10.tar (93 MB,
# over the 64 MiB a call carries) gzipped into .xfer/cifar10.tar.gz (about 20 MB: the 60,000 small JPEGs share
# their tables, and the tar's padding goes). Run here, from the project's root:
#   bash tools/device_cifar.sh
# then carry ".xfer/cifar10.tar.gz" (and ".whl", tools/device_wheels.sh) in the call that runs
#   tools/gpu_suite.sh OUT_DIR speedrun
# which finds it there by itself.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
src=${1:-$root/../shared/data/cifar10.tar}
mkdir -p "$root/.xfer"
gzip -1 -c "$src" > "$root/.xfer/cifar10.tar.gz.part"
mv "$root/.xfer/cifar10.tar.gz.part" "$root/.xfer/cifar10.tar.gz"
ls -l "$root/.xfer/cifar10.tar.gz"
