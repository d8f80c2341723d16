#!/usr/bin/env bash
# The GPU checks, for a machine with a CUDA GPU, in under 5 minutes: the CUDA tests, then
# batched clients vs client after client on the GPU (W1: 20 x 250 CIFAR-10, W2: 100 x 100, 10
# per round). Prints JSON lines; nothing else in the project needs a GPU.
#
#   bash benchmarks/gpu_check.sh            (from the repository root, with flexray installed)
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import json, torch
assert torch.cuda.is_available(), "gpu_check: no CUDA device visible to torch"
print(json.dumps({"check": "cuda", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}))
PY
timeout 120 python -m pytest -q -p no:cacheprovider -m cuda tests/test_batched.py tests/test_device_clean.py
timeout 90 python benchmarks/batched_clients.py --device cuda --workloads W1,W2 --rounds 5
# the width and depth methods' stacks (one rate / one depth per stack), W1 only
timeout 30 python benchmarks/batched_clients.py --device cuda --workloads W1 --rounds 3 --method heterofl || true
timeout 30 python benchmarks/batched_clients.py --device cuda --workloads W1 --rounds 3 --method flextrain || true
