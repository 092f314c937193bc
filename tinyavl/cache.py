"""KV caches: the dense reference and the policies that keep or compute less of it.

A LLaVA prompt is laid out as `[ sys | image (N_img tokens) | text ... ]` (A-VL's modality split, Zhang et
al., "Adaptive Attention for Large Vision-Language Models", AAAI 2025):
- sys: everything before the first image token (BOS, a system prompt if the checkpoint has one,
  "USER: "). It holds the attention sink.
- image: the projected image features, N_img of them (576 for LLaVA-1.5).
- text: the question, "ASSISTANT:", then every generated token.
A prompt without an image has an empty image block and one sys token, its first (BOS, the attention sink);
the rest is text (`generate.image_segments`).

Every cache here runs the same four stages for each layer, in `KVCache.attend`:
    append   the new keys/values (after RoPE) and their logical positions
    select   the cached rows this query computes with (`rows_to_attend`; None = all of them)
    compute  attention over those rows only: a shorter attention, not a mask (on a CPU in 16-bit floats
             the last run of rows is read on to `read_end`, rows past it at probability 0)
    update   the policy's bookkeeping after the step: score what it needs, evict what it drops
with one hand-over between the last two: compute returns, beside the output, what it knows about the
newest query row (`LastRow`: its log-sum-exp, and the logits it computed), so that update scores this
step's attention without multiplying q by K a second time (on the torch path; the Triton kernel hands
over the log-sum-exp alone, and the rows a policy scores are multiplied again);
and one between layers, at prefill: `hidden_rows_to_keep`, by which FastV and A-VL's prefill filter let
later layers run on fewer tokens.

Each layer's cache holds k, v (B, Hkv, n, hs) and pos (B, Hkv, n): the logical position of every row.
Positions make everything else readable: which modality a row belongs to, which tokens a head kept,
how much memory each modality takes. Policies that evict per head (H2O) keep the same number of rows
in every head, so the tensors stay rectangular while the tokens differ.

Policies (`make_cache(name, **params)`):
    full       KVCache         dense attention, the reference every other policy is tested against
    avl        AVLCache        A-VL: image tokens stored but only the core computed, text kept local + heavy
    h2o        H2OCache        heavy hitters + recent window over the whole sequence, per head
    streaming  StreamingCache  4 attention sinks + a recent window
    fastv      FastVCache      drop image tokens inside the decoder from layer filter_layer on, decided at prefill
    random     RandomCache     the control: a seeded uniformly random floor(S N_img) image tokens, every layer

Each policy declares its parameters once, in `PARAMS` (name, default, allowed range, one-line help): the
constructor's checks and defaults, make_cache's, the command lines' flags and --help all come from there.
A new policy is a KVCache subclass with a `name`, its `PARAMS` and `FULL_BUDGET`, added to POLICIES, to the
list above and to the README's policy table (a test compares that table with POLICIES);
tests/test_policy_contract.py then checks it like every other (tutorial chapter 2 writes one).
"""
import math
import sys
from dataclasses import dataclass, field, replace
from fractions import Fraction

import torch

from tinyavl.errors import UserError
from tinyavl.model import attention, rows_logits
from tinyavl.params import SEED_PARAM, Param, rate

MODALITIES = ("sys", "image", "text")  # a prompt's segments, in order


# ---------------------------------------------------------------------------------------------------
# One query row's attention: every decode step's, and at prefill the last prompt row a policy ranks by.
# ---------------------------------------------------------------------------------------------------

def last_row_logits(q, k):
    """Scaled logits of the last query row against the keys: (B, H, n), fp32 (the products in q and k's
    dtype: pass them as fp32 for fp32 products).

    q (B, H, t, hs), k (B, Hkv, n, hs). At a decode step q is the step's one row; at prefill, where the
    prompt's attention runs on SDPA without handing out its matrix, a policy that ranks by the last
    prompt row recomputes that one row here.
    """
    return rows_logits(q[:, :, -1:], k)[:, :, 0]


def last_row_probs(q, k):
    """Attention probabilities of the last query row over the keys: (B, H, n), fp32."""
    return last_row_logits(q, k).softmax(-1)


@dataclass
class LastRow:
    """What `compute` hands `update` about the newest query row: its log-sum-exp over the rows it
    attended, lse (B, H), and the scaled logits it computed on the way, per span of consecutive cache
    rows: [(first row, logits (B, H, n_span) fp32)] (none where the computation keeps only lse, as the
    Triton kernel does). A row's probability is exp(logit - lse)."""
    lse: torch.Tensor
    span_logits: list = field(default_factory=list)

    def probs(self, q, k, start: int, end: int):
        """This step's attention probabilities (B, H, end - start) on rows start .. end - 1 of the
        layer's cache k: the logits sliced from a span handed over that holds those rows, or, where none
        does, q.k recomputed on those rows alone (the others need not be read). The rows must be ones the
        step attended: on others, exp(logit - lse) is no probability, as lse left them out."""
        for first, logits in self.span_logits:
            if first <= start and end <= first + logits.shape[-1]:
                return (logits[..., start - first:end - first] - self.lse[..., None]).exp()
        # In fp32: an lse handed over without logits is the Triton kernel's, whose logits are fp32 products
        # of the cached values. Logits recomputed in bf16 would each be rounded (by up to 1/8 near 50), and
        # exp(logit - lse) would then no longer sum to 1 over the row.
        return (last_row_logits(q.float(), k[:, :, start:end].float()) - self.lse[..., None]).exp()


# Rows per shape of a decode step's products where a new shape is costly: on a CPU, PyTorch runs bf16 and
# fp16 matrix products through oneDNN, which builds (and caches) a kernel for every shape it meets. A decode
# step's last span is a row longer at every step, so every step met a new shape: in a scratch timing here
# (one layer of 32 heads, 256 steps from 660 rows, bf16) a call took 22 ms on average where 1.8 ms
# sufficed, and the cost grew with the rows. Read in buckets of 64 rows, a shape is new every 64 steps.
ROW_BUCKET = 64


