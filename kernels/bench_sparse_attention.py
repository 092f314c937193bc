"""Benchmark of the sparse decode kernel (kernels/sparse_attention.py) against two torch baselines.

    python -m kernels.bench_sparse_attention                     # on a CUDA GPU
    python -m kernels.bench_sparse_attention --peak-gbps 3350    # if the device name is not in the peak table
    TRITON_INTERPRET=1 python -m kernels.bench_sparse_attention  # no GPU: toy sizes in Triton's interpreter

It first runs the flash-attention correctness check (`error_report`) in fp16, bf16 and fp32 on inputs shaped
like an A-VL decode step. Then it times, in fp16 at LLaVA-7B's attention shapes, the kernel, (a) a torch
gather of the selected rows followed by SDPA and (b) dense SDPA over the whole cache, once with each call
launched from Python and once replayed from a CUDA graph, and prints the kernel's achieved bandwidth. Under
the interpreter the sizes are toys and the times mean nothing: the run only shows that the benchmark code
works.
"""
import re
from typing import NamedTuple

# tinyavl first, before torch: in a command, a Ctrl-C while torch imports is one line (tinyavl/startup.py).
from tinyavl.cli import ArgumentParser, check_stdout_open, first_paragraph, run_main
from tinyavl.errors import UserError
from tinyavl.timing import best_seconds, synchronize

import torch
import torch.nn.functional as F

from kernels.sparse_attention import (INTERPRETED, SUPPORTED_DTYPES, TRITON_AVAILABLE, error_report,
                                      format_report, gather_selected_rows, sparse_decode_attention,
                                      why_unsupported)


# ----------------------------------------------------------------------------------------------------------
# Inputs shaped like an A-VL decode step, and the two torch baselines of the benchmark
# ----------------------------------------------------------------------------------------------------------

def make_avl_decode_inputs(batch, num_heads, num_kv_heads, head_dim, n_sys, n_image, n_text, core_fraction,
                           dtype, device, sort_index=True, seed=0):
    """Random q and cache [sys | image | text]; index = sys rows + a random core subset of the image rows.

    Each sample gets its own core subset, as A-VL ranks each sample's image tokens by its own attention.
    Returns (q, k, v, index, start).
    """
    generator = torch.Generator(device).manual_seed(seed)
    cache_len = n_sys + n_image + n_text

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

    q = randn(batch, num_heads, head_dim)                                     # [B, H, D]
    k = randn(batch, num_kv_heads, cache_len, head_dim)                       # [B, Hkv, N, D]
    v = randn(batch, num_kv_heads, cache_len, head_dim)                       # [B, Hkv, N, D]
    n_core = int(core_fraction * n_image)
    core = torch.stack([torch.randperm(n_image, generator=generator, device=device)[:n_core]
                        for _ in range(batch)])                               # [B, n_core]
    if sort_index:
        core = core.sort(dim=1).values
    sys_rows = torch.arange(n_sys, device=device).expand(batch, -1)           # [B, n_sys]
    index = torch.cat([sys_rows, n_sys + core], dim=1)                        # [B, n_idx]
    return q, k, v, index, n_sys + n_image


def dense_sdpa(q, k, v):
    """Baseline (b): attend to the whole cache, as a decoder without A-VL's core/secondary split would."""
    out = F.scaled_dot_product_attention(q[:, :, None], k, v,
                                         enable_gqa=k.shape[1] != q.shape[1])      # [B, H, 1, D]
    return out[:, :, 0]


def gather_then_sdpa(q, k, v, index, start):
    """Baseline (a): copy the selected rows out of the cache, then PyTorch's fused attention on them."""
    return dense_sdpa(q, *gather_selected_rows(k, v, index, start))           # k, v gathered: [B, Hkv, n_sel, D]


