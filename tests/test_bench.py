"""The benchmark's arithmetic (python -m tinyavl.bench): the bytes a decode step must read, its floor,
and the step times it reports, on a tiny random model with made-up rates so every number is derivable
by hand. Its timings themselves are not tested: they are measurements, printed as ratios."""
import json
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

from tinyavl import bench, timing
from tinyavl.cache import POLICIES, AVLCache
from tinyavl.model import LlavaConfig, LlavaForConditionalGeneration, TextConfig, keys_first

TINY = bench.tiny_config(4, num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    return bench.random_model(TINY, torch.float32)


def test_weight_and_kv_row_bytes_by_hand(model):
    C, I, V, L, hs, Hkv = 32, 48, 64, 4, 8, 2
    per_layer = (C * C + 2 * C * Hkv * hs + C * C) + 3 * C * I + 2 * C  # q, k, v, o; gate, up, down; two norms
    assert bench.decode_weight_bytes(model) == 4 * (L * per_layer + C + V * C)  # + final norm + lm_head; no embedding
    assert bench.kv_row_bytes(model.config.text, torch.float32) == 2 * Hkv * hs * 4


def test_the_benchmarks_decoder_is_llava_15_7bs():
    """The text_config of llava-hf/llava-1.5-7b-hf's config.json, written out (its other values are
    TextConfig's defaults, Llama-7B's), and the 3.76 GB of fp32 weights a step of 4 such layers reads."""
    text = bench.llava_7b_config(32).text
    published = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
    assert {name: getattr(text, name) for name in published} == published
    with torch.device("meta"):
        four_layers = LlavaForConditionalGeneration(bench.llava_7b_config(4))
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096       # q, k, v, o; gate, up, down; two norms
    assert bench.decode_weight_bytes(four_layers) == 4 * (4 * per_layer + 4096 + 32064 * 4096)


def test_a_tied_output_layer_is_read_whole():
    """With tie_word_embeddings the embedding table is the output layer, which a step reads whole."""
    C, I, V, L, hs, Hkv = 32, 48, 64, 4, 8, 2
    text = TextConfig(vocab_size=V, hidden_size=C, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=Hkv, max_position_embeddings=512, tie_word_embeddings=True)
    tied = bench.random_model(LlavaConfig(text=text, vision=TINY.vision, image_token_id=63), torch.float32)
    per_layer = (C * C + 2 * C * Hkv * hs + C * C) + 3 * C * I + 2 * C
    assert tied.language_model.lm_head.weight is tied.language_model.model.embed_tokens.weight
    assert bench.decode_weight_bytes(tied) == 4 * (L * per_layer + C + V * C)


def test_the_two_rates_divide_the_bytes_read_by_the_best_time(model, monkeypatch):
    """read_rate sums a tensor of nbytes; matvec_rate runs every Linear of the decoder once, one token each,
    and counts their weights' bytes: both divide by best_seconds' time (here made up: 0.5 s)."""
    summed = []

    def best_seconds(fn, repeats):
        result = fn()
        summed.append(result)
        return 0.5

    monkeypatch.setattr(bench, "best_seconds", best_seconds)
    assert bench.read_rate(nbytes=2 ** 20) == 2 ** 21
    assert summed[-1].item() == 2 ** 20 / 4                  # a sum of ones: the fp32 elements read
    C, I, V, L, hs, Hkv = 32, 48, 64, 4, 8, 2
    linear_weights = L * (C * C + 2 * C * Hkv * hs + C * C + 3 * C * I) + V * C   # q, k, v, o, gate, up, down; lm_head
    assert bench.matvec_rate(model) == 4 * linear_weights / 0.5
    assert len(summed[-1]) == 7 * L + 1 and all(y.shape[:2] == (1, 1) for y in summed[-1])   # one token each


def test_a_run_without_update_steps_reports_no_update_step_time(model):
    """3 new tokens are 2 decode steps, both normal (K = 3): there is no update step to time, not one of 0 ms."""
    case = bench.run_case(model, n_img=20, new_tokens=3, measure=lambda model: {"read": 2e9, "matvec": 1e9})
    assert not any(key.startswith(("attention_ms_", "update_step", "normal_step", "swap_"))
                   for key in case["policies"]["avl"])
    bench.print_case(case)  # prints without the split


def test_kv_columns_are_each_policys_peak_and_its_ratio_to_fulls(model):
    """KV peak: full's after its last step holds the prompt and the 2 tokens fed back, in each of 4 layers;
    every policy's ratio is its peak over full's (at 3 new tokens A-VL's peak, 0.597 of full's, is not its
    share after the prefill, 0.6)."""
    case = bench.run_case(model, n_img=20, new_tokens=3, measure=lambda model: {"read": 2e9, "matvec": 1e9})
    full = case["policies"]["full"]
    assert full["kv_bytes"] == 4 * (case["prompt_tokens"] + 2) * bench.kv_row_bytes(model.config.text, torch.float32)
    for name, row in case["policies"].items():
        assert row["kv_ratio"] == pytest.approx(row["kv_bytes"] / full["kv_bytes"], rel=1e-12), name
    # A-VL's peak by hand: 5 sys + 10 of the 20 image tokens (S = 0.5) + the text budget max(round(0.6 x 42), 20)
    # of the 42 text tokens, against the 67 rows full holds.
    assert case["prompt_tokens"] == 65 and case["policies"]["avl"]["kv_ratio"] == pytest.approx(40 / 67)


def test_floor_is_weight_bytes_at_matvec_rate_plus_attended_kv_at_read_rate(model):
    """Each rate the faster of its measures just before and just after the policies: here the read rate
    before (2 GB/s, then 1.5) and the matrix-vector rate after (0.8 GB/s, then 1)."""
    measured = iter([{"read": 2e9, "matvec": 0.8e9}, {"read": 1.5e9, "matvec": 1e9}])
    case = bench.run_case(model, n_img=20, new_tokens=6, measure=lambda model: next(measured))
    assert list(case["policies"]) == list(POLICIES)
    weight = bench.decode_weight_bytes(model)
    full, avl = case["policies"]["full"], case["policies"]["avl"]
    # full attends every row in every layer: prompt + 1..5 steps -> mean prompt + 3 rows per layer.
    kv = 4 * (case["prompt_tokens"] + 3) * bench.kv_row_bytes(model.config.text, torch.float32)
    assert full["floor_ms"] == pytest.approx(1e3 * (weight / 1e9 + kv / 2e9))
    assert full["hardware_floor_ms"] == pytest.approx(1e3 * (weight + kv) / 2e9)
    assert full["kv_ratio"] == 1 and full["attended_ratio"] == 1 and full["same_start_as_full"] == 6
    assert avl["attended_ratio"] < 1 and avl["kv_ratio"] < 1 and avl["floor_ms"] < full["floor_ms"]
    assert 0 < avl["attention_ms"] < avl["decode_ms"]  # the cache's four stages are part of the step
    assert case["rates_GBps"] == {"read": 2.0, "matvec": 1.0} and case["weight_bytes"] == weight
    json.dumps(case)  # what --json prints


def test_floors_count_the_run_dtypes_rows_and_the_read_rate_for_the_hardware(model):
    """In bf16 a K/V row is half an fp32 one; the hardware floor reads every byte at the read rate, here the
    slower (1 GB/s, where the matrix-vector product runs at 2)."""
    for dtype in (torch.bfloat16, torch.float32):
        m = bench.random_model(TINY, dtype) if dtype == torch.bfloat16 else model
        case = bench.run_case(m, n_img=20, new_tokens=3, measure=lambda model: {"read": 1e9, "matvec": 2e9})
        full, weight = case["policies"]["full"], bench.decode_weight_bytes(m)
        kv = 4 * (case["prompt_tokens"] + 1.5) * bench.kv_row_bytes(TINY.text, dtype)   # 1.5: steps 1 and 2's mean
        assert full["floor_ms"] == pytest.approx(1e3 * (weight / 2e9 + kv / 1e9)), dtype
        assert full["hardware_floor_ms"] == pytest.approx(1e3 * (weight + kv) / 1e9), dtype


def test_avls_steps_are_compared_with_fulls_attention(model):
    case = bench.run_case(model, n_img=20, new_tokens=6, measure=lambda model: {"read": 2e9, "matvec": 1e9})
    avl, full = case["policies"]["avl"], case["policies"]["full"]
    assert avl["normal_step_vs_full"] == pytest.approx(avl["attention_ms_normal_step"] / full["attention_ms"])
    assert avl["steady_vs_full"] == pytest.approx(avl["attention_ms_steady"] / full["attention_ms"])


def test_the_rates_are_named_as_measured(model, monkeypatch):
    monkeypatch.setattr(bench, "read_rate", lambda device: 1.0)
    monkeypatch.setattr(bench, "matvec_rate", lambda model: 2.0)
    assert bench.measure_rates(model) == {"read": 1.0, "matvec": 2.0}


def test_each_policys_times_and_bytes_are_its_own_runs(model, monkeypatch):
    """decode_ms and attention_ms are a policy's run's times over its decode steps (6 new tokens: 5, the
    prefill makes the first), prefill_s its prefill's; kv_bytes its peak, for `full` every row of the
    prompt and the 5 tokens fed after it, in every layer."""
    runs, run_policies = {}, bench.run_policies

    def recorded_run_policies(*args):
        runs.update(run_policies(*args))
        return runs

    monkeypatch.setattr(bench, "run_policies", recorded_run_policies)
    case = bench.run_case(model, n_img=20, new_tokens=6, measure=lambda model: {"read": 2e9, "matvec": 1e9})
    for name, (tokens, stats, cache) in runs.items():
        row = case["policies"][name]
        assert row["decode_ms"] == pytest.approx(1e3 * stats.decode_seconds / 5)
        assert row["attention_ms"] == pytest.approx(1e3 * cache.timings.seconds("attention") / 5)
        assert row["prefill_s"] == stats.prefill_seconds
        assert row["kv_bytes"] == stats.kv_cache_bytes_peak
        assert row["same_start_as_full"] == bench.agreeing_start(tokens, runs["full"][0])
        assert row["attended_ratio"] == pytest.approx(stats.attended_tokens_per_step
                                                      / runs["full"][1].attended_tokens_per_step)
    # (Some policy's answer parts from full's on this random model: the column is not full's count of its own.)
    assert min(row["same_start_as_full"] for row in case["policies"].values()) < 6
    avl_cache = runs["avl"][2]
    assert len(set(avl_cache.core_replaced)) > 1  # re-ranks that differ: their mean is not any one of them
    assert case["policies"]["avl"]["core_replaced"] == pytest.approx(statistics.mean(avl_cache.core_replaced))
    row_bytes = bench.kv_row_bytes(model.config.text, torch.float32)
    assert case["policies"]["full"]["kv_bytes"] == 4 * (case["prompt_tokens"] + 5) * row_bytes


def recording_steps(monkeypatch, fail_at: tuple[str, int] | None = None) -> list:
    """Make bench's timed caches log (policy, step) at each forward pass's first layer, into the list
    returned; fail_at (policy, step): that policy's cache raises there instead."""
    order, timed_cache = [], bench.timed_cache

    def recording(name, cuda=False):
        cache = timed_cache(name, cuda)
        attend = cache.attend

        def logged(layer, *args):
            if layer == 0:
                if (name, cache.step) == fail_at:
                    raise RuntimeError(f"{name} failed at step {cache.step}")
                order.append((name, cache.step))
            return attend(layer, *args)

        cache.attend = logged
        return cache

    monkeypatch.setattr(bench, "timed_cache", recording)
    return order


def test_policies_take_their_decode_steps_in_turn_and_decode_as_alone(model, monkeypatch):
    """run_policies: the prefills one after another, then step 1 of each policy, step 2 of each, ...; and
    each policy generates the tokens and attends the rows it does when it runs alone."""
    order = recording_steps(monkeypatch)
    names, ids, pixels = ("full", "avl", "h2o"), bench.prompt_ids(TINY, 20), bench.set_image_block(model, 20)
    runs = bench.run_policies(model, names, ids, pixels, new_tokens=5)
    assert order == [(name, step) for step in range(5) for name in names]   # 5 tokens: the prefill and 4 steps
    for name in names:
        tokens, stats = bench.generate(model, ids, pixels, max_new_tokens=5, eos_token_id=(), policy=name)
        assert runs[name][0] == tokens and runs[name][1].attended_per_layer == stats.attended_per_layer


def test_a_policy_that_fails_in_its_turn_fails_the_run_there(model, monkeypatch):
    """An error in one policy's step is the run's, raised as it happens, after the steps before it."""
    order = recording_steps(monkeypatch, fail_at=("avl", 2))
    names = ("full", "avl", "h2o")
    with pytest.raises(RuntimeError, match="avl failed at step 2"):
        bench.run_policies(model, names, bench.prompt_ids(TINY, 20), bench.set_image_block(model, 20), new_tokens=5)
    assert order == [(name, step) for step in range(2) for name in names] + [("full", 2)]


def test_step_time_at_a_token_is_the_median_of_the_steps_before_it():
    steps = [1.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # decode steps 1..6, which make tokens 2..7
    assert bench.ms_at(steps, 7, window=3) == 4000   # steps ending at tokens 5, 6, 7: 3, 4, 5 s
    assert bench.ms_at(steps, 4, window=2) == 1500   # tokens 3, 4: 1, 2 s
    assert bench.ms_at(steps, 3, window=8) == 1000   # near the start, fewer: tokens 2, 3: 1, 1 s
    assert bench.ms_at(steps, 4, window=8) == 1000   # tokens 2, 3, 4: 1, 1, 2 s


def test_growth_slope_is_the_median_pairwise_slope_and_ignores_a_few_slow_steps():
    # Decode steps 1..9 make tokens 2..10; a step's time grows by 2 ms a token (0.2 s per 100 tokens).
    steps = [0.010 + 0.002 * (token - 2) for token in range(2, 11)]
    assert bench.slope_ms_per_100_tokens(steps, 3, 10) == pytest.approx(200)
    # Only the steps that make tokens first..last count: flat up to token 6, then 2 ms a token.
    bent = [0.010 + 0.002 * max(0, token - 6) for token in range(2, 11)]
    assert bench.slope_ms_per_100_tokens(bent, 5, 6) == 0
    assert bench.slope_ms_per_100_tokens(bent, 6, 7) == pytest.approx(200)
    # One step near the end 50 ms slow (another process on a shared CPU): a least-squares line through the
    # steps would more than double its slope; the median of the pairwise slopes stays put.
    slow = steps.copy()
    slow[-1] += 0.050
    assert bench.slope_ms_per_100_tokens(slow, 2, 10) == pytest.approx(200)
    tokens = torch.arange(2, 11, dtype=torch.float64)
    least_squares = torch.linalg.lstsq(torch.stack([tokens, torch.ones_like(tokens)], 1),
                                       torch.tensor(slow, dtype=torch.float64)[:, None]).solution[0, 0]
    assert 1e5 * least_squares > 2 * 200
    # Four steps, six pairs: slopes 1, 1.5, 2, 7/3, 3 and 4 ms a token, whose median is the mean of the middle
    # two, (2 + 7/3) / 2 ms a token.
    assert bench.slope_ms_per_100_tokens([0.010, 0.011, 0.013, 0.017], 2, 5) == pytest.approx(100 * (2 + 7 / 3) / 2)
    # Steps that alternate (A-VL's update steps cost more, every third) grow at the rate of their trend.
    periodic = [0.010 + 0.001 * token + (0.020 if token % 3 == 0 else 0) for token in range(2, 62)]
    assert bench.slope_ms_per_100_tokens(periodic, 2, 61) == pytest.approx(100, rel=0.1)


def test_growth_is_printed_as_differences_slopes_and_their_ratio(monkeypatch, capsys):
    monkeypatch.setattr(bench, "GROWTH_TOKENS", (3, 6))
    at = {"step_ms_at_3": 10.0, "step_ms_at_6": 12.5, "attention_ms_at_3": 1.0, "attention_ms_at_6": 1.5}
    growth = {"image_tokens": 20,
              "full": {**at, "step_ms_per_100_tokens": 80.0, "attention_ms_per_100_tokens": 16.0},
              "avl": {**at, "step_ms_per_100_tokens": 40.0, "attention_ms_per_100_tokens": 4.0}}
    bench.print_growth(growth)
    out = capsys.readouterr().out
    assert "full +2.5 ms (+0.50 attn)" in out                       # 12.5 - 10.0 and 1.5 - 1.0
    assert "full +80.00 (+16.000 attn), avl +40.00 (+4.000 attn)" in out
    assert "avl's attention grows 0.25x as fast as full's" in out   # 4 / 16
    for flat_or_shrinking in (0.0, -1.0):                              # noise: no ratio to a step that does not grow
        growth["full"]["attention_ms_per_100_tokens"] = flat_or_shrinking
        bench.print_growth(growth)
        assert "as fast as" not in capsys.readouterr().out


def test_a_case_is_printed_with_each_ratio_of_its_row(capsys):
    """print_case's columns, from a made-up case: '/ floor' is decode over floor ms, '/ hw floor' decode over
    the hardware floor, 'step vs full' decode over full's, each computed here by hand."""
    row = {"kv_bytes": 3 * 2**20, "kv_ratio": 0.5, "attended_ratio": 0.4, "prefill_s": 1.5, "decode_ms": 120.0,
           "floor_ms": 100.0, "hardware_floor_ms": 60.0, "attention_ms": 7.0, "same_start_as_full": 5}
    full = {**row, "kv_bytes": 6 * 2**20, "kv_ratio": 1.0, "attended_ratio": 1.0, "decode_ms": 150.0}
    split = {"attention_ms_normal_step": 4.0, "normal_step_vs_full": 0.5, "attention_ms_update_step": 12.0,
             "update_step_vs_full": 1.5, "swap_ms_update_step": 3.0, "attention_ms_steady": 6.7,
             "steady_vs_full": 0.84}
    case = {"image_tokens": 20, "prompt_tokens": 40, "new_tokens": 6, "rates_GBps": {"read": 20.0, "matvec": 15.0},
            "policies": {"full": full, "h2o": row, "avl": {**row, **split}}}
    bench.print_case(case)
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("h2o"))
    # policy, KV peak, KV vs full, rows attended vs full, prefill s, decode ms / step, floor ms, / floor,
    # / hw floor, step vs full, attn ms, tokens as full's
    assert line.split()[1:12] == ["3.0Mi", "0.50", "0.40", "1.50", "120.0", "100.0", "1.20", "2.00", "0.80", "7.0",
                                  "5/6"]
    assert "read rate 20.0 GB/s (fp32 sum), nn.Linear matrix-vector rate 15.0 GB/s" in out
    assert ("avl attn ms: 4.0 per normal step (0.50x full's), 12.0 per update step (1.50x), 3.0 of it swapping "
            "core rows; one update step in K: 6.7 (0.84x)") in out


def test_growth_reports_each_policys_step_and_attention_series_at_their_tokens(model, monkeypatch):
    """growth's columns, by hand: per-step times that grow linearly (a + b t at generated token t), a
    different line for each policy and for its step and attention times. The median of the 8 steps ending
    at token t is the line at t - 3.5; the slope is b, in ms per 100 tokens."""
    monkeypatch.setattr(bench, "GROWTH_TOKENS", (10, 30))
    lines = {("full", "step"): (0.050, 2e-4), ("full", "attention"): (0.010, 1e-4),
             ("avl", "step"): (0.040, 1.5e-4), ("avl", "attention"): (0.004, 0.5e-4)}

    def series(name, kind):  # decode steps 1..29 make generated tokens 2..30
        a, b = lines[name, kind]
        return [a + b * token for token in range(2, 31)]

    def fake_run_policies(model, names, input_ids, pixel_values, new_tokens):
        assert names == ("full", "avl") and new_tokens == 30
        return {name: (None, type("Stats", (), {"decode_step_seconds": series(name, "step")}), name) for name in names}

    monkeypatch.setattr(bench, "run_policies", fake_run_policies)
    monkeypatch.setattr(bench, "attention_step_seconds", lambda cache: series(cache, "attention"))
    out = bench.growth(model, n_img=20)
    for (name, kind), (a, b) in lines.items():
        for token in (10, 30):
            assert out[name][f"{kind}_ms_at_{token}"] == pytest.approx(1e3 * (a + b * (token - 3.5)))
        assert out[name][f"{kind}_ms_per_100_tokens"] == pytest.approx(1e5 * b)


def test_timed_cache_counts_decode_steps_only(model):
    cache = bench.timed_cache("full")
    input_ids = bench.prompt_ids(TINY, 20)
    bench.generate(model, input_ids, bench.set_image_block(model, 20), max_new_tokens=1, policy=cache)
    assert cache.timings.seconds("attention") == 0  # a prefill only
    bench.generate(model, input_ids, bench.set_image_block(model, 20), max_new_tokens=3, policy=cache)
    assert cache.timings.seconds("attention") > 0


def test_attention_time_per_step_sums_each_steps_layers():
    """attention_step_seconds groups the per-layer calls by decode step, in order: 2 layers, 3 steps."""
    cache = bench.timed_cache("full")
    cache.n_layers = 2
    cache.timings.intervals["attention"] = [(0.0, t) for t in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)]  # (start, end) pairs
    assert bench.attention_step_seconds(cache) == [3.0, 12.0, 48.0]


