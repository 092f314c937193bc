"""The evaluation's statistics and budget rules, by hand (the runs on the committed model are in test_toy.py)."""
import json
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from tinyavl.cache import as_decimal, floor_count
from tinyavl.errors import UserError
from tinyavl.toy import evaluate as evaluate_module
from tinyavl.toy.evaluate import (ABLATIONS, BUDGETS, FASTV_MAX_R, PROMPT_KINDS, SWEEP_POLICIES, Question, Tally,
                                  budget_params, budget_sweep, caption_errors, caption_objects_right,
                                  format_interval, format_table, held_out_set, is_correct, markdown_table,
                                  paired_ratio, plot_sweep, shown_params)
from tinyavl.toy.intervals import clustered_wilson_interval, paired_ratio_interval, wilson_interval
from tinyavl.toy.scenes import Scene, SceneObject, SceneStream
from tinyavl.toy.plot import HEIGHT, MARGIN, PALETTE, WIDTH, plot_font, save_line_plot, tick_label

SCENE = Scene((SceneObject("circle", "red", 1, 2, 5, (220, 40, 40)),
               SceneObject("square", "blue", 3, 4, None, (50, 90, 235))))

# The plots' frame, in pixels.
LEFT, TOP, RIGHT, BOTTOM = MARGIN["left"], MARGIN["top"], WIDTH - MARGIN["right"], HEIGHT - MARGIN["bottom"]


def pixel(x, y, x_range, y_range):
    """Where a data point lands in the frame, worked out apart from plot.py."""
    (x0, x1), (y0, y1) = x_range, y_range
    return round(LEFT + (x - x0) / (x1 - x0) * (RIGHT - LEFT)), round(BOTTOM - (y - y0) / (y1 - y0) * (BOTTOM - TOP))


def no_model(*args, **kwargs):
    pytest.fail("loaded the model before checking the command line")


def test_wilson_interval_by_hand():
    # 45 of 50, z = 1.96: p = .9, z^2 = 3.8416; centre = (.9 + 3.8416 / 100) / (1 + 3.8416 / 50) = .93842 / 1.07683
    # = .87146; half = 1.96 sqrt(.9 .1 / 50 + 3.8416 / 10000) / 1.07683 = 1.96 x .046735 / 1.07683 = .08506.
    low, high = wilson_interval(45, 50)
    assert low == pytest.approx(0.7864, abs=2e-4) and high == pytest.approx(0.9565, abs=2e-4)
    # All right: the interval keeps a width below 1 (n / (n + z^2) = 100 / 103.8416 = .96300).
    low, high = wilson_interval(100, 100)
    assert high == 1.0 and low == pytest.approx(100 / (100 + 1.959964 ** 2), abs=1e-9)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0 < high < 0.35
    # Symmetric around 1/2 for right = n / 2, and narrower for larger n.
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and high - low < wilson_interval(5, 10)[1] - wilson_interval(5, 10)[0]


def test_clustered_interval_by_hand():
    # Scenes that go all right or all wrong: 7 of 10 scenes, 6 prompts each. The spread between scenes gives
    # the variance p (1 - p) / (n - 1) (sum of (z - p)^2 over scenes = n p (1 - p), over n (n - 1)), so the
    # 60 prompts are worth n - 1 = 9 independent ones.
    low, high = clustered_wilson_interval([6] * 7 + [0] * 3, [6] * 10)
    assert (low, high) == pytest.approx(wilson_interval(0.7 * 9, 9))
    assert high - low > 2 * (wilson_interval(42, 60)[1] - wilson_interval(42, 60)[0])
    # Every scene 3 of 6: no spread between scenes, less than independent prompts would show; the interval
    # is then independent prompts' (the design effect is held at 1), never narrower.
    assert clustered_wilson_interval([3] * 10, [6] * 10) == pytest.approx(wilson_interval(30, 60))
    # All right, or all wrong: nothing to measure a spread from, and scenes whose prompts always agree are
    # worth one answer each: Wilson's at the 10 scenes, not at the 60 prompts.
    assert clustered_wilson_interval([6] * 10, [6] * 10) == pytest.approx(wilson_interval(10, 10))
    assert clustered_wilson_interval([0] * 10, [6] * 10) == pytest.approx(wilson_interval(0, 10))
    assert wilson_interval(10, 10)[0] < wilson_interval(60, 60)[0] - 0.2
    # One scene: no spread either, whatever it got right; Wilson's at that one scene. So a second scene like
    # it narrows the interval, never the other way round.
    assert clustered_wilson_interval([4], [6]) == pytest.approx(wilson_interval(4 / 6, 1))
    assert clustered_wilson_interval([6], [6])[0] < clustered_wilson_interval([6, 6], [6, 6])[0]
    # Scenes of different sizes (a caption's objects): 4 of 4, 0 of 2, 1 of 2, p = 5/8. The ratio estimator
    # weighs each scene's miss r - p a by its size: (1.5, -1.25, -0.25) over the mean size 8/3 is
    # (0.5625, -0.46875, -0.09375); their squares' sum over 3 x 2 scenes, 0.0908203125, against
    # p (1 - p) / 8 = 0.029296875 for independent prompts: a design effect of 3.1.
    assert clustered_wilson_interval([4, 0, 1], [4, 2, 2]) == pytest.approx(wilson_interval(5 / 3.1, 8 / 3.1))
    # 2 of 2, 0 of 1, 3 of 5: misses (0.75, -0.625, -0.125) weighed so make a design effect of 0.775, held
    # at 1 (the scenes' shares 1, 0, 0.6 unweighed would make 3.03).
    assert clustered_wilson_interval([2, 0, 3], [2, 1, 5]) == pytest.approx(wilson_interval(5, 8))


def test_clustered_interval_covers_the_truth_95_percent_of_the_time_where_wilsons_does_not():
    """Simulated evaluations: 100 scenes x 6 prompts, each scene's chance of a right answer drawn from a
    Beta(2, 0.5) (mean 0.8; scenes differ much). The clustered interval holds the true 0.8 in about 95% of
    1000 runs; Wilson's, which takes the 600 prompts as independent, in about 80%."""
    rng = np.random.default_rng(0)
    runs, scenes, prompts = 1000, 100, 6
    covered = {"clustered": 0, "wilson": 0}
    for _ in range(runs):
        right = rng.binomial(prompts, rng.beta(2, 0.5, size=scenes)).tolist()
        for name, (low, high) in (("clustered", clustered_wilson_interval(right, [prompts] * scenes)),
                                  ("wilson", wilson_interval(sum(right), prompts * scenes))):
            covered[name] += low <= 0.8 <= high
    assert 0.93 <= covered["clustered"] / runs <= 0.97
    assert covered["wilson"] / runs < 0.85


