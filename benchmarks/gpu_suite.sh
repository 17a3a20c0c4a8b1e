#!/usr/bin/env bash
# One prepared run of the GPU benchmarks of docs/performance.md ("GPU figures"): ours and the original PyTorch port
# on the same accelerator, one after the other, for the benchmark DDPM++ and the full vp/cifar10_ddpmpp_continuous
# at batch 128: train step, one score evaluation, PC sampler, likelihood per NFE. Ends within SUITE_SECONDS
# (default 480): each part runs under `timeout` with the smaller of its own cap and the time left, most important
# first (the PyTorch port, then our train steps, PC samplers, likelihoods, fast samplers, fused train steps, memory,
# unrolled fused train steps);
# a part cut or failed is named in the log and leaves a gap in the tables, not a stop. PARTS (default all: "port
# train sampling likelihood fast fused memory unroll") runs only the parts named, e.g. those a cut run left out;
# MODELS (default "benchmark full") the models of the parts timed per model (port, train, sampling, likelihood).
# The fast samplers and the fused train steps always time the benchmark model.
#
#   bash benchmarks/gpu_suite.sh              # on the accelerator machine
#   PARTS="train likelihood" bash benchmarks/gpu_suite.sh
#   MODELS=full PARTS=train bash benchmarks/gpu_suite.sh
#   bash benchmarks/gpu_suite.sh --cpu-smoke  # the same code paths on a CPU, tiny model (minutes, nothing to read)
#   bash benchmarks/gpu_suite.sh --prepare    # here, with a package index: fetch what the offline machine lacks
#
# Results go to $OUT (default ./gpu_results): suite.log (everything printed), env.txt (versions, GPU),
# results.json (every figure, by part), summary.md (the tables of docs/performance.md, ours beside the port's).
#
# What it needs there, and where it looks (paths relative to the repository root):
#   python3 with jax (CUDA build), flax, optax, numpy, scipy, torch (PYTHON / TORCH_PYTHON to pick others);
#   ml_collections: installed, or wheels in .gpu/wheels (installed offline into a temporary folder);
#   the PyTorch port: a runnable copy of github yang-song/score_sde_pytorch (its .py files, with the CUDA extension
#   loads of op/ removed; DDPM++ does not use them) in .gpu/pytorch_port (PORT to change), else the port is skipped.
# --prepare downloads the wheels (pip download, for CPython 3.12 x86-64) and copies PORT_SOURCE (a runnable copy made
# beforehand) into .gpu/pytorch_port; .gpu is git-ignored, so pass it along to the accelerator machine yourself.
# --install instead pip-installs requirements.txt and the CUDA build of JAX (a GPU machine with a package index).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) MODE=smoke ;;
  --prepare) MODE=prepare ;;
  --install) MODE=install ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [--cpu-smoke | --prepare | --install]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
TORCH_PYTHON=${TORCH_PYTHON:-$PYTHON}
PORT=${PORT:-.gpu/pytorch_port}
WHEELS=${WHEELS:-.gpu/wheels}

if [ "$MODE" = prepare ]; then
  mkdir -p "$WHEELS"
  # ml_collections is pure Python; its needs (absl-py, PyYAML) are in the accelerator machine's image.
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$WHEELS" "ml_collections==1.1.0" || exit 1
  if [ -n "${PORT_SOURCE:-}" ]; then
    mkdir -p "$PORT" && cp -r "$PORT_SOURCE"/. "$PORT"/ || exit 1
  fi
  [ -f "$PORT/models/ncsnpp.py" ] || echo "no PyTorch port in $PORT: set PORT_SOURCE to a runnable copy" >&2
  du -sh .gpu
  exit 0
fi
if [ "$MODE" = install ]; then
  "$PYTHON" -m pip install -r requirements.txt && "$PYTHON" -m pip install "jax[cuda12]==0.10.2"
  exit $?
fi

OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # one JSON per part; merged into $OUT/results.json after each part
exec > >(tee "$OUT/suite.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if [ "$MODE" = smoke ]; then
  export JAX_PLATFORMS=cpu
  SUITE_SECONDS=${SUITE_SECONDS:-1500}
  LABELS="tiny"
  declare -A CONFIG=([tiny]=tiny)
  BATCH=4; REPS=2; PC_N=25; TOL=1e-2; FAST=ddim_eta0; TORCH_DEVICE=cpu; TORCH_THREADS=(--threads 1)
  FUSED=2; CAP_SCALE=3  # a loaded CPU compiles slowly
  ONE_DEVICE=(--devices 1)  # train_step.py's CPU default also times 2 host devices
  MEMORY_CONFIG=vp/digits
else
  SUITE_SECONDS=${SUITE_SECONDS:-480}
  LABELS="benchmark full"
  declare -A CONFIG=([benchmark]=benchmark [full]=vp/cifar10_ddpmpp_continuous)
  BATCH=${BATCH:-128}; REPS=10; PC_N=50; TOL=1e-3; FAST=ddim_eta0,dpm_solver2,heun; TORCH_DEVICE=cuda; TORCH_THREADS=()
  FUSED=5; CAP_SCALE=1; ONE_DEVICE=()
  MEMORY_CONFIG=ve/celebahq_256_ncsnpp_continuous
fi
for label in ${MODELS:-$LABELS}; do
  [ -n "${CONFIG[$label]:-}" ] || { echo "MODELS: no model '$label' (models: $LABELS)" >&2; exit 2; }
done
SMALL=${LABELS%% *}  # the model of the fast samplers and the fused train steps
LABELS=${MODELS:-$LABELS}
START=$SECONDS
PARTS=" ${PARTS:-port train sampling likelihood fast fused memory unroll} "
for name in $PARTS; do
  case " port train sampling likelihood fast fused memory unroll " in
    *" $name "*) ;;
    *) echo "PARTS: no part '$name' (parts: port train sampling likelihood fast fused memory unroll)" >&2; exit 2 ;;
  esac
