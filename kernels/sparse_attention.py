"""
Sparse decode attention: one new query token attends to an index list of cache rows plus a contiguous tail
==========================================================================================================

A-VL (Zhang et al., "Adaptive Attention for Large Vision-Language Models", AAAI 2025) keeps a layer's KV
cache as `[sys | secondary image tokens | text]` but, on a normal decode step, attends only to sys + the
*core* image tokens + text. Where the core rows lie anywhere in the image block, "skip the others" needs
either a gathered copy of K and V every step or a kernel that reads rows through an index list. This file
is that kernel. (tinyavl's cache moves the core to the front of its image block on update steps, so the
index it passes is a contiguous run of rows; the kernel does not rely on that.)

    out[b, h] = softmax(q[b, h] . K_sel^T * scale) @ V_sel          (one softmax over all selected rows)
    selected rows of sample b = index[b, :]  (any order, all < start)  followed by  rows start .. N-1

The caller passes `index = sys rows + core image rows` and `start = first text row`. Query head h reads
KV head h // (H // Hkv) (grouped-query attention); every head of a sample uses the same rows.

How it works (FlashAttention's online softmax, Dao et al. 2022, split as in Flash-Decoding, Dao et al. 2023):
1. The selected rows form one logical list of length n_sel = n_idx + (N - start); position j < n_idx
   is cache row index[b, j], position j >= n_idx is cache row start + (j - n_idx). K and V are read in
   place through these row numbers: nothing is gathered or copied.
2. A decode step has a single query row, so one program per (sample, KV head) would leave most of a GPU idle
   at batch 1. The list is cut into `num_splits` chunks and each program handles one (sample, KV head,
   chunk). It runs an online softmax over its chunk and writes a partial output, normalised by its own
   sum, plus the chunk's log-sum-exp, max + log(sum), kept in base 2.
3. A second small kernel merges the chunks of each (sample, head): with L_s the chunk log-sum-exps and
   L = log(sum_s exp(L_s)), out = sum_s exp(L_s - L) * out_s. This is exactly the single softmax.
4. A program serves all H // Hkv query heads that share its KV head, so each K/V block is loaded once
   and used by `tl.dot` for the whole group.

Scores are kept in base 2 inside the kernels (scale * log2(e) is folded into the score, exp2 is the
GPU's native exponential); the optional log-sum-exp output is converted back to natural log.

Update steps and the re-ranking row. Every K-th step A-VL attends to all secondary image tokens and
re-ranks them by that step's head-mean attention row. The kernel does not produce that row: inside an
online softmax a probability is known only once the last chunk has been seen, so writing a per-column row
would add a second pass and a [B, H, n] output to a kernel whose job is to read as little as possible.
Instead the kernel returns, on request, the per-(b, h) log-sum-exp, with which any column's probability
is exp(scale * q.k_j - lse) without a second softmax: tinyavl's cache recomputes q.k in torch on the rows
it scores (the image block on update steps, the text rows of its per-head H2O every step) and takes
exp(logit - lse). An update step calls this kernel with an empty index and start=0 (dense).

This file holds the kernels, their launcher `sparse_decode_attention`, the plain-torch reference
`sparse_decode_attention_reference` and the error rule `error_report`. The tests are in
tests/test_kernel.py; the benchmark is `python -m kernels.bench_sparse_attention` (on a GPU, or with
TRITON_INTERPRET=1 at toy sizes in Triton's CPU interpreter). tutorial/05-the-sparse-decode-kernel.md
teaches it step by step.
"""
import contextlib
import functools
import math
import numbers
import operator
import os
import types

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:
    # The reference below is plain torch and must keep working without Triton. With these stand-ins the
    # kernels are defined as ordinary functions that the launcher refuses to call.
    TRITON_AVAILABLE = False

    def _plain_function(fn=None, **options):
        """Stands in for both `@triton.jit` and `@triton.jit(**options)`: leaves the function as it is."""
        return fn if fn is not None else _plain_function

    triton = types.SimpleNamespace(jit=_plain_function)
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

LOG2_E = math.log2(math.e)
# Logical positions per loop iteration. 64 rows x 128 dims of fp16 K and V are 32 KiB per iteration,
# a common decode tile; tune on your GPU.
BLOCK_N = 64
# The merge kernel holds all splits of a head in one [MAX_SPLITS, D] tile, masked past the launch's count:
# at most this many splits, a power of two (a tile's length).
MAX_SPLITS = 64


