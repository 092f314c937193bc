"""The generation loop: cached decode == uncached forward, sampling, EOS, the context limit, statistics, bf16.

References are independent of the code under test: the uncached causal forward over the whole sequence
(no cache, no last_only), a hand-written nucleus rule on a hand-made distribution, the KV-cache size from the
variant's shape (tests/tiny_checkpoints.py) and a hand formula, and transformers' own bf16 error.
"""
import copy
import inspect
import math
import sys
import time
import types

import numpy as np
import pytest
import torch

import tinyavl
from tinyavl.errors import UserError
from tinyavl.generate import GENERATION_PARAMS, generation, id_set, sample
from tiny_checkpoints import VARIANTS, make_image, sparse_config, tokenizer_info, write_checkpoint

STEPS = 12
CACHE_ATOL = 1e-5   # fp32 cached vs uncached: only the summation order differs
QUESTION = "What colour is the circle on the left?"
TEXT_ONLY = "The sky is blue and the sun is"
HEAD_DIM = 64 // 4  # every tiny variant: text hidden 64, 4 query heads


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    """variant name -> (fp32 tinyavl model, processor), loaded once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tinyavl.load_pretrained(tiny_ckpt.folder(name), device="cpu", dtype="float32")
        return cache[name]

    return get


def prompt_inputs(processor, case: str):
    """(input_ids [1, T], pixel_values or None) for an image prompt or a text-only prompt."""
    if case == "image":
        out = processor(processor.chat_prompt(QUESTION), make_image(45, 30, seed=0))
        assert out["pixel_values"] is not None
    else:
        out = processor(processor.chat_prompt(TEXT_ONLY, has_image=False))
        assert out["pixel_values"] is None
    return out["input_ids"], out["pixel_values"]


class Recorder:
    """Wraps a model and records the next-token logits of every forward pass `generate` makes."""

    def __init__(self, model):
        self.model = model
        self.logits = []   # one (vocab,) fp32 row per forward pass
        self.calls = []    # (T of input_ids, pixel_values given?)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, input_ids, pixel_values=None, **kwargs):
        out = self.model(input_ids, pixel_values, **kwargs)
        self.logits.append(out[0, -1].detach().float().clone())
        self.calls.append((input_ids.shape[1], pixel_values is not None))
        return out


def greedy(model, ids, px, steps=STEPS, **kwargs):
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=steps, temperature=0.0, eos_token_id=(),
                                     **kwargs)
    return tokens, stats


def top2_gap(logits):
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


# ------------------------------------------------------------------------------ cached decode == uncached
@pytest.mark.parametrize("case", ["image", "text_only"])
@pytest.mark.parametrize("name", ["mha", "gqa_full", "mqa_rope"])
def test_cached_decode_equals_uncached_forward(loaded, name, case):
    model, processor = loaded(name)
    ids, px = prompt_inputs(processor, case)
    T = ids.shape[1]
    rec = Recorder(model)
    tokens, stats = greedy(rec, ids, px)
    assert len(tokens) == STEPS and stats.new_tokens == STEPS and stats.prompt_tokens == T
    # One prefill over the whole prompt (with the image), then one single-token step per new token but the last.
    assert rec.calls == [(T, px is not None)] + [(1, False)] * (STEPS - 1)

    with torch.no_grad():
        full = model(torch.cat([ids, torch.tensor([tokens])], dim=1), px)[0].float()  # (T + STEPS, vocab)
    ref = full[T - 1:T - 1 + STEPS]   # the logits that predict each generated token
    cached = torch.stack(rec.logits)  # (STEPS, vocab)
    gaps = top2_gap(ref)
    # Each greedy choice must be decisive at fp32 accuracy, or the token comparison would test rounding noise.
    assert gaps.min() > 100 * CACHE_ATOL, gaps
    assert ref.argmax(-1).tolist() == tokens, "the uncached forward picks other greedy tokens"
    diff = (cached - ref).abs()
    print(f"\n[cache] {name} {case} T={T} max|cached - uncached| = {diff.max():.2e}")
    assert diff.max() <= CACHE_ATOL, f"step {int(diff.amax(-1).argmax())}: {diff.max():.3e}"


def rows_before_the_image(ids) -> int:
    """The prompt's tokens before its first image token, read off the ids: the sys rows of a cache."""
    return int((ids[0] == tokenizer_info()["image_token_id"]).nonzero()[0])


def test_explicit_kv_cache_loop_equals_uncached_forward(loaded):
    """The same check driving `KVCache` by hand: begin, prefill with last_only, then one token per step."""
    from tinyavl.cache import KVCache

    model, processor = loaded("gqa_full")
    ids, px = prompt_inputs(processor, "image")
    T, n_img = ids.shape[1], VARIANTS["gqa_full"].num_image_tokens
    n_sys = rows_before_the_image(ids)
    cache = KVCache()
    cache.begin(VARIANTS["gqa_full"].text_layers, n_sys, n_img)
    step_logits, token_ids = [], []
    with torch.no_grad():
        logits = model(ids, px, cache=cache, last_only=True)
        assert logits.shape == (1, 1, tokenizer_info()["vocab_size"])
        for _ in range(STEPS):
            step_logits.append(logits[0, -1])
            token_ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[token_ids[-1]]]), cache=cache, last_only=True)
        full = model(torch.cat([ids, torch.tensor([token_ids])], dim=1), px)[0]
    assert cache.next_pos == T + STEPS
    assert (torch.stack(step_logits) - full[T - 1:T - 1 + STEPS]).abs().max() <= CACHE_ATOL
    assert token_ids == greedy(model, ids, px)[0]


