#!/usr/bin/env bash
# Issue 21's GPU measurements in one run on the device machine (benchmarks/README.md, "GPU check"):
#   1. run_suite.py's loader and runtime benchmarks at the LENAS training size (128³, batch 2):
#      pinned-memory loading, cuDNN autotuning, bf16 autocast, channels-last 3D, torch.compile;
#   2. the default network trained with configs/openkbp_gpu.yaml's training section on the carried
#      OpenKBP patients (benchmarks/gpu_prepare.sh) for as many epochs as fit its time (counted
#      from a 2-epoch probe run), then predicted and scored (OpenKBP dose and DVH scores) on the
#      validation patients.
# Every step has a time limit and the whole run a deadline (560 s), so it ends inside the device's
# 600 s with its results in $OUT: gpu_check.log, summary.json, suite_loader.json, suite_runtime.json,
# probe_log.jsonl, train_log.jsonl, train_metrics.json, eval_metrics.json (the 8 files that come back).
#
#   GPU_CHECK_DRY=1        the same steps on the CPU at a tiny size (tests/test_gpu_check.py)
#   GPU_CHECK_CARRY=DIR    the carried folder (default .gpu: openkbp.h5, openkbp.json, whl/)
#   GPU_CHECK_PARTS        "suite train" (default), or one of them for a rerun, or "pipeline": the
#                          recipe's search, ensemble and distill stages in a smoke run (fewest steps)
#   GPU_CHECK_SUITE        the suite's benchmarks: "loader runtime" (default), or one of them
#   GPU_CHECK_LOADER_S, _RUNTIME_S, _TRAIN_S, _PIPELINE_S, _TOTAL_S   seconds of each part (150, 100,
#                          280, 300) and in all (560)
#   GPU_CHECK_OVERRIDES    more key=value settings of both trainings (e.g. data.num_workers=12)
set -uo pipefail
shopt -s nullglob

ROOT=$(cd "$(dirname "$0")/.." && pwd)
: "${OUT:?set OUT to the folder the results go to}"
OUT=$(realpath -m "$OUT")
CARRY=$(cd "$ROOT" && realpath -m "${GPU_CHECK_CARRY:-.gpu}")
DRY=${GPU_CHECK_DRY:-0}
PARTS=${GPU_CHECK_PARTS:-suite train}
SUITE_PARTS=${GPU_CHECK_SUITE:-loader runtime}
HELPER="$ROOT/benchmarks/gpu_check.py"
DATA="$CARRY/openkbp.h5"
START=$(date +%s)
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
  # Generous limits: a dry run checks that every step works, not how fast (the test machine may be busy).
  LOADER_S=${GPU_CHECK_LOADER_S:-300} RUNTIME_S=${GPU_CHECK_RUNTIME_S:-300} TRAIN_S=${GPU_CHECK_TRAIN_S:-600}
  PIPELINE_S=${GPU_CHECK_PIPELINE_S:-600} SMOKE=(--dry)
  TOTAL_S=${GPU_CHECK_TOTAL_S:-1500}
  RESERVE=150  # seconds kept for predicting and scoring
  MOST=1       # epochs at most (else the recipe's)
  SUITE=(--quick --device cpu --threads 1 --repeats 1)
  TRAIN_SET=(runtime.device=cpu runtime.threads=1 "model.kwargs.widths=[4, 8]")
  PREDICT_SET=(runtime.device=cpu runtime.threads=1)
else
  LOADER_S=${GPU_CHECK_LOADER_S:-150} RUNTIME_S=${GPU_CHECK_RUNTIME_S:-100} TRAIN_S=${GPU_CHECK_TRAIN_S:-280}
  PIPELINE_S=${GPU_CHECK_PIPELINE_S:-300} SMOKE=()
  TOTAL_S=${GPU_CHECK_TOTAL_S:-560}
  RESERVE=60
  MOST=""
  SUITE=(--device cuda --repeats 3)
  TRAIN_SET=()
  PREDICT_SET=()
fi
# More log entries between epoch ends (the steps/s without validation), and the caller's settings.
# shellcheck disable=SC2206  # key=value words
TRAIN_SET+=(log_every=5 ${GPU_CHECK_OVERRIDES:-})

elapsed() { echo $(($(date +%s) - $1)); }

limited() {  # limited SECONDS COMMAND...: run COMMAND, stopped after SECONDS or at the run's deadline
  local secs=$1 left rc t0
  shift
  left=$((TOTAL_S - $(elapsed "$START") - 20))  # 20 s kept for a killed step's exit and the summary
  if [ "$left" -lt "$secs" ]; then secs=$left; fi
  if [ "$secs" -lt 5 ]; then echo "!! not run, the run's ${TOTAL_S} s are spent: $*"; return 124; fi
  echo "+ (limit ${secs} s) $*"
  t0=$(date +%s)
  timeout -k 5 "$secs" "$@"
  rc=$?
  echo "+ took $(elapsed "$t0") s, exit status $rc"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "!! stopped at its limit of ${secs} s"; fi
  return "$rc"
}

