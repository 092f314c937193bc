"""FlexAttention's block selection (tinyavl/hires.py) against hand-computed maps, and its frames in the picture."""
import math

import numpy as np
import pytest
import torch

from tinyavl import hires
from tinyavl.attention_map import BLOCK, HEADER, PANEL, draw_attention_map
from tinyavl.errors import UserError

from PIL import Image


def windows(n_tokens: int, n_blocks: int) -> list[range]:
    """Adaptive pooling's windows, from its formula: block i covers floor(n i / b) .. ceil(n (i + 1) / b) - 1."""
    return [range(n_tokens * i // n_blocks, -(-n_tokens * (i + 1) // n_blocks)) for i in range(n_blocks)]


def test_scores_are_the_normalised_maximum_of_each_window():
    # 4 x 4 tokens, 2 x 2 blocks (windows of 2 x 2): min 1, max 9, so a token scores (a - 1) / 8.
    attention = torch.tensor([[1., 2., 3., 3.],
                              [1., 1., 9., 1.],
                              [5., 1., 1., 1.],
                              [1., 1., 1., 2.]]).flatten()[None]
    scores = hires.block_scores(attention, (4, 4), blocks=2)
    expected = torch.tensor([[[(2 - 1) / 8, (9 - 1) / 8],
                              [(5 - 1) / 8, (2 - 1) / 8]]])
    torch.testing.assert_close(scores, expected, atol=1e-7, rtol=0)
    # x 255 against the threshold: 1/8 -> 31.9, 4/8 -> 127.5, 1 -> 255
    assert hires.threshold_blocks(scores, 48).tolist() == [[[False, True], [True, False]]]
    assert hires.threshold_blocks(scores, 31).tolist() == [[[True, True], [True, True]]]
    # select_blocks is the two together, at the threshold it is given (main.py's --hires-threshold), not 48
    assert hires.select_blocks(attention, (4, 4), 200, blocks=2).tolist() == [[[False, True], [False, False]]]
    assert hires.select_blocks(attention, (4, 4), 31, blocks=2).tolist() == [[[True, True], [True, True]]]
    # The minimum and maximum are the whole image's, not a row's or a window's: here the rows' minima differ
    # (0, 4, 1, 1), and the image's (0, 5) make a token score a / 5.
    attention = torch.tensor([[0., 1., 2., 3.],
                              [4., 4., 4., 5.],
                              [1., 1., 1., 1.],
                              [1., 1., 1., 2.]]).flatten()[None]
    torch.testing.assert_close(hires.block_scores(attention, (4, 4), blocks=2),
                               torch.tensor([[[4 / 5, 5 / 5], [1 / 5, 2 / 5]]]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("row, column", [(2, 2), (23, 0), (12, 17), (0, 23)])
def test_a_single_hot_token_selects_every_window_that_holds_it(row, column):
    """LLaVA-1.5's 24 x 24 tokens into 9 x 9 blocks: windows overlap, so a token can light up to 2 x 2 blocks."""
    attention = torch.zeros(1, 24, 24)
    attention[0, row, column] = 1.0
    blocks = hires.threshold_blocks(hires.block_scores(attention.flatten(1), (24, 24)), hires.THRESHOLD)[0]
    cells = windows(24, 9)
    expected = [[row in cells[i] and column in cells[j] for j in range(9)] for i in range(9)]
    assert blocks.tolist() == expected
    if (row, column) == (2, 2):  # rows 0-2 and 2-5: the token sits in two windows each way
        assert blocks.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_a_sum_over_heads_and_a_mean_select_the_same_blocks():
    g = torch.Generator().manual_seed(0)
    per_head = torch.rand(2, 8, 144, generator=g).softmax(-1)                  # (B, H, 12 x 12)
    by_sum = hires.block_scores(per_head.sum(1), (12, 12), blocks=6)
    by_mean = hires.block_scores(per_head.mean(1), (12, 12), blocks=6)
    torch.testing.assert_close(by_sum, by_mean, atol=1e-6, rtol=0)


def test_fewer_blocks_pass_a_higher_threshold():
    g = torch.Generator().manual_seed(1)
    scores = hires.block_scores(torch.rand(3, 24 * 24, generator=g) ** 4, (24, 24))
    counts, previous = [], None
    for threshold in (254.9, 200, 120, 48, 10, 0):
        chosen = hires.threshold_blocks(scores, threshold)
        assert previous is None or (chosen | ~previous).all()   # a lower threshold keeps every block chosen before
        counts.append(int(chosen.sum()))
        previous = chosen
    assert counts == sorted(counts) and counts[0] < counts[2] < counts[-1], counts
    # Just under 255: only the blocks whose window holds the row's strongest token (normalised to 1),
    # also where 254.999999 is 255 in fp32
    for threshold in (254.9, 254.999999):
        assert torch.equal(hires.threshold_blocks(scores, threshold), scores == 1)


def test_a_flat_row_points_nowhere():
    scores = hires.block_scores(torch.full((1, 36), 1 / 36), (6, 6), blocks=3)
    assert not scores.any() and not hires.threshold_blocks(scores, 0).any()


def test_top_blocks_take_the_best_scores_and_agree_with_a_threshold_between_them():
    g = torch.Generator().manual_seed(2)
    scores = hires.block_scores(torch.rand(2, 24 * 24, generator=g), (24, 24))    # (2, 9, 9)
    for count in (0, 1, 5, 81):
        chosen = hires.top_blocks(scores, count)
        assert chosen.flatten(1).sum(1).tolist() == [count, count]
        ranked = scores.flatten(1).sort(dim=1, descending=True).values
        if 0 < count < 81:
            for b in range(2):  # every chosen block scores at least as high as every other
                assert scores[b][chosen[b]].min() >= scores[b][~chosen[b]].max()
                cut = float(ranked[b, count - 1] + ranked[b, count]) / 2 * 255     # between the count-th and the next
                if ranked[b, count - 1] > ranked[b, count]:
                    assert torch.equal(hires.threshold_blocks(scores[b:b + 1], cut)[0], chosen[b])


def test_bad_settings_are_refused():
    for blocks in (5, 0):
        with pytest.raises(ValueError, match=f"{blocks} blocks per side do not fit"):
            hires.block_scores(torch.rand(1, 16), (4, 4), blocks=blocks)
    for threshold in (-1, 255, math.nan):
        with pytest.raises(UserError, match="the selection threshold must be from 0 to below 255"):
            hires.threshold_blocks(torch.rand(1, 3, 3), threshold)
    # A bool is not a count, in a tensor neither (topk took torch.tensor(True) as 1, scatter_ then failed
    # inside PyTorch).
    for count in (10, -1, 2.5, True, torch.tensor(True), "3"):
        with pytest.raises(UserError, match="from 0 to 9"):
            hires.top_blocks(torch.rand(1, 3, 3), count)
    assert int(hires.top_blocks(torch.rand(1, 3, 3), np.int64(4)).sum()) == 4   # numpy's integers are integers
    # numpy's numbers are numbers as thresholds too: float32(40) was refused as "must be from 0 to below 255".
    scores = torch.tensor([[[0.0, 0.1, 0.2], [0.3, 0.4, 0.5], [0.6, 0.7, 1.0]]])    # 255 x scores: 0, 25.5, ...
    for threshold in (np.float32(40), np.int64(40), 40):
        assert hires.threshold_blocks(scores, threshold).sum() == 7                     # 51 .. 255 above 40


def test_the_picture_frames_the_selected_blocks():
    """Block (i, j) of n is the i-th n-th of the heat panel down and the j-th across, framed in blue."""
    image = Image.new("RGB", (48, 48), (255, 255, 255))
    roles, heat = torch.full((16,), 2), torch.rand(16)
    blocks = torch.zeros(3, 3, dtype=torch.bool)
    blocks[1, 2] = True
    picture = draw_attention_map(image, roles, heat, "t", grid=(4, 4), blocks=blocks, footnote="1 of 9 blocks")
    left, top, block = PANEL + 10, HEADER, PANEL / 3
    assert picture.getpixel((left + round(2 * block), top + round(1 * block))) == BLOCK     # its top-left corner
    assert picture.getpixel((left + round(2.5 * block), top + round(2 * block) - 1)) == BLOCK  # its bottom edge
    assert picture.getpixel((left + round(0.5 * block), top + 1)) != BLOCK                  # block (0, 0): not chosen
    plain = draw_attention_map(image, roles, heat, "t", grid=(4, 4))
    assert not any(plain.getpixel((x, y)) == BLOCK for x in range(left, left + PANEL, 7) for y in range(top, top + PANEL, 7))


def test_blocks_upsample_to_squares_of_high_resolution_tokens():
    blocks = torch.tensor([[[True, False, False], [False, False, True], [False, False, False]]])   # (1, 3, 3)
    tokens = hires.block_tokens(blocks, 6).view(6, 6)          # 2 x 2 tokens a block
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:2, 0:2] = True                                  # block (0, 0)
    expected[2:4, 4:6] = True                                  # block (1, 2)
    assert torch.equal(tokens, expected)
    with pytest.raises(ValueError, match="do not tile"):
        hires.block_tokens(blocks, 7)


def test_high_resolution_positions_by_hand():
    """A 2 x 2 grid at positions 10, 11, 12, 13, seen at 2x: token (R, C) sits at low-res point
    ((R + 0.5) / 2 - 0.5, (C + 0.5) / 2 - 0.5), i.e. -0.25, 0.25, 0.75, 1.25 each way."""
    positions = hires.hires_positions(10, lowres_side=2, scale=2).view(4, 4)
    point = [-0.25, 0.25, 0.75, 1.25]
    expected = torch.tensor([[10 + 2 * r + c for c in point] for r in point])
    torch.testing.assert_close(positions, expected, atol=0, rtol=0)
    # scale 1 gives the low-resolution positions back exactly
    assert hires.hires_positions(10, lowres_side=2, scale=1).tolist() == [10, 11, 12, 13]


def test_merged_attention_is_one_softmax_over_both_key_sets():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)                       # (B, H, hs)
    keys, values = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 13, 8, generator=g,
                                                                                           dtype=torch.float64)

    def attend(k, v):
        logits = torch.einsum("bhd,bhnd->bhn", q, k)
        return torch.einsum("bhn,bhnd->bhd", logits.softmax(-1), v), logits.logsumexp(-1)

    whole, whole_lse = attend(keys, values)
    first, rest = attend(keys[:, :, :9], values[:, :, :9]), attend(keys[:, :, 9:], values[:, :, 9:])
    out, lse = hires.merge_attention(*first, *rest)
    torch.testing.assert_close(out, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, whole_lse, atol=1e-12, rtol=0)


@pytest.mark.parametrize("grid", [(3, 8), (8, 3)])
def test_a_grid_of_unequal_sides_pools_rows_and_columns_by_their_own_windows(grid):
    """grid is (rows, columns), the image tokens in reading order: on a 3 x 8 (or 8 x 3) grid, 3 x 3 blocks take
    rows and columns each by adaptive pooling's windows of its own length (`windows`, by hand); more blocks
    than the shorter side has tokens do not fit."""
    rows, columns = grid
    g = torch.Generator().manual_seed(4)
    attention = torch.rand(2, rows * columns, generator=g)
    grid_view = attention.view(2, rows, columns)
    low, high = attention.amin(1)[:, None, None], attention.amax(1)[:, None, None]
    normalised = (grid_view - low) / (high - low)
    expected = torch.tensor([[[max(float(normalised[b, r, c]) for r in row_cells for c in column_cells)
                               for column_cells in windows(columns, 3)] for row_cells in windows(rows, 3)]
                             for b in range(2)])
    torch.testing.assert_close(hires.block_scores(attention, grid, blocks=3), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        hires.block_scores(attention, grid, blocks=4)


def test_merged_bfloat16_attention_stays_bfloat16_and_close_to_the_exact_merge():
    """bf16 outputs merge in fp32 and come back in bf16, within bf16's rounding of the fp64 merge."""
    g = torch.Generator().manual_seed(5)
    out_a, out_b = torch.randn(2, 4, 3, 16, generator=g, dtype=torch.float64).unbind(0)
    lse_a, lse_b = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).unbind(0)
    share_a = lse_a.exp() / (lse_a.exp() + lse_b.exp())
    exact = share_a[..., None] * out_a.bfloat16().double() + (1 - share_a[..., None]) * out_b.bfloat16().double()
    out, lse = hires.merge_attention(out_a.bfloat16(), lse_a.float(), out_b.bfloat16(), lse_b.float())
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact, atol=0, rtol=2 ** -8)
    torch.testing.assert_close(lse.double(), torch.logaddexp(lse_a, lse_b), atol=1e-6, rtol=0)