def test_avl_core_replaced_is_the_share_of_the_core_each_rerank_changed(model, monkeypatch):
    """core_replaced, counted from what each re-rank says entered the core, equals the share of the core's
    tokens (read by position, before and after) that each re-rank changed."""
    changed, rerank_core = [], AVLCache.rerank_core

    def watched(self, layer, image_probs):
        def core():
            return set(self.pos[layer][0, 0, self.n_sys:self.n_sys + self.n_core].tolist())
        before = core()
        entered = rerank_core(self, layer, image_probs)
        changed.append(len(core() - before) / self.n_core)
        return entered

    monkeypatch.setattr(AVLCache, "rerank_core", watched)
    cache = bench.timed_cache("avl")
    bench.generate(model, bench.prompt_ids(TINY, 40), bench.set_image_block(model, 40), max_new_tokens=8, policy=cache)
    assert len(changed) == 2 * TINY.text.num_hidden_layers and any(changed)  # update steps 3 and 6, every layer
    assert cache.core_replaced == pytest.approx(changed)


def test_avl_attention_time_splits_into_normal_and_update_steps(model):
    """8 new tokens are decode steps 1..7 (the first token comes from the prefill); with K = 3 steps 3 and
    6 are update steps. The two kinds add up to the whole attention time, and the swaps are part of the
    update steps."""
    cache = bench.timed_cache("avl")
    bench.generate(model, bench.prompt_ids(TINY, 40), bench.set_image_block(model, 40), max_new_tokens=8, policy=cache)
    assert cache.steps_by_kind == {"normal": 5, "update": 2}
    split = {name: cache.timings.seconds(name) for name in ("normal", "update", "swap", "attention")}
    assert split["normal"] + split["update"] == pytest.approx(split["attention"])
    assert 0 < split["swap"] < split["update"]
    row = bench.avl_step_split(cache, full_attention_ms=2.0)
    assert row["attention_ms_update_step"] == pytest.approx(1e3 * split["update"] / 2)
    assert row["swap_ms_update_step"] == pytest.approx(1e3 * split["swap"] / 2)
    assert row["normal_step_vs_full"] == pytest.approx(1e3 * split["normal"] / 5 / 2.0)
    assert row["update_step_vs_full"] == pytest.approx(1e3 * split["update"] / 2 / 2.0)
    # A long answer's mix, K = 3: two normal steps to one update step.
    steady = 1e3 * (2 * split["normal"] / 5 + split["update"] / 2) / 3
    assert row["attention_ms_steady"] == pytest.approx(steady)
    assert row["steady_vs_full"] == pytest.approx(steady / 2.0)


