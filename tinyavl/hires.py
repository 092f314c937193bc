"""FlexAttention's high-resolution token selection: which blocks of the image a model's attention points at.

FlexAttention (Li et al., "FlexAttention for Efficient High-Resolution Vision-Language Models", ECCV 2024,
arXiv 2407.20228; not PyTorch's `flex_attention` API) shows the decoder the usual low-resolution image
tokens and keeps a high-resolution map of the same image beside the sequence (3x3 crops of LLaVA-1.5's
336 px, 72 x 72 tokens). From one layer on, the current token also attends to a few high-resolution
tokens: those in the blocks that its attention over the low-resolution tokens, in the layer before,
points at. The selection needs no training, so on any LLaVA it is a picture of where the model would
look closer (`main.py --attention-map --hires-threshold`). Attending to the selected tokens needs key and
value projections only a FlexAttention-trained model has: `HiresView` in tinyavl/model.py does it, with
`block_tokens`, `hires_positions` and `merge_attention` below, for a model whose config.json has a
hires_config.

The selection, as the authors' code makes it from the current token's attention over the image tokens
of a (rows, columns) grid (24 x 24 for LLaVA-1.5), summed over heads:
1. min-max normalise the row, so that its weakest token is 0 and its strongest 1 (a sum over heads and a
   mean over heads then give the same map);
2. keep the tokens whose normalised attention x 255 exceeds a threshold (48 in their training script);
3. max-pool that binary map to a coarse grid of blocks (9 x 9 for 24 x 24): a block is chosen when any
   token of its window was kept;
4. each chosen block is a square of 72 / 9 = 8 x 8 high-resolution tokens.
A binary map max-pooled is the max-pooled normalised attention thresholded (both are monotone), so
`block_scores` pools the normalised attention once and `threshold_blocks` compares it (`select_blocks`
does both); `top_blocks` takes a fixed number of blocks instead, a budget a test or a benchmark can hold
fixed.

24 rows do not split evenly into 9 windows; the pooling is PyTorch's adaptive max pooling, as in the
authors' code, whose window i covers rows floor(24 i / 9) .. ceil(24 (i + 1) / 9) - 1, so some
neighbouring windows share a row. Block i of the high-resolution map is still exactly the i-th ninth of
the image.

**Choice:** the authors' code, whose images are padded to a square, also sets to 0 the attention on the
grid rows (or columns) that a non-square image's padding fills, before step 1. tinyavl does not: the toy's
images are square, and llava-hf's LLaVA-1.5 processor crops rather than pads. On an image padded to a
square (do_pad) the padded border can then be chosen, where the authors' code would never choose it.
"""
import torch
import torch.nn.functional as F

from tinyavl.errors import UserError, is_real, is_whole

THRESHOLD = 48  # of 255: the selection threshold of the authors' training script
BLOCKS = 9      # blocks per side: LLaVA-1.5's 24 x 24 tokens pooled to 9 x 9 (8 x 8 high-resolution tokens each)
THRESHOLD_RANGE = "from 0 to below 255 (the 0-255 scale of the normalised attention)"  # said where one is refused


def is_threshold(threshold) -> bool:
    """A threshold selects some blocks only on the normalised attention's 0-255 scale: 0 <= threshold < 255
    (a Python or numpy number; true is not 1 here)."""
    return is_real(threshold) and 0 <= threshold < 255


def check_threshold(threshold: float, label: str = "the selection threshold") -> None:
    """UserError unless `is_threshold`; the message names it by `label` (main.py: its flag)."""
    if not is_threshold(threshold):
        raise UserError(f"{label} must be {THRESHOLD_RANGE}, got {threshold!r}")


def check_block_count(count, blocks: int) -> None:
    """A fixed number of blocks to read (`top_blocks`), of blocks x blocks, is an integer (Python's or
    numpy's) from 0 to blocks^2."""
    if not (is_whole(count) and 0 <= count <= blocks * blocks):
        raise UserError(f"the number of high-resolution blocks to read must be an integer from 0 to "
                        f"{blocks * blocks} ({blocks} x {blocks} blocks), got {count!r}")


def block_scores(image_attention, grid: tuple[int, int], blocks: int = BLOCKS):
    """(B, blocks, blocks) fp32 in [0, 1]: per block, the largest min-max normalised attention in its window.

    image_attention (B, rows * columns): the current token's attention over the low-resolution image tokens
    in reading order, summed or averaged over heads. A row whose tokens all get the same attention points
    nowhere: every block scores 0.
    """
    rows, columns = grid
    if not 1 <= blocks <= min(rows, columns):
        raise ValueError(f"{blocks} blocks per side do not fit a {rows} x {columns} grid of image tokens")
    attention = image_attention.float().view(-1, 1, rows, columns)                # (B, 1, rows, columns)
    low = attention.amin(dim=(2, 3), keepdim=True)                                 # (B, 1, 1, 1)
    spread = attention.amax(dim=(2, 3), keepdim=True) - low                        # (B, 1, 1, 1)
    # A flat row has no spread to normalise by: 0 / 1 leaves it all zero, so no block passes a threshold.
    normalised = (attention - low) / torch.where(spread > 0, spread, 1.0)          # (B, 1, rows, columns)
    return F.adaptive_max_pool2d(normalised, blocks)[:, 0]                         # (B, blocks, blocks)


