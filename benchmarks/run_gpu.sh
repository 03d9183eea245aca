#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for the device tool, or any CUDA machine):
# build kdfast's CUDA kernels against the machine's own PyTorch, run the GPU tests, run the
# GPU benchmarks. Results land in benchmarks/results/ (and in $OUT when it is set), each
# row with the device, the commit and the date.
#   bash benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
results=benchmarks/results
mkdir -p "$results"

# Wheels carried in .whl/ (the device tool's way to bring packages): liger-kernel, for
# the large-C comparison.
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/kdfast-site .whl/*.whl
  export PYTHONPATH="/tmp/kdfast-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
KDFAST_CUDA=1 "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
"$PYTHON" -c "import kdfast; print(*kdfast.backends().values(), sep='\n')"

# The GPU-marked tests (the modules below do not need torchsort, which is not installed there).
set +e
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py tests/test_edge_cases.py \
  tests/test_backends.py tests/test_train.py tests/test_reskd.py 2>&1 | tee "$results/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
set -e

"$PYTHON" benchmarks/bench_losses.py --preset gpu --output losses_gpu.csv
"$PYTHON" benchmarks/choose_backends.py --csv losses_gpu.csv   # what backend="auto" runs on this GPU
"$PYTHON" benchmarks/bench_losses.py --preset gpu-large-c --output losses_gpu_large_c.csv \
  --plot "$results/losses_gpu_large_c.png"

# The input pipelines on the GPU: nvJPEG decode through DALI when DALI is installed (it is
# carried as a wheel in .whl/ like liger-kernel), the PyTorch fallback delivering to the GPU.
data_providers="torch-gpu"
if "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then data_providers="dali-gpu torch-gpu"; fi
"$PYTHON" benchmarks/bench_data.py --providers $data_providers --workers 16 --batch-size 256 \
  --output data_gpu.csv || echo "bench_data.py failed (scikit-learn missing for its photos?)"

# A full KD step (ResNet-34 → ResNet-18, CMKD, bf16, channels_last, 224 px): device-resident
# data vs fed by each loader (the target: DALI-fed >= 90 % of synthetic).
"$PYTHON" benchmarks/bench_train.py --preset imagenet --workers 16 --output train_gpu.csv \
  || echo "bench_train.py failed"

if [ -n "${OUT:-}" ]; then
  cp "$results"/data_gpu.csv "$results"/train_gpu.csv "$OUT"/ 2>/dev/null || true
  cp "$results/gpu_tests.log" "$results/losses_gpu.csv" "$results/losses_gpu_large_c.csv" \
    "$results/losses_gpu_large_c.png" kdfast/backend_choice.json "$OUT"/
fi
exit "$tests_status"
