"""The attention study's aggregation on a hand-made recording: every number derived by hand."""
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

from cache_helpers import build_model, make_prompt, one_thread, positions_per_head, run_steps  # noqa: F401
from cache_helpers import recording as logging_cache
from tinyavl.cache import AVLCache, KVCache
from tinyavl.toy import attention_study
from tinyavl.toy.attention_study import HiddenImageTokens, LayerChoiceAVL, report_markdown, study
from tinyavl.toy.intervals import clustered_wilson_interval


def recording():
    """Two layers; [sys 1 | image 10 | text]: a prompt of 12 tokens, then 3 decode steps (rows of 13, 14, 15).

    Image scores are given as 10 numbers per step; sys gets .2 and each text token .1 of the row's mass
    before normalising (the measures normalise)."""
    image = [
        [9, 8, 7, 6, 5, 1, 1, 1, 1, 1],    # prefill: top 50% {0..4}, top 30% {0, 1, 2}
        [9, 8, 7, 1, 1, 1, 1, 1, 1, 6],    # step 1: top 30% {0, 1, 2}
        [1, 1, 1, 9, 8, 7, 1, 1, 1, 6],    # step 2: top 30% {3, 4, 5}
        [9, 1, 8, 1, 1, 1, 7, 1, 1, 6],    # step 3: top 30% {0, 2, 6}
    ]
    rows = []
    for step, scores in enumerate(image):
        n_text = 1 + step
        rows.append([torch.tensor([2.0] + [float(v) for v in scores] + [1.0] * n_text)])
    # A second layer whose image scores are the first's reversed: its prefill top 50% is {5..9}.
    for layer_rows, scores in zip(rows, image):
        n_text = len(layer_rows[0]) - 11
        layer_rows.append(torch.tensor([2.0] + [float(v) for v in reversed(scores)] + [1.0] * n_text))
    recorder = SimpleNamespace(n_layers=2, n_sys=1, n_img=10, rows=rows)
    recorder.image_row = lambda step, layer: rows[step][layer][1:11]
    return recorder