def threshold_blocks(scores, threshold: float = THRESHOLD):
    """(B, blocks, blocks) bool: the blocks whose best token's normalised attention x 255 exceeds the
    threshold (0 <= threshold < 255; the lower, the more blocks). The count varies with the row."""
    check_threshold(threshold)
    # In float64: a threshold just under 255 would round to 255.0 in fp32, and then not even the row's best
    # block (score 1) would pass it.
    return scores.double() * 255 > threshold


def select_blocks(image_attention, grid: tuple[int, int], threshold: float = THRESHOLD, blocks: int = BLOCKS):
    """FlexAttention's selection: (B, blocks, blocks) bool from image_attention (B, rows * columns), the
    scores of `block_scores` compared with the threshold of `threshold_blocks`."""
    return threshold_blocks(block_scores(image_attention, grid, blocks), threshold)


def top_blocks(scores, count: int):
    """(B, blocks, blocks) bool: the `count` best-scored blocks of each row, a fixed budget (ties: topk's)."""
    B, blocks, _ = scores.shape
    check_block_count(count, blocks)
    chosen = torch.zeros(B, blocks * blocks, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, scores.flatten(1).topk(count, dim=1).indices, True)         # (B, blocks^2)
    return chosen.view(B, blocks, blocks)


def block_tokens(chosen, hires_side: int):
    """(B, hires_side^2) bool, the high-resolution tokens (a hires_side x hires_side map in reading order)
    inside the chosen blocks, chosen (B, blocks, blocks) bool: each block is a (hires_side / blocks) x
    (hires_side / blocks) square of them."""
    B, blocks, _ = chosen.shape
    if hires_side % blocks:
        raise ValueError(f"{blocks} blocks per side do not tile a {hires_side} x {hires_side} map of "
                         "high-resolution tokens")
    per_block = hires_side // blocks
    return chosen.repeat_interleave(per_block, 1).repeat_interleave(per_block, 2).view(B, hires_side ** 2)


def hires_positions(first_position: int, lowres_side: int, scale: int):
    """(lowres_side * scale)^2 fp32 RoPE positions of the high-resolution tokens, in reading order.

    The low-resolution tokens of a lowres_side x lowres_side grid sit at first_position + lowres_side r + c.
    A high-resolution token (R, C) covers the low-resolution point r = (R + 0.5) / scale - 0.5 (its centre,
    in units of low-resolution tokens), and c from C likewise, so it takes first_position + lowres_side r + c,
    the same linear map, and each key a true rotation at its position. The authors' code
    (UMass-Foundation-Model/FlexAttention, `set_hd_info` in llava/model/language_model/llava_llama.py)
    interpolates instead the low-resolution grid's RoPE tables, cos and sin, bicubically to the
    high-resolution grid: values between rotations, not rotations (cos^2 + sin^2 strays from 1 in the
    dimensions that turn fastest, where neighbouring tokens' angles differ most). tinyavl interpolates the
    positions, the paper's description, and rotates by them."""
    centre = (torch.arange(lowres_side * scale, dtype=torch.float32) + 0.5) / scale - 0.5  # (lowres_side scale,)
    return (first_position + lowres_side * centre[:, None] + centre[None, :]).flatten()    # ((lowres_side scale)^2,)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """One softmax over two sets of keys, from each set's own attention output (..., hs) and log-sum-exp
    (...), any leading shape ((B, H, R, hs) in `HiresView.merge`): each output weighs by its share of the
    total, exp(lse - logaddexp(lse_a, lse_b)), as split-K decoding merges its splits (chapter 5); an lse of
    -inf (nothing chosen) weighs 0, while the other is finite (both -inf would give NaN: `HiresView.merge`
    always has the row's own keys on one side). Returns (out (..., hs), lse (...))."""
    lse = torch.logaddexp(lse_a, lse_b)                                               # (...)
    dtype = torch.promote_types(out_a.dtype, torch.float32)                           # bf16 outputs add in fp32
    out = (lse_a - lse).exp()[..., None] * out_a.to(dtype) + (lse_b - lse).exp()[..., None] * out_b.to(dtype)
    return out.to(out_a.dtype), lse