def test_json_has_the_documented_layout(monkeypatch, capsys):
    """--json: one object with every case (per dtype) and, per policy, the columns the tables print."""
    monkeypatch.setattr(bench, "llava_7b_config", lambda n_layers: TINY)
    monkeypatch.setattr(bench, "GROWTH_TOKENS", (3, 6))
    read_rate = bench.read_rate
    monkeypatch.setattr(bench, "read_rate", lambda device: read_rate(device, nbytes=2 ** 20))
    bench.main(["--json", "--image-tokens", "20", "12", "--new-tokens", "4", "--dtypes", "float32", "bfloat16"])
    out = json.loads(capsys.readouterr().out)
    assert [(c["dtype"], c["image_tokens"]) for c in out["cases"]] == [
        ("float32", 20), ("float32", 12), ("bfloat16", 20), ("bfloat16", 12)]
    for case in out["cases"]:
        assert list(case["policies"]) == list(POLICIES)
        for r in case["policies"].values():
            assert {"decode_ms", "floor_ms", "attention_ms", "prefill_s", "kv_ratio", "attended_ratio"} <= set(r)
        assert 0 <= case["policies"]["avl"]["core_replaced"] <= 1
        assert {"attention_ms_normal_step", "attention_ms_update_step", "swap_ms_update_step",
                "attention_ms_steady"} <= set(case["policies"]["avl"])
        assert set(case["rates_GBps"]) == {"read", "matvec"}
    # Growth runs on the first block, the one whose context the checks sized for its tokens.
    assert out["growth"]["float32"]["image_tokens"] == out["growth"]["bfloat16"]["image_tokens"] == 20
    assert set(out["growth"]["float32"]["avl"]) == {"step_ms_at_3", "step_ms_at_6", "attention_ms_at_3",
                                                     "attention_ms_at_6", "step_ms_per_100_tokens",
                                                     "attention_ms_per_100_tokens"}
    assert out["transformers_decode_ratio"] == out["transformers_decode_ratios"]["float32"] > 0
    assert out["transformers_decode_ratios"]["bfloat16"] > 0
    assert out["decode_logits"] == {name: "k q^T" if keys_first("cpu", getattr(torch, name)) else "q k^T"
                                    for name in ("float32", "bfloat16")}


