"""The contract every registered KV policy keeps, parametrised over tinyavl.cache.POLICIES: a new policy is
tested by registering it (its PARAMS and FULL_BUDGET declared). Which rows it chooses is its own: the
contract checks what it computes over them, and each policy's choice is checked against a ledger
worked out independently in tests/test_cache.py (test_avl_invariants, test_h2o_invariants, ...), which
a new policy needs too.

- with FULL_BUDGET, parameters that keep every token, it is `full` token for token, in fp32 and in bf16
  (where computing the same rows in other pieces would round differently), and attends every row;
- skipping equals masking: its attention over the rows it selects gives the numbers of a float64 attention
  over every row it holds with -inf on the others (tests/cache_helpers.py `masked`); and what it selects
  is rows it holds, ascending, each once, the step's own among them (which the masked reference, built
  from the same selection, cannot see);
- a batch of two prompts decodes each as it decodes alone, or is refused (a policy that ranks one prompt's
  image: ONE_PROMPT_POLICIES);
- at its defaults it never holds more KV bytes than the dense cache, and its bytes per modality are those
  of the positions it holds, placed by the prompt's ids, and add up to its total; no head of any layer holds
  a token twice, and every layer's positions are the sequence's;
- each numeric parameter declares a range, and generation runs at both ends of it (or the value is refused
  in one line);
- its declarations are one source: flags, their types and ranges, and the README's policy table; a flag
  shared by several policies is one SHARED_FLAGS lists.
All but bf16, the batch and the parameters' edges (LLaVA-1.5 only) and the declarations run on a LLaVA-1.5
prompt, on a LLaVA-1.6 one, whose image block (base crop, tile map and the newline tokens that end its rows)
is N_img as a whole, and on a LLaVA-1.5 with one KV head (MQA), where one sample's positions expanded over
the KV heads are a view of the model's own.
"""
import math
from functools import lru_cache
from pathlib import Path

import pytest
import torch

import tinyavl
from cache_helpers import (IMAGE_TOKEN, build_model, make_next_prompt, make_prompt, masked, one_thread,  # noqa: F401
                           recording, run_batch, run_steps)
from tinyavl import cache as cache_module
from tinyavl.cache import POLICIES, make_cache, param_owners
from tinyavl.cli import ArgumentParser, add_policy_arguments, given_policy_params
from tinyavl.errors import UserError
from tinyavl.params import Param

STEPS = 8          # decode steps: A-VL's default K = 3 has update and normal steps among them
LOGIT_ATOL = 1e-5
# Plus a relative part of a few float32 ulps: the two formulations sum in different orders, and on some
# CPUs logits near 8 then differ by 1.0e-5 (seen on main, in the `full` case that evicts nothing).
LOGIT_RTOL = 1e-6
README = Path(__file__).resolve().parent.parent / "README.md"
# The policies that rank one prompt's image and so refuse a batch (the README's Scope says so).
ONE_PROMPT_POLICIES = ("avl", "fastv")


ARCHS = ("llava", "next", "mqa")
CASES = [(arch, policy) for arch in ARCHS for policy in POLICIES]


