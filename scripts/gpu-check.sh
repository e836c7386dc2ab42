#!/usr/bin/env bash
# The CUDA checks, for a machine with an NVIDIA GPU (none in CI): the CUDA tests, then decode
# benchmarks against transformers on the same GPU. Results go to $OUT (default /tmp/gpu-check);
# the exit status is the tests'.
#   bash scripts/gpu-check.sh
# Packages that machine lacks can lie as wheels in .whl/ (installed into /tmp/site, no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TPLLAMA_CACHE=${TPLLAMA_CACHE:-/tmp/tpllama-cache}
# CPU references in the tests use the pure-PyTorch path: no C++ build on that machine
export TPLLAMA_NO_KERNELS=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest.log"
tests=$?

bench() {  # NAME TIMEOUT ARGS...
    local name=$1 limit=$2; shift 2
    echo "== tpllama bench $*"
    timeout "$limit" python3 -m tpllama bench --device cuda --world-size 1 --no-progress --json "$OUT/$name.json" "$@" \
        2>&1 | tee "$OUT/$name.log" | grep -v Warning
}
bench smollm2-bf16-cuda-1024 180 --synthetic smollm2-135m --dtype bfloat16 --quant none --compare hf --repeat 1
bench llama7b-bf16-cuda-128 120 --synthetic llama-7b --dtype bfloat16 --quant none --input-len 128 --output-len 128 --repeat 2
exit $tests
