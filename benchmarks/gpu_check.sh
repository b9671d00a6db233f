#!/usr/bin/env bash
# The GPU check of issue 13 in one run, on a machine with torch preinstalled and no network:
# install the project over wheels brought along, then the step and data benchmarks, a 200-step
# SimSiam pretraining on CUDA (AMP, augmentation on the accelerator) with kNN and the fast linear
# probe on its features, and the tiny segmentation / detection recipes where their extras import.
# Every step is timed and logged into $OUT; $OUT/summary.md collects statuses and numbers. A
# failing step does not stop the others (the exit status says whether all passed), and the
# whole run stops starting steps past $BUDGET seconds (default 470 on CUDA: under 8 minutes).
#
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh          # on the GPU machine
#   bash benchmarks/gpu_check.sh --cpu                           # the same steps, tiny, on the CPU
#
# WHEELS: a directory filled by benchmarks/gpu_wheels.sh (unset: nothing is installed, the
# environment must already hold the project). OUT: where everything goes (./gpu_check_out).
# PYTHON: the interpreter (python3).
set -uo pipefail

mode=cuda
case "${1:-}" in
    --cpu) mode=cpu ;;
    "") ;;
    *) echo "usage: $0 [--cpu]   (env: WHEELS, OUT, PYTHON, BUDGET)" >&2; exit 2 ;;
esac
[[ "${DEVICE:-}" == cpu ]] && mode=cpu

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mkdir -p "${OUT:-gpu_check_out}" && cd "${OUT:-gpu_check_out}" && pwd)
PYTHON=${PYTHON:-python3}  # the GPU image's interpreter with torch is python3
export SSLBENCH_DATA="$OUT/data"  # the synthetic data is generated here, once
export SSLBENCH_CACHE="$OUT/feature_cache"
export PYTHONUNBUFFERED=1
cd "$repo" || exit 1

# Sizes: the issue's on CUDA; on the CPU the same code paths, small enough for a few minutes.
if [[ $mode == cuda ]]; then
    BUDGET=${BUDGET:-470}
    step_limit=180
    step_args=(--methods simclr,byol,barlow_twins,unigrad --device cuda)
    throughput_args=(--device cuda --images 1024 --batch-size 256 --workers 4)
    # 1,600 train images / batch 64 = 25 steps an epoch; 8 epochs = 200 steps
    pretrain_args=(data.image_size=64 backbone.width=64 optim.batch_size=64 train.epochs=8
        data.num_workers=4 train.device=cuda train.amp=true)
    eval_args=(data.image_size=64 run.device=cuda)
    seg_args=(run.device=cuda)
    det_args=(run.device=cuda)
else
    BUDGET=${BUDGET:-600}
    step_limit=300  # ResNet-50 with the ImageNet recipes' heads (Barlow Twins' 8192-d) on the CPU
    step_args=(--methods simclr,byol,barlow_twins,unigrad --device cpu --batch 2 --size 32
        --steps 1 --warmup 1)
    throughput_args=(--device cpu --images 32 --batch-size 16 --workers 1 --image-size 64)
    # 8 classes x 16 train images = 2 steps of 64 an epoch, 2 epochs
    pretrain_args=(data.image_size=32 backbone.width=8 optim.batch_size=64 train.epochs=2
        data.num_workers=0 train.device=cpu data.options.train_per_class=16
        data.options.val_per_class=4 data.options.test_per_class=4)
    eval_args=(data.image_size=32 run.device=cpu data.options.train_per_class=16
        data.options.val_per_class=4 data.options.test_per_class=4)
    seg_args=(run.device=cpu solver.max_iters=4 solver.batch_size=4
        data.options.train_per_class=16 data.options.val_per_class=4
        data.options.test_per_class=4)
    det_args=(run.device=cpu solver.max_iter=4 solver.steps=[2,3] solver.warmup_iters=1
        test.precise_bn_iters=1 data.options.train_per_class=16 data.options.val_per_class=4
        data.options.test_per_class=4)
fi
run_dir="$OUT/runs/simsiam_check"
results="$OUT/results"

summary="$OUT/summary.md"
start=$SECONDS
failed=0
{
    echo "# gpu_check ($mode) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
} >"$summary"

# step NAME LIMIT CMD...: run CMD with its output in $OUT/NAME.log, at most LIMIT seconds and never
# past the budget; one summary row.
step() {
    local name=$1 limit=$2 status rc began
    shift 2
    local left=$((BUDGET - (SECONDS - start)))
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "| $name | skipped: out of time | 0 |" >>"$summary"
        failed=1
        return
    fi
    echo "== $name (at most ${limit}s)"
    began=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    ((rc == 0)) || failed=1
    echo "| $name | $status | $((SECONDS - began)) |" >>"$summary"
    echo "   $status; last lines:"
    tail -n 5 "$OUT/$name.log" | sed 's/^/   /'
}