# ------------------------------------------------------------------------------ sampling
def test_same_seed_same_tokens_different_seed_different_tokens(loaded):
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")

    def sampled(seed, global_seed):
        torch.manual_seed(global_seed)  # the run's own seed must decide, not the global RNG state
        tokens, _ = tinyavl.generate(model, ids, px, max_new_tokens=STEPS, temperature=5.0, top_p=1.0, seed=seed,
                                     eos_token_id=())
        return tokens

    a, b = sampled(0, global_seed=123), sampled(0, global_seed=456)
    assert a == b
    c = sampled(1, global_seed=123)
    # At temperature 5 the distribution over ~450 tokens is flat: 12 equal draws by chance are impossible.
    assert c != a
    assert len(a) == len(c) == STEPS
    assert a != greedy(model, ids, px)[0]


def test_every_token_is_drawn_from_its_own_steps_logits_with_the_settings_given(loaded):
    """Replayed by hand: each step's recorded logits through `sample` (tested on its own, below) with one
    generator seeded as given, in order, draw the tokens generate drew: the prefill's and every decode
    step's at the same temperature, top-k and top-p."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    recorder = Recorder(model)
    tokens, _ = tinyavl.generate(recorder, ids, px, max_new_tokens=STEPS, temperature=3.0, top_k=40, top_p=0.8,
                                 seed=11, eos_token_id=())
    generator = torch.Generator().manual_seed(11)
    assert tokens == [sample(logits, 3.0, 40, 0.8, generator) for logits in recorder.logits]


def test_unseeded_draws_are_fresh(loaded):
    """seed None: each generation draws anew (at temperature 5 the same 12 tokens twice are out of the question)."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    runs = [tinyavl.generate(model, ids, px, max_new_tokens=STEPS, temperature=5.0, eos_token_id=())[0]
            for _ in range(2)]
    assert runs[0] != runs[1]


def test_tiny_top_p_is_greedy(loaded):
    model, processor = loaded("gqa_full")
    ids, px = prompt_inputs(processor, "image")
    ref, _ = greedy(model, ids, px)
    for seed in (0, 1):
        tokens, _ = tinyavl.generate(model, ids, px, max_new_tokens=STEPS, temperature=1.0, top_p=1e-6, seed=seed,
                                     eos_token_id=())
        assert tokens == ref


