"""LLaVA-1.6 (LLaVA-NeXT) against transformers: anyres geometry, processor, chat template, model, policies.

Oracles: transformers' select_best_resolution and get_patch_output_size; the folder's own processor as
transformers loads it (AutoProcessor with the PIL backend: LlavaNextImageProcessorPil + LlavaNextProcessor, whose
apply_chat_template renders the folder's chat template); LlavaNextForConditionalGeneration in fp32 with
eager attention, holding the very weights written to the folder tinyavl loads (tests/tiny_checkpoints.py,
NEXT_VARIANTS: Vicuna and Mistral decoders, MHA and GQA, 28 px tiles of 4 x 4 patches).
"""
import json
import math
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import tinyavl
from test_cli import assert_user_error, run_inprocess
from tiny_checkpoints import LAYOUTS, NEXT_PINPOINTS, NEXT_VARIANTS, make_image, published_state_dict, tokenizer_info
from tinyavl import anyres, attention_map
from tinyavl.attention_map import BLOCK, HEADER, PANEL, SCALE_BAR, image_heat, seen_image, token_pictures
from tinyavl.errors import UserError
from tinyavl.processing import read_special_tokens

LOGIT_ATOL = 1e-4
GREEDY_STEPS = 8
LLAVA_V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # the published list
# Source images (width, height) on the 28 px tiles. Each picks another canvas of NEXT_PINPOINTS (h x w):
# square 56 x 56, wide 28 x 84, tall 56 x 28, under_a_tile 28 x 56 (the least waste), one_to_three 84 x 28.
IMAGE_SHAPES = {"square": (60, 60), "wide": (90, 40), "tall": (40, 80), "under_a_tile": (20, 15),
                "one_to_three": (31, 93)}
QUESTION = "What colour is the circle on the left?"


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    """variant name -> (tinyavl model, tinyavl processor, HF model, HF processor of the same folder)."""
    from transformers import AutoProcessor

    cache = {}

    def get(name):
        if name not in cache:
            folder = tiny_ckpt.folder(name)
            model, processor = tinyavl.load_pretrained(folder, device="cpu")
            # The PIL backend by name: with torchvision installed AutoProcessor picks its torchvision
            # backend, whose resampling differs from PIL's (seen: up to two 8-bit levels, 0.029, in a value).
            hf_processor = AutoProcessor.from_pretrained(folder, backend="pil")
            cache[name] = (model, processor, tiny_ckpt.model(name), hf_processor)
        return cache[name]

    return get


def user_turn(question: str, image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------------------- geometry
def random_sizes(n: int, seed: int, largest: int = 1600) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(1, largest), rng.randint(1, largest)) for _ in range(n)]


EDGE_SIZES = [(1, 1), (336, 336), (672, 672), (480, 640), (1008, 336), (336, 1008), (337, 1009), (2000, 15),
              # at LLaVA-1.6-7B's sizes the kept side of these scales to a float a hair under a whole number
              # (47.99999999): rounded to 7 decimals first, as transformers' unpad_image does
              (47, 1128), (55, 176), (205, 656), (88, 55), (88, 99), (176, 198),
              # the canvas's own aspect: the long side scales to a hair over the canvas (673), capped at it
              (19, 38), (38, 76), (150, 300)]


def test_the_test_images_pick_every_canvas():
    picked = [anyres.best_resolution((h, w), NEXT_PINPOINTS) for w, h in IMAGE_SHAPES.values()]
    assert sorted(picked) == sorted(tuple(p) for p in NEXT_PINPOINTS)


def test_canvas_choice_and_fit_match_transformers():
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension

    for pinpoints in (LLAVA_V16_PINPOINTS, NEXT_PINPOINTS):
        for hw in EDGE_SIZES + random_sizes(300, seed=1):
            canvas = anyres.best_resolution(hw, pinpoints)
            assert canvas == tuple(select_best_resolution(hw, pinpoints)), hw
            image = np.zeros((3, *hw), dtype=np.uint8)
            assert anyres.fitted_size(hw, canvas) == tuple(get_patch_output_size(image, canvas, ChannelDimension.FIRST))


def test_token_counts_match_transformers_processor_at_llava_v16_sizes(tiny_ckpt):
    """At LLaVA-1.6-7B's sizes (336 px tiles, 14 px patches, the published canvases) the image block has as
    many tokens as LlavaNextProcessor puts in the prompt, and the familiar ones by hand: a 672 x 672 image
    is 576 (base) + 48 x 48 (2 x 2 tiles of 24 x 24) + 48 newlines = 2928."""
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    hf = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                   image_grid_pinpoints=LLAVA_V16_PINPOINTS),
        tokenizer=AutoTokenizer.from_pretrained(tiny_ckpt.folder("next_vicuna_mha")), patch_size=14,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    sizes = EDGE_SIZES + random_sizes(200, seed=2)
    expected = hf._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert [anyres.image_token_count(hw, LLAVA_V16_PINPOINTS, 336, 14) for hw in sizes] == expected
    by_hand = {(672, 672): 576 + 48 * 48 + 48, (336, 336): 576 + 24 * 25, (480, 640): 2340, (1008, 336): 2376,
               (336, 1008): 2328}
    assert {hw: anyres.image_token_count(hw, LLAVA_V16_PINPOINTS, 336, 14) for hw in by_hand} == by_hand


def test_unpadded_region_is_centred_and_keeps_the_image_aspect():
    """Hand cases: a 1 x 2 canvas map of 24 x 48 features holding a square image keeps its middle 24
    columns; a 2 x 2 map of 48 x 48 holding a 480 x 640 (h x w) image keeps rows 6..42 (36 = 48 x 3 / 4)."""
    assert anyres.unpadded_region((336, 336), (24, 48)) == (slice(0, 24), slice(12, 36))
    assert anyres.unpadded_region((480, 640), (48, 48)) == (slice(6, 42), slice(0, 48))
    assert anyres.unpadded_region((672, 672), (48, 48)) == (slice(0, 48), slice(0, 48))


# ------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shards,stored", [(1, torch.float32), (2, torch.float16)])
def test_next_folders_load_in_every_layout(tiny_ckpt, layout, shards, stored):
    """The hub layout and transformers 4.52-4.57's and 5.x's save_pretrained ones, one file or shards, fp32
    or fp16 (run as bf16 on a CPU): every tensor, image_newline included, is the stored one."""
    model, _ = tinyavl.load_pretrained(tiny_ckpt.folder("next_mistral_gqa", layout, shards, stored), device="cpu")
    expected = torch.bfloat16 if stored == torch.float16 else stored
    ours, ref = model.state_dict(), published_state_dict(tiny_ckpt.model("next_mistral_gqa"))
    assert "image_newline" in ours
    for key, tensor in ours.items():
        assert tensor.dtype == expected and torch.equal(tensor, ref[key].to(stored).to(expected)), key