def test_a_transformers_mismatch_is_noted_on_stderr_not_in_the_json(model, monkeypatch, capsys):
    """--json promises one object on stdout: the note that transformers' greedy tokens differ from
    tinyavl's (here made to, by shifting tinyavl's) goes to stderr."""
    pytest.importorskip("transformers")
    generation = bench.generation

    def shifted_generation(*args, **kwargs):
        tokens, stats = yield from generation(*args, **kwargs)
        return [token + 1 for token in tokens], stats

    monkeypatch.setattr(bench, "generation", shifted_generation)
    ratio = bench.transformers_decode_ratio(model, bench.prompt_ids(model.config, 12), bench.set_image_block(model, 12),
                                            new_tokens=3)
    captured = capsys.readouterr()
    assert ratio > 0 and captured.out == "" and "tokens differ" in captured.err


def test_a_transformers_that_lays_out_the_decoder_otherwise_is_left_out_with_a_note(model, monkeypatch, capsys):
    """Weights that transformers' LLaVA does not take (here: every key renamed) leave the comparison out,
    said in one line on stderr (the tables are timed by then), where it stopped the run with an assertion."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(bench, "transformers_key", lambda key: "renamed." + key)
    ratio = bench.transformers_decode_ratio(model, bench.prompt_ids(model.config, 12), bench.set_image_block(model, 12),
                                            new_tokens=3)
    captured = capsys.readouterr()
    assert ratio is None and captured.out == ""
    assert captured.err.startswith(f"  note: transformers {transformers.__version__} lays out LLaVA's decoder")
    assert captured.err.endswith(": no comparison\n") and len(captured.err.splitlines()) == 1


def test_transformers_greedy_times_each_decode_step_and_decodes_as_tinyavl(model, monkeypatch):
    """transformers' greedy run times its decode steps alone: not the prefill (which makes the first token),
    nor the time its caller spends between two tokens (another run's step, in take_turns). With a made-up
    clock that each reading moves on by a second, and 50 seconds passing outside the generator after every
    token, 5 new tokens are 4 steps of 1 second each. On the same weights it chooses the tokens tinyavl's
    full attention does."""
    pytest.importorskip("transformers")
    ids, pixels = bench.prompt_ids(model.config, 12), bench.set_image_block(model, 12)
    now = [100.0]

    def perf_counter():  # a step's own work: one second between its two readings
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(bench, "time", type("FakeTime", (), {"perf_counter": staticmethod(perf_counter)}))
    hf = bench.transformers_llava(model)
    with torch.inference_mode():
        embeds = model.embed(ids, pixels)                                   # (1, T, C)
    steps, yielded = bench.transformers_greedy(hf, embeds, 5), []
    for _ in range(5):
        yielded.append(next(steps))
        now[0] += 50.0                                                      # the caller's time, between tokens
    with pytest.raises(StopIteration) as end:
        next(steps)
    tokens, step_seconds = end.value.value
    assert tokens == yielded and step_seconds == [1.0] * 4
    assert tokens == bench.generate(model, ids, pixels, max_new_tokens=5, eos_token_id=(), policy="full")[0]


def test_transformers_llava_is_tinyavls_decoder_with_its_own_settings():
    """The transformers model the benchmark compares against computes tinyavl's logits, on a decoder whose
    RMSNorm epsilon and RoPE base are not transformers' defaults (a 7B's eps is 1e-5, the default 1e-6)."""
    pytest.importorskip("transformers")
    config = bench.tiny_config(2, num_key_value_heads=2, rms_norm_eps=0.05, rope_theta=37.0)
    model = bench.random_model(config, torch.float32)
    hf = bench.transformers_llava(model)
    ids = bench.prompt_ids(config, 12)
    with torch.inference_mode():
        embeds = model.embed(ids, bench.set_image_block(model, 12))                   # (1, T, C)
        ours = model.language_model(embeds)                                         # (1, T, vocab)
        theirs = hf(inputs_embeds=embeds).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_transformers_and_tinyavl_decode_in_turn_and_the_ratio_is_of_their_step_times(model, monkeypatch):
    """The comparison takes one decode step of tinyavl's full attention, then one of transformers', ...
    (their prefills first), and its ratio of tokens/s is transformers' step seconds over tinyavl's."""
    pytest.importorskip("transformers")
    order, ends, take_turns = [], {}, bench.take_turns

    def recorded(name, steps):  # steps, each token's turn noted
        while True:
            try:
                token = next(steps)
            except StopIteration as end:
                return end.value
            order.append(name)
            yield token

    def recording_take_turns(generations):
        # Record each token as it is yielded, and what each run returned.
        result = take_turns({name: recorded(name, steps) for name, steps in generations.items()})
        ends.update(result)
        return result

    monkeypatch.setattr(bench, "take_turns", recording_take_turns)
    ratio = bench.transformers_decode_ratio(model, bench.prompt_ids(model.config, 12), bench.set_image_block(model, 12),
                                            new_tokens=4)
    assert order == ["tinyavl", "transformers"] * 4                  # the first tokens (prefills), then 3 steps each
    (_, stats), (_, hf_step_seconds) = ends["tinyavl"], ends["transformers"]
    assert stats.policy == "full" and len(hf_step_seconds) == 3
    assert ratio == sum(hf_step_seconds) / stats.decode_seconds


def test_next_blocks_and_the_papers_memory_arithmetic_by_hand():
    """--arch next measures the blocks anyres makes of a 672x672 image (2 x 2 tiles: a 48 x 48 map, a newline
    per row) and a 336x1008 one (1 x 3 tiles: 24 x 72); the memory rows are
    0.5 MiB per token (32 layers x 32 KV heads x 128 x K and V x 2 bytes) over the dense sequence, and A-VL
    keeps sys, floor(S N_img) image rows and max(round(T n_text), 20) text rows at its last step."""
    assert [bench.next_image_tokens(hw) for hw in bench.NEXT_IMAGES] == [576 + 48 * 49, 576 + 24 * 73]
    rows = bench.paper_memory(images=((336, 1008),))
    (row,) = rows
    n_img, new = 2328, bench.PAPER_MEMORY["new_tokens"]
    dense_tokens = bench.N_SYS + n_img + bench.N_TEXT + new - 1   # the last sampled token is never fed
    assert row["image_tokens"] == n_img and row["prompt_tokens"] == bench.N_SYS + n_img + bench.N_TEXT
    assert row["dense_MiB"] == pytest.approx(dense_tokens * 0.5)
    text = bench.N_TEXT + new - 1
    kept = bench.N_SYS + n_img // 2 + max(round(bench.PAPER_MEMORY["params"]["T"] * text), 20)
    assert row["avl_MiB"] == pytest.approx(kept * 0.5)


@pytest.mark.parametrize("arch", ["llava", "next"])
def test_each_arch_measures_its_own_blocks_and_next_its_memory_table(arch, monkeypatch, capsys):
    """main, its runs recorded instead of made: --arch llava measures 576 and 2928 image tokens; --arch next the
    blocks of NEXT_IMAGES, and prints the paper's memory table (a made-up row here, its columns in order), in
    --json too."""
    blocks = []

    def recorded(args, dtype):
        blocks.append(list(args.image_tokens))
        return {"dtype": dtype, "decode_logits": "k q^T", "cases": [], "growth": {}}

    row = {"image_hw": [672, 672], "image_tokens": 2928, "prompt_tokens": 2990, "dense_MiB": 1518.0,
           "avl_MiB": 770.0, "avl_ratio": 0.51}
    monkeypatch.setattr(bench, "run_dtype", recorded)
    monkeypatch.setattr(bench, "paper_memory", lambda: [row])
    expected = [576, 2928] if arch == "llava" else [bench.next_image_tokens(hw) for hw in bench.NEXT_IMAGES]
    bench.main(["--arch", arch, "--dtypes", "float32", "--device", "cpu"])
    table = capsys.readouterr().out
    assert (table.split().count("1518") == 1 and "672 x 672    2928    2990       1518       770   0.51" in table) \
        == (arch == "next")
    bench.main(["--arch", arch, "--dtypes", "float32", "--device", "cpu", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert blocks == [expected, expected] and printed.get("paper_memory") == ([row] if arch == "next" else None)


def test_timings_add_up_each_named_block():
    """Timings.timed times a block once under each of its names; a name's seconds are the sum of its blocks."""
    timings = bench.Timings()
    with timings.timed("a", "b"):
        time.sleep(0.02)
    with timings.timed("a"):
        time.sleep(0.01)
    assert timings.seconds("b") >= 0.02 and timings.seconds("a") >= timings.seconds("b") + 0.01
    assert timings.seconds("never") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--image-tokens", "3"], ["--image-tokens", "576", "4028"],
                                  ["--image-tokens", "3700", "--new-tokens", "400"], ["--lay", "1"],
                                  ["--new-tokens", "1"], ["--layers", "0"], ["--dtypes", "float32", "float32"]])
