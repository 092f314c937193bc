"""Every KV policy side by side on a random model with LLaVA-1.5-7B layer shapes, against the memory floor.

    python -m tinyavl.bench                       # 4 decoder layers, image blocks of 576 and 2928 tokens
    python -m tinyavl.bench --image-tokens 576 --dtypes float32 --json
    python -m tinyavl.bench --arch next           # LLaVA-1.6: the blocks of a 672x672 and a 336x1008 image
    python -m tinyavl.bench --device cuda --layers 32 --dtypes bfloat16   # the whole 7B decoder on a GPU

The decoder layers have the real shapes (hidden 4096, 32 heads x 128, MLP 11008, vocab 32064); only
their number is cut so that the model fits a small machine. 4 is the fewest at which every default
applies (both filters drop after layer filter_layer - 1: FastV's 1, A-VL's prefill filter's 2). The image
block is random features of the given length standing in for the projected image features (CLIP's
output after LLaVA's projector, as wide as the decoder): LLaVA-1.5 has 576, a
LLaVA-1.6 672x672 image 2928. The policies act on the decoder, which is what is measured.

A decode step is memory-bound: it cannot take less than the bytes it must read (every decoder weight,
plus the K/V rows the policy attends) over the rate they can be read at. The benchmark measures both
rates in the same run, just before and just after each image block's policies (the faster of the two):
a large fp32 tensor's read (`read_rate`, what
the machine allows) and PyTorch's matrix-vector product on the layer's own weight shapes in the run's
dtype (`matvec_rate`, what `nn.Linear` allows). A step's floor (`floor_ms`) is its weight bytes at the
matrix-vector rate plus its attended K/V bytes at the read rate; the hardware floor is all of them at the
read rate (tutorial chapter 8 works through both, and what a policy can save against them). The run also
says which of two equal products gives a decode query's logits on this machine (`decode_logits`: k q^T or
q k^T, as `model.keys_first` chose them: on a CPU by timing both, `faster_keys_first`).

For each policy, in one run on the same prompt: KV bytes held (peak, relative to `full`), rows attended per
decode step (summed over layers, relative to `full`), prefill time, decode ms per step beside its floor,
the time inside the cache's four stages (`attention_ms`, summed over layers), and for A-VL the share of its
core that each re-rank replaced (`core_replaced`: an update step's swaps move each row entering the core
and the one it replaces) and its attention ms split by kind of step: normal steps (sys + core + text) and
update steps (every stored row, the re-rank and its swaps, with the swaps' part beside), and the two
mixed as in a long answer, one update step in K (`attention_ms_steady`). The policies' decode steps are
taken in turn (`run_policies`), so that the machine's drift weighs on every policy alike. Then `full` and
`avl` decode 256 tokens, in turn too, to show how the step grows with the sequence (at the 16th and the
256th token: the ms per step, and the part of it inside the cache's four stages, which reads the K/V rows;
and the slope of each, fitted over every step between). With transformers installed, its LLaVA decodes
the same weights and prompt (the first image block) with full attention, its steps taken in turn with
those of tinyavl's `full` (`transformers_decode_ratio`), and tinyavl's decode speed is printed relative to
it, for each dtype (in `--json`, `transformers_decode_ratio` is the first dtype's and
`transformers_decode_ratios` every dtype's). Absolute times on a shared CPU are noise; ratios measured in
one run are the result.

`--device cuda` runs all of it on a GPU (the default where CUDA is present, as in main.py), where A-VL's
decode steps go through the Triton kernel (kernels/sparse_attention.py). GPU work is queued, not done,
when a Python call returns: the rates wait for the GPU (`synchronize`), the cache's steps are timed with
CUDA events (`Timings`), and each policy first runs a few untimed tokens so that no step time includes
compiling a kernel (`run_policies`).
Decode steps time themselves: each picks its token on the host, which waits for the GPU.

`--arch next` measures LLaVA-1.6-7B (llava-v1.6-vicuna-7b: the same decoder) on the image blocks that
anyres makes of a 672x672 and a 336x1008 (h x w) image (tinyavl/anyres.py), and sets the A-VL paper's
memory arithmetic beside them (`paper_memory`): the KV cache of the whole 32-layer model in fp16 for the
benchmark's prompt and 64 new tokens (a caption), dense and under A-VL at the paper's memory-table
setting (T = 0.7, the rest at the defaults), next to its 1179 MB -> 531 MB. The counts come from the
policy's own cache, run on a tiny decoder of the same depth and token layout (bytes per row scale with
width; which rows are kept does not).
"""
import json
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import torch

from tinyavl import anyres
from tinyavl.cache import POLICIES, AVLCache, make_cache
from tinyavl.cli import ArgumentParser, check_stdout_open, run_main
from tinyavl.errors import UserError
from tinyavl.generate import generate, generation
from tinyavl.loading import resolve_device, transformers_key
from tinyavl.model import LlavaConfig, LlavaForConditionalGeneration, TextConfig, VisionConfig, keys_first
from tinyavl.timing import best_seconds, synchronize

