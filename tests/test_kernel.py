"""Tests of kernels/sparse_attention.py: the torch reference, the Triton kernel and its launcher (and the
torch baselines of kernels/bench_sparse_attention.py).

Without a GPU the kernel runs in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before this module imports the kernel), which is slow: the kernel cases below are few and small but
irregular on purpose (odd cache lengths, empty and full index lists, unsorted rows, GQA, three dtypes).

Acceptance is flash-attention's rule, implemented by `error_report` (the benchmark's correctness check uses
it too): against a float64 truth, the kernel's max error may be at most twice that of plain torch computing
in the kernel's own precision, plus a floor: the error of the truth rounded to the output dtype (the best any
implementation returning that dtype can do) and 8 fp32 ulps (the kernel's own fp32 arithmetic; it only
matters for fp32 inputs). A failure prints max and mean errors of both.
"""
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch

from kernels import bench_sparse_attention as bench
from kernels import sparse_attention as sa
from kernels.sparse_attention import _interpreter_safe_cast, tl, triton
from tinyavl.errors import UserError


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernel():
    pytest.importorskip("triton")
    return sa.sparse_decode_attention


def random_case(batch, num_heads, num_kv_heads, head_dim, cache_len, start, n_idx, dtype,
                sort_index=False, seed=0):
    """Random q, k, v and, per sample, n_idx distinct index rows drawn from [0, start)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_heads, head_dim, generator=generator)                    # [B, H, D]
    k = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=generator)      # [B, Hkv, N, D]
    v = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=generator)      # [B, Hkv, N, D]
    index = torch.stack([torch.randperm(start, generator=generator)[:n_idx] for _ in range(batch)])  # [B, n_idx]
    if sort_index:
        index = index.sort(dim=1).values
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), index.to(DEVICE), start


def masked_dense_attention(q, k, v, index, start):
    """Independent formulation: attention over all N rows with -inf on the rows that are not selected."""
    batch, num_heads, head_dim = q.shape
    cache_len = k.shape[2]
    group = num_heads // k.shape[1]
    selected = torch.zeros(batch, cache_len, dtype=torch.bool, device=q.device)        # [B, N]
    selected.scatter_(1, index.long(), True)
    selected[:, start:] = True
    k_full = k.repeat_interleave(group, dim=1)                                          # [B, H, N, D]
    v_full = v.repeat_interleave(group, dim=1)                                          # [B, H, N, D]
    scores = torch.einsum("bhd,bhnd->bhn", q, k_full) * head_dim ** -0.5               # [B, H, N]
    scores = scores.masked_fill(~selected[:, None, :], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(scores, dim=-1), v_full)         # [B, H, D]


# --- the reference -------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_heads,num_kv_heads,cache_len,start,n_idx,sort_index", [
    (4, 4, 9, 0, 0, False),      # dense
    (4, 2, 9, 9, 9, False),      # every row through the index, no tail
    (8, 2, 33, 20, 7, False),    # GQA 4, unsorted index + tail
    (2, 1, 130, 100, 40, True),  # sorted index + tail
])
def test_reference_equals_masked_dense_attention(num_heads, num_kv_heads, cache_len, start, n_idx, sort_index):
    q, k, v, index, start = random_case(3, num_heads, num_kv_heads, 32, cache_len, start, n_idx,
                                        torch.float64, sort_index)
    gathered = sa.sparse_decode_attention_reference(q, k, v, index, start)
    torch.testing.assert_close(gathered, masked_dense_attention(q, k, v, index, start), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_reference_in_the_kernels_precision_rounds_in_that_dtype(dtype):
    """upcast=False, the error rule's "plain PyTorch in the kernel's precision", computes in the inputs'
    dtype (its lse comes out in it) and so errs more than the fp32 computation (upcast=True) against the
    float64 masked softmax of the same rows; both stay within the dtype's rounding."""
    q, k, v, index, start = random_case(3, 8, 2, 32, 90, 60, 20, dtype, True)
    exact = masked_dense_attention(q.double(), k.double(), v.double(), index, start)
    plain, plain_lse = sa.sparse_decode_attention_reference(q, k, v, index, start, upcast=False, return_lse=True)
    fp32, fp32_lse = sa.sparse_decode_attention_reference(q, k, v, index, start, return_lse=True)
    assert plain_lse.dtype == dtype and fp32_lse.dtype == torch.float32
    plain_error, fp32_error = ((out.double() - exact).abs().max() for out in (plain, fp32))
    assert fp32_error < plain_error < 8 * torch.finfo(dtype).eps * exact.abs().max()


def test_benchmark_baselines_compute_the_same_attention():
    q, k, v, index, start = bench.make_avl_decode_inputs(2, 8, 2, 64, 3, 40, 7, 0.3, torch.float32, DEVICE)
    reference = sa.sparse_decode_attention_reference(q, k, v, index, start)
    torch.testing.assert_close(bench.gather_then_sdpa(q, k, v, index, start), reference, rtol=1e-5, atol=1e-5)
    dense_reference = sa.sparse_decode_attention_reference(q, k, v, index[:, :0], 0)
    torch.testing.assert_close(bench.dense_sdpa(q, k, v), dense_reference, rtol=1e-5, atol=1e-5)


def test_benchmark_correctness_check_runs_two_splits(kernel, launched_splits):
    """The benchmark's check (the small one, as the interpreter runs it) passes in every dtype and covers
    the merge of two splits: its lists are longer than one block."""
    for dtype in sa.SUPPORTED_DTYPES:
        bench.correctness_check(DEVICE, dtype, small=True)
    assert set(launched_splits) == {2}