def test_study_of_a_hand_made_recording(monkeypatch):
    monkeypatch.setattr(attention_study, "MAX_DISTANCE", 2)
    result = study([recording()])
    layer = result["layers"][0]
    # Shares over the decode rows (steps 1-3): image mass 36, 36, 36 (each row sums its 10 scores to 36);
    # sys 2; text 2, 3, 4 -> totals 40, 41, 42.
    assert layer["shares"]["image"] == pytest.approx((36 / 40 + 36 / 41 + 36 / 42) / 3)
    assert layer["shares"]["sys"] == pytest.approx((2 / 40 + 2 / 41 + 2 / 42) / 3)
    assert layer["bos"] == pytest.approx(layer["shares"]["sys"])           # sys is BOS alone here
    assert layer["sizes"]["image"] == pytest.approx((10 / 13 + 10 / 14 + 10 / 15) / 3)
    # Concentration of the prefill row's image scores (sum 40): top 1 = 9 / 40, top 5 = 35 / 40.
    assert layer["concentration"][0.1] == pytest.approx(9 / 40)
    assert layer["concentration"][0.5] == pytest.approx(35 / 40)
    # 30%-PPCI between steps: d = 1: (1,2) {0,1,2} vs {3,4,5} -> 0, (2,3) {3,4,5} vs {0,2,6} -> 0: mean 0.
    # d = 2: (1,3) {0,1,2} vs {0,2,6} -> 2/3.
    assert layer["ppci_steps"] == {1: 0.0, 2: pytest.approx(2 / 3)}
    # Capture of the prefill top 50% {0..4}: step 1 (9+8+7+1+1)/36, step 2 (1+1+1+9+8)/36, step 3 (9+1+8+1+1)/36.
    assert layer["capture"][0.5] == pytest.approx((26 / 36 + 20 / 36 + 20 / 36) / 3)
    # ... and of the top 30% {0, 1, 2}: 24/36, 3/36, 18/36.
    assert layer["capture"][0.3] == pytest.approx((24 + 3 + 18) / 36 / 3)
    # Layer 0's prefill top 50% {0..4} against layer 1's {5..9} (the reversed scores): nothing shared.
    assert result["ppci_layers"] == [[1.0, 0.0], [0.0, 1.0]]
    reversed_layer = result["layers"][1]
    assert reversed_layer["concentration"] == layer["concentration"]      # the same scores, reordered
    report = report_markdown(result).splitlines()
    # The table chapter 4 quotes, column by column, from the hand values above (text: 2, 3, 4 of 40, 41, 42;
    # its tokens 2, 3, 4 of 13, 14, 15), each to the 2 decimals the table prints (9 / 40 is 0.225: the
    # study's float32 sum may print it as 0.22 or 0.23).
    assert report[2] == ("| layer | sys: attention (tokens) | image: attention (tokens) | text: attention (tokens) "
                         "| BOS | image top 10% | image top 50% | capture, prefill top 50% | capture, top 30% |")
    by_hand = [(2 / 40 + 2 / 41 + 2 / 42) / 3, (1 / 13 + 1 / 14 + 1 / 15) / 3,              # sys (tokens)
               (36 / 40 + 36 / 41 + 36 / 42) / 3, (10 / 13 + 10 / 14 + 10 / 15) / 3,      # image (tokens)
               (2 / 40 + 3 / 41 + 4 / 42) / 3, (2 / 13 + 3 / 14 + 4 / 15) / 3,            # text (tokens)
               (2 / 40 + 2 / 41 + 2 / 42) / 3, 9 / 40, 35 / 40, 66 / 36 / 3, 45 / 36 / 3]  # BOS .. capture
    assert report[4].startswith("| 0 | ")
    assert [float(x) for x in re.findall(r"\d+\.\d+", report[4])] == pytest.approx(by_hand, abs=0.0051)


def test_object_coverage_by_hand():
    """The hand-made recording's prefill top 50%: layer 0 {0..4}, layer 1 {5..9}. Two objects in caption
    order, on patches {0, 1, 5, 6} and {3, 9}: layer 0 keeps 2/4 and 1/2, layer 1 keeps 2/4 and 1/2; a
    second scene with one object on {4, 5, 6, 7, 8} keeps 1/5 and 4/5 and has no second object."""
    first = SimpleNamespace(objects=[SimpleNamespace(patches=lambda: [0, 1, 5, 6]),
                                     SimpleNamespace(patches=lambda: [3, 9])])
    second = SimpleNamespace(objects=[SimpleNamespace(patches=lambda: [4, 5, 6, 7, 8])])
    coverage = attention_study.object_coverage([recording(), recording()], [first, second], keep=0.5)
    assert coverage == [[pytest.approx((2 / 4 + 1 / 5) / 2), pytest.approx(1 / 2)],
                        [pytest.approx((2 / 4 + 4 / 5) / 2), pytest.approx(1 / 2)]]
    lines = report_markdown({**study([recording()]), "object_coverage": coverage}).splitlines()
    assert "| 0 | 0.35 | 0.50 |" in lines and "| 1 | 0.65 | 0.50 |" in lines