def nucleus_reference(probs, temperature, top_p):
    """The nucleus, by hand: sort p^(1/temperature) (normalised) and keep the smallest prefix with mass >= top_p."""
    scaled = [p ** (1 / temperature) for p in probs]
    scaled = [p / sum(scaled) for p in scaled]
    order = sorted(range(len(probs)), key=lambda i: -scaled[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += scaled[i]
        if mass >= top_p:
            break
    total = sum(scaled[i] for i in kept)
    return {i: scaled[i] / total for i in kept}


# probs are given out of order, so the rule must sort; no top_p sits on a cumulative-mass boundary.
NUCLEUS_CASES = [
    # probs                    temperature top_p  -> allowed indices
    ([0.15, 0.5, 0.05, 0.3],   1.0,        0.7),   # {1, 3}: 0.5 < 0.7 <= 0.8
    ([0.15, 0.5, 0.05, 0.3],   1.0,        0.45),  # {1}: the first token alone already reaches 0.45
    ([0.15, 0.5, 0.05, 0.3],   1.0,        0.9),   # {1, 3, 0}
    ([0.15, 0.5, 0.05, 0.3],   1.0,        1.0),   # all four
    ([0.15, 0.5, 0.05, 0.3],   0.5,        0.6),   # temperature first: p^2 -> 0.685 for index 1 alone
    ([0.15, 0.5, 0.05, 0.3],   2.0,        0.7),   # temperature first: p^0.5 -> {1, 3, 0} (0.673 < 0.7)
]


@pytest.mark.parametrize("probs,temperature,top_p", NUCLEUS_CASES)
def test_sample_nucleus_rule(probs, temperature, top_p):
    expected = nucleus_reference(probs, temperature, top_p)
    logits = torch.tensor(probs, dtype=torch.float32).log()
    g = torch.Generator().manual_seed(0)
    n = 4000
    draws = [sample(logits, temperature, 0, top_p, g) for _ in range(n)]
    assert_drawn_as(draws, expected)


def assert_drawn_as(draws, expected: dict):
    """The tokens drawn are those `expected` gives probability ({token: p}), each as often as p says: within
    5 binomial standard deviations."""
    n = len(draws)
    counts = {i: draws.count(i) for i in set(draws)}
    assert set(counts) == set(expected), (counts, expected)
    for i, p in expected.items():
        assert abs(counts[i] / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (i, counts[i] / n, p)


# logits with a tie at the k-th place (two tokens at 1.0 for k = 2 and 3), temperatures, top-k (0: off, or
# past the vocabulary), top-p.
TOP_K_CASES = [
    ([2.0, 1.0, 1.0, 0.0, -0.5, 0.5], 1.0, 2, 1.0),
    ([2.0, 1.0, 1.0, 0.0, -0.5, 0.5], 1.0, 3, 1.0),
    ([2.0, 1.0, 1.0, 0.0, -0.5, 0.5], 0.7, 4, 0.8),
    ([0.3, 1.2, -0.4, 0.9, 0.0, 1.1], 2.0, 3, 0.7),
    ([0.3, 1.2, -0.4, 0.9, 0.0, 1.1], 1.5, 0, 0.9),
    ([0.3, 1.2, -0.4, 0.9, 0.0, 1.1], 1.5, 10, 1.0),
    # top-p measures the mass top-k kept: two of the three reach 0.6 of it (of all six, three would be needed).
    ([1.0, 0.99, 0.98, 0.5, 0.4, 0.3], 1.0, 3, 0.6),
]


@pytest.mark.parametrize("logits, temperature, top_k, top_p", TOP_K_CASES)
def test_sample_draws_from_transformers_temperature_top_k_and_top_p(logits, temperature, top_k, top_p):
    """The distribution transformers' generate samples from, made by its own warpers in its order
    (temperature, top-k, top-p; top_k 0 leaves no TopKLogitsWarper, as generate adds none then). No case puts
    tied tokens across the nucleus' edge, where the two keep different ones of them (README)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
    scores = torch.tensor([logits], dtype=torch.float64)
    for warper in warpers + [TopPLogitsWarper(top_p)]:
        scores = warper(None, scores)
    probs = scores.softmax(-1)[0]
    expected = {i: float(p) for i, p in enumerate(probs) if p > 0}
    g = torch.Generator().manual_seed(0)
    assert_drawn_as([sample(torch.tensor(logits), temperature, top_k, top_p, g) for _ in range(4000)], expected)


@pytest.mark.parametrize("temperature,top_p", [(1e-45, 1.0), (5e-324, 1.0), (1.0, 1e-300)])
def test_sample_at_extreme_settings_takes_the_top_token(temperature, top_p):
    """A temperature near 0 is greedy in the limit, and a top_p near 0 keeps the first token alone."""
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, temperature, 50, top_p, g) for _ in range(50)} == {1}


def test_sample_greedy_at_temperature_zero_and_seeded_reproducibility():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert sample(logits, 0.0, 50, 1.0, None) == 1
    assert sample(logits, 0.0, 1, 0.01, torch.Generator().manual_seed(0)) == 1
    a = [sample(logits, 1.0, 50, 1.0, g) for g in [torch.Generator().manual_seed(7)] for _ in range(50)]
    b = [sample(logits, 1.0, 50, 1.0, g) for g in [torch.Generator().manual_seed(7)] for _ in range(50)]
    assert a == b and len(set(a)) > 1


# ------------------------------------------------------------------------------ EOS
def test_eos_stops_generation_right_after_it(loaded):
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    ref, _ = greedy(model, ids, px)
    assert len(ref) == STEPS

    # EOS = the first greedy token: exactly one token, and no decode step.
    streamed = []
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=STEPS, eos_token_id=ref[0], stream=streamed.append)
    assert tokens == [ref[0]] == streamed
    assert stats.new_tokens == 1 and stats.decode_tokens_per_second is None

    # EOS = a later token that does not occur before it: stop right after its first occurrence, EOS included.
    k = next(i for i in range(2, STEPS) if ref[i] not in ref[:i])
    streamed = []
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=STEPS, eos_token_id=ref[k], stream=streamed.append)
    assert tokens == ref[:k + 1] == streamed
    assert tokens[-1] == ref[k] and stats.new_tokens == k + 1

    # An EOS that never comes: all max_new_tokens.
    never = tokenizer_info()["vocab_size"] + 5
    assert tinyavl.generate(model, ids, px, max_new_tokens=STEPS, eos_token_id=never)[0] == ref


def test_generation_stops_at_the_models_eos_by_default(loaded):
    """Without eos_token_id, the model's own EOS (config.text.eos_token_id) ends the answer, as in transformers;
    () never stops early. finish_reason says which limit ended it."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    ref, stats = greedy(model, ids, px)
    assert stats.finish_reason == "length"
    k = next(i for i in range(2, STEPS) if ref[i] not in ref[:i])
    model = copy.copy(model)  # a shallow copy: the same weights, a config of its own
    model.config = copy.deepcopy(model.config)
    model.config.text.eos_token_id = ref[k]
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=STEPS)
    assert tokens == ref[:k + 1] and stats.finish_reason == "eos"
    # EOS as the last token allowed: the answer ended, it was not cut.
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=k + 1)
    assert tokens == ref[:k + 1] and stats.finish_reason == "eos"
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=STEPS, eos_token_id=())
    assert tokens == ref and stats.finish_reason == "length"
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=STEPS, eos_token_id=[ref[1], ref[k]])
    assert tokens == ref[:2] and stats.finish_reason == "eos"
    # config.json may list several EOS ids (transformers takes an int or a list), or none (null).
    model.config.text.eos_token_id = [ref[1], ref[k]]
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=STEPS)
    assert tokens == ref[:2] and stats.finish_reason == "eos"
    model.config.text.eos_token_id = None
    tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=STEPS)
    assert tokens == ref and stats.finish_reason == "length"


class NonFinite(Recorder):
    """Wraps a model whose logits turn NaN (or +inf) from forward pass `at` on."""

    def __init__(self, model, at: int, value: float):
        super().__init__(model)
        self.at, self.value = at, value

    def __call__(self, input_ids, pixel_values=None, **kwargs):
        out = super().__call__(input_ids, pixel_values, **kwargs)
        return out.fill_(self.value) if len(self.calls) > self.at else out


@pytest.mark.parametrize("at,value", [(0, float("nan")), (3, float("inf"))])
def test_non_finite_logits_stop_generation_with_a_clear_error(loaded, at, value):
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    with pytest.raises(UserError, match=f"NaN or infinite at step {at}"):
        greedy(NonFinite(model, at, value), ids, px)