def test_benchmark_correctness_check_skips_what_the_device_cannot_run(kernel, monkeypatch, capsys):
    """A dtype the GPU has no instructions for (why_unsupported) and a launch it refuses (Triton's
    OutOfResources) are each said in a line and skipped; the rest is checked, and the benchmark goes on."""
    from triton.runtime.errors import OutOfResources

    def refuse_head_dim_128(dtype, head_dim, device=None):
        return "no bf16 here" if head_dim == 128 else sa.why_unsupported(dtype, head_dim, device)

    def out_of_shared_memory(q, *args, **kwargs):
        raise OutOfResources(200_000, 65_536, "shared memory")

    monkeypatch.setattr(bench, "why_unsupported", refuse_head_dim_128)
    bench.correctness_check(DEVICE, torch.float32, small=True)   # H=4 D=64 runs, H=8 D=128 is refused
    monkeypatch.setattr(bench, "error_report", out_of_shared_memory)
    bench.correctness_check(DEVICE, torch.float32, small=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("H= 4 Hkv= 4 D= 64  float32: kernel max") and lines[0].endswith("-> ok")
    assert lines[1] == "H= 8 Hkv= 2 D=128  float32: skipped, no bf16 here"
    assert lines[2].startswith("H= 4 Hkv= 4 D= 64  float32: skipped, the GPU refused the launch (out of resource: "
                               "shared memory")
    assert lines[3] == "H= 8 Hkv= 2 D=128  float32: skipped, no bf16 here" and len(lines) == 4


def test_a_failed_correctness_check_stops_the_benchmark(monkeypatch):
    """A kernel the check fails is not timed: the benchmark ends with a non-zero exit."""
    failed = dict(dtype="float32", kernel_max=1.0, kernel_mean=1.0, torch_max=0.0, torch_mean=0.0, floor=0.0,
                  allowed=0.0, passed=False)
    monkeypatch.setattr(bench, "error_report", lambda *args, **kwargs: failed)
    with pytest.raises(SystemExit, match="correctness check failed"):
        bench.correctness_check(DEVICE, torch.float32, small=True)


def test_each_sample_of_a_benchmark_case_has_its_own_core():
    """A batch's samples list different core rows (drawn apart), as different prompts' cores would be."""
    _, _, _, index, start = bench.make_avl_decode_inputs(2, 2, 1, 16, 3, 200, 5, 0.3, torch.float32, DEVICE)
    assert index.shape == (2, 3 + 60) and start == 203
    assert not torch.equal(index[0].sort().values, index[1].sort().values)


def fresh_kernel_module(name):
    """Execute kernels/sparse_attention.py again as a new module, under whatever the test monkeypatched."""
    spec = importlib.util.spec_from_file_location(name, sa.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_bandwidth_is_looked_up_by_whole_words():
    names = {"NVIDIA H100 80GB HBM3": 3350, "NVIDIA H100 NVL": 3900, "NVIDIA A100-SXM4-80GB": 2039,
             "NVIDIA A100-SXM4-40GB": 1555, "NVIDIA L4": 300, "NVIDIA L40": 864, "NVIDIA L40S": 864,
             "NVIDIA GH200 480GB": None, "NVIDIA GeForce RTX 4090": 1008, "NVIDIA GeForce RTX 4090 D": 1008,
             "NVIDIA RTX A1000 6GB Laptop GPU": None}                        # "A100" inside a longer model number
    assert {name: bench.peak_bandwidth_gbps(name) for name in names} == names


def test_module_imports_and_reference_runs_without_triton(monkeypatch):
    # A None entry in sys.modules makes `import triton` fail as if it were not installed.
    for name in ("triton", "triton.language", "triton.runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    module = fresh_kernel_module("sparse_attention_without_triton")

    assert not module.TRITON_AVAILABLE
    assert not module.INTERPRETED
    q, k, v, index, start = random_case(1, 2, 1, 16, 5, 3, 2, torch.float32)
    module.sparse_decode_attention_reference(q, k, v, index, start)
    with pytest.raises(RuntimeError, match="needs Triton"):
        module.sparse_decode_attention(q, k, v, index, start)


# --- which Triton runs the kernel: compiled or interpreted, never silently off --------------------------

def test_interpreted_agrees_with_triton_interpret():
    """The environment-variable fallback gives the same answer as the kernel's type, here and now."""
    pytest.importorskip("triton")
    assert sa.TRITON_AVAILABLE
    assert sa.INTERPRETED == sa._interpreter_requested()


@pytest.mark.parametrize("value,interpreted", [("1", True), ("true", True), ("ON", True), ("yes", True), ("Y", True),
                                               ("0", False), ("no", False), ("", False)])
def test_private_interpreter_import_failing_falls_back_to_the_environment(monkeypatch, value, interpreted):
    pytest.importorskip("triton")
    monkeypatch.setitem(sys.modules, "triton.runtime.interpreter", None)  # `from ... import` now fails
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert sa._runs_in_interpreter(sa._split_attention_kernel) is interpreted


def test_kernel_stays_available_on_a_gpu_without_the_private_interpreter_import(monkeypatch):
    """As on a CUDA machine (TRITON_INTERPRET unset, the kernels compiled for the GPU), with Triton's private
    InterpretedFunction import broken: the module still offers the kernel, compiled, not interpreted."""
    triton = pytest.importorskip("triton")
    monkeypatch.setitem(sys.modules, "triton.runtime.interpreter", None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = fresh_kernel_module("sparse_attention_without_private_import")

    assert module.TRITON_AVAILABLE
    assert not module.INTERPRETED
    assert isinstance(module._split_attention_kernel, triton.JITFunction)
    assert not module._BF16_BY_HAND
    # The launcher gets as far as its input checks (not "needs Triton"), which send CPU tensors to the interpreter.
    q, k, v, index, start = random_case(1, 2, 1, 16, 5, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="runs on CUDA tensors"):
        module.sparse_decode_attention(q.cpu(), k.cpu(), v.cpu(), index.cpu(), start)


# --- the kernel: flash-attention error rule ----------------------------------------------------------------

KERNEL_CASES = {
    # name: (batch, H, Hkv, D, N, start, n_idx, sorted, num_splits, scale, dtype)
    "one row, dense": (1, 2, 2, 64, 1, 0, 0, False, None, None, torch.float32),
    "one row, via index": (1, 2, 1, 64, 1, 1, 1, False, None, None, torch.float16),
    "full index, no tail": (2, 4, 2, 64, 7, 7, 7, False, None, None, torch.bfloat16),
    "N=33 GQA4 D=128 unsorted": (2, 8, 2, 128, 33, 20, 9, False, None, None, torch.float16),
    "N=33 D=16 peaky scores": (2, 2, 2, 16, 33, 30, 12, False, None, 1.0, torch.float32),
    "N=130 dense 3 splits": (1, 4, 1, 64, 130, 0, 0, False, 3, None, torch.float32),
    "N=130 sorted 2 splits": (2, 2, 2, 128, 130, 100, 40, True, 2, None, torch.bfloat16),
    "N=130 unsorted, splits clamped": (2, 4, 2, 64, 130, 70, 50, False, 8, 0.5, torch.float16),
    # An index list of several blocks read by one program; a GQA group of 24 heads (not a power of two).
    "N=200 index of 150 rows, 1 split": (1, 2, 1, 64, 200, 180, 150, False, 1, None, torch.float32),
    "N=70 GQA24 2 splits": (1, 48, 2, 32, 70, 40, 20, False, 2, None, torch.float32),
}


@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_kernel_matches_reference(kernel, case):
    batch, num_heads, num_kv_heads, head_dim, cache_len, start, n_idx, sort_index, num_splits, scale, dtype = case
    q, k, v, index, start = random_case(batch, num_heads, num_kv_heads, head_dim, cache_len, start, n_idx,
                                        dtype, sort_index)
    report = sa.error_report(q, k, v, index, start, scale, num_splits=num_splits)
    assert report["passed"], sa.format_report(report)


@pytest.mark.parametrize("dtype", sa.SUPPORTED_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_kernel_on_avl_decode_step(kernel, dtype):
    # A-VL's normal step: sys + unsorted core image rows through the index, text as the tail; 2 splits.
    q, k, v, index, start = bench.make_avl_decode_inputs(2, 8, 4, 128, 5, 200, 20, 0.3, dtype, DEVICE,
                                                         sort_index=False)
    report = sa.error_report(q, k, v, index, start, num_splits=2)
    assert report["passed"], sa.format_report(report)


@triton.jit
def _bf16_cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offsets = tl.arange(0, N)
    tl.store(y_ptr + offsets, _interpreter_safe_cast(tl.load(x_ptr + offsets), tl.bfloat16))


def test_bf16_casts_round_to_nearest_even(kernel):
    """The kernels' fp32 -> bf16 casts round as torch (and a GPU) do, in the interpreter too, which on its
    own drops the low bits: ties to the even neighbour, values past a tie up, infinities and NaNs kept
    (also a NaN whose every bit is set, which rounding by hand would carry over to 0)."""
    ulp = 2.0 ** -7                                                      # bf16's spacing at 1.0
    special = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2 ** -12, -(1 + ulp / 2 + 2 ** -12),
                            1 + ulp / 2 - 2 ** -12, 3.14159265, -2.71828183, 65504.0, 1e30, -1e-30, 0.0,
                            float("inf"), float("-inf"), float("nan")])
    all_ones_nan = torch.tensor([-1], dtype=torch.int32).view(torch.float32)
    x = torch.cat([special, all_ones_nan, torch.randn(64 - len(special) - 1, generator=torch.Generator().manual_seed(0))])
    x = x.to(DEVICE)
    y = torch.empty(64, dtype=torch.bfloat16, device=DEVICE)
    _bf16_cast_kernel[(1,)](x, y, 64)
    nan = x.isnan()
    assert torch.equal(y.isnan(), nan) and torch.equal(y[~nan], x[~nan].bfloat16())


def test_bf16_output_is_not_biased_toward_zero(kernel):
    """Rounded, not truncated: the kernel's bf16 outputs miss the float64 truth about as often above it as
    below it (a cast that drops bits makes nearly every miss shrink the value: 0.9 of them, measured)."""
    q, k, v, index, start = random_case(2, 8, 2, 128, 200, 120, 60, torch.bfloat16, seed=3)
    out = kernel(q, k, v, index, start).double()                        # [B, H, D]
    truth = sa.sparse_decode_attention_reference(q.double(), k.double(), v.double(), index, start)
    shrinks, grows = (out.abs() < truth.abs()).sum().item(), (out.abs() > truth.abs()).sum().item()
    assert shrinks / (shrinks + grows) < 0.6


def test_log_sum_exp_output(kernel):
    q, k, v, index, start = random_case(2, 4, 2, 64, 130, 90, 30, torch.float16, seed=1)
    out, lse = kernel(q, k, v, index, start, return_lse=True, num_splits=2)
    _, lse_truth = sa.sparse_decode_attention_reference(q.double(), k.double(), v.double(), index, start,
                                                        return_lse=True)
    assert lse.shape == (2, 4) and lse.dtype == torch.float32
    # The scores are fp32 dot products of fp16 inputs: a few fp32 ulps of the log-sum-exp (magnitude ~5).
    torch.testing.assert_close(lse.double(), lse_truth, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, kernel(q, k, v, index, start, num_splits=2))


# The interpreter warns of the NaN its padding query heads (zeros, never stored) make against keys of -inf.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("rows_at_minus_inf, num_splits", [(64, 1), (64, 2), (128, 2), (70, 3)],
                         ids=["first block, 1 split", "first block, 2 splits", "a whole split", "a block and more"])
def test_rows_scored_minus_inf_weigh_nothing(kernel, rows_at_minus_inf, num_splits):
    """Keys of -inf score -inf: softmax gives them 0 and the other rows their usual weights. A block (or a
    whole split) of nothing but such rows must not turn the online softmax's -inf - -inf into NaN."""
    q, k, v, index, start = random_case(1, 2, 1, 16, 130, 0, 0, torch.float32, seed=3)
    q = q.abs()                                                          # q >= 0: q . k = -inf where k has -inf
    k[0, 0, :rows_at_minus_inf, 0] = float("-inf")
    out, lse = kernel(q, k, v, index, start, num_splits=num_splits, return_lse=True)
    truth = masked_dense_attention(q.double(), k.double(), v.double(), index, start)      # [1, H, D]
    finite = k[0, 0, :, 0].isfinite()                                    # (N,) the rows that get weight
    scores = (q[0].double() @ k[0, 0, finite].double().T) * 16 ** -0.5   # [H, finite rows]
    lse_truth = scores.logsumexp(-1)[None]                               # [1, H]
    torch.testing.assert_close(out.double(), truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), lse_truth, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_head_whose_every_key_scores_minus_inf(kernel, num_splits):
    """Softmax over nothing but -inf: the log-sum-exp is -inf (what a policy's LastRow takes), not the NaN of
    -inf - -inf, and the output is softmax's NaN, as the dense reference's."""
    q, k, v, index, start = random_case(1, 2, 1, 16, 130, 0, 0, torch.float32, seed=3)
    q = q.abs()
    k[..., 0] = float("-inf")
    out, lse = kernel(q, k, v, index, start, num_splits=num_splits, return_lse=True)
    truth = masked_dense_attention(q.double(), k.double(), v.double(), index, start)      # [1, H, D]
    assert truth.isnan().all() and out.isnan().all()
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))