def test_band_coverage_by_hand():
    """A 4 x 4 image (16 tokens) in two bands of two patch rows. Layer 0 scores fall with the token's
    index, so its top 50% is the first 8 tokens: the top band whole, none of the bottom one. Layer 1
    scores the two left columns high, so its top 50% is half of every row: 0.5 of each band. A second
    recording with layer 0 reversed (top 50% = the bottom band) averages layer 0 to 0.5 and 0.5."""
    def recorder(layer0):
        left = [2.0 if column < 2 else 1.0 for _ in range(4) for column in range(4)]   # (16,) row by row
        rows = [[torch.tensor(layer0), torch.tensor(left)]]
        return SimpleNamespace(n_layers=2, rows=rows, image_row=lambda step, layer: rows[step][layer])

    falling = [float(16 - i) for i in range(16)]
    assert attention_study.band_coverage([recorder(falling)], side=4, n_bands=2) == [[1.0, 0.0], [0.5, 0.5]]
    both = attention_study.band_coverage([recorder(falling), recorder(falling[::-1])], side=4, n_bands=2)
    assert both == [[0.5, 0.5], [0.5, 0.5]]
    with pytest.raises(ValueError, match="equal bands"):
        attention_study.band_coverage([recorder(falling)], side=4, n_bands=3)
    lines = report_markdown({**study([recording()]), "band_coverage": [[1.0, 0.0], [0.5, 0.5]]}).splitlines()
    assert "| 0 | 1.00 | 0.00 |" in lines and "| 1 | 0.50 | 0.50 |" in lines and any("band 2" in l for l in lines)


def test_ppci_across_scenes_by_hand():
    """Two recordings: the hand-made one, and one whose two layers are swapped. Layer 0's prefill top
    50% is {0..4} in the first and {5..9} in the second: they share nothing (0.0); the same holds in
    layer 1. The first recording with itself shares everything (1.0); one recording has no pair (None)."""
    first, swapped = recording(), recording()
    swapped.rows = [[layer1, layer0] for layer0, layer1 in swapped.rows]
    swapped.image_row = lambda step, layer: swapped.rows[step][layer][1:11]
    assert [x["ppci_scenes"] for x in study([first, swapped])["layers"]] == [0.0, 0.0]
    same = study([first, recording()])
    assert [x["ppci_scenes"] for x in same["layers"]] == [1.0, 1.0]
    assert "| two scenes | 1.00 | 1.00 |" in report_markdown(same).splitlines()
    assert study([first])["layers"][0]["ppci_scenes"] is None


def test_ppci_between_layers_and_scenes_takes_the_top_half():
    """Where a ranking's top half and top 30% overlap another's differently, the measures between layers
    and between scenes are of the top half (50%-PPCI, as the tables' titles say): layer 1's prefill row
    shifted by two, top 50% {2..6} against layer 0's {0..4} shares 3 of 5 (0.6); its top 30% {2, 3, 4}
    against {0, 1, 2} would share 1 of 3. Against the unshifted recording's layer 1 (reversed: top 50%
    {5..9}, top 30% {7, 8, 9}) it shares 2 of 5, where the top 30% would share nothing."""
    shifted = recording()
    shifted.rows[0][1] = torch.tensor([2.0, 1, 1, 9, 8, 7, 6, 5, 1, 1, 1, 1.0])   # sys | 10 image | text
    assert study([shifted])["ppci_layers"][0][1] == pytest.approx(3 / 5)
    assert study([recording(), shifted])["layers"][1]["ppci_scenes"] == pytest.approx(2 / 5)