@lru_cache(maxsize=None)
def model_and_prompt(arch: str):
    """(model, input_ids, pixel_values, image_sizes). 4 layers (A-VL's prefill filter from layer 3 and FastV's
    from layer 2 both act), GQA 4 -> 2, and 30 text tokens: enough for A-VL's text budget (at least 20) to
    evict. llava: prompt [sys 3 | image 37 | text 30]. next: 28 px tiles of 4 x 4 patches, an image of
    40 x 66 px (h x w) on a 2 x 2 tile canvas, whose 8 x 8 map keeps 4 rows once unpadded:
    [sys 3 | image 16 + 4 x (8 + 1) = 52 | text 30]. mqa: llava with one KV head."""
    if arch in ("llava", "mqa"):
        model = build_model(4, 2 if arch == "llava" else 1, 42, 7, "full", seed=11)
        return model, *make_prompt(model, 3, 30, seed=7), None
    model = build_model(4, 2, 28, 7, "default", seed=11, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    return model, *make_next_prompt(model, 3, 30, (40, 66), seed=7)


@lru_cache(maxsize=None)
def generate(arch: str, policy: str, **params):
    """(tokens, stats, the cache) of STEPS + 1 greedy tokens."""
    model, ids, pixel_values, image_sizes = model_and_prompt(arch)
    cache = make_cache(policy, **params)
    tokens, stats = tinyavl.generate(model, ids, pixel_values, image_sizes=image_sizes, max_new_tokens=STEPS + 1,
                                     policy=cache, eos_token_id=())
    return tokens, stats, cache


@lru_cache(maxsize=None)
def uncached_greedy(arch: str) -> list[int]:
    """STEPS + 1 greedy tokens of the cache-free forward, the whole sequence run again for each: the
    reference `full`, and through it every policy at its full budget, must equal."""
    model, ids, pixel_values, image_sizes = model_and_prompt(arch)
    tokens = []
    with torch.inference_mode():
        for _ in range(STEPS + 1):
            sequence = torch.cat([ids, torch.tensor([tokens], dtype=ids.dtype)], dim=1)
            tokens.append(int(model(sequence, pixel_values, image_sizes=image_sizes)[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("arch,policy", CASES)
def test_full_budget_equals_full(arch, policy):
    tokens, stats, _ = generate(arch, policy, **POLICIES[policy].FULL_BUDGET)
    full_tokens, full_stats, _ = generate(arch, "full")
    assert len(set(full_tokens)) > 3  # a sequence that goes somewhere, not one token repeated
    assert full_tokens == uncached_greedy(arch)
    assert tokens == full_tokens
    assert stats.kv_cache_bytes_peak == full_stats.kv_cache_bytes_dense  # nothing evicted either
    assert stats.attended_per_layer == full_stats.attended_per_layer     # nor any row left out of a step


@pytest.mark.parametrize("policy", [name for name in POLICIES if name != "full"])  # `full` is the reference
def test_full_budget_equals_full_in_bf16(policy):
    # bf16 rounds every product: a policy that computed the same rows in two pieces would part from `full`
    # within a few dozen tokens on some prompts (A-VL did, on 14 of 45 prompts of 30 tokens), so several.
    model = build_model(2, 4, 42, 7, "full", seed=11).to(torch.bfloat16)
    for seed in range(4):
        ids, pixel_values = make_prompt(model, 3, 30, seed=seed)
        run = [tinyavl.generate(model, ids, pixel_values.to(torch.bfloat16), max_new_tokens=24, eos_token_id=(),
                                policy=name, **params)[0]
               for name, params in (("full", {}), (policy, POLICIES[policy].FULL_BUDGET))]
        assert len(set(run[0])) > 3
        assert run[1] == run[0], seed


@pytest.mark.parametrize("arch,policy", CASES)
def test_skipping_equals_masking(arch, policy):
    model, ids, pixel_values, image_sizes = model_and_prompt(arch)
    reference, tokens = run_steps(model, ids, pixel_values, masked(POLICIES[policy])(), STEPS, image_sizes=image_sizes)
    logits, _ = run_steps(model, ids, pixel_values, make_cache(policy), STEPS, tokens=tokens, image_sizes=image_sizes)
    torch.testing.assert_close(logits, reference, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("side", [1, 2])
def test_a_prompt_of_image_tokens_alone(policy, side):
    """Ids made by hand (the processor puts BOS first): side x side image tokens and nothing else, no sys, no
    text. Every policy decodes them, skipping equals masking. A-VL at S = 0.5 keeps floor(0.5 N_img) = 0 or 2
    image rows, so its layers hold no row, or only image rows, after the prefill (it once read the newest
    row of a layer it had emptied: IndexError)."""
    model = build_model(4, 2, 7 * side, 7, "default", seed=3)                  # a 7 px patch: side^2 tokens
    ids = torch.full((1, side * side), IMAGE_TOKEN)
    pixel_values = torch.randn(1, 3, 7 * side, 7 * side, generator=torch.Generator().manual_seed(1))
    reference, tokens = run_steps(model, ids, pixel_values, masked(POLICIES[policy])(), STEPS)
    logits, _ = run_steps(model, ids, pixel_values, make_cache(policy), STEPS, tokens=tokens)
    torch.testing.assert_close(logits, reference, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


@pytest.mark.parametrize("arch,policy", CASES)
def test_kv_bytes_within_dense_and_by_modality_as_the_prompt_says(arch, policy):
    """Each layer's bytes per modality equal a count made here of the positions it holds, each placed by the
    prompt's own ids: before the first image token sys, an image token image, the rest text."""
    _, ids, _, _ = model_and_prompt(arch)
    _, stats, cache = generate(arch, policy)
    assert 0 < stats.kv_cache_bytes_peak <= stats.kv_cache_bytes_dense
    # The modalities add up to the total, at the peak and at the end (bytes counted apart from K and V's
    # rows, or rows left out of the count, would part them).
    assert sum(stats.modality_bytes_peak.values()) == stats.kv_cache_bytes_peak
    assert sum(sum(cache.modality_bytes(layer).values()) for layer in range(cache.n_layers)) == cache.nbytes()
    is_image = (ids[0] == IMAGE_TOKEN).tolist()
    first_image = is_image.index(True)
    for layer in range(cache.n_layers):
        k = cache.k[layer]
        head_row_bytes = 2 * k.shape[-1] * k.element_size()               # one head's K and V of one token
        counts = dict.fromkeys(("sys", "image", "text"), 0)
        for p in cache.pos[layer].flatten().tolist():
            counts["image" if p < len(is_image) and is_image[p] else "sys" if p < first_image else "text"] += 1
        assert cache.modality_bytes(layer) == {m: n * head_row_bytes for m, n in counts.items()}, (layer, policy)


@pytest.mark.parametrize("arch,policy", CASES)
def test_every_decode_step_selects_held_rows_once_with_its_own(arch, policy):
    """What select hands compute: None, or ascending rows the layer holds, none twice, and among them every
    head's row of the step's own token (a query always attends to its own key). The masked reference
    builds its mask from the same selection, so it cannot see a selection that breaks these."""
    model, ids, pixel_values, image_sizes = model_and_prompt(arch)
    cache = recording(POLICIES[policy])()
    run_steps(model, ids, pixel_values, cache, STEPS, image_sizes=image_sizes)
    for entry in cache.log:
        if entry["step"] == 0 or entry["rows"] is None:
            continue
        where = (entry["step"], entry["layer"])
        rows, held = entry["rows"].tolist(), entry["pos_before"].shape[2]    # held: rows after the append
        assert rows == sorted(set(rows)) and 0 <= rows[0] and rows[-1] < held, where
        own = int(entry["new_pos"][-1])
        for head_positions in entry["pos_before"][0].tolist():
            assert head_positions.index(own) in rows, where


@pytest.mark.parametrize("budget", ["defaults", "full budget"])
@pytest.mark.parametrize("policy", POLICIES)
def test_a_batch_decodes_each_prompt_as_alone_or_is_refused(policy, budget):
    """Two different prompts decoded together (the same tokens fed to both) give each the logits and the
    kept tokens of that prompt run alone, never sample 0's choices applied to both; or, for a policy that
    ranks one prompt's image (ONE_PROMPT_POLICIES), the batch is refused in one line. (random's fresh cache
    draws the same image tokens for a batch as for each prompt alone.)"""
    model = model_and_prompt("llava")[0]
    params = {} if budget == "defaults" else POLICIES[policy].FULL_BUDGET
    prompts = [make_prompt(model, 3, 30, seed=seed) for seed in (1, 2)]
    ids, pixel_values = (torch.cat(parts) for parts in zip(*prompts))
    tokens = list(range(5, 5 + STEPS))
    together = make_cache(policy, **params)
    try:
        logits = run_batch(model, ids, pixel_values, together, tokens)           # (2, STEPS + 1, vocab)
    except UserError as refusal:
        assert policy in ONE_PROMPT_POLICIES and "one prompt" in str(refusal)
        return
    alones = []
    for i, (prompt_ids, prompt_pixels) in enumerate(prompts):
        alone = make_cache(policy, **params)
        torch.testing.assert_close(logits[i], run_batch(model, prompt_ids, prompt_pixels, alone, tokens)[0],
                                   atol=LOGIT_ATOL, rtol=LOGIT_RTOL)
        for layer in range(alone.n_layers):
            assert torch.equal(together.pos[layer][i].sort(-1).values, alone.pos[layer][0].sort(-1).values)
        alones.append(alone)
    # The accounting of a batch is its prompts': bytes summed, rows per head the mean over the samples.
    assert together.nbytes() == sum(alone.nbytes() for alone in alones)
    assert together.dense_nbytes() == sum(alone.dense_nbytes() for alone in alones) >= together.nbytes()
    for layer in range(together.n_layers):
        rows = [alone.modality_rows(layer) for alone in alones]
        assert together.modality_rows(layer) == pytest.approx({m: (rows[0][m] + rows[1][m]) / 2 for m in rows[0]})


@pytest.mark.parametrize("arch,policy", CASES)
def test_no_head_holds_a_token_twice(arch, policy):
    _, stats, cache = generate(arch, policy)
    length = stats.prompt_tokens + stats.new_tokens - 1  # the last token is sampled, never fed back
    for layer in range(cache.n_layers):
        for head_positions in cache.pos[layer][0].tolist():
            assert len(set(head_positions)) == len(head_positions), (layer, head_positions)
            assert set(head_positions) <= set(range(length))
            assert length - 1 in head_positions  # the newest token, which every policy keeps


# The flags several policies declare, each meaning the same in all of them: a person's judgement, which no
# type or range can make (StreamingLLM's --sinks and a new policy's count of tokens dropped would both be
# integers >= 0). A new policy that shares a flag is added here once it means the same thing.
SHARED_FLAGS = {"S": {"avl", "random"}, "filter_layer": {"avl", "fastv"}, "recent": {"h2o", "streaming"}}


def test_a_flag_means_one_thing():
    """A name declared by several policies is one SHARED_FLAGS lists, with one type and one range in all of
    them (its help may say it in each policy's words), and a policy's FULL_BUDGET names only parameters it
    declares."""
    shared = {name: set(owners) for name, owners in param_owners().items() if len(owners) > 1}
    assert shared == SHARED_FLAGS, "a flag declared by several policies must mean one thing in each: give a new " \
                                   "parameter a name of its own, or list it in SHARED_FLAGS if it means the same"
    for name, owners in param_owners().items():
        assert len({(type(p.default), p.allowed()) for p in owners.values()}) == 1, name
    for policy, cls in POLICIES.items():
        names = [p.name for p in cls.PARAMS]
        assert len(set(names)) == len(names) and set(cls.FULL_BUDGET) <= set(names), policy


def values_at_the_edges(param: Param) -> list:
    """A parameter's closed ends, and for an open end a value just inside it: the values nearest to what it
    refuses."""
    step = 1 if type(param.default) is int else 1e-6
    edges = []
    for end, bound, inward in ((param.ends[0], param.low, step), (param.ends[1], param.high, -step)):
        if bound is not None and math.isfinite(bound):
            edges.append(bound if end in "[]" else bound + inward)
    return edges


@pytest.mark.parametrize("policy", POLICIES)
def test_every_parameter_is_bounded_and_runs_at_its_edges(policy):
    """Each numeric parameter declares the range its policy can run (an undeclared one lets a value through
    that fails deep in a step, or silently keeps nothing), and generation runs at each end of it, within the
    dense cache's bytes. Where another parameter's default rules the value out (A-VL's C <= S <= P), every
    parameter of the same range takes the value too, which keeps such an order."""
    params = POLICIES[policy].PARAMS
    model, ids, pixel_values, _ = model_and_prompt("llava")
    for param in params:
        if param.choices:
            continue
        assert param.low is not None or param.high is not None, f"{policy}'s {param.name} declares no range"
        for value in values_at_the_edges(param):
            try:
                cache = make_cache(policy, **{param.name: value})
            except UserError:
                cache = make_cache(policy, **{p.name: value for p in params if p.allowed() == param.allowed()})
            _, stats = tinyavl.generate(model, ids, pixel_values, max_new_tokens=STEPS, policy=cache, eos_token_id=())
            assert stats.new_tokens == STEPS and stats.kv_cache_bytes_peak <= stats.kv_cache_bytes_dense, \
                (param.name, value)


def test_allowed_values_read_as_written_by_hand():
    """What help texts and error messages print of each kind of range."""
    cases = [(Param("a", 0.5, "h", low=0, high=1, ends="(]"), "in (0, 1]"),
             (Param("a", 0.5, "h", low=0, high=1, ends="[)"), "in [0, 1)"),
             (Param("a", 3, "h", low=1), ">= 1"), (Param("a", 3, "h", low=0, ends="(]"), "> 0"),
             (Param("a", 3, "h", high=9, ends="[)"), "< 9"),
             (Param("a", 0.0, "h", low=0, high=math.inf, ends="[)"), "finite and >= 0"),
             (Param("a", 0.0, "h"), "any number"), (Param("a", 0, "h"), "any integer"),
             (Param("a", "x", "h", choices=("x", "y")), "one of x, y"),
             (Param("a", 0, "h", low=-2 ** 63, high=2 ** 64, ends="[)"), "in [-2^63, 2^64)"),
             (Param("a", 0.0, "h", low=0, high=math.inf), "in [0, inf]"),     # inf allowed: not "finite"
             (Param("a", 0, "h", low=0, high=10 ** 10), "in [0, 10000000000]")]  # no power of two
    assert [param.allowed() for param, _ in cases] == [expected for _, expected in cases]


def test_command_line_flags_come_from_the_declarations(capsys):
    parser = ArgumentParser()
    add_policy_arguments(parser)
    for name, owners in param_owners().items():
        for policy, param in owners.items():  # every default goes through its flag and back
            args = parser.parse_args(["--policy", policy, f"--{name.replace('_', '-')}", str(param.default)])
            assert given_policy_params(args) == {name: param.default}
            make_cache(policy, **given_policy_params(args))
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, owners in param_owners().items():
        # Its own entry only: from its flag to the next flag's (a later entry's text would match too).
        entry = text.split(f"--{name.replace('_', '-')} ", 2)[-1].split(" --", 1)[0]
        for policy, param in owners.items():
            assert param.help in entry and param.allowed() in entry and f"{policy} {param.default}" in entry, name


def readme_policy_defaults() -> dict:
    """The README's "## KV policies" table: {policy: {parameter: default as written}}."""
    section = README.read_text().split("\n## KV policies\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            table[cells[0].strip("`")] = dict(item.split("=") for item in cells[-1].split(", ") if item)
    return table


def test_readme_policy_table_matches_the_registry():
    table = readme_policy_defaults()
    assert list(table) == list(POLICIES)
    for policy, defaults in table.items():
        assert defaults == {name: str(value) for name, value in make_cache(policy).params().items()}, policy


def test_the_cache_modules_list_of_policies_matches_the_registry():
    """tinyavl/cache.py's docstring lists each policy's name and class, in POLICIES order (where a reader
    of the file meets them first)."""
    listed = cache_module.__doc__.split("Policies (`make_cache(name, **params)`):\n", 1)[1].split("\n\n", 1)[0]
    assert [tuple(line.split()[:2]) for line in listed.splitlines()] == [
        (name, cls.__name__) for name, cls in POLICIES.items()]