GROWTH_TOKENS = (16, 256)  # the decode steps whose time shows how a step grows with the sequence
N_SYS, N_TEXT = 5, 40  # "<s> USER: " and a question plus "ASSISTANT:" of typical length
# LLaVA-1.6-7B's canvases (config.json's image_grid_pinpoints), its 336 px tiles and 14 px patches.
LLAVA_V16_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
NEXT_IMAGES = ((672, 672), (336, 1008))  # (height, width) of the images whose blocks --arch next measures
# The paper's memory table does not name its image: 640x480 is a common photo size.
PAPER_MEMORY_IMAGES = ((672, 672), (336, 1008), (480, 640))
PAPER_MEMORY = {"dense_MB": 1179, "avl_MB": 531, "params": {"T": 0.7}, "new_tokens": 64}


def llava_7b_config(n_layers: int) -> LlavaConfig:
    text = TextConfig(vocab_size=32064, num_hidden_layers=n_layers, max_position_embeddings=4096, rms_norm_eps=1e-5)
    # A token vision tower: the benchmark feeds the image block directly (see `set_image_block`).
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=28, patch_size=14)
    return LlavaConfig(text=text, vision=vision)


def tiny_config(n_layers: int, **text) -> LlavaConfig:
    """A tiny decoder (width 32) that takes the benchmark's prompts: which rows a policy keeps depends on
    the token layout and the number of layers, not on the width, so it counts a 7B's rows in a second.
    text: TextConfig fields to change (its heads, its context)."""
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=n_layers,
                num_attention_heads=4, max_position_embeddings=4096) | text
    return LlavaConfig(text=TextConfig(**text),
                       vision=VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14),
                       image_token_id=63)


def random_model(config: LlavaConfig, dtype, seed: int = 0, device="cpu") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it runs: a 7B-shaped init is slow on a CPU
        model = LlavaForConditionalGeneration(config)  # PyTorch's default init: random but well scaled
    return model.to(dtype).eval().requires_grad_(False)


def set_image_block(model, n_img: int, seed: int = 1):
    """Make the model's image features a fixed random block of n_img rows (any length, unlike a ViT), and
    return the placeholder pixel_values to call it with."""
    generator = torch.Generator().manual_seed(seed)
    width, weight = model.config.text.hidden_size, model.language_model.lm_head.weight
    features = torch.randn(1, n_img, width, generator=generator).to(weight.device, weight.dtype)  # (1, N_img, C)
    model.image_features = lambda pixel_values, image_sizes=None: [features[0]]  # one image's (N_img, C)
    return torch.zeros(1, 3, 28, 28)  # placeholder pixel_values: the patched method ignores them