install() {  # nas_dose from the working tree, and the carried wheels of what the image lacks
  if python3 -c "import nas_dose.search_spaces, nibabel, pydicom" 2>/dev/null; then
    echo "nas_dose and its imports are there already: nothing installed"
    return 0
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$WORK/site" \
    "$CARRY"/whl/*.whl "$ROOT" || return 1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
}

describe() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
  python3 -c "import os, torch; c = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda',
      torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name() if c else 'no GPU',
      'bf16', c and torch.cuda.is_bf16_supported(), 'cpus', os.cpu_count())"
}

suite() {
  local rc=0
  case " $SUITE_PARTS " in *" loader "*)
    limited "$LOADER_S" python3 "$ROOT/benchmarks/run_suite.py" --only loader "${SUITE[@]}" \
      --out "$OUT/suite_loader.json" || rc=1 ;;
  esac
  case " $SUITE_PARTS " in *" runtime "*)
    limited "$RUNTIME_S" python3 "$ROOT/benchmarks/run_suite.py" --only runtime "${SUITE[@]}" \
      --out "$OUT/suite_runtime.json" || rc=1 ;;
  esac
  return "$rc"
}

train() {
  local start t0 wall left most rc=0
  start=$(date +%s)
  most=$(python3 "$HELPER" config "$ROOT/configs/openkbp_gpu.yaml" "$WORK/train.yaml") || return 1
  most=${MOST:-$most}
  t0=$(date +%s)
  limited $((TRAIN_S / 3)) python3 -m nas_dose train --data "$DATA" --out "$WORK/probe" --config "$WORK/train.yaml" \
    "${TRAIN_SET[@]}" epochs=2 || return 1
  wall=$(elapsed "$t0")
  left=$((TRAIN_S - $(elapsed "$start") - RESERVE))
  EPOCHS=$(python3 "$HELPER" epochs "$WORK/probe" --wall "$wall" --avail "$left" --most "$most") || return 1
  echo "probe: 2 epochs in ${wall} s; ${left} s left for training: ${EPOCHS} epochs"
  limited "$left" python3 -m nas_dose train --data "$DATA" --out "$WORK/run" --config "$WORK/train.yaml" \
    "${TRAIN_SET[@]}" epochs="$EPOCHS" || rc=1
  # Cut short, the run still has the best.pt of its last validation: predict and score that.
  left=$((TRAIN_S - $(elapsed "$start")))
  limited $((left > 30 ? left : 30)) python3 -m nas_dose predict --model "$WORK/run" --data "$DATA" \
    --out "$WORK/pred" --split validation --no-csv "${PREDICT_SET[@]}" || return 1
  left=$((TRAIN_S - $(elapsed "$start")))
  limited $((left > 30 ? left : 30)) python3 -m nas_dose evaluate --pred "$WORK/pred/predictions.h5" \
    --ref "$DATA" --out "$WORK/eval" --split validation --plots 0 || rc=1
  return "$rc"
}

pipeline() {  # every stage's GPU path once: the recipe's sizes, the fewest steps
  python3 "$HELPER" pipeline "$ROOT/configs/openkbp_gpu.yaml" "$WORK/pipeline.yaml" "${SMOKE[@]}" || return 1
  limited "$PIPELINE_S" python3 -m nas_dose pipeline --data "$DATA" --out "$WORK/pipe" --config "$WORK/pipeline.yaml"
}

main() {
  local status=0
  echo "gpu_check $(date -u +%FT%TZ): dry=$DRY, parts '$PARTS', limits: loader ${LOADER_S} s, runtime" \
       "${RUNTIME_S} s, training ${TRAIN_S} s, all ${TOTAL_S} s; data $DATA; work $WORK"
  install || { echo "!! install failed"; return 1; }
  describe
  EPOCHS=""
  case " $PARTS " in *" suite "*) suite || status=1 ;; esac
  case " $PARTS " in *" train "*) train || status=1 ;; esac
  case " $PARTS " in *" pipeline "*) pipeline || status=1 ;; esac
  cp "$WORK/probe/log.jsonl" "$OUT/probe_log.jsonl" 2>/dev/null
  cp "$WORK/run/log.jsonl" "$OUT/train_log.jsonl" 2>/dev/null
  cp "$WORK/run/metrics.json" "$OUT/train_metrics.json" 2>/dev/null
  cp "$WORK/eval/metrics.json" "$OUT/eval_metrics.json" 2>/dev/null
  python3 "$HELPER" summary --out "$OUT" --work "$WORK" --data "$DATA" --wall "$(elapsed "$START")" \
    ${EPOCHS:+--epochs "$EPOCHS"} || status=1
  echo "gpu_check: done in $(elapsed "$START") s, status $status (1: a step failed or stopped at its limit)"
  return "$status"
}

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT  # everything worth keeping is in $OUT
cd "$WORK" || exit 1  # not the repository root: there `nas_dose` would be the source folder, not the package
main 2>&1 | tee "$OUT/gpu_check.log"