# ------------------------------------------------------------------------------------------- processor
@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_processor_matches_transformers(loaded, shape):
    _, processor, _, hf_processor = loaded("next_vicuna_mha")
    image = make_image(*IMAGE_SHAPES[shape], seed=list(IMAGE_SHAPES).index(shape))
    prompt = processor.chat_prompt(QUESTION)
    ours = processor(prompt, image)
    theirs = hf_processor(images=image, text=prompt, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["image_sizes"].tolist() == theirs["image_sizes"].tolist() == [[image.height, image.width]]
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    assert ours["pixel_values"].shape[2:] == (3, 28, 28) and ours["pixel_values"].shape[1] >= 3  # base + >= 2 tiles
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NEXT_VARIANTS)
@pytest.mark.parametrize("image", [True, False], ids=["image", "text_only"])
def test_chat_prompt_equals_apply_chat_template(loaded, name, image):
    _, processor, _, hf_processor = loaded(name)
    for question in (QUESTION, "Describe it.\nBe brief.", "  spaces  "):
        theirs = hf_processor.apply_chat_template(user_turn(question, image), add_generation_prompt=True,
                                                  tokenize=False)
        assert processor.chat_prompt(question, has_image=image) == theirs
    assert processor.chat_prompt("Hi").startswith("[INST]" if "mistral" in name else "USER:")


# ------------------------------------------------------------------------------------------- model
CASES = [(name, case) for name in NEXT_VARIANTS for case in (*IMAGE_SHAPES, "text_only")]


