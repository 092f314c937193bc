"""Tests of the KV-cache policies (tinyavl/cache.py) against independent references.

References, never the code under test:
- `full`: the dense cache, itself checked against the cache-free causal forward of the whole sequence;
- a *masked* A-VL (A-VL's bookkeeping, but attention over every cached row with -inf on the rows not
  selected, in its own float64 attention): skipping must give the same numbers (the A-VL paper's claim: a
  normal step computes only its rows);
- last-row attention, H2O score ledgers and filter decisions recomputed here from the recorded q and k,
  by logical position rather than by row index;
- hand-built one-layer cases (planted keys), whose expected sets are written literally and derived
  in the comments;
- the accounting formulas (README, "KV policies").

Models are tiny random LLaVAs built in tests/cache_helpers.py (text hidden 64, 4 query heads x 16).
Prompts are [sys (3) | image (N_img) | text (30 or 40)], long enough for A-VL's text H2O to evict
(min budget 20).
"""
import math
import sys
import types
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest
from pytest import approx
import torch

import tinyavl
from cache_helpers import (build_model, last_row_head_mean, make_prompt, masked, naive_logits,  # noqa: F401
                           one_thread, positions_per_head, recording, run_steps, scores_per_head, top_positions)
from tinyavl.cache import (POLICIES, ROW_BUCKET, AVLCache, FastVCache, H2OCache, KVCache, LastRow, RandomCache,
                           StreamingCache, causal_column_sums, contiguous_runs, decode_attention, heavy_plus_recent,
                           floor_count, image_filter, make_cache, read_end, require_triton)
from tinyavl.cli import flag
from tinyavl.errors import UserError
from tinyavl.generate import check_generation_args, image_segments
from tinyavl.model import faster_keys_first, keys_first, rope_cos_sin
from tinyavl.params import Param

N_SYS = 3
LOGIT_ATOL = 1e-5
STEPS_EQ = 20

# name: (text layers, KV heads, image size, patch size, feature strategy). 4 query heads each.
MODELS = {
    "mha": (2, 4, 42, 7, "default"),   # MHA, N_img = 36
    "gqa": (3, 2, 42, 7, "full"),      # GQA 4 -> 2, N_img = 37
    "mha4": (4, 4, 35, 7, "default"),  # 4 layers (A-VL's default prefill filter at layer 3 is active), N_img = 25
    "gqa4": (4, 2, 42, 7, "full"),     # 4 layers, GQA, N_img = 37
}


@lru_cache(maxsize=None)
def model(name: str):
    layers, kv_heads, image_size, patch_size, strategy = MODELS[name]
    return build_model(layers, kv_heads, image_size, patch_size, strategy, seed=list(MODELS).index(name) + 1)


def prompt(name: str, n_text: int = 30):
    return make_prompt(model(name), N_SYS, n_text, seed=7)


@lru_cache(maxsize=None)
def full_reference(name: str):
    """The dense cache's run on the model's prompt: (prefill logits at every position, per-step logits of
    STEPS_EQ greedy decode steps, the tokens fed)."""
    m = model(name)
    ids, pixel_values = prompt(name)
    dense = KVCache()
    dense.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
    with torch.inference_mode():
        prefill = m(ids, pixel_values, cache=dense)
    logits, tokens = run_steps(m, ids, pixel_values, KVCache(), STEPS_EQ)
    return prefill, logits, tokens


def exact_floor(fraction, n: int) -> int:
    """floor(fraction x n) of the decimal as written (0.7 x 90 = 63), in whole numbers: apart from the cache's
    own `floor_count`."""
    return round(fraction * 10 ** 6) * n // 10 ** 6


def test_a_share_of_tokens_is_counted_in_decimals():
    """Binary floats put 0.7 x 90, 0.29 x 100 and (1 - 0.8) x 25 just below 63, 29 and 5."""
    for fraction, n, count in [(0.7, 90, 63), (0.29, 100, 29), (0.5, 2928, 1464), (0.3, 2928, 878), (0.1, 9, 0)]:
        assert floor_count(fraction, n) == exact_floor(fraction, n) == count
    assert floor_count(1 - Fraction("0.8"), 25) == 5
    assert floor_count(np.float64(0.7), 90) == 63                 # numpy's float64, a float a caller may pass


def is_image(p, n_sys, n_img):
    return n_sys <= p < n_sys + n_img


def attends_all(entry) -> bool:
    """The recorded step computed with every row the layer held (rows None, or all of them listed)."""
    held = entry["k_before"].shape[2]
    rows = entry["rows"]
    return entry["attended"] == held and (rows is None or rows.tolist() == list(range(held)))