@pytest.mark.parametrize("num_splits", [1, 2])
def test_scores_far_apart_in_different_blocks(kernel, num_splits):
    """The first block's rows score 100 and the next block's 0: a running max not carried from block to block
    would take exp(100) (in base 2: past 2^128, fp32's range) into the sums and return NaN. Truth by hand:
    the mean of the first block's V rows, the rest weighted e^-100 each."""
    head_dim, cache_len = 16, 130
    q = torch.zeros(1, 1, head_dim)
    q[0, 0, 0] = 1.0
    k = torch.zeros(1, 1, cache_len, head_dim)
    k[0, 0, :64, 0] = 100.0                                                             # scores 100 with scale 1
    v = torch.randn(1, 1, cache_len, head_dim, generator=torch.Generator().manual_seed(0))
    out = kernel(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch.zeros(1, 0, dtype=torch.long, device=DEVICE), 0,
                 1.0, num_splits=num_splits)
    weights = torch.cat([torch.ones(64, dtype=torch.float64),
                         torch.full((cache_len - 64,), math.exp(-100), dtype=torch.float64)])
    truth = (weights[:, None] * v[0, 0].double()).sum(0) / weights.sum()
    torch.testing.assert_close(out[0, 0].cpu().double(), truth, rtol=1e-5, atol=1e-6)