@pytest.mark.parametrize("name,case", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_logits_and_greedy_match_transformers(loaded, name, case):
    model, processor, hf_model, _ = loaded(name)
    if case == "text_only":
        inputs = processor(processor.chat_prompt(QUESTION, has_image=False))
        images = {}
    else:
        image = make_image(*IMAGE_SHAPES[case], seed=list(IMAGE_SHAPES).index(case))
        inputs = processor(processor.chat_prompt(QUESTION), image)
        images = {"pixel_values": inputs["pixel_values"], "image_sizes": inputs["image_sizes"]}
    ids = inputs["input_ids"]
    with torch.no_grad():
        ours = model(**inputs)
        ref = hf_model(input_ids=ids, **images).logits
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    print(f"\n[next parity] {name} {case} T={ids.shape[1]} max|dlogit|={diff:.2e}")
    assert diff <= LOGIT_ATOL

    never = tokenizer_info()["vocab_size"] + 1000
    # A mask of ones, as tinyavl attends every prompt token (generate's own would hide any pad_token_id).
    out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **images, do_sample=False,
                            max_new_tokens=GREEDY_STEPS, min_new_tokens=0, eos_token_id=never, pad_token_id=tokenizer_info()["pad_token_id"], output_scores=True,
                            return_dict_in_generate=True)
    ref_tokens = out.sequences[0, ids.shape[1]:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    assert len(ref_tokens) == GREEDY_STEPS and min(gaps) > 1e-3, (ref_tokens, gaps)  # clear-cut choices only
    tokens, _ = tinyavl.generate(model, **inputs, max_new_tokens=GREEDY_STEPS, eos_token_id=())
    assert tokens == ref_tokens


def test_a_next_image_without_its_size_is_a_user_error(loaded):
    """LLaVA-1.6 cuts its map by the image's size: generate needs image_sizes with pixel_values."""
    model, processor, _, _ = loaded("next_vicuna_mha")
    inputs = processor(processor.chat_prompt(QUESTION), make_image(*IMAGE_SHAPES["wide"], seed=1))
    with pytest.raises(UserError, match=r"LLaVA-1.6 takes pixel_values .* with image_sizes \(B, 2\)"):
        tinyavl.generate(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=2)


def test_crops_one_after_another_give_transformers_logits(loaded):
    """pixel_values as (sum of the images' crops, 3, S, S), every crop of each image after the one before's
    (transformers' get_image_features takes it so too): the logits are transformers' on the same tensor."""
    model, processor, hf_model, _ = loaded("next_vicuna_gqa")
    inputs = processor(processor.chat_prompt(QUESTION), make_image(*IMAGE_SHAPES["tall"], seed=2))
    flat = inputs["pixel_values"][0]                                                 # (n_crops, 3, S, S)
    with torch.no_grad():
        ours = model(inputs["input_ids"], flat, image_sizes=inputs["image_sizes"])
        ref = hf_model(input_ids=inputs["input_ids"], pixel_values=flat, image_sizes=inputs["image_sizes"]).logits
    assert (ours - ref).abs().max().item() <= LOGIT_ATOL


@pytest.mark.parametrize("change", ["a_crop_too_few", "one_crop_too_many_in_all", "a_size_too_many",
                                    "an_image_too_many"])
def test_crops_that_do_not_match_the_image_sizes_are_refused(loaded, change):
    """Each image takes its base crop and its canvas's tiles (`anyres.tile_grid`): a crop short, a crop over
    in the flat form, or image_sizes and pixel_values of different batches would drop or misplace features
    (zip stops at the shorter; a split of the wrong sizes fails in torch): one UserError says so."""
    model, processor, _, _ = loaded("next_vicuna_gqa")
    inputs = processor(processor.chat_prompt(QUESTION), make_image(*IMAGE_SHAPES["tall"], seed=2))
    pixels, sizes = inputs["pixel_values"], inputs["image_sizes"]                    # (1, n, 3, S, S), (1, 2)
    pixels, sizes = {"a_crop_too_few": (pixels[:, :-1], sizes),
                     "one_crop_too_many_in_all": (torch.cat([pixels[0], pixels[0, :1]]), sizes),
                     "a_size_too_many": (pixels, torch.cat([sizes, sizes])),
                     "an_image_too_many": (torch.cat([pixels, pixels]), sizes)}[change]
    with pytest.raises(UserError, match=r"image_sizes .* make \[\d+(, \d+)?\] crops .* but pixel_values holds"):
        model.image_features(pixels, sizes)


def test_one_images_size_without_its_batch_is_refused(loaded):
    """image_sizes (h, w) for one image, not (1, 2) as the processor gives it: said, not a TypeError."""
    model, processor, _, _ = loaded("next_vicuna_gqa")
    inputs = processor(processor.chat_prompt(QUESTION), make_image(*IMAGE_SHAPES["tall"], seed=2))
    h, w = inputs["image_sizes"][0].tolist()
    with pytest.raises(UserError, match=rf"image_sizes \[{h}, {w}\] must be \(B, 2\), each image's \(height"):
        tinyavl.generate(model, inputs["input_ids"], inputs["pixel_values"], image_sizes=(h, w), max_new_tokens=1)


def test_newline_ends_every_row_of_the_tile_map(loaded):
    """The image block is [base crop | map rows, each closed by image_newline]: the feature after every
    row of the unpadded map is the newline vector itself, and nowhere else."""
    model, processor, _, _ = loaded("next_vicuna_gqa")
    image = make_image(*IMAGE_SHAPES["wide"], seed=1)
    inputs = processor(processor.chat_prompt(QUESTION), image)
    with torch.no_grad():
        features = model.image_features(inputs["pixel_values"], inputs["image_sizes"])[0]   # (N_img, C)
    hw = (image.height, image.width)
    rows, columns = anyres.tile_grid(hw, NEXT_PINPOINTS, 28)
    kept_rows, kept_columns = anyres.unpadded_region(hw, (4 * rows, 4 * columns))
    n_rows, width = kept_rows.stop - kept_rows.start, kept_columns.stop - kept_columns.start + 1
    assert features.shape[0] == 16 + n_rows * width == int((inputs["input_ids"] == model.config.image_token_id).sum())
    is_newline = (features == model.image_newline).all(-1)                                   # (N_img,)
    assert is_newline.nonzero().flatten().tolist() == [16 + r * width + width - 1 for r in range(n_rows)]


# ------------------------------------------------------------------------------------------- policies
@pytest.mark.parametrize("policy,params", [("full", {}), ("random", dict(S=0.5)), ("random", dict(S=0.3)),
                                           ("avl", {}), ("fastv", dict(filter_layer=1, R=0.5))])
def test_image_budgets_are_exact_on_the_next_block(loaded, policy, params):
    """N_img is the whole NeXT block, newlines included: `random` and A-VL keep floor(S N_img) image rows in
    every layer, FastV floor((1 - R) N_img) from its layer on, `full` all of them."""
    model, processor, _, _ = loaded("next_mistral_gqa")
    image = make_image(*IMAGE_SHAPES["tall"], seed=2)
    inputs = processor(processor.chat_prompt(QUESTION), image)
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_img == anyres.image_token_count((image.height, image.width), NEXT_PINPOINTS, 28, 7)
    _, stats = tinyavl.generate(model, **inputs, max_new_tokens=4, eos_token_id=(), policy=policy, **params)
    row = 2 * 2 * 16 * 4  # K and V, 2 KV heads x 16, fp32
    kept = {"full": [n_img] * 2, "random": [math.floor(params.get("S", 0.5) * n_img)] * 2,
            "avl": [math.floor(0.5 * n_img)] * 2,
            "fastv": [n_img, math.floor((1 - params.get("R", 0.5)) * n_img)]}[policy]
    assert [layer["image"] for layer in stats.layer_bytes_after_prefill] == [k * row for k in kept]


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture()
def next_folder(tiny_ckpt, tmp_path):
    folder = tmp_path / "next"
    shutil.copytree(tiny_ckpt.folder("next_vicuna_mha"), folder)
    return folder


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def run_bad(capsys, folder, tmp_path, *mentions):
    image = tmp_path / "image.png"
    make_image(40, 30, seed=0).save(image)
    rc, out, err = run_inprocess(capsys, ["--image", image, "--weights", folder, "--max-new-tokens", "2"])
    assert_user_error(rc, out, err, *mentions)


@pytest.mark.parametrize("pinpoints", ["absent", None, [], [[28, 50]], [[28]], "abc", [[28, -28]], [[28.0, 56]]],
                         ids=["missing", "null", "empty", "not_a_tile_multiple", "one_number", "string", "negative",
                              "float"])
def test_bad_image_grid_pinpoints(next_folder, tmp_path, capsys, pinpoints):
    edit_config(next_folder, lambda c: c.pop("image_grid_pinpoints") if pinpoints == "absent"
                else c.__setitem__("image_grid_pinpoints", pinpoints))
    run_bad(capsys, next_folder, tmp_path, "image_grid_pinpoints")


def test_a_canvas_no_image_could_be_tiled_on_is_the_configs_fault(next_folder, tmp_path, capsys):
    """A canvas past the largest image tinyavl reads (twice PIL's MAX_IMAGE_PIXELS) would be made in memory
    for every image that picks it (96000 px a side: 27 GB): refused as the config's, before any image is made."""
    big = [28 * 3429, 28 * 3429]                                               # 96012 x 96012
    for name in ("config.json", "preprocessor_config.json"):                   # the two files agree
        path = next_folder / name
        cfg = json.loads(path.read_text())
        cfg["image_grid_pinpoints"] = [[28, 28], big]
        path.write_text(json.dumps(cfg))
    run_bad(capsys, next_folder, tmp_path, "config.json has image_grid_pinpoints canvas 96012 x 96012",
            "download the file again")


def test_a_tile_that_is_not_whole_patches_is_refused(next_folder, tmp_path, capsys):
    """28 px tiles of 8 px patches: the tile map's rows would not be whole patch rows of the canvas, which
    the unpadding assumes (transformers runs such a tower and drops each tile's edge; the README's Scope
    says tinyavl refuses it)."""
    edit_config(next_folder, lambda c: c["vision_config"].__setitem__("patch_size", 8))
    run_bad(capsys, next_folder, tmp_path, "vision_config.image_size 28 is not a multiple of patch_size 8")


def test_missing_image_newline(next_folder, tmp_path, capsys):
    path = next_folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["image_newline"]
    save_file(tensors, path)
    run_bad(capsys, next_folder, tmp_path, "image_newline")


@pytest.mark.parametrize("template,mentions", [
    ("{{ raise_exception('only system turns') }}", ("chat template", "only system turns")),
    ("{{ messages[0]['content'][5]['text'] }}", ("chat template",)),
    ("{% for m in messages %}", ("chat template", "does not parse")),
    # Jinja compiles a template to Python: nested deep enough, the compiler fails rather than the parser.
    ("{{ " + "(" * 400 + "1" + ")" * 400 + " }}", ("chat template", "does not parse", "RecursionError")),
    ("{% for a in [1] %}" * 30 + "{% endfor %}" * 30, ("chat template", "does not parse", "SyntaxError")),
    # The user's question cannot hold <image> (check_question): the template must place it, once.
    ("USER: {{ messages[0]['content'][-1]['text'] }} ASSISTANT:", ("chat template wrote 0 <image> for 1 image",)),
    ("<image><image>{{ messages[0]['content'][-1]['text'] }}", ("chat template wrote 2 <image> for 1 image",)),
])
def test_template_that_fails(next_folder, tmp_path, capsys, template, mentions):
    (next_folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    run_bad(capsys, next_folder, tmp_path, *mentions)


def test_mistral_with_a_sliding_window_runs_as_transformers_within_it_and_stops_there(tiny_ckpt, tmp_path):
    """A Mistral decoder whose tokens attend the last W tokens only: within W that is every earlier token,
    so the logits and the greedy answer are transformers' (whose mask applies the window), and the answer
    ends where the sequence would outgrow W (finish_reason "context"); a prompt of W tokens is refused."""
    from transformers import LlavaNextForConditionalGeneration

    folder = tmp_path / "mistral"
    shutil.copytree(tiny_ckpt.folder("next_mistral_gqa"), folder)
    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    image = make_image(*IMAGE_SHAPES["wide"], seed=5)
    inputs = processor(processor.chat_prompt(QUESTION), image)
    prompt_len, room = inputs["input_ids"].shape[1], 5
    window = prompt_len + room
    edit_config(folder, lambda config: config["text_config"].__setitem__("sliding_window", window))
    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    hf_model = LlavaNextForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    assert model.config.text.sliding_window == hf_model.config.text_config.sliding_window == window

    never = tokenizer_info()["vocab_size"] + 1000
    out = hf_model.generate(input_ids=inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
                            pixel_values=inputs["pixel_values"],
                            image_sizes=inputs["image_sizes"], do_sample=False, max_new_tokens=room + 1,
                            eos_token_id=never, pad_token_id=tokenizer_info()["pad_token_id"])
    tokens, stats = tinyavl.generate(model, **inputs, max_new_tokens=room + 4, eos_token_id=())
    assert stats.finish_reason == "context" and tokens == out[0, prompt_len:prompt_len + room].tolist()
    sequence = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], dim=1)  # (1, W - 1): all fed
    with torch.no_grad():
        ours = model(sequence, inputs["pixel_values"], image_sizes=inputs["image_sizes"])
        theirs = hf_model(input_ids=sequence, pixel_values=inputs["pixel_values"],
                          image_sizes=inputs["image_sizes"]).logits
    assert (ours - theirs).abs().max().item() <= LOGIT_ATOL

    # A window the prompt fills: transformers' earliest tokens would drop out of sight, tinyavl's never do.
    edit_config(folder, lambda config: config["text_config"].__setitem__("sliding_window", prompt_len))
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    with pytest.raises(UserError, match=f"context is {prompt_len} \\(its sliding window\\), prompt and answer together: shorten"):
        tinyavl.generate(model, **inputs, max_new_tokens=2)
    # Exactly the window: the last token still sees the first (transformers' mask keeps keys above q - W).
    # One token more is refused.
    model(inputs["input_ids"], inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with pytest.raises(UserError, match=f"reaches {prompt_len + 1} tokens, past the decoder's sliding window"):
        model(torch.cat([inputs["input_ids"], inputs["input_ids"][:, :1]], dim=1), inputs["pixel_values"],
              image_sizes=inputs["image_sizes"])


def test_a_decode_step_past_the_sliding_window_counts_the_tokens_cached_before_it():
    """The decoder's own refusal, for a caller that drives a cache by hand (generate refuses earlier): a cache
    holding the W tokens of the window, the next step would be token W + 1."""
    from test_validation import SMALL_TEXT
    from tinyavl.cache import KVCache
    from tinyavl.model import LlamaModel, TextConfig

    torch.manual_seed(0)
    config = TextConfig(**SMALL_TEXT, sliding_window=4)
    decoder = LlamaModel(config).eval()
    cache = KVCache()
    cache.begin(config.num_hidden_layers, 1, 0)
    with torch.no_grad():
        decoder(torch.randn(1, 4, 16), cache)                                   # exactly the window
        with pytest.raises(UserError, match="the sequence reaches 5 tokens, past the decoder's sliding window of 4"):
            decoder(torch.randn(1, 1, 16), cache)


def test_an_image_past_the_context_on_its_own_says_no_question_makes_room(tiny_ckpt, tmp_path):
    """A context of 80 tokens: the 60 x 60 image's 88 tokens fill it alone, so the error says no prompt with
    this image fits and that a smaller image takes fewer tiles; a 10 x 10 one (36 tokens) then runs."""
    folder = tmp_path / "short"
    shutil.copytree(tiny_ckpt.folder("next_vicuna_mha"), folder)
    edit_config(folder, lambda config: config["text_config"].__setitem__("max_position_embeddings", 80))
    model, processor = tinyavl.load_pretrained(folder, device="cpu")
    big = processor(processor.chat_prompt(QUESTION), make_image(60, 60, seed=1))
    with pytest.raises(UserError, match=r"the image's 88 tokens and the \d+ before them fill the model's context of 80: "
                                        r"no prompt with this image fits \(a smaller image is tiled on fewer tiles\)"):
        tinyavl.generate(model, **big, max_new_tokens=2)
    small = processor(processor.chat_prompt(QUESTION), make_image(10, 10, seed=1))
    assert int((small["input_ids"] == model.config.image_token_id).sum()) == 36
    tokens, _ = tinyavl.generate(model, **small, max_new_tokens=2)
    assert len(tokens) >= 1


def test_mistral_without_a_sliding_window_key_takes_mistrals_default(tiny_ckpt, tmp_path, capsys):
    """Absent, text_config.sliding_window is MistralConfig's default (4096): a run that fits it answers."""
    from transformers import LlavaNextConfig

    folder = tmp_path / "mistral"
    shutil.copytree(tiny_ckpt.folder("next_mistral_gqa"), folder)
    edit_config(folder, lambda config: config["text_config"].pop("sliding_window"))
    raw = json.loads((folder / "config.json").read_text())
    assert tinyavl.read_config(folder).text.sliding_window == LlavaNextConfig.from_dict(raw).text_config.sliding_window
    image = tmp_path / "image.png"
    make_image(40, 30, seed=0).save(image)
    rc, out, err = run_inprocess(capsys, ["--image", image, "--weights", folder, "--max-new-tokens", "2"])
    assert rc == 0 and out.strip(), err


@pytest.mark.parametrize("pinpoints", [[[28, 56]], [[28, 56], 3], 5], ids=["fewer", "malformed", "a_number"])
def test_preprocessor_and_config_disagreeing_on_the_canvases(next_folder, tmp_path, capsys, pinpoints):
    path = next_folder / "preprocessor_config.json"
    pre = json.loads(path.read_text())
    pre["image_grid_pinpoints"] = pinpoints
    path.write_text(json.dumps(pre))
    run_bad(capsys, next_folder, tmp_path, "image_grid_pinpoints", "preprocessor_config.json")


# ------------------------------------------------------------------------------------------- attention map
def test_attention_map_pictures_and_heat_on_the_next_block(loaded):
    """The heat is transformers' last-row attention over the whole block; the pictures give every token a
    cell except the newlines: the base crop's 4 x 4 over crop 0, the unpadded map over the stitched tiles."""
    model, processor, hf_model, _ = loaded("next_vicuna_gqa")
    image = make_image(*IMAGE_SHAPES["wide"], seed=3)
    inputs = processor(processor.chat_prompt(QUESTION), image)
    with torch.no_grad():
        attentions = hf_model(**inputs, output_attentions=True).attentions          # per layer (1, H, T, T)
        features = model.image_features(inputs["pixel_values"], inputs["image_sizes"])[0]
    block = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    for layer, weights in enumerate(attentions):
        heat = image_heat(model, inputs["input_ids"], inputs["pixel_values"], layer, inputs["image_sizes"])
        torch.testing.assert_close(heat, weights[0, :, -1, block].mean(0), atol=1e-5, rtol=0)

    base, high = token_pictures(model, processor, inputs)
    assert base.tokens.tolist() == list(range(16)) and base.grid == (4, 4)
    assert base.image.tobytes() == seen_image(inputs["pixel_values"][0, 0], processor).tobytes()
    newlines = (features == model.image_newline).all(-1).nonzero().flatten().tolist()
    assert sorted(high.tokens.tolist() + newlines + base.tokens.tolist()) == list(range(len(block)))
    assert high.tokens.tolist() == [i for i in range(16, len(block)) if i not in newlines]  # in reading order
    rows, columns = high.grid
    assert len(newlines) == rows
    # The high-res picture is the processor's tiles pasted back on their canvas, cut to the kept rows and
    # columns of the map (7 px each); un-normalising can move a channel by one.
    tiles = processor.anyres_crops(image)[1:]
    canvas_h, canvas_w = anyres.best_resolution((image.height, image.width), NEXT_PINPOINTS)
    canvas = Image.new("RGB", (canvas_w, canvas_h))
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (28 * (i % (canvas_w // 28)), 28 * (i // (canvas_w // 28))))
    kept_rows, kept_columns = anyres.unpadded_region((image.height, image.width), (canvas_h // 7, canvas_w // 7))
    expected = canvas.crop((7 * kept_columns.start, 7 * kept_rows.start, 7 * kept_columns.stop, 7 * kept_rows.stop))
    assert high.image.size == expected.size == (7 * columns, 7 * rows)
    assert np.abs(np.asarray(high.image, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_main_draws_the_next_attention_map(tiny_ckpt, tmp_path, capsys):
    image, out = tmp_path / "wide.png", tmp_path / "map.png"
    make_image(*IMAGE_SHAPES["wide"], seed=4).save(image)
    rc, _, err = run_inprocess(capsys, ["--image", image, "--weights", tiny_ckpt.folder("next_mistral_gqa"),
                                        "--max-new-tokens", "3", "--policy", "avl", "--attention-map", out,
                                        "--hires-threshold", "0"])
    assert rc == 0, err
    with Image.open(out) as picture:
        # two strips: the base crop's square panels, then the map's (wider than tall: PANEL wide)
        assert picture.width == 2 * PANEL + 10 and picture.height > 2 * (HEADER + SCALE_BAR) + PANEL
        # FlexAttention's blocks are framed on the base crop's heat panel (the low-resolution view) only
        heat_panels = [picture.crop((PANEL + 10, top, 2 * PANEL + 10, top + PANEL)) for top in
                       (HEADER, HEADER + PANEL + SCALE_BAR + HEADER)]
        framed = [BLOCK in {rgb for _, rgb in panel.getcolors(1 << 20)} for panel in heat_panels]
        assert framed == [True, False]


def test_the_attention_map_is_as_wide_as_its_widest_strip(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """A map of many cells a side draws a strip wider than the base crop's (here made so): the picture
    takes the widest strip whole, where it was cut to the first strip's width."""
    image, out = tmp_path / "wide.png", tmp_path / "map.png"
    make_image(*IMAGE_SHAPES["wide"], seed=4).save(image)
    strips = iter([Image.new("RGB", (100, 40), (255, 0, 0)), Image.new("RGB", (300, 40), (0, 0, 255))])
    monkeypatch.setattr(attention_map, "draw_attention_map", lambda *args: next(strips))
    rc, _, err = run_inprocess(capsys, ["--image", image, "--weights", tiny_ckpt.folder("next_mistral_gqa"),
                                        "--max-new-tokens", "2", "--attention-map", out])
    assert rc == 0, err
    with Image.open(out) as picture:
        assert picture.size == (300, 80)
        assert picture.getpixel((50, 20)) == (255, 0, 0) and picture.getpixel((299, 79)) == (0, 0, 255)
        assert picture.getpixel((150, 20)) == (255, 255, 255)                # beside the narrower strip: blank


@pytest.mark.parametrize("name", ["next_vicuna_mha", "next_mistral_gqa"])
def test_main_runs_a_next_folder_with_its_options(loaded, tiny_ckpt, tmp_path, capsys, name):
    """--json, a policy and its flags, sampling: the prompt main.py builds is transformers' (same template,
    same block length), and the policy's image rows are counted on the whole block."""
    hf_processor = loaded(name)[3]
    image = tmp_path / "tall.png"
    make_image(*IMAGE_SHAPES["tall"], seed=5).save(image)
    rc, out, err = run_inprocess(capsys, ["--image", image, "--weights", tiny_ckpt.folder(name), "--prompt", QUESTION,
                                          "--policy", "random", "--S", "0.5", "--max-new-tokens", "4",
                                          "--temperature", "0.7", "--seed", "3", "--json"])
    assert rc == 0, err
    result = json.loads(out)
    with_image = hf_processor(images=make_image(*IMAGE_SHAPES["tall"], seed=5), return_tensors="pt",
                              text=hf_processor.apply_chat_template(user_turn(QUESTION), add_generation_prompt=True))
    ids = with_image["input_ids"]
    assert result["prompt_tokens"] == ids.shape[1]
    n_img = int((ids == tokenizer_info()["image_token_id"]).sum())
    kv_heads = NEXT_VARIANTS[name].kv_heads
    assert result["kv_cache_bytes_peak_by_modality"]["image"] == 2 * (n_img // 2) * 2 * kv_heads * 16 * 4  # 2 layers


def test_an_image_too_wide_for_any_map_row_draws_the_base_crop_only(tiny_ckpt, tmp_path, capsys):
    """60 x 2 px on a 1 x 3 canvas: the 4 x 12 map keeps round(2 x 12 / 60) = 0 rows once unpadded (as in
    transformers), so the block is the base crop alone and the map draws the base crop's strip only."""
    image, out = tmp_path / "banner.png", tmp_path / "map.png"
    make_image(60, 2, seed=6).save(image)
    assert anyres.image_token_count((2, 60), NEXT_PINPOINTS, 28, 7) == 16
    rc, _, err = run_inprocess(capsys, ["--image", image, "--weights", tiny_ckpt.folder("next_vicuna_mha"),
                                        "--max-new-tokens", "2", "--attention-map", out])
    assert rc == 0, err
    with Image.open(out) as picture:
        assert picture.height == HEADER + PANEL + SCALE_BAR


SPECIAL_TOKENS_TEMPLATE = ("[{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ sep_token }}|"
                           "{{ cls_token }}|{{ mask_token }}|image_token {{ image_token is defined }}]<image>\n"
                           "{{ messages[0]['content'][-1]['text'] }}")


@pytest.mark.parametrize("declared", [
    {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},   # llava-1.6-mistral's pad
    {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},                        # no pad token
    {"bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                   "__type": "AddedToken"}, "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None},
    {"eos_token": "</s>"},                                                                  # the others undeclared
    {"tokenizer_class": "LlamaTokenizer"},                                                  # a class named, no token
    {"tokenizer_class": "LlamaTokenizer", "legacy": False},          # a llava folder's tokenizer.json kept as is
    {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "mask_token": "<unk>"},
    {"eos_token": "</s>", "image_token": "<image>", "add_bos_token": True},      # other names ending in _token
    {"eos_token": "</s>", "extra_special_tokens": {"image_token": "<image>"}},
    {"model_specific_special_tokens": {"image_token": "<image>"}},
    {"extra_special_tokens": ["<image>"]},                                       # a list names no token
    {},
    None,                                                                                   # no tokenizer_config.json
], ids=["pad_is_unk", "no_pad", "added_token_objects", "eos_only", "llama_class_only", "llama_not_legacy",
        "sep_cls_mask", "image_token", "extra_named", "model_specific", "extra_list", "empty", "no_file"])
def test_a_template_gets_the_special_tokens_tokenizer_config_declares(next_folder, declared):
    """As transformers hands them to the template: what tokenizer_config.json says, not fixed names, and no
    Llama defaults for what it leaves out (transformers 5 reads a llava folder's tokenizer.json as it is). The
    prompt's ids are transformers' too: one BOS, which the post-processor adds where none is declared."""
    from transformers import AutoProcessor

    (next_folder / "chat_template.json").write_text(json.dumps({"chat_template": "{{ bos_token }}" +
                                                                                 SPECIAL_TOKENS_TEMPLATE}))
    (next_folder / "tokenizer_config.json").unlink(missing_ok=True)
    if declared is not None:
        (next_folder / "tokenizer_config.json").write_text(json.dumps(declared))
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    hf = AutoProcessor.from_pretrained(next_folder, backend="pil")
    expected = hf.apply_chat_template(user_turn(QUESTION, True), add_generation_prompt=True, tokenize=False)
    assert processor.chat_prompt(QUESTION) == expected
    image = make_image(40, 30, seed=0)
    turn = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    expected_ids = hf.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")["input_ids"][0].tolist()
    assert processor(processor.chat_prompt(QUESTION), image)["input_ids"][0].tolist() == expected_ids


@pytest.mark.parametrize("declared", [
    {"image_token": {"content": "<image>"}},                                     # no "__type": no token
    {"image_token": {"content": "<image>", "__type": "AddedToken"}, "bos_token": "<s>"},
    {"model_specific_special_tokens": {"video_token": "<image>"}, "image_token": "<image>"},   # replaced
    {"model_specific_special_tokens": {"video_token": "<image>"}},
    {"bos_token": "<s>", "extra_special_tokens": {"bos_token": "</s>"}},         # over a named token
    {"extra_special_tokens": {"image_token": "<s>"}, "model_specific_special_tokens": {"image_token": "</s>"}},
    {"additional_special_tokens": {"image_token": "<image>"}},                   # the older name
    {"additional_special_tokens": ["<image>"], "extra_special_tokens": {"image_token": "<image>"}},
    {"eos_token": "</s>", "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False},
    {"image_token": {"content": "<image>", "__type": "AddedToken"},
     "model_specific_special_tokens": {"video_token": "<s>", "image_token": "</s>"}},   # the object under the block
    {"extra_special_tokens": {"a_token": "<s>"}, "additional_special_tokens": {"b_token": "</s>"}},
    {"bos_token": {"content": 5, "__type": "AddedToken"}},                          # refused, as each below
    {"extra_special_tokens": {"image_token": {"content": 5, "__type": "AddedToken"}}},
    {"extra_special_tokens": "<s>"},
    {"model_specific_special_tokens": ["<s>"]},
    {"extra_special_tokens": {"a_token": "<s>"}, "additional_special_tokens": "</s>"},
    {"extra_special_tokens": {"a_token": "<s>"}, "additional_special_tokens": {"x_token": "</s>"},
     "x_token": {"__type": "AddedToken", "content": "<unk>"}},                       # an AddedToken over both
    {"extra_special_tokens": [], "additional_special_tokens": {"image_token": "<image>"}},   # empty: the older
    {"extra_special_tokens": None, "additional_special_tokens": {"image_token": "<image>"}},
], ids=["no_type", "added_token", "replaced", "model_specific_only", "over_named", "extra_over_model_specific",
        "additional", "additional_and_extra", "flags", "added_token_under_the_block", "extra_and_additional",
        "content_not_a_string", "extra_content_not_a_string", "extra_a_string", "block_a_list", "additional_a_string",
        "added_token_over_both", "extra_empty", "extra_null"])
def test_the_special_tokens_read_are_transformers(next_folder, declared):
    """read_special_tokens against transformers' own reading of the same tokenizer_config.json (the tokens it
    hands a chat template, `special_tokens_map`), where the file declares a token more than one way; what
    transformers refuses (a TypeError), a UserError refuses."""
    from transformers import AutoTokenizer
    (next_folder / "tokenizer_config.json").write_text(json.dumps(declared))
    try:
        theirs = AutoTokenizer.from_pretrained(next_folder).special_tokens_map
    except TypeError:
        with pytest.raises(UserError, match="tokenizer_config.json has .*: it must be"):
            read_special_tokens(next_folder / "tokenizer_config.json")
    else:
        assert read_special_tokens(next_folder / "tokenizer_config.json") == theirs


def test_of_several_templates_the_one_transformers_takes_is_rendered(next_folder):
    """A folder may hold its template in chat_template.jinja, chat_template.json and processor_config.json:
    each added here in turn, it renders as transformers' processor renders the folder."""
    from transformers import AutoProcessor

    processor_config = json.loads((next_folder / "processor_config.json").read_text())
    (next_folder / "chat_template.json").unlink()
    for where, word in [("chat_template.jinja", "jinja"), ("chat_template.json", "json"),
                        ("processor_config.json", "config")]:
        template = word + " {{ messages[0]['content'][-1]['text'] }}"
        if where == "chat_template.jinja":
            (next_folder / where).write_text(template)
        else:
            config = {**processor_config, "chat_template": template} if where == "processor_config.json" else {
                "chat_template": template}
            (next_folder / where).write_text(json.dumps(config))
        _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
        expected = AutoProcessor.from_pretrained(next_folder).apply_chat_template(
            user_turn(QUESTION, False), add_generation_prompt=True, tokenize=False)
        assert processor.chat_prompt(QUESTION, has_image=False) == expected == f"{word} {QUESTION}"


# A template laid out over lines, as published ones are: the blocks' newlines and indents are the Jinja
# environment's to remove (trim_blocks, lstrip_blocks), as transformers' is set up.
TEMPLATE_OVER_LINES = ("{% for m in messages %}\n    {{ m['role'] | upper }}:\n"
                       "    {% for c in m['content'] %}\n        {% if c['type'] == 'image' %}<image>\n"
                       "        {% endif %}\n    {% endfor %}\n{{ m['content'][-1]['text'] }}\n{% endfor %}\n"
                       "{% if add_generation_prompt %}\nASSISTANT:\n{% endif %}")


@pytest.mark.parametrize("template", [TEMPLATE_OVER_LINES,
                                      "{% for c in messages[0]['content'] if c['type'] == 'image' %}<image>{% endfor %}"
                                      "{{ messages[0]['content'] | tojson }}"], ids=["over_lines", "tojson"])
def test_a_templates_whitespace_and_json_render_as_transformers_renders_them(next_folder, template):
    """Block tags' newlines and indents, and tojson of a question beyond ASCII (kept as written, not escaped)."""
    from transformers import AutoProcessor

    (next_folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    hf = AutoProcessor.from_pretrained(next_folder)
    for question in ("Wie viele Kreise? \U0001F600 \u00e9", QUESTION):
        for image in (True, False):
            expected = hf.apply_chat_template(user_turn(question, image), add_generation_prompt=True, tokenize=False)
            assert processor.chat_prompt(question, has_image=image) == expected


def test_an_empty_template_in_processor_config_is_the_template(next_folder):
    """transformers takes processor_config.json's "chat_template": "" as the template (not as none, which
    would pass on to chat_template.json): the prompt is empty."""
    from transformers import AutoProcessor

    config = json.loads((next_folder / "processor_config.json").read_text())
    (next_folder / "processor_config.json").write_text(json.dumps({**config, "chat_template": ""}))
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    expected = AutoProcessor.from_pretrained(next_folder).apply_chat_template(
        user_turn(QUESTION, False), add_generation_prompt=True, tokenize=False)
    assert processor.chat_prompt(QUESTION, has_image=False) == expected == ""


@pytest.mark.parametrize("template", [["{{ messages }}"], {"tools": "{{ messages }}"}, {"default": 3}],
                         ids=["list", "named_without_default", "default_not_a_string"])
def test_a_template_that_is_not_one_string_is_refused(next_folder, template):
    (next_folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    with pytest.raises(UserError, match="chat_template.json has no \"chat_template\" string \\(nor a named one"):
        tinyavl.load_pretrained(next_folder, device="cpu")


def test_of_named_templates_the_default_one_is_rendered(next_folder):
    """A "chat_template" of named templates: transformers renders the one named "default"."""
    from transformers import AutoProcessor

    named = {"tool_use": "tools {{ messages[0]['content'][-1]['text'] }}",
             "default": "D: {{ messages[0]['content'][-1]['text'] }}"}
    (next_folder / "chat_template.json").write_text(json.dumps({"chat_template": named}))
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    expected = AutoProcessor.from_pretrained(next_folder).apply_chat_template(
        user_turn(QUESTION, False), add_generation_prompt=True, tokenize=False)
    assert processor.chat_prompt(QUESTION, has_image=False) == expected == f"D: {QUESTION}"


def test_a_null_template_in_processor_config_is_no_template(next_folder):
    """processor_config.json's "chat_template": null counts as absent in transformers, which then renders
    chat_template.json's."""
    from transformers import AutoProcessor
    config = json.loads((next_folder / "processor_config.json").read_text())
    (next_folder / "processor_config.json").write_text(json.dumps({**config, "chat_template": None}))
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    expected = AutoProcessor.from_pretrained(next_folder).apply_chat_template(
        user_turn(QUESTION, True), add_generation_prompt=True, tokenize=False)
    assert processor.chat_prompt(QUESTION) == expected


def test_a_bos_inside_the_question_is_a_word_of_it_not_the_prompts_bos(next_folder):
    """Only a prompt that starts with BOS has its own (transformers: text.startswith(bos_token)); one that
    holds "<s>" later still gets the BOS the tokenizer adds."""
    from transformers import AutoProcessor
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    hf = AutoProcessor.from_pretrained(next_folder, backend="pil")
    image, question = make_image(40, 30, seed=0), "What does <s> mean?"
    turn = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    expected = hf.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")["input_ids"][0].tolist()
    ours = processor(processor.chat_prompt(question), image)["input_ids"][0].tolist()
    assert ours == expected and ours[0] == processor.bos_token_id


@pytest.mark.parametrize("resample", [0, 2])                                       # nearest, bilinear
def test_the_files_resampling_filter_is_used(next_folder, resample):
    """Every test folder resizes bicubically (3, the default): another filter must reach the canvas and the
    base crop too."""
    from transformers import AutoProcessor
    settings = json.loads((next_folder / "preprocessor_config.json").read_text())
    (next_folder / "preprocessor_config.json").write_text(json.dumps({**settings, "resample": resample}))
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    theirs = AutoProcessor.from_pretrained(next_folder, backend="pil")
    image, prompt = make_image(90, 40, seed=1), processor.chat_prompt("Hi")
    torch.testing.assert_close(processor(prompt, image)["pixel_values"],
                               theirs(images=image, text=prompt, return_tensors="pt")["pixel_values"],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("declared, says", [({"pad_token": 5}, "pad_token 5"),
                                            ({"extra_special_tokens": {"image_token": 5}},
                                             "extra_special_tokens 'image_token' = 5")])
def test_a_special_token_that_is_not_a_token_is_refused(next_folder, declared, says):
    (next_folder / "tokenizer_config.json").write_text(json.dumps(declared))
    with pytest.raises(UserError, match=f"tokenizer_config.json has {says}: it must be a token"):
        tinyavl.load_pretrained(next_folder, device="cpu")


TEMPLATES_USING_MORE = [
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] if c['type'] == 'image' %}"
    "<image>\n{% endfor %}{{ m['content'] | tojson(sort_keys=True) }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}",
    "{% if tools is not none %}TOOLS{% endif %}{% if documents is none %}[no documents] {% endif %}"
    "{% for c in messages[0]['content'] if c['type'] == 'image' %}<image>{% endfor %}"
    "{{ messages[0]['content'][-1]['text'] }}{{ eos_token }} ok{{ strftime_now('%Y')[:0] }}",
]


@pytest.mark.parametrize("template", TEMPLATES_USING_MORE, ids=["bos_and_tojson", "tools_documents_eos_strftime"])
def test_templates_get_the_variables_transformers_gives(next_folder, template):
    """Special tokens, tools and documents (None), strftime_now and tojson's arguments render as in
    apply_chat_template; a prompt that starts with <s> gets no second BOS, as transformers adds none."""
    from transformers import AutoProcessor

    (next_folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    _, processor = tinyavl.load_pretrained(next_folder, device="cpu")
    hf = AutoProcessor.from_pretrained(next_folder)
    for image in (True, False):
        expected = hf.apply_chat_template(user_turn(QUESTION, image), add_generation_prompt=True, tokenize=False)
        assert processor.chat_prompt(QUESTION, has_image=image) == expected
    ids = processor(processor.chat_prompt(QUESTION), make_image(40, 30, seed=0))["input_ids"][0].tolist()
    assert ids.count(processor.bos_token_id) == 1 and ids[0] == processor.bos_token_id


CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                   "{% for c in m['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
                   "{{ m['content'][-1]['text'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, "{{ bos_token }}" + CHATML_TEMPLATE],
                         ids=["chatml", "bos_chatml"])
def test_a_tokenizer_of_other_special_tokens_prompts_as_transformers_does(next_folder, template):
    """A folder whose tokenizer has no <s> or </s> (llava-v1.6-34b-hf's Yi tokenizer names its own, and its
    turns end with ChatML's <|im_end|>): BOS and EOS are the tokens tokenizer_config.json declares, and the
    prompt's ids are transformers', one BOS whether or not the template writes it."""
    from transformers import AutoProcessor

    renamed = {"<s>": "<|startoftext|>", "</s>": "<|endoftext|>"}
    tokenizer = json.loads((next_folder / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        token["content"] = renamed.get(token["content"], token["content"])
    tokenizer["model"]["vocab"] = {renamed.get(piece, piece): i for piece, i in tokenizer["model"]["vocab"].items()}
    post = json.dumps(tokenizer["post_processor"])
    for old, new in renamed.items():
        post = post.replace(f'"{old}"', f'"{new}"')
    tokenizer["post_processor"] = json.loads(post)                              # its BOS: <|startoftext|>
    first_new = max(token["id"] for token in tokenizer["added_tokens"]) + 1
    tokenizer["added_tokens"] += [{"id": first_new + i, "content": content, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True}
                                  for i, content in enumerate(["<|im_start|>", "<|im_end|>"])]
    (next_folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    (next_folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    edit_config(next_folder, lambda config: config["text_config"].update(vocab_size=first_new + 2))
    (next_folder / "tokenizer_config.json").unlink(missing_ok=True)   # without it, no special token is declared
    assert tinyavl.load_processor(next_folder)[1].bos_token_id is None
    declared = {"bos_token": "<|startoftext|>", "eos_token": "</s>"}
    (next_folder / "tokenizer_config.json").write_text(json.dumps(declared))
    with pytest.raises(UserError, match="no </s> token, the eos_token of tokenizer_config.json: the files come from"):
        tinyavl.load_processor(next_folder)
    (next_folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}))
    processor = tinyavl.load_processor(next_folder)[1]
    bos_id = next(token["id"] for token in tokenizer["added_tokens"] if token["content"] == "<|startoftext|>")
    assert (processor.bos_token_id, processor.eos_token_id) == (bos_id, first_new + 1)
    hf = AutoProcessor.from_pretrained(next_folder, backend="pil")
    image = make_image(60, 40, seed=3)
    turn = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    expected = hf.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")["input_ids"][0].tolist()
    ids = processor(processor.chat_prompt(QUESTION), image)["input_ids"][0].tolist()
    assert ids == expected and ids.count(bos_id) == 1 and ids.count(processor.image_token_id) > 1


def test_a_batch_of_images_with_different_crop_counts_matches_transformers(tiny_ckpt):
    """LlavaNextImageProcessor pads a batch's pixel_values with zero crops at the end of the images with
    fewer: each image's features (its own crops, from the front) equal transformers' get_image_features."""
    from transformers import AutoProcessor
    folder = tiny_ckpt.folder("next_vicuna_mha")
    hf_model = tiny_ckpt.model("next_vicuna_mha")
    model, _ = tinyavl.load_pretrained(folder, device="cpu")
    images = [make_image(90, 40, seed=1), make_image(60, 60, seed=2)]          # 4 and 5 crops
    batch = AutoProcessor.from_pretrained(folder, backend="pil").image_processor(images, return_tensors="pt")
    assert batch["pixel_values"][0, -1].abs().sum() == 0                        # image 0's padding crop
    with torch.no_grad():
        ours = model.image_features(batch["pixel_values"], batch["image_sizes"])
        theirs = hf_model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], vision_feature_layer=-2,
            vision_feature_select_strategy="default").pooler_output
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad():  # image_sizes as lists, which transformers takes too
        as_lists = model.image_features(batch["pixel_values"], batch["image_sizes"].tolist())
    assert all(torch.equal(a, b) for a, b in zip(as_lists, ours))


def test_the_base_crop_matches_transformers_when_shortest_edge_is_not_the_crop_size(tiny_ckpt, tmp_path):
    """The base image is resized to shortest_edge and centre-cropped to crop_size (no published LLaVA-1.6
    sets them apart): pixel_values equal transformers' processor's."""
    from transformers import AutoProcessor
    folder = tmp_path / "next"
    shutil.copytree(tiny_ckpt.folder("next_vicuna_mha"), folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["size"] = {"shortest_edge": 32}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    _, processor = tinyavl.load_pretrained(str(folder), device="cpu")
    theirs = AutoProcessor.from_pretrained(str(folder), backend="pil")
    image, prompt = make_image(90, 40, seed=1), processor.chat_prompt("Hi")
    torch.testing.assert_close(processor(prompt, image)["pixel_values"],
                               theirs(images=image, text=prompt, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shortest_edge", [28, 32], ids=["the_crop_size", "larger"])
@pytest.mark.parametrize("step", ["do_resize", "do_center_crop"])
def test_a_crop_step_switched_off_is_taken_where_it_changes_nothing(tiny_ckpt, tmp_path, step, shortest_edge):
    """LLaVA-1.6's crops are the tower's size: where shortest_edge is that size too, resizing and centre
    cropping them change nothing, and a folder that switches either off preprocesses as transformers does.
    Where shortest_edge differs, the step matters, and tinyavl, which always runs it, refuses the folder."""
    from transformers import AutoProcessor
    folder = tmp_path / "next"
    shutil.copytree(tiny_ckpt.folder("next_vicuna_mha"), folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    assert settings["crop_size"] in (28, {"height": 28, "width": 28})    # the tiny tower's input
    settings.update({"size": {"shortest_edge": shortest_edge}, step: False})
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    if shortest_edge != 28:
        with pytest.raises(UserError, match=f"sets {step}: false"):
            tinyavl.load_pretrained(str(folder), device="cpu")
        return
    _, processor = tinyavl.load_pretrained(str(folder), device="cpu")
    theirs = AutoProcessor.from_pretrained(str(folder), backend="pil")
    image, prompt = make_image(90, 40, seed=1), processor.chat_prompt("Hi")
    torch.testing.assert_close(processor(prompt, image)["pixel_values"],
                               theirs(images=image, text=prompt, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