def test_blocks_that_do_not_fit_and_abbreviations_are_usage_errors(argv, monkeypatch, capsys):
    """Before any model is built: A-VL needs a core of at least one row (floor(0.3 x 4)), the prompt
    (N_SYS + N_img + N_TEXT) plus the longest run (256 tokens, or --new-tokens) must fit 4096 positions, a
    run needs a decode step to time (--new-tokens 2 or more) and a layer to run (--layers 1 or more), and
    a dtype is run once (its results are kept by dtype)."""
    monkeypatch.setattr(bench, "random_model", lambda *a, **k: pytest.fail("built a model first"))
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert argv[-1] in err  # the value given, named


class Checked(Exception):
    """Raised where the benchmark starts its work: every check has passed."""


def started(*args):
    raise Checked


def test_a_block_too_long_names_the_run_it_does_not_fit(capsys, monkeypatch):
    """4096 positions less 5 sys and 40 text leave 4051: the first block, on which the growth run makes 256
    tokens, may be 3795 long, a later one 4051 less --new-tokens (24: 4027); with --new-tokens 400, 3651
    for either."""
    monkeypatch.setattr(bench, "run_dtype", started)
    with pytest.raises(Checked):
        bench.main(["--image-tokens", "3795", "4027", "--new-tokens", "24"])
    for argv in (["3796", "576", "--new-tokens", "24"], ["576", "4028", "--new-tokens", "24"],
                 ["3651", "3652", "--new-tokens", "400"]):
        with pytest.raises(SystemExit):
            bench.main(["--image-tokens", *argv])
    assert capsys.readouterr().err.splitlines() == [
        "error: --image-tokens must be in [4, 3795] (the prompt and the growth run's 256 new tokens, run on the first "
        "block, share a context of 4096), got 3796 (see --help)",
        "error: --image-tokens must be in [4, 4027] (the prompt and --new-tokens 24 share a context of 4096), got 4028 "
        "(see --help)",
        "error: --image-tokens must be in [4, 3651] (the prompt and --new-tokens 400 share a context of 4096), got "
        "3652 (see --help)"]