class DecodeShape(NamedTuple):
    """A benchmark's attention heads and the cache's text around the image block: [n_sys | image | n_text]."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    n_sys: int
    n_text: int


LLAVA_7B_DECODE = DecodeShape(num_heads=32, num_kv_heads=32, head_dim=128, n_sys=5, n_text=64)


# ----------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------

# Peak DRAM bandwidth in GB/s by device-name fragment; the first fragment found in the name as whole words
# wins ("L4" is not in "NVIDIA L40S", nor "H200" in "NVIDIA GH200").
PEAK_BANDWIDTH_GBPS = {
    "H200": 4800,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,        # H100 SXM ("NVIDIA H100 80GB HBM3")
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,        # the 40 GB A100s
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "RTX 4090": 1008,
}


def peak_bandwidth_gbps(device_name: str):
    """The device's peak bandwidth from PEAK_BANDWIDTH_GBPS, or None for a device not listed."""
    for fragment, gbps in PEAK_BANDWIDTH_GBPS.items():
        if re.search(rf"(?<!\w){re.escape(fragment)}(?!\w)", device_name):
            return gbps
    return None


def kernel_bytes(q, k, index, start) -> int:
    """Bytes the kernel must move: the selected K and V rows of every KV head, the index, q and out."""
    batch, num_kv_heads, cache_len, head_dim = k.shape
    n_sel = index.shape[1] + cache_len - start
    kv_bytes = 2 * batch * num_kv_heads * n_sel * head_dim * k.element_size()
    return kv_bytes + index.numel() * index.element_size() + 2 * q.numel() * q.element_size()


def cpu_time_ms(fn, repeats=3):
    """Wall time of fn on the CPU in ms, the best of a few (interpreter smoke run only)."""
    return 1e3 * best_seconds(fn, repeats)


def benchmark_case(batch, n_image, core_fraction, shape, dtype, device, time_ms, peak_gbps) -> str:
    """One table row: kernel vs gather + SDPA vs dense SDPA, shape a `DecodeShape`. The inputs die with the
    call, so each case starts with the GPU memory of the previous one freed."""
    q, k, v, index, start = make_avl_decode_inputs(batch, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                                   shape.n_sys, n_image, shape.n_text, core_fraction, dtype, device)
    # The inputs are queued on the default stream, and triton.testing.do_bench_cudagraph runs the calls on
    # a stream of its own, which does not wait for it: without this, its first calls could read an index
    # not yet written, whose rows may lie outside the cache.
    synchronize()
    t_kernel = time_ms(lambda: sparse_decode_attention(q, k, v, index, start, check_index=False))
    t_gather = time_ms(lambda: gather_then_sdpa(q, k, v, index, start))
    t_dense = time_ms(lambda: dense_sdpa(q, k, v))
    gbps = kernel_bytes(q, k, index, start) / (t_kernel * 1e-3) / 1e9
    percent = f"{100 * gbps / peak_gbps:6.1f}" if peak_gbps else f"{'n/a':>6}"
    n_sel = index.shape[1] + k.shape[2] - start
    return (f"{batch:>5} {n_image:>6} {core_fraction:>5.1f} {n_sel:>6} | {t_kernel * 1e3:>9.1f} "
            f"{t_gather * 1e3:>9.1f} {t_dense * 1e3:>9.1f} | {t_gather / t_kernel:>8.2f}x "
            f"{t_dense / t_kernel:>7.2f}x | {gbps:>7.1f} {percent}")


def benchmark_table(image_blocks, core_fractions, batches, shape, dtype, device, time_ms, peak_gbps):
    """Time kernel, gather + SDPA and dense SDPA for every (batch, image size, core fraction); print a row each."""
    print(f"{'batch':>5} {'image':>6} {'core':>5} {'rows':>6} | {'kernel us':>9} {'gather us':>9} "
          f"{'dense us':>9} | {'vs gather':>9} {'vs dense':>8} | {'GB/s':>7} {'% peak':>6}")
    for batch in batches:
        for n_image in image_blocks:
            for core_fraction in core_fractions:
                print(benchmark_case(batch, n_image, core_fraction, shape, dtype, device, time_ms, peak_gbps))


