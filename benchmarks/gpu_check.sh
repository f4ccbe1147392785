#!/usr/bin/env bash
# The one prepared GPU check (issue 11): prints every GPU row the README's Benchmarks need,
# in under 8 minutes on one GPU. Run it once on a machine with a CUDA GPU and paste its
# output (with the card's name, printed first) into the README:
#
#   bash benchmarks/gpu_check.sh
#   GVSL_OFFICIAL_DIR=/path/to/GVSL/PyTorch bash benchmarks/gpu_check.sh   # + the official code's row
#   GVSL_GPU_CHECK_TINY=1 bash benchmarks/gpu_check.sh                     # same steps, tiny, on a CPU
#
# Rows: pre-training throughput at default width, 128^3, batch 2, fp32 and mixed precision
# (and the official code's step when GVSL_OFFICIAL_DIR is set); match latency at 128^3
# without refinement (--refine-iters 0) and with the default schedule; peak GPU memory
# (a column of both tables); a 1-GPU torchrun NCCL all-reduce and a torchrun pre-training run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/GVSLExtension${PYTHONPATH:+:$PYTHONPATH}"
OFFICIAL=${GVSL_OFFICIAL_DIR:-}
if [[ "${GVSL_GPU_CHECK_TINY:-0}" == 1 ]]; then
    DEVICE=cpu WIDTH=0.25 PATCH=32 BATCH=2 SIZE=32 STEPS=1 WARMUP=0 LIMIT=300 BACKEND=gloo SMOKE_PATCH=32
else
    DEVICE=cuda WIDTH=1 PATCH=128 BATCH=2 SIZE=128 STEPS=5 WARMUP=2 LIMIT=150 BACKEND=nccl SMOKE_PATCH=64
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
section() { echo; echo "## $1 ($((SECONDS - START)) s so far)"; }
# One failing step must not hide the rows of the others: report it and go on.
run() { timeout "$LIMIT" "$@" 2>"$WORK/stderr" || { echo "FAILED ($?): $*"; tail -n 5 "$WORK/stderr"; }; }

section "machine"
if [[ $DEVICE == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

section "pre-training throughput: width $WIDTH, ${PATCH}^3, batch $BATCH, fp32 and mixed precision"
run $PY benchmarks/pretrain_throughput.py --device $DEVICE --width $WIDTH --patch $PATCH --batch $BATCH \
    --steps $STEPS --warmup $WARMUP --configs fp32-plain,auto ${OFFICIAL:+--official "$OFFICIAL"}

section "match latency at ${SIZE}^3 without refinement (--refine-iters 0)"
run $PY benchmarks/match_latency.py --device $DEVICE --sizes $SIZE --configs fp32-plain,auto --refine-iters 0

section "match latency at ${SIZE}^3 with the default refinement"
run $PY benchmarks/match_latency.py --device $DEVICE --sizes $SIZE --configs auto

section "torchrun, 1 process: $BACKEND all-reduce"
cat > "$WORK/allreduce.py" <<PYEOF
import os, torch, torch.distributed as dist
dist.init_process_group("$BACKEND")
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if "$BACKEND" == "nccl" else torch.device("cpu")
value = torch.ones(4, device=device) * (dist.get_rank() + 1)
dist.all_reduce(value)
print("$BACKEND all_reduce ok:", value.tolist(), "world", dist.get_world_size())
dist.destroy_process_group()
PYEOF
run $PY -m torch.distributed.run --standalone --nproc_per_node=1 "$WORK/allreduce.py"

section "torchrun, 1 process: gvsl pretrain (20 steps, width 0.25, ${SMOKE_PATCH}^3)"
$PY - "$WORK/data" <<'PYEOF'
import sys
from pathlib import Path
import SimpleITK as sitk
from gvsl.samples import synthetic_volume
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
for seed in range(2):
    image, _ = synthetic_volume(size=(72, 72, 72), seed=seed)
    sitk.WriteImage(image, str(folder / f"v{seed}.nii.gz"))
PYEOF
run $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m gvsl pretrain --data "$WORK/data" \
    --out "$WORK/run" --patch $SMOKE_PATCH --iters 20 --width 0.25 --device $DEVICE --log-every 10 \
    --progress json >"$WORK/events" || true
grep -E '"event": "(start|done|error)"|FAILED' "$WORK/events" | cut -c1-400 || echo "no start/done event: see above"

section "finished in $((SECONDS - START)) s"
