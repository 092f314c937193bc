"""Generation: one prefill over the prompt, which gives the first token, then one decode step per further
token, through a KV cache.

The cache object is the policy (tinyavl/cache.py): `full` keeps everything; the others keep or compute
less. This loop is the same for all of them, and it measures what they hold and compute.
"""
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tinyavl.cache import MODALITIES, KVCache, make_cache
from tinyavl.errors import UserError, is_whole
from tinyavl.model import keys_first
from tinyavl.params import SEED_PARAM, Param, rate


@dataclass
class GenerationStats:
    policy: str
    policy_params: dict
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "eos" (the model ended its answer), "length" (max_new_tokens), "context" (context full)
    prefill_seconds: float             # the image's features (and views), the prompt's pass, the first token
    decode_seconds: float              # the decode steps' forward passes and token choices, summed
    decode_tokens_per_second: float | None  # None when there was no decode step (one token generated)
    kv_cache_bytes_peak: int           # peak bytes of K and V held, measured after every forward pass
    kv_cache_bytes_after_prefill: int
    kv_cache_bytes_dense: int          # what the dense cache would hold at the end of the same sequence
    modality_bytes_after_prefill: dict  # {"sys": ..., "image": ..., "text": ...} summed over layers
    modality_bytes_peak: dict           # the same, at the first step of peak total bytes
    layer_bytes_after_prefill: list     # per layer: {"sys": ..., "image": ..., "text": ...}
    attended_tokens_per_step: float | None        # mean over decode steps, summed over layers
    attended_tokens_per_step_dense: float | None  # the same for dense attention
    attended_per_layer: list = field(default_factory=list)  # per decode step: rows attended per layer
    prefill_attended_per_layer: list = field(default_factory=list)  # per layer: the rows the prefill ran on
    hires_tokens_read: int = 0  # FlexAttention: high-resolution keys read by the current tokens, all layers
    decode_step_seconds: list = field(default_factory=list)  # per decode step: its forward pass and token choice

    @property
    def cached_tokens(self) -> int:
        """The tokens fed through the cache: the prompt and every new token but the last, chosen, never fed."""
        return self.prompt_tokens + self.new_tokens - 1

    @property
    def kv_cache_bytes_dense_after_prefill(self) -> int:
        """What the dense cache holds for the prompt alone (its bytes grow by the same amount a token)."""
        return self.kv_cache_bytes_dense * self.prompt_tokens // self.cached_tokens


def image_segments(input_ids, image_token_id: int) -> tuple[int, int]:
    """(n_sys, n_img) of a prompt [sys | image | text]; without an image, the first token is sys."""
    where = (input_ids[0] == image_token_id).nonzero().flatten()   # (n_img,) positions of the image tokens
    if len(where) == 0:
        # No image: keep BOS, the attention sink, as the protected sys segment.
        return 1, 0
    n_sys, n_img = int(where[0]), len(where)
    if int(where[-1]) - n_sys + 1 != n_img:
        raise UserError("the prompt's image tokens are not one block: tinyavl's KV policies split a prompt into "
                        "[sys | image | text], so generate takes one image")
    return n_sys, n_img


def sample(logits, temperature: float, top_k: int, top_p: float, generator):  # logits (vocab,) fp32
    """Greedy at temperature 0; otherwise as transformers' generate samples (its TemperatureLogitsWarper,
    TopKLogitsWarper, TopPLogitsWarper, in that order): the temperature, then the top_k most likely tokens
    (0: every token), then the nucleus (top-p) of those."""
    if temperature <= 0:
        return int(logits.argmax())
    # In float64 and from the top logit down: a tiny temperature then sends the others to -inf (probability 0)
    # rather than overflowing fp32 to inf - inf = nan, and a tiny top_p still keeps the first token.
    probs = ((logits.double() - logits.max()) / temperature).softmax(-1)  # (vocab,) fp64
    # Stable: of equally likely tokens at the nucleus' edge, those with the lowest ids stay (README).
    sorted_probs, order = probs.sort(descending=True, stable=True)         # each (vocab,)
    if 0 < top_k < len(sorted_probs):
        # A token as likely as the k-th stays too, as transformers keeps every score up to the k-th's.
        sorted_probs = sorted_probs.masked_fill(sorted_probs < sorted_probs[top_k - 1], 0.0)   # (vocab,)
        sorted_probs = sorted_probs / sorted_probs.sum()  # (vocab,): top-p measures the mass top-k kept
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p              # (vocab,) bool
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)       # (1,): a rank in sorted order
    return int(order[choice])