def prompt_ids(config: LlavaConfig, n_img: int, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    high = min(config.image_token_id, config.text.vocab_size)  # random words, never the image token
    sys_ids = torch.randint(3, high, (N_SYS - 1,), generator=generator)  # 3: past <unk>, <s>, </s>
    text_ids = torch.randint(3, high, (N_TEXT,), generator=generator)
    image_ids = torch.full((n_img,), config.image_token_id)
    return torch.cat([torch.tensor([config.text.bos_token_id]), sys_ids, image_ids, text_ids])[None]  # (1, T)


def transformers_llava(model):
    """transformers' LLaVA (sdpa attention) holding the decoder weights of `model`, or None, said in a note
    on stderr, when transformers is not installed or lays out the decoder otherwise than tinyavl maps it
    (the tables are timed by then: the comparison is left out, not the run). Its vision tower and
    projector stay unloaded: `transformers_greedy` feeds it tinyavl's merged embeddings."""
    try:
        import transformers
    except ImportError:
        print("  note: transformers is not installed: no comparison", file=sys.stderr)
        return None
    text, vision = model.config.text, model.config.vision
    hf_config = transformers.LlavaConfig(
        text_config=dict(model_type="llama", vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                         intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
                         num_attention_heads=text.num_attention_heads,
                         num_key_value_heads=text.num_key_value_heads, rope_theta=text.rope_theta,
                         rms_norm_eps=text.rms_norm_eps,
                         max_position_embeddings=text.max_position_embeddings),
        vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                           num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
                           image_size=vision.image_size, patch_size=vision.patch_size),
        image_token_index=model.config.image_token_id)
    weight = model.language_model.lm_head.weight
    with torch.device(weight.device):
        hf = transformers.LlavaForConditionalGeneration(hf_config).to(weight.dtype)
    # Published key names -> transformers' in-memory names (the decoder is all that runs here).
    state = {transformers_key(key): t for key, t in model.language_model.state_dict(prefix="language_model.").items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Only the vision tower and the projector may stay unloaded (the image block comes from tinyavl's embed).
    decoder_missing = [key for key in missing if key.startswith(("model.language_model.", "lm_head."))]
    if unexpected or decoder_missing:  # a transformers release that names or nests the decoder otherwise
        print(f"  note: transformers {transformers.__version__} lays out LLaVA's decoder otherwise than tinyavl "
              f"maps it (not found: {unexpected[:2]}, not loaded: {decoder_missing[:2]}): no comparison",
              file=sys.stderr)
        return None
    hf.config._attn_implementation = "sdpa"
    return hf.eval()


@torch.inference_mode()
def transformers_greedy(hf, embeds, new_tokens: int):
    """transformers' greedy decoding (DynamicCache) from the prompt's embeddings embeds (1, T, C), one token
    at a time, as `generate.generation` decodes: a generator that yields each token and returns (the tokens,
    the seconds of each decode step: its forward pass and its token choice; the prefill's is not timed)."""
    out = hf(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    tokens, step_seconds = [int(out.logits[0, -1].argmax())], []
    yield tokens[-1]
    for _ in range(new_tokens - 1):
        start = time.perf_counter()
        out = hf(input_ids=torch.tensor([[tokens[-1]]], device=embeds.device),
                 past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))  # int(): waits for a GPU's work
        step_seconds.append(time.perf_counter() - start)
        yield tokens[-1]
    return tokens, step_seconds


def transformers_decode_ratio(model, input_ids, pixel_values, new_tokens: int):
    """tinyavl's decode tokens/s with full attention over transformers' on the same weights and the same
    merged embeddings (None where `transformers_llava` is). The two decode their steps in turn
    (`take_turns`), so that both are timed over the same minutes of a shared machine."""
    hf = transformers_llava(model)
    if hf is None:
        return None
    with torch.inference_mode():
        embeds = model.embed(input_ids.to(hf.device), pixel_values)   # (1, T, C), image block merged

    def runs(n_tokens: int) -> dict:
        return take_turns({"tinyavl": generation(model, input_ids, pixel_values, max_new_tokens=n_tokens,
                                                 eos_token_id=(), policy="full"),
                           "transformers": transformers_greedy(hf, embeds, n_tokens)})

    if hf.device.type == "cuda":  # first calls compile and choose kernels: untimed, as in run_policies
        runs(8)
    ends = runs(new_tokens)
    (tokens, stats), (hf_tokens, hf_step_seconds) = ends["tinyavl"], ends["transformers"]
    if hf_tokens != tokens:
        # On stderr: with --json, stdout holds one JSON object and nothing else.
        print(f"  note: transformers' greedy tokens differ from tinyavl's full attention ({hf_tokens[:8]}...)",
              file=sys.stderr)
    return sum(hf_step_seconds) / stats.decode_seconds  # the same number of steps: a ratio of rates


# ---------------------------------------------------------------------------------------------------
# The two rates a decode step's floor is made of, measured in the same run as the policies.
# ---------------------------------------------------------------------------------------------------

def read_rate(device="cpu", nbytes: int = 2 ** 30, repeats: int = 5) -> float:
    """Bytes/s at which a sum reads a tensor far larger than any cache: what the memory allows. In fp32
    whatever the model's dtype: a bf16 sum on a CPU is bound by its reduction, not by the memory (tutorial
    chapter 8 has the numbers)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / best_seconds(lambda: x.sum(), repeats)


def measure_rates(model) -> dict:
    """The two rates of a decode step's floor, in bytes/s: {"read": `read_rate`, "matvec": `matvec_rate`}."""
    return {"read": read_rate(model.language_model.lm_head.weight.device), "matvec": matvec_rate(model)}


def matvec_rate(model, repeats: int = 3) -> float:
    """Bytes/s at which the decoder's own Linear layers (one token's matrix-vector products, through
    `nn.Linear` as the model calls them) read their weights: what PyTorch allows a decode step."""
    linears = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    weight = linears[0].weight
    x = {m.in_features: torch.randn(1, 1, m.in_features).to(weight.device, weight.dtype)  # one token each
         for m in linears}
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    with torch.inference_mode():
        return nbytes / best_seconds(lambda: [m(x[m.in_features]) for m in linears], repeats)


def decode_weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every decoder tensor but the embedding table, of which a
    step reads one row (unless it is also the output layer, tie_word_embeddings: then all of it)."""
    embedding, output = model.language_model.model.embed_tokens.weight, model.language_model.lm_head.weight
    return sum(t.numel() * t.element_size() for t in model.language_model.parameters()
               if t is not embedding or t is output)


def kv_row_bytes(text: TextConfig, dtype: torch.dtype) -> int:
    """Bytes of one cached token's K and V in one layer of a decoder (`model.config.text`) run in `dtype`."""
    return 2 * text.num_key_value_heads * text.head_dim * dtype.itemsize


# ---------------------------------------------------------------------------------------------------
# One policy's run: decode time per step, and the part of it spent in the cache's four stages.
# ---------------------------------------------------------------------------------------------------

class Timings:
    """Adds up the time of blocks of code by name. On a CPU a block's time is wall-clock time. On a GPU the
    work is queued, so the wall clock would time the queueing: a block is two CUDA events recorded around
    it, the time on the GPU's clock from the block's first queued work to its last (idle time between them
    included, as when the host launches or waits), read when `seconds` asks (no wait stalls the queue)."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda  # the timed work runs on a GPU (not: CUDA is merely initialised in this process)
        self.intervals = {}   # name -> [(start, end), ...]: perf_counter seconds, or CUDA events

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _seconds_between(start, end) -> float:
        return end - start if isinstance(end, float) else start.elapsed_time(end) / 1e3  # events count ms

    @contextmanager
    def timed(self, *names):
        """Time the block once under each of `names`."""
        start = self._now()
        yield
        end = self._now()
        for name in names:
            self.intervals.setdefault(name, []).append((start, end))

    def each(self, name: str) -> list[float]:
        """The seconds of every timed block of that name, in the order they ran."""
        synchronize()  # an event's time can be read once the GPU has passed it
        return [self._seconds_between(start, end) for start, end in self.intervals.get(name, [])]

    def seconds(self, name: str) -> float:
        return sum(self.each(name))


def timed_cache(name: str, cuda: bool = False):
    """A fresh cache for the policy that times its `attend` (append, select, compute, update) at decode
    steps: `cache.timings.seconds("attention")`. An A-VL cache also lists, in `cache.core_replaced`, the share
    of the core that each re-rank replaced (one entry per layer and update step): an update step's swaps
    move each row entering the core and the one it replaces, so the cost of A-VL's steps depends on it. It
    splits its time by kind of step, timed as "normal" and "update", with the steps of each kind in
    `cache.steps_by_kind`, and times the swaps (`swap_rows`, part of the update steps) as "swap". cuda: the
    model runs on a GPU."""
    cache = make_cache(name)
    attend, cache.timings = cache.attend, Timings(cuda)
    is_avl = isinstance(cache, AVLCache)
    if is_avl:
        rerank_core, swap_rows, cache.core_replaced = cache.rerank_core, cache.swap_rows, []
        cache.steps_by_kind = {"normal": 0, "update": 0}

        def counted_rerank_core(layer, image_probs):
            entered = rerank_core(layer, image_probs)
            cache.core_replaced.append(entered / cache.n_core if cache.n_core else 0.0)
            return entered

        def timed_swap_rows(layer, rows, other_rows):
            with cache.timings.timed("swap"):
                swap_rows(layer, rows, other_rows)

        cache.rerank_core, cache.swap_rows = counted_rerank_core, timed_swap_rows

    def timed_attend(layer, q, k, v, pos):
        if cache.step == 0:  # the prefill is not a decode step
            return attend(layer, q, k, v, pos)
        names = ["attention"]
        if is_avl:
            kind = "update" if cache.is_update_step() else "normal"
            names.append(kind)
            cache.steps_by_kind[kind] += layer == 0  # a step is one call per layer
        with cache.timings.timed(*names):
            return attend(layer, q, k, v, pos)

    cache.attend = timed_attend
    return cache


def avl_step_split(cache, full_attention_ms: float) -> dict:
    """A-VL's attention ms per normal step and per update step (and the swaps' part of an update step),
    the two also as multiples of `full`'s attention ms per step; empty unless the run had steps of both
    kinds (a run of 3 new tokens has no update step: its time is not 0)."""
    if not all(cache.steps_by_kind.values()):
        return {}

    def ms_per_step(part: str, kind: str) -> float:
        return 1e3 * cache.timings.seconds(part) / cache.steps_by_kind[kind]

    normal, update = ms_per_step("normal", "normal"), ms_per_step("update", "update")
    # A run of n decode steps holds floor(n / K) update steps, fewer than one in K (7 of 23 for 24 new
    # tokens): a long answer's mix is K - 1 normal steps to one update step.
    steady = ((cache.K - 1) * normal + update) / cache.K
    return {"attention_ms_normal_step": normal, "attention_ms_update_step": update,
            "swap_ms_update_step": ms_per_step("swap", "update"), "attention_ms_steady": steady,
            "normal_step_vs_full": normal / full_attention_ms, "update_step_vs_full": update / full_attention_ms,
            "steady_vs_full": steady / full_attention_ms}


def run_policies(model, names, input_ids, pixel_values, new_tokens: int) -> dict:
    """Each policy's generation on one prompt, {name: (tokens, stats, the timed cache)}, their decode steps
    taken in turn: the prefills one after another, then step 1 of every policy, step 2 of every policy, ...
    A shared machine's speed moves from minute to minute; run one after another, a policy would be timed
    in its own minutes, and the ratios between them would carry the machine's drift. Taken in turn, every
    policy's steps spread over the same minutes. Each `generation` yields after each token, outside its
    step's clock, and the next policy's step runs."""
    cuda = model.language_model.lm_head.weight.is_cuda
    if cuda:
        # On a GPU the first calls compile kernels (Triton's, cuBLAS's choices): a short untimed run of each
        # first, through an update step, so that no policy's step times include compilation. (The Triton
        # kernels take the lengths that grow with the answer, split counts included, as plain arguments, not
        # as compile-time ones: a longer cache compiles nothing new. kernels/sparse_attention.py)
        for name in names:
            generate(model, input_ids, pixel_values, max_new_tokens=8, eos_token_id=(), policy=name)
    caches = {name: timed_cache(name, cuda) for name in names}
    # eos_token_id=(): every policy decodes the same number of steps, whatever the tokens.
    ends = take_turns({name: generation(model, input_ids, pixel_values, max_new_tokens=new_tokens, eos_token_id=(),
                                        policy=cache) for name, cache in caches.items()})
    return {name: (*ends[name], caches[name]) for name in names}


def take_turns(generations: dict) -> dict:
    """Runs generators that yield after each token (`generate.generation`) in turn, one token of each still
    going, then the next of each, until all have returned: {name: what each returned}, in the given order."""
    going, ends = dict(generations), {}
    while going:
        for name, steps in list(going.items()):
            try:
                next(steps)
            except StopIteration as end:
                ends[name] = end.value
                del going[name]
    return {name: ends[name] for name in generations}


def attention_step_seconds(cache) -> list[float]:
    """Each decode step's time inside the timed cache's four stages, summed over the layers (a step is one
    `attend` per layer)."""
    calls = cache.timings.each("attention")
    return [sum(calls[i:i + cache.n_layers]) for i in range(0, len(calls), cache.n_layers)]


def steps_making(first: int, last: int) -> slice:
    """Where a per-decode-step list holds the steps that make generated tokens first .. last (from 2 on)."""
    # per_step[i] is decode step i + 1, which makes generated token i + 2 (the prefill makes the first).
    return slice(first - 2, last - 1)


def ms_at(per_step: list[float], token: int, window: int = 8) -> float:
    """The median (ms) of a per-decode-step time over the `window` steps that end at the given generated
    token (the steps that make tokens token - window + 1 .. token; fewer near the start)."""
    return 1e3 * statistics.median(per_step[steps_making(max(2, token - window + 1), token)])


def run_case(model, n_img: int, new_tokens: int, measure=measure_rates) -> dict:
    """Every policy on one prompt, their decode steps in turn (`run_policies`): per-policy measurements,
    `full` first, as --json prints them. The floors' rates (bytes/s) are measure(model)'s just before and
    just after the policies, each the faster of the two: a shared machine's speed moves while they run,
    and a floor is what a step cannot go below."""
    pixel_values = set_image_block(model, n_img)
    input_ids = prompt_ids(model.config, n_img)
    weight_bytes = decode_weight_bytes(model)
    row_bytes = kv_row_bytes(model.config.text, model.language_model.lm_head.weight.dtype)
    rates_before = measure(model)
    runs = run_policies(model, POLICIES, input_ids, pixel_values, new_tokens)  # all registered, at defaults
    rates = {name: max(rate, rates_before[name]) for name, rate in measure(model).items()}
    full_tokens, full_stats = runs["full"][:2]
    policies = {}
    for name, (tokens, stats, cache) in runs.items():  # `full` first: the others' ratios are to it
        kv_read = stats.attended_tokens_per_step * row_bytes            # summed over layers
        # The prefill makes the first token: new_tokens - 1 decode steps.
        attention_seconds = cache.timings.seconds("attention") / (stats.new_tokens - 1)
        policies[name] = {
            "decode_ms": 1e3 * stats.decode_seconds / (stats.new_tokens - 1),
            "floor_ms": 1e3 * (weight_bytes / rates["matvec"] + kv_read / rates["read"]),
            "hardware_floor_ms": 1e3 * (weight_bytes + kv_read) / rates["read"],
            "attention_ms": 1e3 * attention_seconds,
            "prefill_s": stats.prefill_seconds,
            "kv_bytes": stats.kv_cache_bytes_peak,
            "kv_ratio": stats.kv_cache_bytes_peak / full_stats.kv_cache_bytes_peak,
            "attended_ratio": stats.attended_tokens_per_step / full_stats.attended_tokens_per_step,
            "same_start_as_full": agreeing_start(tokens, full_tokens),
        }
        if isinstance(cache, AVLCache):
            if cache.core_replaced:  # a run with an update step
                policies[name]["core_replaced"] = statistics.mean(cache.core_replaced)
            policies[name].update(avl_step_split(cache, policies["full"]["attention_ms"]))
    return {"image_tokens": n_img, "prompt_tokens": input_ids.shape[1], "new_tokens": new_tokens,
            "weight_bytes": weight_bytes,  # read by every decode step: the floors' first term
            "rates_GBps": {name: rate / 1e9 for name, rate in rates.items()}, "policies": policies}


def agreeing_start(tokens: list[int], reference: list[int]) -> int:
    """How many first tokens equal the reference's: the answers agree up to where they part (after that, a
    token equal to the reference's at the same place is chance)."""
    parted = (i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)
    return next(parted, min(len(tokens), len(reference)))


def slope_ms_per_100_tokens(per_step: list[float], first: int, last: int) -> float:
    """How fast a per-decode-step time (seconds) grows from generated token `first` to `last`, in ms per
    100 tokens: the Theil-Sen slope, the median of the slopes between every two of those steps. A median,
    not a least-squares line: on a shared CPU a few steps take far longer than the rest, and a line fitted
    through them would follow those near either end."""
    times = torch.tensor(per_step[steps_making(first, last)], dtype=torch.float64)      # (n,)
    tokens = torch.arange(first, first + len(times), dtype=torch.float64)               # (n,)
    i, j = torch.triu_indices(len(times), len(times), offset=1)                          # every pair, i < j
    # quantile, not median(): of an even count of slopes, torch's median is the lower middle one.
    return 1e5 * ((times[j] - times[i]) / (tokens[j] - tokens[i])).quantile(0.5).item()


def growth(model, n_img: int) -> dict:
    """`full` and `avl` decoding GROWTH_TOKENS[-1] tokens: at each of GROWTH_TOKENS the ms per step, and
    the ms of it inside the cache's four stages, the part that reads the K/V rows (the weights a step
    reads do not grow; the whole step's time moves by more than the rows add, between runs and steps);
    and for both, how fast they grow between those tokens, fitted over every step between
    (`slope_ms_per_100_tokens`), which two medians of 8 steps each settle less well."""
    pixel_values, input_ids = set_image_block(model, n_img), prompt_ids(model.config, n_img)
    first, last = GROWTH_TOKENS[0], GROWTH_TOKENS[-1]
    out = {}
    for name, (_, stats, cache) in run_policies(model, ("full", "avl"), input_ids, pixel_values, last).items():
        out[name] = {}
        for kind, per_step in (("step", stats.decode_step_seconds), ("attention", attention_step_seconds(cache))):
            out[name].update({f"{kind}_ms_at_{token}": ms_at(per_step, token) for token in GROWTH_TOKENS})
            out[name][f"{kind}_ms_per_100_tokens"] = slope_ms_per_100_tokens(per_step, first, last)
    return out


def print_case(case: dict) -> None:
    rates = case["rates_GBps"]
    print(f"\nimage block {case['image_tokens']} tokens, prompt {case['prompt_tokens']} tokens, "
          f"{case['new_tokens']} new tokens; read rate {rates['read']:.1f} GB/s (fp32 sum), nn.Linear "
          f"matrix-vector rate {rates['matvec']:.1f} GB/s")
    # the README's column names, and the tokens each policy's answer shares with full's from the start
    header = (f"{'policy':10s} {'KV peak':>9s} {'KV vs full':>10s} {'rows attended vs full':>21s} "
              f"{'prefill s':>9s} {'decode ms / step':>16s} {'floor ms':>8s} {'/ floor':>7s} {'/ hw floor':>10s} "
              f"{'step vs full':>12s} {'attn ms':>7s}  tokens as full's")
    print(header + "\n" + "-" * len(header))
    full = case["policies"]["full"]
    for name, r in case["policies"].items():
        print(f"{name:10s} {r['kv_bytes'] / 2**20:7.1f}Mi {r['kv_ratio']:10.2f} {r['attended_ratio']:21.2f} "
              f"{r['prefill_s']:9.2f} {r['decode_ms']:16.1f} {r['floor_ms']:8.1f} "
              f"{r['decode_ms'] / r['floor_ms']:7.2f} {r['decode_ms'] / r['hardware_floor_ms']:10.2f} "
              f"{r['decode_ms'] / full['decode_ms']:12.2f} {r['attention_ms']:7.1f}  {r['same_start_as_full']}/{case['new_tokens']}")
    if "core_replaced" in case["policies"].get("avl", {}):
        print(f"avl: each core re-rank replaced {case['policies']['avl']['core_replaced']:.2f} of the core on average")
    if "attention_ms_normal_step" in case["policies"].get("avl", {}):
        a = case["policies"]["avl"]
        print(f"avl attn ms: {a['attention_ms_normal_step']:.1f} per normal step ({a['normal_step_vs_full']:.2f}x full's), "
              f"{a['attention_ms_update_step']:.1f} per update step ({a['update_step_vs_full']:.2f}x), "
              f"{a['swap_ms_update_step']:.1f} of it swapping core rows; one update step in K: "
              f"{a['attention_ms_steady']:.1f} ({a['steady_vs_full']:.2f}x)")


def print_growth(growth_result: dict) -> None:
    first, last = GROWTH_TOKENS[0], GROWTH_TOKENS[-1]
    n_img, full, avl = growth_result["image_tokens"], growth_result["full"], growth_result["avl"]
    for name, g in (("full", full), ("avl", avl)):
        print(f"{name:5s} at {n_img} image tokens: " + ", ".join(
            f"{g[f'step_ms_at_{t}']:.1f} ms/step ({g[f'attention_ms_at_{t}']:.2f} attn) at token {t}"
            for t in GROWTH_TOKENS))
    print(f"growth from token {first} to {last}: " + ", ".join(
        f"{name} {g[f'step_ms_at_{last}'] - g[f'step_ms_at_{first}']:+.1f} ms "
        f"({g[f'attention_ms_at_{last}'] - g[f'attention_ms_at_{first}']:+.2f} attn)"
        for name, g in (("full", full), ("avl", avl))))
    print("fitted over every step between (Theil-Sen), ms per 100 tokens: " + ", ".join(
        f"{name} {g['step_ms_per_100_tokens']:+.2f} ({g['attention_ms_per_100_tokens']:+.3f} attn)"
        for name, g in (("full", full), ("avl", avl))))
    if full["attention_ms_per_100_tokens"] > 0:  # a ratio to no growth (noise can make it so) says nothing
        print(f"avl's attention grows {avl['attention_ms_per_100_tokens'] / full['attention_ms_per_100_tokens']:.2f}x "
              "as fast as full's")


def next_image_tokens(image_hw: tuple[int, int]) -> int:
    return anyres.image_token_count(image_hw, LLAVA_V16_PINPOINTS, tile=336, patch=14)


def paper_memory(images=PAPER_MEMORY_IMAGES) -> list[dict]:
    """LLaVA-1.6-7B's KV cache in fp16 (32 layers, 32 KV heads x 128: 0.5 MiB per token), dense and under
    A-VL at the paper's memory-table setting, for the benchmark's prompt around each image's block and
    PAPER_MEMORY's new tokens; peak bytes, as `generate` measures them on a tiny decoder, scaled."""
    llava_next_7b = llava_7b_config(32).text  # LLaVA-1.6-7B's decoder is LLaVA-1.5-7B's
    tiny = tiny_config(llava_next_7b.num_hidden_layers)  # as deep: the prefill filter drops rows from layer 3
    model = random_model(tiny, torch.float32)
    mib_per_token = llava_next_7b.num_hidden_layers * kv_row_bytes(llava_next_7b, torch.float16) / 2 ** 20
    rows = []
    for image_hw in images:
        n_img = next_image_tokens(image_hw)
        pixel_values, input_ids = set_image_block(model, n_img), prompt_ids(tiny, n_img)
        _, stats = generate(model, input_ids, pixel_values, max_new_tokens=PAPER_MEMORY["new_tokens"],
                            eos_token_id=(), policy="avl", **PAPER_MEMORY["params"])
        dense_tokens = stats.cached_tokens  # every token the dense cache would hold at the end
        ratio = stats.kv_cache_bytes_peak / stats.kv_cache_bytes_dense
        rows.append({"image_hw": list(image_hw), "image_tokens": n_img, "prompt_tokens": input_ids.shape[1],
                     "dense_MiB": dense_tokens * mib_per_token, "avl_MiB": dense_tokens * mib_per_token * ratio,
                     "avl_ratio": ratio})
    return rows


def print_paper_memory(rows: list[dict]) -> None:
    paper = PAPER_MEMORY
    print(f"\nLLaVA-1.6-7B KV cache, fp16 (0.5 MiB per token): prompt {N_SYS} sys + image block + {N_TEXT} text, "
          f"{paper['new_tokens']} new tokens; A-VL at the paper's memory setting {paper['params']} (others default)."
          f"\nThe paper: {paper['dense_MB']} MB -> {paper['avl_MB']} MB ({paper['avl_MB'] / paper['dense_MB']:.0%}; "
          "its MB, which it does not say are 10^6 or 2^20 bytes).")
    print(f"{'image (h x w)':>14s} {'tokens':>7s} {'prompt':>7s} {'dense MiB':>10s} {'A-VL MiB':>9s} {'ratio':>6s}")
    for r in rows:
        h, w = r["image_hw"]
        print(f"{f'{h} x {w}':>14s} {r['image_tokens']:7d} {r['prompt_tokens']:7d} {r['dense_MiB']:10.0f} "
              f"{r['avl_MiB']:9.0f} {r['avl_ratio']:6.2f}")


def run_dtype(args, dtype_name: str) -> dict:
    dtype = getattr(torch, dtype_name)
    model = random_model(llava_7b_config(args.layers), dtype, device=args.device)
    logits_form = "k q^T" if keys_first(args.device.type, dtype) else "q k^T"
    log = print if not args.json else lambda *a, **k: None
    log(f"\n== {dtype_name}: {decode_weight_bytes(model) / 1e9:.2f} GB of weights per decode step; "
        f"a decode query's logits as {logits_form} (rows_logits)")
    result = {"dtype": dtype_name, "decode_logits": logits_form, "cases": []}
    for n_img in args.image_tokens:
        case = {"dtype": dtype_name, **run_case(model, n_img, args.new_tokens)}
        result["cases"].append(case)
        if not args.json:
            print_case(case)
    first_n_img = args.image_tokens[0]  # growth and the transformers comparison run on the first block
    result["growth"] = {"image_tokens": first_n_img, **growth(model, first_n_img)}
    if not args.json:
        print_growth(result["growth"])
    if not args.no_transformers:
        # set_image_block again: this comparison does not rely on which block the runs before it left set.
        ratio = transformers_decode_ratio(model, prompt_ids(model.config, first_n_img),
                                          set_image_block(model, first_n_img), args.new_tokens)
        if ratio is not None:
            result["transformers_decode_ratio"] = ratio
            log(f"tinyavl full decode over transformers (sdpa), their steps taken in turn: {ratio:.2f}x the tokens/s")
    return result


def main(argv=None):
    parser = ArgumentParser(description="Every KV policy side by side at LLaVA-7B layer shapes.")
    parser.add_argument("--arch", choices=["llava", "next"], default="llava",
                        help="llava: LLaVA-1.5-7B; next: LLaVA-1.6-7B, its blocks of a 672x672 and a 336x1008 image "
                             "and the paper's memory arithmetic")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (real 7B shapes each)")
    parser.add_argument("--image-tokens", type=int, nargs="+",
                        help="image block lengths (default: 576 and 2928; --arch next: the two images' blocks)")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens each policy generates")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"],
                        help="the dtypes to run, each a table per image block")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if present")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    check_stdout_open("results")
    try:
        args.device = resolve_device(args.device)
    except UserError as err:
        parser.error(str(err))
    if args.image_tokens is None:
        args.image_tokens = [576, 2928] if args.arch == "llava" else [next_image_tokens(hw) for hw in NEXT_IMAGES]
    if len(set(args.dtypes)) < len(args.dtypes):  # the results are kept by dtype: a repeat would replace its first run
        parser.error(f"--dtypes names a dtype twice: {' '.join(args.dtypes)}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2 (a decode step to time), got {args.new_tokens}")
    if args.layers < 1:
        parser.error(f"--layers must be at least 1, got {args.layers}")
    # Every policy must have something to choose from (A-VL's core is floor(0.3 N_img) rows), and every
    # run must fit the 4096-token context: each block's policies with --new-tokens, and on the first block
    # the growth run's 256 tokens too (it and the transformers comparison run there alone).
    context = llava_7b_config(1).text.max_position_embeddings
    room = context - N_SYS - N_TEXT                     # positions for an image block and the new tokens
    if room - args.new_tokens < 4:  # no image block fits beside these tokens
        parser.error(f"--new-tokens must be at most {room - 4}: the prompt and the new tokens share a context of "
                     f"{context}, got {args.new_tokens}")
    for position, n_img in enumerate(args.image_tokens):
        growth_run = position == 0 and GROWTH_TOKENS[-1] > args.new_tokens
        longest = room - (GROWTH_TOKENS[-1] if growth_run else args.new_tokens)
        if not 4 <= n_img <= longest:
            beside = (f"the growth run's {GROWTH_TOKENS[-1]} new tokens, run on the first block," if growth_run
                      else f"--new-tokens {args.new_tokens}")
            parser.error(f"--image-tokens must be in [4, {longest}] (the prompt and {beside} share a context of "
                         f"{context}), got {n_img}")

    device_name = (torch.cuda.get_device_name() if args.device.type == "cuda"
                   else platform.processor() or platform.machine())
    model_name = "LLaVA-1.5-7B" if args.arch == "llava" else "LLaVA-1.6-7B (Vicuna)"
    machine = (f"{args.layers} decoder layers of {model_name} shape, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, {device_name}")
    if not args.json:
        print(f"tinyavl bench: {machine}\npolicies at their defaults: " + ", ".join(POLICIES))
    memory = paper_memory() if args.arch == "next" else None
    if memory is not None and not args.json:
        print_paper_memory(memory)
    results = [run_dtype(args, dtype) for dtype in args.dtypes]
    if args.json:
        # Every dtype's cases in one list; transformers_decode_ratio is the first dtype's (fp32 by default),
        # transformers_decode_ratios every dtype's.
        print(json.dumps({"machine": machine, "arch": args.arch,
                          "decode_logits": {r["dtype"]: r["decode_logits"] for r in results},
                          "cases": [case for r in results for case in r["cases"]],
                          "growth": {r["dtype"]: r["growth"] for r in results},
                          "transformers_decode_ratio": results[0].get("transformers_decode_ratio"),
                          "transformers_decode_ratios": {r["dtype"]: r.get("transformers_decode_ratio")
                                                         for r in results},
                          **({"paper_memory": memory} if memory is not None else {})}, indent=1))


if __name__ == "__main__":
    run_main(main)