# =========================================================================================================
# 1. Policies whose budget covers the whole sequence are the dense cache.
# =========================================================================================================


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_full_cache_matches_uncached_forward(name):
    """The reference itself: prefill + cached decode == the cache-free causal forward of the whole sequence."""
    m = model(name)
    ids, pixel_values = prompt(name)
    prefill, logits, fed = full_reference(name)
    with torch.inference_mode():
        whole = m(torch.cat([ids, torch.tensor([fed])], dim=1), pixel_values)[0]
    torch.testing.assert_close(prefill[0], whole[:ids.shape[1]], atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(logits, whole[ids.shape[1] - 1:], atol=LOGIT_ATOL, rtol=0)
    assert len(set(fed)) > 3  # a sequence that goes somewhere, not one token repeated


FULL_EQUIVALENT = [
    ("avl", dict(S=1, C=1, T=1, P=1, K=1)),
    ("avl", dict(S=1, C=1, T=1, P=1, K=3)),
    # H2O's budget is floor(heavy L) + floor(recent L): >= L for every L when one of the two is 1.
    ("h2o", dict(heavy=1, recent=1)),
    ("h2o", dict(heavy=0.125, recent=1)),
    ("h2o", dict(heavy=1, recent=0.25)),
    ("streaming", dict(recent=1)),
    ("streaming", dict(sinks=0, recent=1)),
    ("fastv", dict(filter_layer=1, R=0)),
    ("fastv", dict(filter_layer=2, R=0)),
    ("random", dict(S=1)),
    ("random", dict(S=1, random_seed=5)),
]


@pytest.mark.parametrize("name", ["mha", "gqa"])
@pytest.mark.parametrize("policy,params", FULL_EQUIVALENT,
                         ids=[f"{p}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for p, kw in FULL_EQUIVALENT])
def test_full_budget_policy_equals_full(name, policy, params):
    m = model(name)
    ids, pixel_values = prompt(name)
    n_layers = m.config.text.num_hidden_layers
    ref_prefill, ref_logits, ref_tokens = full_reference(name)
    # Prefill logits at every prompt position.
    cache = make_cache(policy, **params)
    cache.begin(n_layers, *image_segments(ids, m.config.image_token_id))
    with torch.inference_mode():
        torch.testing.assert_close(m(ids, pixel_values, cache=cache), ref_prefill, atol=LOGIT_ATOL, rtol=0)
    # Every decode step's logits, on the same token sequence.
    cache = make_cache(policy, **params)
    logits, _ = run_steps(m, ids, pixel_values, cache, STEPS_EQ, tokens=ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    for layer in range(n_layers):  # and nothing was evicted
        assert cache.k[layer].shape[2] == ids.shape[1] + STEPS_EQ
    # The public API: the same greedy tokens as the dense cache.
    tokens, _ = tinyavl.generate(m, ids, pixel_values, max_new_tokens=STEPS_EQ + 1, policy=policy, eos_token_id=(),
                                 **params)
    assert tokens == ref_tokens + [int(ref_logits[-1].argmax())]


# =========================================================================================================
# 2. Skipping == masking: A-VL's shorter attention gives the numbers of the masked formulation.
# =========================================================================================================
MASKED_CASES = [
    ("mha", dict(), 9),                    # defaults S .5, C .3, K 3, T .6 (2 layers: no prefill filter)
    ("gqa", dict(), 9),                    # defaults, GQA (3 layers: filter_layer 3 is the last, no filter)
    ("gqa", dict(K=2), 7),
    ("mha4", dict(), 9),                   # defaults with 4 layers: prefill filter at layer 3 is on
    ("gqa4", dict(filter_layer=2), 9),     # prefill filter at layer 2, GQA
    ("gqa", dict(kernel="triton"), 7),     # the Triton index kernel (CPU interpreter)
]


def needs_kernel(params):
    """The kernel case runs where the kernel can: Triton's CPU interpreter (these models live on the CPU)."""
    if params.get("kernel") != "triton":
        return
    from kernels import sparse_attention
    if not (sparse_attention.TRITON_AVAILABLE and sparse_attention.INTERPRETED):
        pytest.skip("needs Triton running in its CPU interpreter (TRITON_INTERPRET=1, no GPU)")


@pytest.mark.parametrize("name,params,steps", MASKED_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'defaults'}"
                              for n, p, _ in MASKED_CASES])
def test_avl_skipping_equals_masking(name, params, steps):
    needs_kernel(params)
    m = model(name)
    ids, pixel_values = prompt(name)
    ref_logits, tokens = run_steps(m, ids, pixel_values, masked(AVLCache)(**params), steps)
    cache = recording(AVLCache)(**params)
    logits, _ = run_steps(m, ids, pixel_values, cache, steps, tokens=tokens)
    for t in range(steps + 1):  # prefill (t = 0), normal and update steps
        torch.testing.assert_close(logits[t], ref_logits[t], atol=LOGIT_ATOL, rtol=0, msg=f"step {t}")

    # The skip is real: a normal step attends sys + core + text rows only, fewer than the layer holds.
    K, n_layers = cache.K, m.config.text.num_hidden_layers
    n_core = math.floor(cache.C * cache.n_img)
    decode = [e for e in cache.log if e["step"] > 0]
    for e in decode:
        held = e["k_before"].shape[2]
        if e["step"] % K == 0:
            assert attends_all(e), e["step"]
        else:
            text_rows = held - N_SYS - cache.n_secondary
            assert e["attended"] == N_SYS + n_core + text_rows < held, (e["step"], e["layer"])
    # ... and generate() reports it, on the same greedy sequence.
    out, stats = tinyavl.generate(m, ids, pixel_values, max_new_tokens=steps + 1, policy="avl", eos_token_id=(),
                                  **params)
    assert out == tokens + [int(ref_logits[-1].argmax())]
    assert stats.attended_per_layer == [[e["attended"] for e in decode if e["step"] == t]
                                        for t in range(1, steps + 1)]
    assert len(stats.attended_per_layer) == steps and all(len(row) == n_layers for row in stats.attended_per_layer)


# =========================================================================================================
# 3. Invariants at every step and layer, checked against recomputed attention.
# =========================================================================================================
def group_sums(probs, n_kv):
    """(H, ...) per query head -> (Hkv, ...): query heads h of KV head h // (H / Hkv) add up."""
    return probs.reshape(n_kv, probs.shape[0] // n_kv, *probs.shape[1:]).sum(1)


def h2o_expected(ledger: dict, heavy: int, recent: int) -> set:
    """H2O's choice from a {position: score} ledger: the `recent` latest positions + the `heavy` best older."""
    order = sorted(ledger)
    older, latest = order[:len(order) - recent], order[len(order) - recent:]
    return set(latest) | top_positions([ledger[p] for p in older], older, heavy)


def prefill_column_sums(q, k, pos, query_ok, column_ok):
    """Per KV head, {position: attention received} from the causal prefill rows whose position passes
    `query_ok`, on the columns passing `column_ok` (float64, summed over each GQA group's query heads)."""
    n = k.shape[2]
    logits = naive_logits(q, k)[0]                                             # (H, n, n)
    logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    probs = logits.softmax(-1)
    rows = torch.tensor([query_ok(int(p)) for p in pos])
    sums = group_sums(probs[:, rows].sum(1), k.shape[1])                      # (Hkv, n)
    return [{int(p): float(sums[h, j]) for j, p in enumerate(pos) if column_ok(int(p))}
            for h in range(k.shape[1])]


def decode_row(q, k_before, rows):
    """Per KV head, the attention probabilities of the decode query over the rows it attended
    (rows None: all), zero elsewhere: (Hkv, n) float64, summed over each group's query heads."""
    logits = naive_logits(q, k_before)[0, :, 0]                               # (H, n)
    if rows is not None:
        selected = torch.zeros(logits.shape[-1], dtype=torch.bool)
        selected[rows] = True
        logits = logits.masked_fill(~selected, float("-inf"))
    return group_sums(logits.softmax(-1), k_before.shape[1])


AVL_INVARIANT_CASES = [
    ("mha", 30, dict()),                    # text budget 20 at prefill: 10 text tokens evicted at once
    ("gqa", 30, dict()),
    ("gqa", 40, dict(S=0.4, C=0.2, T=0.5)),  # budget round(0.5 * 40) = 20, then grows past the minimum
    ("mha4", 40, dict(T=0.6)),             # filter at layer 3; budget round(0.6 * 40) = 24 > 20
    ("gqa4", 40, dict(filter_layer=2, T=0.6)),
    ("gqa", 30, dict(K=1)),                 # every step attends to every stored row and re-ranks the core
    ("gqa", 30, dict(K=2, C=0.2)),
    # budget round(0.7 * 45) = round(31.5) = 32 (a half, to even) at prefill: in binary floats 0.7 x 45 is
    # 31.499999999999996, which would keep 31
    ("gqa", 45, dict(T=0.7)),
]


@pytest.mark.parametrize("name,n_text,params", AVL_INVARIANT_CASES,
                         ids=[f"{n}-text{t}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'defaults'}"
                              for n, t, p in AVL_INVARIANT_CASES])
def test_avl_invariants(name, n_text, params):
    m = model(name)
    ids, pixel_values = prompt(name, n_text)
    cache = recording(AVLCache)(**params)
    S, C, K, P, T, filter_layer = (cache.S, cache.C, cache.K, cache.P, cache.T, cache.filter_layer)
    steps = 2 * K + 3
    run_steps(m, ids, pixel_values, cache, steps)
    prompt_len, n_layers = ids.shape[1], m.config.text.num_hidden_layers
    n_sys, n_img = N_SYS, m.config.num_image_tokens
    n_secondary, n_core = exact_floor(S, n_img), exact_floor(C, n_img)
    filter_on = P < 1 and filter_layer - 1 < n_layers - 1
    text_of = lambda p: p >= n_sys + n_img  # noqa: E731
    img_of = lambda p: is_image(p, n_sys, n_img)  # noqa: E731

    filtered = None                       # image positions the prefill filter lets through
    secondary = [None] * n_layers         # per layer, image positions kept after prefill
    ledger = [None] * n_layers            # per layer and KV head, {text position: accumulated score}
    assert [(e["step"], e["layer"]) for e in cache.log] == [(t, l) for t in range(steps + 1) for l in range(n_layers)]
    for e in cache.log:
        t, layer, q = e["step"], e["layer"], e["q"]
        where = f"step {t} layer {layer}"
        L = prompt_len + t                                  # logical length, this step's token included
        pos_before, pos_after = e["pos_before"][0], e["pos_after"][0]
        heads_before, heads_after = positions_per_head(e["pos_before"]), positions_per_head(e["pos_after"])
        n_kv = len(heads_after)
        assert all(len(h) == pos_after.shape[1] for h in heads_after), where   # distinct positions per head

        # sys rows are never evicted.
        for held in heads_after:
            assert set(range(n_sys)) <= held, where
        # Image rows: the same set in every head; floor(S N_img) of them from prefill on, never evicted after.
        images = [{p for p in held if img_of(p)} for held in heads_after]
        assert all(i == images[0] for i in images), where
        if t == 0:
            seen = [int(p) for p in e["new_pos"]]           # the rows this layer ran on
            seen_images = {p for p in seen if img_of(p)}
            if filter_on and layer == filter_layer - 1:
                # Prefill filter: top floor(P N_img) image tokens by this layer's head-mean last-row attention.
                probs = last_row_head_mean(q, e["k_before"])
                img_rows = [j for j, p in enumerate(seen) if img_of(p)]
                filtered = top_positions(probs[img_rows], [seen[j] for j in img_rows], math.floor(P * n_img))
            if filter_on and layer >= filter_layer:
                assert seen_images == filtered, where
            else:
                assert seen_images == set(range(n_sys, n_sys + n_img)), where
            assert seen == sorted(seen), where              # kept rows in their original order
            # Secondary = top floor(S N_img) of the image tokens this layer saw, core = top floor(C N_img).
            probs = last_row_head_mean(q, e["k_before"])
            img_rows = [j for j, p in enumerate(seen) if img_of(p)]
            secondary[layer] = top_positions(probs[img_rows], [seen[j] for j in img_rows], n_secondary)
            assert images[0] == secondary[layer] and len(secondary[layer]) == n_secondary, where
            assert e["core_after"] == top_positions(probs[img_rows], [seen[j] for j in img_rows], n_core), where
        else:
            assert images[0] == secondary[layer], where
            # Logical positions: step t's token sits at prompt_len + t - 1, whatever the cache length.
            assert e["new_pos"].tolist() == [prompt_len + t - 1], where
            assert all(max(held) == prompt_len + t - 1 for held in heads_after), where
            held_rows = e["k_before"].shape[2]
            update = t % K == 0
            if update:
                assert attends_all(e), where
            else:
                # A normal step computes with sys + core + every text row, nothing else.
                rows = e["rows"].tolist()
                assert rows == sorted(rows), where
                attended = [{int(pos_before[h, r]) for r in rows} for h in range(n_kv)]
                for h in range(n_kv):
                    assert attended[h] == (set(range(n_sys)) | e["core_before"]
                                           | {p for p in heads_before[h] if text_of(p)}), where
                assert e["attended"] == len(rows) < held_rows, where
            if update:
                # Re-rank: top floor(C N_img) of this step's head-mean row over all secondary tokens.
                probs = last_row_head_mean(q, e["k_before"])
                img_rows = [j for j in range(held_rows) if img_of(int(pos_before[0, j]))]
                expected = top_positions(probs[img_rows], [int(pos_before[0, j]) for j in img_rows], n_core)
                assert e["core_after"] == expected, where
            else:
                assert e["core_after"] == e["core_before"], where
        assert len(e["core_after"]) == n_core and e["core_after"] <= secondary[layer], where

        # Text: H2O per KV head against an independent ledger of accumulated text x text attention.
        if t == 0:
            ledger[layer] = prefill_column_sums(q, e["k_before"], [int(p) for p in e["new_pos"]],
                                                query_ok=text_of, column_ok=text_of)
        else:
            row = decode_row(q, e["k_before"], e["rows"])
            for h in range(n_kv):
                ledger[layer][h][prompt_len + t - 1] = 0.0
                for j in range(row.shape[1]):
                    p = int(pos_before[h, j])
                    if text_of(p):
                        ledger[layer][h][p] += float(row[h, j])
        budget = max(round(Fraction(str(T)) * (L - n_sys - n_img)), 20)                 # T as written, in decimals
        heavy = budget * 7 // 10                                                        # floor(0.7 budget)
        recent = budget - heavy
        for h in range(n_kv):
            text_before = {p for p in heads_before[h] if text_of(p)}
            assert set(ledger[layer][h]) == text_before, where
            text_after = {p for p in heads_after[h] if text_of(p)}
            assert len(text_after) == min(len(text_before), budget), (where, len(text_after), budget)
            assert set(range(L - recent, L)) <= text_after, where          # the r most recent text tokens
            if len(text_before) > budget:
                assert text_after == h2o_expected(ledger[layer][h], heavy, recent), (where, h)
            ledger[layer][h] = {p: s for p, s in ledger[layer][h].items() if p in text_after}
            # The cache's own scores are the ledger's, row for row (text rows in cache order).
            text_positions = [int(p) for p in pos_after[h] if text_of(int(p))]
            want = torch.tensor([ledger[layer][h][p] for p in text_positions], dtype=torch.float32)
            torch.testing.assert_close(e["scores_after"][0, h], want, atol=1e-4, rtol=1e-4, msg=where)


def test_avl_K_1_attends_every_secondary_row():
    m = model("gqa")
    ids, pixel_values = prompt("gqa")
    cache = recording(AVLCache)(K=1)
    run_steps(m, ids, pixel_values, cache, 5)
    for e in cache.log:
        if e["step"] > 0:
            assert attends_all(e), e["step"]
            assert sum(is_image(int(p), N_SYS, cache.n_img) for p in e["pos_before"][0, 0]) == cache.n_secondary


@pytest.mark.parametrize("K", [1, 3])
def test_avl_update_steps_are_every_Kth_decode_step(K):
    """is_update_step, as the benchmark asks it of each step: the prefill (step 0) is none, then every K-th."""
    m = model("gqa")
    ids, pixel_values = prompt("gqa")
    cache = recording(AVLCache)(K=K)
    asked = []                                  # is_update_step() at each layer of each forward pass

    def rows_to_attend(layer, select=cache.rows_to_attend):
        asked.append(cache.is_update_step())
        return select(layer)

    cache.rows_to_attend = rows_to_attend
    run_steps(m, ids, pixel_values, cache, 7)
    n_layers = m.config.text.num_hidden_layers
    assert asked == [step > 0 and step % K == 0 for step in range(8) for _ in range(n_layers)]


# mha4 has 25 image tokens: R = 0.8 keeps 5, where binary floats make (1 - 0.8) x 25 = 4.999999999999999.
@pytest.mark.parametrize("name,K,R", [("gqa", 2, 0.5), ("mha4", 1, 0.3), ("gqa4", 3, 0.75), ("mha4", 1, 0.8)])
def test_fastv_layers(name, K, R):
    """K is FastV's letter for the first layer without the dropped tokens: the policy's filter_layer."""
    m = model(name)
    ids, pixel_values = prompt(name)
    cache = recording(FastVCache)(filter_layer=K, R=R)
    steps = 4
    run_steps(m, ids, pixel_values, cache, steps)
    prompt_len, n_img = ids.shape[1], m.config.num_image_tokens
    n_keep = exact_floor(1 - Fraction(str(R)), n_img)
    decider = next(e for e in cache.log if e["step"] == 0 and e["layer"] == K - 1)
    probs = last_row_head_mean(decider["q"], decider["k_before"])
    kept = top_positions(probs[N_SYS:N_SYS + n_img], range(N_SYS, N_SYS + n_img), n_keep)
    for e in cache.log:
        L = prompt_len + e["step"]
        everything = set(range(L))
        for held in positions_per_head(e["pos_after"]):
            if e["layer"] < K:
                assert held == everything, (e["step"], e["layer"])
            else:
                assert {p for p in held if is_image(p, N_SYS, n_img)} == kept, (e["step"], e["layer"])
                assert held == everything - (set(range(N_SYS, N_SYS + n_img)) - kept)
        assert e["attended"] == e["pos_after"].shape[2]
        if e["layer"] < K and e["step"] > 0:
            assert e["attended"] == L


def test_image_filter_by_hand():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3])                    # 4 image tokens after 2 sys rows
    # Text after the image: the top n_keep image rows, in order, between sys and every text row.
    assert image_filter(scores, 2, 8, 2).tolist() == [0, 1, 2, 4, 6, 7]
    # The prompt ends with the image: its last row gives the next token, so it stays among the n_keep,
    # and stays alone where the share kept rounds to none.
    assert image_filter(scores, 2, 6, 2).tolist() == [0, 1, 4, 5]
    assert image_filter(scores, 2, 6, 0).tolist() == [0, 1, 5]
    assert image_filter(scores, 0, 4, 1).tolist() == [3]
    # No image, the prompt its BOS alone: the one sys row stays (no image row to keep last).
    assert image_filter(torch.zeros(0), 1, 1, 0).tolist() == [0]


@pytest.mark.parametrize("policy,params", [("fastv", dict(filter_layer=1, R=0.9)),
                                           ("avl", dict(S=0.1, C=0.1, P=0.1, filter_layer=1))])
@pytest.mark.parametrize("n_sys", [2, 0])
def test_prefill_filter_keeps_a_last_image_token(policy, params, n_sys):
    """A prompt that ends inside the image block still reads its next token from its own last row."""
    m = model("gqa4")
    ids = make_prompt(m, n_sys, 0, seed=7)[0]                      # [sys | image], no text after it
    pixel_values = prompt("gqa4")[1]
    kept_hidden = []

    class Spy(POLICIES[policy]):
        def hidden_rows_to_keep(self):
            keep = super().hidden_rows_to_keep()
            if keep is not None:
                kept_hidden.append(keep.tolist())
            return keep

    tokens, _ = tinyavl.generate(m, ids, pixel_values, max_new_tokens=3, eos_token_id=(), policy=Spy(**params))
    assert len(tokens) == 3
    assert len(kept_hidden) == 1 and kept_hidden[0][-1] == ids.shape[1] - 1


def test_avl_filter_lets_p_of_the_image_through_and_each_later_layer_stores_s_of_it():
    """S < P < 1, by hand (gqa4: N_img = 37, 4 layers, the filter from layer 2): the layers before the filter
    rank all 37 image tokens; the filter lets floor(P N_img) = 18 of them through to layers 2 and 3, which rank
    those and store floor(S N_img) = 11, a subset of what the filter let through. (At the defaults S = P, so
    a filter that kept floor(S N_img) would look the same.)"""
    m = model("gqa4")
    ids, pixel_values = prompt("gqa4")
    n_img = m.config.num_image_tokens
    cache = recording(AVLCache)(S=0.3, C=0.2, P=0.5, filter_layer=2)
    cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
    with torch.inference_mode():
        m(ids, pixel_values, cache=cache, last_only=True)

    def image_positions(entry, when):  # the image tokens a layer's cache holds, as positions
        return {p for p in entry[when][0, 0].tolist() if N_SYS <= p < N_SYS + n_img}

    reaching = [len(image_positions(e, "pos_before")) for e in cache.log]      # per layer, before its eviction
    assert (n_img, math.floor(0.5 * n_img), math.floor(0.3 * n_img)) == (37, 18, 11)
    assert reaching == [37, 37, 18, 18]
    for entry in cache.log[2:]:
        assert image_positions(entry, "pos_after") < image_positions(entry, "pos_before")
        assert len(image_positions(entry, "pos_after")) == 11


@pytest.mark.parametrize("n_sys", [2, 0])
def test_avl_stores_its_own_top_image_tokens_where_its_filter_keeps_a_last_image_token(n_sys):
    """The filter's keeping of a prompt's last image token (`image_filter`) is the filter's rule alone: at
    the layer that decides the filter, A-VL still stores the top floor(S N_img) image tokens by its own
    ranking (float64 head-mean attention of the last row), without the last image token that ranks far
    below them."""
    m = model("gqa4")
    ids = make_prompt(m, n_sys, 0, seed=7)[0]                      # [sys | image], no text after it
    n_img = m.config.num_image_tokens
    cache = recording(AVLCache)(S=0.1, C=0.1, P=0.1, filter_layer=1)
    cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
    with torch.inference_mode():
        m(ids, prompt("gqa4")[1], cache=cache, last_only=True)
    deciding = next(e for e in cache.log if e["layer"] == 0)
    ranking = last_row_head_mean(deciding["q"], deciding["k_before"])[n_sys:n_sys + n_img]   # (n_img,)
    n_secondary = math.floor(0.1 * n_img)
    assert (ranking > ranking[-1]).sum() >= n_secondary           # the last image token is not among the top
    stored = sorted(p for p in deciding["pos_after"][0, 0].tolist() if n_sys <= p < n_sys + n_img)
    assert stored == sorted((n_sys + ranking.topk(n_secondary).indices).tolist())


def filtered_forward(m, ids, pixel_values, filter_layer: int, keep) -> torch.Tensor:
    """The decoder by hand, without a cache: every row through the layers before filter_layer, then only
    the rows `keep`, each rotated at its own position in the prompt. Logits (1, len(keep), vocab)."""
    decoder = m.language_model.model
    x = m.embed(ids, pixel_values)                                  # (1, T, C)
    positions = torch.arange(ids.shape[1])
    for i, layer in enumerate(decoder.layers):
        if i == filter_layer:
            x, positions = x[:, keep], positions[keep]
        cos, sin = rope_cos_sin(positions, m.config.text, x.dtype)  # (T or len(keep), hs)
        x = layer(x, cos, sin, positions)
    return m.language_model.lm_head(decoder.norm(x))


@pytest.mark.parametrize("policy,params", [("fastv", dict(filter_layer=2, R=0.5)),
                                           ("avl", dict(P=0.5, filter_layer=2))])
def test_rows_after_a_filter_keep_their_positions(policy, params):
    """After the filter the kept rows run on at their positions in the prompt (FastV's and A-VL's papers
    drop tokens, not positions): the prefill's logits, and for FastV, whose decode attends every row it
    keeps, a decode step's, are those of the decoder run by hand on the kept rows."""
    m = model("gqa4")
    ids, pixel_values = prompt("gqa4")
    cache = make_cache(policy, **params)
    handed, hand_over = [], cache.hidden_rows_to_keep

    def recorded():  # what the policy hands the model after each layer
        handed.append(hand_over())
        return handed[-1]

    cache.hidden_rows_to_keep = recorded
    cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
    with torch.inference_mode():
        prefill = m(ids, pixel_values, cache=cache)                                  # (1, T', vocab)
        keep = next(rows for rows in handed if rows is not None)
        assert len(keep) < ids.shape[1]
        torch.testing.assert_close(prefill, filtered_forward(m, ids, pixel_values, 2, keep), atol=LOGIT_ATOL, rtol=0)
        if policy == "fastv":
            token = int(prefill[0, -1].argmax())
            step = m(torch.tensor([[token]]), cache=cache)[0, -1]
            longer = torch.cat([ids, torch.tensor([[token]])], dim=1)
            by_hand = filtered_forward(m, longer, pixel_values, 2, torch.cat([keep, torch.tensor([ids.shape[1]])]))
            torch.testing.assert_close(step, by_hand[0, -1], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("policy,params", [("avl", dict(P=0.5)), ("fastv", dict(filter_layer=3, R=0.5))])
def test_a_filter_after_the_last_layer_drops_nothing(policy, params):
    """A filter from layer filter_layer = the number of layers on (A-VL's default 3 on a 3-layer model)
    has no layer to act on: the prefill's logits at every position are the dense cache's."""
    m = model("gqa")
    ids, pixel_values = prompt("gqa")
    cache = make_cache(policy, **params)
    cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
    with torch.inference_mode():
        logits = m(ids, pixel_values, cache=cache)                                 # (1, T, vocab)
    torch.testing.assert_close(logits, full_reference("gqa")[0], atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("new_tokens", [1, 2, 6])
def test_generate_counts_the_rows_each_layer_s_prefill_ran_on(new_tokens):
    """`prefill_attended_per_layer` (the toy's compute accounting reads it): FastV dropping R = 0.5 of 37
    image tokens after layer 1 of 4 keeps floor(0.5 x 37) = 18; layers 0 and 1 run on the whole prompt, 2
    and 3 on 19 rows fewer, however many tokens the decode adds after."""
    m = model("gqa4")
    ids, pixel_values = prompt("gqa4")
    T, n_img = ids.shape[1], m.config.num_image_tokens
    _, stats = tinyavl.generate(m, ids, pixel_values, max_new_tokens=new_tokens, eos_token_id=(),
                                policy="fastv", filter_layer=2, R=0.5)
    dropped = n_img - math.floor(0.5 * n_img)
    assert stats.prefill_attended_per_layer == [T, T, T - dropped, T - dropped]


def test_a_prompt_without_an_image_keeps_its_first_token_as_sys():
    """Without an image, BOS (the attention sink) is the prompt's sys segment, which A-VL's text eviction
    never touches: held in every layer and head after 8 steps at a text budget of 20 rows (of 40 + 8), and
    counted as sys, one row per layer."""
    m = model("gqa")
    ids = torch.randint(3, m.config.image_token_id, (1, 40), generator=torch.Generator().manual_seed(3))  # text only
    assert image_segments(ids, m.config.image_token_id) == (1, 0)
    cache = make_cache("avl", T=0.3)
    _, stats = tinyavl.generate(m, ids, None, max_new_tokens=8, eos_token_id=(), policy=cache)
    layers = m.config.text.num_hidden_layers
    assert all((cache.pos[layer] == 0).any(-1).all() for layer in range(layers))
    assert all(len(cache.pos[layer][0, 0]) < ids.shape[1] for layer in range(layers))   # the text was evicted
    row = 2 * m.config.text.num_key_value_heads * m.config.text.head_dim * 4   # a token's K and V, fp32
    assert [b["sys"] for b in stats.layer_bytes_after_prefill] == [row] * layers


def test_image_rankers_refuse_a_batch():
    """FastV and A-VL rank the image tokens of one prompt: a batch is a clear error, not sample 0's ranking."""
    m = model("gqa4")
    ids, pixel_values = prompt("gqa4")
    for policy in ("fastv", "avl"):
        cache = make_cache(policy)
        cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
        with torch.inference_mode(), pytest.raises(UserError, match="one prompt"):
            m(ids.expand(2, -1), pixel_values.expand(2, -1, -1, -1), cache=cache)


def test_avl_decodes_with_autograd_on():
    """A direct model call without no_grad: A-VL's update steps move rows in place, which autograd allows
    only outside views it tracks; the logits are those of the inference-mode run."""
    m = model("gqa")
    ids, pixel_values = prompt("gqa")
    reference, tokens = run_steps(m, ids, pixel_values, AVLCache(K=2), 4)
    cache = AVLCache(K=2)
    cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
    logits = [m(ids, pixel_values, cache=cache, last_only=True)[0, -1]]
    for token in tokens:
        logits.append(m(torch.tensor([[token]]), cache=cache, last_only=True)[0, -1])
    assert torch.is_grad_enabled() and logits[-1].requires_grad
    torch.testing.assert_close(torch.stack(logits).detach(), reference, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("name,S", [("gqa", 0.5), ("mha4", 0.3), ("gqa4", 0.1)])
def test_random_invariants(name, S):
    """`random` keeps exactly floor(S N_img) image tokens, the same in every layer and head, from prefill
    to the last step; sys and text are never touched, and every held row is attended when decoding."""
    m = model(name)
    ids, pixel_values = prompt(name)
    cache = recording(RandomCache)(S=S, random_seed=3)
    run_steps(m, ids, pixel_values, cache, 4)
    prompt_len, n_img = ids.shape[1], m.config.num_image_tokens
    kept = None
    for e in cache.log:
        for held in positions_per_head(e["pos_after"]):
            image = {p for p in held if is_image(p, N_SYS, n_img)}
            kept = image if kept is None else kept
            assert image == kept and len(image) == math.floor(S * n_img), (e["step"], e["layer"])
            assert held - image == set(range(N_SYS)) | set(range(N_SYS + n_img, prompt_len + e["step"]))
        if e["step"] > 0:  # prefill computes with every row, then evicts
            assert e["attended"] == e["pos_after"].shape[2]


def test_random_draws_are_seeded_fresh_per_sequence_and_uniform():
    """The same random_seed draws the same sets in the same order; another seed other sets; each new
    sequence a new set; and over many sequences every image token is kept with probability
    floor(S N_img) / N_img (here 3 / 10 over 4000 draws: the count is 1200 +- 29 (one binomial sigma,
    sqrt(4000 .3 .7)), checked within 5 sigma)."""
    def draws(seed, n, n_img=10, S=0.3):
        cache = RandomCache(S=S, random_seed=seed)
        sets = []
        for _ in range(n):
            cache.begin(1, 2, n_img)
            sets.append(tuple(int(i) for i in cache.kept_image))       # image indices
        return sets

    first = draws(4, 50)
    assert first == draws(4, 50)
    assert first != draws(5, 50)
    assert len(set(first)) > 40                                        # C(10, 3) = 120 sets: few repeats
    counts = torch.zeros(10)
    for kept in draws(0, 4000):
        assert len(kept) == 3 and list(kept) == sorted(set(kept))
        counts[list(kept)] += 1
    assert ((counts - 1200).abs() < 5 * math.sqrt(4000 * 0.3 * 0.7)).all(), counts


# The last case's fractions floor to no token at these lengths: the window still keeps the newest.
@pytest.mark.parametrize("name,heavy,recent", [("mha", 0.125, 0.375), ("gqa", 0.2, 0.3), ("gqa", 0.01, 0.01)])
def test_h2o_invariants(name, heavy, recent):
    m = model(name)
    ids, pixel_values = prompt(name)
    cache = recording(H2OCache)(heavy=heavy, recent=recent)
    steps = 6
    run_steps(m, ids, pixel_values, cache, steps)
    prompt_len = ids.shape[1]
    ledger = {}
    for e in cache.log:
        t, layer = e["step"], e["layer"]
        L = prompt_len + t
        pos_before = e["pos_before"][0]
        heads_before, heads_after = positions_per_head(e["pos_before"]), positions_per_head(e["pos_after"])
        n_kv = len(heads_after)
        if t == 0:
            ledger[layer] = prefill_column_sums(e["q"], e["k_before"], [int(p) for p in e["new_pos"]],
                                                query_ok=lambda p: True, column_ok=lambda p: True)
        else:
            assert attends_all(e), (t, layer)
            row = decode_row(e["q"], e["k_before"], None)
            for h in range(n_kv):
                ledger[layer][h][L - 1] = 0.0
                for j in range(row.shape[1]):
                    ledger[layer][h][int(pos_before[h, j])] += float(row[h, j])
        n_heavy, n_recent = exact_floor(heavy, L), max(1, exact_floor(recent, L))
        for h in range(n_kv):
            assert set(ledger[layer][h]) == heads_before[h]
            rows = len(heads_after[h])
            assert rows == min(len(heads_before[h]), n_heavy + n_recent), (t, layer, h)
            assert set(range(L - n_recent, L)) <= heads_after[h], (t, layer, h)
            if len(heads_before[h]) > n_heavy + n_recent:
                assert heads_after[h] == h2o_expected(ledger[layer][h], n_heavy, n_recent), (t, layer, h)
            ledger[layer][h] = {p: s for p, s in ledger[layer][h].items() if p in heads_after[h]}
            want = torch.tensor([ledger[layer][h][int(p)] for p in e["pos_after"][0, h]], dtype=torch.float32)
            torch.testing.assert_close(e["scores_after"][0, h], want, atol=1e-4, rtol=1e-4)
    assert any(len(h) < prompt_len + steps for h in positions_per_head(cache.pos[0]))  # it did evict


@pytest.mark.parametrize("sinks,recent", [(4, 0.5), (1, 0.25), (0, 0.4), (1, 0.01)])
def test_streaming_invariants(sinks, recent):
    m = model("gqa")
    ids, pixel_values = prompt("gqa")
    cache = recording(StreamingCache)(sinks=sinks, recent=recent)
    steps = 5
    run_steps(m, ids, pixel_values, cache, steps)
    for e in cache.log:
        L = ids.shape[1] + e["step"]
        window = max(1, exact_floor(recent, L))  # the newest token at least
        expected = set(range(sinks)) | set(range(L - window, L))
        for before, held in zip(positions_per_head(e["pos_before"]), positions_per_head(e["pos_after"])):
            if len(before) > sinks + window:
                assert held == expected, (e["step"], e["layer"])
            else:
                assert held == before
            assert expected <= held
    assert cache.k[0].shape[2] < ids.shape[1]


# =========================================================================================================
# 4. Invalid parameters are rejected with a UserError that names them.
# =========================================================================================================
BAD_RATES = [0, -0.25, 1.5]
INVALID = (
    [("avl", {name: value}, name) for name in ("S", "C", "P", "T") for value in BAD_RATES]
    + [("avl", dict(S=0.3, C=0.5), "C"),            # the core is part of the secondary tokens
       ("avl", dict(S=0.6, P=0.5), "S"),            # cannot keep more image tokens than the filter passed
       ("avl", dict(S=0.9, C=0.3, P=0.8), "S")]
    + [("h2o", {name: value}, name) for name in ("heavy", "recent") for value in BAD_RATES]
    + [("streaming", dict(recent=value), "recent") for value in BAD_RATES]
    + [("fastv", dict(R=value), "R") for value in (-0.1, 1, 1.5)]
    + [("fastv", dict(filter_layer=value), "filter_layer") for value in (0, -1)]
    + [("avl", dict(K=value), "K") for value in (0, -1)]
    + [("avl", dict(filter_layer=0), "filter_layer")]
    + [("avl", dict(K=1.5), "K"), ("streaming", dict(sinks="4"), "sinks"), ("avl", dict(S=True), "S"),
       ("avl", dict(K=True), "K")]                  # a bool is no count, though Python's True == 1
    + [("random", dict(S=value), "S") for value in BAD_RATES]
    + [("random", dict(random_seed=value), "random_seed") for value in (-2 ** 63 - 1, 2 ** 64, 1.0)]
)


@pytest.mark.parametrize("policy,params,named", INVALID,
                         ids=[f"{p}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for p, kw, _ in INVALID])
def test_invalid_parameters_rejected(policy, params, named):
    with pytest.raises(UserError, match=rf"\b{named}\b"):
        make_cache(policy, **params)


def test_a_number_past_floats_range_is_rejected_as_out_of_range():
    # Python's integers and fractions have no largest value; converting one to a float raised OverflowError.
    past = r", got a number past a float's range \(about 1.8e308\)$"
    with pytest.raises(UserError, match=r"^R must be in \[0, 1\)" + past):
        make_cache("fastv", R=10 ** 400)
    with pytest.raises(UserError, match=r"^heavy must be in \(0, 1\]" + past):
        make_cache("h2o", heavy=Fraction(10 ** 400, 3))
    with pytest.raises(UserError, match=r"^temperature must be finite and >= 0" + past):   # finite, but no float
        check_generation_args(8, 10 ** 400, 50, 1.0, None)


def test_unknown_policy_and_parameter_rejected():
    with pytest.raises(UserError, match="nope"):
        make_cache("nope")
    with pytest.raises(UserError, match="avl"):
        make_cache("avl", heavy=0.5)                     # an H2O parameter given to A-VL
    with pytest.raises(UserError, match="h2o"):
        make_cache("h2o", S=0.5)
    # The default policy takes nothing, and the message says which policies own the parameter.
    with pytest.raises(UserError, match=r"policy 'h2o' takes heavy, recent, not Z \(a parameter of no policy\)"):
        make_cache("h2o", Z=1)
    with pytest.raises(UserError, match=r"policy 'full' takes no parameters, not S \(a parameter of ") as refused:
        make_cache("full", S=0.5)
    # avl and random declare S, and a policy registered later that declares it too is named with them.
    owners = str(refused.value).split("a parameter of ")[1].rstrip(")").split(", ")
    assert {"avl", "random"} <= set(owners) and all("S" in [p.name for p in POLICIES[o].PARAMS] for o in owners)
    m = model("mha")
    ids, pixel_values = prompt("mha")
    with pytest.raises(UserError):
        tinyavl.generate(m, ids, pixel_values, max_new_tokens=2, policy="nope")
    with pytest.raises(UserError):
        tinyavl.generate(m, ids, pixel_values, max_new_tokens=2, policy="streaming", window=3)


def test_valid_edges_accepted():
    """The edges of the ranges are legal: rate 1, C == S == P, fastv R = 0, A-VL K = 1 (update every step)."""
    make_cache("avl", S=1, C=1, P=1, T=1)
    make_cache("avl", S=0.5, C=0.5, P=0.5)
    make_cache("avl", K=1)
    make_cache("h2o", heavy=1, recent=1)
    make_cache("fastv", filter_layer=1, R=0)
    make_cache("random", S=1, random_seed=0)
    make_cache("random", random_seed=2 ** 64 - 1)   # every seed torch takes
    # numpy's numbers, as a caller may pass them, held as Python's
    cache = make_cache("avl", S=np.float32(0.5), C=np.float64(0.25), K=np.int64(2))
    assert (cache.S, cache.C, cache.K) == (0.5, 0.25, 2) and type(cache.S) is float and type(cache.K) is int
    # float32's 0.7 is 0.699999988 in binary: taken as the 0.7 it prints as, its share of 90 is 63, not 62
    recent = make_cache("h2o", recent=np.float32(0.7)).recent
    assert recent == 0.7 and floor_count(recent, 90) == 63
    make_cache("random", random_seed=-2 ** 63)


# =========================================================================================================
# 5. Hand-checkable one-layer cases: planted keys, sets derived in the comments.
# =========================================================================================================
def test_avl_hand_case():
    """One layer, one head, hs 4; n_sys 1 (position 0), image i at position 1 + i (i = 0..9), text j at
    position 11 + j (j = 0..21): prompt length 33. S .5, C .3, K 3, T .6.

    Keys: sys 0; image i = c_i e0 + d_i e2; text j = +20 e1 ("attractive") except j in {3, 9, 16, 17, 18}
    which get -20 e1 ("repulsive"); decode tokens +20 e1. Queries: prompt rows e0 + e1, decode rows e1 + e2.
    Logits (scale 1/2): image c_i/2 <= 4.5 at prefill, d_i/2 at decode; attractive text +10; repulsive -10.
    """
    c = [3, 9, 0, 6, 1, 8, 2, 7, 5, 4]
    d = [9, 0, 0, 8, 0, 5, 0, 1, 7, 0]
    repulsive = {3, 9, 16, 17, 18}
    keys = [torch.zeros(4)] + [torch.tensor([c[i], 0., d[i], 0.]) for i in range(10)]
    keys += [torch.tensor([0., -20. if j in repulsive else 20., 0., 0.]) for j in range(22)]
    g = torch.Generator().manual_seed(0)
    cache = AVLCache(S=0.5, C=0.3, K=3, T=0.6)
    cache.begin(1, 1, 10)
    cache.attend(0, torch.tensor([1., 1., 0., 0.]).expand(1, 1, 33, 4), torch.stack(keys)[None, None],
                 torch.randn(1, 1, 33, 4, generator=g), torch.arange(33))
    cache.advance(33)
    held = lambda: cache.pos[0][0, 0].tolist()  # noqa: E731
    core = lambda: sorted(cache.pos[0][0, 0, cache.core[0]].tolist())  # noqa: E731
    # Vision at prefill: the last row ranks images by c. floor(.5 * 10) = 5 secondary: c = 9, 8, 7, 6, 5 at
    # i = 1, 5, 7, 3, 8 -> positions 2, 6, 8, 4, 9; minor i = 0, 2, 4, 6, 9 (positions 1, 3, 5, 7, 10) deleted.
    # Core floor(.3 * 10) = 3: c = 9, 8, 7 -> positions 2, 6, 8.
    # Text at prefill: n_text 22, budget max(round(13.2), 20) = 20, h = 14, r = 6. Recent: j = 16..21.
    # Older j = 0..15: an attractive token gets ~1/(attractive tokens visible) >= 1/18 of each of the >= 6 later
    # text rows, a repulsive one ~e^-20 of it: the 14 heavy hitters are the 14 attractive older tokens, and
    # j = 3, 9 (positions 14, 20) are evicted. j = 16, 17, 18 are repulsive but recent: kept.
    # Eviction compacts: the two text rows past the new end (positions 31, 32) fill the slots of 14 and 20.
    text = [11 + j for j in range(20)]
    text[3], text[9] = 31, 32
    # Layout [sys | core | other secondary | text], each image part in positional order.
    assert held() == [0, 2, 6, 8, 4, 9] + text
    assert core() == [2, 6, 8]
    assert cache.modality_rows(0)["image"] == 5 and cache.k[0].shape == (1, 1, 26, 4)
    # Decode steps 1, 2, 3 (positions 33, 34, 35); budget stays 20 (round(.6 * 23..25) <= 15): each step one
    # text row goes. Recent = the last 6 text rows, so repulsive j = 16, 17, 18 (positions 27, 28, 29) leave
    # the window at steps 1, 2, 3 and, with ~0 score, are the ones evicted; the step's new row, the only one
    # past the new end, takes the evicted row's slot.
    # Steps 1, 2 are normal: sys + 3 core + 21 text rows = 25 attended, core unchanged although the decode
    # query prefers other images. Step 3 = K is an update step: all 1 + 5 + 21 = 27 rows; the query ranks the
    # secondary by d: d = 0, 8, 5, 1, 7 at positions 2, 4, 6, 8, 9 -> core = positions 4, 9, 6. Minor
    # position 1 (d = 9, the best of all) is gone since prefill and does not come back. The update step
    # swaps each row entering the core with one leaving it, both in block order: in the block
    # [2, 6, 8, 4, 9], 2 (slot 0) and 8 (slot 2) leave, 4 (slot 3) and 9 (slot 4) enter; 6 stays put:
    # -> [4, 6, 9, 2, 8].
    expected = {1: (25, [2, 6, 8], [2, 6, 8, 4, 9]), 2: (25, [2, 6, 8], [2, 6, 8, 4, 9]),
                3: (27, [4, 6, 9], [4, 6, 9, 2, 8])}
    decode_q, decode_k = torch.tensor([0., 1., 1., 0.]).view(1, 1, 1, 4), torch.tensor([0., 20., 0., 0.]).view(1, 1, 1, 4)
    for t in (1, 2, 3):
        cache.attend(0, decode_q, decode_k, torch.randn(1, 1, 1, 4, generator=g), torch.tensor([32 + t]))
        cache.advance(1)
        text = [32 + t if p == 26 + t else p for p in text]
        assert cache.attended[0] == expected[t][0], t
        assert held() == [0] + expected[t][2] + text, t
        assert core() == expected[t][1], t


def test_heavy_plus_recent_holds_its_count_where_older_tokens_got_no_attention():
    """Attention a token gets can be exactly 0 (fp32 underflows past a logit gap of about 104): older
    tokens scored 0 still compete for the heavy places against each other, never against the recent
    window's tokens, so every head holds heavy + recent tokens (K and V stay rectangular)."""
    scores = torch.tensor([[[1., 7., 0., 0., 0., 0., 0., 0.],          # head 0: older rows 2..5 got nothing
                            [1., 7., 3., 2., .5, .25, 0., 0.]]])       # head 1: every older row got some
    pos = torch.arange(8).expand(1, 2, 8)
    keep = heavy_plus_recent(scores, pos, n_heavy=3, n_recent=2, length=8)
    assert keep.sum(-1).tolist() == [[5, 5]]
    held = [set(pos[0, h][keep[0, h]].tolist()) for h in range(2)]
    assert {0, 1, 6, 7} <= held[0] and len(held[0] & {2, 3, 4, 5}) == 1    # one zero-scored row fills the third
    assert held[1] == {1, 2, 3, 6, 7}


def test_h2o_hand_case():
    """One layer, MHA with 2 heads, hs 8; heavy .25, recent .25. Keys s e_j on the planted rows (s = 10,
    logit s^2 / sqrt(8) = 35: a query s e_j puts ~1 on key j, s (e_a + e_b) puts 1/2 on each), 0 elsewhere.
    Head 0 keys: rows 1, 3. Head 1 keys: rows 1, 2, 3, 4, 7. Prompt of 8 tokens, then 4 decode steps."""
    s = 10.0
    e = torch.eye(8) * s
    k = torch.zeros(1, 2, 8, 8)
    k[0, 0, 1], k[0, 0, 3] = e[1], e[3]
    for r in (1, 2, 3, 4, 7):
        k[0, 1, r] = e[r]
    q = torch.zeros(1, 2, 8, 8)
    # Head 0: row 0 -> key 0 (the only one), rows 1, 2 -> key 1, rows 3..7 -> key 3: scores [1, 2, 0, 5, 0, 0, 0, 0].
    q[0, 0, 1:3], q[0, 0, 3:] = e[1], e[3]
    # Head 1: row 0 -> key 0, row 1 -> key 1, row 2 -> key 2, row 3 -> keys 2, 3 (1/2 each), rows 4..7 -> key 4:
    # scores [1, 1, 1.5, .5, 4, 0, 0, 0].
    q[0, 1, 1], q[0, 1, 2], q[0, 1, 3], q[0, 1, 4:] = e[1], e[2], e[2] + e[3], e[4]
    g = torch.Generator().manual_seed(0)
    cache = H2OCache(heavy=0.25, recent=0.25)
    cache.begin(1, 1, 0)
    cache.attend(0, q, k, torch.randn(1, 2, 8, 8, generator=g), torch.arange(8))
    cache.advance(8)
    # L = 8: heavy floor(2) = 2, recent 2. Recent rows 6, 7; older 0..5, top 2: head 0 rows 3 (5), 1 (2);
    # head 1 rows 4 (4), 2 (1.5). The sink (row 0, score 1) goes: H2O does not protect it.
    assert positions_per_head(cache.pos[0]) == [{1, 3, 6, 7}, {2, 4, 6, 7}]
    assert scores_per_head(cache.pos[0], cache.scores[0]) == [approx({1: 2, 3: 5, 6: 0, 7: 0}, abs=1e-5),
                                                              approx({2: 1.5, 4: 4, 6: 0, 7: 0}, abs=1e-5)]
    # Decode queries per step (head 0, head 1); new keys are 0.
    # 1 (L 9, h 2, r 2): head 0 -> key 3 (6); older {1: 2, 3: 6, 6: 0} -> evict 6.
    #                    head 1 -> key 7 (1); older {2: 1.5, 4: 4, 6: 0} -> evict 6.
    # 2 (L 10, h 2, r 2): head 0 -> key 3 (7); older {1: 2, 3: 7, 7: 0} -> evict 7.
    #                     head 1 -> key 7 (2); older {2: 1.5, 4: 4, 7: 2} -> evict 2: a recent token that kept
    #                     receiving attention displaces an older heavy hitter.
    # 3 (L 11, h 2, r 2): head 0 -> key 1 (3); older {1: 3, 3: 7, 8: 0} -> evict 8.
    #                     head 1 -> key 4 (5); older {4: 5, 7: 2, 8: 0} -> evict 8.
    # 4 (L 12, h 3, r 3): budget 6 >= 5 rows: nothing evicted. Zero queries: uniform 1/5 to every row.
    queries = {1: (e[3], e[7]), 2: (e[3], e[7]), 3: (e[1], e[4]), 4: (torch.zeros(8), torch.zeros(8))}
    expected = {1: [{1, 3, 7, 8}, {2, 4, 7, 8}], 2: [{1, 3, 8, 9}, {4, 7, 8, 9}],
                3: [{1, 3, 9, 10}, {4, 7, 9, 10}], 4: [{1, 3, 9, 10, 11}, {4, 7, 9, 10, 11}]}
    for t in (1, 2, 3, 4):
        cache.attend(0, torch.stack(queries[t])[None, :, None], torch.zeros(1, 2, 1, 8),
                     torch.randn(1, 2, 1, 8, generator=g), torch.tensor([7 + t]))
        cache.advance(1)
        assert positions_per_head(cache.pos[0]) == expected[t], t
    assert scores_per_head(cache.pos[0], cache.scores[0]) == [
        approx({1: 3.2, 3: 7.2, 9: .2, 10: .2, 11: .2}, abs=1e-5), approx({4: 5.2, 7: 2.2, 9: .2, 10: .2, 11: .2}, abs=1e-5)]


def test_gqa_scores_add_up():
    """H2O, 4 query heads on 2 KV heads (heads 0, 1 -> KV 0; heads 2, 3 -> KV 1), hs 8, 6 prompt tokens,
    heavy .2 and recent .2 (L 6: one heavy hitter + the last token). Keys s e_j (j = 0..5) in both KV heads.
    Query patterns (rows 0..5, "a/b" = half each):
      A: 0, 0, 2, 2/3, 4, 5  -> column sums [2, 0, 1.5, .5, 1, 1]
      B: 0, 1, 2, 1, 1/2, 2/5 -> column sums [1, 2.5, 2, 0, 0, .5]
    Heads 0, 1 = A, B; heads 2, 3 = A, A.
      KV 0 = A + B = [3, 2.5, 3.5, .5, 1, 1.5] -> keeps row 2 (+ row 5). Head A alone would keep row 0, head B
      alone row 1, the max of the two row 1: only the sum keeps row 2.
      KV 1 = 2A = [4, 0, 3, 1, 2, 2] -> keeps row 0. Grouping heads as h % 2 would give KV 0 = A + A (row 0)
      and KV 1 = B + A (row 2): the opposite."""
    s = 10.0
    e = torch.eye(8) * s
    k = torch.zeros(1, 2, 6, 8)
    k[0, :, :, :] = e[:6]
    A = torch.stack([e[0], e[0], e[2], e[2] + e[3], e[4], e[5]])
    B = torch.stack([e[0], e[1], e[2], e[1], e[1] + e[2], e[2] + e[5]])
    q = torch.stack([A, B, A, A])[None]                                       # (1, 4, 6, 8)
    g = torch.Generator().manual_seed(0)
    cache = H2OCache(heavy=0.2, recent=0.2)
    cache.begin(1, 1, 0)
    cache.attend(0, q, k, torch.randn(1, 2, 6, 8, generator=g), torch.arange(6))
    cache.advance(6)
    assert positions_per_head(cache.pos[0]) == [{2, 5}, {0, 5}]
    assert scores_per_head(cache.pos[0], cache.scores[0]) == [approx({2: 3.5, 5: 1.5}, abs=1e-5),
                                                              approx({0: 4, 5: 2}, abs=1e-5)]
    # A decode step (position 6, key s e6 in both KV heads; L 7: 1 heavy + 1 recent) adds each query head's
    # row onto its KV head: head 0 -> key 5, head 1 -> key 6 (the new token: it starts with that score),
    # head 2 -> key 0, head 3 -> keys 5 and 6 (1/2 each).
    #   KV 0: 2: 3.5, 5: 1.5 + 1 = 2.5, 6: 0 + 1 = 1 -> keeps {2, 6} with [3.5, 1]
    #   KV 1: 0: 4 + 1 = 5, 5: 2 + .5 = 2.5, 6: .5 -> keeps {0, 6} with [5, .5]
    q1 = torch.stack([e[5], e[6], e[0], e[5] + e[6]])[None, :, None]         # (1, 4, 1, 8)
    cache.attend(0, q1, e[6].expand(1, 2, 1, 8), torch.randn(1, 2, 1, 8, generator=g), torch.tensor([6]))
    assert positions_per_head(cache.pos[0]) == [{2, 6}, {0, 6}]
    assert scores_per_head(cache.pos[0], cache.scores[0]) == [approx({2: 3.5, 6: 1}, abs=1e-5),
                                                              approx({0: 5, 6: .5}, abs=1e-5)]


# =========================================================================================================
# 6. Accounting.
# =========================================================================================================
ACCOUNTING_POLICIES = [("full", {}), ("avl", {}), ("avl", dict(filter_layer=2)), ("h2o", {}),
                       ("streaming", {}), ("fastv", {}), ("random", {}), ("random", dict(S=0.3))]


@pytest.mark.parametrize("name", ["mha", "mha4", "gqa4"])
@pytest.mark.parametrize("policy,params", ACCOUNTING_POLICIES,
                         ids=[f"{p}-{'-'.join(f'{k}{v}' for k, v in kw.items()) or 'defaults'}"
                              for p, kw in ACCOUNTING_POLICIES])
def test_kv_accounting(name, policy, params):
    m = model(name)
    ids, pixel_values = prompt(name)
    new_tokens = 6
    _, stats = tinyavl.generate(m, ids, pixel_values, max_new_tokens=new_tokens, policy=policy, eos_token_id=(),
                                **params)
    n_layers, kv_heads = MODELS[name][0], MODELS[name][1]
    head_dim, fp32 = 16, 4
    row = 2 * kv_heads * head_dim * fp32                       # K and V of one token in one layer
    n_img = m.config.num_image_tokens
    # The dense cache of the same sequence: the last sampled token is never fed, so prompt + new - 1 tokens.
    assert stats.kv_cache_bytes_dense == n_layers * (ids.shape[1] + new_tokens - 1) * row
    # The layers' bytes per modality (counted from the rows' positions) add up to the bytes the cache's
    # tensors hold after prefill (what each modality's bytes are: tests/test_policy_contract.py).
    assert sum(sum(layer.values()) for layer in stats.layer_bytes_after_prefill) == stats.kv_cache_bytes_after_prefill
    assert stats.kv_cache_bytes_peak <= stats.kv_cache_bytes_dense
    if policy == "full":
        assert stats.kv_cache_bytes_peak == stats.kv_cache_bytes_dense
        assert stats.modality_bytes_after_prefill == dict(sys=n_layers * N_SYS * row, image=n_layers * n_img * row,
                                                          text=n_layers * (ids.shape[1] - N_SYS - n_img) * row)
    if policy == "random":
        S = params.get("S", 0.5)
        for layer in stats.layer_bytes_after_prefill:
            assert layer == dict(sys=N_SYS * row, image=math.floor(S * n_img) * row, text=30 * row)
    if policy == "avl":
        for layer in stats.layer_bytes_after_prefill:
            assert layer["image"] == math.floor(0.5 * n_img) * row
            assert layer["sys"] == N_SYS * row
            assert layer["text"] == 20 * row                   # 30 text tokens, budget max(round(18), 20)
    # The modality-blind policies' rows per layer at a sequence length L, from their papers' budgets (the
    # defaults: H2O 12.5% heavy + 37.5% recent, StreamingLLM 4 sinks + 50% recent; FastV drops R = 0.5 of
    # the image from layer 2 on, where the model has a layer 2). After prefill L is the prompt's length;
    # the peak comes after the last fed token, 5 more.
    rows_at = {"h2o": lambda L: [min(L, math.floor(0.125 * L) + max(1, math.floor(0.375 * L)))] * n_layers,
               "streaming": lambda L: [min(L, 4 + max(1, math.floor(0.5 * L)))] * n_layers,
               "fastv": lambda L: [L if layer < 2 else L - (n_img - math.floor(0.5 * n_img))
                                   for layer in range(n_layers)]}.get(policy)
    if rows_at is not None:
        prompt_length = ids.shape[1]
        assert [sum(layer.values()) for layer in stats.layer_bytes_after_prefill] == \
            [rows * row for rows in rows_at(prompt_length)]
        assert stats.kv_cache_bytes_peak == sum(rows_at(prompt_length + new_tokens - 1)) * row


def test_peak_bytes_by_modality_are_those_of_the_first_step_at_the_peak():
    """`modality_bytes_peak` is the bytes per modality when the cache first held its peak. StreamingLLM's
    window (half the sequence) grows by a row every other step and otherwise slides: on a 69-token prompt
    steps 1 and 2 hold the same bytes, step 2 one image row fewer and one text row more (the reference:
    a snapshot the cache takes after every forward pass)."""
    class Snapshots(StreamingCache):
        def begin(self, *args, **kwargs):
            super().begin(*args, **kwargs)
            self.snapshots = []                                     # (total bytes, bytes per modality)

        def advance(self, n_tokens):
            super().advance(n_tokens)
            per_layer = [self.modality_bytes(layer) for layer in range(self.n_layers)]
            self.snapshots.append((self.nbytes(), {m: sum(b[m] for b in per_layer) for m in per_layer[0]}))

    m = model("mha")
    cache = Snapshots(sinks=4, recent=0.5)
    _, stats = tinyavl.generate(m, *prompt("mha"), max_new_tokens=3, eos_token_id=(), policy=cache)
    peak = max(total for total, _ in cache.snapshots)
    at_peak = [by_modality for total, by_modality in cache.snapshots if total == peak]
    assert len(at_peak) > 1 and at_peak[0] != at_peak[1]            # a tie the choice matters to
    assert stats.kv_cache_bytes_peak == peak and stats.modality_bytes_peak == at_peak[0]


def test_modality_bytes_with_heads_keeping_different_tokens():
    """H2O evicts per head, across modalities: one head may keep an image token where another keeps text.
    One layer, 2 KV heads x hs 8, prompt [sys 0 | image 1, 2 | text 3, 4, 5]; heavy .2, recent .2 (L 6:
    1 heavy + 1 recent per head). Head 0: key 1 = s e1 and queries 1..5 = s e1 -> scores k0 1, k1 5 -> keeps
    {1, 5}. Head 1: key 3 = s e3, queries 0..2 = 0 (uniform: k0 gets 1 + 1/2 + 1/3), 3..5 = s e3 (k3 gets 3)
    -> keeps {3, 5}. Held: head 0 one image + one text row, head 1 two text rows: 1 image head-row and
    3 text head-rows, each 2 (K, V) x 8 x 4 bytes = 64 bytes."""
    s = 10.0
    e = torch.eye(8) * s
    k = torch.zeros(1, 2, 6, 8)
    k[0, 0, 1], k[0, 1, 3] = e[1], e[3]
    q = torch.zeros(1, 2, 6, 8)
    q[0, 0, 1:], q[0, 1, 3:] = e[1], e[3]
    cache = H2OCache(heavy=0.2, recent=0.2)
    cache.begin(1, 1, 2)
    cache.attend(0, q, k, torch.randn(1, 2, 6, 8, generator=torch.Generator().manual_seed(0)), torch.arange(6))
    cache.advance(6)
    assert positions_per_head(cache.pos[0]) == [{1, 5}, {3, 5}]
    assert cache.nbytes() == 2 * 2 * 64                               # 2 heads x 2 rows
    assert cache.modality_bytes(0) == {"sys": 0, "image": 1 * 64, "text": 3 * 64}
    assert sum(cache.modality_bytes(0).values()) == cache.nbytes()    # one layer
    assert cache.modality_rows(0) == {"sys": 0, "image": 0.5, "text": 1.5}  # per head: the mean of the two
    whole = cache.modality_rows(0)["sys"]
    assert type(whole) is int                                         # a whole count reads as one: 0, not 0.0


def test_triton_kernel_without_a_gpu_is_refused_before_any_work(monkeypatch):
    """kernel='triton' on a machine with neither CUDA nor Triton's interpreter: a UserError when the policy
    is made (main.py makes it before loading the model), not a driver traceback after the answer."""
    kernels = pytest.importorskip("kernels.sparse_attention")
    if not kernels.TRITON_AVAILABLE:
        with pytest.raises(UserError, match="pip install triton"):
            make_cache("avl", kernel="triton")
        return
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA device"):
        make_cache("avl", kernel="triton")
    with pytest.raises(UserError, match="--kernel triton runs on a CUDA device .* use --kernel torch or auto"):
        make_cache("avl", named=flag, kernel="triton")           # the command lines' wording: their flag
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_cpu = make_cache("avl", named=flag, kernel="triton")  # allowed: this machine has a GPU, the model may not
    with pytest.raises(UserError, match="--kernel triton runs on a CUDA device"):
        on_cpu.use_kernel(torch.zeros(1, 4, 1, 64))          # the model's query is on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    make_cache("avl", kernel="auto")  # auto falls back to the torch path
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UserError, match="CUDA device"):   # a model on the CPU of a machine that has a GPU
        require_triton(torch.device("cpu"))
    require_triton(torch.device("cuda"))
    monkeypatch.setattr(kernels, "INTERPRETED", True)
    make_cache("avl", kernel="triton")  # the interpreter runs it on the CPU


def cuda_query(head_dim, dtype=torch.float32):
    """What AVLCache.use_kernel reads of a CUDA query (B, H, 1, head_dim), on a machine without CUDA."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 4, 1, head_dim), device=torch.device("cpu"))


def test_kernel_auto_keeps_to_torch_where_the_kernel_would_run_in_the_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 left set on a GPU machine: the kernel would run in Triton's interpreter, a CPU loop
    over the CUDA tensors; kernel='auto' takes torch there, and kernel='triton' still takes the kernel."""
    kernels = pytest.importorskip("kernels.sparse_attention")
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(kernels, "INTERPRETED", True)
    assert not make_cache("avl").use_kernel(cuda_query(64))
    assert make_cache("avl", kernel="triton").use_kernel(cuda_query(64))


def test_kernel_auto_falls_back_to_torch_for_heads_the_kernel_has_no_tile_for(monkeypatch):
    """On CUDA tensors kernel='auto' takes the (compiled) Triton kernel only where it runs: a head dim that
    is a power of two >= 16. A smaller head (a tiny test model on a GPU) goes through torch; kernel='triton'
    forced on one is a UserError, not the kernel's ValueError in the middle of a generation."""
    kernels = pytest.importorskip("kernels.sparse_attention")
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("Triton is not installed")
    auto, forced = make_cache("avl"), make_cache("avl", kernel="triton")
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # compiled, as on a GPU machine
    assert [auto.use_kernel(cuda_query(d)) for d in (8, 16, 24, 64, 128)] == [False, True, False, True, True]
    assert not auto.use_kernel(cuda_query(64, torch.float64))
    monkeypatch.setattr(kernels, "INTERPRETED", True)  # kernel='triton' allowed on this CPU
    assert forced.use_kernel(cuda_query(64))
    with pytest.raises(UserError, match="head dim 8"):
        forced.use_kernel(cuda_query(8))
    with pytest.raises(UserError, match=r"^--kernel triton cannot run this model's attention: head dim 8 is not a "
                                        r"power of two >= 16 \(a tl.dot tile\); use --kernel torch or auto$"):
        make_cache("avl", named=flag, kernel="triton").use_kernel(cuda_query(8))


def test_kernel_auto_keeps_bf16_off_gpus_without_bf16_instructions(monkeypatch):
    """NVIDIA GPUs have bf16 instructions from compute capability 8.0 on; for an older one (a T4: 7.5) some
    Triton releases fail to assemble the kernel's bf16 code, and 3.9 emulates it. There kernel='auto' takes
    torch for bf16 and the kernel for fp16 and fp32, and kernel='triton' on bf16 is a one-line error naming
    the capability; an 8.0 GPU (an A100) takes the kernel for bf16 too."""
    kernels = pytest.importorskip("kernels.sparse_attention")
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("Triton is not installed")
    auto, forced = make_cache("avl"), make_cache("avl", named=flag, kernel="triton")  # made where Triton runs
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # compiled, as on a GPU machine
    monkeypatch.setattr(torch.version, "hip", None)     # an NVIDIA build
    capability = {"cuda:0": (7, 5)}
    monkeypatch.setattr(kernels, "gpu_properties",
                        lambda device: types.SimpleNamespace(major=capability[str(device)][0],
                                                             minor=capability[str(device)][1]))

    def on_gpu(dtype):
        query = cuda_query(128, dtype)
        query.device = torch.device("cuda:0")
        return query

    assert [auto.use_kernel(on_gpu(dtype)) for dtype in (torch.bfloat16, torch.float16, torch.float32)] == [
        False, True, True]
    with pytest.raises(UserError, match=r"^--kernel triton cannot run this model's attention: this GPU \(compute "
                                        r"capability 7.5\) has no bf16 instructions \(8.0 on\); use --kernel torch or "
                                        r"auto$"):
        forced.use_kernel(on_gpu(torch.bfloat16))
    capability["cuda:0"] = (8, 0)
    assert auto.use_kernel(on_gpu(torch.bfloat16))


def test_a_gpu_that_refuses_the_compiled_kernel(monkeypatch, capsys):
    """Triton compiles the kernel at its first launch, for the GPU it runs on, and a GPU with less shared
    memory than the kernel's tiles need refuses it there (Triton's OutOfResources). kernel='triton': a
    UserError naming both sizes. kernel='auto': that layer and every later step go through torch (the logits
    of kernel='torch'), the kernel is not tried again, in this cache or a later one (a generation makes one
    per call), and stderr says so once."""
    kernels = pytest.importorskip("kernels.sparse_attention")
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("Triton is not installed")
    from triton.runtime.errors import OutOfResources
    launches = []

    def refused(*args, **kwargs):  # a compiled launch on a GPU with 64 KB of shared memory per block
        launches.append(args)
        raise OutOfResources(81920, 65536, "shared memory")

    monkeypatch.setattr(kernels, "sparse_decode_attention", refused)
    m = model("gqa")
    ids, pixel_values = prompt("gqa")
    want, tokens = run_steps(m, ids, pixel_values, make_cache("avl", kernel="torch"), 7)
    monkeypatch.setattr(kernels, "INTERPRETED", True)  # kernel='triton' allowed on these CPU tensors
    with pytest.raises(UserError, match=r"^--kernel triton: this GPU cannot run the Triton kernel \(shared memory: "
                                        r"it needs 81920 bytes, the GPU has 65536 bytes\): use --kernel torch or auto$"):
        run_steps(m, ids, pixel_values, make_cache("avl", named=flag, kernel="triton"), 7, tokens=tokens)
    capsys.readouterr()
    launches.clear()
    monkeypatch.setattr(tinyavl.cache, "REFUSED_KERNELS", set())  # what earlier tests' GPUs refused: nothing
    monkeypatch.setattr(kernels, "INTERPRETED", False)  # compiled, as on a GPU machine
    for run in range(2):
        auto = make_cache("avl")
        # These tensors live on the CPU: use_kernel is asked about a CUDA query of the same dtype and head dim.
        def as_if_on_a_gpu(q, cache=auto):
            return AVLCache.use_kernel(cache, cuda_query(q.shape[-1], q.dtype))

        monkeypatch.setattr(auto, "use_kernel", as_if_on_a_gpu)
        got, _ = run_steps(m, ids, pixel_values, auto, 7, tokens=tokens)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert len(launches) == 1
        assert capsys.readouterr().err == ("" if run else "note: this GPU cannot run the Triton kernel (shared memory: "
                                           "it needs 81920 bytes, the GPU has 65536 bytes); A-VL's decode attention "
                                           "runs in torch\n")
    assert make_cache("avl").use_kernel(cuda_query(32))  # another head dim: other tiles, tried anew


def test_avl_on_cpu_tensors_decodes_without_importing_the_kernel(monkeypatch):
    """kernel='auto' on CPU tensors takes the torch path without importing kernels/ (nor Triton, whose
    0.2 s import would otherwise land in every CPU run's first decode step): with the module made
    unimportable, A-VL decodes the tokens it decodes with kernel='torch'."""
    m = model("gqa4")
    ids, pixel_values = prompt("gqa4")
    want, _ = tinyavl.generate(m, ids, pixel_values, max_new_tokens=6, policy="avl", kernel="torch", eos_token_id=())
    monkeypatch.setitem(sys.modules, "kernels.sparse_attention", None)  # `from kernels.sparse_attention import` fails
    got, _ = tinyavl.generate(m, ids, pixel_values, max_new_tokens=6, policy="avl", eos_token_id=())
    assert got == want


@pytest.mark.parametrize("chunk", [1, 5, 16, 256])
@pytest.mark.parametrize("first_row", [0, 11])
def test_causal_column_sums_equal_a_float64_masked_softmax_over_several_chunks(chunk, first_row):
    """H2O's prefill scores: the chunked sums equal one whole float64 causal softmax, also when the prompt
    spans several chunks (a chunk's query positions must be shifted by its start, and by first_row)."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, t, hs = 2, 4, 2, 37, 8
    n = first_row + t
    q, k = torch.randn(B, H, t, hs, generator=g), torch.randn(B, Hkv, n, hs, generator=g)
    k_per_head = k.double().repeat_interleave(H // Hkv, dim=1)                           # (B, H, n, hs)
    logits = q.double() @ k_per_head.transpose(-1, -2) / hs ** 0.5                        # (B, H, t, n)
    query_pos = torch.arange(first_row, first_row + t)
    logits[..., torch.arange(n)[None, :] > query_pos[:, None]] = float("-inf")
    want = logits.softmax(-1).sum(2).reshape(B, Hkv, H // Hkv, n).sum(2)                  # (B, Hkv, n)
    got = causal_column_sums(q, k, first_row=first_row, chunk=chunk)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.sum(-1).double(), torch.full((B, Hkv), float(t * H // Hkv), dtype=torch.float64))


# =========================================================================================================
# The preallocated buffers: appends in place, eviction and reordering move only their region.
# =========================================================================================================


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_buffers_are_sized_once_and_decode_fills_them_to_the_last_row(name):
    """begin(max_decode_steps=4): after prefill every layer's buffers hold the prompt plus exactly 4 rows; the 4
    decode steps write in place (same storage) up to the last row, and a 5th step past the reservation
    grows the buffers; every step's logits equal the dense reference's (`full_reference`, a cache grown row by
    row, which test_full_cache_matches_uncached_forward checks against the cache-free forward)."""
    m = model(name)
    ids, pixel_values = prompt(name)
    _, reference, fed = full_reference(name)
    cache = KVCache()
    cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id), max_decode_steps=4)
    n_prompt, layers = ids.shape[1], range(m.config.text.num_hidden_layers)
    with torch.inference_mode():
        m(ids, pixel_values, cache=cache)
        assert [cache.k_buffer[layer].shape[2] for layer in layers] == [n_prompt + 4] * len(layers)
        storage = [cache.k_buffer[layer].data_ptr() for layer in layers]
        for step in range(5):
            logits = m(torch.tensor([[fed[step]]]), cache=cache)[0, -1]
            torch.testing.assert_close(logits, reference[step + 1], atol=LOGIT_ATOL, rtol=0)
            assert all(cache.k[layer].shape[2] == n_prompt + step + 1 for layer in layers)
            same_storage = [cache.k_buffer[layer].data_ptr() for layer in layers] == storage
            assert same_storage == (step < 4), step
    assert cache.reserved_nbytes() > cache.nbytes()  # the grown buffers have room left


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (swap_rows has a GPU path)"))])
def test_keep_reorder_and_append_against_a_list_of_rows(device):
    """By hand, against rows tracked as a Python list: eviction from a start row (shared, `keep`; per head,
    `compact`), appends after it, and swaps of row pairs; rows outside the region never change."""
    g = torch.Generator().manual_seed(0)
    cache = KVCache()
    cache.begin(1, 2, 4, max_decode_steps=3)
    k, v = torch.randn(1, 2, 10, 4, generator=g).to(device), torch.randn(1, 2, 10, 4, generator=g).to(device)
    cache.append(0, k, v, torch.arange(10, device=device))
    cache.reserve(0, 10 + cache.max_decode_steps)  # as `attend` sizes a layer after its prefill
    cache.advance(10)
    rows = [[*range(10)], [*range(10)]]  # per head, the original row each cached row holds

    def check():
        for head in range(2):
            torch.testing.assert_close(cache.k[0][0, head], k[0, head, rows[head]], atol=0, rtol=0)
            torch.testing.assert_close(cache.v[0][0, head], v[0, head, rows[head]], atol=0, rtol=0)
            assert cache.pos[0][0, head].tolist() == rows[head]

    cache.keep_shared_rows(0, torch.tensor([4, 7, 8, 9], device=device), start=3)  # shared: rows 3, 5, 6 go
    rows = [[0, 1, 2, 4, 7, 8, 9]] * 2
    check()
    # Per head, from row 4 on (rows holding 7, 8, 9): head 0 drops 8, head 1 drops 7. The kept row past the
    # new end (9) fills the dropped slot; a ledger of the region's rows moves alike.
    keep = torch.tensor([[[True, False, True], [False, True, True]]], device=device)
    scores = cache.compact(0, keep, start=4, scores=torch.tensor([[[.7, .8, .9], [1.7, 1.8, 1.9]]], device=device))
    rows = [[0, 1, 2, 4, 7, 9], [0, 1, 2, 4, 9, 8]]
    check()
    assert torch.equal(scores.cpu(), torch.tensor([[[.7, .9], [1.9, 1.8]]]))
    cache.swap_rows(0, torch.tensor([1, 5], device=device), torch.tensor([3, 2], device=device))  # 1 <-> 3, 5 <-> 2
    rows = [[0, 4, 9, 1, 7, 2], [0, 4, 8, 1, 9, 2]]
    check()
    k = torch.cat([k, torch.randn(1, 2, 3, 4, generator=g).to(device)], dim=2)  # three decode steps' rows 10-12
    v = torch.cat([v, torch.randn(1, 2, 3, 4, generator=g).to(device)], dim=2)
    for position in (10, 11, 12):
        cache.append(0, k[:, :, position:position + 1], v[:, :, position:position + 1],
                     torch.tensor([position], device=device))
        rows = [r + [position] for r in rows]
        check()
    assert cache.k_buffer[0].shape[2] == 13 and cache.nbytes() == 9 * 2 * 2 * 4 * 4  # room was left, unused


def test_compact_evicts_each_sample_and_head_on_its_own_rows():
    """A batch of 2 samples x 2 KV heads: each (sample, head) plane keeps exactly its own rows (a list per
    plane is the reference), none taken from another sample's or head's."""
    B, Hkv, n = 2, 2, 5
    cache = KVCache()
    cache.begin(1, 1, 0)
    k = torch.arange(B * Hkv * n, dtype=torch.float32).view(B, Hkv, n, 1)      # every row its own value
    cache.append(0, k, -k, torch.arange(n))
    cache.advance(n)
    keep = torch.tensor([[[1, 0, 1, 1, 1], [1, 1, 0, 1, 1]],
                         [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]], dtype=torch.bool)
    cache.compact(0, keep)
    for b in range(B):
        for h in range(Hkv):
            kept = [p for p in range(n) if keep[b, h, p]]
            assert sorted(cache.pos[0][b, h].tolist()) == kept, (b, h)
            assert sorted(cache.k[0][b, h, :, 0].tolist()) == k[b, h, kept, 0].tolist(), (b, h)
            assert torch.equal(cache.v[0][b, h], -cache.k[0][b, h])


def test_compact_refuses_heads_that_keep_different_counts():
    """Heads keeping 2, 1 and 3 rows (2 on average, as the first head): their moves would pair with another
    head's rows and give a head a row it evicted. A policy that makes this mask is told so."""
    cache = KVCache()
    cache.begin(1, 1, 0)
    k = torch.randn(1, 3, 4, 1)
    cache.append(0, k, k, torch.arange(4))
    cache.advance(4)
    keep = torch.tensor([[[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]]], dtype=torch.bool)
    with pytest.raises(ValueError, match="keep must hold the same count of True in every"):
        cache.compact(0, keep)


def test_swap_rows_trades_rows_of_a_batch_held_in_the_models_own_layout():
    """At the prefill a layer's rows are the model's K and V, (B, T, Hkv, hs) transposed: strided, with
    B = 2 no view of them as (B Hkv) planes. Rows 1 and 3 trade places in every sample and head."""
    B, T, Hkv = 2, 5, 2
    cache = KVCache()
    cache.begin(1, 1, 0)
    k = torch.arange(B * T * Hkv, dtype=torch.float32).view(B, T, Hkv, 1).transpose(1, 2)    # (B, Hkv, T, 1)
    before = k.clone()
    cache.append(0, k, -k, torch.arange(T))
    cache.swap_rows(0, torch.tensor([1]), torch.tensor([3]))
    order = [0, 3, 2, 1, 4]
    assert torch.equal(cache.k[0], before[:, :, order]) and torch.equal(cache.v[0], -before[:, :, order])
    assert cache.pos[0][0, 0].tolist() == order


@pytest.mark.parametrize("cache_cls,params", [(H2OCache, dict(heavy=0.2, recent=0.3)),
                                              (StreamingCache, dict(sinks=2, recent=0.4))])
def test_decode_eviction_moves_only_the_rows_that_fill_evicted_slots(cache_cls, params):
    """After a decode step's eviction, every slot of every head holds the row it held before, except the
    evicted rows' slots, each now holding a row from past the new end: evicting e rows moves e rows."""
    cache = recording(cache_cls)(**params)
    run_steps(model("gqa"), *prompt("gqa"), cache, 8)
    evicting_steps = 0
    for e in (e for e in cache.log if e["step"] > 0):
        before, after = e["pos_before"][0], e["pos_after"][0]                  # (Hkv, n + e), (Hkv, n)
        n = after.shape[1]
        for h in range(before.shape[0]):
            changed = (before[h, :n] != after[h]).nonzero().flatten().tolist()
            evicted = set(before[h].tolist()) - set(after[h].tolist())
            assert {int(before[h, i]) for i in changed} <= evicted, (e["step"], h)
            assert {int(after[h, i]) for i in changed} <= set(before[h, n:].tolist()), (e["step"], h)
        evicting_steps += n < before.shape[1]
    assert evicting_steps >= 3


def test_avl_core_swaps_move_keys_values_and_positions_together():
    """Over A-VL decode steps with update steps (K = 2), every held row's key and value are still the
    ones appended at its logical position: the core re-ranking's swaps move all three together."""
    m = model("gqa")
    ids, pixel_values = prompt("gqa")
    record = {}

    class Recorded(AVLCache):
        def append(self, layer, k, v, pos):
            for i, p in enumerate(pos.tolist()):
                record[layer, p] = (k[0, :, i].clone(), v[0, :, i].clone())
            super().append(layer, k, v, pos)

    cache = Recorded(S=0.5, C=0.25, K=2, P=1, T=1)
    tinyavl.generate(m, ids, pixel_values, max_new_tokens=7, eos_token_id=(), policy=cache)
    moved = 0
    for layer in range(m.config.text.num_hidden_layers):
        for head in range(cache.k[layer].shape[1]):
            for row, p in enumerate(cache.pos[layer][0, head].tolist()):
                key, value = record[layer, p]
                assert torch.equal(cache.k[layer][0, head, row], key[head])
                assert torch.equal(cache.v[layer][0, head, row], value[head])
        image = cache.pos[layer][0, 0, N_SYS:cache.text_start]
        moved += int((image.diff() < 0).any())  # the core-first layout is not positional order
    assert moved > 0


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode_attention_over_spans_equals_one_softmax_over_their_union(heads, kv_heads):
    """decode_attention on spans read in place == float64 softmax attention over the rows joined; the
    LastRow it hands over carries that row's log-sum-exp, and its probabilities on any attended rows,
    sliced from its logits or recomputed from the lse alone, are the float64 softmax's."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, heads, 1, 16, generator=g)
    k, v = torch.randn(2, kv_heads, 30, 16, generator=g), torch.randn(2, kv_heads, 30, 16, generator=g)
    out, last_row = decode_attention(q, k, v, [(0, 7), (19, 30)])
    joined_k, joined_v = torch.cat([k[:, :, :7], k[:, :, 19:]], 2), torch.cat([v[:, :, :7], v[:, :, 19:]], 2)
    logits = naive_logits(q, joined_k)                                             # (2, H, 1, 18) float64
    expected = logits.softmax(-1) @ joined_v.double().repeat_interleave(heads // kv_heads, dim=1)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(last_row.lse.double(), logits[:, :, 0].logsumexp(-1), atol=1e-5, rtol=0)
    probs = logits.softmax(-1)[:, :, 0]                                            # (2, H, 18): joined columns
    for start, end, columns in ((19, 30, slice(7, 18)), (2, 5, slice(2, 5)), (21, 24, slice(9, 12))):
        for row in (last_row, LastRow(last_row.lse)):  # logits handed over; none (q.k recomputed)
            torch.testing.assert_close(row.probs(q, k, start, end).double(), probs[..., columns], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probabilities_from_an_lse_alone_are_the_softmax_in_16_bit(dtype):
    """The Triton kernel hands `update` an lse without logits (A-VL's decode on a GPU): the probabilities
    LastRow recomputes for 16-bit q and k are then the float64 softmax's and sum to 1 over the row, as
    the kernel's lse comes from fp32 products of those values (logits rounded to bf16 put them off by
    up to 5%)."""
    g = torch.Generator().manual_seed(0)
    q = (3 * torch.randn(1, 8, 1, 64, generator=g)).to(dtype)
    k = (3 * torch.randn(1, 2, 300, 64, generator=g)).to(dtype)
    logits = naive_logits(q, k)[:, :, 0]                                          # (1, 8, 300) float64
    probs = LastRow(logits.logsumexp(-1).float()).probs(q, k, 0, 300).double()    # the kernel's lse: fp32
    torch.testing.assert_close(probs, logits.softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 8, dtype=torch.float64), atol=1e-5, rtol=0)


def test_a_rerank_moves_only_the_rows_that_change_role():
    """rerank_core returns how many rows entered the core, and moves nothing when the core stays."""
    cache = make_cache("avl")
    run_steps(model("gqa"), *prompt("gqa"), cache, 2)
    n_secondary = cache.text_start - cache.n_sys
    keys = cache.k_buffer[0].clone()
    stays = torch.zeros(n_secondary)
    stays[:cache.n_core] = 1.0                                     # the core, as it lies, ranks first
    moves = torch.zeros(n_secondary)
    moves[-cache.n_core:] = 1.0                                    # the last n_core stored rows rank first
    with torch.inference_mode():                                   # as generate runs the cache
        assert cache.rerank_core(0, stays) == 0 and torch.equal(cache.k_buffer[0], keys)
        assert cache.rerank_core(0, moves) == min(cache.n_core, n_secondary - cache.n_core)


def test_decode_attention_over_many_spans_rounds_once_in_bf16():
    """A policy may attend to scattered rows (chapter 2's writes one): in bf16, decode_attention over every
    other row, 512 spans, is as close to the float64 softmax as the same rows read as one span."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 8, 1, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 1024, 64, generator=g).bfloat16() for _ in range(2))
    spans = [(start, start + 1) for start in range(0, 1024, 2)]
    rows = torch.arange(0, 1024, 2)
    joined_k, joined_v = k[:, :, rows], v[:, :, rows]
    expected = naive_logits(q, joined_k).softmax(-1) @ joined_v.double().repeat_interleave(4, dim=1)
    scattered, _ = decode_attention(q, k, v, spans)
    one_span, _ = decode_attention(q, joined_k, joined_v, [(0, 512)])
    scattered_error, one_span_error = ((x.double() - expected).abs().mean() for x in (scattered, one_span))
    assert scattered_error <= 1.5 * one_span_error, (scattered_error, one_span_error)


def test_read_end_rounds_up_to_a_bucket_in_16_bit_floats_on_a_cpu_within_the_buffer():
    """Where each new shape costs (bf16 and fp16 products on a CPU), a decode step reads up to the next
    multiple of ROW_BUCKET rows, but never past the rows the buffer has; elsewhere exactly the span."""

    def buffer(rows, dtype):
        return torch.zeros(1, 2, rows, 8, dtype=dtype)

    end = ROW_BUCKET + 6  # in the second bucket, which ends at 2 ROW_BUCKET
    for dtype in (torch.bfloat16, torch.float16):
        assert read_end(end, buffer(3 * ROW_BUCKET, dtype)) == 2 * ROW_BUCKET
        assert read_end(end, buffer(end + 3, dtype)) == end + 3      # the buffer ends first
        assert read_end(ROW_BUCKET, buffer(3 * ROW_BUCKET, dtype)) == ROW_BUCKET  # on a bucket's edge already
    for dtype in (torch.float32, torch.float64):
        assert read_end(end, buffer(3 * ROW_BUCKET, dtype)) == end


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
def test_decode_attention_read_past_the_last_span_counts_only_the_spans(heads, kv_heads, dtype):
    """In bf16 and fp16 on a CPU decode_attention reads rows past its last span (`read_end`): rows the cache no
    longer holds, here planted to take all the attention and to carry huge values, must change nothing:
    the output and log-sum-exp are the float64 softmax's over the spans' rows, and the logits handed over
    cover the spans' rows only, each where it belongs: the probabilities read from them are the softmax's."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, heads, 1, 16, generator=g)
    k, v = torch.randn(2, kv_heads, 200, 16, generator=g), torch.randn(2, kv_heads, 200, 16, generator=g)
    k[:, :, 70:], v[:, :, 70:] = 4 * q[:, ::heads // kv_heads].sign(), 1e4  # logits ~ 10 above the others
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    assert read_end(70, k) > 70                                                    # rows past the span are read
    out, last_row = decode_attention(q, k, v, [(0, 7), (19, 70)])
    joined_k, joined_v = torch.cat([k[:, :, :7], k[:, :, 19:70]], 2), torch.cat([v[:, :, :7], v[:, :, 19:70]], 2)
    logits = naive_logits(q, joined_k)                                             # (2, H, 1, 58) float64
    expected = logits.softmax(-1) @ joined_v.double().repeat_interleave(heads // kv_heads, dim=1)
    # Rounding's bounds in each dtype (this code measured: bf16 mean 0.9e-3, largest 5.7e-3, lse 2.4e-3; fp16
    # 7e-5, 3e-4, 1.7e-4): an error that is not rounding, as the output scaled by 1.02 (mean error 3e-3) or
    # an lse rounded to bf16 (1.3e-2), does not fit them.
    # The probabilities read from the logits: largest relative error measured 9.4e-3 in bf16, 1.6e-3 in fp16.
    bound = {torch.bfloat16: dict(mean=2e-3, most=1.2e-2, lse=5e-3, probs=1.5e-2),
             torch.float16: dict(mean=2e-4, most=1.5e-3, lse=5e-4, probs=3e-3)}
    error = (out.double() - expected).abs()
    assert error.mean() <= bound[dtype]["mean"] and error.max() <= bound[dtype]["most"], (error.mean(), error.max())
    torch.testing.assert_close(last_row.lse.double(), logits[:, :, 0].logsumexp(-1), atol=bound[dtype]["lse"], rtol=0)
    assert [(start, span.shape[-1]) for start, span in last_row.span_logits] == [(0, 7), (19, 51)]
    probs = logits.softmax(-1)[:, :, 0]                                            # (2, H, 58): joined columns
    for start, end, columns in ((19, 70, slice(7, 58)), (60, 70, slice(48, 58)), (0, 7, slice(0, 7))):
        torch.testing.assert_close(last_row.probs(q, k, start, end).double(), probs[..., columns], atol=1e-6,
                                   rtol=bound[dtype]["probs"])


@pytest.mark.parametrize("policy", ["full", "avl", "h2o"])
def test_bf16_decode_on_a_cpu_meets_a_new_shape_once_a_bucket_and_reads_no_uninitialised_room(monkeypatch, policy):
    """The point of `read_end`: over 100 bf16 decode steps, whose held rows grow (or, evicting, move) by
    a row a step, the products meet a handful of row counts, not one per step; and the tokens are those
    of exact reads (`read_end` replaced by the span's end). The rows past the held ones that it reads must
    be zeros or rows once held, never memory as allocated: with every new buffer allocated full of NaN,
    as uninitialised memory may be, the tokens are the same again."""
    import tinyavl.cache as cache_module
    torch.manual_seed(0)
    model = build_model(2, 4, 42, 7, "full", seed=11).to(torch.bfloat16)
    ids, pixel_values = make_prompt(model, 3, 30, seed=0)
    row_counts = []
    last_row_logits = cache_module.last_row_logits

    def counting(q, k):
        row_counts.append(k.shape[2])
        return last_row_logits(q, k)

    monkeypatch.setattr(cache_module, "last_row_logits", counting)
    tokens, _ = tinyavl.generate(model, ids, pixel_values.bfloat16(), max_new_tokens=100, eos_token_id=(),
                                 policy=policy)
    # Prefill and decode: 2-6 row counts here; 45-99 when every step reads its rows exactly.
    assert len(set(row_counts)) <= 6, sorted(set(row_counts))
    monkeypatch.setattr(cache_module, "last_row_logits", last_row_logits)
    monkeypatch.setattr(cache_module, "read_end", lambda end, k: end)
    exact, _ = tinyavl.generate(model, ids, pixel_values.bfloat16(), max_new_tokens=100, eos_token_id=(),
                                policy=policy)
    assert len(set(exact)) > 3 and tokens == exact
    monkeypatch.undo()

    new_empty = torch.Tensor.new_empty

    def nan_filled(self, *size, **kwargs):
        t = new_empty(self, *size, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled)
    assert tinyavl.generate(model, ids, pixel_values.bfloat16(), max_new_tokens=100, eos_token_id=(),
                            policy=policy)[0] == tokens
    # A cache begun without room for the answer grows its buffers as it goes (`append`): zeroed room too.
    _, fed = run_steps(model, ids, pixel_values.bfloat16(), make_cache(policy), 99)
    assert fed == tokens[:99]


@pytest.mark.parametrize("keys_first", [True, False])
@pytest.mark.parametrize("heads,kv_heads,rows", [(4, 4, 1), (8, 2, 1), (4, 4, 3), (8, 2, 3)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rows_logits_equal_float64_in_either_form(monkeypatch, keys_first, heads, kv_heads, rows, dtype, tolerance):
    """rows_logits gives the float64 scaled logits, contiguous and in fp32, whichever product the machine's
    timing chose (k q^T or q k^T), for one decode row or several scored rows, with and without GQA, on
    keys that are a view of a longer buffer as the cache holds them."""
    import tinyavl.model as model
    monkeypatch.setattr(model, "keys_first", lambda device_type, dtype: keys_first)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, heads, rows, 16, generator=g).to(dtype)
    k = torch.randn(2, kv_heads, 40, 16, generator=g).to(dtype)[:, :, :29]         # the first 29 rows of 40
    logits = model.rows_logits(q, k)
    assert logits.dtype == torch.float32 and logits.shape == (2, heads, rows, 29) and logits.is_contiguous()
    torch.testing.assert_close(logits.double(), naive_logits(q, k), atol=tolerance, rtol=0)


@pytest.mark.parametrize("faster", ["k q^T", "q k^T"])
def test_keys_first_keeps_the_faster_product(monkeypatch, faster):
    """keys_first keeps the product its timing found faster: here the timer says so (k q^T's result is a
    column per head, q k^T's a row)."""
    import tinyavl.model as model
    def timed(product, repeats):
        form = "k q^T" if product().shape[-1] == 1 else "q k^T"
        return 1.0 if form == faster else 2.0
    monkeypatch.setattr(model, "best_seconds", timed)
    model.faster_keys_first.cache_clear()
    try:
        assert model.keys_first("cpu", torch.float32) is (faster == "k q^T")
    finally:
        model.faster_keys_first.cache_clear()  # the next caller times the real products again


def test_keys_first_is_timed_once_per_dtype_and_leaves_the_random_seed_alone():
    """The choice of product is made once per (device, dtype), on a CPU by timing, without drawing from
    the global random generator (a sampled answer must not depend on it); CUDA always takes q k^T."""
    faster_keys_first.cache_clear()
    state = torch.get_rng_state()
    choice = keys_first("cpu", torch.float32)
    assert isinstance(choice, bool) and torch.equal(torch.get_rng_state(), state)
    assert keys_first("cpu", torch.float32) is choice and faster_keys_first.cache_info().misses == 1
    assert keys_first("cuda", torch.float32) is False


@pytest.mark.parametrize("faster", ["k q^T", "q k^T"])
def test_under_deterministic_algorithms_a_cpu_takes_k_q_t_whatever_the_timing(monkeypatch, faster):
    """A training (the toys', in deterministic_algorithms) must give the same weights on every machine:
    no timing chooses its products. CUDA keeps q k^T."""
    import tinyavl.model as model
    monkeypatch.setattr(model, "faster_keys_first", lambda dtype: faster == "k q^T")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert model.keys_first("cpu", torch.float32) is True and model.keys_first("cpu", torch.bfloat16) is True
        assert model.keys_first("cuda", torch.float32) is False
    finally:
        torch.use_deterministic_algorithms(before)
    assert model.keys_first("cpu", torch.float32) is (faster == "k q^T")


@pytest.mark.parametrize("every_head_at_once", [False, True])  # a CPU's way and a GPU's, both run here
def test_rerank_core_moves_only_the_rows_that_change_role(monkeypatch, every_head_at_once):
    """rerank_core against a hand-made block: the new core is the top n_core by score, a row that stays
    in the core (or out of it) keeps its slot, and a re-rank that keeps the core moves nothing."""
    import tinyavl.cache
    monkeypatch.setattr(tinyavl.cache, "swaps_every_head_at_once", lambda buffer: every_head_at_once)
    cache = AVLCache(S=0.6, C=0.3, P=1)
    cache.begin(1, 1, 10)               # 1 sys row, 6 secondary image rows, 3 of them core
    k = torch.arange(12.).view(1, 1, 12, 1).expand(1, 2, 12, 3).contiguous()  # row i's key holds i
    cache.append(0, k, k.clone(), torch.arange(12))
    block = lambda: cache.pos[0][0, 0, 1:7].tolist()  # noqa: E731
    assert block() == [1, 2, 3, 4, 5, 6]
    cache.rerank_core(0, torch.tensor([0.3, 0.2, 0.1, 0.0, 0.0, 0.0]))   # the core's own rows win
    assert block() == [1, 2, 3, 4, 5, 6]
    # Slots 0 and 2 (rows 1, 3) leave, slots 4 and 5 (rows 5, 6) enter: 1 <-> 5, 3 <-> 6; 2 and 4 stay.
    cache.rerank_core(0, torch.tensor([0.0, 0.5, 0.0, 0.1, 0.4, 0.3]))
    assert block() == [5, 2, 6, 4, 1, 3]
    for buffer in (cache.k[0], cache.v[0]):  # keys and values moved with their positions, in every head
        assert torch.equal(buffer[0, :, :, 0], cache.pos[0][0].float())


def test_contiguous_runs_by_hand():
    assert contiguous_runs(torch.tensor([0, 1, 2, 7, 8])) == [(0, 3), (7, 9)]
    assert contiguous_runs(torch.tensor([4])) == [(4, 5)]
    assert contiguous_runs(torch.tensor([1, 3, 5])) == [(1, 2), (3, 4), (5, 6)]
    assert contiguous_runs(torch.arange(2, 12)) == [(2, 12)]


class SkipsABlock(KVCache):
    """A policy written as chapter 2 invites: it overrides rows_to_attend only, and keeps the base compute.
    Decode steps skip rows 4-9 of every layer; each update records what the step's LastRow says about
    some of the rows it attended, with the query and the keys it was computed from."""

    name = "skips_a_block"

    def begin(self, n_layers, n_sys, n_img, max_decode_steps=0):
        super().begin(n_layers, n_sys, n_img, max_decode_steps)
        self.seen = []

    def rows_to_attend(self, layer):
        if self.step == 0:
            return None
        n = self.k[layer].shape[2]
        return torch.cat([torch.arange(4), torch.arange(10, n)])

    def update(self, layer, q, last_row):
        if self.step > 0:
            k = self.k[layer]
            self.seen.append((q.clone(), k.clone(), {(start, end): last_row.probs(q, k, start, end)
                                                     for start, end in ((0, 4), (10, 14), (10, k.shape[2]))}))


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_a_policy_that_only_selects_rows_gets_its_last_row_numbered_as_the_cache(name):
    """The base compute reads the selected rows where they lie: LastRow.probs(start, end) are the
    probabilities of the cache's rows start .. end - 1 (a float64 softmax over the selected rows), not of
    a gathered copy's, and the output is the masked reference's."""
    m = model(name)
    ids, pixel_values = prompt(name)
    tokens, _ = tinyavl.generate(m, ids, pixel_values, max_new_tokens=4, eos_token_id=(), policy=SkipsABlock())
    masked_tokens, _ = tinyavl.generate(m, ids, pixel_values, max_new_tokens=4, eos_token_id=(),
                                        policy=masked(SkipsABlock)())
    assert tokens == masked_tokens
    cache = SkipsABlock()
    tinyavl.generate(m, ids, pixel_values, max_new_tokens=4, eos_token_id=(), policy=cache)
    assert len(cache.seen) == 3 * m.config.text.num_hidden_layers
    for q, k, probs in cache.seen:
        logits = naive_logits(q, k)[:, :, 0]                                       # (1, H, n) float64
        logits[..., 4:10] = float("-inf")                                          # the rows skipped
        for (start, end), row_probs in probs.items():
            torch.testing.assert_close(row_probs.double(), logits.softmax(-1)[..., start:end], atol=1e-6, rtol=0)


def test_rows_at_the_prefill_and_several_tokens_after_it_are_refused():
    """The prefill attends causally to the whole prompt (a policy's rows there would be attended wrongly),
    and a decode step takes one token: two at once would need a causal mask against the cache."""
    m = model("mha")
    ids, pixel_values = prompt("mha")

    class RowsAtPrefill(KVCache):
        def rows_to_attend(self, layer):
            return torch.arange(self.k[layer].shape[2] - 1)

    with pytest.raises(ValueError, match="must return None at the prefill"):
        tinyavl.generate(m, ids, pixel_values, max_new_tokens=2, policy=RowsAtPrefill())
    cache = KVCache()
    cache.begin(m.config.text.num_hidden_layers, *image_segments(ids, m.config.image_token_id))
    with torch.inference_mode():
        m(ids, pixel_values, cache=cache)
        with pytest.raises(ValueError, match="a decode step takes one token, got 2"):
            m(torch.tensor([[5, 6]]), cache=cache)


def test_a_parameter_without_bounds_takes_any_number_of_its_type():
    free = Param("width", 8, "any width")
    assert free.check(-3) == -3 and free.allowed() == "any integer"
    with pytest.raises(UserError, match="width must be an integer"):
        free.check(2.5)
    below = Param("gain", 0.5, "a gain", high=1, ends="[)")
    assert below.check(-7.0) == -7.0 and below.allowed() == "< 1"
    with pytest.raises(UserError, match="gain must be < 1, got 1"):
        below.check(1)
