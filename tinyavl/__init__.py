"""tinyavl: LLaVA-1.5 / 1.6 and A-VL adaptive attention, from scratch in plain PyTorch.

    model, processor = tinyavl.load_pretrained("weights/llava-1.5-7b-hf")
    inputs = processor(processor.chat_prompt("What is in the picture?"), image="cat.jpg")
    token_ids, stats = tinyavl.generate(model, **inputs, max_new_tokens=32, policy="avl")
    print(processor.decode(token_ids))
"""
from pathlib import Path

from tinyavl.startup import signals_end_the_imports

with signals_end_the_imports():  # in a command, Ctrl-C, SIGTERM or SIGHUP while torch imports: one line (startup.py)
    from tinyavl.cache import POLICIES, make_cache
    from tinyavl.errors import UserError
    from tinyavl.generate import GenerationStats, generate
    from tinyavl.loading import load_model, read_config
    from tinyavl.model import LlavaConfig, LlavaForConditionalGeneration
    from tinyavl.processing import Processor


def load_pretrained(path, device=None, dtype=None):
    """(model, processor) from a llava-hf folder (LLaVA-1.5 or 1.6): config.json, safetensors, tokenizer.json.

    device: "cpu", "cuda" or None (CUDA when present). dtype: a torch dtype or "float32"/"bfloat16"/
    "float16"; None keeps the stored dtype, the one most of the weights are stored in (fp16 checkpoints run as
    bf16 on a CPU).
    """
    config, processor = load_processor(path)
    return load_model(path, device, dtype, config), processor


def load_processor(path):
    """(config, processor) from a llava-hf folder's small files, config.json and the tokenizer's and
    preprocessor's, checked: what a command needs to check a prompt and an image before it streams the
    weights (`load_model`), which take seconds to minutes, and a broken tokenizer.json is said at once."""
    config = read_config(path)
    processor = Processor.from_pretrained(Path(path), image_token_id=config.image_token_id,
                                          num_image_tokens=config.num_image_tokens,
                                          vision_image_size=config.vision.image_size,
                                          image_grid_pinpoints=config.image_grid_pinpoints,
                                          patch_size=config.vision.patch_size,
                                          hires_scale=None if config.hires is None else config.hires.scale)
    check_token_ids(processor.tokenizer, config.text.vocab_size)
    return config, processor


def check_token_ids(tokenizer, vocab_size: int) -> None:
    """UserError for a token the tokenizer can produce whose id has no row in the embedding table (the
    forward would crash on it): any token of its vocabulary, or one its post-processor adds (BOS)."""
    ids = {f"gives {token!r} the id {i}": i for token, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    ids.update({f"adds the id {i} (its post-processor)": i for i in tokenizer.encode("", add_special_tokens=True).ids})
    what, largest = max(ids.items(), key=lambda item: item[1])
    if largest >= vocab_size:
        raise UserError(f"tokenizer.json {what}, but config.json's vocab_size is {vocab_size} (ids 0 .. "
                        f"{vocab_size - 1}): the two files come from different checkpoints")


__all__ = ["load_pretrained", "load_processor", "load_model", "generate", "GenerationStats", "Processor",
           "LlavaConfig", "LlavaForConditionalGeneration", "make_cache", "POLICIES", "UserError"]