def test_budget_params_hold_randoms_bytes():
    """A 4-layer model whose image is a share s of the dense KV: random at S keeps 1 - (1 - S) s; FastV's
    R from budget_params drops R s from 3 of 4 layers, which is the same bytes. h2o gets r, streaming r less
    its 4 sinks."""
    n_layers, s = 4, 0.7
    for image_keep in (0.5, 0.25, 0.1):
        r = 1 - (1 - image_keep) * s
        fastv = budget_params("fastv", image_keep, r, n_layers)
        assert fastv["filter_layer"] == 1
        expected_r = 1 - fastv["R"] * s * (n_layers - 1) / n_layers
        if (1 - image_keep) * n_layers / (n_layers - 1) < FASTV_MAX_R:
            assert expected_r == pytest.approx(r, abs=1e-4)
        else:                                             # out of FastV's reach: the nearest it allows
            assert fastv["R"] == FASTV_MAX_R and expected_r > r
        assert budget_params("random", image_keep, r, n_layers) == {"S": image_keep}
        avl = budget_params("avl", image_keep, r, n_layers)
        assert avl["S"] == image_keep and avl["C"] == pytest.approx(0.6 * image_keep)
    assert budget_params("fastv", 0.5, 0.65, 4)["R"] == pytest.approx(2 / 3, abs=1e-4)   # .5 x 4 / 3
    # FastV keeps floor((1 - R) n) image tokens: at the toy's 4 layers and half the image, the R it is given
    # keeps as many as the exact one, 2/3 (floor(n / 3)), on every image up to 2928 tokens (the toy's 144:
    # 48, where R = 0.6667 kept 47); at any depth and budget it never keeps fewer than the exact R does.
    fastv_r = budget_params("fastv", 0.5, 0.65, 4)["R"]
    assert all(floor_count(1 - as_decimal(fastv_r), n) == n // 3 for n in range(1, 2929))
    for n_layers, image_keep in [(4, 0.75), (12, 0.5), (32, 0.25), (32, 0.7)]:
        exact_r = (1 - Fraction(str(image_keep))) * n_layers / (n_layers - 1)
        fastv_r = budget_params("fastv", image_keep, 0.65, n_layers)["R"]
        assert 0 <= exact_r - as_decimal(fastv_r) < Fraction(1, 10_000)
        assert all(floor_count(1 - as_decimal(fastv_r), n) >= math.floor((1 - exact_r) * n) for n in range(1, 2929))
    assert floor_count(1 - as_decimal(FASTV_MAX_R), 144) >= 1  # FastV at its cap keeps one of the 144 image tokens
    with pytest.raises(ValueError):
        budget_params("full", 0.5, 0.65, 4)
    for policy in ("h2o", "streaming"):
        with pytest.raises(ValueError, match="cached_tokens"):
            budget_params(policy, 0.5, 0.65, 4)


@pytest.mark.parametrize("image_keep", [0.5, 0.25, 0.1])
def test_h2o_and_streaming_hold_as_many_rows_as_random(image_keep):
    """Counted row by row as the papers' budgets count them, on a toy prompt's 144 image tokens and sequences of
    150-400 cached tokens: `random` at S holds L - 144 + floor(S 144) rows of L; H2O, given random's share,
    floor(heavy L) + max(1, floor(recent L)), and StreamingLLM 4 sinks + max(1, floor(recent L)). Each holds
    what `random` holds, H2O at most one row more; split in shares rounded to the nearest (0.6312 into 0.1578 +
    0.4734), H2O held a row fewer on most lengths."""
    n_img = 144
    for length in range(150, 401):
        random_rows = length - n_img + math.floor(Fraction(str(image_keep)) * n_img)
        ratio = random_rows / length

        def rows(fraction):
            return math.floor(Fraction(str(fraction)) * length)

        h2o = budget_params("h2o", image_keep, ratio, 4, cached_tokens=length)
        h2o_rows = rows(h2o["heavy"]) + max(1, rows(h2o["recent"]))
        assert random_rows <= h2o_rows <= random_rows + 1, (length, h2o)
        assert h2o["recent"] == pytest.approx(3 * h2o["heavy"], abs=0.01)      # the defaults' 1 : 3, give or take a row
        streaming = budget_params("streaming", image_keep, ratio, 4, cached_tokens=length)
        assert 4 + max(1, rows(streaming["recent"])) == random_rows, (length, streaming)
    # H2O's heavy share is rounded down (its recent one then up): 0.63125 / 4 = 0.1578125.
    assert budget_params("h2o", image_keep, 0.63125, 4, cached_tokens=320)["heavy"] == 0.1578


def report(policy, accuracy, kv, budget, params=None):
    right = round(accuracy * 60)
    right_by_scene = [6] * (right - 5 * 10) + [5] * (60 - right) if right >= 50 else [right // 10] * 10
    return {"policy": policy, "policy_params": params or {}, "budget": budget, "accuracy": accuracy,
            "accuracy_ci": wilson_interval(right, 60), "right_by_scene": right_by_scene,
            "caption_objects_ci": wilson_interval(right, 60),
            "accuracy_by_type": {k: accuracy for k in ("colour", "shape", "count", "digit", "where", "caption")},
            "accuracy_by_type_ci": {k: wilson_interval(right // 6, 10)
                                    for k in ("colour", "shape", "count", "digit", "where", "caption")},
            "caption_objects": accuracy / 2, "kv_ratio": kv, "kv_ratio_by_type": {"caption": kv + 0.05},
            "attended_ratio": kv / 2}  # other values than the columns a plot draws: a mix-up shows


def test_table_shows_intervals_and_the_share_of_full():
    table = format_table([report("full", 1.0, 1.0, 1.0), report("random", 0.9, 0.6, 0.5, {"S": 0.5})])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == lines[3].count("|")
    low, high = wilson_interval(54, 60)
    of_low, of_high = paired_ratio_interval([6] * 4 + [5] * 6, [6] * 10)
    # accuracy, then of full: 54 of full's 60, 6 of the 10 scenes one answer short
    assert f"| 0.900 ({low:.3f}-{high:.3f}) | 0.900 ({of_low:.3f}-{of_high:.3f}) |" in lines[3]
    assert "S=0.5" in lines[3] and "| 0.65 |" in lines[3]                             # KV bytes on captions
    by_type = report("h2o", 0.9, 0.6, 0.5)
    by_type["policy_params_by_type"] = {kind: {"heavy": 0.15, "recent": 0.45 + 0.01 * (kind == "caption")}
                                        for kind in ("colour", "where", "caption")}
    assert shown_params(by_type) == "heavy=0.15 recent=0.45-0.46 (caption 0.46)"


def test_paired_ratio_interval_by_hand():
    """The same answers as full's: 1 on every draw. Full right on 6 prompts of every scene, the policy on all
    6 of half of them and none of the others: the ratio is the share of scenes the policy got, a mean of
    100 coin tosses, whose 95% interval is about 0.5 +- 1.96 x sqrt(0.25 / 100) = 0.40-0.60."""
    assert paired_ratio_interval([6, 5, 6, 4], [6, 5, 6, 4]) == (1.0, 1.0)
    low, high = paired_ratio_interval([6] * 50 + [0] * 50, [6] * 100)
    assert low == pytest.approx(0.402, abs=0.02) and high == pytest.approx(0.598, abs=0.02)
    # Two scenes, full right only on the second: a draw of the first twice has no ratio, and the others give
    # 5 / 6 (both scenes) or 0 (the second twice); never 5 / 0.
    low, high = paired_ratio_interval([5, 0], [0, 6])
    assert low == 0 and high == pytest.approx(5 / 6)


def test_clustered_interval_never_narrower_than_independent_prompts():
    """Scenes with some spread, but less than independent prompts would show (every scene 4 or 5 of 6, where
    independent prompts at 0.75 would spread 0-6): the design effect is held at 1, Wilson's at the 60."""
    right = [4, 5] * 5
    assert clustered_wilson_interval(right, [6] * 10) == pytest.approx(wilson_interval(45, 60))


def test_paired_ratio_interval_is_seeded_and_pairs_scene_by_scene():
    right, full_right = [6, 5, 3, 6, 2, 6, 4, 5], [6, 6, 5, 6, 4, 6, 6, 5]
    torch.manual_seed(1)
    first = paired_ratio_interval(right * 5, full_right * 5)
    torch.manual_seed(2)                                   # torch's global generator plays no part
    assert paired_ratio_interval(right * 5, full_right * 5) == first
    # Paired: the same counts with full's scenes in another order make another interval.
    assert paired_ratio_interval(right, full_right) != paired_ratio_interval(right, full_right[::-1])
    with pytest.raises(ValueError, match="pairs scenes"):
        paired_ratio_interval(right, full_right[:-1])
    with pytest.raises(ValueError, match="needs two or more"):  # one scene has nothing to resample
        paired_ratio_interval([3], [6])


def test_no_ratio_to_a_reference_that_got_nothing_right():
    """A `random` that got nothing right leaves a peer's "of random" undefined: no ratio, "-" in the table."""
    peer = {"accuracy": 1 / 12, "right_by_scene": [1, 0]}
    assert paired_ratio(peer, {"accuracy": 0.0, "right_by_scene": [0, 0]}) == (None, None)
    assert paired_ratio(peer, {"accuracy": 1 / 6, "right_by_scene": [1, 1]})[0] == pytest.approx(0.5)
    # One scene: nothing to resample, no interval, so no ratio either.
    assert paired_ratio({"accuracy": 1 / 6, "right_by_scene": [1]}, {"accuracy": 1 / 3, "right_by_scene": [2]}) \
        == (None, None)


def test_table_pairs_each_scene_with_fulls():
    """The "of full" cell is paired_ratio_interval over the two rows' scene counts, scene by scene."""
    full, policy = report("full", 1.0, 1.0, 1.0), report("random", 0.9, 0.6, 0.5)
    full["right_by_scene"] = [6, 6, 5, 6, 6, 4, 6, 6, 6, 5]
    policy["right_by_scene"] = [6, 4, 5, 6, 3, 4, 6, 5, 6, 5]
    cell = format_table([full, policy]).splitlines()[3].split(" | ")[4]
    low, high = paired_ratio_interval(policy["right_by_scene"], full["right_by_scene"])
    assert cell == f"{0.9:.3f} ({low:.3f}-{high:.3f})"


def test_table_shows_a_peers_share_of_randoms_accuracy_where_the_sweep_paired_them():
    """The "of random" cell is the report's of_random and its interval (budget_sweep pairs a peer with
    `random` at its budget); a row the sweep did not pair (full, random itself, an ablation) shows "-"."""
    full, control, peer = report("full", 1.0, 1.0, 1.0), report("random", 0.9, 0.6, 0.5), report("h2o", 0.8, 0.6, 0.5)
    peer["of_random"], peer["of_random_ci"] = 0.8 / 0.9, (0.8123, 0.9567)
    head, _, *rows = ([cell.strip() for cell in line.strip("|").split("|")]
                      for line in format_table([full, control, peer]).splitlines())
    assert [dict(zip(head, row))["of random"] for row in rows] == ["-", "-", "0.889 (0.812-0.957)"]


def test_held_out_questions_come_from_the_evaluation_stream():
    """held_out_set(seed, n) draws n different scenes from the "eval" stream of that seed (its first scene is
    the stream's first), each asked once of every kind; the training streams of the seed begin elsewhere."""
    questions = held_out_set(seed=5, n_scenes=3)
    assert [(q.scene_index, q.kind) for q in questions] == [(i, kind) for i in range(3) for kind in PROMPT_KINDS]
    scenes = [questions[i * len(PROMPT_KINDS)].scene for i in range(3)]
    assert scenes[0] != scenes[1] != scenes[2] != scenes[0]
    first = {split: next(SceneStream(split, 5))[0] for split in ("eval", "train", "tune")}
    assert scenes[0] == first["eval"] and scenes[0] != first["train"] and scenes[0] != first["tune"]


def test_budget_sweep_gives_every_peer_the_bytes_random_held_kind_by_kind(monkeypatch):
    """With evaluate replaced by a fake whose `random` rows hold other bytes on every kind and budget: each
    peer runs at budget_params of the ratio `random` measured on that kind at that budget, and a row is
    left out only where its knobs are its last row's again (FastV's R at FASTV_MAX_R). budget_params itself is
    checked by hand above; this checks which measurement reaches it."""
    n_layers, runs = 4, []

    def fake_evaluate(model, processor, questions, policy, params=None, hires_mode=None, params_by_type=None):
        runs.append((policy, params, params_by_type))
        keep = params["S"] if policy == "random" else 1.0
        # `random` gets a different count at each budget, so that which one a row is paired with shows.
        right_by_scene = [6, 5, round(8 * keep)] if policy == "random" else [5, 4, 3]
        return {"policy": policy, "policy_params": params, "accuracy": sum(right_by_scene) / 18,
                "right_by_scene": right_by_scene, "kv_ratio": 0.5, "seconds": 0.0,
                "kv_ratio_by_type": {kind: round(0.3 + 0.5 * keep + 0.01 * i, 4)
                                     for i, kind in enumerate(PROMPT_KINDS)},
                "cached_tokens_by_type": {kind: 180 + 10 * i + keep for i, kind in enumerate(PROMPT_KINDS)}}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    model = SimpleNamespace(config=SimpleNamespace(text=SimpleNamespace(num_hidden_layers=n_layers)))
    reports = budget_sweep(model, None, [])
    expected = [("full", {}, None, 1.0)]                    # (policy, params, params_by_type, budget)
    last_knobs = {}
    for image_keep in BUDGETS:
        expected.append(("random", {"S": image_keep}, None, image_keep))
        measured = {kind: round(0.3 + 0.5 * image_keep + 0.01 * i, 4) for i, kind in enumerate(PROMPT_KINDS)}
        lengths = {kind: 180 + 10 * i + image_keep for i, kind in enumerate(PROMPT_KINDS)}
        for policy in SWEEP_POLICIES:
            by_type = {kind: budget_params(policy, image_keep, measured[kind], n_layers, lengths[kind])
                       for kind in PROMPT_KINDS}
            if by_type == last_knobs.get(policy):
                assert policy == "fastv" and by_type["caption"]["R"] == FASTV_MAX_R
                continue
            last_knobs[policy] = by_type
            if all(knobs == by_type["caption"] for knobs in by_type.values()):
                expected.append((policy, by_type["caption"], None, image_keep))
            else:
                expected.append((policy, None, by_type, image_keep))
    expected += [(policy, params, None, budget) for budget, policy, params, _ in ABLATIONS]
    assert runs == [run[:3] for run in expected]
    assert [r["budget"] for r in reports] == [run[3] for run in expected]
    assert ("fastv", 0.1) not in {(r["policy"], r["budget"]) for r in reports}   # out of its reach
    # Each peer, and an ablation where `random` ran at its budget (A-VL's choice alone at 0.5), against
    # `random` at that budget, scene by scene: 12 of random's 6 + 5 + round(8 * budget); `random` evicting
    # 5% (0.95) has no `random` row at its budget to be paired with.
    paired = [r for r in reports[1:] if r["policy"] != "random"]
    assert paired[-1]["line"] == "avl, its choice only" and paired[-1]["budget"] == 0.5
    for r in paired:
        random_right = [6, 5, round(8 * r["budget"])]
        assert r["of_random"] == pytest.approx(12 / sum(random_right))
        assert r["of_random_ci"] == paired_ratio_interval([5, 4, 3], random_right)
    assert not any("of_random" in r for r in reports if r not in paired)


def test_tally_weights_each_answer_by_its_steps_and_bytes():
    """Answers of different lengths and sizes: the attended ratio is every step's rows over every step's dense
    rows (not a mean of answers' ratios); a kind's KV ratio is its peak bytes over its dense bytes (not what
    the cache held after the prefill); the scene counts stay in scene order (scene 0 answered wrong here)."""
    tally = Tally()
    questions = held_out_set(seed=3, n_scenes=2)
    colour = [q for q in questions if q.kind == "colour"]
    caption = next(q for q in questions if q.kind == "caption" and q.scene_index == 1)
    answers = ((colour[0], "nothing", 10, 20, 6, 8, 1), (colour[1], colour[1].answer, 10, 60, 10, 40, 3),
               (caption, caption.answer, 30, 40, 10, 10, 2))
    for question, prediction, kv, dense, per_step, per_step_dense, steps in answers:
        tally.add(question, prediction, SimpleNamespace(
            kv_cache_bytes_peak=kv, kv_cache_bytes_after_prefill=kv // 2, kv_cache_bytes_dense=dense,
            kv_cache_bytes_dense_after_prefill=dense // 2, cached_tokens=dense // 4 + steps, hires_tokens_read=0,
            attended_per_layer=[[per_step]] * steps, prefill_attended_per_layer=[1],
            attended_tokens_per_step=per_step, attended_tokens_per_step_dense=per_step_dense))
    r = tally.report()
    assert r["attended_ratio"] == (6 * 1 + 10 * 3 + 10 * 2) / (8 * 1 + 40 * 3 + 10 * 2)
    assert r["kv_ratio_by_type"] == {"colour": (10 + 10) / (20 + 60), "caption": 30 / 40}
    assert r["kv_ratio"] == (10 + 10 + 30) / (20 + 60 + 40)
    assert r["right_by_scene"] == [0, 2]
    assert r["cached_tokens_by_type"] == {"colour": (6 + 18) / 2, "caption": 12}
    # After the prefill each held half its peak, of a dense cache half its final one.
    assert r["kv_ratio_after_prefill"] == (5 + 5 + 15) / (10 + 30 + 20)
    assert r["kv_ratio_after_prefill_by_type"] == {"colour": (5 + 5) / (10 + 30), "caption": 15 / 20}


def fake_stats(kv, dense, attended_per_layer, prefill_per_layer, prompt_tokens=20, hires_tokens_read=0):
    """What Tally reads of a GenerationStats."""
    steps = len(attended_per_layer)
    return SimpleNamespace(kv_cache_bytes_peak=kv, kv_cache_bytes_dense=dense, hires_tokens_read=hires_tokens_read,
                           kv_cache_bytes_after_prefill=kv, kv_cache_bytes_dense_after_prefill=dense,
                           cached_tokens=prompt_tokens + steps,
                           attended_per_layer=attended_per_layer, prefill_attended_per_layer=prefill_per_layer,
                           attended_tokens_per_step=sum(map(sum, attended_per_layer)) / steps if steps else None,
                           attended_tokens_per_step_dense=2 * sum(map(sum, attended_per_layer)) / steps if steps else None)


def test_tally_counts_by_hand():
    """Two scenes, six prompts each: scene 0 all right; scene 1 wrong on "where" and on its caption, which
    names its first object only. Every field of the report derived here."""
    questions = held_out_set(seed=3, n_scenes=2)
    tally = Tally()
    for q in questions:
        prediction = q.answer
        if q.scene_index == 1 and q.kind == "where":
            prediction = "nowhere"
        if q.scene_index == 1 and q.kind == "caption":
            prediction = q.scene.objects[0].describe()
        kv = 10 if q.kind == "caption" else 4
        tally.add(q, prediction, fake_stats(kv, 20, [[3, 3], [5, 5]], [7, 7]))
    r = tally.report()
    assert r["n_questions"] == 12 and r["accuracy"] == 10 / 12
    assert r["right_by_scene"] == [6, 4] and r["accuracy_ci"] == clustered_wilson_interval([6, 4], [6, 6])
    assert r["accuracy_by_type"] == {kind: 0.5 if kind in ("where", "caption") else 1.0 for kind in PROMPT_KINDS}
    assert r["accuracy_by_type_ci"]["where"] == wilson_interval(1, 2)
    objects = [len(q.scene.objects) for q in questions if q.kind == "caption"]       # per caption
    assert r["caption_objects"] == (objects[0] + 1) / sum(objects)
    assert r["caption_objects_ci"] == clustered_wilson_interval([objects[0], 1], objects)
    assert r["caption_errors"]["objects"] == 1                       # the short caption names too few
    assert r["kv_ratio_by_type"] == {kind: (10 if kind == "caption" else 4) / 20 for kind in PROMPT_KINDS}
    assert r["kv_ratio"] == (2 * 10 + 10 * 4) / (12 * 20)
    assert r["attended_ratio"] == 0.5                                 # the fake's dense count is twice
    # prefill: 7 (7 + 1) / 2 pairs in each of 2 layers; decode: 16 rows in all
    assert r["attention_pairs"] == 2 * 28 + 16
    # Added scene 1 first, the counts stay in scene order (paired_ratio_interval pairs them by scene).
    backwards = Tally()
    for q in sorted(questions, key=lambda q: -q.scene_index):
        backwards.add(q, q.answer if q.scene_index == 1 else "wrong", fake_stats(4, 20, [[3, 3], [5, 5]], [7, 7]))
    assert backwards.report()["right_by_scene"] == [0, 6]


def test_sweep_plot_is_a_png_with_every_policy_drawn(tmp_path):
    reports = [report("full", 1.0, 1.0, 1.0)] + [report(p, a, kv, b) for p, a, kv, b in
                                                  [("random", 0.9, 0.6, 0.5), ("random", 0.7, 0.4, 0.25),
                                                   ("avl", 0.95, 0.58, 0.5), ("avl", 0.8, 0.38, 0.25)]]
    path = tmp_path / "sweep.png"
    plot_sweep(reports, path, "test")
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]      # no temporary file left behind
    with Image.open(path) as picture:
        pixels = picture.convert("RGB")
    # Each policy's points: x = KV ratio over (0, 1), y = accuracy over (0, 1), in the plot's frame.
    colours = {"full": PALETTE[0], "random": PALETTE[1], "avl": PALETTE[2]}
    for r in reports:
        colour = colours[r["policy"]]
        assert pixels.getpixel(pixel(r["kv_ratio"], r["accuracy"], (0, 1), (0, 1))) == colour, r["policy"]


def test_a_caption_is_right_in_any_order_with_each_object_once():
    scene = Scene((SceneObject("circle", "red", 1, 2, 5, (220, 40, 40)),
                   SceneObject("square", "blue", 3, 4, None, (50, 90, 235))))
    question = Question(0, "caption", "Describe the image.", scene.caption(), scene)
    red, blue = (obj.describe() for obj in scene.objects)
    assert is_correct(question, f"{red} and {blue}") and is_correct(question, f"{blue} and {red}")
    assert not is_correct(question, f"{red} and {blue} and {red}")       # a repeat: three objects named
    assert not is_correct(question, red)


def test_caption_errors_name_the_wrong_fields():
    scene = Scene((SceneObject("circle", "red", 1, 2, 5, (220, 40, 40)),
                   SceneObject("square", "blue", 3, 4, None, (50, 90, 235))))
    assert caption_errors(scene.caption(), scene) == dict(colour=0, shape=0, place=0, digit=0, objects=0)
    said = "red circle at row 1 column 3 with digit 8 and green square at row 3 column 4"
    assert caption_errors(said, scene) == dict(colour=1, shape=0, place=1, digit=1, objects=0)
    # The first digit is left out, the second is made up, and a third object is named.
    said = "red circle at row 1 column 2 and blue square at row 3 column 4 with digit 1 and red cross at row 1 column 1"
    assert caption_errors(said, scene) == dict(colour=0, shape=0, place=0, digit=2, objects=1)
    # Objects are paired by what they say, not by where the caption puts them: named in the other order,
    # nothing is wrong; the first left out, the second is still right; a third made up first, the two
    # that follow are still the scene's.
    said = "blue square at row 3 column 4 and red circle at row 1 column 2 with digit 5"
    assert caption_errors(said, scene) == dict(colour=0, shape=0, place=0, digit=0, objects=0)
    alone = caption_errors("blue square at row 3 column 4", scene)
    assert alone == dict(colour=0, shape=0, place=0, digit=0, objects=1)
    said = "green cross at row 2 column 2 and " + scene.caption()
    assert caption_errors(said, scene) == dict(colour=0, shape=0, place=0, digit=0, objects=1)
    # Colour, shape and place wrong against either object; no digit, as the square has none: 3 wrong
    # fields paired with the square, 4 with the circle.
    said = "green cross at row 4 column 1"
    assert caption_errors(said, scene) == dict(colour=1, shape=1, place=1, digit=0, objects=1)
    # A tie goes to the first scene object in the scene's order: "red square at row 3 column 4 with digit
    # 5" is 2 fields from the circle (shape, place) and 2 from the square (colour, digit).
    said = "red square at row 3 column 4 with digit 5"
    assert caption_errors(said, scene) == dict(colour=0, shape=1, place=1, digit=0, objects=1)
    swapped = Scene(tuple(reversed(scene.objects)))
    assert caption_errors(said, swapped) == dict(colour=1, shape=0, place=0, digit=1, objects=1)
    # Objects are the caption's parts as is_correct reads them: no empty ones.
    assert caption_errors(scene.caption() + " and ", scene) == caption_errors(scene.caption(), scene)
    assert caption_errors("", scene) == dict(colour=0, shape=0, place=0, digit=0, objects=1)


def test_attention_maps_and_filter_layer_are_checked(tmp_path, capsys):
    """Pictures already in --attention-maps are replaced only with --force, checked before the work; a
    --filter-layer the toy has no layer for is refused once its layers are known."""
    from tinyavl.toy.evaluate import main
    (tmp_path / "caption.png").write_text("the user's")
    assert main(["--n", "1", "--policy", "avl", "--attention-maps", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "caption.png").read_text() == "the user's"
    assert main(["--n", "1", "--policy", "fastv", "--filter-layer", "99"]) == 2
    assert "at most" in capsys.readouterr().err
    # A folder still to be made, under a file: refused before the work, not a traceback after it.
    (tmp_path / "notes.txt").write_text("the user's")
    for folder in (tmp_path / "notes.txt" / "maps", tmp_path / "notes.txt" / "a" / "b"):
        assert main(["--n", "1", "--attention-maps", str(folder)]) == 2
        assert capsys.readouterr().err == (f"error: --attention-maps {folder} cannot be made: "
                                           f"{tmp_path / 'notes.txt'} is a file\n")


def test_pictures_in_attention_maps_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    (tmp_path / "caption.png").write_text("the user's")
    monkeypatch.setattr(evaluate_module, "load_pretrained", no_model)
    assert evaluate_module.main(["--n", "1", "--attention-maps", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "caption.png").read_text() == "the user's"


def test_a_new_attention_maps_folder_inside_the_model_folder_is_refused(tmp_path, capsys, monkeypatch):
    model = tmp_path / "toy"
    model.mkdir()
    monkeypatch.setattr(evaluate_module, "load_pretrained", no_model)
    assert evaluate_module.main(["--n", "1", "--weights", str(model), "--attention-maps", str(model / "maps")]) == 2
    assert "lies inside the input folder" in capsys.readouterr().err and not (model / "maps").exists()


def test_force_without_an_output_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_pretrained", no_model)
    assert evaluate_module.main(["--n", "1", "--force"]) == 2
    assert "--force replaces the --plot file" in capsys.readouterr().err


def test_an_existing_plot_is_refused_before_the_sweep(tmp_path, capsys, monkeypatch):
    plot = tmp_path / "sweep.png"
    plot.write_text("the user's")
    monkeypatch.setattr(evaluate_module, "load_pretrained", no_model)
    assert evaluate_module.main(["--table", "--plot", str(plot)]) == 2
    assert "already exists" in capsys.readouterr().err and plot.read_text() == "the user's"


def test_attention_maps_draw_the_first_scenes_prompts(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(evaluate_module, "save_attention_map",
                        lambda path, *args, **kwargs: drawn.append((path.name, kwargs["question"])))
    assert evaluate_module.main(["--n", "2", "--attention-maps", str(tmp_path), "--json"]) == 0
    first = [q for q in held_out_set(seed=1, n_scenes=2) if q.scene_index == 0]
    assert drawn == [(f"{q.kind}.png", q.text) for q in first]


def test_a_run_stopped_before_its_first_picture_leaves_no_folder(tmp_path, monkeypatch):
    """Ctrl-C before the first attention map: the new folders --attention-maps names are not there."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate_module, "evaluate", interrupted)
    assert evaluate_module.main(["--n", "1", "--attention-maps", str(tmp_path / "new" / "maps")]) == 130
    assert not (tmp_path / "new").exists()


def test_hires_mode_on_a_model_without_the_view_is_refused(capsys):
    """--hires-mode would change nothing on the plain toy: refused, not silently ignored."""
    assert evaluate_module.main(["--n", "1", "--hires-mode", "low-res"]) == 2
    assert "--hires-mode" in capsys.readouterr().err


def test_a_short_answer_is_compared_without_surrounding_space():
    question = Question(0, "colour", "What colour is the circle?", "red", SCENE)
    assert is_correct(question, " red\n") and not is_correct(question, "reddish")


def test_an_object_named_twice_counts_once():
    red, blue = (obj.describe() for obj in SCENE.objects)
    assert caption_objects_right(f"{red} and {red}", SCENE) == 1
    assert caption_objects_right(f"{blue} and {red}", SCENE) == 2 and caption_objects_right("", SCENE) == 0


def test_paired_ratio_interval_is_a_95_percent_one():
    """Full right on all 6 prompts of 100 scenes, the policy on all of the first 50: a draw's ratio is the share
    of its 100 scenes from the first half, Binomial(100, 1/2) / 100, whose 2.5% and 97.5% quantiles are 0.40 and
    0.60 (P(X <= 39) = 0.018, P(X <= 40) = 0.028); a 90% interval would be 0.42-0.58."""
    low, high = paired_ratio_interval([6] * 50 + [0] * 50, [6] * 100)
    assert low == pytest.approx(0.40, abs=0.011) and high == pytest.approx(0.60, abs=0.011)


def test_kv_ratio_is_bytes_held_over_dense_bytes():
    """A caption's dense cache is five times a short answer's: held 50 of 100 bytes on it, all 20 of 20 on each of
    the five short answers, the ratio is 150 / 200 (a mean of the kinds' ratios would be 0.917)."""
    tally = Tally()
    for question in held_out_set(seed=3, n_scenes=1):
        caption = question.kind == "caption"
        tally.add(question, question.answer, SimpleNamespace(
            kv_cache_bytes_peak=50 if caption else 20, kv_cache_bytes_dense=100 if caption else 20, hires_tokens_read=0,
            kv_cache_bytes_after_prefill=50 if caption else 20, kv_cache_bytes_dense_after_prefill=100 if caption else 20,
            cached_tokens=20,
            attended_per_layer=[], prefill_attended_per_layer=[], attended_tokens_per_step=None,
            attended_tokens_per_step_dense=None))
    assert tally.report()["kv_ratio"] == 0.75


# Each prompt kind's accuracy and interval in a report_row, all different: a cell under the wrong header shows.
KIND_ACCURACY = {"colour": (0.91, (0.81, 0.96)), "shape": (0.82, (0.72, 0.89)), "count": (0.73, (0.63, 0.81)),
                 "digit": (0.64, (0.54, 0.73)), "where": (0.55, (0.45, 0.65)), "caption": (0.46, (0.36, 0.56))}


def report_row(policy, kv, kv_caption, attended):
    return {"policy": policy, "policy_params": {}, "budget": 0.5, "accuracy": 0.5, "accuracy_ci": (0.4, 0.6),
            "right_by_scene": [3, 3], "accuracy_by_type": {kind: a for kind, (a, _) in KIND_ACCURACY.items()},
            "accuracy_by_type_ci": {kind: ci for kind, (_, ci) in KIND_ACCURACY.items()}, "caption_objects": 0.375,
            "caption_objects_ci": (0.25, 0.5), "kv_ratio": kv, "kv_ratio_by_type": {"caption": kv_caption},
            "attended_ratio": attended}


def test_the_table_is_markdown_with_each_cell_under_its_header():
    lines = format_table([report_row("random", 0.61, 0.72, 0.33)]).splitlines()
    head, rule, row = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    assert rule == ["---"] * len(head)                  # GitHub renders a table only with one rule cell a column
    cells = dict(zip(head, row))
    assert (cells["KV bytes"], cells["KV bytes, captions"], cells["attended"]) == ("0.61", "0.72", "0.33")
    assert (cells["budget"], cells["policy"], cells["overall"]) == ("0.5", "random", "0.500 (0.400-0.600)")
    assert {kind: cells[kind] for kind in KIND_ACCURACY} == {
        "colour": "0.91 (0.81-0.96)", "shape": "0.82 (0.72-0.89)", "count": "0.73 (0.63-0.81)",
        "digit": "0.64 (0.54-0.73)", "where": "0.55 (0.45-0.65)", "caption": "0.46 (0.36-0.56)"}
    assert cells["caption objects"] == "0.375 (0.250-0.500)"
    assert markdown_table(["a", "b"], [["1", "2"]]) == ["| a | b |", "|---|---|", "| 1 | 2 |"]


def test_parameters_set_per_kind_show_their_range():
    report = {"policy_params": None, "policy_params_by_type": {"colour": {"recent": 0.46}, "where": {"recent": 0.45},
                                                               "caption": {"recent": 0.47}}}
    assert shown_params(report) == "recent=0.45-0.47 (caption 0.47)"


def test_a_plots_words_stay_apart():
    """The plots' font draws a space at least 3 px wide: Pillow's default 10 px Aileron drew it 2 px, and a
    label read "held-outscenes"."""
    font = plot_font()
    if not isinstance(font, ImageFont.FreeTypeFont):
        pytest.skip("Pillow without FreeType: its bitmap font has a size of its own")
    assert font.getlength("held-out scenes") - font.getlength("held-outscenes") >= 3


def test_a_title_with_a_newline_is_drawn_on_one_line(tmp_path):
    """The sweep's title names the model folder, whose name may hold a newline: Pillow cannot measure such a
    text (a ValueError after the whole sweep, before); drawn as the same words on one line."""
    reports = [report("full", 1.0, 1.0, 1.0), report("random", 0.9, 0.6, 0.5)]
    plot_sweep(reports, tmp_path / "two-lines.png", "toy LLaVA (toy\nb), 2 scenes")
    plot_sweep(reports, tmp_path / "one-line.png", "toy LLaVA (toy b), 2 scenes")
    pictures = [Image.open(tmp_path / name).convert("RGB") for name in ("two-lines.png", "one-line.png")]
    assert pictures[0].tobytes() == pictures[1].tobytes()


def test_tick_labels_keep_the_digits_a_tick_needs():
    """A log axis's ticks 1, 2 and 5 times powers of ten, below 0.01 too (two decimals printed 0.005 as 0.01);
    a linear axis's, the range split evenly, in two decimals."""
    assert [tick_label(x, log_axis=True) for x in (2.0, 0.25, 0.5, 0.005, 0.002, 1e-4, 5000.0)] == [
        "2", "0.25", "0.5", "0.005", "0.002", "0.0001", "5000"]
    assert [tick_label(x, log_axis=False) for x in (38.907512, 40.0, 0.1 + 0.2)] == ["38.91", "40", "0.30"]


def test_the_sweeps_title_names_a_model_that_is_not_the_committed_toy():
    from tinyavl.cli import TOY_WEIGHTS
    from tinyavl.loading import read_config
    from tinyavl.toy.evaluate import sweep_title
    assert sweep_title(TOY_WEIGHTS, read_config(TOY_WEIGHTS), 2, 7) == "toy LLaVA, 2 held-out scenes (seed 7) x 6 prompts"
    hires = TOY_WEIGHTS.parent / "toy-hires"
    assert (sweep_title(hires, read_config(hires), 100, 1)
            == "toy LLaVA (toy-hires), 100 held-out fine scenes (seed 1) x 6 prompts")


def test_wilson_interval_of_nothing_right_starts_at_zero_not_below():
    """At 0 right the lower bound is 0 (centre = half, by hand); in floating point centre - half comes out at
    -3e-17 for n = 7, 9, 14, ..., which the table would print as "-0.000". Never below 0. (The upper bound
    there is z^2 / (n + z^2): 3.8415 / 10.8415 = 0.354 at n = 7.)"""
    for n in range(1, 101):
        assert 0.0 <= wilson_interval(0, n)[0] < 1e-15, n
    assert format_interval(0.0, wilson_interval(0, 7), 3) == "0.000 (0.000-0.354)"


def test_hires_tokens_read_is_per_answer():
    """Two answers that read 10 and 30 high-resolution keys: 20 per answer (the module docstring's unit), and
    attention_pairs adds them to each answer's 3 prefill pairs in each of 2 layers."""
    tally = Tally()
    questions = held_out_set(seed=3, n_scenes=1)[:2]
    for question, read in zip(questions, (10, 30)):
        tally.add(question, question.answer, fake_stats(1, 1, [], [2, 2], hires_tokens_read=read))
    report = tally.report()
    assert report["hires_tokens_read"] == 20
    assert report["attention_pairs"] == (2 * 3 + 10 + 2 * 3 + 30) / 2


def test_a_special_token_inside_an_answer_makes_it_wrong(monkeypatch):
    """evaluate scores an answer's tokens before the EOS that ended it, special tokens written out: the right
    words then <pad> are wrong (processor.decode, written for a reader, leaves <pad> out and passed them),
    the right words then </s> are right, and an answer cut by max_new_tokens is scored as it stands."""
    from tinyavl import load_processor
    from tinyavl.cli import TOY_WEIGHTS

    _, processor = load_processor(TOY_WEIGHTS)
    tokenizer = processor.tokenizer
    pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
    questions = [q for q in held_out_set(seed=3, n_scenes=2) if q.kind != "caption"]
    answers = {}

    def answering(model, input_ids, *args, **kwargs):
        ids, finish = answers[tuple(input_ids[0].tolist())]
        return ids, SimpleNamespace(**vars(fake_stats(1, 1, [[1]] * len(ids), [2])), finish_reason=finish)

    monkeypatch.setattr(evaluate_module, "generate", answering)
    for ending, finish, right in [([eos], "eos", True), ([], "length", True), ([pad, eos], "eos", False),
                                  ([pad], "length", False)]:
        for q in questions:
            prompt = tuple(q.inputs(processor)["input_ids"][0].tolist())
            answers[prompt] = (tokenizer.encode(q.answer, add_special_tokens=False).ids + ending, finish)
        stand_in = SimpleNamespace(config=SimpleNamespace(hires=None))           # generate is replaced
        assert evaluate_module.evaluate(stand_in, processor, questions, "full")["accuracy"] == float(right), ending


def test_a_plots_ticks_labels_and_legend_sit_where_worked_out_by_hand(tmp_path, drawn_text):
    """3 x-ticks over 10..40 label 10, 20, 30 and 40, each centred a third of the frame apart; the y axis
    over 0..1 is labelled every 0.2; the x label is centred under the frame; legend entries 18 px apart."""
    save_line_plot(tmp_path / "p.png", {"a": [(10, 0.2), (40, 0.8)], "b": [(20, 0.5)]}, "xl", "yl", "title",
                   y_range=(0, 1), x_ticks=3)
    texts = [text for _, text, _ in drawn_text]
    centre = {text: xy[0] + width / 2 for xy, text, width in drawn_text}
    assert [text for text in texts if text in ("10", "20", "30", "40")] == ["10", "20", "30", "40"]
    for i, label in enumerate(("10", "20", "30", "40")):
        assert centre[label] == pytest.approx(LEFT + i * (RIGHT - LEFT) / 3, abs=1)
    assert [text for text in texts if text.startswith("0.") or text == "1.00"] == \
        ["0.00", "0.20", "0.40", "0.60", "0.80", "1.00"]
    assert centre["xl"] == pytest.approx((LEFT + RIGHT) / 2, abs=1)
    legend = {text: xy for xy, text, _ in drawn_text if text in ("a", "b")}
    assert legend["b"][1] - legend["a"][1] == pytest.approx(18, abs=1)


def test_a_log_axis_ticks_every_decade_to_the_last_and_places_points_by_their_log(tmp_path, drawn_text):
    save_line_plot(tmp_path / "p.png", {"a": [(10, 0.2), (1000, 0.8)]}, "xl", "yl", "t", y_range=(0, 1), log_x=True)
    ticks = ("10", "20", "50", "100", "200", "500", "1000")
    assert [text for _, text, _ in drawn_text if text in ticks] == list(ticks)
    save_line_plot(tmp_path / "q.png", {"a": [(100, 0.5)]}, "x", "y", "t", x_range=(10, 1000), y_range=(0, 1),
                   log_x=True)
    with Image.open(tmp_path / "q.png") as picture:                 # 100: half-way from 10 to 1000 on a log axis
        assert picture.convert("RGB").getpixel((round((LEFT + RIGHT) / 2), round((TOP + BOTTOM) / 2))) == PALETTE[0]


def test_a_plot_joins_points_in_x_order_and_draws_error_bars(tmp_path):
    """Series a, given as (1, 0), (0, 1), (2, 1), is drawn (0, 1)-(1, 0)-(2, 1): nothing at (1, 1), which a
    line in the given order, (0, 1)-(2, 1), would cross. Series e's point (0.5, 1.5) has a bar from 1 to 2."""
    ranges = (0, 2), (0, 2)
    save_line_plot(tmp_path / "p.png", {"a": [(1, 0), (0, 1), (2, 1)], "e": [(0.5, 1.5, 1.0, 2.0)]}, "x", "y", "t",
                   x_range=ranges[0], y_range=ranges[1])
    with Image.open(tmp_path / "p.png") as picture:
        pixels = picture.convert("RGB")
    assert pixels.getpixel(pixel(1.0, 1.0, *ranges)) == (255, 255, 255)
    assert pixels.getpixel(pixel(0.5, 0.5, *ranges)) == PALETTE[0]                # on (0, 1)-(1, 0)
    assert pixels.getpixel(pixel(0.5, 1.95, *ranges)) == PALETTE[1]               # the bar, up to 2
    assert pixels.getpixel(pixel(0.5, 1.05, *ranges)) == PALETTE[1]               # and down to 1


def test_a_plot_keeps_a_file_it_was_not_told_to_replace(tmp_path):
    path = tmp_path / "p.png"
    path.write_text("the user's")
    with pytest.raises(UserError):
        save_line_plot(path, {"a": [(0, 0.5), (1, 0.5)]}, "x", "y", "t")
    assert path.read_text() == "the user's"


def test_table_plot_with_force_replaces_the_users_file(tmp_path, monkeypatch, capsys):
    """The tutorial's `--table --plot tutorial/figures/budget-sweep.png --force`: the file there is replaced
    by the sweep's picture, not refused after the whole sweep."""
    plot = tmp_path / "sweep.png"
    plot.write_text("the user's")
    monkeypatch.setattr(evaluate_module, "budget_sweep", lambda *a, **k: [report("full", 1.0, 1.0, 1.0),
                                                                          report("random", 0.9, 0.6, 0.5)])
    assert evaluate_module.main(["--table", "--n", "2", "--plot", str(plot), "--force", "--json"]) == 0
    with Image.open(plot) as picture:
        assert picture.format == "PNG"


def test_table_json_and_title_count_scenes_not_prompts(tmp_path, monkeypatch, capsys):
    """--n counts scenes; each asks 6 prompts: the JSON's n_scenes and the plot's title say so."""
    titles = []
    monkeypatch.setattr(evaluate_module, "budget_sweep", lambda *a, **k: [report("full", 1.0, 1.0, 1.0)])
    monkeypatch.setattr(evaluate_module, "plot_sweep", lambda reports, path, title, replace: titles.append(title))
    assert evaluate_module.main(["--table", "--n", "2", "--plot", str(tmp_path / "s.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_scenes"] == 2
    assert titles == ["toy LLaVA, 2 held-out scenes (seed 1) x 6 prompts"]


def test_attention_maps_with_force_replace_the_pictures(tmp_path, capsys):
    """--force replaces a picture already in --attention-maps, as it promises, rather than stopping there."""
    (tmp_path / "caption.png").write_text("the user's")
    assert evaluate_module.main(["--n", "1", "--attention-maps", str(tmp_path), "--force", "--json"]) == 0
    with Image.open(tmp_path / "caption.png") as picture:
        assert picture.format == "PNG"


@pytest.mark.parametrize("argv", [["--attention-maps", "maps"], ["--S", "0.3"]])
def test_table_refuses_what_it_would_ignore(argv, tmp_path, monkeypatch, capsys):
    """--table runs its own policies and draws no maps: an option it would ignore is refused, before any work."""
    monkeypatch.setattr(evaluate_module, "load_pretrained", no_model)
    monkeypatch.chdir(tmp_path)
    assert evaluate_module.main(["--table", "--n", "2", *argv]) == 2
    assert "--table runs its own list of policies" in capsys.readouterr().err and not (tmp_path / "maps").exists()


def test_the_filter_layer_note_is_printed(monkeypatch, capsys):
    """What check_filter_layer has to say about --filter-layer reaches stderr, alone."""
    monkeypatch.setattr(evaluate_module, "check_filter_layer", lambda *a: "note: the filter layer")
    monkeypatch.setattr(evaluate_module, "evaluate", lambda *a, **k: {"accuracy": 1.0})
    assert evaluate_module.main(["--n", "1", "--json"]) == 0
    assert capsys.readouterr().err == "note: the filter layer\n"


def test_default_held_out_set_is_100_scenes_of_seed_1():
    """The held-out set the README's tables measure, and the module's docstring names."""
    args = evaluate_module.parse_args([])
    assert (args.n, args.seed) == (100, 1)            # the module docstring's "100 scenes of seed 1"


def test_sweep_log_line_shows_each_measured_number(monkeypatch):
    """The progress line of each run: accuracy, KV held over the run and after the prefill, each to 3 places."""
    lines = []

    def fake_evaluate(model, processor, questions, policy, params=None, hires_mode=None, params_by_type=None):
        return {"policy": policy, "policy_params": params, "accuracy": 0.8125, "right_by_scene": [6, 5],
                "kv_ratio": 0.6125, "kv_ratio_after_prefill": 0.4375, "seconds": 3.0,
                "kv_ratio_after_prefill_by_type": {"caption": 0.3125},
                "kv_ratio_by_type": {kind: 0.6125 for kind in PROMPT_KINDS},
                "cached_tokens_by_type": {kind: 200 for kind in PROMPT_KINDS}}

    monkeypatch.setattr(evaluate_module, "evaluate", fake_evaluate)
    model = SimpleNamespace(config=SimpleNamespace(text=SimpleNamespace(num_hidden_layers=4)))
    budget_sweep(model, None, [], log=lines.append)
    assert lines[0] == ("budget 1.0: full: accuracy 0.812, KV 0.613, after the prefill 0.438 (captions 0.312) (3 s)")
    assert lines[1].startswith("budget 0.5: random S=0.5: accuracy 0.812")       # a policy with its parameters


def test_sweep_plot_draws_each_line_with_its_interval(monkeypatch, tmp_path):
    """An ablation is a line of its own beside its policy's, and each point carries its Wilson interval."""
    drawn = {}
    monkeypatch.setattr(evaluate_module, "save_line_plot", lambda path, series, **kwargs: drawn.update(series))
    ablation = {**report("avl", 0.7, 0.55, 0.5), "line": "avl, its choice only"}
    plot_sweep([report("avl", 0.8, 0.5, 0.5), ablation], tmp_path / "p.png", "t")
    assert drawn == {"avl": [(0.5, 0.8, *wilson_interval(48, 60))],
                     "avl, its choice only": [(0.55, 0.7, *wilson_interval(42, 60))]}


def test_no_decode_step_has_no_attended_ratio_and_the_table_says_so():
    """Answers of one token have no decode step: no attended ratio (not 0), shown as "-" in the table."""
    tally = Tally()
    for question in held_out_set(seed=3, n_scenes=1):
        tally.add(question, question.answer, fake_stats(4, 20, [], [7, 7]))      # one-token answers
    r = tally.report()
    assert r["attended_ratio"] is None
    row = dict(zip(*([c.strip() for c in line.strip("|").split("|")]
                     for line in format_table([{**r, "policy": "full", "policy_params": {}}]).splitlines()[::2])))
    assert row["attended"] == "-"


def test_caption_errors_are_summed_over_captions():
    """caption_errors counts every caption's errors, not the last one's."""
    questions = [q for q in held_out_set(seed=3, n_scenes=2) if q.kind == "caption"]
    tally = Tally()
    for q in questions:
        tally.add(q, "", fake_stats(4, 20, [], [7]))          # both captions name nothing: 2 wrong counts
    assert tally.report()["caption_errors"]["objects"] == 2


def test_evaluate_refuses_a_bad_hires_mode_and_params_beside_params_by_type():
    """For a caller of evaluate(): a mode it does not know, and params it would drop, are refused."""
    with pytest.raises(ValueError, match="hires_mode must be one of"):
        evaluate_module.evaluate(None, None, [], hires_mode="every-block")
    with pytest.raises(ValueError, match="params_by_type replaces params"):
        evaluate_module.evaluate(None, None, [], "random", params={"S": 0.5},
                                 params_by_type={kind: {"S": 0.25} for kind in PROMPT_KINDS})


def test_clustered_interval_passes_its_z_on():
    """z reaches the Wilson interval inside, in the clustered case (design effect 20/3 by hand: 60 answers
    count as 9, 0.7 of them right) and in the all-right one (Wilson's at the 10 scenes)."""
    assert clustered_wilson_interval([6] * 7 + [0] * 3, [6] * 10, z=1.0) == \
        pytest.approx(wilson_interval(6.3, 9, z=1.0))
    assert clustered_wilson_interval([6] * 10, [6] * 10, z=1.0) == pytest.approx(wilson_interval(10, 10, z=1.0))
