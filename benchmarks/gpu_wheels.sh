#!/usr/bin/env bash
# Download, on a machine with network, the wheels benchmarks/gpu_check.sh installs on an offline
# GPU machine that has torch (and the scientific stack) but not these: Python 3.12 builds at
# the versions constraints.txt pins. braceexpand is webdataset's own dependency, which such
# images lack too. No antlr4-python3-runtime: omegaconf 2.4 carries its own copy
# (omegaconf/vendor/antlr4), and the 4.9 runtime older omegaconfs need has no wheel.
#
#   bash benchmarks/gpu_wheels.sh DIR [extra pip download options, e.g. --platform ...]
#   WHEELS=DIR bash benchmarks/gpu_check.sh            # then, on the GPU machine
set -euo pipefail
dir=${1:?usage: $0 DIR [pip download options]}
shift
constraints="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/constraints.txt"
names=(omegaconf faiss-cpu pycocotools submitit mlxtend kornia kornia-rs webdataset braceexpand)
specs=()
for name in "${names[@]}"; do
    pin=$(grep -E "^${name}==" "$constraints") || { echo "$name is not pinned in $constraints" >&2; exit 1; }
    specs+=("$pin")
done
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip download --python-version 3.12 --only-binary=:all: --no-deps -d "$dir" \
    "${specs[@]}" "$@"
ls -l "$dir"
