#!/usr/bin/env bash
# Run HERE (the CPU machine), before benchmarks/gpu_check.sh runs on the device machine: builds
# the git-ignored folder the device run needs besides the working tree, since ../shared does not
# travel and all that travels must stay under 64 MiB:
#   .gpu/openkbp.h5     every OpenKBP validation patient and as many training patients (in natural
#                       order) as fit, imported at 128³ by nasdose's own import (openkbp.json: counts)
#   .gpu/whl/           wheels of what nas_dose imports and the device image lacks (nibabel, pydicom)
# then prints the device call to make. Run it in the checkout whose working tree travels (the
# session's own, not a helper's worktree), after committing what should travel.
#   GPU_PREPARE_SRC     OpenKBP npz tree (default ../shared/openkbp/npz128 beside the repository)
#   GPU_PREPARE_DEST    the folder to build (default .gpu; inside the repository it must be ignored)
#   GPU_PREPARE_GRID, GPU_PREPARE_TRAIN, GPU_PREPARE_VAL, GPU_PREPARE_WHEELS=0   (for the tests)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SRC=${GPU_PREPARE_SRC:-$ROOT/../shared/openkbp/npz128}
DEST=$(realpath -m "${GPU_PREPARE_DEST:-.gpu}")
case "$DEST/" in
  "$ROOT"/*) git check-ignore -q "$DEST/" || { echo "error: $DEST: not ignored by git (it must never be committed)" >&2
                                              exit 1; } ;;
esac
mkdir -p "$DEST"

if [ "${GPU_PREPARE_WHEELS:-1}" = 1 ]; then
  versions=$(python3 -c "import nibabel, pydicom; print(f'nibabel=={nibabel.__version__} pydicom=={pydicom.__version__}')")
  # shellcheck disable=SC2086  # two requirements
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$DEST/whl" $versions
fi

args=(--src "$SRC" --out "$DEST/openkbp.h5" --root "$ROOT" --grid "${GPU_PREPARE_GRID:-128}")
[ -n "${GPU_PREPARE_TRAIN:-}" ] && args+=(--train "$GPU_PREPARE_TRAIN")
[ -n "${GPU_PREPARE_VAL:-}" ] && args+=(--val "$GPU_PREPARE_VAL")
OMP_NUM_THREADS=1 python3 "$ROOT/benchmarks/gpu_check.py" data "${args[@]}"

carry=$(realpath --relative-to="$ROOT" "$DEST")
echo "device call (after status shows can_start_another: true):"
echo "  run(command=\"bash benchmarks/gpu_check.sh\", carry=[\"$carry\"], timeout_s=600)"
