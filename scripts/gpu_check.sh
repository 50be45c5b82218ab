#!/usr/bin/env bash
# The bf16 engine path of verl-mtp on one GPU, in one command (at most 8 minutes on an H200).
#
#   scripts/gpu_check.sh [--wheels DIR] [gpu_check.py options...]
#
# Runs scripts/gpu_check.py --device cuda: verl's real MegatronEngineWithLMHead in bf16 on CUDA,
# a random checkpoint written locally (nothing is downloaded), and prints one table (forward,
# rl+OCC update, chunked vs unchunked MTP log-probs, on-policy delta_RL, step time and peak memory
# with and without MTP). Exit status: 0 all rows finite, 1 a row is not, 2 no GPU / bad
# arguments, 124 over the time limit.
#
# --wheels DIR: first install verl-mtp and its dependencies from the wheels in DIR, offline
# (pip --no-index --find-links DIR); without it the current Python environment must already
# have them (torch with CUDA, megatron-core, verl 0.9.1, mbridge, verl-mtp).
set -euo pipefail

LIMIT_S=${GPU_CHECK_LIMIT_S:-480}
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == "--wheels" ]]; then
    WHEELS=${2:?--wheels needs a directory}
    shift 2
    [[ -d "$WHEELS" ]] || { echo "gpu_check: --wheels $WHEELS: not a directory" >&2; exit 2; }
    "$PYTHON" -m pip install --quiet --no-index --no-build-isolation --find-links "$WHEELS" -e "$ROOT"
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (run scripts/gpu_check.py --device cpu --quick for the CPU mode)" >&2
    exit 2
fi

# the rest of the budget for the check itself (the install above counts against it)
remaining=$((LIMIT_S - SECONDS))
cd "$ROOT"
exec timeout --signal=TERM --kill-after=10 "$remaining" "$PYTHON" scripts/gpu_check.py --device cuda "$@"