def test_sample_nucleus_boundary_keeps_the_prefix_that_exactly_reaches_top_p():
    """Four equal tokens, top_p 0.5: the first two reach 0.5 exactly, so exactly two tokens are ever drawn
    (a rule that needs the mass to exceed top_p would keep three), those with the lowest ids (README)."""
    logits = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, 1.0, 0, 0.5, g) for _ in range(2000)]
    assert set(draws) == {0, 1}
    assert abs(draws.count(draws[0]) / len(draws) - 0.5) < 0.05


def test_sample_keeps_the_lowest_ids_of_tokens_tied_across_the_nucleus_edge():
    """150 tied tokens above 50 others: the nucleus ends inside the tie, and keeps its lowest ids (torch's
    default sort puts long runs of ties in no fixed order)."""
    logits = torch.cat([torch.zeros(150), torch.full((50,), -1.0)])
    p_tied = 1 / (150 + 50 * math.exp(-1))                    # each tied token's probability
    n_kept = math.ceil(0.5 / p_tied)                          # the fewest tied tokens whose mass reaches 0.5
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, 1.0, 0, 0.5, g) for _ in range(3000)]
    assert n_kept == 85 and set(draws) == set(range(n_kept))


# ------------------------------------------------------------------------------ context limit
CONTEXT = 40


@pytest.fixture(scope="module")
def short_context_model(tiny_ckpt, tmp_path_factory):
    """The mha checkpoint with max_position_embeddings = CONTEXT in its config.json."""
    config = sparse_config(VARIANTS["mha"])
    config["text_config"]["max_position_embeddings"] = CONTEXT
    folder = write_checkpoint(tiny_ckpt.model("mha"), str(tmp_path_factory.mktemp("ctx40")), variant="mha",
                              config=config)
    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    assert model.config.text.max_position_embeddings == CONTEXT
    return model, processor


def text_ids(length: int):
    """A text-only prompt of exactly `length` ids: BOS then ordinary tokens."""
    return torch.tensor([[tokenizer_info()["bos_token_id"]] + [300 + i % 100 for i in range(length - 1)]])


def test_generation_stops_at_the_context(short_context_model, loaded):
    model, processor = short_context_model
    ids, px = prompt_inputs(processor, "image")
    T = ids.shape[1]
    assert T < CONTEXT - 2
    tokens, stats = greedy(model, ids, px, steps=CONTEXT)  # asks for more than fits
    assert T + len(tokens) == CONTEXT and stats.new_tokens == CONTEXT - T and stats.finish_reason == "context"
    # The tokens are those of the same weights with the default (4096) context: nothing else changed.
    assert tokens == greedy(loaded("mha")[0], ids, px, steps=CONTEXT - T)[0]

    # Text-only: a prompt one short of the context leaves room for exactly one token.
    tokens, stats = greedy(model, text_ids(CONTEXT - 1), None, steps=5)
    assert len(tokens) == 1 and stats.decode_tokens_per_second is None
    tokens, _ = greedy(model, text_ids(CONTEXT - 4), None, steps=50)
    assert len(tokens) == 4


@pytest.mark.parametrize("length", [CONTEXT, CONTEXT + 1, CONTEXT + 30])
def test_prompt_at_or_over_the_context_is_a_user_error(short_context_model, length):
    """A prompt that fills the context leaves no row for an answer: the error says how long a prompt can be."""
    model, _ = short_context_model
    with pytest.raises(UserError, match=rf"has {length} tokens, the model's context is {CONTEXT}, prompt and "
                                        rf"answer together: shorten the prompt to at most {CONTEXT - 1} tokens"):
        greedy(model, text_ids(length), None, steps=4)


def test_a_prompt_one_token_under_the_context_has_room_for_one_token(short_context_model):
    model, _ = short_context_model
    tokens, stats = greedy(model, text_ids(CONTEXT - 1), None, steps=4)
    assert len(tokens) == 1 and stats.finish_reason == "context"


def test_a_prompt_over_the_context_because_of_its_image_says_so(short_context_model):
    model, processor = short_context_model
    ids, px = prompt_inputs(processor, "image")
    n_img = int((ids == model.config.image_token_id).sum())
    longer = torch.cat([ids, text_ids(CONTEXT)[:, 1:]], dim=1)                    # text past the context
    with pytest.raises(UserError, match=rf"has {longer.shape[1]} tokens \({n_img} of them the image's\), "
                                        rf"the model's context is {CONTEXT}"):
        greedy(model, longer, px, steps=4)


@pytest.mark.parametrize("context", ["shorter than the image", "the image and what comes before it"])
def test_an_image_past_the_context_on_its_own_is_the_models_sizes(tiny_ckpt, tmp_path, loaded, context):
    """A context the image's own tokens fill, with those before it, or more than fill: no question could be
    shortened to fit, so the error says the image and the tokens before it fill the context, and that
    config.json gives every image as many."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    n_img = int((ids == model.config.image_token_id).sum())
    n_sys = int((ids[0] == model.config.image_token_id).nonzero()[0])                 # the tokens before the image
    length = 8 if context == "shorter than the image" else n_sys + n_img
    assert length <= n_img or length == n_sys + n_img
    config = sparse_config(VARIANTS["mha"])
    config["text_config"]["max_position_embeddings"] = length
    folder = write_checkpoint(tiny_ckpt.model("mha"), str(tmp_path / "ctx"), variant="mha", config=config)
    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    with pytest.raises(UserError, match=rf"the image's {n_img} tokens and the {n_sys} before them fill the model's "
                                        rf"context of {length}: no prompt with this image fits \(the model's "
                                        r"config.json gives every image as many\)"):
        greedy(model, ids, px, steps=2)


def test_image_tokens_without_an_image_are_a_user_error(loaded):
    """The model would embed the image's slots as words and answer about no image at all."""
    model, processor = loaded("mha")
    ids, _ = prompt_inputs(processor, "image")
    n_img = int((ids == model.config.image_token_id).sum())
    with pytest.raises(UserError, match=f"the prompt has {n_img} image tokens but no image"):
        greedy(model, ids, None, steps=2)


