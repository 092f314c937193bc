"""KV caches: the dense reference and the policies that keep or compute less of it.

A LLaVA prompt is laid out as `[ sys | image (N_img tokens) | text ... ]` (see ../shared/spec/avl.md §2):
- sys: everything before the first image token (BOS, "USER: "). It holds the attention sink.
- image: the projected image features, N_img of them (576 for LLaVA-1.5).
- text: the question, "ASSISTANT:", then every generated token.

Every cache here runs the same four steps for each layer, in `KVCache.attend`:
    append   the new keys/values (after RoPE) and their logical positions
    select   the cached rows this query computes with (`rows_to_attend`; None = all of them)
    compute  attention over those rows only: skipped rows are not in the computation at all
    update   the policy's bookkeeping after the step: score what it needs, evict what it drops
and one between layers, at prefill: `rows_to_keep`, by which FastV and A-VL's prefill filter let
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
    fastv      FastVCache      drop image tokens inside the decoder after layer K-1, decided at prefill
"""
import math

import torch

from tinyavl.errors import UserError
from tinyavl.model import attention


# ---------------------------------------------------------------------------------------------------
# Attention scores a policy needs: one query row at a time, so the main path stays on SDPA.
# ---------------------------------------------------------------------------------------------------

def last_row_probs(q, k):
    """Attention probabilities of the last query over the keys: (B, H, n) in fp32.

    q (B, H, T, hs), k (B, Hkv, n, hs). This one row is all A-VL's vision ranking needs, so it is
    recomputed here (cheap: one query) instead of asking the whole attention to return its matrix.
    """
    B, H, _, hs = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    q_last = q[:, :, -1].reshape(B, Hkv, H // Hkv, hs)              # (B, Hkv, G, hs): a GQA group per KV head
    logits = (q_last @ k.transpose(-1, -2)).float() * hs ** -0.5    # (B, Hkv, G, n)
    return logits.softmax(-1).reshape(B, H, n)


def causal_column_sums(q, k, chunk: int = 256):
    """For a prompt (cache empty before it): the attention each key received, summed over every query
    row, per KV head (the query heads of a GQA group add up). (B, Hkv, n) in fp32.

    H2O's accumulated score after prefill. Computed in chunks of query rows so that a 3000-token
    prompt never materialises its (H, n, n) attention matrix at once.
    """
    B, H, T, hs = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    sums = torch.zeros(B, Hkv, n, device=q.device)
    for start in range(0, T, chunk):
        rows = q[:, :, start:start + chunk].reshape(B, Hkv, H // Hkv, -1, hs)       # (B, Hkv, G, t, hs)
        logits = (rows @ k[:, :, None].transpose(-1, -2)).float() * hs ** -0.5    # (B, Hkv, G, t, n)
        query_pos = torch.arange(start, start + rows.shape[3], device=q.device)
        future = torch.arange(n, device=q.device)[None, :] > query_pos[:, None]   # (t, n)
        probs = logits.masked_fill(future, float("-inf")).softmax(-1)
        sums += probs.sum(dim=(2, 3))
    return sums


def top_rows(scores, count: int):
    """Indices of the `count` highest scores along the last dim, in ascending (positional) order."""
    return scores.topk(count, dim=-1).indices.sort(dim=-1).values


def heavy_plus_recent(scores, heavy: int, recent: int):
    """H2O's choice, per head: the last `recent` rows plus the `heavy` best-scored rows before them.

    scores (B, Hkv, n) -> row indices (B, Hkv, heavy + recent), ascending. Every head keeps the
    same count, so K and V stay rectangular; which tokens differ from head to head.
    """
    n = scores.shape[-1]
    older = n - recent
    heavy_rows = top_rows(scores[..., :older], heavy)                                   # (B, Hkv, heavy)
    recent_rows = torch.arange(older, n, device=scores.device).expand(*scores.shape[:-1], recent)
    return torch.cat([heavy_rows, recent_rows], dim=-1)


def check_rate(name: str, value: float) -> float:
    if not 0 < value <= 1:
        raise UserError(f"{name} must be in (0, 1], got {value}")
    return value


# ---------------------------------------------------------------------------------------------------
# The dense cache: the `full` policy and the base of every other one.
# ---------------------------------------------------------------------------------------------------

class KVCache:
    """Dense KV cache: every layer keeps and attends to every token."""

    name = "full"

    def params(self) -> dict:
        """The policy's parameters, for reports."""
        return {}

    def begin(self, n_layers: int, n_sys: int, n_img: int):
        """Reset for a new sequence whose prompt is [sys (n_sys) | image (n_img) | text]."""
        self.n_layers, self.n_sys, self.n_img = n_layers, n_sys, n_img
        self.k = [None] * n_layers    # per layer (B, Hkv, n, hs), keys after RoPE
        self.v = [None] * n_layers    # per layer (B, Hkv, n, hs)
        self.pos = [None] * n_layers  # per layer (B, Hkv, n) logical position of each cached row
        self.next_pos = 0             # logical position of the next token (prompt length + steps)
        self.step = 0                 # forward passes so far: 0 during prefill, t during decode step t
        self.attended = [0] * n_layers  # rows the newest query computed with, per layer

    # -- the four steps -----------------------------------------------------------------------------

    def attend(self, layer: int, q, k, v, pos):
        """Store this layer's new rows and return the attention output (B, H, T, hs).

        q (B, H, T, hs), k and v (B, Hkv, T, hs), pos (T,) their logical positions.
        """
        self.append(layer, k, v, pos)
        rows = self.rows_to_attend(layer)
        out = self.compute(layer, q, rows)
        self.attended[layer] = self.k[layer].shape[2] if rows is None else len(rows)
        self.update(layer, q, rows)
        return out

    def append(self, layer: int, k, v, pos):
        B, Hkv = k.shape[:2]
        pos = pos.expand(B, Hkv, -1)                                        # (B, Hkv, T)
        if self.k[layer] is None:
            self.k[layer], self.v[layer], self.pos[layer] = k, v, pos
        else:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)            # (B, Hkv, n + T, hs)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
            self.pos[layer] = torch.cat([self.pos[layer], pos], dim=2)

    def rows_to_attend(self, layer: int):
        """Row indices (ascending, shared by all heads) this step computes with; None = every row."""
        return None

    def compute(self, layer: int, q, rows):
        """Attention over the selected rows: a shorter attention, not a mask over the full length."""
        k, v = self.k[layer], self.v[layer]
        if rows is not None:
            k, v = k.index_select(2, rows), v.index_select(2, rows)        # (B, Hkv, len(rows), hs)
        # At prefill the cache was empty, so the T new rows are exactly the keys: plain causal.
        # During decode T = 1 and the single query sees every selected row.
        return attention(q, k, v, causal=True)

    def update(self, layer: int, q, rows):
        """Policy hook after the step's attention: score, evict. The dense cache keeps everything."""

    def rows_to_keep(self, layer: int):
        """Hidden rows (prefill only) that layers after `layer` run on; None = all of them."""
        return None

    def advance(self, n_tokens: int):
        """Called by the model after each forward pass."""
        self.next_pos += n_tokens
        self.step += 1

    # -- editing the cache ----------------------------------------------------------------------------

    def keep(self, layer: int, rows):
        """Keep only the given rows of a layer, evicting the rest (memory is actually freed).

        rows: (n_keep,) shared by every head, or (B, Hkv, n_keep) chosen per head.
        """
        if rows.dim() == 1:
            self.k[layer] = self.k[layer].index_select(2, rows)
            self.v[layer] = self.v[layer].index_select(2, rows)
            self.pos[layer] = self.pos[layer].index_select(2, rows)
        else:
            hs = self.k[layer].shape[-1]
            self.k[layer] = self.k[layer].gather(2, rows[..., None].expand(-1, -1, -1, hs))
            self.v[layer] = self.v[layer].gather(2, rows[..., None].expand(-1, -1, -1, hs))
            self.pos[layer] = self.pos[layer].gather(2, rows)

    # -- accounting: measured from the tensors actually held ------------------------------------------

    def nbytes(self, layer: int | None = None) -> int:
        """Bytes of K and V held (by one layer, or all)."""
        layers = range(self.n_layers) if layer is None else [layer]
        return sum(t.numel() * t.element_size() for i in layers for t in (self.k[i], self.v[i]) if t is not None)

    def modality_bytes(self, layer: int) -> dict:
        """Bytes one layer holds for sys, image and text rows, read off the rows' logical positions."""
        k, pos = self.k[layer], self.pos[layer]
        if k is None:
            return {"sys": 0, "image": 0, "text": 0}
        bytes_per_row = 2 * k.shape[-1] * k.element_size()  # one head's key + value row
        image_start, text_start = self.n_sys, self.n_sys + self.n_img
        return {"sys": int((pos < image_start).sum()) * bytes_per_row,
                "image": int(((pos >= image_start) & (pos < text_start)).sum()) * bytes_per_row,
                "text": int((pos >= text_start).sum()) * bytes_per_row}

    def dense_nbytes(self) -> int:
        """What the dense cache would hold for the same sequence so far."""
        k = next(t for t in self.k if t is not None)
        return self.n_layers * self.next_pos * 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()


# ---------------------------------------------------------------------------------------------------
# Choosing a policy by name.
# ---------------------------------------------------------------------------------------------------

POLICIES = {cls.name: cls for cls in (KVCache,)}


def make_cache(name: str, **params) -> KVCache:
    """A fresh cache for the named policy, e.g. make_cache("avl", S=0.5, C=0.3, K=3)."""
    if name not in POLICIES:
        raise UserError(f"unknown policy {name!r}: choose one of {', '.join(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as err:  # a parameter the policy does not have
        raise UserError(f"bad parameters for policy {name!r}: {err}") from None