def test_scale_zero_is_the_mean_of_the_selected_rows(kernel):
    """A scale of 0 is a scale (every score 0, every selected row weighted the same), not "no scale given"."""
    q, k, v, index, start = random_case(1, 2, 1, 16, 9, 6, 3, torch.float32)
    out = kernel(q, k, v, index, start, 0.0)
    rows = torch.cat([index[0], torch.arange(start, 9, device=index.device)])
    mean = v[0, 0, rows].double().mean(0)                                               # [D], for both heads
    torch.testing.assert_close(out[0].double(), mean.expand(2, -1), rtol=1e-6, atol=1e-6)


def test_kernel_lse_normalises_the_rows_a_policy_rescores(kernel):
    """The kernel hands a policy only the log-sum-exp (`LastRow` without logits); the probabilities the
    policy then recomputes from q and K must sum to 1 over the row, in bf16 too, with logits above 10
    (bf16 rounds a logit of 8-16 by up to 1/32 and one of 16-32 by up to 1/16, its exp by up to 3.2% and 6.5%)."""
    from tinyavl.cache import LastRow
    q, k, v, index, _ = random_case(1, 8, 2, 128, 90, 90, 0, torch.bfloat16, seed=2)
    q = q * 6                                                            # rows' largest logits ~10-18
    _, lse = kernel(q, k, v, index, 0, return_lse=True)                  # dense: every row attended
    probs = LastRow(lse).probs(q[:, :, None], k, 0, k.shape[2])          # (B, H, N) fp32
    assert float(lse.abs().max()) > 10
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 8, device=DEVICE), atol=1e-4, rtol=0)


def test_strided_inputs_are_read_in_place(kernel):
    # Caches with spare capacity (rows past N unused): K laid out [B, N, Hkv, D] and viewed as
    # [B, Hkv, N, D], V [B, Hkv, N, D] with a different capacity, so no stride of K equals V's.
    # q sliced out of a wider buffer; index with stride 2 and int32. Same arithmetic, so identical results.
    batch, num_heads, num_kv_heads, head_dim, cache_len, start = 2, 4, 2, 64, 37, 25
    q, k, v, index, start = random_case(batch, num_heads, num_kv_heads, head_dim, cache_len, start, 10,
                                        torch.float16)
    k_buffer = torch.zeros(batch, cache_len + 11, num_kv_heads, head_dim, dtype=q.dtype, device=DEVICE)
    k_buffer[:, :cache_len] = k.transpose(1, 2)
    k_view = k_buffer[:, :cache_len].transpose(1, 2)                                    # [B, Hkv, N, D]
    v_buffer = torch.zeros(batch, num_kv_heads, cache_len + 5, head_dim, dtype=q.dtype, device=DEVICE)
    v_buffer[:, :, :cache_len] = v
    v_view = v_buffer[:, :, :cache_len]                                                 # [B, Hkv, N, D]
    q_buffer = torch.zeros(batch, num_heads, 2 * head_dim, dtype=q.dtype, device=DEVICE)
    q_buffer[:, :, :head_dim] = q
    index_buffer = torch.zeros(batch, 2 * index.shape[1], dtype=torch.int32, device=DEVICE)
    index_buffer[:, ::2] = index

    launched, split_kernel = [], sa._split_attention_kernel

    class Recorded:  # kernel[grid](q, k, v, index, ...): what the launch hands the kernel
        def __getitem__(self, grid):
            def launch(*args, **options):
                launched.append(args[:4])
                return split_kernel[grid](*args, **options)
            return launch

    given = (q_buffer[:, :, :head_dim], k_view, v_view, index_buffer[:, ::2])
    sa._split_attention_kernel = Recorded()
    try:
        strided = kernel(*given, start)
    finally:
        sa._split_attention_kernel = split_kernel
    assert torch.equal(strided, kernel(q, k, v, index, start))
    # In place: the kernel got the caller's memory with its strides, no contiguous copy.
    [handed] = launched
    assert [(t.data_ptr(), t.stride()) for t in handed] == [(t.data_ptr(), t.stride()) for t in given]


# --- the launcher rejects bad input ---------------------------------------------------------------------