def test_generation_defaults_are_the_declared_ones():
    """GENERATION_PARAMS declares main.py's flags; generate's own defaults must be the same."""
    defaults = inspect.signature(generation).parameters
    declared = {param.name: param.default for param in GENERATION_PARAMS}
    assert {name: defaults[name].default for name in declared} == declared


def test_an_image_and_prompt_that_do_not_fit_and_an_empty_prompt_are_user_errors(loaded):
    """A prompt of no tokens (refused before the model runs), an image whose features would have no place
    in the prompt and an image block one token shorter than the image's features (refused by the model's
    embed, which makes them): the caller's mistakes, one UserError each."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    text_only = ids[:, ids[0] != model.config.image_token_id]
    with pytest.raises(UserError, match="the prompt has 0 image tokens, but its images make"):
        greedy(model, text_only, px, steps=2)
    with pytest.raises(UserError, match="input_ids holds no token"):
        greedy(model, ids[:, :0], None, steps=2)
    n_img = int((ids == model.config.image_token_id).sum())
    last_image = int((ids[0] == model.config.image_token_id).nonzero()[-1])
    one_short = torch.cat([ids[:, :last_image], ids[:, last_image + 1:]], dim=1)     # the block one token shorter
    with pytest.raises(UserError, match=f"the prompt has {n_img - 1} image tokens, but its images make {n_img}"):
        greedy(model, one_short, px, steps=2)


def test_token_ids_outside_the_vocabulary_or_not_integers_are_user_errors(loaded):
    """A prompt built by hand: an id past the embedding table or below 0 (an IndexError, a device assert on
    a GPU, before), or ids as floats."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    vocab = model.language_model.model.embed_tokens.num_embeddings
    for bad in (vocab, -3):
        wrong = ids.clone()
        wrong[0, -1] = bad
        with pytest.raises(UserError, match=f"holds the token id {bad}, but the model's vocabulary has ids 0 .. "
                                            f"{vocab - 1}$"):
            greedy(model, wrong, px, steps=2)
    with pytest.raises(UserError, match="input_ids must hold token ids .*, got torch.float32"):
        greedy(model, ids.float(), px, steps=2)
    last = ids.clone()
    last[0, -1] = vocab - 1                                   # the last row of the table is an id like any other
    greedy(model, last, px, steps=2)


def test_bad_generation_arguments_are_user_errors(loaded):
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    for bad in (0, -3):
        with pytest.raises(UserError):
            tinyavl.generate(model, ids, px, max_new_tokens=bad)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(UserError):
            tinyavl.generate(model, ids, px, max_new_tokens=2, temperature=1.0, top_p=bad, seed=0)
    # Arguments of the wrong kind: one line that names the argument, not a TypeError from deep inside.
    for name, bad in [("max_new_tokens", 2.5), ("max_new_tokens", True), ("seed", 1.5), ("temperature", None),
                      ("top_p", float("nan")), ("top_p", "1"), ("eos_token_id", 2.0), ("eos_token_id", [2, None])]:
        with pytest.raises(UserError, match=f"{name} must be"):
            tinyavl.generate(model, ids, px, **{"max_new_tokens": 2, name: bad})
    for bad in (ids[0], ids.expand(2, -1), ids[0].tolist()):     # no batch dim, a batch of two, a list
        with pytest.raises(UserError, match=r"input_ids must be one prompt, a tensor of shape \(1, T\)"):
            tinyavl.generate(model, bad, px, max_new_tokens=2)
    # Seeds: exactly those torch's generators take, -2^63 .. 2^64 - 1 (torch is the reference here).
    for seed in (-2 ** 63, 2 ** 64 - 1):
        torch.Generator().manual_seed(seed)
        tinyavl.generate(model, ids, px, max_new_tokens=1, temperature=1.0, seed=seed)
    for seed in (-2 ** 63 - 1, 2 ** 64):
        with pytest.raises((RuntimeError, ValueError)):   # the version's overflow or range error
            torch.Generator().manual_seed(seed)
        with pytest.raises(UserError, match=r"seed must be in \[-2\^63, 2\^64\)"):
            tinyavl.generate(model, ids, px, max_new_tokens=1, temperature=1.0, seed=seed)
    # What a caller may pass that is not a Python int: numpy's integers.
    tokens, _ = tinyavl.generate(model, ids, px, max_new_tokens=np.int64(2), seed=np.uint32(1), eos_token_id=np.int64(2))
    assert len(tokens) <= 2
    with pytest.raises(UserError, match="eos_token_id must be"):
        tinyavl.generate(model, ids, px, max_new_tokens=2, eos_token_id=b"\x02")   # bytes are ints to Python