def test_too_many_new_tokens_for_any_block_names_new_tokens(capsys, monkeypatch):
    """4096 positions less 5 sys, 40 text and the smallest block, 4: at most 4047 new tokens. With more no
    block fits, and the fault is --new-tokens (the message used to give --image-tokens an empty range)."""
    monkeypatch.setattr(bench, "run_dtype", started)
    with pytest.raises(Checked):
        bench.main(["--image-tokens", "4", "--new-tokens", "4047", "--json"])
    with pytest.raises(SystemExit):
        bench.main(["--image-tokens", "4", "--new-tokens", "4048", "--json"])
    assert capsys.readouterr().err == ("error: --new-tokens must be at most 4047: the prompt and the new tokens share "
                                       "a context of 4096, got 4048 (see --help)\n")


def test_agreeing_start_counts_tokens_up_to_where_the_answers_part():
    """Tokens equal by chance after the answers part do not count."""
    assert bench.agreeing_start([1, 2, 3, 4], [1, 9, 3, 4]) == 1
    assert bench.agreeing_start([5, 2, 3], [1, 2, 3]) == 0
    assert bench.agreeing_start([1, 2, 3], [1, 2, 3]) == 3
    assert bench.agreeing_start([1, 2], [1, 2, 3]) == 2                   # one answer ended early (EOS)
    assert bench.agreeing_start([1, 2, 3], [1, 2]) == 2                   # or the other