# ----------------------------------------------------------------------------------------------------------
# Reference: gather the selected rows, then ordinary attention (also the semantics of "torch gather + SDPA")
# ----------------------------------------------------------------------------------------------------------

def selected_rows(index: torch.Tensor, start: int, cache_len: int) -> torch.Tensor:
    """The cache rows each sample attends to, in the kernel's logical order: index rows, then start..N-1."""
    batch = index.shape[0]
    tail = torch.arange(start, cache_len, device=index.device).expand(batch, -1)  # [B, N - start]
    return torch.cat([index.long(), tail], dim=1)                                 # [B, n_sel]


def gather_selected_rows(k, v, index, start: int):
    """The selected rows of k and v [B, Hkv, N, D] (`selected_rows`), copied out: two [B, Hkv, n_sel, D]."""
    rows = selected_rows(index, start, k.shape[2])                                  # [B, n_sel]
    batch_ids = torch.arange(k.shape[0], device=k.device)[:, None]                  # [B, 1]
    # Indexing the [B, N, Hkv, D] view with (batch_ids, rows) picks rows per sample: [B, n_sel, Hkv, D].
    return tuple(t.transpose(1, 2)[batch_ids, rows].transpose(1, 2) for t in (k, v))


def sparse_decode_attention_reference(q, k, v, index, start, scale=None, *, upcast=True, return_lse=False):
    """Plain-torch sparse decode attention: what `sparse_decode_attention` returns for the same q, k, v,
    index, start, scale and return_lse (no argument checks; its lse in the compute dtype).

    upcast=True computes in fp32 (fp64 stays fp64) and returns q.dtype. upcast=False computes in the
    inputs' own precision, scores and probabilities rounded to that dtype at every step: this is the
    "plain PyTorch in the kernel's precision" that the flash-attention error rule compares against.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype

    k_sel, v_sel = (t.to(compute_dtype) for t in gather_selected_rows(k, v, index, start))  # [B, Hkv, n_sel, D]
    # Grouped-query attention: query head h reads KV head h // group.
    group = num_heads // num_kv_heads
    k_sel = k_sel.repeat_interleave(group, dim=1)                                  # [B, H, n_sel, D]
    v_sel = v_sel.repeat_interleave(group, dim=1)                                  # [B, H, n_sel, D]

    scores = torch.einsum("bhd,bhnd->bhn", q.to(compute_dtype), k_sel) * scale     # [B, H, n_sel]
    probs = torch.softmax(scores, dim=-1)                                          # [B, H, n_sel]
    out = torch.einsum("bhn,bhnd->bhd", probs, v_sel).to(q.dtype)                  # [B, H, D]
    if return_lse:
        return out, torch.logsumexp(scores, dim=-1)                                # [B, H, D], [B, H]
    return out


# ----------------------------------------------------------------------------------------------------------
# Where the kernels run: compiled for the GPU, or in Triton's CPU interpreter
# ----------------------------------------------------------------------------------------------------------

def _interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter, read as Triton reads it."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


def _runs_in_interpreter(kernel) -> bool:
    """Whether `kernel` was decorated for Triton's CPU interpreter.

    Triton decides at decoration time, from TRITON_INTERPRET. The exact answer is the kernel's type, but
    InterpretedFunction lives in a private module (triton.runtime.interpreter) that may move in any
    release. If it cannot be imported, the environment variable answers instead. A failed private import
    must never make the kernel unavailable: on a GPU the kernel works without it.
    """
    if not TRITON_AVAILABLE:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return _interpreter_requested()
    return isinstance(kernel, InterpretedFunction)


# ----------------------------------------------------------------------------------------------------------
# The interpreter's bf16 workarounds, kept out of the kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _interpreter_safe_dot(a, b, input_precision: tl.constexpr):
    """tl.dot(a, b, input_precision=...) that also gives the right numbers in Triton's CPU interpreter.

    Why: the interpreter has no bf16 arithmetic. It stores bfloat16 as raw uint16, and its tl.dot
    multiplies those bit patterns. A product of two bf16 values is exact in fp32, so a dot of fp32 copies
    has the same products as the GPU's bf16 tensor-core dot (only the order of the fp32 additions may
    differ). The upcast happens under the interpreter only: compiled for a GPU, _BF16_BY_HAND is a
    False constexpr, the branch is removed at compile time, and this is exactly tl.dot.
    """
    if _BF16_BY_HAND:  # set below the kernels: True only in Triton's CPU interpreter
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=input_precision)


@triton.jit
def _interpreter_safe_cast(x, dtype: tl.constexpr):
    """x.to(dtype) for fp32 x, rounded to nearest even in Triton's CPU interpreter too.

    Why: the interpreter casts fp32 to bf16 by dropping the low 16 bits, which rounds every value toward
    zero; a GPU rounds to nearest even. Under the interpreter a bf16 cast is done by hand on the bits: add
    0x7FFF plus the lowest kept bit (so that a tie goes to the even neighbour), then drop the low 16 bits.
    A NaN is kept a NaN (the carry could turn some into 0). Compiled for a GPU the branch is removed and
    this is exactly x.to(dtype).
    """
    if _BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(x != x, 0x7FC0, rounded)                   # a quiet NaN for a NaN
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _zero_if_minus_inf(x):
    """x, with 0 where it is -inf: the point an online softmax measures its exponents from, so that a
    maximum of -inf (every score so far -inf) gives exp2(-inf - 0) = 0, not exp2(-inf - -inf) = NaN."""
    return tl.where(x == float("-inf"), 0.0, x)


# Triton compiles a kernel for each pattern of its integer arguments it sees (equal to 1, divisible by
# 16). The list's lengths and positions change at every decode step, and the pattern pays only on a
# stride: specialised on them, the kernel would be compiled again and again during the first steps of a
# generation. (stride_ib is the index's row length, n_idx for a contiguous index; specialised, it makes at
# most three variants: 1, a multiple of 16, other.)
@triton.jit(do_not_specialize=["n_idx", "start", "n_sel", "rows_per_split", "num_splits"])
def _split_attention_kernel(
    q_ptr,          # [B, H, D] query of the new token, last dim contiguous
    k_ptr, v_ptr,   # [B, Hkv, N, D] the layer's cache, read in place (last dim contiguous)
    index_ptr,      # [B, n_idx] int32/int64 cache rows attended besides the tail, all < start
    part_out_ptr,   # [B, H, num_splits, D] fp32 output: each split's attention output, divided by its own sum
    part_lse_ptr,   # [B, H, num_splits] fp32 output: each split's log2(sum(exp2(score)))
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib, stride_in,
    n_idx,            # list positions 0 .. n_idx-1 (the selected rows, in order) come from the index list
    start,            # list positions n_idx .. n_sel-1 are cache rows start, start+1, ...
    n_sel,            # n_idx + (N - start), the length of the logical list
    rows_per_split,   # list positions per split, a multiple of BLOCK_N
    num_heads, num_kv_heads, num_splits,
    qk_scale,         # softmax scale * log2(e): scores come out in base 2
    GROUP: tl.constexpr,            # query heads per KV head, H // Hkv
    BLOCK_H: tl.constexpr,          # GROUP rounded up to a power of two >= 16 (the tile measured on a GPU)
    BLOCK_N: tl.constexpr,          # list positions per loop iteration
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 inputs (the default would be TF32), else ignored
):
    # Program (sample b, KV head, split): the GROUP query heads of that KV head over one chunk of the list.
    batch_kv_head = tl.program_id(0)
    split = tl.program_id(1)
    b = batch_kv_head // num_kv_heads
    kv_head = batch_kv_head % num_kv_heads

    group_offs = tl.arange(0, BLOCK_H)
    dim_offs = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + group_offs                                  # [BLOCK_H] query heads served
    head_mask = group_offs < GROUP                                        # rows past GROUP are padding

    # 64-bit batch offsets: a large cache can hold more than 2**31 elements.
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dim_offs[None, :]   # [BLOCK_H, D]
    q = tl.load(q_ptrs, mask=head_mask[:, None], other=0.0)               # [BLOCK_H, D]
    k_head_ptr = k_ptr + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_ptr + b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    index_row_ptr = index_ptr + b.to(tl.int64) * stride_ib

    # Online softmax state per query head (base 2).
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)          # [BLOCK_H]
    running_sum = tl.zeros([BLOCK_H], tl.float32)                         # [BLOCK_H] sum of exp2(s - max)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)                       # [BLOCK_H, D] sum of exp2(s - max) v

    # The launcher sizes the splits so that every split holds at least one position, so every block below
    # has a column of the list (past the list, scores are -inf).
    split_lo = split * rows_per_split                                    # scalar: the split's first position
    split_hi = tl.minimum(split_lo + rows_per_split, n_sel)              # scalar: past its last
    for block_lo in range(split_lo, split_hi, BLOCK_N):
        pos = block_lo + tl.arange(0, BLOCK_N)                            # [BLOCK_N] list positions
        in_split = pos < split_hi                                         # [BLOCK_N]
        from_index = pos < n_idx                                          # [BLOCK_N]
        # [BLOCK_N] the index list's rows, 0 where masked
        index_rows = tl.load(index_row_ptr + pos * stride_in, mask=in_split & from_index, other=0)
        rows = tl.where(from_index, index_rows, start + (pos - n_idx)).to(tl.int64)   # [BLOCK_N] cache rows

        k = tl.load(k_head_ptr + rows[:, None] * stride_kn + dim_offs[None, :],
                    mask=in_split[:, None], other=0.0)                    # [BLOCK_N, D]
        scores = _interpreter_safe_dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N]
        scores = tl.where(in_split[None, :], scores * qk_scale, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, axis=1))         # [BLOCK_H]
        # Until a block holds a score above -inf (keys of -inf), new_max is -inf and -inf - -inf would be
        # NaN: measured from 0 instead, every exp2 is then exp2(-inf) = 0, and the state stays empty.
        shift = _zero_if_minus_inf(new_max)                               # [BLOCK_H]
        correction = tl.exp2(running_max - shift)                         # [BLOCK_H] rescales the old state
        probs = tl.exp2(scores - shift[:, None])                          # [BLOCK_H, BLOCK_N]
        running_sum = running_sum * correction + tl.sum(probs, axis=1)

        v = tl.load(v_head_ptr + rows[:, None] * stride_vn + dim_offs[None, :],
                    mask=in_split[:, None], other=0.0)                    # [BLOCK_N, D]
        # As in flash-attention, probabilities enter the second dot in V's precision.
        weighted_v = _interpreter_safe_dot(_interpreter_safe_cast(probs, v.dtype), v,
                                           input_precision=DOT_PRECISION)                 # [BLOCK_H, D]
        acc = acc * correction[:, None] + weighted_v
        running_max = new_max

    part_rows = (b * num_heads + heads) * num_splits + split             # [BLOCK_H] rows of [B*H*S, ...]
    # A split whose every score is -inf has sum 0: it stores output 0 (not 0 / 0) and lse -inf, which the
    # merge weighs 0.
    split_sum = tl.where(running_sum == 0, 1.0, running_sum)              # [BLOCK_H]
    tl.store(part_out_ptr + part_rows[:, None] * HEAD_DIM + dim_offs[None, :],
             acc / split_sum[:, None], mask=head_mask[:, None])
    tl.store(part_lse_ptr + part_rows, running_max + tl.log2(running_sum), mask=head_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr,   # [B*H, num_splits, D] fp32 per-split outputs (contiguous, written by _split_attention_kernel)
    part_lse_ptr,   # [B*H, num_splits] fp32 per-split log2-sum-exp2
    out_ptr,        # [B*H, D] output in q's dtype (contiguous)
    lse_ptr,        # [B*H] fp32 output: natural-log log-sum-exp of the scaled scores
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,   # MAX_SPLITS, whatever num_splits is: one compiled variant for every count
):
    # Program (sample, query head): weight each split by its share of the total sum.
    batch_head = tl.program_id(0)
    split_offs = tl.arange(0, BLOCK_S)
    dim_offs = tl.arange(0, HEAD_DIM)
    split_mask = split_offs < num_splits                                  # [BLOCK_S]

    split_lse = tl.load(part_lse_ptr + batch_head * num_splits + split_offs,
                        mask=split_mask, other=float("-inf"))            # [BLOCK_S]
    split_out = tl.load(part_out_ptr + (batch_head * num_splits + split_offs[:, None]) * HEAD_DIM
                        + dim_offs[None, :], mask=split_mask[:, None], other=0.0)   # [BLOCK_S, D]

    max_lse = tl.max(split_lse, axis=0)                                   # scalar
    # Every split -inf (every key scored -inf): measured from 0, as in the splits, every weight is 0, the
    # lse -inf and the output 0 / 0 = NaN, softmax's over nothing but -inf (not -inf - -inf in the lse).
    shift = _zero_if_minus_inf(max_lse)                                   # scalar
    weights = tl.exp2(split_lse - shift)                                  # [BLOCK_S] relative split sums
    total = tl.sum(weights, axis=0)                                       # scalar
    out = tl.sum(weights[:, None] * split_out, axis=0) / total            # [D]
    tl.store(out_ptr + batch_head * HEAD_DIM + dim_offs, _interpreter_safe_cast(out, out_ptr.dtype.element_ty))
    tl.store(lse_ptr + batch_head, (shift + tl.log2(total)) * 0.6931471805599453)  # x ln(2): back to base e


# True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 set before this module was
# imported): they then take CPU tensors. False when they are compiled for a CUDA GPU, or without Triton.
INTERPRETED = _runs_in_interpreter(_split_attention_kernel)
# Read by _interpreter_safe_dot and _interpreter_safe_cast; a global constexpr, so the compiled kernels do
# not even test it.
_BF16_BY_HAND = tl.constexpr(INTERPRETED)


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def why_unsupported(dtype: torch.dtype, head_dim: int, device: torch.device) -> str | None:
    """Why the kernel cannot run attention of this dtype and head dim on `device`, or None where it can. A
    head is one tl.dot tile dimension, a power of two of at least 16. NVIDIA GPUs have bf16 instructions
    from compute capability 8.0 on (the A100): for an older one (a V100, a T4) some Triton releases fail to
    assemble the kernel's bf16 code ("Feature '.bf16' requires .target sm_80 or higher") and Triton 3.9
    emulates it; the kernel keeps off them. Shared memory is not weighed here: a GPU with too little
    refuses the launch itself (Triton's OutOfResources)."""
    if dtype not in SUPPORTED_DTYPES:
        return f"{dtype} is not one of {SUPPORTED_DTYPES}"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"head dim {head_dim} is not a power of two >= 16 (a tl.dot tile)"
    if dtype == torch.bfloat16 and device.type == "cuda" and not INTERPRETED:
        gpu = gpu_properties(device)
        # AMD's GPUs (torch.version.hip) number their architectures otherwise.
        if torch.version.hip is None and (gpu.major, gpu.minor) < (8, 0):
            return f"this GPU (compute capability {gpu.major}.{gpu.minor}) has no bf16 instructions (8.0 on)"
    return None


@functools.cache
def gpu_properties(device: torch.device):
    """torch.cuda.get_device_properties(device), asked once per device: the launcher and A-VL's cache read it
    at every layer of every decode step (multiprocessors, compute capability), and it does not change."""
    return torch.cuda.get_device_properties(device)


def _check_inputs(q, k, v, index, start, check_index):
    """Validate the arguments; returns (B, H, Hkv, N, D, n_idx, start as an int). Every problem is a ValueError."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v, index)):
        raise ValueError("q, k, v and index must be torch tensors")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
    if k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [B, Hkv, N, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, cache_len, kv_head_dim = k.shape
    if 0 in (batch, num_heads, num_kv_heads):
        raise ValueError(f"q and k need a sample and a head, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[0] != batch or kv_head_dim != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dim")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    reason = why_unsupported(q.dtype, head_dim, q.device)  # the dtype among SUPPORTED_DTYPES, the head's tile
    if reason:
        raise ValueError(reason)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the last dim of q, k and v must be contiguous (stride 1); other strides are free")
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"index must be [B={batch}, n_idx], got shape {tuple(index.shape)}")
    if index.dtype not in INDEX_DTYPES:
        raise ValueError(f"index must be int32 or int64, got {index.dtype}")
    if not (q.device == k.device == v.device == index.device):
        raise ValueError(f"q, k, v, index must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}, {index.device}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the kernel runs on CUDA tensors (got {q.device}), or on CPU tensors in Triton's "
                         "interpreter: set TRITON_INTERPRET=1 before kernels.sparse_attention is imported")
    start = integer("start", start)
    if not 0 <= start <= cache_len:
        raise ValueError(f"start must lie in [0, N={cache_len}], got {start}")
    n_idx = index.shape[1]
    if n_idx + cache_len - start == 0:
        raise ValueError("nothing to attend: index is empty and start == N")
    # The check reads the index back to the host: one synchronisation, which a caller that builds the index
    # itself can skip.
    if check_index and n_idx > 0:
        _check_index_rows(index, start)
    return batch, num_heads, num_kv_heads, cache_len, head_dim, n_idx, start


def _check_index_rows(index, start: int) -> None:
    """A ValueError unless every sample's index [B, n_idx] lists rows in [0, start), each once: a row at or past
    start would be attended twice (or read out of bounds), and so would a row listed twice."""
    sorted_index = index.sort(dim=1).values                              # [B, n_idx], ascending per sample
    has_repeat = (sorted_index.diff(dim=1) == 0).any()                 # scalar bool tensor
    # One .tolist(): the check's single host synchronisation.
    lowest, highest, repeated = torch.stack([sorted_index[:, 0].min(), sorted_index[:, -1].max(),
                                             has_repeat.to(index.dtype)]).tolist()
    if lowest < 0 or highest >= start:
        raise ValueError(f"index rows must lie in [0, start={start}), got values in [{lowest}, {highest}]")
    if repeated:
        raise ValueError("index lists a row twice in one sample: it would be attended twice")


def _a_scalar_tensor(value) -> bool:
    """A 0-d tensor of a real number (not a bool): what `integer` and `number` take of tensors."""
    return isinstance(value, torch.Tensor) and value.dim() == 0 and not (value.dtype.is_complex or
                                                                        value.dtype == torch.bool)


def integer(name: str, value) -> int:
    """value as an int if it is an integer (a Python, numpy or 0-d tensor one; not a bool, nor 4.5):
    else a ValueError naming it."""
    try:
        # operator.index takes a one-element tensor of any rank, and a bool one, as an int.
        if isinstance(value, bool) or isinstance(value, torch.Tensor) and not _a_scalar_tensor(value):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def number(name: str, value) -> float:
    """value as a float if it is a finite real number (a Python or numpy scalar, or a 0-d tensor; not a bool, a
    string, a list or an array): else a ValueError naming it."""
    # numpy's bool is no numbers.Real; Python's is
    if not (_a_scalar_tensor(value) or isinstance(value, numbers.Real) and not isinstance(value, bool)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        result = float(value)
    except OverflowError:  # an integer past float's range
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return result


def split_constants(group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The compile-time arguments of `_split_attention_kernel` for a model's attention: one compiled variant
    per (GQA group, head dim, dtype)."""
    return dict(GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, HEAD_DIM=head_dim,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


# Triton's compile options, pinned: FP fusion (a * b + c as one rounding, an FMA) is on by default up to Triton
# 3.9 and off from 3.10; the kernels were measured with it on, and a newer Triton should not change how they round.
COMPILE_OPTIONS = dict(enable_fp_fusion=True)


def merge_constants(head_dim: int) -> dict:
    """The compile-time arguments of `_merge_splits_kernel`. One tile for every split count: a tile as long as
    the count (rounded up to a power of two) would be a new compiled variant each time a growing cache doubles
    its splits."""
    return dict(HEAD_DIM=head_dim, BLOCK_S=MAX_SPLITS)


def _default_num_splits(num_programs: int, num_blocks: int, device: torch.device) -> int:
    # Aim for about two programs per streaming multiprocessor: batch 1 with 32 KV heads would otherwise
    # run 32 programs on a 132-SM H100. The interpreter runs programs one after another: no split helps there.
    if device.type != "cuda" or INTERPRETED:
        return 1
    num_sms = gpu_properties(device).multi_processor_count
    return max(1, min(num_blocks, triton.cdiv(2 * num_sms, num_programs)))


def sparse_decode_attention(q, k, v, index, start, scale=None, *, num_splits=None, return_lse=False,
                            check_index=True):
    """Decode attention over rows `index[b]` and `start..N-1` of a KV cache, read in place.

    q: [B, H, D], k and v: [B, Hkv, N, D] (fp16/bf16/fp32, last dim contiguous), index: [B, n_idx]
    int32/int64 with all rows < start, start: int in [0, N]. scale defaults to D**-0.5.
    num_splits: chunks of the selected list processed in parallel (default: enough to fill the GPU; at most
    MAX_SPLITS, and at most one per BLOCK_N rows, so that no chunk is empty).
    check_index: verify 0 <= index < start and that no row is listed twice in a sample (costs one host
    synchronisation).
    Returns out [B, H, D] in q.dtype, or (out, lse) with lse [B, H] fp32, the natural-log log-sum-exp
    of the scaled scores, when return_lse=True. For inference: no gradient flows back through it (the
    reference's does).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("sparse_decode_attention needs Triton (pip install triton); "
                           "sparse_decode_attention_reference computes the same result in plain torch")
    batch, num_heads, num_kv_heads, cache_len, head_dim, n_idx, start = _check_inputs(q, k, v, index, start,
                                                                                      check_index)
    scale = head_dim ** -0.5 if scale is None else number("scale", scale)
    group = num_heads // num_kv_heads
    n_sel = n_idx + cache_len - start

    # Split the list into equal chunks of whole blocks. Counting the splits again from the rounded chunk
    # length guarantees that no split is empty (no program is launched for nothing).
    num_blocks = triton.cdiv(n_sel, BLOCK_N)
    requested_splits = (_default_num_splits(batch * num_kv_heads, num_blocks, q.device) if num_splits is None
                        else integer("num_splits", num_splits))
    if requested_splits < 1:
        raise ValueError(f"num_splits must be an integer >= 1, got {num_splits!r}")
    rows_per_split = triton.cdiv(num_blocks, min(requested_splits, num_blocks, MAX_SPLITS)) * BLOCK_N
    num_splits = triton.cdiv(n_sel, rows_per_split)                      # the splits launched

    part_out = torch.empty(batch, num_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, num_heads, num_splits, device=q.device, dtype=torch.float32)
    out = torch.empty(batch, num_heads, head_dim, device=q.device, dtype=q.dtype)
    lse = torch.empty(batch, num_heads, device=q.device, dtype=torch.float32)

    # Triton launches on the current CUDA device, not on the tensors': make theirs current (cuda:1, ...).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _split_attention_kernel[(batch * num_kv_heads, num_splits)](
            q, k, v, index, part_out, part_lse,
            q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            index.stride(0), index.stride(1),
            n_idx, start, n_sel, rows_per_split,
            num_heads, num_kv_heads, num_splits,
            scale * LOG2_E,
            **split_constants(group, head_dim, q.dtype), **COMPILE_OPTIONS,
        )
        _merge_splits_kernel[(batch * num_heads,)](
            part_out, part_lse, out, lse, num_splits, **merge_constants(head_dim), **COMPILE_OPTIONS,
        )
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------------------
# Correctness rule (flash-attention's): the kernel may be at most about twice as wrong as plain torch in the
# kernel's own precision, both measured against a float64 truth.
# ----------------------------------------------------------------------------------------------------------

def error_report(q, k, v, index, start, scale=None, **kernel_kwargs) -> dict:
    """Run kernel and plain torch (in the inputs' dtype) and measure both against a float64 reference.

    Passing means kernel_max <= 2 * torch_max + floor, with floor the sum of
    - the error of the float64 truth rounded to the output dtype: no implementation that returns that
      dtype can do better (it matters where plain torch is lucky, e.g. exact on a single row);
    - 8 fp32 ulps of the output's magnitude: the kernel rounds each probability about four times in
      fp32 (score, scaling, exp2, rescaling) and a GPU's exp2 is approximate to ~2 ulps. This term is
      negligible for fp16/bf16 and keeps fp32, where plain torch's error is itself ~1 ulp, from
      failing on ulp-level noise.
    """
    truth = sparse_decode_attention_reference(q.double(), k.double(), v.double(), index, start, scale)
    plain_torch = sparse_decode_attention_reference(q, k, v, index, start, scale, upcast=False)
    kernel = sparse_decode_attention(q, k, v, index, start, scale, **kernel_kwargs)
    kernel_err = (kernel.double() - truth).abs()
    torch_err = (plain_torch.double() - truth).abs()
    output_rounding = (truth.to(q.dtype).double() - truth).abs().max().item()
    floor = output_rounding + 8 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    report = {
        "dtype": str(q.dtype).removeprefix("torch."),
        "kernel_max": kernel_err.max().item(), "kernel_mean": kernel_err.mean().item(),
        "torch_max": torch_err.max().item(), "torch_mean": torch_err.mean().item(),
        "floor": floor,
    }
    report["allowed"] = 2 * report["torch_max"] + floor
    report["passed"] = report["kernel_max"] <= report["allowed"]
    return report


def format_report(report: dict) -> str:
    """One line: the kernel's and plain torch's errors, and the bound the kernel's must keep under."""
    return (f"{report['dtype']:>8}: kernel max {report['kernel_max']:.2e} mean {report['kernel_mean']:.2e} | "
            f"torch-in-{report['dtype']} max {report['torch_max']:.2e} mean {report['torch_mean']:.2e} | "
            f"allowed {report['allowed']:.2e} -> "
            f"{'ok' if report['passed'] else 'FAIL'}")