def next_token(logits, temperature: float, top_k: int, top_p: float, generator, step: int) -> int:  # (1, 1, vocab)
    """The token after a forward pass; a clear error instead of garbage when the logits are not finite."""
    # On the CPU, with the CPU generator: a seed draws the same random numbers whatever device ran the model.
    last = logits[0, -1].float().cpu()                                     # (vocab,)
    if not torch.isfinite(last).all():
        raise UserError(f"the model's logits are NaN or infinite at step {step}: the checkpoint is broken, or "
                        "half precision overflowed (load it in float32: --dtype float32, or load_pretrained's dtype)")
    return sample(last, temperature, top_k, top_p, generator)


def kv_snapshot(cache: KVCache) -> tuple[int, dict, list]:
    """(total bytes, bytes per modality over all layers, bytes per modality per layer)."""
    per_layer = [cache.modality_bytes(layer) for layer in range(cache.n_layers)]
    totals = {m: sum(layer[m] for layer in per_layer) for m in MODALITIES}
    return cache.nbytes(), totals, per_layer


def id_set(ids) -> set[int]:
    """An id or a collection of ids (a list, a range, a numpy array, a tensor; the model's eos_token_id may
    be an id, a list, or null) as a set. An id past the vocabulary is never produced: it ends nothing, as in
    transformers' generate."""
    if ids is None:
        return set()
    values = ids.tolist() if hasattr(ids, "tolist") else ids  # numpy's and torch's ids as Python ints
    if is_whole(values) or isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        values = [values]  # one value: an id, or something refused below
    values = list(values)
    if not all(is_whole(i) for i in values):
        raise UserError(f"eos_token_id must be a token id, a collection of them, () or None, got {ids!r}")
    return {int(i) for i in values}


# generate's settings, declared as the policies' parameters are (`Param`, tinyavl/params.py): main.py's flags,
# their help and their checks come from here. Their defaults are `generation`'s (a test holds them equal).
GENERATION_PARAMS = (
    Param("max_new_tokens", 64, "most tokens to generate (fewer at EOS or at the end of the context)", low=1),
    Param("temperature", 0.0, "0 = greedy", low=0, high=math.inf, ends="[)"),
    # checked when greedy too: a nan or -1 is a mistake anyway. 50: transformers' generate's default.
    Param("top_k", 50, "sample among the k most likely tokens, before top-p (0 = every token; with temperature > 0)",
          low=0),
    rate("top_p", 1.0, "nucleus sampling: the smallest set of tokens whose probability reaches this (with "
                       "temperature > 0)"),
)


def check_generation_args(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
                          named=str) -> tuple:
    """(max_new_tokens, temperature, top_k, top_p, seed) as Python's int and float (numpy's numbers too), or
    a UserError for settings generate cannot honour (`GENERATION_PARAMS`, and a seed torch takes, or None: a
    fresh draw). main.py checks them before it loads the model, its messages naming the flags:
    named("top_p") == "--top-p"."""
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    checked = {param.name: param.check(given[param.name], named) for param in GENERATION_PARAMS}
    return (checked["max_new_tokens"], checked["temperature"], checked["top_k"], checked["top_p"],
            None if seed is None else SEED_PARAM.check(seed, named))


def cache_for(policy, policy_params: dict) -> KVCache:
    """The cache generate runs: a new one for a policy name and its parameters, or the KVCache given."""
    if isinstance(policy, str):
        return make_cache(policy, **policy_params)
    if not isinstance(policy, KVCache):
        raise UserError(f"policy is a policy name or a KVCache, got {type(policy).__name__}")
    if policy_params:
        raise UserError(f"policy parameters ({', '.join(policy_params)}) go with a policy name: a cache "
                        "object has its own, set when it was made (make_cache(name, **params))")
    return policy


