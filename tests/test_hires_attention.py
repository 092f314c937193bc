"""FlexAttention's hierarchical attention in the model (model.HiresView) against plain references."""
import numpy as np
import pytest
import torch

from tinyavl import hires
from tinyavl.cache import AVLCache, H2OCache, make_cache
from tinyavl.errors import UserError
from tinyavl.generate import generate
from tinyavl.model import (HiresConfig, HiresView, LlavaConfig, LlavaForConditionalGeneration, TextConfig, VisionConfig,
                           attention)

from cache_helpers import recording


def tiny_model(first_layer=1, scale=2, blocks=2, seed=0):
    torch.manual_seed(seed)
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=4)                                   # 4 x 4 image tokens
    text = TextConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config = LlavaConfig(text=text, vision=vision, image_token_id=39, vision_feature_layer=-1,
                         hires=HiresConfig(scale=scale, first_layer=first_layer, threshold=48, blocks=blocks))
    config.validate()
    model = LlavaForConditionalGeneration(config).eval()
    for p in model.parameters():  # a random model with weights of a trained one's scale
        torch.nn.init.normal_(p, std=0.3)
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, 6] + [39] * 16 + [7, 8, 9, 10]])                          # sys 3 | image 16 | text 4
    return ids, torch.randn(1, 3, 16, 16, generator=g), torch.randn(1, 3, 32, 32, generator=g)


def test_blend_zero_is_the_plain_model_and_only_the_last_row_changes():
    model = tiny_model()
    ids, pixels, hires_pixels = inputs()
    with torch.no_grad():
        plain = model(ids, pixels)
        off = model(ids, pixels, hires_view=model.make_hires_view(ids, hires_pixels, alpha=0.0))
        on = model(ids, pixels, hires_view=model.make_hires_view(ids, hires_pixels))
    assert torch.equal(off, plain)
    assert torch.equal(on[:, :-1], plain[:, :-1])             # rows other than the current token see no high-res key
    assert (on[:, -1] - plain[:, -1]).abs().max() > 1e-3