def row_of_sample_1(index, row):
    """index with sample 1's second listed row replaced by `row`."""
    changed = index.clone()
    changed[1, 1] = row
    return changed


def _bad_inputs():
    q, k, v, index, start = random_case(2, 4, 2, 64, 10, 6, 3, torch.float16)
    k_strided_last_dim = k.transpose(2, 3).contiguous().transpose(2, 3)                 # same shape, stride(-1) = N
    cases = {
        "k and v shapes differ": ((q, k, v[:, :, :9], index, start), "k and v"),
        "head dims differ": ((q[..., :32], k, v, index, start), "disagree"),
        "batch differs": ((q[:1], k, v, index, start), "disagree"),
        "H not a multiple of Hkv": ((q[:, :3], k, v, index, start), "multiple of KV heads"),
        "index row >= start": ((q, k, v, index.clone().fill_(6), start), r"\[0, start=6\)"),
        "negative index row": ((q, k, v, index.clone().fill_(-1), start), r"\[0, start=6\)"),
        "an index of one row, at start": ((q, k, v, index[:, :1].clone().fill_(6), start), r"\[0, start=6\)"),
        "index batch differs": ((q, k, v, index[:1], start), "index must be"),
        "float index": ((q, k, v, index.float(), start), "int32 or int64"),
        "mixed dtypes": ((q.float(), k, v, index, start), "share one dtype"),
        "a dtype it has no code for": ((q.double(), k.double(), v.double(), index, start), "float64 is not one of"),
        "head dim not a power of two": ((q[..., :48], k[..., :48], v[..., :48], index, start), "power of two"),
        "last dim not contiguous": ((q, k_strided_last_dim, v, index, start), "contiguous"),
        "v's last dim not contiguous": ((q, k, k_strided_last_dim, index, start), "contiguous"),
        "q's last dim not contiguous": ((q.transpose(1, 2).contiguous().transpose(1, 2), k, v, index, start),
                                        "contiguous"),
        "q not [B, H, D]": ((q[:, :, None], k, v, index, start), r"q must be \[B, H, D\]"),
        "v of another dtype": ((q, k, v.float(), index, start), "share one dtype"),
        "start past the cache": ((q, k, v, index, 11), r"\[0, N=10\]"),
        "negative start": ((q, k, v, index[:, :0], -1), r"\[0, N=10\]"),
        "nothing selected": ((q, k, v, index[:, :0], 10), "nothing to attend"),
        "row listed twice": ((q, k, v, torch.cat([index[:, :2], index[:, :1]], dim=1), start), "twice"),
        "start not an integer": ((q, k, v, index, 4.5), "start must be an integer"),
        "start a bool tensor": ((q, k, v, index, torch.tensor(True)), "start must be an integer"),
        "start a tensor of one row": ((q, k, v, index, torch.tensor([start])), "start must be an integer"),
        "scale not a number": ((q, k, v, index, start, "0.5"), "scale must be a number"),
        "scale a list": ((q, k, v, index, start, [0.5]), "scale must be a number"),
        "scale infinite": ((q, k, v, index, start, float("inf")), "scale must be finite"),
        "scale past float's range": ((q, k, v, index, start, 10 ** 400), "scale must be finite"),
        "scale numpy's bool": ((q, k, v, index, start, np.True_), "scale must be a number"),
        "scale a tensor of one row": ((q, k, v, index, start, torch.tensor([0.5])), "scale must be a number"),
        "no sample": ((q[:0], k[:0], v[:0], index[:0], start), "a sample and a head"),
        "no KV head": ((q, k[:, :0], v[:, :0], index, start), "a sample and a head"),
        "index of one dimension": ((q, k, v, index[:, 0], start), "index must be"),
        "index on another device": ((q, k, v, index.to("meta"), start), "one device"),
        # Each sample's rows are checked, not the first's alone.
        "negative row in sample 1 only": ((q, k, v, row_of_sample_1(index, -1), start), r"\[0, start=6\)"),
        "row past start in sample 1 only": ((q, k, v, row_of_sample_1(index, 6), start), r"\[0, start=6\)"),
        "scale Python's bool": ((q, k, v, index, start, True), "scale must be a number"),
        "index a list": ((q, k, v, index.tolist(), start), "must be torch tensors"),
    }
    return cases


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("arguments,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_launcher_rejects_bad_input(kernel, arguments, message):
    with pytest.raises(ValueError, match=message):
        kernel(*arguments)


@pytest.fixture
def launched_splits(monkeypatch):
    """The number of splits of every launch from here on, read where the merge kernel is launched."""
    launched, merge = [], sa._merge_splits_kernel

    class CountedMerge:  # kernel[grid](*args): args[4] is num_splits
        def __getitem__(self, grid):
            return lambda *args, **options: launched.append(args[4]) or merge[grid](*args, **options)

    monkeypatch.setattr(sa, "_merge_splits_kernel", CountedMerge())
    return launched


def test_splits_are_capped_at_max_splits(kernel, monkeypatch, launched_splits):
    """Asked for more splits than MAX_SPLITS (here set to 2), the launcher runs MAX_SPLITS, and the
    result is still the attention: 200 rows, 4 blocks of 64."""
    monkeypatch.setattr(sa, "MAX_SPLITS", 2)
    q, k, v, index, start = random_case(1, 2, 1, 64, 200, 0, 0, torch.float32)
    out = kernel(q, k, v, index, start, num_splits=8)
    assert launched_splits == [2]
    torch.testing.assert_close(out, sa.sparse_decode_attention_reference(q, k, v, index, start), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_len,start,n_idx,asked,launched", [(110, 70, 30, 8, 2), (300, 0, 0, 4, 3)])
def test_no_split_is_launched_empty(kernel, launched_splits, cache_len, start, n_idx, asked, launched):
    """8 splits asked of a 70-row list, 2 blocks of 64: 2 splits run, each over a block, not 6 more over
    nothing (whose output the merge would weigh 0: the result alone cannot tell). 4 asked of 300 rows, 5
    blocks: a split takes ceil(5 / 4) = 2 blocks, so 3 splits cover them, not 4 with the last empty."""
    q, k, v, index, start = random_case(1, 2, 1, 64, cache_len, start, n_idx, torch.float32)
    out = kernel(q, k, v, index, start, num_splits=asked)
    assert launched_splits == [launched]
    torch.testing.assert_close(out, sa.sparse_decode_attention_reference(q, k, v, index, start), atol=1e-5, rtol=1e-5)


def test_a_gpu_gets_about_two_programs_per_multiprocessor(monkeypatch):
    """Compiled on a GPU (faked: an H100's 132 multiprocessors), the default split count brings a step's
    programs to about 2 x 132: batch 1 with 32 KV heads takes ceil(264 / 32) = 9 splits; never more splits than
    blocks of the list, never fewer than 1; in the interpreter, or on a CPU, one."""
    monkeypatch.setattr(sa, "gpu_properties", lambda device: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.setattr(sa, "INTERPRETED", False)
    gpu = torch.device("cuda", 0)
    assert [sa._default_num_splits(programs, blocks, gpu) for programs, blocks in ((32, 100), (32, 4), (1024, 100))] \
        == [9, 4, 1]
    assert sa._default_num_splits(32, 100, torch.device("cpu")) == 1
    monkeypatch.setattr(sa, "INTERPRETED", True)
    assert sa._default_num_splits(32, 100, gpu) == 1


def test_a_gpus_properties_are_asked_once_per_device(monkeypatch):
    """gpu_properties is read at every layer of every decode step: torch is asked once per device."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: asked.append(device) or str(device))
    sa.gpu_properties.cache_clear()
    try:
        for _ in range(3):
            assert [sa.gpu_properties(torch.device("cuda", i)) for i in (0, 1)] == ["cuda:0", "cuda:1"]
    finally:
        sa.gpu_properties.cache_clear()  # no fake left for a later test
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_the_merge_is_one_variant_for_every_split_count(kernel, monkeypatch):
    """The merge kernel's tile is MAX_SPLITS splits long whatever the launch's count (masked past it), so a
    GPU compiles it once, not again each time a growing cache doubles its splits; and each count still gives
    the attention. 400 rows, 7 blocks of 64: 1, 2, 3 and 7 splits."""
    tiles, merge = [], sa._merge_splits_kernel

    class Recorded:  # kernel[grid](*args, **options): args[4] is num_splits, options hold BLOCK_S
        def __getitem__(self, grid):
            return lambda *args, **options: tiles.append((args[4], options["BLOCK_S"])) or merge[grid](*args, **options)

    monkeypatch.setattr(sa, "_merge_splits_kernel", Recorded())
    q, k, v, index, start = random_case(1, 2, 1, 64, 400, 0, 0, torch.float32)
    expected = sa.sparse_decode_attention_reference(q, k, v, index, start)
    for num_splits in (1, 2, 3, 7):
        torch.testing.assert_close(kernel(q, k, v, index, start, num_splits=num_splits), expected, atol=1e-5, rtol=1e-5)
    assert tiles == [(num_splits, sa.MAX_SPLITS) for num_splits in (1, 2, 3, 7)]


def test_fp32_inputs_are_multiplied_in_fp32_not_tf32(kernel, monkeypatch):
    """tl.dot would take fp32 inputs as TF32 (about 1e-3 relative error) on a GPU; the interpreter multiplies
    in numpy's fp32 whatever it is asked, so the launch's request is read here: IEEE fp32 for fp32 inputs."""
    asked, split_kernel = [], sa._split_attention_kernel

    class Recorded:  # kernel[grid](*args, **options), the options holding DOT_PRECISION
        def __getitem__(self, grid):
            def launch(*args, **options):
                asked.append(options["DOT_PRECISION"])
                return split_kernel[grid](*args, **options)
            return launch

    monkeypatch.setattr(sa, "_split_attention_kernel", Recorded())
    for dtype in (torch.float32, torch.bfloat16):
        kernel(*random_case(1, 2, 1, 16, 9, 6, 3, dtype))
    assert asked == ["ieee", "tf32"]           # 16-bit inputs: the option is ignored, their products are exact
    assert sa._default_num_splits(64, 100, torch.device("cpu")) == 1   # off a GPU, splits gain nothing


def test_numeric_arguments_may_be_numpy_or_tensor_numbers(kernel):
    q, k, v, index, start = random_case(1, 2, 1, 16, 9, 6, 3, torch.float32)
    expected = kernel(q, k, v, index, start, num_splits=1)
    for as_given, splits in ((np.int64(start), np.int32(1)), (torch.tensor(start), torch.tensor(1))):
        assert torch.equal(kernel(q, k, v, index, as_given, num_splits=splits), expected)
    scaled = kernel(q, k, v, index, start, 0.25, num_splits=1)
    for scale in (np.float32(0.25), torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        assert torch.equal(kernel(q, k, v, index, start, scale, num_splits=1), scaled)


@pytest.mark.parametrize("num_splits", [0, 2.5, True, torch.tensor(True)])
def test_launcher_rejects_a_bad_split_count(kernel, num_splits):
    q, k, v, index, start = random_case(1, 2, 1, 16, 5, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="num_splits must be an integer"):
        kernel(q, k, v, index, start, num_splits=num_splits)


# --- the kernel inside tinyavl: A-VL generation through the kernel path equals the torch path -----------

@pytest.mark.parametrize("variant", ["mha", "gqa_full"])
def test_avl_generation_kernel_path_equals_torch_path(tiny_ckpt, variant):
    """Normal steps read sys + core rows by index and the text as a tail; update steps (every K-th)
    read everything. Both paths must give the same tokens and the same attended-row counts."""
    pytest.importorskip("triton")
    import tinyavl

    model, _ = tinyavl.load_pretrained(tiny_ckpt.folder(variant))
    n_img, size = model.config.num_image_tokens, model.config.vision.image_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 5, 6] + [model.config.image_token_id] * n_img + list(range(7, 40))])
    pixels = torch.randn(1, 3, size, size, generator=generator)
    torch_tokens, torch_stats = tinyavl.generate(model, ids, pixels, max_new_tokens=10, policy="avl", kernel="torch")
    kernel_tokens, kernel_stats = tinyavl.generate(model, ids, pixels, max_new_tokens=10, policy="avl", kernel="triton")
    assert kernel_tokens == torch_tokens
    assert kernel_stats.attended_per_layer == torch_stats.attended_per_layer
    # The comparison means something only if normal steps really skipped rows.
    assert kernel_stats.attended_tokens_per_step < kernel_stats.attended_tokens_per_step_dense


def test_kernel_bytes_by_hand():
    """The numerator of the bandwidth the kernel's benchmark reports: 2 samples x 2 KV heads, 5 indexed rows
    plus a tail of 40 - 30 = 10, 16 wide in fp16, for K and V; the int64 index of 2 x 5; q and out, each
    2 x 4 query heads x 16 fp16 values."""
    q = torch.zeros(2, 4, 16, dtype=torch.float16)
    k = torch.zeros(2, 2, 40, 16, dtype=torch.float16)
    index = torch.zeros(2, 5, dtype=torch.long)
    assert bench.kernel_bytes(q, k, index, start=30) == 2 * (2 * 2 * 15 * 16 * 2) + 2 * 5 * 8 + 2 * (2 * 4 * 16 * 2)


def test_a_benchmark_case_waits_for_its_inputs_before_timing(monkeypatch):
    """The inputs are queued on the default stream; triton.testing.do_bench_cudagraph times on a stream of
    its own that does not wait for it, so benchmark_case must wait for the inputs before its first timing."""
    events, make_inputs = [], bench.make_avl_decode_inputs

    def recorded_inputs(*args):
        events.append("inputs")
        return make_inputs(*args)

    monkeypatch.setattr(bench, "make_avl_decode_inputs", recorded_inputs)
    monkeypatch.setattr(bench, "synchronize", lambda: events.append("synchronize"))
    time_ms = lambda fn: events.append("time") or 1.0  # noqa: E731  (the calls themselves are not run)
    bench.benchmark_case(1, 40, 0.3, bench.DecodeShape(4, 2, 16, 3, 5), torch.float32, DEVICE, time_ms, peak_gbps=None)
    assert events == ["inputs", "synchronize", "time", "time", "time"]


def test_a_benchmark_row_holds_its_times_ratios_and_bandwidth(monkeypatch):
    """A row from known timings (kernel 0.5 us, gather 1.5, dense 2.0; the timer's unit is the ms): the times
    in us, the speed-ups 3x and 4x, and the kernel's bytes over 0.5 us as GB/s and as a share of a 20 GB/s
    peak. The bytes by hand (1 sample; H 4, Hkv 2, D 16; 3 sys tokens, 40 image, 5 text; a core of
    int(0.3 x 40) = 12): 15 listed rows and 5 after start, 20 rows of K and V in fp32 for 2 KV heads,
    2 x 2 x 20 x 16 x 4 = 5120 bytes, the int64 list 15 x 8 = 120, q and the output 2 x 4 x 16 x 4 = 512:
    5752 bytes in 0.5 us, 11.5 GB/s, 57.5% of 20."""
    monkeypatch.setattr(bench, "synchronize", lambda: None)
    timings = iter([0.5e-3, 1.5e-3, 2.0e-3])
    shape = bench.DecodeShape(num_heads=4, num_kv_heads=2, head_dim=16, n_sys=3, n_text=5)
    row = bench.benchmark_case(1, 40, 0.3, shape, torch.float32, DEVICE, lambda fn: next(timings), peak_gbps=20.0)
    assert row.split() == ["1", "40", "0.3", "20", "|", "0.5", "1.5", "2.0", "|", "3.00x", "4.00x",
                           "|", "11.5", "57.5"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_report_passes_the_exact_answer_and_fails_wrong_ones(monkeypatch, dtype):
    """The acceptance rule, with the kernel replaced: the float64 truth rounded to the dtype passes; the
    truth scaled by 1.01 (1.05 in bf16, whose own rounding is about 0.4%), or computed without one of its
    indexed rows, fails; and the bound is the documented one, 2 x plain torch's largest error + the truth's
    own rounding + 8 fp32 ulps of its size."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 16, generator=g).to(dtype)                                 # [B, H, D]
    k, v = (torch.randn(2, 2, 40, 16, generator=g).to(dtype) for _ in range(2))       # [B, Hkv, N, D]
    index, start = torch.tensor([[1, 5, 7], [0, 2, 9]]), 30

    def truth(q, k, v, index, start, scale=None):
        return sa.sparse_decode_attention_reference(q.double(), k.double(), v.double(), index, start, scale)

    off = 1.01 if dtype == torch.float32 else 1.05
    kernels = {  # each takes the kernel's arguments: q, k, v, index, start, scale, keywords
        "exact": lambda q, k, v, index, start, *_, **__: truth(q, k, v, index, start).to(q.dtype),
        "scaled": lambda q, k, v, index, start, *_, **__: (off * truth(q, k, v, index, start)).to(q.dtype),
        "a row dropped": lambda q, k, v, index, start, *_, **__: truth(q, k, v, index[:, 1:], start).to(q.dtype)}
    expected = truth(q, k, v, index, start)
    plain = sa.sparse_decode_attention_reference(q, k, v, index, start, upcast=False)      # in the dtype
    torch_max = (plain.double() - expected).abs().max()
    floor = ((expected.to(dtype).double() - expected).abs().max()
             + 8 * torch.finfo(torch.float32).eps * expected.abs().max())
    for name, kernel in kernels.items():
        monkeypatch.setattr(sa, "sparse_decode_attention", kernel)
        report = sa.error_report(q, k, v, index, start)
        assert report["allowed"] == pytest.approx(float(2 * torch_max + floor), rel=1e-9)
        assert report["passed"] is (name == "exact"), (name, report)


# ------------------------------------------------------------------------------------------- compiled for a GPU
COMPILE_CHECK = """
import sys
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as err:  # an older or newer Triton without this offline API
    print("SKIP", err)
    sys.exit(0)
from kernels.compile_offline import compile_both, compile_kernel, products, split_types
from kernels.sparse_attention import _split_attention_kernel, split_constants
import torch
half, single = compile_both(90, "float16", 128, 4), compile_both(90, "float32", 64, 1)
as_tf32 = compile_kernel(_split_attention_kernel, 90, split_types("float32"),
                         {**split_constants(1, 64, torch.float32), "DOT_PRECISION": "tf32"})
print(half["split"]["tensor_cores"], half["split"]["tf32"], single["split"]["tensor_cores"], single["split"]["tf32"],
      products(as_tf32)["tf32"], min(half["split"]["cubin_bytes"], half["merge"]["cubin_bytes"],
                                     single["split"]["cubin_bytes"], single["merge"]["cubin_bytes"]) > 0)
"""


def test_tensor_core_products_are_read_from_instructions_alone():
    """`products` reads a PTX line that starts with an mma or wgmma instruction (sm_90's warp-group products,
    which the compile check below does not happen to produce), never "mma" elsewhere in the text, such as a
    source path in a .file line."""
    from kernels.compile_offline import products

    def compiled(ptx):
        return types.SimpleNamespace(asm={"ptx": ptx})

    assert products(compiled('\t.file\t1 "/home/u/gemma.runs/kernels/sparse_attention.py"\n')) == \
        {"tensor_cores": False, "tf32": False}
    assert products(compiled("\twgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%r1}, %rd1, %rd2;\n")) == \
        {"tensor_cores": True, "tf32": False}
    assert products(compiled("\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};\n")) == \
        {"tensor_cores": True, "tf32": True}


def test_compile_offline_prints_a_row_per_shape_each_column_from_its_kernel(monkeypatch, capsys):
    """The table a reader is shown: by default both GPUs (sm_80 and sm_90), every dtype, both head dims and
    both groups, in that order; the cubin columns from their own kernels, the product columns from split's."""
    from kernels import compile_offline
    compiled = []

    def compile_both(arch, dtype, head_dim, group):
        compiled.append((arch, dtype, head_dim, group))
        return {"split": {"cubin_bytes": 1000 + group, "tensor_cores": dtype != "float32", "tf32": False},
                "merge": {"cubin_bytes": 7, "tensor_cores": False, "tf32": True}}

    monkeypatch.setattr(compile_offline, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(compile_offline, "INTERPRETED", False)
    monkeypatch.setattr(compile_offline, "compile_both", compile_both)
    compile_offline.main([])
    rows = capsys.readouterr().out.splitlines()
    assert compiled == [(arch, dtype, head_dim, group) for arch in (80, 90)
                        for dtype in ("float16", "bfloat16", "float32") for head_dim in (128, 64) for group in (1, 4)]
    assert len(rows) == 2 + len(compiled)
    assert rows[2] == "| sm_80 | float16 | 128 | 1 | 1001 B | 7 B | yes | no |"
    assert rows[-1] == "| sm_90 | float32 | 64 | 4 | 1004 B | 7 B | no | no |"


def test_compile_offline_types_the_pointers_in_the_dtype_asked_for(monkeypatch):
    """q, K, V and the output in the dtype compiled for; the splits' partial results in fp32 whatever it is;
    the index list int64, as the launcher passes it."""
    from kernels import compile_offline
    typed = {}

    def compile_kernel(kernel, arch, types_, constants):
        name = "split" if kernel is compile_offline._split_attention_kernel else "merge"
        typed[name] = arch, types_
        return types.SimpleNamespace(asm={"ptx": "", "cubin": b"x"})

    monkeypatch.setattr(compile_offline, "compile_kernel", compile_kernel)
    compile_offline.compile_both(80, "bfloat16", 128, 4)
    (split_arch, split), (merge_arch, merge) = typed["split"], typed["merge"]
    assert split_arch == merge_arch == 80
    assert [split[name] for name in ("q_ptr", "k_ptr", "v_ptr")] == ["*bf16"] * 3 and merge["out_ptr"] == "*bf16"
    assert split["part_out_ptr"] == merge["part_out_ptr"] == "*fp32" and split["index_ptr"] == "*i64"
    assert split["part_lse_ptr"] == merge["part_lse_ptr"] == merge["lse_ptr"] == "*fp32" and split["qk_scale"] == "fp32"


def test_compile_offline_refuses_the_interpreter_in_one_line(monkeypatch):
    """With TRITON_INTERPRET=1 the kernels are the interpreter's, which cannot be compiled: one line, before
    any compiling, not Triton's traceback."""
    from kernels import compile_offline
    monkeypatch.setattr(compile_offline, "TRITON_AVAILABLE", True)
    monkeypatch.setattr(compile_offline, "INTERPRETED", True)
    monkeypatch.setattr(compile_offline, "compile_both", lambda *args: pytest.fail("compiled in the interpreter"))
    with pytest.raises(UserError, match="TRITON_INTERPRET=1 is set"):
        compile_offline.main([])


def test_the_kernels_compile_for_a_gpu_without_one():
    """The interpreter runs the kernels' Python and never compiles them: a construct it runs and the GPU
    compiler refuses would pass every test above. Compiled for sm_90 by Triton's offline compiler
    (kernels/compile_offline.py, in a process without TRITON_INTERPRET), fp16 products run on tensor cores
    and fp32 ones stay fp32 ("ieee"); the same kernel asked for TF32 shows .tf32 instructions, so the check
    can see them."""
    import os
    import subprocess
    from pathlib import Path

    pytest.importorskip("triton")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_CHECK], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("SKIP"):
        pytest.skip(done.stdout.strip())
    assert done.stdout.split() == ["True", "False", "False", "False", "True", "True"], done.stdout
    assert "FP_FUSION" not in done.stderr  # Triton 3.9 warns where no option pins it (COMPILE_OPTIONS)


def test_the_kernel_benchmarks_7b_shape_is_llama_7bs():
    """The kernel benchmark's LLaVA-7B decode shape is LLaMA-7B's attention (transformers' LlamaConfig defaults)."""
    from transformers import LlamaConfig
    llama = LlamaConfig()
    assert (bench.LLAVA_7B_DECODE.num_heads, bench.LLAVA_7B_DECODE.num_kv_heads, bench.LLAVA_7B_DECODE.head_dim) == (
        llama.num_attention_heads, llama.num_key_value_heads, llama.hidden_size // llama.num_attention_heads)