def test_best_seconds_is_the_fastest_repeat_after_a_warm_up_each_waited_for(monkeypatch):
    """A clock reading 0, 3, 10, 11, 20, 22: repeats of 3, 1 and 2 s, the best 1. The call runs once
    untimed first, and every timed call starts and ends after the GPU's queued work (synchronize)."""
    events, readings = [], iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])

    def clock():
        events.append("clock")
        return next(readings)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock))  # this module's clock alone
    monkeypatch.setattr(timing, "synchronize", lambda: events.append("sync"))
    assert timing.best_seconds(lambda: events.append("fn"), 3) == 1.0
    assert events == ["fn"] + ["sync", "clock", "fn", "sync", "clock"] * 3


def test_the_matvec_rate_counts_the_weights_in_the_run_dtype(monkeypatch):
    """bf16 weights are 2 bytes: every Linear of 4 layers (q, k, v, o of 32 x 32 and 2 KV heads of 8, the
    MLP's three 32 x 48) and the 64-word head, read in 0.5 s."""
    monkeypatch.setattr(bench, "best_seconds", lambda fn, repeats: (fn(), 0.5)[1])
    model = bench.random_model(TINY, torch.bfloat16)
    hidden, mlp, vocab, layers, hs, kv_heads = 32, 48, 64, 4, 8, 2
    per_layer = hidden * hidden + 2 * hidden * kv_heads * hs + hidden * hidden + 3 * hidden * mlp  # q, k, v, o; MLP
    weights = layers * per_layer + vocab * hidden
    assert bench.matvec_rate(model) == 2 * weights / 0.5


