"""Where the Triton kernel tests run: CPU tensors through the interpreter (TRITON_INTERPRET=1,
what tests/conftest.py sets by default: CI), or compiled on a CUDA device (TRITON_INTERPRET=0,
bench/gpu_check.sh on the GPU machine)."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ["cpu"] if INTERPRET else (["cuda"] if torch.cuda.is_available() else [])
needs_kernels = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")