def test_a_served_row_is_one_softmax_over_its_keys_and_its_chosen_tokens():
    """HiresView.merge, against float64 attention of each served query over [its causal keys; the high-res
    keys of the tokens chosen for it]: rows 3 and 4 of 5 served, each with its own choice."""
    model = tiny_model()
    ids, pixels, hires_pixels = inputs()
    view = model.make_hires_view(ids, hires_pixels)
    attn, norm = model.language_model.model.layers[1].self_attn, model.language_model.model.layers[1].input_layernorm
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, n, 5, 8, generator=g) for n in (4, 2, 2))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    y = torch.stack([(q[0, h] @ k[0, h // 2].T / 8 ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
                     @ v[0, h // 2] for h in range(4)])[None]                              # (1, 4, 5, 8)
    rows = torch.tensor([3, 4])
    view.chosen = torch.zeros(1, 2, view.features.shape[1], dtype=torch.bool)
    view.chosen[0, 0, [0, 3, 17]] = True
    view.chosen[0, 1, [3, 40, 63]] = True
    lse = torch.stack([(q[0, h, rows] @ k[0, h // 2].T / 8 ** 0.5).masked_fill(~causal[rows], float("-inf"))
                       .logsumexp(-1) for h in range(4)])[None]                            # (1, 4, 2)
    nothing = view.chosen.clone()
    nothing[0, 0] = False                                                               # row 3: no token chosen
    view.chosen, chosen = nothing, view.chosen
    assert torch.equal(view.merge(attn, norm, q[:, :, rows], y, rows, lse)[:, :, 3], y[:, :, 3])  # its output unchanged
    view.chosen = chosen
    out = view.merge(attn, norm, q[:, :, rows], y, rows, lse)
    assert torch.equal(out[:, :, :3], y[:, :, :3])                                      # rows not served: unchanged
    # The high-resolution keys' rotation, by hand: the image starts at position 3, a 4 x 4 grid seen at 2x,
    # so token (R, C) sits at 3 + 4 r + c, with r = (R + 0.5) / 2 - 0.5 and c likewise (test_hires.py), and
    # turns by Llama's frequencies 10000^(-2i / 8), i < 4, in the half-split layout.
    point = (torch.arange(8, dtype=torch.float64) + 0.5) / 2 - 0.5                     # (8,) a side's centres
    positions = (3 + 4 * point[:, None] + point[None, :]).flatten()                     # (64,) reading order
    angles = positions[:, None] * 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)   # (64, 4)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()      # each (64, 8)
    for r, row in enumerate(rows.tolist()):
        index = view.chosen[0, r].nonzero().flatten()
        feats = norm(view.features[0, index])                                           # the layer's input norm first
        k_hd = attn.k_proj_hd(feats).view(-1, 2, 8).transpose(0, 1)                     # (2, m, 8)
        k_hd = k_hd * cos[index] + torch.cat([-k_hd[..., 4:], k_hd[..., :4]], -1) * sin[index]
        v_hd = attn.v_proj_hd(feats).view(-1, 2, 8).transpose(0, 1)
        for h in range(4):
            keys = torch.cat([k[0, h // 2, :row + 1], k_hd[h // 2]]).double()
            values = torch.cat([v[0, h // 2, :row + 1], v_hd[h // 2]]).double()
            expected = (q[0, h, row].double() @ keys.T / 8 ** 0.5).softmax(-1) @ values
            torch.testing.assert_close(out[0, h, row].double(), expected, atol=1e-5, rtol=0)


def test_cached_generation_equals_the_forward_over_the_whole_sequence():
    """With the dense cache, each decode step's logits equal the cache-free forward over the prompt and
    the tokens so far, served from the prompt's last row on: each of those rows was the current token of
    one step, and the cache holds the keys and values it computed then."""
    model = tiny_model()
    ids, pixels, hires_pixels = inputs()
    cache = make_cache("full")
    cache.begin(3, 3, 16, max_decode_steps=4)
    with torch.no_grad():
        logits = model(ids, pixels, cache=cache, hires_view=model.make_hires_view(ids, hires_pixels))[:, -1]
        sequence = ids
        for step in range(4):
            view = model.make_hires_view(sequence, hires_pixels, first_served=ids.shape[1] - 1)
            whole = model(sequence, pixels, hires_view=view)[:, -1]
            torch.testing.assert_close(logits, whole, atol=1e-5, rtol=0)
            token = logits.argmax(-1, keepdim=True)                                          # (1, 1)
            sequence = torch.cat([sequence, token], 1)
            logits = model(token, cache=cache)[:, -1]


def test_models_without_projections_are_refused():
    model = tiny_model()
    ids, _, hires_pixels = inputs()
    model.config.hires = None
    with pytest.raises(UserError, match="no FlexAttention projections"):
        model.make_hires_view(ids, hires_pixels)


def test_a_view_of_the_wrong_size_or_place_is_refused():
    """The view is scale x scale crops of the tower's size, one image a prompt, and one image position serves
    the whole batch; a fixed number of blocks is at most all of them."""
    model = tiny_model()
    ids, _, hires_pixels = inputs()
    with pytest.raises(ValueError, match="hires_pixel_values are .* the high-resolution view takes"):
        model.make_hires_view(ids, hires_pixels[..., :-1, :-1])
    with pytest.raises(ValueError, match="one image for each of the 2 prompts of input_ids"):
        model.make_hires_view(torch.cat([ids, ids]), hires_pixels)
    for top in (5, -1):                                  # 2 x 2 blocks: refused here, not only by generate
        with pytest.raises(UserError, match="from 0 to 4"):
            model.make_hires_view(ids, hires_pixels, top=top)
    with pytest.raises(ValueError, match="every prompt needs its image tokens"):
        model.make_hires_view(ids[:, ids[0] != model.config.image_token_id], hires_pixels)
    # Two prompts of one length, the second's image one position later (its first token twice).
    batch = torch.cat([torch.cat([ids, ids[:, -1:]], 1), torch.cat([ids[:, :1], ids], 1)])   # (2, T + 1)
    with pytest.raises(ValueError, match="hold their image at one position"):
        model.make_hires_view(batch, hires_pixels.expand(2, -1, -1, -1))


def test_hires_top_without_the_view_is_refused():
    model = tiny_model()
    ids, pixels, _ = inputs()
    with pytest.raises(UserError, match="pass hires_pixel_values"):
        generate(model, ids, pixels, hires_top=2, max_new_tokens=1)


@pytest.mark.parametrize("top", [-1, 5, 2.5, True])
def test_a_block_count_the_view_cannot_read_is_refused(top):
    model = tiny_model()                                                # 2 x 2 blocks
    ids, pixels, hires_pixels = inputs()
    with pytest.raises(UserError, match="from 0 to 4"):
        generate(model, ids, pixels, hires_pixel_values=hires_pixels, hires_top=top, max_new_tokens=1)


def test_the_view_stitches_the_crops_features_where_the_crops_lie():
    """The 32 px view of a 16 px tower: 2 x 2 crops, each through the tower on its own; a crop's 4 x 4 features
    lie on the 8 x 8 map where its pixels lie in the picture (by hand, without stitch_tiles)."""
    model = tiny_model(scale=2)
    ids, _, hires_pixels = inputs()
    view = model.make_hires_view(ids, hires_pixels)
    side = 4                                                                         # a crop's features a side
    with torch.no_grad():
        for r in range(2):
            for c in range(2):
                crop = hires_pixels[:, :, 16 * r:16 * r + 16, 16 * c:16 * c + 16]        # (1, 3, 16, 16)
                expected = model.crop_features(crop)[0].view(side, side, -1)           # (4, 4, C)
                placed = view.features[0].view(2 * side, 2 * side, -1)[side * r:side * r + side,
                                                                       side * c:side * c + side]
                torch.testing.assert_close(placed, expected, atol=1e-6, rtol=0)


def cached_logits(model, policy, params, steps=4):
    """(steps + 1, vocab): the prefill's and each greedy decode step's logits under a policy, with the view."""
    ids, pixels, hires_pixels = inputs()
    cache = make_cache(policy, **params)
    cache.begin(3, 3, 16, max_decode_steps=steps)
    with torch.no_grad():
        logits = [model(ids, pixels, cache=cache, hires_view=model.make_hires_view(ids, hires_pixels))[0, -1]]
        for _ in range(steps):
            logits.append(model(logits[-1].argmax().view(1, 1), cache=cache)[0, -1])
    return torch.stack(logits), cache


@pytest.mark.parametrize("params, reordered", [
    ({**AVLCache.FULL_BUDGET, "K": 3}, False),          # everything kept and computed: no row moves
    (dict(S=1, C=0.5, P=1, T=1, K=1), True),            # every step an update step, the core moved first
])
def test_a_policy_that_attends_every_row_reads_the_blocks_as_the_dense_cache_does(params, reordered):
    """A-VL attending to every row at every step, its rows in place or reordered (the core first, at the
    prefill and on every update step): with the view, its logits and its choices equal the dense cache's.
    One block per image token, so a token put on the wrong place of the grid changes the choice."""
    model = tiny_model(blocks=4)
    dense, dense_cache = cached_logits(model, "full", {})
    avl, avl_cache = cached_logits(model, "avl", params)
    positions = avl_cache.pos[-1][0, 0]                                     # the last layer's, (n,)
    assert (positions.diff() < 0).any() == reordered                        # what the case is about
    torch.testing.assert_close(avl, dense, atol=1e-5, rtol=0)
    assert torch.equal(avl_cache.hires_view.chosen, dense_cache.hires_view.chosen)


def test_each_prompt_of_a_batch_reads_its_own_chosen_tokens(monkeypatch):
    """Two prompts with different images in one batch, one block each (top=1), which choose different blocks
    in a layer that reads them: each prompt's logits equal its own alone (each merges the high-resolution
    tokens it chose, not the other's)."""
    model = tiny_model()
    ids, pixels, hires_pixels = inputs(seed=1)
    _, other_pixels, other_hires = inputs(seed=2)
    merged_choices, merge = [], HiresView.merge

    def recording_merge(self, *args):
        merged_choices.append(self.chosen.clone())                     # (B, R, N_hd): what this layer reads
        return merge(self, *args)

    monkeypatch.setattr(HiresView, "merge", recording_merge)
    with torch.no_grad():
        view = model.make_hires_view(torch.cat([ids, ids]), torch.cat([hires_pixels, other_hires]), top=1)
        together = model(torch.cat([ids, ids]), torch.cat([pixels, other_pixels]), hires_view=view)
        batch_layers = list(merged_choices)                              # the batch's pass only
        alone = [model(ids, pixels, hires_view=model.make_hires_view(ids, hires_pixels, top=1)),
                 model(ids, other_pixels, hires_view=model.make_hires_view(ids, other_hires, top=1))]
    assert any(not torch.equal(chosen[0], chosen[1]) for chosen in batch_layers)   # what the case is about
    for prompt in (0, 1):
        torch.testing.assert_close(together[prompt], alone[prompt][0], rtol=0, atol=1e-5)


def test_a_policy_that_evicts_at_the_prefill_reads_the_blocks_the_prefill_attended():
    """A-VL's prefill attends to every prompt row and then evicts and reorders rows in place, in the
    prompt's own key tensors: the current token's view must read the keys as attended. Without the prefill
    filter (P = 1) its logits and choice equal the dense cache's."""
    model = tiny_model(blocks=4)
    dense, dense_cache = cached_logits(model, "full", {}, steps=0)
    avl, avl_cache = cached_logits(model, "avl", dict(S=0.5, C=0.25, P=1.0), steps=0)
    torch.testing.assert_close(avl, dense, atol=1e-5, rtol=0)
    assert torch.equal(avl_cache.hires_view.chosen, dense_cache.hires_view.chosen)


def test_under_avl_a_decode_step_chooses_among_the_image_tokens_it_computed():
    """A normal A-VL step computes only the core image tokens: the others have attention 0 on the grid, so
    with one block per image token every chosen block is a core token of the choosing layer."""
    model = tiny_model(blocks=4)                                                 # a block is one image token
    _, cache = cached_logits(model, "avl", dict(S=0.5, C=0.25, K=3), steps=1)   # step 1: not an update step
    last = 2                                                                     # the layer that chose last
    core = (cache.pos[last][0, 0, cache.core[last]] - 3).tolist()               # image tokens 0..15 (3 sys first)
    side = 4 * 2                                                                 # the 8 x 8 high-resolution map
    chosen = cache.hires_view.chosen[0, 0].view(side, side)[::2, ::2].flatten()      # one token of each block
    assert chosen.any() and set(chosen.nonzero().flatten().tolist()) <= set(core)
    assert len(core) == 4 and cache.attended[last] < 3 + 16                      # it did skip image tokens


@pytest.mark.parametrize("policy,params", [("fastv", dict(filter_layer=2, R=0.5)),
                                           ("avl", dict(filter_layer=2, P=0.5))])
def test_rows_a_filter_drops_between_choosing_and_reading_take_their_choices_with_them(monkeypatch, policy, params):
    """Served from inside the image (first_served 10: image rows 10-18 and the text), with a prefill filter after
    the choosing layer (filter_layer = first_layer = 2): the reading layer serves fewer rows than the choosing
    one (a shape error before), and each row left reads the choice made at its own position."""
    model = tiny_model(first_layer=2, blocks=4)
    ids, pixels, hires_pixels = inputs()
    made, read = {}, {}                           # layer -> (positions, choice): made by serve, read by merge
    serve, merge = HiresView.serve, HiresView.merge

    def recording_serve(view, attn, *args, **kwargs):
        y = serve(view, attn, *args, **kwargs)
        made[attn.layer_idx] = (view.chosen_positions.tolist(), view.chosen.clone())
        return y

    def recording_merge(view, attn, *args, **kwargs):
        read[attn.layer_idx] = (view.chosen_positions.tolist(), view.chosen.clone())
        return merge(view, attn, *args, **kwargs)

    monkeypatch.setattr(HiresView, "serve", recording_serve)
    monkeypatch.setattr(HiresView, "merge", recording_merge)
    cache = make_cache(policy, **params)
    cache.begin(3, 3, 16, max_decode_steps=1)
    with torch.no_grad():
        model(ids, pixels, cache=cache, hires_view=model.make_hires_view(ids, hires_pixels, first_served=10))
    chose_at, choices = made[1]
    assert chose_at == list(range(10, ids.shape[1]))
    kept = set(cache.pos[2][0, 0].tolist())       # the rows layer 2 holds: the filter's survivors
    read_at, read_choices = read[2]
    assert read_at == [p for p in chose_at if p in kept] and len(read_at) < len(chose_at)
    assert torch.equal(read_choices, choices[:, [chose_at.index(p) for p in read_at]])


def recorded_grids(monkeypatch) -> list:
    """The grids (served rows, lowres_side^2) every choice is made from, in order, as hires.block_scores
    receives them for the rest of the test."""
    grids, block_scores = [], hires.block_scores

    def recording_block_scores(image_attention, *args):
        grids.append(image_attention)
        return block_scores(image_attention, *args)

    monkeypatch.setattr(hires, "block_scores", recording_block_scores)
    return grids


def test_image_tokens_hidden_by_the_attention_mask_get_nothing_on_the_grid(monkeypatch):
    """The cache-free forward's attention_mask (the toy's image-token dropout) hides keys from every
    query: every choice is made from a grid on which the hidden image tokens have attention 0, and the
    visible ones share all the image attention there is."""
    model = tiny_model(first_layer=1, blocks=4)
    ids, pixels, hires_pixels = inputs(3)
    visible = torch.ones_like(ids)
    visible[0, 3:11] = 0                                            # the first 8 of the 16 image tokens hidden
    grids = recorded_grids(monkeypatch)
    with torch.no_grad():
        model(ids, pixels, attention_mask=visible, hires_view=model.make_hires_view(ids, hires_pixels))
    assert len(grids) == model.config.text.num_hidden_layers       # layers 0, 1 and 2 choose
    for grid in grids:                                              # (served rows, 16)
        assert torch.equal(grid[:, :8], torch.zeros_like(grid[:, :8])) and (grid[:, 8:].sum(-1) > 0).all()


@pytest.mark.parametrize("seed, heavy, recent", [(0, 0.2, 0.3), (2, 0.4, 0.2)])
def test_under_h2o_each_head_places_its_attention_by_its_own_rows(seed, heavy, recent, monkeypatch):
    """H2O evicts per head, so after the prefill one row holds a different image token in each KV head.
    A decode step's choice, against a float64 reference: each query head's attention over the keys the
    step attended, put on the grid by that head's own positions, summed over heads (the grid compared
    itself: a query head read against the other KV head's rows moves it by a few hundredths, which the
    threshold may not show), then the blocks. The two cases are ones where the last layer's heads hold
    different rows (most budgets evict the same ones)."""
    model = tiny_model(blocks=4, seed=seed)
    ids, pixels, hires_pixels = inputs(seed + 1)
    cache = recording(H2OCache)(heavy=heavy, recent=recent)
    cache.begin(3, 3, 16, max_decode_steps=2)
    grids = recorded_grids(monkeypatch)
    with torch.no_grad():
        logits = model(ids, pixels, cache=cache, hires_view=model.make_hires_view(ids, hires_pixels))[0, -1]
        model(logits.argmax().view(1, 1), cache=cache)
    # The decode step's last layer (the choice left is the last layer's), as the recording saw it: its query,
    # and the rows it attended, every row held after the append, before the step's eviction. Not the keys
    # the cache hands the view (`hires_keys`), which are what this checks.
    step = cache.log[-1]
    assert step["layer"] == model.config.text.num_hidden_layers - 1 and step["rows"] is None
    q = step["q"].double()                                          # (1, 4, 1, 8)
    keys, positions = step["k_before"], step["pos_before"]          # (1, 2, n, 8), (1, 2, n)
    assert not torch.equal(positions[0, 0], positions[0, 1])       # the case this test is about
    grid = torch.zeros(16, dtype=torch.float64)
    for head in range(4):
        probs = (q[0, head, -1] @ keys[0, head // 2].double().T / 8 ** 0.5).softmax(-1)
        for p, position in zip(probs, positions[0, head // 2].tolist()):
            if 3 <= position < 3 + 16:                             # 3 sys tokens, then the 16 image tokens
                grid[position - 3] += p
    torch.testing.assert_close(grids[-1][-1].double(), grid, rtol=0, atol=1e-5)   # the decode step's last layer
    blocks = hires.select_blocks(grid[None].float(), (4, 4), 48, 4)
    assert torch.equal(cache.hires_view.chosen[0, -1], hires.block_tokens(blocks, 8)[0])


def test_the_high_resolution_projections_carry_a_bias_when_the_attention_does():
    """k_proj_hd and v_proj_hd are k_proj's and v_proj's kind: a checkpoint trained with attention_bias holds
    their biases too."""
    from test_validation import SMALL_TEXT
    from tinyavl.model import LlamaAttention
    for bias in (False, True):
        attn = LlamaAttention(TextConfig(**SMALL_TEXT, attention_bias=bias), 1, hires_projections=True)
        assert [proj.bias is not None for proj in (attn.k_proj, attn.v_proj, attn.k_proj_hd, attn.v_proj_hd)] == \
            [bias] * 4


@pytest.mark.parametrize("field, value", [("first_layer", 3), ("blocks", 3), ("blocks", 8)])
def test_hires_configs_that_do_not_fit_the_model_are_refused(field, value):
    """The tiny model has 3 decoder layers, and 4 patches a side: 8 high-resolution ones at scale 2. 3 blocks
    do not divide 8; 8 do, but are more than the 4 low-resolution tokens a side that they pool."""
    model = tiny_model()
    setattr(model.config.hires, field, value)
    with pytest.raises(UserError, match=field):
        model.config.validate()


@pytest.mark.parametrize("field, value", [("threshold", 255), ("threshold", -1), ("threshold", True),
                                          ("scale", 0), ("blocks", -2), ("first_layer", 1.5)])
def test_bad_hires_fields_are_refused(field, value):
    with pytest.raises(UserError, match=rf"hires_config.{field} (is )?{value!r}"):
        HiresConfig(**{field: value})


def test_a_hires_folder_saves_loads_and_generates(tmp_path):
    """The toy with FlexAttention switched on (its projections copied from k_proj / v_proj, as FlexAttention
    initialises them): saved as a llava-hf folder with hires_config and the *_hd keys, loaded back, it gives
    the same logits; its processor adds the 3x view; generate reads it on every step."""
    from pathlib import Path
    from PIL import Image

    import tinyavl
    from tinyavl.toy.train import save_pretrained
    toy = Path(__file__).resolve().parent.parent / "weights" / "toy"
    plain, processor = tinyavl.load_pretrained(toy)
    config = plain.config
    config.hires = HiresConfig(scale=3, first_layer=2)
    config.validate()
    model = LlavaForConditionalGeneration(config).eval()
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"language_model.model.layers.{i}.self_attn.{p}_proj_hd.{w}"
                                     for i in (2, 3) for p in "kv" for w in ("weight",))
    with torch.no_grad():
        for layer in model.language_model.model.layers[2:]:
            layer.self_attn.k_proj_hd.weight.copy_(layer.self_attn.k_proj.weight)
            layer.self_attn.v_proj_hd.weight.copy_(layer.self_attn.v_proj.weight)
    save_pretrained(model, processor, tmp_path)
    loaded, loaded_processor = tinyavl.load_pretrained(tmp_path)
    assert loaded.config.hires == config.hires and loaded_processor.hires_scale == 3
    image = Image.open(toy / "examples" / "scene-0.png")
    inputs = loaded_processor(loaded_processor.chat_prompt("Describe the image."), image=image)
    assert inputs["hires_pixel_values"].shape == (1, 3, 288, 288)
    # a square 96 px image at 3x: PIL's bicubic resize to 288 px (no crop left to make), then normalised
    big = torch.from_numpy(np.asarray(image.convert("RGB").resize((288, 288), Image.Resampling.BICUBIC)).copy())
    expected = (big.permute(2, 0, 1).float() / 255 - processor.image_mean) / processor.image_std
    torch.testing.assert_close(inputs["hires_pixel_values"][0], expected, atol=0, rtol=0)
    with torch.no_grad():
        ids, pixels, hires_pixels = inputs["input_ids"], inputs["pixel_values"], inputs["hires_pixel_values"]
        torch.testing.assert_close(loaded(ids, pixels, hires_view=loaded.make_hires_view(ids, hires_pixels)),
                                   model(ids, pixels, hires_view=model.make_hires_view(ids, hires_pixels)),
                                   atol=0, rtol=0)
    # generate (the dense cache) gives the tokens of a cache-free loop served from the prompt's last row
    tokens, _ = tinyavl.generate(loaded, **inputs, max_new_tokens=6, eos_token_id=())
    sequence, prompt = inputs["input_ids"], inputs["input_ids"].shape[1]
    with torch.no_grad():
        for token in tokens:
            view = loaded.make_hires_view(sequence, inputs["hires_pixel_values"], first_served=prompt - 1)
            logits = loaded(sequence, inputs["pixel_values"], hires_view=view)[0, -1]
            assert int(logits.argmax()) == token
            sequence = torch.cat([sequence, torch.tensor([[token]])], 1)


def test_config_json_reads_hires_config():
    """config.json's hires_config (tinyavl's own key) becomes config.hires, checked; without it FlexAttention
    is off; a value that is not an object is refused."""
    import json
    from pathlib import Path

    from tinyavl.loading import parse_config
    raw = json.loads((Path(__file__).resolve().parent.parent / "weights" / "toy" / "config.json").read_text())
    assert parse_config(raw).hires is None
    config = parse_config({**raw, "hires_config": {"scale": 3, "first_layer": 2, "threshold": 30}})
    assert config.hires == HiresConfig(scale=3, first_layer=2, threshold=30, blocks=9)
    with pytest.raises(UserError, match="not a JSON object"):
        parse_config({**raw, "hires_config": 3})
    with pytest.raises(UserError, match="first_layer"):
        parse_config({**raw, "hires_config": {"first_layer": 4}})           # the toy has layers 0-3


def test_hires_view_refuses_a_batch_whose_images_start_apart_or_a_prompt_without_one():
    """The view's RoPE positions come from where the image starts, one place for the batch."""
    model = tiny_model()
    ids, _, hires_pixels = inputs()
    shifted = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)                                  # the image a row earlier
    batch_pixels = hires_pixels.expand(2, -1, -1, -1)
    with torch.no_grad():
        assert model.make_hires_view(torch.cat([ids, ids]), batch_pixels).image_start == 3
        with pytest.raises(ValueError, match=r"start at \[3, 2\]"):
            model.make_hires_view(torch.cat([ids, shifted]), batch_pixels)
        with pytest.raises(ValueError, match="needs its image tokens"):
            model.make_hires_view(torch.tensor([[1, 5, 6, 7]]), hires_pixels)


def test_a_feature_layer_the_tower_lacks_is_refused_when_the_model_is_built():
    """vision_feature_layer counts from the last with a negative index, as in transformers, but an index
    past either end is refused rather than wrapped around (the tower has 1 layer: hidden states -2 .. 1)."""
    sizes = tiny_model().config   # a tiny decoder: a model built past the check must not be a 7B one
    assert LlavaConfig(vision=sizes.vision, vision_feature_layer=-2).feature_layers == [0]
    for layer in (-3, 2, [1, 5]):
        with pytest.raises(UserError, match="vision_feature_layer"):
            LlavaForConditionalGeneration(LlavaConfig(text=sizes.text, vision=sizes.vision, vision_feature_layer=layer))


@pytest.mark.parametrize("first_layer", [1, 2])
def test_each_layer_from_first_layer_on_merges_through_its_own_input_norm(first_layer, monkeypatch):
    """The high-resolution keys enter layers first_layer.. and no other, each made from the image's
    features through that layer's own input norm (the one its K and V projections read after)."""
    model = tiny_model(first_layer=first_layer)
    ids, pixels, hires_pixels = inputs()
    merges, merge = [], HiresView.merge
    layers = model.language_model.model.layers

    def recorded_merge(self, attn, norm, *args):
        merges.append((attn.layer_idx, norm is layers[attn.layer_idx].input_layernorm))
        return merge(self, attn, norm, *args)

    monkeypatch.setattr(HiresView, "merge", recorded_merge)
    with torch.no_grad():
        model(ids, pixels, hires_view=model.make_hires_view(ids, hires_pixels))
    assert merges == [(layer, True) for layer in range(first_layer, len(layers))]


@pytest.mark.parametrize("hidden", [[], [3, 4, 5, 6, 7, 8, 9, 10, 20]])
def test_a_layer_serves_its_row_one_softmax_over_its_causal_keys_and_its_chosen_tokens(hidden):
    """HiresView.serve (the choice and the merge together): the served row, the last, is one float64 softmax
    over its causal keys, its own key included, and the high-resolution keys of the tokens chosen for it.
    Keys the attention mask hides (the toy's image-token dropout; here half the image and a text token) are
    in neither: the merge weighs the row's output by the log-sum-exp of its visible keys alone."""
    model = tiny_model()
    ids, _, hires_pixels = inputs()
    T = ids.shape[1]
    view = model.make_hires_view(ids, hires_pixels)                                  # serves row T - 1
    layer = model.language_model.model.layers[1]
    attn, norm = layer.self_attn, layer.input_layernorm
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, T, 8, generator=g) for n in (4, 2, 2))       # 4 query heads, 2 KV heads, hs 8
    visible = torch.ones(1, T, dtype=torch.bool)
    visible[0, hidden] = False
    y = attention(q, k, v, causal=True, visible=visible)
    chosen = torch.zeros(1, 1, view.features.shape[1], dtype=torch.bool)
    chosen[0, 0, [0, 9, 27, 63]] = True
    view.chosen, view.chosen_positions = chosen.clone(), torch.tensor([T - 1])    # as the layer before chose
    positions = torch.arange(T)
    with torch.no_grad():
        out = view.serve(attn, norm, q, k, y, positions, positions.expand(1, 2, T), visible)
        index = chosen[0, 0].nonzero().flatten()
        features = norm(view.features[0, index])                               # (4, 32)
        k_hires = attn.k_proj_hd(features).view(-1, 2, 8).transpose(0, 1)      # (2, 4, 8)
        rotated = torch.cat([-k_hires[..., 4:], k_hires[..., :4]], -1)         # RoPE's rotate-half, by hand
        k_hires = k_hires * view.cos[index] + rotated * view.sin[index]
        v_hires = attn.v_proj_hd(features).view(-1, 2, 8).transpose(0, 1)
    for h in range(4):
        keys = torch.cat([k[0, h // 2, visible[0]], k_hires[h // 2]]).double()
        values = torch.cat([v[0, h // 2, visible[0]], v_hires[h // 2]]).double()
        expected = (q[0, h, -1].double() @ keys.T / 8 ** 0.5).softmax(-1) @ values
        torch.testing.assert_close(out[0, h, -1].double(), expected, atol=1e-5, rtol=0)


def served_query(model, seed=2):
    """A layer, and q (B, H, 5, hs), k, v of 5 random rows with the causal attention y over them."""
    layer = model.language_model.model.layers[1]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, 5, 8, generator=g) for heads in (4, 2, 2))      # H 4, Hkv 2, hs 8
    return layer, q, k, v, attention(q, k, v, causal=True)


def test_tokens_read_counts_each_served_rows_own_tokens():
    """Two served rows choosing 3 and 4 high-resolution tokens (two of them the same): 7 keys read, each
    row's own (the tokens projected for both rows are 5)."""
    model = tiny_model()
    ids, _, hires_pixels = inputs()
    view = model.make_hires_view(ids, hires_pixels)
    layer, q, _, _, y = served_query(model)
    view.chosen = torch.zeros(1, 2, view.features.shape[1], dtype=torch.bool)
    view.chosen[0, 0, [0, 3, 17]] = True
    view.chosen[0, 1, [3, 17, 40, 63]] = True
    view.merge(layer.self_attn, layer.input_layernorm, q[:, :, 3:], y, torch.tensor([3, 4]), torch.zeros(1, 4, 2))
    assert view.tokens_read == 3 + 4


def test_a_blend_between_0_and_1_weighs_the_two_outputs_linearly():
    """FlexAttention's training ramps alpha from 0 to 1: at 0.25 the output is 0.75 of the plain row's and
    0.25 of the hierarchical one's."""
    model = tiny_model()
    ids, _, hires_pixels = inputs()
    layer, q, k, _, y = served_query(model)
    lse = torch.stack([(q[0, h, 4] @ k[0, h // 2].T / 8 ** 0.5).logsumexp(-1) for h in range(4)])[None, :, None]
    outputs = {}
    for alpha in (0.0, 0.25, 1.0):
        view = model.make_hires_view(ids, hires_pixels, alpha=alpha)
        view.chosen = torch.zeros(1, 1, view.features.shape[1], dtype=torch.bool)
        view.chosen[0, 0, [0, 3, 17]] = True
        with torch.no_grad():
            outputs[alpha] = view.merge(layer.self_attn, layer.input_layernorm, q[:, :, 4:], y, torch.tensor([4]), lse)
    assert torch.equal(outputs[0.0], y)                                                 # 0: the plain output
    assert not torch.allclose(outputs[1.0], y)
    torch.testing.assert_close(outputs[0.25], 0.75 * outputs[0.0] + 0.25 * outputs[1.0], atol=1e-6, rtol=0)


def test_a_fixed_count_reads_that_many_blocks():
    """top=1 of 4 x 4 blocks over the 8 x 8 high-resolution map: one block, 2 x 2 tokens, whatever the
    threshold would choose."""
    model = tiny_model(blocks=4)
    ids, pixels, hires_pixels = inputs()
    view = model.make_hires_view(ids, hires_pixels, top=1)
    with torch.no_grad():
        model(ids, pixels, hires_view=view)
    assert int(view.chosen.sum()) == 4


def test_the_view_runs_in_bfloat16_close_to_float32():
    model = tiny_model()
    ids, pixels, hires_pixels = inputs()
    with torch.no_grad():
        reference = model(ids, pixels, hires_view=model.make_hires_view(ids, hires_pixels, top=4))
        half = model.to(torch.bfloat16)
        logits = half(ids, pixels.bfloat16(), hires_view=half.make_hires_view(ids, hires_pixels.bfloat16(), top=4))
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


@pytest.mark.parametrize("change", ["next", "full"])
def test_a_hires_view_on_llava_next_or_with_the_cls_token_is_refused(change):
    config = tiny_model().config
    if change == "next":
        config.image_grid_pinpoints = [[16, 32]]
    else:
        config.vision_feature_select_strategy = "full"
    with pytest.raises(UserError, match="hires_config"):
        config.validate()