def prompt_layout(input_ids, pixel_values, config) -> tuple[int, int]:
    """(n_sys, n_img), the prompt's tokens before its image and its image tokens (`image_segments`), for a
    prompt generate can run: one (1, T) prompt, an image for its image tokens, room in the context. (That
    an image makes one feature per image token, and a LLaVA-1.6 one comes with its image_sizes, the
    model checks where it makes the features: `image_features`, `embed`.)"""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise UserError(f"input_ids must be one prompt, a tensor of shape (1, T), got {shape}")
    if input_ids.shape[1] == 0:
        raise UserError("input_ids holds no token: a prompt needs at least one (the processor's starts with BOS)")
    if input_ids.dtype not in (torch.int64, torch.int32):  # the types an embedding lookup takes
        raise UserError(f"input_ids must hold token ids (torch.int64), got {input_ids.dtype}")
    # An id with no embedding row would crash the lookup (on a GPU, a device assert that ends the process).
    low, high = (int(i) for i in input_ids.aminmax())
    if low < 0 or high >= config.text.vocab_size:
        raise UserError(f"input_ids holds the token id {low if low < 0 else high}, but the model's vocabulary has "
                        f"ids 0 .. {config.text.vocab_size - 1}")
    n_sys, n_img = image_segments(input_ids, config.image_token_id)
    if n_img and pixel_values is None:  # the model would embed them as words: an answer about no image
        raise UserError(f"the prompt has {n_img} image tokens but no image was given: pass pixel_values (the "
                        "processor's), or a prompt without the image")
    prompt_len, context = input_ids.shape[1], config.text.context
    if prompt_len >= context:
        window_note = " (its sliding window)" if context == config.text.sliding_window else ""
        # No shorter question makes room where the image and what comes before it (the template's start) fill
        # the context already: the image's tokens come from the model's sizes.
        if n_sys + n_img >= context:
            fewer = ("a smaller image is tiled on fewer tiles" if config.is_next
                     else "the model's config.json gives every image as many")
            raise UserError(f"the image's {n_img} tokens and the {n_sys} before them fill the model's context of "
                            f"{context}{window_note}: no prompt with this image fits ({fewer})")
        image_part = f" ({n_img} of them the image's)" if n_img else ""
        # At exactly the context the prompt fits, but its answer would not: the answer needs a row too.
        raise UserError(f"the prompt has {prompt_len} tokens{image_part}, the model's context is "
                        f"{context}{window_note}, prompt and answer together: shorten the prompt to at most "
                        f"{context - 1} tokens")
    return n_sys, n_img


def generate(model, input_ids, pixel_values=None, *, stream=None, **options) -> tuple[list[int], GenerationStats]:
    """A whole `generation` (whose arguments these are), run to its end: stream(token_id) is called as each
    token is produced. Returns the new token ids (EOS included when it stops generation) and the run's
    statistics, whose finish_reason says why it stopped."""
    run = generation(model, input_ids, pixel_values, **options)
    while True:
        try:
            token = next(run)
        except StopIteration as end:
            return end.value
        if stream:
            stream(token)


