"""Helpers for tests/test_cache.py: tiny random LLaVA models, prompts, a step-by-step decode loop that
keeps every step's logits, a recording wrapper for any cache, and a naive (and a masked) attention used as
reference.

The references (naive and masked attention, last-row probabilities, H2O score ledgers) are written out again
from the method (the papers, and the README's "KV policies"), by position rather than by row. `masked` is the
one that shares policy code: it replaces only the attention (the skip becomes a mask), and keeps the policy's
choice of rows and its bookkeeping, so a test of skipped == masked checks the skip, not the choice; the
choice is checked against ledgers of its own (test_cache.py's invariants tests and hand cases).
"""
import math

import pytest
import torch

from tinyavl import anyres
from tinyavl.cache import LastRow
from tinyavl.generate import image_segments
from tinyavl.model import LlavaConfig, LlavaForConditionalGeneration, TextConfig, VisionConfig

VOCAB = 96
IMAGE_TOKEN = VOCAB - 1


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is many times faster than two fighting over 2 cores
    (measured: 0.4 s vs 8 s for one test under load). Restored after each test; a test module that
    imports it runs every test so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- models
def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights at ~1/sqrt(fan_in) scale (lm_head x4, so greedy choices are clear-cut); norms ~1,
    embeddings N(0, 1). The constructor leaves some tensors uninitialised (CLIP's class embedding)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("embed_tokens.weight", "class_embedding", "position_embedding.weight")):
                p.copy_(noise)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif p.ndim >= 2:
                gain = 4.0 if name.endswith("lm_head.weight") else 1.0
                p.copy_(gain / math.sqrt(p[0].numel()) * noise)
            else:
                p.copy_(0.1 * noise)


def build_model(n_layers: int, kv_heads: int, image_size: int = 42, patch_size: int = 7,
                strategy: str = "full", seed: int = 0, image_grid_pinpoints=None) -> LlavaForConditionalGeneration:
    """A seeded fp32 tinyavl LLaVA: text hidden 64, 4 query heads x 16, `kv_heads` KV heads; CLIP hidden 32.

    N_img = (image_size / patch_size)^2 (+1 with strategy "full"); with image_grid_pinpoints a LLaVA-1.6
    (strategy "default"), whose N_img depends on the image (make_next_prompt). Weights from `reinit_`,
    so greedy choices are clear-cut and attention is far from uniform.
    """
    config = LlavaConfig(
        text=TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                        rms_norm_eps=1e-5),
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=patch_size),
        image_token_id=IMAGE_TOKEN, vision_feature_select_strategy=strategy,
        image_grid_pinpoints=image_grid_pinpoints,
    )
    config.validate()
    model = LlavaForConditionalGeneration(config)
    reinit_(model, seed)
    return model.eval()


def make_prompt(model, n_sys: int, n_text: int, seed: int = 0):
    """(input_ids (1, T), pixel_values (1, 3, S, S)) laid out [sys (n_sys) | image (N_img) | text (n_text)]."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    n_img = config.num_image_tokens
    sys_ids = torch.randint(3, IMAGE_TOKEN, (n_sys,), generator=g)
    text_ids = torch.randint(3, IMAGE_TOKEN, (n_text,), generator=g)
    ids = torch.cat([sys_ids, torch.full((n_img,), IMAGE_TOKEN), text_ids])[None]
    size = config.vision.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=g)
    return ids, pixel_values


def make_next_prompt(model, n_sys: int, n_text: int, image_hw: tuple[int, int], seed: int = 0):
    """LLaVA-1.6: (input_ids (1, T), pixel_values (1, n_crops, 3, S, S), image_sizes (1, 2)) for an image of
    (height, width) image_hw, laid out [sys | image block (base crop, tile map, newlines) | text]."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    tile = config.vision.image_size
    n_img = anyres.image_token_count(image_hw, config.image_grid_pinpoints, tile, config.vision.patch_size)
    rows, columns = anyres.tile_grid(image_hw, config.image_grid_pinpoints, tile)
    ids = torch.cat([torch.randint(3, IMAGE_TOKEN, (n_sys,), generator=g), torch.full((n_img,), IMAGE_TOKEN),
                     torch.randint(3, IMAGE_TOKEN, (n_text,), generator=g)])[None]
    pixel_values = torch.randn(1, 1 + rows * columns, 3, tile, tile, generator=g)
    return ids, pixel_values, torch.tensor([image_hw])


@torch.inference_mode()
def run_steps(model, ids, pixel_values, cache, steps: int, tokens=None, image_sizes=None):
    """Prefill + `steps` decode steps through `cache`. Returns (logits (steps + 1, vocab), fed tokens).

    Feeds `tokens` when given (teacher forcing, so two caches see the same sequence), else greedy.
    """
    n_sys, n_img = image_segments(ids, model.config.image_token_id)
    cache.begin(model.config.text.num_hidden_layers, n_sys, n_img)
    logits = [model(ids, pixel_values, cache=cache, last_only=True, image_sizes=image_sizes)[0, -1]]
    fed = []
    for t in range(steps):
        token = int(logits[-1].argmax()) if tokens is None else tokens[t]
        fed.append(token)
        logits.append(model(torch.tensor([[token]]), cache=cache, last_only=True)[0, -1])
    return torch.stack(logits), fed


