"""Timing a call on a shared machine: the fastest of a few repeats, with the GPU's queued work waited for.
Used by the benchmark (tinyavl/bench.py) for its rates, by the kernel's CPU smoke run
(kernels/bench_sparse_attention.py), and by `model.faster_keys_first` to choose between two equal
products by their speed on a CPU."""
import time

import torch


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a timer stops when the work is done, not when it was
    queued. A no-op in a CPU run (CUDA never initialised)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls (after one warm-up): the least disturbed by a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)