@torch.inference_mode()
def generation(model, input_ids, pixel_values=None, *, image_sizes=None, hires_pixel_values=None,
               hires_top: int | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 50, top_p: float = 1.0, seed: int | None = None,
               eos_token_id: int | Sequence[int] | None = None,
               policy: KVCache | str = "full", **policy_params):
    """Generate up to max_new_tokens after the prompt input_ids (1, T) (image tokens already expanded);
    pixel_values and image_sizes as the processor returns them (image_sizes: LLaVA-1.6 only needs it;
    hires_pixel_values: a FlexAttention model's high-resolution view, whose blocks every step reads;
    hires_top: read that many best blocks instead of the threshold's, `HiresView.top`).

    eos_token_id: the id (or ids) that end the answer; None means the model's (config.text.eos_token_id:
    generation_config.json's where the folder declares them, else config.json's), () never stops early.
    policy: a cache object or a policy name (a key of cache.POLICIES: "full", "avl", ...) whose
    parameters are the keyword arguments.
    A generator, one step at a time: it yields each new token as it is chosen, and returns (its return
    value, in StopIteration) the new token ids and the run's statistics. `generate` runs one to its end;
    the benchmark runs several in turn (tinyavl/bench.py, `run_policies`).
    """
    max_new_tokens, temperature, top_k, top_p, seed = check_generation_args(max_new_tokens, temperature, top_k,
                                                                           top_p, seed)
    if hires_top is not None and hires_pixel_values is None:
        raise UserError("hires_top picks blocks of the high-resolution view: pass hires_pixel_values too")
    cache = cache_for(policy, policy_params)
    n_sys, n_img = prompt_layout(input_ids, pixel_values, model.config)
    text_config = model.config.text
    prompt_len = input_ids.shape[1]
    eos_ids = id_set(text_config.eos_token_id if eos_token_id is None else eos_token_id)
    # Generation also stops at the end of the context.
    limit = min(max_new_tokens, text_config.context - prompt_len)
    device = model.language_model.lm_head.weight.device
    generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None

    # The last token is chosen, never fed back: limit - 1 decode steps, a row each.
    cache.begin(text_config.num_hidden_layers, n_sys, n_img, max_decode_steps=limit - 1)

    def on_device(pixels):  # the image's tensors, if any, where the model is
        return None if pixels is None else pixels.to(device)

    # The one-time timing that chooses how a query's logits are multiplied on this machine, made before
    # the clock starts: the first step to need it would otherwise count it (10-20 ms on this project's
    # 2-core CPU, 2026-12-05).
    keys_first(device.type, model.language_model.lm_head.weight.dtype)
    start = time.perf_counter()
    # FlexAttention: the view of the image at high resolution, served from the prompt's last row on.
    hires_view = (None if hires_pixel_values is None
                  else model.make_hires_view(input_ids.to(device), on_device(hires_pixel_values), top=hires_top))
    logits = model(input_ids.to(device), on_device(pixel_values), cache=cache, last_only=True,
                   image_sizes=image_sizes, hires_view=hires_view)  # (1, 1, vocab)
    token = next_token(logits, temperature, top_k, top_p, generator, step=0)
    prefill_seconds = time.perf_counter() - start
    prefill_attended = list(cache.attended)

    prefill_bytes, prefill_modality_bytes, prefill_layer_bytes = kv_snapshot(cache)
    peak_bytes, peak_modality_bytes = prefill_bytes, prefill_modality_bytes
    tokens, attended_per_layer, attended_dense, step_seconds = [token], [], [], []
    yield token
    while len(tokens) < limit and token not in eos_ids:
        # Timed: the step's forward pass and its token (which waits for a GPU's work); not what the caller
        # does with the token, nor the statistics below, which every policy would otherwise pay unequally
        # (the snapshot runs each time the cache passes its peak: every step for `full`).
        start = time.perf_counter()
        logits = model(torch.tensor([[token]], device=device), cache=cache, last_only=True)    # (1, 1, vocab)
        token = next_token(logits, temperature, top_k, top_p, generator, step=len(tokens))
        step_seconds.append(time.perf_counter() - start)
        tokens.append(token)
        yield token
        attended_per_layer.append(list(cache.attended))
        attended_dense.append(cache.next_pos * cache.n_layers)  # dense: every token in every layer
        if cache.nbytes() > peak_bytes:
            peak_bytes, peak_modality_bytes, _ = kv_snapshot(cache)
    decode_seconds = sum(step_seconds)

    decode_steps = len(attended_per_layer)
    finish_reason = "eos" if token in eos_ids else "length" if len(tokens) == max_new_tokens else "context"
    stats = GenerationStats(
        policy=cache.name, policy_params=cache.params(), prompt_tokens=prompt_len, new_tokens=len(tokens),
        finish_reason=finish_reason,
        prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
        decode_tokens_per_second=decode_steps / decode_seconds if decode_steps else None,
        kv_cache_bytes_peak=peak_bytes, kv_cache_bytes_after_prefill=prefill_bytes,
        kv_cache_bytes_dense=cache.dense_nbytes(),
        modality_bytes_after_prefill=prefill_modality_bytes, modality_bytes_peak=peak_modality_bytes,
        layer_bytes_after_prefill=prefill_layer_bytes,
        attended_tokens_per_step=sum(map(sum, attended_per_layer)) / decode_steps if decode_steps else None,
        attended_tokens_per_step_dense=sum(attended_dense) / decode_steps if decode_steps else None,
        attended_per_layer=attended_per_layer, prefill_attended_per_layer=prefill_attended,
        hires_tokens_read=0 if hires_view is None else hires_view.tokens_read, decode_step_seconds=step_seconds,
    )
    return tokens, stats
