#!/usr/bin/env bash
# GPU verification in one go (about 5-8 min on one H100): the cuda-marked tests, the throughput benchmark,
# the vectorised client engine against the sequential one, batched inversion and a few rounds of the
# ResNet-18 CIFAR-10 config, each under its own time limit; then benchmarks/gpu_report.py writes
# benchmarks/results/gpu.md from what the steps wrote (device, torch / CUDA versions, commit, numbers).
#
#   bash benchmarks/gpu_check.sh                      # on a machine with a CUDA GPU
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh  # the same steps on the CPU at toy size (plumbing check)
#
# Environment: PYTHON (default .venv/bin/python, else python3; needs a CUDA build of torch),
# DATA_DIR (MNIST and the CIFAR-10 subset; default: the first of shared/data, ../shared/data,
# ../../shared/data, /work/shared/data that exists), GPU_CHECK_WORK (scratch folder, default runs/gpu_check),
# GPU_CHECK_OUT (default benchmarks/results/gpu.md; a dry run writes runs/gpu_check_dry/gpu.md instead).
# A failing step is recorded (exit status and the end of its output) and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=${GPU_CHECK_DRY_RUN:-0}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${DATA_DIR:-}" ]; then
  for d in shared/data ../shared/data ../../shared/data /work/shared/data; do
    if [ -d "$d" ]; then DATA_DIR=$d; break; fi
  done
fi
if [ -z "${DATA_DIR:-}" ] || [ ! -d "$DATA_DIR/cifar-10-subset" ] || [ ! -d "$DATA_DIR/mnist" ]; then
  echo "error: DATA_DIR must hold mnist/ and cifar-10-subset/ (see /work/shared/data/README.md); got '${DATA_DIR:-}'" >&2
  exit 2
fi
DATA_DIR=$(cd "$DATA_DIR" && pwd)

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  WORK=${GPU_CHECK_WORK:-runs/gpu_check_dry}
  OUT=${GPU_CHECK_OUT:-$WORK/gpu.md}
else
  DEVICE=cuda
  WORK=${GPU_CHECK_WORK:-runs/gpu_check}
  OUT=${GPU_CHECK_OUT:-benchmarks/results/gpu.md}
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: $PYTHON has no usable CUDA device (torch.cuda.is_available() is False); for a plumbing check" \
         "on the CPU run GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh" >&2
    exit 2
  fi
fi
rm -rf "$WORK"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1

FLSEC=("$PYTHON" -c 'import sys; from flsec.cli import main; sys.argv[0] = "flsec"; main()')

# The whole script stays within GPU_CHECK_BUDGET seconds (default 560, under a 10-min session): each step's
# limit is cut to what is left, and a step with under 20 s left is skipped (recorded as such).
BUDGET=${GPU_CHECK_BUDGET:-560}
START=$(date +%s)

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, keep the output, the exit status and the seconds.
step() {
  local name=$1 limit=$2
  shift 2
  printf '%s\n' "$*" > "$WORK/$name.cmd"
  local left=$((BUDGET - 15 - $(date +%s) + START))
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped (${left}s of the ${BUDGET}s budget left)"
    echo "skipped" > "$WORK/$name.rc"
    return
  fi
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  echo "$limit" > "$WORK/$name.limit"
  echo "== $name (limit ${limit}s): $*"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  echo "$rc" > "$WORK/$name.rc"
  "$PYTHON" -c "print(f'{$t1 - $t0:.1f}')" > "$WORK/$name.seconds"
  tail -n 3 "$WORK/$name.log"
  echo "   -> exit $rc in $(cat "$WORK/$name.seconds") s"
}

# Sizes: the real check, or toy sizes that exercise the same code paths on a CPU in a few minutes.
if [ "$DRY" = 1 ]; then
  THROUGHPUT_ARGS=(--parts local round --threads 1 --per-client 8 --no-bf16-rows --rounds 1)
  ENGINE_SETS=(--set model.width=4 --set data.train_size=200 --set data.test_size=50 --repeats 1)
  INVERSION_ARGS=(--iterations 3 --clients 2 --batch 2)
  RESNET_SETS=(--set model.width=4 --set data.train_size=200 --set data.test_size=50 --set training.rounds=2
               --set inversion.iterations=3 --set inversion.max_images=2 --set unlearning.steps=5
               --set unlearning.baselines=false --set 'unlearning.trigger_source="verification"')
  CPU_CONFIG_SETS=(--set training.rounds=2 --set attack.rounds=[2] --set capture.rounds=[2] --set data.train_size=200
                   --set data.test_size=50 --set model.width=4)
else
  THROUGHPUT_ARGS=(--parts local round --threads 1 --rounds 3)
  ENGINE_SETS=(--repeats 2)
  INVERSION_ARGS=(--iterations 500 --clients 10 --batch 5 10 20)
  RESNET_SETS=(--set training.rounds=5 --set inversion.iterations=300 --set unlearning.steps=200
               --set unlearning.retrain_baseline=false)
  CPU_CONFIG_SETS=()
fi

step env 120 "$PYTHON" benchmarks/gpu_report.py --env "$WORK/env.json" --device "$DEVICE"
step cuda_tests 300 "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider -rs tests
step throughput 420 "$PYTHON" benchmarks/throughput.py --data-dir "$DATA_DIR" --device "$DEVICE" \
  "${THROUGHPUT_ARGS[@]}" --out "$WORK/throughput.json"
step engines 240 "$PYTHON" benchmarks/engines_agree.py --config configs/cifar10_resnet18.toml --device "$DEVICE" \
  --set "data.data_dir=\"$DATA_DIR\"" "${ENGINE_SETS[@]}"
step inversion_batched 300 "$PYTHON" benchmarks/inversion_batched.py --data-dir "$DATA_DIR" --device "$DEVICE" \
  --threads 1 "${INVERSION_ARGS[@]}" --work "$WORK/inversion_captures" --out "$WORK/inversion_batched"
step resnet18 420 "${FLSEC[@]}" run --config configs/cifar10_resnet18.toml --device "$DEVICE" -q \
  --set "data.data_dir=\"$DATA_DIR\"" "${RESNET_SETS[@]}" --out "$WORK/resnet18"
step resnet18_cpu_config 300 "${FLSEC[@]}" train --config configs/cifar10_resnet18_cpu.toml --device "$DEVICE" -q \
  --set "data.data_dir=\"$DATA_DIR\"" "${CPU_CONFIG_SETS[@]}" --out "$WORK/resnet18_cpu_config"

"$PYTHON" benchmarks/gpu_report.py --work "$WORK" --out "$OUT" --dry-run "$DRY" \
  --command "$( [ "$DRY" = 1 ] && printf 'GPU_CHECK_DRY_RUN=1 ')bash benchmarks/gpu_check.sh"
echo "wrote $OUT"
