"""Where an LVLM's attention goes: a cache that records it, and the measures of A-VL's analysis.

    recorder, tokens = record_attention(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=64)
    recorder.rows[step][layer]   # (n,) the head-mean attention of that step's query over every token so far

Step 0 is the prefill, whose row is the last prompt token's (the row A-VL and FastV rank image tokens
by); step t > 0 is the query of the t-th decode step. Every measure below takes such rows:
- segment_shares: how a row's attention splits over sys / image / text (beside segment_sizes, the
  share of the tokens each segment has);
- top_share: concentration, the share of a row's image attention on its top p fraction of image tokens;
- ppci: A-VL's p%-PPCI, |T1 ∩ T2| / |T1| for the top-p sets T1, T2 (floor(p N) tokens each, at least
  one) of two score rows over the same N tokens (two layers, or two decode steps);
- capture: the share of a row's image attention that falls on a chosen set of image tokens.
The recording is dense attention (the `full` policy): what the model does when nothing is evicted.
"""

import torch

from tinyavl.cache import KVCache, floor_count, last_row_probs
from tinyavl.generate import generate


class AttentionRecorder(KVCache):
    """The dense cache, also keeping every forward pass's last-row attention, head mean, per layer."""

    def begin(self, n_layers, n_sys, n_img, max_decode_steps=0):
        super().begin(n_layers, n_sys, n_img, max_decode_steps)
        self.rows = []  # per forward pass, per layer: (n,) fp32 on the CPU

    def update(self, layer, q, last_row):
        if layer == 0:
            self.rows.append([])
        # From q and K, at every step alike: at the prefill compute hands over no last_row. [0]: the batch's
        # one sequence (generate runs one).
        self.rows[-1].append(last_row_probs(q, self.k[layer]).mean(1)[0].cpu())   # (n,) head mean

    def image_row(self, step: int, layer: int):
        """(n_img,) the image part of one recorded row."""
        return self.rows[step][layer][segment_slices(self.n_sys, self.n_img)["image"]]


def record_attention(model, input_ids, pixel_values, max_new_tokens: int, eos_token_id: int | None = None,
                     image_sizes=None):
    """Greedy generation under dense attention, recording every step's attention rows:
    (AttentionRecorder, the new token ids). max_new_tokens=1 records the prefill only."""
    recorder = AttentionRecorder()
    tokens, _ = generate(model, input_ids, pixel_values, image_sizes=image_sizes, max_new_tokens=max_new_tokens,
                         eos_token_id=eos_token_id, policy=recorder)
    return recorder, tokens


def segment_slices(n_sys: int, n_img: int) -> dict:
    """Where sys, image and text sit in a row: {"sys": slice, "image": slice, "text": slice}."""
    return {"sys": slice(0, n_sys), "image": slice(n_sys, n_sys + n_img), "text": slice(n_sys + n_img, None)}


def segment_shares(row, n_sys: int, n_img: int) -> dict:
    """The attention of one row (n,) on each segment: {"sys", "image", "text"} -> share (sums to 1)."""
    total = float(row.sum())
    return {name: float(row[part].sum()) / total for name, part in segment_slices(n_sys, n_img).items()}


def segment_sizes(n: int, n_sys: int, n_img: int) -> dict:
    """Each segment's share of the n tokens a row attends: what attention spread evenly would give it."""
    return {name: len(range(n)[part]) / n for name, part in segment_slices(n_sys, n_img).items()}


def top_count(n: int, p: float) -> int:
    """Size of a top-p set over n tokens: floor(p n) as the policies count (floor(S N_img)), but at least 1."""
    return max(1, floor_count(p, n))


def top_set(scores, p: float) -> set:
    """Indices of the top_count(n, p) highest scores of a row (n,)."""
    return set(scores.topk(top_count(len(scores), p)).indices.tolist())


def top_share(scores, p: float) -> float:
    """Concentration: the share of a row's total (n,) on its top p fraction of entries."""
    return float(scores.topk(top_count(len(scores), p)).values.sum() / scores.sum())


def ppci(scores_a, scores_b, p: float) -> float:
    """A-VL's p%-PPCI of two score rows over the same N tokens: |T1 ∩ T2| / top_count(N, p), with T1, T2
    their top_count(N, p) highest entries."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"PPCI compares rows over the same tokens, got {len(scores_a)} and {len(scores_b)}")
    return len(top_set(scores_a, p) & top_set(scores_b, p)) / top_count(len(scores_a), p)


def capture(scores, chosen) -> float:
    """The share of a row's total (n,) that falls on the chosen indices."""
    return float(scores[torch.as_tensor(sorted(chosen), dtype=torch.long)].sum() / scores.sum())
