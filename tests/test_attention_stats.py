"""The attention measures on hand-made rows, and the recorder against transformers' attention weights."""
import pytest
import torch
from tiny_checkpoints import make_image

import tinyavl
from tinyavl.attention_stats import (capture, ppci, record_attention, segment_shares, segment_sizes, top_count, top_set,
                                     top_share)


def test_segment_shares_and_sizes_by_hand():
    # [sys 2 | image 3 | text 1]: sys .5 + .1, image .1 + .1 + 0, text .2.
    row = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.0, 0.2])
    assert segment_shares(row, n_sys=2, n_img=3) == pytest.approx({"sys": 0.6, "image": 0.2, "text": 0.2})
    assert segment_shares(2 * row, 2, 3) == pytest.approx({"sys": 0.6, "image": 0.2, "text": 0.2})  # unnormalised
    assert segment_sizes(6, 2, 3) == pytest.approx({"sys": 2 / 6, "image": 3 / 6, "text": 1 / 6})


def test_concentration_of_a_known_row():
    # 10 image scores: the top 10% is the single .3; the top 50% are .3 + .2 + .1 + .1 + .1 = .8.
    scores = torch.tensor([0.1, 0.3, 0.05, 0.2, 0.05, 0.1, 0.05, 0.1, 0.05, 0.0])
    assert top_share(scores, 0.1) == pytest.approx(0.3)
    assert top_share(scores, 0.5) == pytest.approx(0.8)
    assert top_share(torch.ones(8), 0.25) == pytest.approx(0.25)   # even attention: the share is p
    assert top_count(10, 0.01) == 1 and top_count(10, 0.55) == 5


def test_ppci_of_two_known_top_sets():
    # N = 10, p = 40%: T1 = {0, 1, 2, 3}, T2 = {2, 3, 4, 5}: |T1 ∩ T2| = 2, PPCI = 2 / 4.
    a = torch.tensor([9., 8, 7, 6, 1, 1, 1, 1, 1, 1])
    b = torch.tensor([1., 1, 9, 8, 7, 6, 1, 1, 1, 1])
    assert top_set(a, 0.4) == {0, 1, 2, 3} and top_set(b, 0.4) == {2, 3, 4, 5}
    assert ppci(a, b, 0.4) == 0.5
    assert ppci(a, a.flip(0), 0.4) == 0.0
    assert ppci(a, 3 * a + 1, 0.4) == 1.0          # a monotone transform keeps the order
    with pytest.raises(ValueError):
        ppci(a, b[:5], 0.4)


def test_capture_by_hand():
    scores = torch.tensor([0.4, 0.1, 0.3, 0.2])
    assert capture(scores, {0, 2}) == pytest.approx(0.7)
    assert capture(scores, [3]) == pytest.approx(0.2)
    assert capture(2 * scores[:3], {0, 2}) == pytest.approx(0.7 / 0.8)  # a share of the row's own total


@pytest.mark.parametrize("variant", ["mha", "gqa_full"])
def test_recorded_rows_are_transformers_attention_of_each_step(tiny_ckpt, variant):
    """Every recorded row, prefill and decode, equals transformers' eager attention weights of that
    query over the whole sequence (head mean), computed in one forward pass over prompt + answer."""
    model, processor = tinyavl.load_pretrained(tiny_ckpt.folder(variant), device="cpu")
    hf = tiny_ckpt.model(variant)
    hf.set_attn_implementation("eager")
    inputs = processor(processor.chat_prompt("what is this ?"), image=make_image(50, 40, 2))
    recorder, tokens = record_attention(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=4,
                                        eos_token_id=())
    assert len(recorder.rows) == len(tokens) == 4   # the prefill + 3 decode steps (the last token is never fed)
    # An answer ends at the eos_token_id given: here the second token's id, wherever it first comes.
    ended = tokens[:tokens.index(tokens[1]) + 1]
    shorter, ended_tokens = record_attention(model, inputs["input_ids"], inputs["pixel_values"], max_new_tokens=4,
                                             eos_token_id=tokens[1])
    assert ended_tokens == ended and len(shorter.rows) == len(ended)
    sequence = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], dim=1)
    with torch.no_grad():
        attentions = hf(input_ids=sequence, pixel_values=inputs["pixel_values"], output_attentions=True).attentions
    prompt_len = inputs["input_ids"].shape[1]
    for step, layers in enumerate(recorder.rows):
        query = prompt_len - 1 + step
        for layer, row in enumerate(layers):
            expected = attentions[layer][0, :, query, :query + 1].mean(0)   # (query + 1,) head mean
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=0)


def test_ppci_names_both_lengths_it_refuses():
    with pytest.raises(ValueError, match="got 10 and 5"):
        ppci(torch.ones(10), torch.ones(5), 0.4)