def run_batch(model, ids, pixel_values, cache, tokens) -> torch.Tensor:
    """Prefill a batch of prompts of one layout (B, T), then feed `tokens` to every sample (teacher forcing,
    so that the batch and each prompt alone see the same sequences). Returns (B, len(tokens) + 1, vocab)."""
    cache.begin(model.config.text.num_hidden_layers, *image_segments(ids[:1], model.config.image_token_id))
    with torch.inference_mode():
        logits = [model(ids, pixel_values, cache=cache, last_only=True)[:, -1]]
        for token in tokens:
            logits.append(model(torch.full((ids.shape[0], 1), token), cache=cache, last_only=True)[:, -1])
    return torch.stack(logits, 1)


# ------------------------------------------------------------------------------------------- references
def expand_kv(k, n_heads: int):
    """(B, Hkv, n, hs) -> (B, H, n, hs): query head h reads KV head h // (H / Hkv) (Llama's repeat_kv)."""
    return k.repeat_interleave(n_heads // k.shape[1], dim=1)


def naive_logits(q, k):
    """Scaled logits q k^T / sqrt(hs) in float64: (B, H, Tq, n)."""
    hs = q.shape[-1]
    return q.double() @ expand_kv(k, q.shape[1]).double().transpose(-1, -2) / math.sqrt(hs)


def last_row_head_mean(q, k):
    """Head-mean attention probabilities of the last query row over every key: (n,) float64."""
    return naive_logits(q[:, :, -1:], k).softmax(-1)[0, :, 0].mean(0)


def top_positions(scores, positions, count: int) -> set:
    """The positions (a list/1-d tensor aligned with scores) of the `count` highest scores."""
    order = torch.as_tensor(scores).argsort(descending=True)[:count]
    return {int(positions[i]) for i in order}


def masked(cache_cls):
    """`cache_cls` with the skip replaced by a mask: every row of the layer's cache is in the attention, the
    rows `rows_to_attend` leaves out get -inf. Own attention (float64 softmax), and at decode the row's
    log-sum-exp (the `LastRow` compute hands the update) taken from the masked row, so the bookkeeping sees exactly
    what the method says it should."""

    class Masked(cache_cls):
        def compute(self, layer, q, rows):
            k, v = self.k[layer], self.v[layer]
            n, t = k.shape[2], q.shape[2]
            visible = torch.ones(t, n, dtype=torch.bool).tril(n - t)   # causal, queries aligned with the last keys
            if rows is not None:
                selected = torch.zeros(n, dtype=torch.bool)
                selected[rows] = True
                visible = visible & selected
            logits = naive_logits(q, k).masked_fill(~visible, float("-inf"))     # (B, H, T, n) float64
            # No logits handed over: update recomputes q.k on the rows it scores, from this lse.
            last_row = LastRow(logits[:, :, -1].logsumexp(-1).float()) if self.step > 0 else None
            return (logits.softmax(-1) @ expand_kv(v, q.shape[1]).double()).to(q.dtype), last_row

    Masked.__name__ = f"Masked{cache_cls.__name__}"
    return Masked


# ------------------------------------------------------------------------------------------- recording
def recording(cache_cls):
    """A subclass of `cache_cls` that logs every `attend` call without changing what it does:
    the query, the new positions, the rows attended, the layer's k / pos before the update (after the
    append) and after it, the core (as positions) before and after, and the policy's scores after.
    `log` is a list of dicts, one per (step, layer), in call order."""

    class Recording(cache_cls):
        def begin(self, n_layers, n_sys, n_img, max_decode_steps=0):
            super().begin(n_layers, n_sys, n_img, max_decode_steps)
            self.log = []

        def attend(self, layer, q, k, v, pos):
            entry = dict(step=self.step, layer=layer, q=q.clone(), new_pos=pos.clone(),
                         core_before=self._core_positions(layer))
            self._entry = entry
            out = super().attend(layer, q, k, v, pos)
            scores = getattr(self, "text_scores", getattr(self, "scores", None))  # A-VL's / H2O's ledger
            entry.update(k_after=self.k[layer].clone(), pos_after=self.pos[layer].clone(),
                         attended=self.attended[layer], core_after=self._core_positions(layer),
                         scores_after=None if scores is None else scores[layer].clone())
            self.log.append(entry)
            return out

        def update(self, layer, q, last_row):
            # After the append and the attention, before any eviction: what the step computed with.
            self._entry.update(k_before=self.k[layer].clone(), v_before=self.v[layer].clone(),
                               pos_before=self.pos[layer].clone())
            super().update(layer, q, last_row)

        def rows_to_attend(self, layer):
            rows = super().rows_to_attend(layer)
            self._entry["rows"] = None if rows is None else rows.clone()
            return rows

        def _core_positions(self, layer):
            core = getattr(self, "core", None)
            if core is None or core[layer] is None:
                return None
            return {int(p) for p in self.pos[layer][0, 0, core[layer]]}

    Recording.__name__ = f"Recording{cache_cls.__name__}"
    return Recording


def positions_per_head(pos) -> list[set]:
    """pos (1, Hkv, n) -> one set of logical positions per KV head."""
    return [{int(p) for p in pos[0, h]} for h in range(pos.shape[1])]


def scores_per_head(pos, scores) -> list[dict]:
    """pos, scores (1, Hkv, n) -> per KV head, {logical position: score}: a ledger read by token, in any
    row order."""
    return [dict(zip(pos[0, h].tolist(), scores[0, h].tolist())) for h in range(pos.shape[1])]