def read_end(end: int, k) -> int:
    """Where `decode_attention` stops reading a span that ends at row `end` of the buffer k (B, Hkv, m, hs):
    `end` itself, or on a CPU in a 16-bit float the next multiple of ROW_BUCKET, as far as k holds rows."""
    if k.device.type != "cpu" or k.dtype not in (torch.bfloat16, torch.float16):
        return end
    return min(-(-end // ROW_BUCKET) * ROW_BUCKET, k.shape[2])


def contiguous_runs(rows) -> list[tuple[int, int]]:
    """Ascending row indices (n,) as the runs of consecutive rows they make, [(start, end)]:
    [0, 1, 2, 7, 8] -> [(0, 3), (7, 9)]. Each run is then one slice of the cache, read in place."""
    starts = torch.ones_like(rows, dtype=torch.bool)              # (n,) True where a run starts: the first
    starts[1:] = rows[1:] != rows[:-1] + 1                        # row, and any not right after the one before
    ends = torch.cat([starts[1:], starts.new_ones(1)])            # (n,) True where a run ends
    return list(zip(rows[starts].tolist(), (rows[ends] + 1).tolist()))


def decode_attention(q, k, v, spans):
    """One query's attention over spans of the cached rows, read where they lie (no joined copy): a
    softmax over all their logits together. q (B, H, 1, hs); k, v (B, Hkv, m, hs): the layer's buffers,
    or any tensors that hold the spans' rows; spans [(start, end)], ascending, end <= m, none starting
    where the one before ends (`contiguous_runs` makes them so: in bf16 two spans that meet would round
    differently from the one span they make).
    Returns (out (B, H, 1, hs), LastRow): the output, and the row's log-sum-exp and logits per span.

    The last span may be read past its end, up to `read_end`: the rows there get logit -inf, so
    probability 0, and a value row times 0 adds nothing, if it is a number (0 x NaN is NaN): v's rows up
    to m must be finite (a cache's are: zeros, or rows it once held)."""
    B, H, _, hs = q.shape
    Hkv = k.shape[1]
    last_start, last_end = spans[-1]
    reads = spans[:-1] + [(last_start, read_end(last_end, k))]
    logits = [last_row_logits(q, k[:, :, start:end]) for start, end in reads]  # each (B, H, rows read) fp32
    logits[-1][..., last_end - last_start:] = float("-inf")                 # rows read past the last span
    lse = torch.cat(logits, dim=-1).logsumexp(-1)                               # (B, H)
    # Each span's share of the output (rounded to v's dtype by its product) summed in fp32, the sum rounded
    # once: in bf16, a sum in bf16 would round again at every span. Query head h reads KV head h // G: a GQA
    # group's probabilities multiply its KV head's values.
    out = torch.zeros(B, Hkv, H // Hkv, hs, device=q.device)                    # (B, Hkv, G, hs) fp32
    for read_logits, (start, end) in zip(logits, reads):
        probs = (read_logits - lse[..., None]).exp().reshape(B, Hkv, H // Hkv, -1)   # (B, Hkv, G, rows read)
        out += (probs.to(v.dtype) @ v[:, :, start:end]).float()
    # LastRow's logits cover the spans' rows, not those read past.
    held_logits = [(start, read_logits[..., :end - start]) for (start, end), read_logits in zip(spans, logits)]
    return out.to(v.dtype).reshape(B, H, 1, hs), LastRow(lse, held_logits)


def top_rows(scores, count: int):
    """Indices of the `count` highest scores along the last dim, ascending (in positional order where the
    scores are in it; `AVLCache.rerank_core` scores a block laid out core first)."""
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values


def core_first_order(scores, n_core: int):
    """An order of a block of rows with its top n_core by score first, then the others, each part in the
    order it had: (n,) indices into the block. A-VL lays its image rows out so."""
    core = top_rows(scores, n_core)  # (n_core,) indices into the block
    others = torch.ones_like(scores, dtype=torch.bool)  # (n,) bool: False for the core, below
    others[core] = False
    return torch.cat([core, others.nonzero().flatten()])


def group_sum(probs, n_kv_heads: int):
    """(B, H, n) per query head -> (B, Hkv, n): the query heads of a GQA group add onto their KV head."""
    B, H, n = probs.shape
    return probs.reshape(B, n_kv_heads, H // n_kv_heads, n).sum(2)


def add_step_attention(scores, probs):
    """An H2O ledger after a decode step: scores (B, Hkv, n - 1) of the rows held before it, plus the
    attention this step's query gave every row, probs (B, H, n) summed per KV head. The newest row, the
    step's own, starts with the attention it gave itself."""
    B, Hkv, _ = scores.shape
    return torch.cat([scores, scores.new_zeros(B, Hkv, 1)], dim=-1) + group_sum(probs, Hkv)   # (B, Hkv, n)


def causal_column_sums(q, k, first_row: int = 0, chunk: int = 64):
    """The causal attention each key received from the queries q, summed over query rows and over the
    query heads of each GQA group: (B, Hkv, n) in fp32. H2O's accumulated score after prefill.

    q (B, H, t, hs) are the prompt rows first_row .. first_row + t - 1 of the keys k (B, Hkv, n, hs).
    Computed in chunks of query rows, so a 3000-token prompt never materialises its (H, n, n) matrix. Small
    chunks also ran faster on this project's 2-core CPU (one layer of a 2973-token prompt: 0.32 s in chunks
    of 64, 0.57 s in chunks of 256), likely because a chunk's logits and probabilities (2 x 24 MB for 64
    rows of 32 heads over 3000 keys) then stay in the processor's cache from the product to the sum.
    """
    B, H, t, hs = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    sums = torch.zeros(B, Hkv, n, device=q.device)
    size = min(chunk, t)  # rows of the largest chunk
    future = torch.ones(size, size, dtype=torch.bool, device=q.device).triu(1)         # a row's later keys
    for start in range(0, t, chunk):
        q_chunk = q[:, :, start:start + chunk].reshape(B, Hkv, H // Hkv, -1, hs)    # (B, Hkv, G, c, hs)
        c = q_chunk.shape[3]
        # Causal: the chunk's rows see keys [0, end) only, so the keys after are never multiplied, and
        # only the chunk's own (c, c) diagonal block holds keys in some row's future.
        end = first_row + start + c
        logits = (q_chunk @ k[:, :, None, :end].transpose(-1, -2)).float().mul_(hs ** -0.5)  # (B, Hkv, G, c, end)
        logits[..., end - c:].masked_fill_(future[:c, :c], float("-inf"))
        sums[..., :end] += logits.softmax(-1).sum(dim=(2, 3))
    return sums


def heavy_plus_recent(scores, pos, n_heavy: int, n_recent: int, length: int):
    """H2O's choice, per head: the n_recent latest tokens plus the n_heavy best-scored older ones (counts;
    the policies' `heavy` and `recent` are fractions).

    scores, pos (B, Hkv, n): each row's score and logical position, in any row order; length: tokens
    in the sequence so far. The latest n_recent positions (length - n_recent ..) are all held, since a
    token in the window was never evicted. Returns keep (B, Hkv, n) bool, n_heavy + n_recent True in every
    head, so K and V stay rectangular; which tokens differ from head to head.
    """
    keep = pos >= length - n_recent                                                     # (B, Hkv, n)
    older_scores = scores.masked_fill(keep, float("-inf"))                            # (B, Hkv, n)
    return keep.scatter_(-1, older_scores.topk(n_heavy, dim=-1).indices, True)


# ---------------------------------------------------------------------------------------------------
# Counting a policy's tokens from its fractions (its parameters are `tinyavl.params.Param`s).
# ---------------------------------------------------------------------------------------------------

def recent_window(default: float) -> Param:
    """H2O's and StreamingLLM's `recent`: one meaning, so one declaration and one flag."""
    return rate("recent", default, "recent-window fraction of the sequence so far")


def as_decimal(x) -> Fraction:
    """A rate as the decimal it is written as (0.7), not the binary float just below it."""
    return x if isinstance(x, Fraction) else Fraction(repr(float(x)))  # float(): numpy's floats too


def floor_count(fraction, n: int) -> int:
    """floor(fraction x n): a policy's count of tokens, the fraction taken as a decimal: in binary floats
    0.7 x 90 is 62.99999999999999, which floor would make 62 of the 63 a reader counts."""
    return math.floor(as_decimal(fraction) * n)


def window_length(recent: float, length: int) -> int:
    """The recent window's tokens: floor(recent x length), and at least the newest token, which a window
    of none would evict as soon as it is written (a short sequence at a small fraction)."""
    return max(1, floor_count(recent, length))


# ---------------------------------------------------------------------------------------------------
# The dense cache: the `full` policy and the base of every other one.
# ---------------------------------------------------------------------------------------------------

class KVCache:
    """Dense KV cache: every layer keeps and attends to every token."""

    name = "full"
    PARAMS: tuple[Param, ...] = ()  # the policy's parameters, declared once
    FULL_BUDGET: dict = {}          # parameters with which the policy keeps and computes every token

    def __init__(self, named=str, **params):
        """Every declared parameter becomes an attribute: the value given, checked, or its default.
        (No per-class signature: PARAMS is the one source of names and defaults.) named: how a mistake's
        message names a parameter (`check_params`)."""
        for name, value in self.check_params(params, named).items():
            setattr(self, name, value)

    @classmethod
    def check_params(cls, params: dict, named=str) -> dict:
        """Every declared parameter's value, {name: value}: the one given, checked, or its default. A
        UserError names the parameters as named(name) does (the command lines: their flags)."""
        declared = {p.name: p for p in cls.PARAMS}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            takes = ", ".join(map(named, declared)) or "no parameters"
            raise UserError(f"policy {cls.name!r} takes {takes}, not " + "; ".join(
                f"{named(p)} (a parameter of {', '.join(param_owners().get(p, {})) or 'no policy'})" for p in unknown))
        return {name: param.check(params.get(name, param.default), named) for name, param in declared.items()}

    def params(self) -> dict:
        """The policy's parameters, for reports."""
        return {p.name: getattr(self, p.name) for p in self.PARAMS if p.reported}

    def begin(self, n_layers: int, n_sys: int, n_img: int, max_decode_steps: int = 0):
        """Reset for a new sequence whose prompt is [sys (n_sys) | image (n_img) | text], to be followed
        by up to max_decode_steps decode steps, a row each (the room a layer's buffers reserve after its prefill)."""
        self.n_layers, self.n_sys, self.n_img, self.max_decode_steps = n_layers, n_sys, n_img, max_decode_steps
        # Per layer: buffers (B, Hkv, capacity, hs) for keys after RoPE and values, (B, Hkv, capacity)
        # for the logical position of each row; the first n rows are the cache, k/v/pos views of them.
        self.k_buffer, self.v_buffer, self.pos_buffer = [None] * n_layers, [None] * n_layers, [None] * n_layers
        self.k = [None] * n_layers    # per layer (B, Hkv, n, hs): the rows held, a view of k_buffer
        self.v = [None] * n_layers    # per layer (B, Hkv, n, hs)
        self.pos = [None] * n_layers  # per layer (B, Hkv, n)
        self.next_pos = 0             # logical position of the next token (prompt length + steps)
        self.logical_length = 0       # tokens in the sequence, this forward pass's included (set by attend)
        self.step = 0                 # forward passes so far: 0 during prefill, t during decode step t
        self.attended = [0] * n_layers  # rows the newest query computed with, per layer
        self.pending_hidden_rows = None  # a policy's decision to drop hidden rows, handed to the model once
        self.hires_view = None        # FlexAttention's view of the image (model.HiresView), set at the prefill
        self.hires_keys = None        # with it: the keys the newest query attended and their positions

    # -- the four stages ----------------------------------------------------------------------------

    def attend(self, layer: int, q, k, v, pos):
        """Store this layer's t new rows and return the attention output (B, H, t, hs).

        q (B, H, t, hs), k and v (B, Hkv, t, hs), pos (t,) their logical positions: the whole prompt at the
        prefill, then one token per decode step.
        """
        if self.step > 0 and q.shape[2] != 1:
            # Rows that arrive together after the prefill would need a causal mask against the cache that
            # no policy's compute has (a chunked prefill): refused, rather than attended wrongly.
            raise ValueError(f"a decode step takes one token, got {q.shape[2]}: after the prefill the cache "
                             "decodes one token at a time")
        if layer == 0:
            # Tokens in the sequence so far, evicted and filtered ones included: layer 0 sees every token of
            # this forward pass (a policy drops hidden rows only after a layer), the prompt or a step's one.
            self.logical_length = self.next_pos + q.shape[2]
        self.append(layer, k, v, pos)
        rows = self.rows_to_attend(layer)
        out, last_row = self.compute(layer, q, rows)
        self.attended[layer] = self.k[layer].shape[2] if rows is None else len(rows)
        if self.hires_view is not None and self.hires_view.acts_in(layer):
            self.hires_keys = self.attended_keys(layer, rows)
        self.update(layer, q, last_row)
        if self.step == 0:
            # Sized now, not once every layer is done: the prompt's own tensors, this layer's buffers until
            # here, hold the rows the policy just evicted, and all the layers' together would hold as much as
            # the dense cache at the end of the prefill. So at most one layer holds its whole prompt at once.
            self.reserve(layer, self.k[layer].shape[2] + self.max_decode_steps)
        return out

    def attended_keys(self, layer: int, rows):
        """Copies of the keys this step attended, (B, Hkv, n, hs), and their positions (B, Hkv, n): what
        FlexAttention's current token needs to merge its row with the high-resolution keys and to choose
        from its attention over the image, as they were before the update, with each head's positions (H2O
        keeps different rows in each head). Copies: the update evicts and moves rows in place (at the
        prefill, in the prompt's own tensors)."""
        keys, key_positions = self.k[layer], self.pos[layer]                     # (B, Hkv, n, hs), (B, Hkv, n)
        if rows is None:
            return keys.clone(), key_positions.clone()
        return keys.index_select(2, rows), key_positions[..., rows]

    def append(self, layer: int, k, v, pos):
        """Write the t new rows after the n held ones, in place (the buffers grow only when full)."""
        B, Hkv, t, _ = k.shape
        pos = pos.expand(B, Hkv, -1)                                        # (B, Hkv, t)
        if self.k[layer] is None:
            # Prefill: the prompt's own tensors are the first buffers; `attend` re-sizes them once the
            # policy has evicted what it drops, so past its prefill a layer holds no room for evicted rows.
            # The positions are copied: the expanded view is the model's own `positions` (which every later
            # layer is given) seen through a stride of 0, so an eviction that edits one head's positions in
            # place would edit every head's, and the model's.
            self.k_buffer[layer], self.v_buffer[layer] = k, v
            self.pos_buffer[layer] = pos.clone(memory_format=torch.contiguous_format)
            self.hold(layer, t)
        else:
            n = self.k[layer].shape[2]
            if n + t > self.k_buffer[layer].shape[2]:
                self.reserve(layer, 2 * (n + t))  # called past the room reserved: grow geometrically
            self.k_buffer[layer][:, :, n:n + t] = k
            self.v_buffer[layer][:, :, n:n + t] = v
            self.pos_buffer[layer][:, :, n:n + t] = pos
            self.hold(layer, n + t)

    def hold(self, layer: int, n: int):
        """The first n buffer rows are the layer's cache: point the k, v, pos views at them."""
        self.k[layer] = self.k_buffer[layer][:, :, :n]                      # (B, Hkv, n, hs)
        self.v[layer] = self.v_buffer[layer][:, :, :n]
        self.pos[layer] = self.pos_buffer[layer][:, :, :n]                  # (B, Hkv, n)

    def reserve(self, layer: int, capacity: int):
        """New buffers of `capacity` rows holding the layer's n rows (one copy of them)."""
        n = self.k[layer].shape[2]
        for buffers, held in ((self.k_buffer, self.k), (self.v_buffer, self.v), (self.pos_buffer, self.pos)):
            old = held[layer]
            buffers[layer] = old.new_empty(*old.shape[:2], capacity, *old.shape[3:])    # (B, Hkv, capacity[, hs])
            buffers[layer][:, :, :n] = old
            # The room is zeros, never whatever memory held: decode_attention may read it (`read_end`)
            # and multiplies its values by 0, which a NaN there would survive.
            buffers[layer][:, :, n:] = 0
        self.hold(layer, n)

    def rows_to_attend(self, layer: int):
        """Row indices (ascending, shared by all heads, never empty: the step's own row is among them) this
        decode step computes with; None = every row, as at the prefill, where the prompt attends causally to
        all of itself (`compute` refuses rows there)."""
        return None

    def compute(self, layer: int, q, rows):
        """Attention over the selected rows: a shorter attention, not a mask over the full length.

        Returns (out (B, H, t, hs), last_row): at a decode step a `LastRow` (the query row's log-sum-exp and
        logits, its rows numbered as in the cache), from which update scores this step's attention; None
        at the prefill, where a policy that ranks by the last prompt row computes it from q and K itself."""
        if self.step == 0:
            # The cache was empty, so the prompt's rows are exactly the keys: plain causal attention.
            if rows is not None:
                raise ValueError(f"{type(self).__name__}.rows_to_attend must return None at the prefill: the "
                                 "prompt attends causally to all of itself")
            return attention(q, self.k[layer], self.v[layer], causal=True), None
        # A decode step's one query sees every selected row, read where it lies: each run of consecutive
        # rows is one slice of the buffers (the last, which ends at the newest row, read on to `read_end`:
        # room past it, zeros or rows once held, at probability 0), so nothing is gathered. On the torch
        # path every policy decodes through this one decode_attention, so policies differ only in the rows
        # they read (A-VL on CUDA reads its rows with the Triton kernel: `AVLCache.compute`). It is here for
        # the logits it hands over, not for speed: SDPA, which returns no logits, was as fast in fp32 and
        # faster in bf16 (chapter 8, "Shapes matter too").
        spans = [(0, self.k[layer].shape[2])] if rows is None else contiguous_runs(rows)
        return decode_attention(q, self.k_buffer[layer], self.v_buffer[layer], spans)

    def update(self, layer: int, q, last_row):
        """Policy hook after the step's attention (q: the step's query rows; last_row: what compute
        handed over): score, evict. The dense cache keeps everything."""

    @property
    def filters_prefill(self) -> bool:
        """Whether the policy drops image tokens from the hidden states at the prefill, from its filter_layer
        on (FastV with R > 0; A-VL with P < 1): `hidden_rows_to_keep`. A policy that can say True declares a
        `filter_layer` parameter, which `decides_filter` reads."""
        return False

    def decides_filter(self, layer: int) -> bool:
        """Whether this layer's prefill decides which hidden rows the later layers run on: for a policy that
        filters, layer filter_layer - 1, unless no layer comes after it."""
        return (self.step == 0 and self.filters_prefill and layer == self.filter_layer - 1
                and layer < self.n_layers - 1)

    def hidden_rows_to_keep(self):
        """Hidden rows (prefill only) that the next layers run on; None = all of them. The model asks after
        every layer; a policy that drops tokens (FastV, A-VL's filter) sets `pending_hidden_rows` in the
        update of the layer that decides (`decides_filter`), and this hands them over once."""
        rows, self.pending_hidden_rows = self.pending_hidden_rows, None
        return rows

    def advance(self, n_tokens: int):
        """Called by the model after each forward pass (the prefill's, then each decode step's)."""
        self.next_pos += n_tokens
        self.step += 1

    # -- editing the cache ----------------------------------------------------------------------------

    def keep_shared_rows(self, layer: int, rows, start: int = 0):
        """Evict at prefill: of the rows from `start` on, keep only `rows` (n_keep,), shared by every
        head, moved down in that order to fill from `start` (positional order, or a layout of the
        policy's, as A-VL's core-first image block); rows before `start` stay untouched."""
        end = start + len(rows)
        for buffer, held in ((self.k_buffer, self.k), (self.v_buffer, self.v), (self.pos_buffer, self.pos)):
            # index_select copies the rows out first, so `rows` may overlap the rows they replace.
            buffer[layer][:, :, start:end] = held[layer].index_select(2, rows)
        self.hold(layer, end)

    def keep_image_rows(self, layer: int, image_rows):
        """Evict image tokens at the prefill: of the layer's image block (the image tokens that reached this
        layer: N_img, or fewer after a prefill filter), keep only `image_rows` (n_keep,), indices into the
        block shared by every head, laid out in the order given; sys rows stay, and the text rows move down
        after the kept image rows."""
        k = self.k[layer]
        first_text_row = self.n_sys + self.n_prefill_image_rows(layer)
        text_rows = torch.arange(first_text_row, k.shape[2], device=k.device)                # (n_text,)
        self.keep_shared_rows(layer, torch.cat([self.n_sys + image_rows.to(k.device), text_rows]), start=self.n_sys)

    def compact(self, layer: int, keep, start: int = 0, scores=None):
        """Evict per head: of the rows from `start` on, drop those where keep is False, moving only the
        kept rows that lie past the new end, into the dropped rows' slots before it.
        A step that drops one row per head moves at most one row per head; nothing else is copied, so rows stop
        being in positional order (attention does not mind: cached keys carry their RoPE rotation, and
        `pos` says which token each row holds).

        keep (B, Hkv, m) bool for rows start .. start + m - 1, the same count True in every head.
        scores (B, Hkv, m), a policy's per-row ledger, is compacted alike and returned (None: none)."""
        B, Hkv, m = keep.shape
        kept = keep.reshape(B * Hkv, m)                                      # (B Hkv, m)
        fewest, most = torch.stack(kept.sum(1).aminmax()).tolist()   # the planes' kept counts: one wait for a GPU
        if fewest != most:  # a head keeping another count: its rows would pair with another head's slots
            raise ValueError("compact: keep must hold the same count of True in every (sample, head)")
        n_keep = most
        # Per (sample, head) plane: the dropped slots before the new end and the kept rows after it, as
        # many of each in every plane; nonzero lists both plane by plane, so they pair up in order and
        # share one list of planes.
        plane, hole = (~kept[:, :n_keep]).nonzero(as_tuple=True)             # each (n_moves,)
        fill = n_keep + kept[:, n_keep:].nonzero(as_tuple=True)[1]            # (n_moves,)
        sample, head = plane // Hkv, plane % Hkv                              # each (n_moves,)
        for buffer in (self.k_buffer, self.v_buffer, self.pos_buffer):
            buffer[layer][sample, head, start + hole] = buffer[layer][sample, head, start + fill]
        self.hold(layer, start + n_keep)
        if scores is None:
            return None
        scores = scores.reshape(B * Hkv, m).clone()                          # (B Hkv, m)
        scores[plane, hole] = scores[plane, fill]
        return scores[:, :n_keep].reshape(B, Hkv, n_keep)

    def swap_rows(self, layer: int, rows, other_rows):
        """Rows `rows` and `other_rows` (disjoint (n,) indices of equal length, shared by every head)
        trade places, in place: each of the 2n rows is copied twice, out to a temporary and back, and no
        other row moves."""
        both, swapped = torch.cat([rows, other_rows]), torch.cat([other_rows, rows])    # each (2n,)

        def trade(tensor, dim):  # index_select copies the rows out first, so the two lists may trade places
            tensor.index_copy_(dim, both, tensor.index_select(dim, swapped))

        trade(self.pos_buffer[layer], 2)
        for buffer in (self.k_buffer[layer], self.v_buffer[layer]):
            if swaps_every_head_at_once(buffer):
                trade(buffer, 2)
            else:  # plane by plane, each (capacity, hs): indexed, as autograd forbids writing into unbind's views
                for sample in range(buffer.shape[0]):
                    for head in range(buffer.shape[1]):
                        trade(buffer[sample, head], 0)

    # -- accounting: measured from the tensors actually held ------------------------------------------

    def nbytes(self) -> int:
        """Bytes of the K and V rows held, all layers (one layer's: `modality_bytes`); the buffers' room for
        the decode steps still to come is `reserved_nbytes`."""
        return sum(t.numel() * t.element_size() for held in (self.k, self.v) for t in held if t is not None)

    def reserved_nbytes(self) -> int:
        """Bytes of the K and V buffers, the rows held and the room reserved for the steps to come."""
        return sum(t.numel() * t.element_size() for buffers in (self.k_buffer, self.v_buffer)
                   for t in buffers if t is not None)

    def is_image(self, pos):
        """Which of the logical positions pos (any shape) hold image tokens: n_sys .. n_sys + n_img - 1."""
        return (pos >= self.n_sys) & (pos < self.n_sys + self.n_img)

    def modality_head_rows(self, layer: int) -> dict:
        """(sample, head, row) triples one layer holds for sys, image and text, read off the logical
        positions. Exact also when heads keep different tokens (H2O)."""
        pos = self.pos[layer]
        if pos is None:
            return dict.fromkeys(MODALITIES, 0)
        return {"sys": int((pos < self.n_sys).sum()), "image": int(self.is_image(pos).sum()),
                "text": int((pos >= self.n_sys + self.n_img).sum())}

    def n_prefill_image_rows(self, layer: int) -> int:
        """The image tokens one layer's prefill holds, rows n_sys on, the same in every head: N_img, or fewer
        where a prefill filter ran before this layer (`hidden_rows_to_keep`)."""
        return int(self.is_image(self.pos[layer][0, 0]).sum())                    # one head's positions

    def modality_rows(self, layer: int) -> dict:
        """Rows one layer holds per head for sys, image and text (the mean over samples and KV heads when
        they differ)."""
        heads = 1 if self.pos[layer] is None else self.pos[layer].shape[0] * self.pos[layer].shape[1]
        rows = {m: n / heads for m, n in self.modality_head_rows(layer).items()}
        return {m: int(n) if n == int(n) else n for m, n in rows.items()}

    def modality_bytes(self, layer: int) -> dict:
        """Bytes one layer holds for sys, image and text rows (K and V, all samples and heads)."""
        if self.k[layer] is None:
            return dict.fromkeys(MODALITIES, 0)
        bytes_per_head_row = 2 * self.k[layer].shape[-1] * self.k[layer].element_size()  # a key and a value
        return {m: n * bytes_per_head_row for m, n in self.modality_head_rows(layer).items()}

    def dense_nbytes(self) -> int:
        """What the dense cache would hold for the same sequence so far."""
        k = next(t for t in self.k if t is not None)
        values_per_token = 2 * k.shape[0] * k.shape[1] * k.shape[3]  # K and V: B x Hkv x hs each
        return self.n_layers * self.next_pos * values_per_token * k.element_size()


def swaps_every_head_at_once(buffer) -> bool:
    """How `KVCache.swap_rows` moves a K or V buffer's rows: in one copy for every head (True, on a GPU), or
    one (sample, head) plane (capacity, hs) at a time (on a CPU).

    On a GPU a copy per plane is two kernel launches (a select and a copy) per (sample, head) for K and two
    for V, 128 per layer for LLaVA-7B's 32 heads, which cost more than the rows they move. On a CPU a row of
    a plane is contiguous, so selecting and copying rows along its first dim are row copies (memcpy): in runs
    of the benchmark's fp32 A-VL case at 2928 image tokens that compared the ways (2 cores, 2026-12-05) an
    update step's swaps took 17.5-18.7 ms plane by plane, 20.4 ms as one copy of every head's rows seen as
    one list, and 22.6-24.8 ms along dim 2 of the 4-d buffer."""
    return buffer.is_cuda


# ---------------------------------------------------------------------------------------------------
# A-VL's decode kernel (kernels/sparse_attention.py): whether Triton runs it here.
# ---------------------------------------------------------------------------------------------------

# The queries (`kernel_key`) whose compiled kernel a GPU has refused (`AVLCache.kernel_does_not_fit`). A GPU's
# limits hold for the whole process, and a generation makes a cache per call: the next ones take torch at once.
REFUSED_KERNELS = set()


def kernel_key(q) -> tuple:
    """A query's (B, H, 1, head_dim) device, dtype and head dim: what sizes the kernel's tiles, and so whether
    a GPU has room for them."""
    return q.device, q.dtype, q.shape[-1]


def require_triton(device: torch.device | None = None, named=str) -> None:
    """kernel="triton" needs Triton, and a CUDA device unless TRITON_INTERPRET=1 runs it on the CPU
    (device None: whether this machine has one). A UserError names the parameter as named does (the
    command lines: --kernel)."""
    from kernels.sparse_attention import INTERPRETED, TRITON_AVAILABLE  # on first use: triton is slow to import
    flag = named("kernel")
    if not TRITON_AVAILABLE:
        raise UserError(f"{flag} triton needs Triton: pip install triton")
    on_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    if not (on_cuda or INTERPRETED):
        raise UserError(f"{flag} triton runs on a CUDA device (or in Triton's CPU interpreter, with "
                        f"TRITON_INTERPRET=1 set): use {flag} torch or auto on this machine")


# ---------------------------------------------------------------------------------------------------
# The policies: each a KVCache that keeps, evicts or reads fewer rows. A-VL first, then its peers.
# ---------------------------------------------------------------------------------------------------

def image_attention(q, k, n_sys: int, n_img: int):
    """(n_img,) the last query row's attention on the image rows n_sys .. n_sys + n_img - 1 of the keys
    k, averaged over the query heads: how FastV and A-VL rank the image tokens at prefill."""
    if q.shape[0] != 1:
        raise UserError(f"FastV and A-VL rank the image tokens of one prompt, got a batch of {q.shape[0]}: "
                        "run the prompts one at a time")
    return last_row_probs(q, k).mean(1)[0, n_sys:n_sys + n_img]


def image_filter(image_scores, n_sys: int, n_rows: int, n_keep: int):
    """FastV's token drop, also A-VL's prefill filter: which hidden rows later layers keep.

    At prefill the layer's n_rows keys are exactly the hidden rows [sys | n_img image | text], and
    image_scores (n_img,) ranks the image tokens; the top n_keep survive in their original order.
    Returns the kept row indices (sys and text always kept).
    """
    n_img = image_scores.shape[0]
    if n_img > 0 and n_sys + n_img == n_rows:
        # The prompt ends with an image token, whose row gives the next token: it stays, as one of the
        # n_keep (or as the one image token kept).
        image_scores = image_scores.clone()
        image_scores[-1] = float("inf")
        n_keep = max(n_keep, 1)
    kept_image_rows = n_sys + top_rows(image_scores, n_keep)                            # (n_keep,) rows, in order
    return torch.cat([torch.arange(n_sys, device=image_scores.device), kept_image_rows,
                      torch.arange(n_sys + n_img, n_rows, device=image_scores.device)])


class AVLCache(KVCache):
    """A-VL (Zhang et al., AAAI 2025): modality-split adaptive attention.

    Image tokens: at prefill each layer keeps the top floor(S N_img) of them by the last prompt token's
    head-mean attention (secondary; the rest, minor, are deleted) and marks the top floor(C N_img) as
    core. A normal decode step computes only sys + core + text; every K-th step attends to all secondary
    tokens and re-ranks the core. (The authors' code turns the split off with K <= 0; here C = S does: every
    stored image token is computed at every step, and a re-rank moves no row.) Text tokens: H2O per KV head
    on the text region only (budget max(round(T n_text), 20): 70% heavy hitters by accumulated attention, the
    rest most recent).
    Optional prefill filter: the last-row attention of layer filter_layer - 1 keeps floor(P N_img) image
    tokens in the hidden states, so layers >= filter_layer never see the others (P = 1: no filter).

    Each layer's cache is laid out [sys | core image | other secondary image | text]. Cached keys carry
    their RoPE rotation, so row order does not matter to attention; putting the core first makes a
    normal step's rows two contiguous slices, [sys | core] and [text], read in place with no gather.
    Prefill lays the image rows out so; an update step that re-ranks the core swaps the rows that enter
    it with those that leave it (`rerank_core`), so only rows that change role move. Text eviction
    compacts the text region (`compact`): the step's new row takes an evicted row's slot.
    """

    name = "avl"
    TEXT_MIN_BUDGET = 20   # the authors' floor on the text budget
    HEAVY_FRACTION = 0.7   # fraction of the text budget given to heavy hitters

    PARAMS = (
        rate("S", 0.5, "fraction of image tokens stored (secondary)"),
        rate("C", 0.3, "fraction of image tokens computed (core), at most S"),
        Param("K", 3, "core update interval in decode steps (no split: C = S)", low=1),
        rate("P", 0.5, "fraction of image tokens the prefill filter keeps (1 = no filter), at least S"),
        Param("filter_layer", 3, "first layer that runs without the image tokens the prefill filter drops", low=1),
        rate("T", 0.6, "fraction of text tokens kept"),
        Param("kernel", "auto", "the sparse decode attention's code (auto: Triton compiled for CUDA tensors)",
              choices=("auto", "triton", "torch"), reported=False),
    )
    FULL_BUDGET = dict(S=1, C=1, P=1, T=1)

    def __init__(self, named=str, **params):
        super().__init__(named, **params)
        self.named = named  # how the kernel's refusals at the first step name its parameter (--kernel)
        if self.kernel == "triton":
            require_triton(named=named)

    @classmethod
    def check_params(cls, params: dict, named=str) -> dict:
        """KVCache's, and the nesting C <= S <= P."""
        values = super().check_params(params, named)
        S, C, P = values["S"], values["C"], values["P"]
        if C > S:
            raise UserError(f"{named('C')} ({C}) must not exceed {named('S')} ({S}): the core is part of the "
                            "secondary tokens")
        if S > P:
            raise UserError(f"{named('S')} ({S}) must not exceed {named('P')} ({P}): a layer cannot keep more "
                            "image tokens than the prefill filter let through")
        return values

    @property
    def filters_prefill(self) -> bool:
        return self.P < 1

    def begin(self, n_layers, n_sys, n_img, max_decode_steps=0):
        super().begin(n_layers, n_sys, n_img, max_decode_steps)
        self.n_secondary = floor_count(self.S, n_img)
        self.n_core = floor_count(self.C, n_img)
        self.core_end = self.n_sys + self.n_core         # every layer's first row past the core after prefill
        self.text_start = self.n_sys + self.n_secondary  # every layer's first text row after prefill
        self.text_scores = [None] * n_layers  # per layer (B, Hkv, text rows): accumulated attention received
        self.laid_out = [False] * n_layers    # per layer: the prefill has laid its image block out core first

    def is_update_step(self) -> bool:
        """Whether this decode step attends to every secondary token and re-ranks the core: every K-th (K = 1:
        all of them; the prefill is none)."""
        return self.step > 0 and self.step % self.K == 0

    @property
    def core(self) -> list:
        """Per layer, the core's row indices: the layout puts the core first in the image block, so they
        are rows n_sys .. n_sys + n_core - 1 of every layer the prefill has laid out (None before)."""
        return [torch.arange(self.n_sys, self.core_end, device=k.device) if done else None
                for done, k in zip(self.laid_out, self.k)]

    def rows_to_attend(self, layer):
        if self.step == 0 or self.is_update_step():
            return None
        device = self.k[layer].device
        return torch.cat([torch.arange(self.core_end, device=device),                  # sys, then the core
                          torch.arange(self.text_start, self.k[layer].shape[2], device=device)])

    def compute(self, layer, q, rows):
        """Decode steps also hand `decode_update` the attended row's `LastRow`, from which it scores this
        step's attention (the text for H2O, the image block on update steps). On the torch path
        (`KVCache.compute`) a normal step's rows, [sys | core] and [text], are two slices of the buffers,
        read in place (one where they meet, as when the core is every stored image row), and the `LastRow`
        carries their logits. The Triton kernel hands over the log-sum-exp alone: `LastRow.probs` then
        multiplies the query by the rows it is asked for a second time."""
        if self.step == 0 or not self.use_kernel(q):
            return super().compute(layer, q, rows)
        # The Triton kernel reads sys + core rows through an index list and the text rows as a contiguous
        # tail from tail_start on, in place (an update step attends to everything, as one tail).
        from kernels.sparse_attention import sparse_decode_attention
        from triton.runtime.errors import OutOfResources
        if rows is None:                                                     # an update step: no index list
            index, tail_start = torch.zeros(0, dtype=torch.long, device=q.device), 0           # (0,)
        else:  # rows_to_attend lists [sys | core] first, then the text
            index, tail_start = rows[:self.core_end], self.text_start                        # (n_sys + n_core,)
        # q[:, :, 0] (B, H, hs); one index list (1, n_idx) for the batch: A-VL ranks one prompt (image_attention).
        try:
            out, lse = sparse_decode_attention(q[:, :, 0], self.k[layer], self.v[layer], index[None], tail_start,
                                               return_lse=True, check_index=False)
        except OutOfResources as err:  # Triton compiles at the first launch, for this GPU's limits
            self.kernel_does_not_fit(err, q)
            return super().compute(layer, q, rows)
        return out[:, :, None], LastRow(lse)                            # (B, H, 1, hs); lse (B, H), no logits

    def update(self, layer, q, last_row):
        if self.step == 0:
            self.prefill_update(layer, q)
        else:
            self.decode_update(layer, q, last_row)

    def prefill_update(self, layer, q):
        k = self.k[layer]
        # Image tokens that reached this layer: all N_img, or floor(P N_img) after the prefill filter (at
        # least 1 where the prompt ends with an image token: `image_filter`). The prompt's text rows follow
        # them until the eviction below moves the text down to self.text_start.
        n_img_here = self.n_prefill_image_rows(layer)
        prompt_text_start = self.n_sys + n_img_here
        # Vision: rank this layer's image tokens by their importance (the last prompt token's attention).
        image_scores = self.image_importance(layer, q, k, n_img_here)                  # (n_img_here,)
        # Prefill filter: layer filter_layer - 1 decides, by the same ranking, which image tokens the
        # later layers see.
        if self.decides_filter(layer):
            n_keep = floor_count(self.P, self.n_img)
            self.pending_hidden_rows = image_filter(image_scores, self.n_sys, k.shape[2], n_keep)
        secondary = top_rows(image_scores, self.n_secondary)                        # (n_secondary,) image indices
        core_first = secondary[core_first_order(image_scores[secondary], self.n_core)]  # the same, core first
        # Text: H2O scores from the text queries of the prompt, on the text columns (before any eviction).
        # Each query row's softmax runs over all its keys, sys and image too, so the sums cover every key and
        # only then keep the text columns.
        sums = causal_column_sums(q[:, :, prompt_text_start:], k, first_row=prompt_text_start)   # (B, Hkv, n)
        self.text_scores[layer] = sums[..., prompt_text_start:]                      # (B, Hkv, prompt text rows)
        # Evict the minor image tokens (rows shared by every head), then the text tokens over budget.
        self.keep_image_rows(layer, core_first)
        self.laid_out[layer] = True
        self.evict_text(layer)

    def image_importance(self, layer: int, q, k, n_img_here: int):
        """(n_img_here,) the prefill score that ranks a layer's image tokens (rows n_sys .. n_sys + n_img_here
        - 1 of k): `image_attention`. One method, so that a study can rank otherwise in some layers
        (tinyavl/toy/attention_study.py, `LayerChoiceAVL`)."""
        return image_attention(q, k, self.n_sys, n_img_here)

    def decode_update(self, layer, q, last_row):
        k, n, text_start = self.k[layer], self.k[layer].shape[2], self.text_start
        if self.is_update_step():
            # The head mean of sample 0, the one prompt (`image_attention` refused a batch at the prefill).
            image_probs = last_row.probs(q, k, self.n_sys, text_start).mean(1)[0]        # (n_secondary,)
            self.rerank_core(layer, image_probs)
        # Every text row adds the attention this step's query gave it (per KV head).
        text_probs = last_row.probs(q, k, text_start, n)                                 # (B, H, text rows)
        self.text_scores[layer] = add_step_attention(self.text_scores[layer], text_probs)
        self.evict_text(layer)

    def rerank_core(self, layer: int, image_probs) -> int:
        """The top n_core secondary rows by image_probs (n_secondary,) become the core, rows n_sys ..
        n_sys + n_core - 1. Only rows that change role move: each row entering the core trades places
        with one leaving it (both taken in block order), so a step that keeps the core copies nothing.
        Returns how many rows entered the core."""
        in_core = torch.zeros_like(image_probs, dtype=torch.bool)                      # (n_secondary,)
        in_core[top_rows(image_probs, self.n_core)] = True
        # n_core rows are True in all, so the core slots left False are as many as the True rows after the
        # core: the two lists pair up one to one.
        leaving = (~in_core[:self.n_core]).nonzero().flatten()               # core slots whose row drops out
        entering = self.n_core + in_core[self.n_core:].nonzero().flatten()   # the rows that take them
        if len(entering):
            self.swap_rows(layer, self.n_sys + leaving, self.n_sys + entering)
        return len(entering)

    def evict_text(self, layer: int):
        """H2O on the text region, per KV head: once the text rows exceed the budget
        max(round(T n_text), 20) (n_text counts evicted text too; T taken as a decimal, as `floor_count` takes a
        fraction, and a half rounded to even, as Python's round does), keep the r latest text tokens and
        the h best scored older ones, h = floor(0.7 budget), r = budget - h. sys and image rows are
        untouched."""
        scores = self.text_scores[layer]                                               # (B, Hkv, text rows)
        n_text = self.logical_length - self.n_sys - self.n_img
        budget = max(round(as_decimal(self.T) * n_text), self.TEXT_MIN_BUDGET)
        if scores.shape[-1] <= budget:
            return
        n_heavy, text_start = floor_count(self.HEAVY_FRACTION, budget), self.text_start
        keep = heavy_plus_recent(scores, self.pos[layer][..., text_start:], n_heavy, budget - n_heavy,
                                 self.logical_length)                                 # (B, Hkv, text rows)
        self.text_scores[layer] = self.compact(layer, keep, start=text_start, scores=scores)  # only text rows move

    # -- the Triton kernel, where it runs A-VL's decode attention (`compute`) -----------------------

    def kernel_does_not_fit(self, err, q):
        """The GPU refused the kernel compiled for queries like q (Triton's OutOfResources): it needs more of a
        resource than the GPU has, shared memory above all (compiled by Triton 3.9, fp32 at head dim 128 needs
        78 KB for sm_80 and sm_90, which pipeline their loads through it). kernel="triton": a UserError;
        "auto": torch for such queries from here on, in this cache and every later one (REFUSED_KERNELS),
        said once on stderr."""
        flag = self.named("kernel")
        unit = " bytes" if err.name.endswith("memory") else ""  # Triton also counts threads
        refusal = (f"this GPU cannot run the Triton kernel ({err.name}: it needs {err.required}{unit}, the GPU "
                   f"has {err.limit}{unit})")
        if self.kernel == "triton":
            raise UserError(f"{flag} triton: {refusal}: use {flag} torch or auto") from None
        REFUSED_KERNELS.add(kernel_key(q))
        print(f"note: {refusal}; A-VL's decode attention runs in torch", file=sys.stderr)

    def use_kernel(self, q) -> bool:
        """Triton compiled for CUDA tensors ("auto": not in Triton's interpreter, nor for a head the kernel has
        no tile for or bf16 on a GPU without bf16 instructions, `why_unsupported`, nor where the GPU has refused
        it: `kernel_does_not_fit`), or as forced by kernel="triton" / "torch"."""
        # Decided without importing Triton where it cannot run: the import (about 0.2 s on this project's
        # CPU) would land in the first decode step of every CPU run (and in the benchmark's step times).
        if self.kernel == "torch" or (self.kernel == "auto" and not q.is_cuda):
            return False
        from kernels.sparse_attention import INTERPRETED, TRITON_AVAILABLE, why_unsupported
        if self.kernel == "auto":
            # Not in the interpreter either (TRITON_INTERPRET=1 left set on a GPU machine): a CPU loop over
            # CUDA tensors, many times slower than torch, which a user who asked for no kernel would not expect.
            return (TRITON_AVAILABLE and not INTERPRETED and why_unsupported(q.dtype, q.shape[-1], q.device) is None
                    and kernel_key(q) not in REFUSED_KERNELS)
        require_triton(q.device, self.named)
        reason = why_unsupported(q.dtype, q.shape[-1], q.device)
        if reason:
            flag = self.named("kernel")
            raise UserError(f"{flag} triton cannot run this model's attention: {reason}; use {flag} torch or auto")
        return True


class H2OCache(KVCache):
    """H2O: per layer and head, keep the `heavy` tokens with the most accumulated attention plus the
    `recent` most recent ones, as fractions of the sequence so far. Modality-blind: image tokens compete
    with text. Defaults: the A-VL authors' baseline, 12.5% heavy + 37.5% recent = 50%.

    Scores come from the step's own attention row (`LastRow`, handed over by compute); a decode step
    evicts at most one row per head, and `compact` moves only the row that fills its slot."""

    name = "h2o"

    PARAMS = (rate("heavy", 0.125, "heavy-hitter fraction of the sequence so far"), recent_window(0.375))
    FULL_BUDGET = dict(recent=1)  # floor(recent L) = L: the window is the whole sequence

    def begin(self, n_layers, n_sys, n_img, max_decode_steps=0):
        super().begin(n_layers, n_sys, n_img, max_decode_steps)
        self.scores = [None] * n_layers  # per layer (B, Hkv, rows): attention each cached token received

    def update(self, layer, q, last_row):
        k = self.k[layer]
        if self.step == 0:
            self.scores[layer] = causal_column_sums(q, k)                               # (B, Hkv, n)
        else:
            self.scores[layer] = add_step_attention(self.scores[layer], last_row.probs(q, k, 0, k.shape[2]))
        length = self.logical_length
        n_heavy, n_recent = floor_count(self.heavy, length), window_length(self.recent, length)
        if k.shape[2] > n_heavy + n_recent:
            keep = heavy_plus_recent(self.scores[layer], self.pos[layer], n_heavy, n_recent, length)  # (B, Hkv, n)
            self.scores[layer] = self.compact(layer, keep, scores=self.scores[layer])


class StreamingCache(KVCache):
    """StreamingLLM: the first `sinks` tokens plus a recent window of `recent` x the sequence so far.

    Keys are cached after RoPE with their logical positions (the original re-applies positions inside
    the cache); at the lengths tinyavl runs this behaves the same. In an LVLM the evicted middle is
    the image: the clearest example of a modality-blind policy. The window is a ring in the buffer:
    the newest rows take the slots of the oldest (`compact`), so no step shifts the window."""

    name = "streaming"

    PARAMS = (Param("sinks", 4, "attention-sink tokens kept at the start", low=0), recent_window(0.5))
    FULL_BUDGET = dict(recent=1)

    def update(self, layer, q, last_row):
        n, length = self.k[layer].shape[2], self.logical_length
        window = window_length(self.recent, length)
        if n > self.sinks + window:
            pos = self.pos[layer]
            self.compact(layer, (pos < self.sinks) | (pos >= length - window))              # keep (B, Hkv, n)


class FastVCache(KVCache):
    """FastV: at prefill, layer filter_layer - 1 drops the R fraction of image tokens with the least
    attention from the last prompt token; layers >= filter_layer never see them, in prefill or decode.
    Otherwise dense. filter_layer is the FastV paper's K (it counts layers from 1: "after layer K") and
    means what it means for A-VL's prefill filter."""

    name = "fastv"
    PARAMS = (
        Param("filter_layer", 2, "first layer that runs without the dropped image tokens (FastV's K)", low=1),
        Param("R", 0.5, "fraction of image tokens dropped", low=0, high=1, ends="[)"),
    )
    FULL_BUDGET = dict(R=0)

    @property
    def filters_prefill(self) -> bool:
        return self.R > 0

    def update(self, layer, q, last_row):
        if self.decides_filter(layer):
            # 1 - R in decimals: in binary floats 1 - 0.9 is 0.0999..., and floor(0.0999... x 10) keeps none.
            n_keep = floor_count(1 - as_decimal(self.R), self.n_img)
            image_scores = image_attention(q, self.k[layer], self.n_sys, self.n_img)       # (n_img,)
            self.pending_hidden_rows = image_filter(image_scores, self.n_sys, self.k[layer].shape[2], n_keep)


class RandomCache(KVCache):
    """The control policy: at prefill every layer keeps the same floor(S N_img) image tokens, drawn
    uniformly at random; sys and text are untouched and nothing else changes. It holds the image bytes
    A-VL holds at the same S (A-VL also evicts text), so a policy that does better than `random` chooses
    its tokens well, and one that does not only saves memory. (FastV, arXiv 2403.06764, Table 1, has a
    similar control that drops random image tokens before the LLM, so from the prefill on; this one
    evicts from the KV cache after a dense prefill, as the policies it is a control for do.)

    The draw comes from the policy's own generator, seeded by random_seed (not by torch's global
    seed): every sequence the cache begins takes the next set from it, so a run is reproducible and
    sequences do not share one set."""

    name = "random"

    PARAMS = (rate("S", 0.5, "fraction of image tokens kept"),
              replace(SEED_PARAM, name="random_seed", help="seed of the generator that draws the image tokens kept"))
    FULL_BUDGET = dict(S=1)

    def __init__(self, **params):
        super().__init__(**params)
        self.generator = torch.Generator().manual_seed(self.random_seed)

    def begin(self, n_layers, n_sys, n_img, max_decode_steps=0):
        super().begin(n_layers, n_sys, n_img, max_decode_steps)
        drawn = torch.randperm(n_img, generator=self.generator)[:floor_count(self.S, n_img)]  # image indices
        self.kept_image = drawn.sort().values                # the kept image tokens (indices), ascending

    def update(self, layer, q, last_row):
        if self.step == 0:  # prefill: the layer's rows are [sys | image | text], in order
            self.keep_image_rows(layer, self.kept_image)


# ---------------------------------------------------------------------------------------------------
# Choosing a policy by name.
# ---------------------------------------------------------------------------------------------------

POLICIES = {cls.name: cls for cls in (KVCache, AVLCache, H2OCache, StreamingCache, FastVCache, RandomCache)}


def param_owners() -> dict[str, dict[str, Param]]:
    """Every parameter name, with the policies that declare it: {"S": {"avl": Param, "random": Param}, ...}.
    One flag each on the command lines."""
    owners = {}
    for policy, cls in POLICIES.items():
        for param in cls.PARAMS:
            owners.setdefault(param.name, {})[policy] = param
    return owners


def make_cache(name: str, named=str, **params) -> KVCache:
    """A fresh cache for the named policy, e.g. make_cache("avl", S=0.5, C=0.3, K=3); parameters not
    given take their declared defaults. named: how a mistake's message names a parameter (the command
    lines: its flag, `cli.flag`)."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[name](named=named, **params)