def test_eos_ids_come_in_any_collection(loaded):
    """A list, a range, a set, a numpy array or a tensor of ids (or one of them) stops generation at its ids:
    the greedy run stops where its own third token is."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    free, _ = greedy(model, ids, px, steps=6)
    third = free[2]
    assert third not in free[:2]
    for eos in ([third], range(third, third + 1), frozenset({third}), np.array([third]), torch.tensor([third]),
                torch.tensor(third), np.int64(third)):
        tokens, stats = tinyavl.generate(model, ids, px, max_new_tokens=6, eos_token_id=eos)
        assert tokens == free[:3] and stats.finish_reason == "eos", eos


def test_a_prompt_with_two_image_blocks_is_a_user_error(loaded):
    """The policies split a prompt into [sys | image | text]: an image block cut in two is refused."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    image = (ids[0] == model.config.image_token_id).nonzero().flatten()
    cut = ids.clone()
    cut[0, image[len(image) // 2]] = ids[0, 0]                      # one text token (the first) inside the block
    with pytest.raises(UserError, match="one block"):
        tinyavl.generate(model, cut, px, max_new_tokens=2)


def test_policy_is_a_name_with_parameters_or_a_cache_without(loaded):
    """Parameters beside a cache object would be silently ignored (it has its own): a UserError instead."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    with pytest.raises(UserError, match="S"):
        tinyavl.generate(model, ids, px, max_new_tokens=2, policy=tinyavl.make_cache("avl"), S=0.1)
    for bad in (None, tinyavl.cache.AVLCache):
        with pytest.raises(UserError, match="policy"):
            tinyavl.generate(model, ids, px, max_new_tokens=2, policy=bad)


# ------------------------------------------------------------------------------ statistics
def dense_bytes(name: str, rows: int, element_bytes: int) -> int:
    """layers x rows x (K and V) x Hkv x head_dim x bytes per element, from the variant's shape."""
    v = VARIANTS[name]
    return v.text_layers * rows * 2 * v.kv_heads * HEAD_DIM * element_bytes


@pytest.mark.parametrize("name", ["mha", "gqa_full"])
def test_stats_full_policy(loaded, name):
    model, processor = loaded(name)
    ids, px = prompt_inputs(processor, "image")
    T, n = ids.shape[1], 7
    n_img = VARIANTS[name].num_image_tokens
    tokens, stats = greedy(model, ids, px, steps=n)
    steps = n - 1  # decode passes: the last token is produced, never fed back
    assert stats.policy == "full" and stats.policy_params == {}
    assert stats.prompt_tokens == T and stats.new_tokens == len(tokens) == n
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
    assert stats.decode_tokens_per_second > 0
    assert stats.decode_tokens_per_second == pytest.approx(steps / stats.decode_seconds)
    assert stats.kv_cache_bytes_peak == dense_bytes(name, T + steps, 4)
    assert stats.kv_cache_bytes_dense == dense_bytes(name, T + steps, 4)
    assert stats.kv_cache_bytes_after_prefill == stats.kv_cache_bytes_dense_after_prefill == dense_bytes(name, T, 4)
    assert stats.cached_tokens == T + steps
    # Modalities: sys + image + text rows add up; the image holds exactly its n_img rows in every layer.
    per_row = dense_bytes(name, 1, 4)
    assert stats.modality_bytes_after_prefill["image"] == n_img * per_row
    assert sum(stats.modality_bytes_after_prefill.values()) == stats.kv_cache_bytes_after_prefill
    assert sum(stats.modality_bytes_peak.values()) == stats.kv_cache_bytes_peak
    n_sys = rows_before_the_image(ids)
    assert stats.modality_bytes_peak == {"sys": n_sys * per_row, "image": n_img * per_row,
                                         "text": (T + steps - n_sys - n_img) * per_row}
    assert len(stats.layer_bytes_after_prefill) == VARIANTS[name].text_layers
    # Dense attention: step t (1-based) attends T + t rows in every layer.
    layers = VARIANTS[name].text_layers
    expected_attended = sum(layers * (T + t) for t in range(1, steps + 1)) / steps
    assert stats.attended_tokens_per_step == pytest.approx(expected_attended)
    assert stats.attended_tokens_per_step_dense == pytest.approx(expected_attended)
    assert stats.attended_per_layer == [[T + t] * layers for t in range(1, steps + 1)]
    assert stats.prefill_attended_per_layer == [T] * layers


def test_the_logits_product_is_chosen_before_the_clock_starts(loaded, monkeypatch):
    """The one-time timing that picks a decode query's product (model.keys_first, tens of ms) happens before
    generate starts timing the prefill, for the model's device and dtype, so no step's time includes it."""
    generate_module = sys.modules["tinyavl.generate"]  # (tinyavl.generate is also the function's name)
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    events = []
    monkeypatch.setattr(generate_module, "keys_first", lambda device_type, dtype: events.append((device_type, dtype)))
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("clock") or time.perf_counter())
    monkeypatch.setattr(generate_module, "time", clock)
    greedy(model, ids, px, steps=2)
    assert events[:2] == [("cpu", torch.float32), "clock"]


def test_the_prefill_clock_includes_the_high_resolution_view(monkeypatch):
    """prefill_seconds counts the image's features and, for a FlexAttention model, the high-resolution view
    it builds from hires_pixel_values (crops through the tower): on a clock that moves an hour when the view is
    built, the prefill took at least that hour."""
    from test_hires_attention import inputs, tiny_model
    generate_module = sys.modules["tinyavl.generate"]
    clock = types.SimpleNamespace(now=0.0)

    def read():  # a millisecond a reading
        clock.now += 0.001
        return clock.now

    clock.perf_counter = read
    model = tiny_model(first_layer=1)
    build = model.make_hires_view

    def an_hour_to_build(*args, **kwargs):
        clock.now += 3600.0
        return build(*args, **kwargs)

    monkeypatch.setattr(generate_module, "time", clock)
    monkeypatch.setattr(model, "make_hires_view", an_hour_to_build)
    ids, pixels, hires_pixels = inputs()
    _, stats = tinyavl.generate(model, ids, pixels, hires_pixel_values=hires_pixels, max_new_tokens=2,
                                eos_token_id=())
    assert 3600 < stats.prefill_seconds < 3601 and stats.decode_seconds < 1


def test_the_decode_clock_times_the_steps_not_the_stream(loaded, monkeypatch):
    """decode_seconds adds up each decode step's forward pass and token choice (decode_step_seconds, one per
    step), and prefill_seconds is the prompt's and its first token's: a slow stream callback, or the
    statistics kept between steps, are not in them. On a clock that moves a millisecond a reading, half a
    second each time a token is chosen, and an hour each time those others run, whatever the machine's load."""
    generate_module = sys.modules["tinyavl.generate"]  # (tinyavl.generate is also the function's name)
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    def read():
        clock.now += 0.001
        return clock.now
    clock = types.SimpleNamespace(now=0.0, perf_counter=read)

    def an_hour_passes(result=None):
        clock.now += 3600.0
        return result
    def a_slow_choice(*args, choose=generate_module.next_token, **kwargs):
        clock.now += 0.5
        return choose(*args, **kwargs)
    kv_snapshot = generate_module.kv_snapshot
    monkeypatch.setattr(generate_module, "time", clock)
    monkeypatch.setattr(generate_module, "next_token", a_slow_choice)
    monkeypatch.setattr(generate_module, "kv_snapshot", lambda cache: an_hour_passes(kv_snapshot(cache)))
    tokens, stats = greedy(model, ids, px, steps=4, stream=lambda token: an_hour_passes())
    assert len(tokens) == 4 and stats.decode_step_seconds == pytest.approx([0.501] * 3)
    assert stats.prefill_seconds == pytest.approx(0.501)
    assert stats.decode_seconds == pytest.approx(1.503)                  # every step, the first included
    assert stats.decode_tokens_per_second == pytest.approx(3 / 1.503)
    assert clock.now >= 4 * 3600  # the stream and the statistics ran, on the clock


def test_the_cache_reserves_a_row_per_decode_step(loaded):
    """max_new_tokens tokens take max_new_tokens - 1 decode steps (the last token is chosen, never fed back):
    after the prefill the buffers reserve that many rows, and the last step fills them."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    cache = tinyavl.make_cache("full")
    tinyavl.generate(model, ids, px, max_new_tokens=5, eos_token_id=(), policy=cache)
    assert [cache.k_buffer[layer].shape[2] for layer in range(cache.n_layers)] == [ids.shape[1] + 4] * cache.n_layers
    assert cache.reserved_nbytes() == cache.nbytes()


@pytest.mark.parametrize("name, params", [("avl", {}), ("h2o", {}), ("streaming", {}), ("random", {}),
                                          ("fastv", {"filter_layer": 1})])   # the tiny model's 2 layers
def test_each_layer_frees_what_it_evicts_before_the_next_layer_runs(loaded, name, params):
    """A layer's buffers are the prompt's own K and V until its policy has evicted: sized to the rows kept
    (plus the decode steps' room) right after that layer, the buffers of the layers done hold only their kept
    rows, so no more than one layer's whole prompt is ever held, where every layer's at once would be the
    dense cache's bytes."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    cache = tinyavl.make_cache(name, **params)
    attend, held_after_layer = cache.attend, []   # per prefill layer: (K/V buffer bytes, rows it kept)

    def recorded(layer, q, k, v, pos):
        out = attend(layer, q, k, v, pos)
        if cache.step == 0:
            held_after_layer.append((cache.reserved_nbytes(), cache.k[layer].shape[2]))
        return out

    cache.attend = recorded
    tinyavl.generate(model, ids, px, max_new_tokens=3, eos_token_id=(), policy=cache)
    k = cache.k[0]
    row_bytes = 2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()   # a K and a V row, every head
    kept = [rows for _, rows in held_after_layer]
    assert len(kept) == cache.n_layers and min(kept) < ids.shape[1]           # the policy evicted at the prefill
    for layer, (buffer_bytes, _) in enumerate(held_after_layer):
        assert buffer_bytes == sum(rows + cache.max_decode_steps for rows in kept[:layer + 1]) * row_bytes


def test_stats_single_token_has_no_decode_rate(loaded):
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    tokens, stats = greedy(model, ids, px, steps=1)
    assert len(tokens) == 1 and stats.new_tokens == 1
    assert stats.prefill_seconds > 0
    assert stats.decode_tokens_per_second is None
    assert stats.attended_tokens_per_step is None and stats.attended_tokens_per_step_dense is None
    assert stats.kv_cache_bytes_peak == stats.kv_cache_bytes_after_prefill == dense_bytes("mha", ids.shape[1], 4)


def test_stats_two_tokens_has_a_decode_rate(loaded):
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "text_only")
    tokens, stats = greedy(model, ids, px, steps=2)
    assert len(tokens) == 2
    assert stats.decode_tokens_per_second is not None and stats.decode_tokens_per_second > 0
    assert stats.kv_cache_bytes_peak == dense_bytes("mha", ids.shape[1] + 1, 4)


# ------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("name", ["mha", "gqa_full"])
def test_bfloat16_generates_close_to_fp32(tiny_ckpt, loaded, name):
    """bf16 run vs the fp32 run of the same checkpoint, first-token logits.

    Tolerance: bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 2e-3), and rounding errors of the weights
    and every activation compound through the vision tower, projector and decoder, so a fixed absolute bound
    would be a guess. The reference is the error transformers itself makes when the same weights run in bf16
    on the same inputs (its bf16 vs its fp32 logits at the same position); tinyavl may be at most twice that,
    the flash-attention style criterion. Every greedy token must also agree with the fp32 model's choice after
    the same tokens wherever its top-1 / top-2 gap exceeds twice the allowed error (it then cannot flip), and
    some step's must.
    """
    model32, processor = loaded(name)
    model16, processor16 = tinyavl.load_pretrained(tiny_ckpt.folder(name), device="cpu", dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    ids, px = prompt_inputs(processor, "image")
    assert torch.equal(ids, prompt_inputs(processor16, "image")[0])

    rec = Recorder(model16)
    tokens, stats = tinyavl.generate(rec, ids, px, max_new_tokens=6, eos_token_id=())
    assert len(tokens) == 6 and all(0 <= t < tokenizer_info()["vocab_size"] for t in tokens)
    T = ids.shape[1]
    assert stats.kv_cache_bytes_peak == dense_bytes(name, T + 5, 2)  # bf16 K and V: 2 bytes per element

    with torch.no_grad():
        ref32 = model32(ids, px)[0, -1].float()
        hf32 = tiny_ckpt.model(name)
        hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
        hf_ref = hf32(input_ids=ids, pixel_values=px).logits[0, -1].float()
        hf_bf16 = hf16(input_ids=ids, pixel_values=px.to(torch.bfloat16)).logits[0, -1].float()
    ours = rec.logits[0]
    err_ours, err_hf = (ours - ref32).abs().max().item(), (hf_bf16 - hf_ref).abs().max().item()
    print(f"\n[bf16 generate] {name}: max|bf16 - fp32| tinyavl {err_ours:.3f}, transformers {err_hf:.3f} "
          f"(logit std {ref32.std():.2f})")
    assert err_hf > 0  # the reference really ran in bf16
    assert err_ours <= 2 * err_hf
    with torch.no_grad():  # the fp32 model's next-token logits after the prompt and the bf16 run's tokens
        steps32 = model32(torch.cat([ids, torch.tensor([tokens[:-1]])], 1), px)[0, T - 1:].float()   # (6, vocab)
    clear = [step for step in range(6) if top2_gap(steps32[step]) > 2 * 2 * err_hf]
    assert clear, [round(float(top2_gap(row)), 3) for row in steps32]     # a choice clear enough to check
    assert [tokens[step] for step in clear] == [int(steps32[step].argmax()) for step in clear]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_single_non_finite_logit_is_a_clear_error_too(value):
    """One bad logit among finite ones is garbage all the same (argmax takes a NaN as the largest): a UserError."""
    from tinyavl.generate import next_token
    logits = torch.tensor([[[0.5, 2.0, -1.0, 1.0]]])
    logits[0, 0, 2] = value
    with pytest.raises(UserError, match="NaN or infinite at step 3"):
        next_token(logits, 0.0, 50, 1.0, None, step=3)


def test_the_prefill_computes_the_logits_of_the_last_position_only(loaded):
    """Only the last position's logits choose a token: every forward pass, the prefill's too, returns
    (1, 1, vocab), not a row per prompt token (a LLaVA-1.6 prompt's ~2900 image rows x a 32000 vocabulary
    would be ~375 MB of fp32 logits computed for nothing)."""
    model, processor = loaded("mha")
    ids, px = prompt_inputs(processor, "image")
    shapes = []

    class Shapes(Recorder):
        def __call__(self, input_ids, pixel_values=None, **kwargs):
            out = super().__call__(input_ids, pixel_values, **kwargs)
            shapes.append(tuple(out.shape[:2]))
            return out

    greedy(Shapes(model), ids, px, steps=3)
    assert shapes == [(1, 1)] * 3


def test_an_answer_as_long_as_the_room_left_ends_for_its_length(short_context_model):
    """A 36-token prompt in a context of 40 and max_new_tokens 4: every token asked for was made, so
    "length", though the context is full too."""
    model, _ = short_context_model
    tokens, stats = greedy(model, text_ids(CONTEXT - 4), None, steps=4)
    assert len(tokens) == 4 and stats.finish_reason == "length"


def test_int32_ids_generate_as_int64_ids_do(loaded):
    model, processor = loaded("mha")
    ids, pixel_values = prompt_inputs(processor, "image")
    assert greedy(model, ids.int(), pixel_values, steps=4)[0] == greedy(model, ids, pixel_values, steps=4)[0]


def test_a_text_only_prompts_bos_is_its_sys_segment(loaded):
    """No image: BOS alone is sys (one row a layer, by hand), the rest text."""
    model, processor = loaded("mha")
    ids, _ = prompt_inputs(processor, "text_only")
    _, stats = greedy(model, ids, None, steps=2)
    assert stats.modality_bytes_after_prefill["sys"] == dense_bytes("mha", 1, 4)


def test_bytes_are_no_list_of_end_ids():
    with pytest.raises(UserError):
        id_set(b"\x02")        # list(b"\x02") == [2]: bytes must not pass as ids