def correctness_check(device, dtype, small):
    """The flash-attention rule on A-VL-shaped inputs, with and without GQA; raises if any case fails. A
    case the device cannot run (`why_unsupported`: bf16 below compute capability 8.0; or Triton's
    OutOfResources: too little shared memory for the tiles) is said and skipped, so that
    the timing tables, in fp16, still run."""
    from triton.runtime.errors import OutOfResources  # only here: importing this module needs no Triton

    # Small (the interpreter): 5 sys + 60 core + 9 text = 74 rows, two blocks of 64, so both splits run.
    n_image, n_text = (200, 9) if small else (576, 64)
    dtype_name = str(dtype).removeprefix("torch.")
    for num_heads, num_kv_heads, head_dim in [(4, 4, 64), (8, 2, 128)] if small else [(32, 32, 128), (32, 8, 128)]:
        case = f"H={num_heads:>2} Hkv={num_kv_heads:>2} D={head_dim:>3} "
        refusal = why_unsupported(dtype, head_dim, torch.device(device))
        if refusal is not None:
            print(f"{case}{dtype_name:>8}: skipped, {refusal}")
            continue
        q, k, v, index, start = make_avl_decode_inputs(2, num_heads, num_kv_heads, head_dim, n_sys=5,
                                                       n_image=n_image, n_text=n_text, core_fraction=0.3,
                                                       dtype=dtype, device=device, sort_index=False)
        try:
            report = error_report(q, k, v, index, start, num_splits=2)
        except OutOfResources as err:
            print(f"{case}{dtype_name:>8}: skipped, the GPU refused the launch ({err})")
            continue
        print(case + format_report(report))
        if not report["passed"]:
            raise SystemExit("correctness check failed")


def main(argv=None):
    parser = ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth of the GPU in GB/s "
                        "(default: looked up from the device name)")
    args = parser.parse_args(argv)
    check_stdout_open("results")
    if args.peak_gbps is not None and not 0 < args.peak_gbps < float("inf"):
        parser.error(f"--peak-gbps must be a finite number above 0, got {args.peak_gbps}")
    if not TRITON_AVAILABLE:
        raise UserError("Triton is not installed: pip install triton")

    if INTERPRETED:
        print("TRITON_INTERPRET=1: correctness check and a toy-size timing in Triton's CPU interpreter.\n"
              "Interpreter times say nothing about GPU speed; they only show the benchmark code runs.")
        for dtype in SUPPORTED_DTYPES:
            correctness_check("cpu", dtype, small=True)
        toy_shape = DecodeShape(num_heads=4, num_kv_heads=2, head_dim=64, n_sys=5, n_text=16)
        benchmark_table([48], [0.3, 0.5], [1, 2], toy_shape, torch.float16, "cpu", cpu_time_ms, args.peak_gbps)
        return
    if not torch.cuda.is_available():
        raise UserError("no CUDA device: the benchmark needs a GPU. Run "
                        "`TRITON_INTERPRET=1 python -m kernels.bench_sparse_attention` to exercise the "
                        "correctness check and the benchmark code in Triton's CPU interpreter instead")
    import triton.testing  # only here: the interpreter path above does not need it

    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or peak_bandwidth_gbps(name)
    print(f"device: {name}, peak bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown (pass --peak-gbps)'}")
    for dtype in SUPPORTED_DTYPES:
        correctness_check("cuda", dtype, small=False)
    shape = LLAVA_7B_DECODE
    print(f"\nfp16, H={shape.num_heads} query heads, Hkv={shape.num_kv_heads} KV heads, D={shape.head_dim}; cache = "
          f"[{shape.n_sys} sys | image | {shape.n_text} text]; rows = sys + core image + text rows attended.\n"
          "kernel = kernels/sparse_attention.py, gather = torch gather + SDPA on the selected rows, dense = SDPA on the whole cache;"
          " times are medians of triton.testing.do_bench (L2 flushed between runs, launch overhead included).")
    cases = ([576, 2928, 4 * 2928], [0.3, 0.5], [1, 8])  # image blocks, core fractions, batch sizes
    benchmark_table(*cases, shape, torch.float16, "cuda",
                    lambda fn: triton.testing.do_bench(fn, return_mode="median"), peak)
    # A decode step's attention is a few microseconds of GPU work, less than it takes Python to launch
    # it: the table above times the launches too. Replayed from a CUDA graph, the same calls cost only
    # their GPU time, the cost inside a decode step that is itself captured as a graph.
    print("\nThe same, each call replayed from a CUDA graph (triton.testing.do_bench_cudagraph): GPU time "
          "without the launch overhead; L2 is not flushed, so the smallest caches may be read from L2.")
    benchmark_table(*cases, shape, torch.float16, "cuda",
                    lambda fn: triton.testing.do_bench_cudagraph(fn, return_mode="median"), peak)


if __name__ == "__main__":
    run_main(main)