def test_growth_is_fitted_from_the_first_growth_token_on(model, monkeypatch):
    """GROWTH_TOKENS (3, 5), steps of 0, 10, 11 and 13 ms making tokens 2..5: tokens 3, 4, 5 take 10, 11, 13
    ms, pairwise slopes 1, 1.5 and 2 ms a token, their median 1.5: 150 ms per 100 tokens (from token 2 on,
    the median of 1, 1.5, 2, 4.33, 5.5 and 10 would be 3.17: 317 ms)."""
    monkeypatch.setattr(bench, "GROWTH_TOKENS", (3, 5))
    series = [0.0, 0.010, 0.011, 0.013]
    monkeypatch.setattr(bench, "run_policies", lambda model, names, ids, pixels, new_tokens: {
        name: (None, type("Stats", (), {"decode_step_seconds": series}), None) for name in names})
    monkeypatch.setattr(bench, "attention_step_seconds", lambda cache: series)
    growth = bench.growth(model, n_img=20)
    assert growth["full"]["step_ms_per_100_tokens"] == pytest.approx(150)
    assert growth["avl"]["attention_ms_per_100_tokens"] == pytest.approx(150)


def test_a_transformers_step_is_timed_through_its_token_choice(monkeypatch):
    """Choosing the token (int(), where the host waits for a GPU's queued work) takes 10 s here, and each
    clock reading 1 s more: every step is 11 s."""
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    class SlowChoice:
        def __int__(self):
            now[0] += 10.0
            return 5

    class Logits:
        def __getitem__(self, index):
            return self

        def argmax(self):
            return SlowChoice()

    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=clock))
    steps = bench.transformers_greedy(lambda **kwargs: type("Out", (), {"logits": Logits(), "past_key_values": None})(),
                                      torch.zeros(1, 3, 8), 3)
    with pytest.raises(StopIteration) as end:
        while True:
            next(steps)
    assert end.value.value == ([5, 5, 5], [11.0, 11.0])


def test_a_case_reports_the_tokens_it_generated(model):
    case = bench.run_case(model, n_img=20, new_tokens=3, measure=lambda model: {"read": 2e9, "matvec": 1e9})
    assert case["new_tokens"] == 3


def test_every_policy_decodes_every_step_past_the_models_eos(model, monkeypatch):
    """The models' EOS set to the first token `full` picks: the run goes on to its 5 tokens all the same, so
    that every policy decodes as many steps."""
    ids, pixels = bench.prompt_ids(TINY, 20), bench.set_image_block(model, 20)
    first = bench.generate(model, ids, pixels, max_new_tokens=1, eos_token_id=(), policy="full")[0][0]
    monkeypatch.setattr(model.config.text, "eos_token_id", first)
    tokens, stats, _ = bench.run_policies(model, ("full",), ids, pixels, new_tokens=5)["full"]
    assert len(tokens) == 5 and stats.new_tokens == 5


def test_a_cuda_timing_is_its_events_milliseconds_in_seconds():
    class Event:
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, end):
            return end.ms - self.ms

    assert bench.Timings._seconds_between(Event(100.0), Event(350.0)) == 0.25