# An optional step whose extra may be missing: a summary row saying so, not a failure.
unavailable() {
    echo "| $1 | not run: $2 | 0 |" >>"$summary"
}

step environment 60 bash -c "nvidia-smi || true; $PYTHON -c 'import sys, torch
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)
print(\"device\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")'"
if [[ -n "${WHEELS:-}" ]]; then
    # --no-deps everywhere: the machine's torch, numpy, etc. stay as they are.
    step install 120 bash -c "$PYTHON -m pip install --no-index --no-deps '$WHEELS'/*.whl &&
        $PYTHON -m pip install --no-index --no-deps --no-build-isolation -e ."
fi
step imports 60 "$PYTHON" -c "import sslbench.cli, pretrain.engine, evaluators.knn, faiss, kornia
import omegaconf, pycocotools, submitit, mlxtend, webdataset; print('imports ok')"
step gpu_step "$step_limit" "$PYTHON" benchmarks/gpu_step.py "${step_args[@]}"
step data_throughput 90 "$PYTHON" benchmarks/data_throughput.py "${throughput_args[@]}"
step pretrain_simsiam 150 "$PYTHON" -m sslbench.cli pretrain \
    configs/pretrain/simsiam_synthetic_r18.yaml "${pretrain_args[@]}" \
    augment.device=accelerator train.progress=false run.name=simsiam_check \
    run.output_dir="$OUT/runs"
if [[ -f "$run_dir/backbone.json" ]]; then
    step knn 60 "$PYTHON" -m sslbench.cli eval knn --backbone "$run_dir" --out "$results" \
        "${eval_args[@]}" run.progress=false
    step linear_fast 60 "$PYTHON" -m sslbench.cli eval linear --backbone "$run_dir" \
        --out "$results" "${eval_args[@]}" run.progress=false
    if "$PYTHON" -c "from transfer.segmentation.model import require_mmseg; require_mmseg()" \
        >"$OUT/segmentation_import.log" 2>&1; then
        step segmentation 90 "$PYTHON" -m sslbench.cli transfer segmentation \
            --backbone "$run_dir" --out "$results" \
            --config configs/transfer/segmentation_synthetic_r18_fcn.yaml "${seg_args[@]}"
    else
        unavailable segmentation "mmsegmentation does not import (segmentation_import.log)"
    fi
    if "$PYTHON" -c "import pycocotools, torchvision" >"$OUT/detection_import.log" 2>&1; then
        step detection 90 "$PYTHON" -m sslbench.cli transfer detection \
            --backbone "$run_dir" --out "$results" \
            --config configs/transfer/detection_synthetic_r18_fpn.yaml "${det_args[@]}" \
            data.root="$OUT/data/synthetic-shapes-colour"  # the recipe's colour style
    else
        unavailable detection "pycocotools or torchvision does not import (detection_import.log)"
    fi
else
    unavailable "knn, linear_fast, segmentation, detection" "no pretrained backbone"
fi

# The numbers: each benchmark's closing lines, the pretraining's speed, every record's metrics.
{
    echo
    echo "total: $((SECONDS - start)) s"
    for name in environment gpu_step data_throughput; do
        [[ -f "$OUT/$name.log" ]] || continue
        printf '\n## %s\n\n```\n' "$name"
        tail -n 25 "$OUT/$name.log"
        printf '```\n'
    done
    printf '\n## pretraining and records\n\n```\n'
    "$PYTHON" - "$run_dir" "$results" <<'EOF'
import json, sys
from pathlib import Path

run_dir, results = Path(sys.argv[1]), Path(sys.argv[2])
manifest = run_dir / "backbone.json"
if manifest.is_file():
    m = json.loads(manifest.read_text())
    batch = m["config"]["optim"]["batch_size"]
    print(f"simsiam: {m['steps']} steps of {batch} in {m['train_seconds']:.1f} s "
          f"({m['steps'] * batch / m['train_seconds']:.0f} images/s, loader and logging included)")
for path in sorted(results.glob("*.json")):
    r = json.loads(path.read_text())
    index = r["details"].get("index", "")
    print(r["task"], r["device"], json.dumps(r["metrics"]), index)
EOF
    printf '```\n'
} >>"$summary" 2>&1
echo "summary: $summary"
cat "$summary"
exit $failed
