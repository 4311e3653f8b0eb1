#!/usr/bin/env bash
# Everything that awaits a GPU, in stages that each fit one 10-minute call of the device tool:
#
#   benchmarks/gpu_session.sh tests    # the Triton kernels on CUDA against float64 references
#   benchmarks/gpu_session.sh layer    # benchmarks/gpu_layer.py: the layer table for BENCHMARKS.md
#   benchmarks/gpu_session.sh bench    # inplace-abn bench: network memory and step time at full size
#   benchmarks/gpu_session.sh real     # benchmarks/real_models.py: converted torchvision / timm / smp models
#                                      # (needs those three packages beside torch)
#
# Runs from the repository root with the python3 that holds torch and triton (the GPU machines'
# image has both; nothing is installed). Results go to $OUT (the device tool's folder) or
# ./gpu_results, at most 8 files.
set -uo pipefail
stage=${1:?usage: benchmarks/gpu_session.sh tests|layer|bench|real}
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$out/versions.txt" || exit 1
git rev-parse --short HEAD >>"$out/versions.txt" 2>/dev/null

case "$stage" in
tests)
    INPLACE_ABN_GPU_TESTS=1 TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider \
        tests/test_triton_backend.py 2>&1 | tee "$out/tests.log"
    ;;
layer)
    python3 benchmarks/gpu_layer.py --json "$out/gpu_layer.json" 2>&1 | tee "$out/gpu_layer.md"
    ;;
bench)
    python3 -m inplace_abn.cli bench --json "$out/bench.json" --plot "$out/bench.png" 2>&1 | tee "$out/bench.log"
    ;;
real)
    python3 benchmarks/real_models.py --device cuda --batch 32 --size 224 --json "$out/real_models.json" 2>&1 | tee "$out/real_models.md"
    ;;
*)
    echo "unknown stage $stage: use tests, layer, bench or real" >&2
    exit 2
    ;;
esac
