#!/usr/bin/env bash
# Prints where PyTorch's NCCL lives (the nvidia-nccl-cu13 wheel: include/ and lib/), or nothing
# when that package is absent (then CMake finds a system NCCL). Usage: tools/nccl-root.sh [python]
python=${1:-$(command -v python3 || true)}
[ -n "$python" ] && "$python" -c "import nvidia.nccl as n; print(list(n.__path__)[0])" 2>/dev/null
exit 0
