"""Shared pytest set-up.

Triton reads TRITON_INTERPRET when `kernels.sparse_attention` is first imported, so it is set here,
before any test module imports it: without a GPU the kernel runs in Triton's CPU interpreter
(numpy), with a GPU the tests exercise the real compiled kernel.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The session fixture of tiny random llava-hf checkpoints, for every test module.
from tiny_checkpoints import tiny_ckpt  # noqa: E402,F401