done
wanted() { [[ "$PARTS" == *" $1 "* ]]; }

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_suite_site \
    "$WHEELS"/*.whl && export PYTHONPATH=/tmp/gpu_suite_site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi 2>/dev/null || echo "nvidia-smi: none"
  "$PYTHON" -c "import sys, jax, flax, optax, numpy, scipy, ml_collections; print(sys.version.split()[0], 'jax',
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__, jax.devices())"
  "$TORCH_PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

summarize() {
  "$PYTHON" benchmarks/gpu_summary.py "$WORK" --merged "$OUT/results.json" --markdown "$OUT/summary.md" > /dev/null
}

# part NAME CAP_SECONDS COMMAND...: run COMMAND under the smaller of CAP and the suite's time left.
part() {
  local name=$1 cap=$2 left
  shift 2
  left=$((SUITE_SECONDS - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, the suite's $SUITE_SECONDS s are spent"
    return
  fi
  cap=$((cap * CAP_SCALE))
  [ "$cap" -gt "$left" ] && cap=$left
  echo "=== $name (at most $cap s; $((SECONDS - START)) s into the suite)"
  local t0=$SECONDS
  timeout -k 10 "$cap" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "=== $name: cut after $cap s"
  elif [ $rc -ne 0 ]; then
    echo "=== $name: failed (exit $rc)"
  else
    echo "=== $name: done in $((SECONDS - t0)) s"
  fi
  summarize
}

big() { [ "$1" = full ] && echo "$2" || echo "$3"; }  # the full model's cap, else the smaller one

# Caps from the first H200 run (2026-12-04, docs/performance.md "GPU figures"): the port took 34 s (benchmark) and
# 50 s (full); our benchmark train step compiled in 50 s, the score evaluation with the PC sampler took 42 s and 72 s.
if wanted port; then
  if [ -f "$PORT/models/ncsnpp.py" ]; then
    for label in $LABELS; do
      part "PyTorch port, $label" "$(big "$label" 90 60)" "$TORCH_PYTHON" benchmarks/pytorch_port.py --port "$PORT" \
        --device "$TORCH_DEVICE" --config "${CONFIG[$label]}" --batch "$BATCH" --reps "$REPS" --n "$PC_N" \
        --tol "$TOL" "${TORCH_THREADS[@]}" --out "$WORK/pytorch_$label.json"
    done
  else
    echo "=== PyTorch port: skipped, no runnable copy in $PORT (see the head of this script)"
  fi
fi
if wanted train; then
  for label in $LABELS; do  # one step per call, beside the port's
    part "ours, train step, $label" "$(big "$label" 240 120)" "$PYTHON" benchmarks/train_step.py \
      --config "${CONFIG[$label]}" --batch "$BATCH" --reps "$REPS" --fused 1 "${ONE_DEVICE[@]}" \
      --out "$WORK/train_step_$label.json"
  done
fi
if wanted sampling; then
  for label in $LABELS; do
    part "ours, score evaluation and PC sampler, $label" "$(big "$label" 120 90)" "$PYTHON" benchmarks/sampling.py \
      --config "${CONFIG[$label]}" --batch "$BATCH" --reps 2 --n "$PC_N" --skip_ode --skip_fast \
      --out "$WORK/sampling_$label.json"
  done
fi
if wanted likelihood; then
  for label in $LABELS; do
    part "ours, likelihood, $label" "$(big "$label" 240 120)" "$PYTHON" benchmarks/likelihood.py \
      --config "${CONFIG[$label]}" --batch "$BATCH" --solvers jax --rtol "$TOL" --atol "$TOL" --floor_reps 5 \
      --out "$WORK/likelihood_$label.json"
  done
fi
label=$SMALL
if wanted fast; then
  part "ours, fast samplers, $label" 150 "$PYTHON" benchmarks/sampling.py --config "${CONFIG[$label]}" \
    --batch "$BATCH" --reps 2 --skip_pc --skip_ode --fast "$FAST" --out "$WORK/fastsamplers_$label.json"
fi
if wanted fused; then
  # The configs' n_jitted_steps fused into one call, benchmark model only, in lax.scan (what 'auto' runs off a CPU).
  part "ours, $FUSED fused train steps (scan), $label" 240 "$PYTHON" benchmarks/train_step.py \
    --config "${CONFIG[$label]}" --batch "$BATCH" --reps "$REPS" --fused "$FUSED" --fuse_with scan "${ONE_DEVICE[@]}" \
    --out "$WORK/train_step_fused_$label.json"
fi
if wanted memory; then
  # XLA's compiled memory of the 256² train step with and without remat (on XLA:CPU remat saved nothing,
  # docs/performance.md "Memory"); the table goes to suite.log, the bytes next to the summary.
  part "ours, XLA memory with and without remat, $MEMORY_CONFIG" 120 "$PYTHON" benchmarks/memory.py \
    --configs "$MEMORY_CONFIG" --method xla --variants float32,remat --out "$OUT/memory_xla_256.json"
fi
if wanted unroll; then
  # The same steps unrolled (what 'auto' runs on a CPU): one copy of the step per fused step, whose compilation grows
  # faster than FUSED (docs/performance.md, "Compilation").
  part "ours, $FUSED fused train steps (unrolled), $label" 300 "$PYTHON" benchmarks/train_step.py \
    --config "${CONFIG[$label]}" --batch "$BATCH" --reps "$REPS" --fused "$FUSED" --fuse_with unroll \
    "${ONE_DEVICE[@]}" --out "$WORK/train_step_unrolled_$label.json"
fi

summarize
echo "=== suite finished in $((SECONDS - START)) s; results in $OUT"
cat "$OUT/summary.md"
rm -rf "$WORK"
exec >&- 2>&-  # let tee write the last lines of suite.log before the script returns
wait "$TEE"