def test_layer_sets_by_hand():
    assert attention_study.layer_sets(4) == [(), (0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]
    assert attention_study.layer_sets(3) == [(), (0,), (1,), (2,), (1, 2), (0, 1, 2)]  # the first half, (0,), is there
    assert attention_study.layer_sets(1) == [(), (0,)]


def kept_image_positions(cache, layer: int, n_sys: int, n_img: int) -> set:
    """The image positions a recorded prefill left in a layer (every head keeps the same ones)."""
    held = positions_per_head(cache.log[layer]["pos_after"])
    assert all(h == held[0] for h in held)
    return {p for p in held[0] if n_sys <= p < n_sys + n_img}


def test_layer_choice_avl_draws_in_its_layers_and_ranks_by_attention_in_the_others():
    """In a chosen layer the prefill keeps the top floor(S N_img) image tokens of a uniform draw from the
    generator seeded by `seed` (the first draw when that layer is the only one chosen); every other layer
    keeps what A-VL keeps, and with no layer chosen the two decode the same tokens, logit for logit."""
    model = build_model(n_layers=3, kv_heads=2)
    n_sys, n_img = 3, model.config.num_image_tokens
    ids, pixel_values = make_prompt(model, n_sys, n_text=8, seed=1)
    params = dict(S=0.5, C=0.5, K=1, P=1.0, T=1.0)
    avl, mixed = logging_cache(AVLCache)(**params), logging_cache(LayerChoiceAVL)([1], seed=5, **params)
    run_steps(model, ids, pixel_values, avl, 0)
    run_steps(model, ids, pixel_values, mixed, 0)
    draw = torch.rand(n_img, generator=torch.Generator().manual_seed(5))
    by_draw = {n_sys + int(i) for i in draw.argsort(descending=True)[:math.floor(0.5 * n_img)]}
    assert kept_image_positions(mixed, 1, n_sys, n_img) == by_draw
    assert kept_image_positions(avl, 1, n_sys, n_img) != by_draw       # attention picks another set here
    for layer in (0, 2):
        assert kept_image_positions(mixed, layer, n_sys, n_img) == kept_image_positions(avl, layer, n_sys, n_img)

    plain_logits, tokens = run_steps(model, ids, pixel_values, AVLCache(**params), 6)
    none_logits, _ = run_steps(model, ids, pixel_values, LayerChoiceAVL([], **params), 6, tokens=tokens)
    assert torch.equal(plain_logits, none_logits)


def test_choice_table_rows_and_intervals():
    report = {"n_questions": 4, "accuracy_by_type": {"where": 0.5, "caption": 1.0},
              "accuracy_by_type_ci": {"where": (0.15, 0.85), "caption": (0.34, 1.0)}, "caption_objects": 0.75}
    lines = attention_study.choice_table([{"random_layers": (), "report": report},
                                          {"random_layers": (0, 1), "report": report}])
    assert lines[3] == "| layers choosing at random | where | caption | caption objects |"
    assert lines[-2] == "| none (A-VL's choice) | 0.50 (0.15-0.85) | 1.00 (0.34-1.00) | 0.750 |"
    assert lines[-1].startswith("| 0, 1 | ")


def test_hidden_image_tokens_equal_the_masked_forward_without_a_cache():
    """HiddenImageTokens decodes what the cache-free forward gives with attention_mask 0 on those image
    tokens (the hiding training uses), logit for logit, and holds none of them in any layer; hiding
    them changes the answer (against the dense cache)."""
    model = build_model(n_layers=3, kv_heads=2)
    n_sys, n_img = 3, model.config.num_image_tokens
    ids, pixel_values = make_prompt(model, n_sys, n_text=6, seed=2)
    hidden = [0, 1, 5, 9, n_img - 1]
    cache = HiddenImageTokens(hidden)
    logits, tokens = run_steps(model, ids, pixel_values, cache, 5)
    for layer in range(3):
        held = set(cache.pos[layer][0, 0].tolist())
        assert held == set(range(ids.shape[1] + 5)) - {n_sys + i for i in hidden}  # prompt + 5 steps
    visible = torch.ones(1, ids.shape[1] + 5, dtype=torch.long)                  # (1, T)
    visible[0, [n_sys + i for i in hidden]] = 0
    sequence = torch.cat([ids, torch.tensor([tokens])], dim=1)                   # (1, T)
    for t in range(6):
        length = ids.shape[1] + t
        reference = model(sequence[:, :length], pixel_values, attention_mask=visible[:, :length])[0, -1]
        torch.testing.assert_close(logits[t], reference, atol=1e-5, rtol=1e-5)
    dense, _ = run_steps(model, ids, pixel_values, KVCache(), 5, tokens=tokens)
    assert not torch.allclose(dense, logits, atol=1e-3)


def test_hidden_object_recall_counts_each_hiding(monkeypatch):
    """With a stand-in decoder that names every object whose place is wholly visible: nothing hidden names
    all, its place hidden names none of the hidden ones, and a random draw of 9 distinct of the 144 tokens
    names the object exactly when the draw missed its place (each draw as the stand-in received it), the
    draws the same for the same seed."""
    objects = [SimpleNamespace(place_patches=lambda k=k: list(range(9 * k, 9 * k + 9)), describe=lambda k=k: f"object {k}")
               for k in range(3)]
    question = SimpleNamespace(kind="caption", scene=SimpleNamespace(objects=objects))
    other = SimpleNamespace(kind="colour", scene=None)                          # not a caption: skipped
    calls = []                                                                  # (question, hidden) per caption made

    def named_where_visible(model, processor, q, hidden):
        calls.append((q, list(hidden)))
        return {obj.describe() for obj in q.scene.objects if not set(obj.place_patches()) & set(hidden)}

    monkeypatch.setattr(attention_study, "caption_with_hidden", named_where_visible)
    model = SimpleNamespace(config=SimpleNamespace(num_image_tokens=144))
    recall = attention_study.hidden_object_recall(model, None, [question, other, question], seed=4)
    assert all(q is question for q, _ in calls) and len(calls) == 2 * (1 + 2 * 3)   # per caption: plain, 2 per object
    places = [objects[k].place_patches() for k in range(3)]
    draws = [hidden for _, hidden in calls if hidden and hidden not in places]     # the random hidings, in order
    assert len(draws) == 6 and all(len(set(d)) == 9 and set(d) <= set(range(144)) for d in draws)
    missed = [sum(not set(draw) & set(places[k]) for k, draw in enumerate(draws[3 * c:3 * c + 3])) for c in range(2)]
    assert recall == {"nothing": ([3, 3], [3, 3]), "its place": ([0, 0], [3, 3]),
                      "as many random tokens": (missed, [3, 3])}
    assert 0 < sum(missed) < 6                                                  # the seed's draws hit and miss
    calls.clear()
    attention_study.hidden_object_recall(model, None, [question], seed=4)
    assert [hidden for _, hidden in calls if hidden and hidden not in places] == draws[:3]
    lines = attention_study.hidden_object_table(recall)
    low, high = clustered_wilson_interval(missed, [3, 3])
    assert lines[-1] == f"| as many random tokens hidden | {sum(missed) / 6:.2f} ({low:.2f}-{high:.2f}) |"
    assert lines[-2].startswith("| its place hidden | 0.00 (0.00-")


def test_object_attention_by_hand():
    """The hand-made recording's prefill image rows: layer 0 [9, 8, 7, 6, 5, 1, 1, 1, 1, 1] and layer 1 the
    same reversed, each summing to 40. A scene whose objects show on patches {0, 1, 5, 6} and {3, 9}:
    layer 0 gives them 9+8+6+1+1+1 = 26 of 40, layer 1 1+1+1+5+6+9 = 23; they are 6 of the 10 tokens. A
    second scene, one object on {4, 5, 6, 7, 8}: 5+1+1+1+1 = 9 and 1+5+6+7+8 = 27, 5 of 10 tokens."""
    first = SimpleNamespace(objects=[SimpleNamespace(patches=lambda: [0, 1, 5, 6]),
                                     SimpleNamespace(patches=lambda: [3, 9, 0])])   # a patch two objects show counts once
    second = SimpleNamespace(objects=[SimpleNamespace(patches=lambda: [4, 5, 6, 7, 8])])
    shares = attention_study.object_attention([recording(), recording()], [first, second])
    assert shares == [{"attention": pytest.approx((26 + 9) / 80), "tokens": pytest.approx((0.6 + 0.5) / 2)},
                      {"attention": pytest.approx((23 + 27) / 80), "tokens": pytest.approx((0.6 + 0.5) / 2)}]
    lines = report_markdown({**study([recording()]), "object_attention": shares}).splitlines()
    assert "| 0 | 0.44 (0.55) |" in lines and "| 1 | 0.62 (0.55) |" in lines


def test_area_in_blocks_by_hand():
    """12 x 12 patches against 9 x 9 blocks, block (0, 0) chosen: it spans [0, 1/9) of the image each way.
    Patch 0 spans [0, 1/12): inside. Patch 12 (row 1, column 0) spans rows [1/12, 2/12), of which
    [1/12, 1/9) is inside: 1/3 of it. Patch 13 (row 1, column 1): 1/3 x 1/3."""
    blocks = torch.zeros(9, 9, dtype=torch.bool)
    blocks[0, 0] = True
    assert attention_study.area_in_blocks(blocks, [0], 12) == 1.0
    assert attention_study.area_in_blocks(blocks, [12], 12) == pytest.approx(1 / 3)
    assert attention_study.area_in_blocks(blocks, [13], 12) == pytest.approx(1 / 9)
    assert attention_study.area_in_blocks(blocks, [0, 12, 13], 12) == pytest.approx((1 + 1 / 3 + 1 / 9) / 3)
    assert attention_study.area_in_blocks(blocks, [100], 12) == 0.0


def test_hires_coverage_by_hand():
    """4 x 4 image tokens, 2 x 2 blocks. Layer 0's last prompt row is hot on token 0 alone (block (0, 0)),
    layer 1's on token 15 alone (block (1, 1)): a quarter of the image each. Object 1 on patches {0, 1, 4, 5}
    (block (0, 0)), object 2 on {10, 15} (block (1, 1))."""
    hot = {0: torch.ones(16), 1: torch.ones(16)}
    hot[0][0], hot[1][15] = 5.0, 5.0
    recorder = SimpleNamespace(n_layers=2, image_row=lambda step, layer: hot[layer])
    scene = SimpleNamespace(objects=[SimpleNamespace(patches=lambda: [0, 1, 4, 5]),
                                     SimpleNamespace(patches=lambda: [10, 15])])
    coverage = attention_study.hires_coverage([recorder], [scene], side=4, blocks_per_side=2)
    assert coverage == [{"blocks": 0.25, "objects": [1.0, 0.0]}, {"blocks": 0.25, "objects": [0.0, 1.0]}]
    lines = report_markdown({**study([recording()]), "hires_coverage": coverage}).splitlines()
    assert "| 0 | 0.25 | 1.00 | 0.00 |" in lines and "| 1 | 0.25 | 0.00 | 1.00 |" in lines


def test_figures_in_out_are_replaced_only_with_force(tmp_path, monkeypatch, capsys):
    """The command refuses, before loading the model, to write over figures already in --out."""
    monkeypatch.setattr(attention_study, "load_pretrained", lambda *a, **k: pytest.fail("worked before checking"))
    (tmp_path / attention_study.FIGURES[1]).write_text("the user's")
    assert attention_study.main(["--out", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / attention_study.FIGURES[1]).read_text() == "the user's"
    assert attention_study.main(["--force"]) == 2                 # --force without --out
    assert "--out" in capsys.readouterr().err
    for out, problem in ((tmp_path / attention_study.FIGURES[1], "is a file"),
                         (tmp_path / attention_study.FIGURES[1] / "sub", "cannot be made")):
        assert attention_study.main(["--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"error: --out {out} {problem}")


def test_figures_go_to_a_folder_made_for_them(tmp_path, capsys):
    """--out may name a folder still to be made; the figures are written there, and nothing else."""
    out = tmp_path / "new" / "figures"
    assert attention_study.main(["--n", "1", "--out", str(out), "--json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(attention_study.FIGURES)
    assert json.loads(capsys.readouterr().out)["layers"]


def test_a_llava_next_toy_is_refused(capsys):
    from tinyavl.cli import TOY_WEIGHTS
    assert attention_study.main(["--weights", str(TOY_WEIGHTS.parent / "toy-tiles"), "--n", "1"]) == 2
    assert "LLaVA-1.6" in capsys.readouterr().err


def test_a_flexattention_toy_is_refused(capsys):
    """The study asks plain scenes at the low resolution; the FlexAttention toy reads fine ones through its
    high-resolution view, which the study's measures would not use."""
    from tinyavl.cli import HIRES_TOY_WEIGHTS
    assert attention_study.main(["--weights", str(HIRES_TOY_WEIGHTS), "--n", "1"]) == 2
    assert "FlexAttention" in capsys.readouterr().err


def test_a_model_whose_image_tokens_are_not_the_scene_patches_is_refused(tmp_path, capsys):
    """The measures read image token i as the scene's patch i: the toy keeping CLIP's CLS token (145 image
    tokens, the first not a patch) is refused, where every measure would be off by one token."""
    import shutil
    from tinyavl.cli import TOY_WEIGHTS
    folder = shutil.copytree(TOY_WEIGHTS, tmp_path / "toy-cls")
    config = json.loads((folder / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (folder / "config.json").write_text(json.dumps(config))
    assert attention_study.main(["--weights", str(folder), "--n", "1"]) == 2
    assert "as 145 image tokens: the study reads each image token as one of the scenes' 12 x 12 patches" in (
        capsys.readouterr().err)


def test_the_recall_table_by_hand():
    """Intervals where the clustering does not matter and where it does: for [2, 1] of [3, 3] the design
    effect is max(1, (1/36) / (0.25/6)) = 1, so Wilson's at n = 6, p = 0.5: 0.1876..0.8124. The title counts
    the objects, 6."""
    lines = attention_study.hidden_object_table({"nothing": ([2, 1], [3, 3]), "its place": ([0, 0], [3, 3]),
                                                 "as many random tokens": ([1, 2], [3, 3])})
    assert "| nothing hidden | 0.50 (0.19-0.81) |" in lines
    # Where the clustering matters: 0 of [3, 3] is a caption-level count of 0 of 2, not of 6 (Wilson's
    # interval at n = 6 would be 0.00-0.39): 0.00-0.66.
    assert "| its place hidden | 0.00 (0.00-0.66) |" in lines
    assert "of 6," in lines[1]


def test_a_distance_counts_where_any_answer_reaches_it(monkeypatch):
    """A second recording cut to one decode step reaches no distance 2: distance 2 keeps the long one's
    pairs (its value in test_study_of_a_hand_made_recording), not none."""
    monkeypatch.setattr(attention_study, "MAX_DISTANCE", 2)
    long, short = recording(), recording()
    short.rows = short.rows[:2]                                             # the prefill and one decode step
    assert study([long, short])["layers"][0]["ppci_steps"] == {1: 0.0, 2: pytest.approx(2 / 3)}


def test_area_in_blocks_reads_rows_as_rows():
    """Block (0, 1) of 9 x 9 covers rows [0, 1/9), columns [1/9, 2/9) of the image. Patch 1 of a 12 x 12 grid
    (row 0, column 1) covers rows [0, 1/12), columns [1/12, 2/12): 2/3 of its width lies in the block. Patch
    12 (row 1, column 0) lies outside."""
    blocks = torch.zeros(9, 9, dtype=torch.bool)
    blocks[0, 1] = True
    assert attention_study.area_in_blocks(blocks, [1], 12) == pytest.approx(2 / 3)
    assert attention_study.area_in_blocks(blocks, [12], 12) == 0.0


def test_the_layer_choice_is_measured_on_the_long_answers(monkeypatch):
    """Asked of the where and caption questions alone (LONG_ANSWER_KINDS), not of the one-word kinds."""
    asked = []
    monkeypatch.setattr(attention_study, "evaluate",
                        lambda model, processor, questions, policy: asked.append([q.kind for q in questions]) or {})
    model = SimpleNamespace(config=SimpleNamespace(text=SimpleNamespace(num_hidden_layers=1)))
    questions = [SimpleNamespace(kind=kind) for kind in ("colour", "where", "count", "caption", "shape")]
    attention_study.choice_by_layer(model, None, questions)
    assert asked and all(kinds == ["where", "caption"] for kinds in asked)


def test_nothing_hidden_counts_the_objects_the_caption_names(monkeypatch):
    objects = [SimpleNamespace(place_patches=lambda k=k: list(range(9 * k, 9 * k + 9)), describe=lambda k=k: f"o{k}")
               for k in range(3)]
    question = SimpleNamespace(kind="caption", scene=SimpleNamespace(objects=objects))
    monkeypatch.setattr(attention_study, "caption_with_hidden", lambda model, processor, q, hidden: {"o0", "o1"})
    recall = attention_study.hidden_object_recall(SimpleNamespace(config=SimpleNamespace(num_image_tokens=144)),
                                                  None, [question])
    assert recall["nothing"] == ([2], [3])


def test_the_report_has_a_column_for_every_distance_it_names():
    result = study([recording()])
    for layer in result["layers"]:
        layer["ppci_steps"] = {d: 0.5 for d in range(1, 17)}
    assert "| layer | d=1 | d=2 | d=3 | d=4 | d=8 | d=16 |" in report_markdown(result).splitlines()


def test_the_figures_plot_the_measures_by_hand(tmp_path, monkeypatch):
    """The hand recording's rows hold 10 image tokens of 13, 14 and 15 (the token share's line) and 36 of
    40, 41 and 42 parts of their mass on the image; the random sets' line is at C = 0.3; the three token
    shares are dashed; no figure replaces a file."""
    calls = []
    monkeypatch.setattr(attention_study, "save_line_plot",
                        lambda path, series, **options: calls.append((series, options)))
    attention_study.save_figures(study([recording()]), tmp_path)
    (shares, share_options), (steps, step_options) = calls
    tokens = (10 / 13 + 10 / 14 + 10 / 15) / 3
    assert shares["image tokens"] == [(0, pytest.approx(tokens)), (1, pytest.approx(tokens))]
    assert shares["image attention"][0][1] == pytest.approx((36 / 40 + 36 / 41 + 36 / 42) / 3)
    assert set(share_options["dashed"]) == {"sys tokens", "image tokens", "text tokens"}
    assert steps["random sets"] == [(1, 0.3), (attention_study.MAX_DISTANCE, 0.3)]
    assert share_options["replace"] is False and step_options["replace"] is False


def test_each_layers_shares_are_its_own_rows():
    """A layer's shares of attention are its own decode rows' (here a second layer whose text takes more)."""
    rows = [[torch.tensor([2.0] + [1.0] * 10 + [1.0] * (1 + t)), torch.tensor([2.0] + [1.0] * 10 + [5.0] * (1 + t))]
            for t in range(3)]
    recorder = SimpleNamespace(n_layers=2, n_sys=1, n_img=10, rows=rows)
    recorder.image_row = lambda step, layer: rows[step][layer][1:11]
    layers = study([recorder])["layers"]
    text = [sum(float(r[layer][11:].sum() / r[layer].sum()) for r in rows[1:]) / 2 for layer in (0, 1)]
    assert [x["shares"]["text"] for x in layers] == pytest.approx(text)


def test_hires_coverage_selects_at_the_threshold():
    """The coverage is FlexAttention's selection at hires.THRESHOLD: a block whose normalised attention is just
    above it is chosen, one just under it is not."""
    from tinyavl import hires
    row = torch.zeros(16)
    row[0] = 255.0
    row[15] = hires.THRESHOLD + 1.0     # on the 0-255 scale of the min-max normalisation: just over the threshold
    row[10] = hires.THRESHOLD - 1.0     # just under
    recorder = SimpleNamespace(n_layers=1, image_row=lambda step, layer: row)
    scene = SimpleNamespace(objects=[SimpleNamespace(patches=lambda: [15]), SimpleNamespace(patches=lambda: [10])])
    coverage = attention_study.hires_coverage([recorder], [scene], side=4, blocks_per_side=4)
    assert coverage[0]["objects"] == [1.0, 0.0]
