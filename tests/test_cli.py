"""main.py, the command line: answers on tiny checkpoints, and one clean line for every user mistake.

The contract (main.py's docstring): the answer streams to stdout and a summary goes to stderr, or with
--json one JSON object is printed; a mistake in the input exits with status 2 and prints one line
`error: ...` on stderr, no traceback, and nothing on stdout.

A real subprocess costs seconds of torch import, so only a few cases run `python main.py` (exit status,
tracebacks, what really reaches the terminal); the rest call `main.main(argv)` in-process, where any
exception other than the handled UserError would fail the test with its traceback.
"""
import argparse
import contextlib
import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import main
import tinyavl
from tinyavl import startup
from tinyavl.cli import ArgumentParser, output_file, run_command, run_main
from tinyavl.errors import UserError
from tinyavl.processing import load_image
from tiny_checkpoints import VARIANTS, make_image, sparse_config, tokenizer_info, write_checkpoint

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "weights" / "toy" / "examples" / "scene-0.png"  # the toy's first example
NEW_TOKENS = 8
JSON_KEYS = {"text", "token_ids", "prefill_seconds", "decode_tokens_per_second", "kv_cache_bytes_peak", "policy",
             "kv_cache_bytes_dense", "attended_tokens_per_step", "attended_tokens_per_step_dense"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files: a good PNG, and broken ones."""
    d = tmp_path_factory.mktemp("cli_images")
    paths = {"png": d / "photo.png", "jpg": d / "photo.jpg"}
    make_image(45, 30, seed=0).save(paths["png"])
    make_image(160, 120, seed=1).save(paths["jpg"], quality=95)
    paths["text_as_jpg"] = d / "notes.jpg"
    paths["text_as_jpg"].write_text("this is not an image\n" * 20)
    big_png = d / "big.png"
    make_image(160, 120, seed=2).save(big_png)
    for kind, src in (("truncated_png", big_png), ("truncated_jpg", paths["jpg"])):
        data = src.read_bytes()
        paths[kind] = d / f"truncated{src.suffix}"
        paths[kind].write_bytes(data[:len(data) // 2])
    return paths


@pytest.fixture(scope="module")
def good(tiny_ckpt):
    return tiny_ckpt.folder("mha")


def run_inprocess(capsys, argv):
    """main.main(argv) -> (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_subprocess(argv):
    proc = subprocess.run([sys.executable, "main.py", *map(str, argv)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})
    return proc.returncode, proc.stdout, proc.stderr


def assert_user_error(rc, out, err, *mentions):
    """Status 2, nothing on stdout, exactly one line `error: ...` on stderr that names what is wrong."""
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    assert out == "", f"stdout written before failing: {out!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    for word in mentions:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def hf_greedy(hf_model, folder, image, prompt, steps):
    """transformers' greedy tokens for the CLI's inputs, built by tinyavl's processor (EOS = </s>, as the CLI)."""
    _, processor = tinyavl.load_pretrained(folder, device="cpu")
    inputs = processor(processor.chat_prompt(prompt), image=str(image))
    tok = tokenizer_info()
    with torch.no_grad():
        # A mask of ones (as tinyavl attends every prompt token), not one generate infers from pad_token_id.
        out = hf_model.generate(input_ids=inputs["input_ids"], attention_mask=torch.ones_like(inputs["input_ids"]),
                                pixel_values=inputs["pixel_values"], do_sample=False,
                                max_new_tokens=steps, min_new_tokens=0, eos_token_id=tok["eos_token_id"],
                                pad_token_id=tok["pad_token_id"], output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return tokens, gaps


def decode(folder, ids):
    """Text of ids by the checkpoint's own tokenizer.json, special tokens left out."""
    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json")).decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------ happy paths
def test_subprocess_json_matches_transformers_greedy(tiny_ckpt, good, files):
    rc, out, err = run_subprocess(["--image", files["png"], "--weights", good, "--max-new-tokens", NEW_TOKENS,
                                   "--prompt", "What colour is the square?", "--json"])
    assert rc == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert len(lines) == 1, f"--json must print exactly one JSON object, got {out!r}"
    result = json.loads(lines[0])
    assert isinstance(result, dict)
    assert JSON_KEYS <= set(result), JSON_KEYS - set(result)
    assert result["policy"] == "full"
    ids = result["token_ids"]
    assert 1 <= len(ids) <= NEW_TOKENS
    assert result["text"] == decode(good, ids)
    assert result["prefill_seconds"] > 0
    assert result["kv_cache_bytes_peak"] == result["kv_cache_bytes_dense"] > 0
    if len(ids) >= 2:
        assert result["decode_tokens_per_second"] > 0
        assert result["attended_tokens_per_step"] == result["attended_tokens_per_step_dense"] > 0

    ref, gaps = hf_greedy(tiny_ckpt.model("mha"), good, files["png"], "What colour is the square?", NEW_TOKENS)
    assert min(gaps) > 1e-3, gaps  # greedy choices clear-cut, so the comparison means something
    assert ids == ref


def test_the_answer_ends_where_config_json_says(capsys, good, files, tmp_path):
    """main.py stops at the ids config.json's eos_token_id lists (as transformers and `generate` read it), not
    only at the tokenizer's </s>: with the answer's second token listed too, the answer is two tokens."""
    argv = ["--image", files["png"], "--max-new-tokens", NEW_TOKENS, "--json", "--weights"]
    rc, out, err = run_inprocess(capsys, argv + [good])
    assert rc == 0, err
    ids = json.loads(out)["token_ids"]
    assert len(ids) >= 2 and ids[1] not in ids[:1] + [tokenizer_info()["eos_token_id"]]
    folder = shutil.copytree(good, tmp_path / "second_id_ends")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["eos_token_id"] = [tokenizer_info()["eos_token_id"], ids[1]]
    (folder / "config.json").write_text(json.dumps(config))
    rc, out, err = run_inprocess(capsys, argv + [folder])
    assert rc == 0, err
    result = json.loads(out)
    assert result["token_ids"] == ids[:2] and result["finish_reason"] == "eos"


def test_subprocess_streams_text_and_summary(capsys, good, files):
    rc, out, err = run_subprocess(["--image", files["jpg"], "--weights", good, "--max-new-tokens", NEW_TOKENS])
    assert rc == 0, err
    assert "Traceback" not in err
    # The same run in-process with --json gives the ids (greedy: both runs produce the same tokens).
    rc, out_json, _ = run_inprocess(capsys, ["--image", files["jpg"], "--weights", good, "--max-new-tokens",
                                             NEW_TOKENS, "--json"])
    assert rc == 0
    assert out == decode(good, json.loads(out_json)["token_ids"]) + "\n"
    assert "policy full" in err and "KV cache" in err and "prefill" in err


def test_streamed_text_equals_json_text(capsys, good, files):
    """64 tokens of the random model hold byte tokens that are no UTF-8 together (see the scripted test below)."""
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 64])
    assert rc == 0
    rc, out_json, _ = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 64,
                                             "--json"])
    assert rc == 0
    result = json.loads(out_json)
    assert out == result["text"] + "\n"
    assert result["text"] == decode(good, result["token_ids"])


def test_streaming_handles_characters_split_across_tokens(capsys, monkeypatch, good, files):
    """Byte-fallback tokens: "é" and an emoji arrive one byte per token, and the answer ends mid-character.
    What is streamed must add up to exactly the decoded answer (no U+FFFD left behind, nothing lost).
    Scripted here, so that the cases do not hang on what a random model happens to sample."""
    tok = Tokenizer.from_file(str(Path(good) / "tokenizer.json"))

    def byte_ids(text):
        return [tok.token_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]

    words = tok.encode("The image", add_special_tokens=False).ids
    scripted = words + byte_ids("é") + words + byte_ids("\U0001F642") + words + byte_ids("€")[:2]
    assert None not in scripted
    real_generate = tinyavl.generate

    def scripted_generate(model, input_ids, pixel_values=None, stream=None, **kwargs):
        _, stats = real_generate(model, input_ids, pixel_values, **kwargs)  # real stats for the summary
        for t in scripted:
            if stream:
                stream(t)
        return list(scripted), stats

    monkeypatch.setattr(tinyavl, "generate", scripted_generate)
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 2])
    assert rc == 0, err
    expected = decode(good, scripted)
    assert "é" in expected and "\U0001F642" in expected and expected.endswith("\ufffd")
    assert out == expected + "\n"
    # Bytes that are no UTF-8 together become U+FFFD each, those already streamed too: a newline as its byte
    # token (Llama's) before a stray byte, and an ASCII byte then a <pad> (which decoding skips) then a
    # stray byte. Nothing is printed that the whole answer's text does not start with.
    pad, stray = tok.token_to_id("<pad>"), {b: tok.token_to_id(f"<0x{b:02X}>") for b in (0xE2, 0x8F)}
    for ids in (words + byte_ids("\n") + [stray[0xE2]] + words, words + byte_ids("v") + [pad, stray[0x8F]] + words):
        scripted[:] = ids
        rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 2])
        expected = decode(good, scripted)
        assert rc == 0 and "\ufffd\ufffd" in expected and out == expected + "\n", (out, expected)


def test_streaming_with_a_byte_level_tokenizer_prints_each_character_whole(capsys):
    """A byte-level BPE (Llama 3's kind, GPT-2's) has no <0x..> tokens: "é" is two tokens, the first of which
    alone decodes to U+FFFD. The streamed answer is the decoded one."""
    from tokenizers import decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))  # one token a byte
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    processor = types.SimpleNamespace(tokenizer=tok, decode=lambda ids: tok.decode(ids, skip_special_tokens=True))
    ids = tok.encode("café ok \U0001F642!").ids
    assert len(ids) == len("café ok \U0001F642!".encode("utf-8"))
    printer = main.AnswerPrinter(processor)
    for token_id in ids:
        printer.stream(token_id)
    printer.finish(processor.decode(ids))
    assert capsys.readouterr().out == "café ok \U0001F642!\n"


def test_each_streamed_piece_is_flushed_as_it_is_printed(monkeypatch):
    """A pipe's stdout is block-buffered: without a flush after each piece the streamed answer would come all
    at once, at the end."""
    events = []
    stdout = types.SimpleNamespace(write=lambda text: events.append(("write", text)),
                                   flush=lambda: events.append(("flush",)))
    monkeypatch.setattr(sys, "stdout", stdout)
    processor = types.SimpleNamespace(tokenizer=types.SimpleNamespace(id_to_token=lambda i: f"w{i}"),
                                      decode=lambda ids: "".join(f"w{i} " for i in ids))
    printer = main.AnswerPrinter(processor)
    printer.stream(1)
    printer.stream(2)
    written = [event for event in events if event != ("write", "")]     # print writes its end="" too
    assert written == [("write", "w1 "), ("flush",), ("write", "w2 "), ("flush",)]


POLICY_RUNS = [
    ["--policy", "avl", "--S", "0.5", "--C", "0.3"],
    ["--policy", "avl", "--S", "0.25", "--C", "0.125", "--K", "2", "--P", "1"],
    ["--policy", "h2o"],
    ["--policy", "h2o", "--heavy", "0.2", "--recent", "0.3"],
    ["--policy", "streaming"],
    ["--policy", "streaming", "--sinks", "2", "--recent", "0.25"],
    ["--policy", "fastv"],
    ["--policy", "fastv", "--filter-layer", "1", "--R", "0.5"],
]


@pytest.mark.parametrize("policy_args, noted", [
    (["--policy", "fastv"], True),                                    # its filter_layer 2: the model has 2 layers
    (["--policy", "avl"], True),                                      # 3
    (["--policy", "fastv", "--filter-layer", "1"], False),            # given, and acting
    (["--policy", "fastv", "--R", "0"], False),                       # a filter that drops nothing anyway
    (["--policy", "avl", "--P", "1"], False),
])
def test_a_default_filter_layer_past_the_model_is_noted(capsys, good, files, policy_args, noted):
    """The 2-layer test model: a policy's own filter_layer past its layers would run without the filter,
    silently; the run goes on (the user asked for nothing out of range), with a note on stderr."""
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 2,
                                          *policy_args])
    assert rc == 0 and ("its prefill filter drops nothing here (--filter-layer 1 makes it act)" in err) == noted


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_note_waits_for_every_check(capsys, good, files):
    """The note above comes once the model has loaded: a mistake found as it loads (CUDA asked for, none
    here) is the error's one line, with no note before it."""
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--policy", "fastv",
                                          "--device", "cuda"])
    assert_user_error(rc, out, err, "CUDA")


@pytest.fixture(scope="module")
def api_tokens(good, files):
    """The tokens the Python API generates for main.py's default prompt on files["png"]: what a main.py run
    with the same settings must print."""
    model, processor = tinyavl.load_pretrained(good)
    inputs = processor(processor.chat_prompt(main.build_parser().get_default("prompt")), image=load_image(files["png"]))

    def tokens(**settings):
        return tinyavl.generate(model, **inputs, max_new_tokens=NEW_TOKENS, **settings)[0]
    return tokens


def test_the_sampling_settings_reach_the_generation(capsys, good, files, api_tokens):
    """--temperature, --top-k, --top-p and --seed each change the draw (the controls below), and main.py draws
    what the API draws with all four."""
    settings = dict(temperature=2.0, top_k=20, top_p=0.5, seed=3)
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", NEW_TOKENS,
                                          "--json", "--temperature", 2, "--top-k", 20, "--top-p", 0.5, "--seed", 3])
    assert rc == 0, err
    tokens = json.loads(out)["token_ids"]
    assert tokens == api_tokens(**settings)
    for other in (dict(temperature=0.0), dict(top_k=2), dict(top_p=1.0), dict(seed=4)):  # any one of them lost shows
        assert api_tokens(**{**settings, **other}) != tokens


def test_sampling_settings_at_their_defaults_pass_a_greedy_run(files):
    """Only a sampling setting that would be ignored is refused: at --temperature 0, --top-k and --top-p given
    at their defaults change nothing, and with a temperature above 0 every setting is used."""
    for extra in (["--top-k", "50", "--top-p", "1.0"], ["--temperature", "0.5", "--top-k", "5", "--seed", "1"]):
        args = main.build_parser().parse_args(["--image", str(files["png"]), *extra])
        main.check_args(args)  # no UserError


def test_unseeded_sampling_is_a_fresh_draw_each_run(good, files):
    """No --seed: two runs of the command draw differently (at temperature 5 the tiny model's next-token
    distribution is nearly flat: the same 8 tokens twice by chance are out of the question)."""
    argv = ["--image", files["png"], "--weights", good, "--max-new-tokens", NEW_TOKENS, "--json", "--temperature", 5]
    runs = [run_subprocess(argv) for _ in range(2)]
    assert all(rc == 0 for rc, _, _ in runs), runs
    assert json.loads(runs[0][1])["token_ids"] != json.loads(runs[1][1])["token_ids"]


def test_dtype_reaches_the_model(capsys, good, files):
    """--dtype bfloat16: the cache holds 2-byte rows (the tiny checkpoint is fp32)."""
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", NEW_TOKENS,
                                          "--json", "--dtype", "bfloat16"])
    assert rc == 0, err
    result = json.loads(out)
    v = VARIANTS["mha"]
    per_token = v.text_layers * 2 * v.kv_heads * (64 // 4) * 2     # layers x (K, V) x heads x head size x 2 bytes
    assert result["kv_cache_bytes_dense"] == (result["prompt_tokens"] + result["new_tokens"] - 1) * per_token


@pytest.mark.parametrize("policy_args", POLICY_RUNS, ids=[" ".join(a[1:]) for a in POLICY_RUNS])
def test_policies_run(capsys, good, files, api_tokens, policy_args):
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens",
                                          NEW_TOKENS, "--json", *policy_args])
    assert rc == 0, err
    result = json.loads(out)
    assert result["policy"] == policy_args[1]
    given = {policy_args[i].lstrip("-").replace("-", "_"): int(value) if value.isdigit() else float(value)
             for i, value in ((i, policy_args[i + 1]) for i in range(2, len(policy_args), 2))}
    for name, value in given.items():
        assert result["policy_params"][name] == value
    assert len(result["token_ids"]) == NEW_TOKENS  # EOS aside, which the tiny model does not reach here
    assert result["token_ids"] == api_tokens(temperature=0.0, policy=policy_args[1], **given)
    assert result["text"] == decode(good, result["token_ids"])
    assert 0 < result["kv_cache_bytes_peak"] <= result["kv_cache_bytes_dense"]


def test_avl_holds_less_than_dense_with_an_image(capsys, good, files):
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens",
                                          NEW_TOKENS, "--json", "--policy", "avl", "--S", "0.5", "--C", "0.3"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["kv_cache_bytes_peak"] < result["kv_cache_bytes_dense"]
    assert result["attended_tokens_per_step"] < result["attended_tokens_per_step_dense"]
    # The image is where A-VL saves: half the image rows of every layer are gone.
    n_img = VARIANTS["mha"].num_image_tokens
    v = VARIANTS["mha"]
    per_row = v.text_layers * 2 * v.kv_heads * (64 // 4) * 4
    assert result["kv_cache_bytes_peak_by_modality"]["image"] == (n_img // 2) * per_row
    # The split is the peak's, taken at the same moment: it adds up to the peak (the text grew after the prefill).
    assert sum(result["kv_cache_bytes_peak_by_modality"].values()) == result["kv_cache_bytes_peak"]


def test_summary_on_stderr(capsys, good, files):
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 3,
                                          "--policy", "avl"])
    assert rc == 0
    assert out.endswith("\n") and "policy avl" in err and "KV cache peak" in err and "decode" in err
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 1])
    assert rc == 0  # no decode step: the summary must not break on a missing rate
    assert "KV cache peak" in err


def test_the_summary_says_what_the_run_measured():
    """summary's lines from a result made by hand: each number where it belongs."""
    result = {"new_tokens": 7, "finish_reason": "length", "policy": "avl", "policy_params": {"S": 0.5},
              "prompt_tokens": 40, "prefill_seconds": 1.25, "decode_tokens_per_second": 12.5,
              "attended_tokens_per_step": 30, "attended_tokens_per_step_dense": 80,
              "kv_cache_bytes_peak": 2 ** 20, "kv_cache_bytes_dense": 4 * 2 ** 20}
    assert main.summary(result).splitlines() == [
        "7 tokens: stopped at --max-new-tokens: the answer may be cut", "policy avl {'S': 0.5}",
        "prompt 40 tokens, prefill 1.25 s", "decode 12.5 tokens/s, attended 30 of 80 token-layers per step",
        "KV cache peak 1.00 MiB (25% of dense 4.00 MiB)"]
    # An answer the context cut, of `full` (no parameters), with no decode step (one token): no rate line.
    result.update(finish_reason="context", policy="full", policy_params=None, new_tokens=1,
                  decode_tokens_per_second=None)
    assert main.summary(result).splitlines() == [
        "1 token: stopped at the end of the model's context: the answer may be cut", "policy full",
        "prompt 40 tokens, prefill 1.25 s", "KV cache peak 1.00 MiB (25% of dense 4.00 MiB)"]


def test_the_toy_by_default_is_said_and_only_then(capsys, good, files):
    rc, _, err = run_inprocess(capsys, ["--image", IMAGE, "--max-new-tokens", 1, "--json"])
    assert rc == 0 and "no --weights given: running the toy LLaVA in" in err
    rc, _, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 1, "--json"])
    assert rc == 0 and "no --weights given" not in err


# ------------------------------------------------------------------------------------------ image modes
def write_mode_image(path: Path, mode: str) -> Path:
    if mode == "I;16":
        w, h = 40, 30
        values = [(x * 1600 + y * 100) % 65536 for y in range(h) for x in range(w)]
        img = Image.frombytes("I;16", (w, h), b"".join(v.to_bytes(2, "little") for v in values))
        img.save(path.with_suffix(".png"))
        return path.with_suffix(".png")
    img = make_image(40, 30, seed=3)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize(img.size))
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = img.convert(mode)
    suffix = ".jpg" if mode == "CMYK" else ".png"
    img.save(path.with_suffix(suffix))
    return path.with_suffix(suffix)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_image_modes_are_converted_not_rejected(capsys, good, tmp_path, mode):
    path = write_mode_image(tmp_path / "img", mode)
    with Image.open(path) as img:  # the file really is in that mode (16-bit grey may open as "I")
        assert img.mode == mode or (mode == "I;16" and img.mode in ("I", "I;16", "I;16B"))
    rc, out, err = run_inprocess(capsys, ["--image", path, "--weights", good, "--max-new-tokens", 2, "--json"])
    assert rc == 0, err
    assert len(json.loads(out)["token_ids"]) >= 1


# ------------------------------------------------------------------------------------------ user errors
@pytest.fixture(scope="module")
def broken(tiny_ckpt, tmp_path_factory):
    """Broken copies of the good mha checkpoint, by name."""
    root = tmp_path_factory.mktemp("broken")
    good = Path(tiny_ckpt.folder("mha"))
    out = {}

    def copy(name, src=good):
        dst = root / name
        shutil.copytree(src, dst)
        out[name] = dst
        return dst

    out["missing_folder"] = root / "does-not-exist"
    d = copy("no_config")
    (d / "config.json").unlink()
    d = copy("config_not_json")
    (d / "config.json").write_text('{"model_type": "llava", "text_config": {')

    d = copy("missing_shard", Path(tiny_ckpt.folder("mha", shards=2)))
    (d / "model-00002-of-00002.safetensors").unlink()

    d = copy("misshaped")
    tensors = load_file(d / "model.safetensors")
    key = "multi_modal_projector.linear_1.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})

    d = copy("missing_key")
    tensors = load_file(d / "model.safetensors")
    del tensors["language_model.model.norm.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})

    d = copy("truncated_safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 2])

    d = copy("no_tokenizer")
    (d / "tokenizer.json").unlink()

    for name, weight_map in (("index_map_not_object", ["a"]), ("index_map_empty", {}),
                             ("index_map_not_names", {"lm_head.weight": 5})):
        d = copy(name, Path(tiny_ckpt.folder("mha", shards=2)))
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    d = copy("index_not_utf8", Path(tiny_ckpt.folder("mha", shards=2)))
    index = d / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes().replace(b'"weight_map"', b'"weight\xffmap"'))
    d = copy("index_a_list", Path(tiny_ckpt.folder("mha", shards=2)))
    (d / "model.safetensors.index.json").write_text("[]")

    d = copy("rope_not_object")
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["rope_scaling"] = "linear"
    (d / "config.json").write_text(json.dumps(config))

    d = copy("bin_only")
    tensors = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(tensors, d / "pytorch_model.bin")

    config = sparse_config(VARIANTS["mha"])
    config["text_config"]["max_position_embeddings"] = 64
    out["short_context"] = Path(write_checkpoint(tiny_ckpt.model("mha"), str(root / "short_context"), variant="mha",
                                                 config=config))
    return out


LONG_PROMPT = "What colour is the circle on the left? " * 12

# (id, argv after --image/--weights, which image, which weights, words the message must name)
ERROR_CASES = [
    ("missing image", [], "missing_image", "good", ["nope.png"]),
    ("text file named .jpg", [], "text_as_jpg", "good", ["notes.jpg"]),
    ("truncated png", [], "truncated_png", "good", ["truncated.png"]),
    ("truncated jpeg", [], "truncated_jpg", "good", ["truncated.jpg"]),
    ("missing weights folder", [], "png", "missing_folder", ["does-not-exist"]),
    ("no config.json", [], "png", "no_config", ["config.json"]),
    ("config.json not json", [], "png", "config_not_json", ["config.json"]),
    ("missing shard", [], "png", "missing_shard", ["model-00002-of-00002.safetensors"]),
    ("misshaped tensor", [], "png", "misshaped", ["multi_modal_projector.linear_1.weight"]),
    ("missing key", [], "png", "missing_key", ["language_model.model.norm.weight"]),
    ("bin only", [], "png", "bin_only", ["safetensors"]),
    ("truncated safetensors", [], "png", "truncated_safetensors", ["model.safetensors"]),
    ("no tokenizer.json", [], "png", "no_tokenizer", ["tokenizer.json"]),
    *((f"shard index: {name}", [], "png", name, ["weight_map"])
      for name in ("index_map_not_object", "index_map_empty", "index_map_not_names")),
    ("shard index not UTF-8", [], "png", "index_not_utf8", ["model.safetensors.index.json", "JSON"]),
    ("shard index a list", [], "png", "index_a_list", ["model.safetensors.index.json", "not a JSON object"]),
    ("RoPE settings a string", [], "png", "rope_not_object", ["RoPE", "linear"]),
    ("second <image> in the prompt", ["--prompt", "<image> What is this?"], "png", "good", ["<image>"]),
    ("prompt longer than context", ["--prompt", LONG_PROMPT], "png", "short_context", ["64"]),
    ("unknown policy", ["--policy", "nope"], "png", "good", ["nope"]),
    # A policy parameter's mistake names its flag, as the command line spells it.
    ("avl C > S", ["--policy", "avl", "--C", "0.9", "--S", "0.5"], "png", "good", ["--C (0.9)", "--S (0.5)"]),
    ("avl S > 1", ["--policy", "avl", "--S", "1.5"], "png", "good", ["--S must", "1.5"]),
    ("h2o takes no S", ["--policy", "h2o", "--S", "0.5"], "png", "good", ["h2o", "--heavy, --recent, not --S"]),
    ("fastv R = 1", ["--policy", "fastv", "--R", "1"], "png", "good", ["--R must"]),
    ("streaming negative sinks", ["--policy", "streaming", "--sinks", "-1"], "png", "good", ["--sinks must"]),
    ("avl filter layer 0", ["--policy", "avl", "--filter-layer", "0"], "png", "good", ["--filter-layer must be >= 1"]),
    ("max-new-tokens 0", ["--max-new-tokens", "0"], "png", "good", ["--max-new-tokens"]),
    ("avl unknown kernel", ["--policy", "avl", "--kernel", "bogus"], "png", "good", ["bogus"]),
    ("top-p 0 when sampling", ["--temperature", "1", "--top-p", "0"], "png", "good", ["--top-p"]),
    ("temperature nan", ["--temperature", "nan", "--seed", "0"], "png", "good", ["--temperature"]),
    ("negative temperature", ["--temperature", "-1"], "png", "good", ["--temperature"]),
    ("infinite temperature", ["--temperature", "inf"], "png", "good", ["--temperature", "finite"]),
    ("an abbreviated flag", ["--k", "3"], "png", "good", ["unrecognized arguments: --k"]),  # not --kernel
    ("filter after the last layer", ["--policy", "fastv", "--filter-layer", "9"], "png", "good",
     ["--filter-layer", "at most"]),
    ("max-new-tokens not a number", ["--max-new-tokens", "abc"], "png", "good", ["--max-new-tokens", "abc"]),
    ("unknown option", ["--bogus"], "png", "good", ["--bogus"]),
]


def error_argv(files, broken, good, image, weights, extra):
    image_path = files["png"].parent / "nope.png" if image == "missing_image" else files[image]
    weights_path = good if weights == "good" else broken[weights]
    return ["--image", image_path, "--weights", weights_path, "--max-new-tokens", 4, *extra]


@pytest.mark.parametrize("extra,image,weights,mentions", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_user_errors_inprocess(capsys, files, broken, good, extra, image, weights, mentions):
    try:
        rc, out, err = run_inprocess(capsys, error_argv(files, broken, good, image, weights, extra))
    except SystemExit as exit_:  # argparse's own checks leave through sys.exit
        rc, (out, err) = exit_.code, capsys.readouterr()
    assert_user_error(rc, out, err, *mentions)


def test_prompt_that_fits_the_short_context_runs(capsys, files, broken):
    """Control for the context case: the same checkpoint answers a short prompt, stopping at the context."""
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", broken["short_context"],
                                          "--max-new-tokens", 200, "--json"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "context" and result["prompt_tokens"] + result["new_tokens"] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_user_error(capsys, files, good):
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--device", "cuda"])
    assert_user_error(rc, out, err, "CUDA")


# A few through a real process: the exit status, and what the terminal shows (no traceback, no warnings).
SUBPROCESS_ERRORS = ["truncated jpeg", "avl C > S"]


@pytest.mark.parametrize("case", SUBPROCESS_ERRORS)
def test_user_errors_subprocess(files, broken, good, case):
    _, extra, image, weights, mentions = next(c for c in ERROR_CASES if c[0] == case)
    rc, out, err = run_subprocess(error_argv(files, broken, good, image, weights, extra))
    assert_user_error(rc, out, err, *mentions)


def test_closed_standard_streams(files, tmp_path):
    """Started with stdout closed (>&-), the answer would go nowhere: one line says so, unless the run writes
    an attention map. With stderr closed (2>&-), the notes go nowhere too, and stdout holds the JSON object
    alone."""
    def run(close_fd, argv):
        return subprocess.run([sys.executable, "main.py", *map(str, argv)], cwd=REPO, capture_output=True,
                              text=True, timeout=300, preexec_fn=lambda: os.close(close_fd))

    closed_out = run(1, ["--image", IMAGE, "--max-new-tokens", 2])
    assert closed_out.returncode == 2 and closed_out.stderr.splitlines() == [
        "error: standard output is closed: the answer would go nowhere (redirect it to a file, or give "
        "--attention-map)"]
    mapped = run(1, ["--image", IMAGE, "--max-new-tokens", 2, "--attention-map", tmp_path / "m.png"])
    assert mapped.returncode == 0 and (tmp_path / "m.png").is_file(), mapped.stderr
    closed_err = run(2, ["--image", IMAGE, "--max-new-tokens", 2, "--json"])   # the toy, with its note
    assert closed_err.returncode == 0 and json.loads(closed_err.stdout)["new_tokens"] == 2
    misread = run(2, ["--image", IMAGE, "--max-new-tokens", "two"])           # argparse's error, said nowhere
    assert (misread.returncode, misread.stdout) == (2, "")


@pytest.mark.parametrize("module, argv, remedy", [
    ("tinyavl.toy.evaluate", ["--n", "1"], ", or give --plot or --attention-maps"),
    ("tinyavl.toy.evaluate_hires", ["--n", "1"], ", or give --plot"),
    ("tinyavl.toy.attention_study", ["--n", "1"], ", or give --out"),
    ("tinyavl.bench", ["--dtypes", "float32"], ""),
    ("kernels.bench_sparse_attention", [], ""),
    ("kernels.compile_offline", [], ""),
])
def test_a_command_whose_results_would_go_nowhere_says_so_before_the_work(capsys, monkeypatch, module, argv, remedy):
    """Started with stdout closed (>&-; Python's sys.stdout is then None), a command that prints its results
    there and was given no file to write refuses in one line, as main.py does, instead of running for
    minutes and printing nothing."""
    command = importlib.import_module(module)
    monkeypatch.setattr(sys, "stdout", None)
    if module.startswith("tinyavl.toy"):  # their main returns the status run_command gives
        status = command.main(argv)
    else:                                  # the benchmarks' main runs inside run_main, which exits
        with pytest.raises(SystemExit) as exit_info:
            run_main(lambda: command.main(argv))
        status = exit_info.value.code
    assert status == 2 and capsys.readouterr().err == (
        f"error: standard output is closed: the results would go nowhere (redirect it to a file{remedy})\n")


def test_notes_nobody_reads_do_not_end_the_run(good, files, tmp_path):
    """`python main.py ... --attention-map m.png 2>&1 >answer.txt | true`: the notes' reader is gone before the
    first note, whose write fails (a broken pipe); the run goes on, prints its answer and writes the map."""
    out_path = tmp_path / "m.png"
    with subprocess.Popen([sys.executable, "main.py", "--image", str(files["png"]), "--weights", str(good),
                           "--max-new-tokens", "3", "--attention-map", str(out_path)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        proc.stderr.close()  # before the run says anything: torch takes seconds to import
        answer = proc.stdout.read()
    assert proc.returncode == 0 and answer.strip() and out_path.is_file()


def test_notes_go_nowhere_once_their_reader_left():
    """cli.Notes over a pipe whose reader closed: the write that finds it gone, and every later one, succeed
    and go nowhere (the stream's descriptor points at /dev/null), and the stream flushes without an error;
    over a stream with no descriptor to point elsewhere, the notes are let go."""
    from tinyavl.cli import Notes
    read_end, write_end = os.pipe()
    os.close(read_end)
    with pytest.raises(BrokenPipeError):
        os.write(write_end, b"the pipe is broken\n")
    with open(write_end, "w", buffering=1) as stream:                 # line-buffered, as Python's stderr is
        notes = Notes(stream)
        assert notes.write("a note\n") == len("a note\n") and notes.write("another\n") == len("another\n")
        notes.flush()
        assert os.path.samefile(f"/proc/self/fd/{stream.fileno()}", os.devnull)

    class Gone:  # a stream in place of stderr (a test's, a notebook's) whose reader has gone
        def write(self, text):
            raise BrokenPipeError

    notes = Notes(Gone())
    assert notes.write("a note\n") == len("a note\n") and notes.stream is None
    notes.flush()

    class Busy:  # a non-blocking stderr whose reader is still there, its pipe full for now
        def write(self, text):
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    busy = Busy()
    notes = Notes(busy)
    assert notes.write("a note\n") == len("a note\n") and notes.stream is busy   # this note lost, not the rest


@pytest.mark.parametrize("name, shown", [("two\nlines.png", "two\\nlines.png"), ("two\rlines.png", "two\\rlines.png")])
def test_a_line_break_in_a_path_stays_on_the_error_line(capsys, tmp_path, name, shown):
    rc, out, err = run_inprocess(capsys, ["--image", tmp_path / name])
    assert_user_error(rc, out, err, shown)


def exit_status(entry, raised: BaseException | None) -> int:
    """The status a command entered through `entry` (run_command, or run_main as the trainers and the
    benchmark are) ends with when its work raises `raised` (None: it prints a line, and the result printed
    is None)."""
    def work(*args):
        if raised is None:
            return print("a line")
        raise raised
    if entry == "run_command":
        return run_command(work, argparse.Namespace(json=True), show=print)
    with pytest.raises(SystemExit) as exit_info:
        run_main(work)
    return exit_info.value.code


@pytest.mark.parametrize("entry", ["run_command", "run_main"])
def test_what_the_system_refuses_is_one_line(capsys, entry):
    """An OSError (a disk full, a name too long) ends the command with one line and status 1."""
    rc = exit_status(entry, OSError(28, "No space left on device"))
    out, err = capsys.readouterr()
    assert rc == 1 and out == "" and err == "error: [Errno 28] No space left on device\n"
    # a file tinyavl itself should have found: its traceback is wanted
    with pytest.raises(FileNotFoundError):
        exit_status(entry, FileNotFoundError(2, "No such file or directory", "tinyavl/missing.json"))


CPU_ALLOCATOR = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 10000000000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("entry", ["run_command", "run_main"])
@pytest.mark.parametrize("raised", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GB"),
                                    RuntimeError(CPU_ALLOCATOR)], ids=["python", "cuda", "cpu_allocator"])
def test_memory_that_runs_out_is_one_line(capsys, entry, raised):
    """A 7B model on a small GPU, or a trainer's --text-width 8000000: the system's refusal, one line, status 1."""
    rc = exit_status(entry, raised)
    out, err = capsys.readouterr()
    assert (rc, out, err.count("\n")) == (1, "", 1) and err.startswith("error: out of memory (")
    assert f"({str(raised).split('.')[0] or 'MemoryError'}" in err  # the message, or the error's name without one
    assert "--dtype" not in err and "--device" not in err  # the trainers have neither


def test_memory_that_runs_out_is_said_by_its_messages_first_line(capsys):
    """A message torch writes over several lines (with C++ context or a stack trace): its first is the detail."""
    raised = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nOf the allocated memory 70 GiB "
                                    "is allocated by PyTorch")
    assert exit_status("run_main", raised) == 1
    assert capsys.readouterr().err == ("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.): a "
                                       "smaller model, image or setting (see --help) may fit\n")


def test_memory_really_running_out_is_one_line(capsys):
    """torch's own message for an allocation the machine cannot give (4 EiB), as this torch words it."""
    rc = run_command(lambda args: torch.empty(1 << 62, dtype=torch.uint8), argparse.Namespace(json=True), show=print)
    assert rc == 1 and capsys.readouterr().err.startswith("error: out of memory (")


def test_other_runtime_errors_keep_their_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        exit_status("run_command", RuntimeError("a bug"))


@pytest.mark.parametrize("entry", ["run_command", "run_main"])
def test_a_user_error_in_the_work_is_one_line(capsys, entry):
    """A training's output folder taken by the user while it trained (write_folder_atomically) is such an error."""
    rc = exit_status(entry, tinyavl.UserError("out/ already holds files"))
    assert (rc, *capsys.readouterr()) == (2, "", "error: out/ already holds files\n")


# A command that prints its answer, then, after a line on stdin, its summary: the reader closes stdout either
# while the answer is still coming (more than a pipe holds) or before the command's last flush.
EARLY_CLOSE = """
import argparse, sys
from tinyavl.cli import run_command
lines = int(sys.argv[1])
def run(args):
    for i in range(lines):
        print("token", i)
    sys.stdin.readline()
    return {}
sys.exit(run_command(run, argparse.Namespace(json=False), show=lambda result: print("summary")))
"""


@pytest.mark.parametrize("lines", [100_000, 1])
def test_a_reader_that_stops_early_ends_the_run_quietly(lines):
    """`python main.py ... | head -c 1`: no traceback, and no "Exception ignored" from the flush at exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout buffered, as in a pipe
    proc = subprocess.Popen([sys.executable, "-c", EARLY_CLOSE, str(lines)], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    with contextlib.suppress(BrokenPipeError):  # the command may be gone already (the long answer)
        proc.stdin.write(b"go\n")
        proc.stdin.close()
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""


# The signals that end a command in one line (Ctrl-C, `kill`'s SIGTERM, a closed terminal's SIGHUP).
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def signals_at_start(ignored=()):
    """A subprocess's preexec_fn: the child starts with ENDING_SIGNALS at their defaults, those named in
    `ignored` ignored, whatever pytest itself was started with (a shell's background job ignores Ctrl-C,
    `nohup` SIGHUP, and a child inherits that)."""
    def preexec():
        for sig in ENDING_SIGNALS:
            signal.signal(sig, signal.SIG_IGN if sig in ignored else signal.SIG_DFL)
    return preexec


# A command that, halfway through writing its output, is sent a signal (as `kill` and `timeout` send SIGTERM),
# entered as main.py and the evaluations enter (run_command) or as the trainers and the benchmark do (run_main).
SIGNALLED_MIDWAY = """
import argparse, os, signal, sys
from pathlib import Path
from tinyavl.cli import run_command, run_main
from tinyavl.files import write_file_atomically
out, signum, entry = Path(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3]
def write(partial):
    partial.write_bytes(b"half")
    os.kill(os.getpid(), signum)
    partial.write_bytes(b"half and the rest")
def run(args):
    write_file_atomically(out, write)
    return {}
if entry == "run_command":
    sys.exit(run_command(run, argparse.Namespace(json=True), show=print))
run_main(lambda: run(None))
"""


@pytest.mark.parametrize("entry", ["run_command", "run_main"])
@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_a_signal_to_end_is_one_line_and_leaves_no_partial_file(tmp_path, entry, name, status):
    """Python's default for SIGTERM and SIGHUP ends the process where no `finally` runs: the output's
    temporary file would stay behind. A command ends as Ctrl-C ends it, with the shell's status for the signal.
    The command starts with the signal's default action, whatever pytest was started with (`signals_at_start`;
    under `nohup`, SIGHUP ignored, which the command keeps: the next test)."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", SIGNALLED_MIDWAY, str(folder / "map.png"), name, entry], cwd=REPO,
                          capture_output=True, text=True, timeout=60, preexec_fn=signals_at_start())
    assert (proc.returncode, proc.stdout, proc.stderr) == (status, "", f"terminated ({name})\n")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_the_command_was_started_to_ignore_stays_ignored(tmp_path, name):
    """`nohup` starts a command with SIGHUP ignored, so that a training outlives its terminal: the command
    must not take the signal back."""
    folder = tmp_path / "outputs"
    folder.mkdir()
    proc = subprocess.run([sys.executable, "-c", SIGNALLED_MIDWAY, str(folder / "map.png"), name, "run_main"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          preexec_fn=signals_at_start(ignored=[getattr(signal, name)]))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert [path.name for path in folder.iterdir()] == ["map.png"]
    assert (folder / "map.png").read_bytes() == b"half and the rest"


def test_a_command_leaves_the_signal_handlers_as_it_found_them(capsys):
    """main() is also called in-process (tests, notebooks): the caller's SIGTERM handler is theirs again after."""
    def handler(signum, frame):
        pass
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert run_command(lambda args: {}, argparse.Namespace(json=True), show=print) == 0
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("outcome", ["ok", "user error", "ctrl-c"])
def test_a_command_run_in_process_leaves_signal_handlers_and_streams_as_it_found_them(outcome):
    """A command run in-process (the Python API, a notebook, these tests) leaves the process as it found it, also
    when it ends in an error: its SIGTERM and SIGHUP handlers (`startup.handling`) and sys.stdout / sys.stderr
    (`cli.wrapped_stream`)."""
    from tinyavl.cli import ended_in_one_line

    def mine(signum, frame):
        pass

    def work():
        if outcome == "user error":
            raise UserError("no")
        if outcome == "ctrl-c":
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, mine) for sig in (signal.SIGTERM, signal.SIGHUP)}
    stdout, stderr = sys.stdout, sys.stderr
    try:
        ended_in_one_line(work)
        assert {signal.getsignal(sig) for sig in previous} == {mine}
        assert (sys.stdout, sys.stderr) == (stdout, stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------ what the user gave stays theirs
def test_attention_map_never_overwrites_the_input_image(capsys, good, files, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(files["png"].read_bytes())
    before = image.read_bytes()
    for force in ([], ["--force"]):
        rc, out, err = run_inprocess(capsys, ["--image", image, "--weights", good, "--attention-map", image, *force])
        assert_user_error(rc, out, err, "overwrite", "photo.png")
        assert image.read_bytes() == before
    rc, out, err = run_inprocess(capsys, ["--image", image, "--weights", good,
                                          "--attention-map", Path(good) / "map.png"])
    assert_user_error(rc, out, err, "lies inside the input folder")
    assert not (Path(good) / "map.png").exists()


def test_attention_map_replaces_an_existing_file_only_with_force(capsys, good, files, tmp_path):
    out_path = tmp_path / "map.png"
    out_path.write_text("the user's")
    argv = ["--image", files["png"], "--weights", good, "--max-new-tokens", 2, "--attention-map", out_path]
    rc, out, err = run_inprocess(capsys, argv)
    assert_user_error(rc, out, err, "already exists", "--force")
    assert out_path.read_text() == "the user's"
    rc, _, err = run_inprocess(capsys, argv + ["--force"])
    assert rc == 0, err
    assert Image.open(out_path).size[0] > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]


def test_attention_map_refuses_a_link_to_nowhere_a_hard_link_to_the_image_and_a_folder_name(capsys, good, files,
                                                                                            tmp_path):
    """A link that points nowhere is a name the user made (only --force replaces it); a hard link to the input
    image is the image, whatever --force says; "x.png/" names a folder, which a Path would silently drop."""
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    argv = ["--image", files["png"], "--weights", good, "--max-new-tokens", 2, "--attention-map"]
    rc, out, err = run_inprocess(capsys, argv + [dangling])
    assert_user_error(rc, out, err, "already exists")
    assert dangling.is_symlink() and os.readlink(dangling) == str(tmp_path / "nowhere.png")
    image = tmp_path / "photo.png"
    image.write_bytes(files["png"].read_bytes())
    try:
        os.link(image, tmp_path / "same.png")
    except OSError:  # a file system without hard links (some FUSE and overlay mounts)
        pytest.skip("the temporary folder's file system makes no hard links")
    rc, out, err = run_inprocess(capsys, ["--image", image, "--weights", good, "--attention-map", tmp_path / "same.png",
                                          "--force"])
    assert_user_error(rc, out, err, "overwrite")
    with pytest.raises(SystemExit) as exit_status:  # argparse's own error: one line, status 2
        run_inprocess(capsys, argv + [f"{tmp_path / 'x.png'}/"])
    assert exit_status.value.code == 2 and "give a file name, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_a_reader_that_stops_reading_does_not_cost_the_attention_map(good, files, tmp_path):
    """`python main.py ... --attention-map m.png | head -c 1`: the answer stops printing when the reader
    leaves, the run goes on, and the map is written (and said so on stderr)."""
    out_path = tmp_path / "m.png"
    proc = subprocess.Popen([sys.executable, "main.py", "--image", str(files["png"]), "--weights", str(good),
                             "--max-new-tokens", "40", "--attention-map", str(out_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()  # the reader leaves after one byte
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err, err
    assert out_path.is_file() and f"wrote the attention map to {out_path}" in err


def test_a_reader_that_stops_reading_does_not_cost_a_training(tmp_path):
    """`python -m tinyavl.toy.train --out new | head -c 1`: the training's log stops when the reader leaves
    (`print_progress`), the training goes on, and its folder, its result, is written."""
    out = tmp_path / "new"
    proc = subprocess.Popen([sys.executable, "-m", "tinyavl.toy.train", "--out", str(out), "--steps", "4",
                             "--tune-steps", "4", "--batch-size", "2", "--eval-every", "0", "--vision-layers", "1",
                             "--text-layers", "1", "--text-width", "16"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(1)
    proc.stdout.close()  # the reader leaves after one byte
    err = proc.stderr.read().decode()
    assert (proc.wait(timeout=300), err) == (0, "")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


NEEDS_DEV_FULL = pytest.mark.skipif(not Path("/dev/full").exists(),
                                    reason="no /dev/full, a device every write to fails as a full disk")


@NEEDS_DEV_FULL
def test_a_stderr_that_cannot_be_written_ends_no_run(good, files):
    """`python main.py ... 2>>run.log` on a full disk: the notes cannot be written (OSError, ENOSPC); the run
    still prints its answer with status 0, and a mistake still ends with status 2."""
    run = [sys.executable, "main.py", "--image", str(files["png"]), "--weights", str(good), "--max-new-tokens", "3"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(run, cwd=REPO, stdout=subprocess.PIPE, stderr=full, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip()
        proc = subprocess.run(run + ["--policy", "avl", "--S", "5"], cwd=REPO, stdout=subprocess.PIPE, stderr=full,
                              text=True, timeout=120)
        assert (proc.returncode, proc.stdout) == (2, "")


@NEEDS_DEV_FULL
@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_stdout_that_cannot_be_written_is_named(good, files, unbuffered):
    """`python main.py ... > answer.txt` on a full disk: one line and status 1, naming standard output, which
    the OSError of a stream's write does not name (`cli.NamedStdout`); with stdout buffered, as it is by default,
    the bytes still held are not refused a second time at exit (Python's 'Exception ignored', status 120)."""
    run = [sys.executable, "main.py", "--image", str(files["png"]), "--weights", str(good), "--max-new-tokens", "3"]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    with open("/dev/full", "w") as full:
        proc = subprocess.run(run, cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    assert (proc.returncode, proc.stderr) == (1, "error: [Errno 28] No space left on device: 'standard output'\n")


@pytest.mark.parametrize("entry", ["run_command", "run_main"])
@pytest.mark.parametrize("refusing", ["write", "flush"])
def test_a_result_or_progress_line_the_disk_refuses_names_standard_output(capsys, monkeypatch, entry, refusing):
    """A --json result (run_command) or a trainer's progress (run_main) printed to a full disk, refused as it is
    written or as it is flushed; an OSError the work raises itself keeps its own file name."""
    def refuse(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    full = types.SimpleNamespace(write=len, flush=lambda: None)   # stdout redirected to a full disk
    setattr(full, refusing, refuse)
    monkeypatch.setattr(sys, "stdout", full)
    assert exit_status(entry, None) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: 'standard output'\n"
    assert exit_status(entry, OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors")) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: 'out/model.safetensors'\n"


def test_attention_map_is_written_and_reported(capsys, good, files, tmp_path):
    out_path = tmp_path / "map.png"
    rc, _, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 2,
                                        "--attention-map", out_path])
    assert rc == 0, err
    assert f"wrote the attention map to {out_path}" in err
    assert Image.open(out_path).size[0] > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]


def test_user_input_is_checked_before_the_model_loads(capsys, monkeypatch, good, broken, files, tmp_path):
    """A mistake in the image, the prompt, the generation or policy settings or the map path is reported
    without loading the model's weights (seconds to minutes for a 7B checkpoint), those that need its config
    (a layer past its last, a prompt past its context) from its small files."""
    for loader in ("load_pretrained", "load_model"):
        monkeypatch.setattr(tinyavl, loader, lambda *a, **k: pytest.fail("loaded the model first"))
    base = ["--weights", good]
    cases = [
        (["--image", tmp_path / "nope.png"], "nope.png"),
        (["--image", files["png"], "--policy", "avl", "--S", "2"], "S"),
        (["--image", files["png"], "--S", "0.5"], "full"),
        (["--image", files["png"], "--temperature", "1", "--top-p", "0"], "--top-p"),
        (["--image", files["png"], "--seed", "99999999999999999999"], "--seed"),
        (["--image", files["png"], "--top-k", "5"], "--top-k shapes sampling, and --temperature 0 (the default)"),
        (["--image", files["png"], "--top-p", "0.9", "--seed", "3"], "--top-p and --seed shape sampling"),
        (["--image", files["png"], "--prompt", "<image> what?"], "<image>"),
        (["--image", files["png"], "--prompt", " "], "the prompt is empty"),
        (["--image", files["png"], "--attention-map", tmp_path / "no-such-dir" / "map.png"], "no-such-dir"),
        (["--image", files["png"], "--map-layer", "1"], "--attention-map"),
        (["--image", files["png"], "--hires-threshold", "48"], "--attention-map"),
        (["--image", files["png"], "--attention-map", tmp_path / "map.png", "--hires-threshold", "255"],
         "--hires-threshold must be from 0 to below 255"),
        (["--image", files["png"], "--attention-map", tmp_path / "map.png", "--map-layer", "-1"],
         "(--map-layer) must be in 0..1 (the decoder's layers), got -1"),
        (["--image", files["png"], "--attention-map", tmp_path / "map.psd"], ".png"),  # Pillow cannot write it as RGB
        (["--image", files["png"], "--attention-map", tmp_path / ("m" * 300 + ".png")], "too long"),
        # Inputs too (Path.exists raises ENAMETOOLONG before Python 3.14; from 3.14 on the path is not there).
        (["--image", tmp_path / ("i" * 300 + ".png")], "i" * 300 + ".png"),
        (["--image", files["png"], "--weights", tmp_path / ("w" * 300)], "w" * 300),
        (["--image", files["png"], "--force"], "--attention-map"),
        (["--image", files["png"], "--policy", "fastv", "--filter-layer", "9"], "--filter-layer 9"),
        (["--image", files["png"], "--attention-map", tmp_path / "map.png", "--map-layer", "9"], "got 9"),
        (["--image", files["png"], "--prompt", LONG_PROMPT, "--weights", broken["short_context"]], "context is 64"),
    ]
    for extra, mention in cases:
        rc, out, err = run_inprocess(capsys, base + extra)
        assert_user_error(rc, out, err, mention)


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "bomb"])
def test_images_that_are_not_image_files_get_their_own_message(capsys, good, tmp_path, kind):
    if kind == "folder":
        path, mention = tmp_path, "is a folder"
    elif kind == "fifo":
        path, mention = tmp_path / "pipe", "not a regular file"
        os.mkfifo(path)
    elif kind == "device":
        path, mention = Path("/dev/null"), "not a regular file"
    else:  # a valid PNG header claiming 20000 x 20000 pixels: PIL refuses it before decoding
        path, mention = tmp_path / "bomb.png", "decompression"
        Image.new("1", (20000, 20000)).save(path)
    rc, out, err = run_inprocess(capsys, ["--image", path, "--weights", good])
    assert_user_error(rc, out, err, mention)


def test_prompt_bytes_that_are_not_utf8_are_a_user_error(good, files):
    """Bytes that are not UTF-8 reach Python's argv as lone surrogates in a UTF-8 locale (in a Latin-1 one
    they would be "é"); a real process shows the path."""
    proc = subprocess.run([sys.executable, "main.py", "--image", str(files["png"]), "--weights", str(good),
                           b"--prompt", b"caf\xe9 ?"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUTF8": "1"})
    assert_user_error(proc.returncode, proc.stdout, proc.stderr, "UTF-8")


def test_weights_path_that_is_a_file_says_so(capsys, files):
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", files["png"]])
    assert_user_error(rc, out, err, "is a file")


def test_finish_reason_in_json_and_summary(capsys, good, files):
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 2,
                                          "--json"])
    result = json.loads(out)
    assert rc == 0 and result["finish_reason"] in ("eos", "length")
    expected = "eos" if result["token_ids"][-1] == tokenizer_info()["eos_token_id"] else "length"
    assert result["finish_reason"] == expected
    rc, _, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good, "--max-new-tokens", 2])
    assert rc == 0 and ("--max-new-tokens" in err.splitlines()[0]) == (expected == "length")


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch, good, files):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tinyavl, "generate", interrupted)
    rc, out, err = run_inprocess(capsys, ["--image", files["png"], "--weights", good])
    assert rc == 130 and err.strip().splitlines()[-1] == "interrupted (Ctrl-C)" and "Traceback" not in err


# A command run as Python runs it (main.py as a script; python -m, whose argv[0] is "-m" while Python imports
# the module's packages), with a signal (argv[1]: Ctrl-C's SIGINT, SIGTERM, SIGHUP) arriving when torch is
# first imported, inside a library's code that catches every exception (as code torch runs while it imports does).
SIGNAL_WHILE_IMPORTING = """
import importlib.abc, os, runpy, signal, sys
SIGNAL = getattr(signal, sys.argv[1])
class SignalWhileImporting(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            try:
                os.kill(os.getpid(), SIGNAL)
            except BaseException as caught:
                print("caught", type(caught).__name__)
        return None
sys.meta_path.insert(0, SignalWhileImporting())
command, *args = sys.argv[2:]
if command == "main.py":
    sys.argv = [command, *args]
    runpy.run_path(command, run_name="__main__")
else:
    sys.argv = ["-m", *args]
    runpy.run_module(command, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("command, args", [
    ("main.py", ["--image", IMAGE, "--max-new-tokens", "1"]),
    ("tinyavl.toy.evaluate", ["--n", "1"]),
    ("kernels.bench_sparse_attention", []),
])
def test_ctrl_c_while_importing_is_one_line_and_status_130(command, args):
    run = [sys.executable, "-c", SIGNAL_WHILE_IMPORTING, "SIGINT", command, *map(str, args)]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=signals_at_start())
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "interrupted (Ctrl-C)\n")
    if command == "main.py":
        # Nobody reads stderr (its reader gone before the line): the Ctrl-C still ends the run.
        with subprocess.Popen(run, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=signals_at_start()) as proc:
            proc.stderr.close()
            out = proc.stdout.read()
        assert (proc.returncode, out) == (130, "")
        # stderr closed (2>&-: sys.stderr is None), so there is no line to say: the Ctrl-C still ends the run.
        proc = subprocess.run(run, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=120,
                              preexec_fn=lambda: (signals_at_start()(), os.close(2)))
        assert (proc.returncode, proc.stdout) == (130, "")
        # A shell starts a background job (`python main.py ... &`) with Ctrl-C ignored: it stays ignored.
        proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120,
                              preexec_fn=signals_at_start(ignored=[signal.SIGINT]))
        assert proc.returncode == 0 and "interrupted" not in proc.stderr and "caught" not in proc.stdout


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_while_importing_is_one_line(signal_name, status):
    """Python's default for the two ends a process without a word; while the imports run, a command says
    what it says for them later (`ended_in_one_line`), with the same status. Under `nohup` (SIGHUP ignored) the
    run goes on."""
    run = [sys.executable, "-c", SIGNAL_WHILE_IMPORTING, signal_name, "main.py", "--image", str(IMAGE),
           "--max-new-tokens", "1"]
    proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=signals_at_start())
    assert (proc.returncode, proc.stdout, proc.stderr) == (status, "", f"terminated ({signal_name})\n")
    if signal_name == "SIGHUP":
        proc = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120,
                              preexec_fn=signals_at_start(ignored=[signal.SIGHUP]))
        assert proc.returncode == 0 and "terminated" not in proc.stderr and "caught" not in proc.stdout


def test_the_import_guard_gives_back_the_handlers_it_found(monkeypatch):
    """After the imports a command's own handlers run (`run_command` turns Ctrl-C into one line after its
    `finally` blocks have removed what was half-written): the guard's os._exit would skip them."""
    monkeypatch.setattr(startup, "starting_a_command", lambda: True)

    def mine(signum, frame):
        pass

    previous = {sig: signal.signal(sig, mine) for sig in ENDING_SIGNALS}
    try:
        with startup.signals_end_the_imports():
            assert {signal.getsignal(sig) for sig in previous} == {startup.ended_while_importing}
        assert {signal.getsignal(sig) for sig in previous} == {mine}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_the_import_guard_in_another_thread_sets_nothing(monkeypatch):
    """Python sets signal handlers only from the main thread: a first `import tinyavl` in a worker thread
    imports, unguarded, where signal.signal would raise ValueError."""
    monkeypatch.setattr(startup, "starting_a_command", lambda: True)
    before = {sig: signal.getsignal(sig) for sig in ENDING_SIGNALS}
    outcome = []

    def import_in_a_thread():
        try:
            with startup.signals_end_the_imports():
                outcome.append({sig: signal.getsignal(sig) for sig in before})
        except Exception as error:
            outcome.append(error)

    worker = threading.Thread(target=import_in_a_thread)
    worker.start()
    worker.join()
    assert outcome == [before]


def test_a_program_that_is_not_a_command_keeps_its_ctrl_c():
    """A notebook or a program of one's own that imports tinyavl: Ctrl-C stays Python's KeyboardInterrupt,
    which the program may catch (a notebook's interrupt would otherwise end its kernel)."""
    program = SIGNAL_WHILE_IMPORTING.split("command, *args")[0] + "import tinyavl\nprint('went on')\n"
    proc = subprocess.run([sys.executable, "-c", program, "SIGINT"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, preexec_fn=signals_at_start())
    assert (proc.returncode, proc.stdout) == (0, "caught KeyboardInterrupt\nwent on\n")


# As root every file is readable: drop the capabilities that let it read past a file's permissions.
AS_A_USER = ([] if os.geteuid() != 0 else ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                                           "--inh-caps", "-dac_override,-dac_read_search", "--"])
# A root without CAP_SETPCAP (a container started with --cap-drop=ALL) cannot drop them either.
CAN_RUN_AS_A_USER = not AS_A_USER or bool(shutil.which("setpriv")) and subprocess.run(
    [*AS_A_USER, "true"], capture_output=True).returncode == 0


# From Python 3.14 on, Path.exists says False where a folder on the path may not be searched: "not found", status 2.
SEARCHED_BY_EXISTS = pytest.mark.skipif(sys.version_info >= (3, 14), reason="Path.exists raises no OSError from 3.14")


@pytest.mark.skipif(not CAN_RUN_AS_A_USER, reason="root, and its rights to read any file cannot be dropped here")
@pytest.mark.parametrize("unreadable", ["image", "model.safetensors", "tokenizer.json",
                                        pytest.param("image folder", marks=SEARCHED_BY_EXISTS),
                                        pytest.param("model folder", marks=SEARCHED_BY_EXISTS)])
def test_a_file_the_user_may_not_read_is_one_line_saying_so(good, files, tmp_path, unreadable):
    """What the system refuses is one line and status 1, naming the file: not "damaged" (the image, the
    tokenizer), not "no such file" (safetensors), not a traceback. A folder that may not be searched alike (not
    a mistake in the path, status 2, as a name too long is), naming the first path looked up in it."""
    folder = shutil.copytree(good, tmp_path / "model")
    (tmp_path / "photos").mkdir()
    image = Path(shutil.copy(files["png"], tmp_path / "photos" / "photo.png"))
    locked, path = {"image": (image, image), "image folder": (image.parent, image),
                    "model folder": (folder, folder / "config.json")}.get(unreadable, (folder / unreadable,) * 2)
    locked.chmod(0)
    proc = subprocess.run([*AS_A_USER, sys.executable, "main.py", "--image", str(image), "--weights", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"error: [Errno 13] Permission denied: '{path}'\n"


COMMANDS = ["main", "tinyavl.bench", "tinyavl.toy.train", "tinyavl.toy.train_hires", "tinyavl.toy.evaluate",
            "tinyavl.toy.evaluate_hires", "tinyavl.toy.attention_study", "kernels.bench_sparse_attention",
            "kernels.compile_offline"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_its_options_and_refuses_a_mistake_in_one_line(command, capsys):
    """Every command's parser is tinyavl.cli's ArgumentParser: an option without a help text cannot be added
    (argparse would show neither it nor its default), and a mistake is one line, status 2."""
    main_of = importlib.import_module(command).main
    with pytest.raises(SystemExit) as exit_info:
        main_of(["--help"])
    assert exit_info.value.code == 0 and "(default: " in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exit_info:
        main_of(["--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")  # the flag, or one required


@pytest.mark.parametrize("spec_name, argv0, shown", [
    ("tinyavl.bench", "/x/tinyavl/bench.py", "python -m tinyavl.bench"),
    ("tinyavl.__main__", "/x/tinyavl/__main__.py", "python -m tinyavl"),   # a package run by its name
    (None, "/x/main.py", "python main.py"),
])
def test_a_usage_line_names_the_command_a_user_types(monkeypatch, spec_name, argv0, shown):
    """`python -m tinyavl.bench` shows that, not bench.py (which `python bench.py` cannot run); a script run by
    its path shows its file's name."""
    spec = None if spec_name is None else types.SimpleNamespace(name=spec_name)
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=spec))
    monkeypatch.setattr(sys, "argv", [argv0])
    assert ArgumentParser().format_usage().startswith(f"usage: {shown} ")


def test_a_module_run_as_a_command_shows_its_module_in_its_usage():
    proc = subprocess.run([sys.executable, "-m", "tinyavl.toy.evaluate", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m tinyavl.toy.evaluate ")


# Every path a command takes, given empty: Path("") is the current folder, where a command would read or
# write without a word (an unset shell variable: --out "$DIR").
EMPTY_PATHS = [("main", "--image"), ("main", "--weights"), ("main", "--attention-map"),
               ("tinyavl.toy.train", "--out"), ("tinyavl.toy.train", "--checkpoint"),
               ("tinyavl.toy.train_hires", "--out"), ("tinyavl.toy.train_hires", "--base"),
               ("tinyavl.toy.train_hires", "--checkpoint"),
               ("tinyavl.toy.evaluate", "--weights"), ("tinyavl.toy.evaluate", "--attention-maps"),
               ("tinyavl.toy.evaluate", "--plot"), ("tinyavl.toy.evaluate_hires", "--weights"),
               ("tinyavl.toy.evaluate_hires", "--plot"), ("tinyavl.toy.evaluate_hires", "--in-sequence-toy"),
               ("tinyavl.toy.attention_study", "--weights"), ("tinyavl.toy.attention_study", "--out")]


@pytest.mark.parametrize("command, option", EMPTY_PATHS)
def test_an_empty_path_is_refused_in_one_line(command, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were it taken as the current folder, nothing of the repository's is touched
    argv = [option, ""] + (["--image", "x.png"] if command == "main" and option != "--image" else []) + (
        ["--out", "new"] if command == "tinyavl.toy.train_hires" and option != "--out" else [])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(command).main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"argument {option}: the path is empty" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, option", [("tinyavl.toy.evaluate", "--weights"), ("tinyavl.toy.attention_study",
                                             "--weights"), ("tinyavl.toy.evaluate_hires", "--weights"),
                                            ("tinyavl.toy.evaluate_hires", "--in-sequence-toy")])
def test_a_toy_command_given_a_file_for_a_model_folder_says_so(command, option, capsys):
    """Not "train one": the folder is what is wrong, not a missing model."""
    assert importlib.import_module(command).main([option, str(REPO / "README.md")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {option} {REPO / 'README.md'} is a file: give the model folder that holds it\n"


@pytest.mark.parametrize("command, option, trainer", [
    ("tinyavl.toy.evaluate", "--weights", "tinyavl.toy.train"),
    ("tinyavl.toy.evaluate_hires", "--in-sequence-toy", "tinyavl.toy.train_hires --in-sequence")])
def test_a_toy_command_without_its_model_folder_says_how_to_train_one(command, option, trainer, capsys, tmp_path):
    """The remedy is a command that runs as written: python -m (a trainer is a module, not a script)."""
    assert importlib.import_module(command).main([option, str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {option}: no model folder at {tmp_path / 'nowhere'}: train one with python -m {trainer}\n"


@pytest.mark.parametrize("command, option", [("tinyavl.toy.evaluate", "--weights"), ("tinyavl.toy.attention_study",
                                             "--weights"), ("tinyavl.toy.evaluate_hires", "--in-sequence-toy")])
def test_a_toy_command_given_a_model_folder_name_too_long_says_so(command, option, capsys, tmp_path):
    """One line and status 2, naming the folder (Python 3.11's Path.exists raises ENAMETOOLONG, which would
    end the command as the system's refusal, status 1)."""
    folder = tmp_path / ("m" * 300)
    assert importlib.import_module(command).main([option, str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}") and err.count("\n") == 1 and str(folder) in err


def test_an_argument_error_quoting_a_line_break_stays_on_one_line(capsys):
    """argparse's own refusals (a type's, here) are one line too, whatever the value quotes."""
    parser = ArgumentParser(prog="p")
    parser.add_argument("--out", type=output_file, help="a file")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--out", "two\nlines/"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "two\\nlines/ ends in /" in err


def test_an_option_without_help_cannot_be_added(capsys):
    with pytest.raises(TypeError, match="--quiet has no help text"):
        ArgumentParser().add_argument("--quiet", action="store_true")
    with pytest.raises(SystemExit):  # the benchmark's two options that had none
        importlib.import_module("tinyavl.bench").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 24)" in text and "(default: ['float32', 'bfloat16'])" in text


def test_help_lists_every_option_with_its_default(capsys):
    parser = main.build_parser()
    for action in parser._actions:  # every option explains itself
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--max-new-tokens", "64"), ("--top-p", "1.0"), ("--policy", "full"),
                            ("--temperature", "0.0"), ("--prompt", "Describe the image.")]:
        assert f"(default: {default})" in text.split(f"{option} ", 2)[-1][:300], option
    # A shared flag's default is each policy's that takes it (a policy registered later adds its own).
    for option, defaults in [("--S", "(default: avl 0.5, random 0.5"), ("--filter-layer", "(default: avl 3, fastv 2"),
                             ("--K", "(default: avl 3)")]:
        assert defaults in text.split(f"{option} ", 2)[-1].split(" --", 1)[0], option



def test_a_map_file_made_while_the_model_generates_is_kept(tmp_path, monkeypatch, capsys):
    """--attention-map's name was free when checked; a file the user makes there during the generation stays,
    without --force (write_file_atomically's link), and the run says so in one line."""
    out, real = tmp_path / "map.png", tinyavl.generate

    def generate(*args, **kwargs):
        out.write_text("the user's")
        return real(*args, **kwargs)
    monkeypatch.setattr(tinyavl, "generate", generate)
    rc = main.main(["--image", str(IMAGE), "--max-new-tokens", "2", "--attention-map", str(out), "--json"])
    assert rc == 2 and "appeared while this command ran" in capsys.readouterr().err
    assert out.read_text() == "the user's" and [p.name for p in tmp_path.iterdir()] == ["map.png"]


def test_a_map_layer_past_the_model_fails_before_generating(tmp_path, monkeypatch, capsys):
    """The toy has 4 decoder layers: --map-layer 4 is refused once it has loaded, before any token."""
    monkeypatch.setattr(tinyavl, "generate", lambda *a, **k: pytest.fail("generated before checking --map-layer"))
    rc = main.main(["--image", str(IMAGE), "--attention-map", str(tmp_path / "m.png"), "--map-layer", "4"])
    assert rc == 2 and "must be in 0..3" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_summary_gives_the_peak_as_a_share_of_dense():
    result = {"new_tokens": 3, "finish_reason": "length", "policy": "avl", "policy_params": None,
              "prompt_tokens": 10, "prefill_seconds": 0.5, "decode_tokens_per_second": None,
              "kv_cache_bytes_peak": 3 * 2 ** 20, "kv_cache_bytes_dense": 4 * 2 ** 20}
    assert "KV cache peak 3.00 MiB (75% of dense 4.00 MiB)" in main.summary(result)


def test_json_kv_bytes_after_prefill_and_at_the_peak(capsys):
    """The toy in fp32: 4 layers x (K and V) x 2 KV heads x 32 dims x 4 bytes = 2048 bytes a token. Under full
    attention the prefill holds the prompt; the peak also holds every answer token fed back (all but the last)."""
    rc = main.main(["--image", str(IMAGE), "--max-new-tokens", "3", "--json"])
    result = __import__("json").loads(capsys.readouterr().out)
    per_token = 4 * 2 * 2 * 32 * 4
    assert rc == 0 and result["new_tokens"] >= 2
    assert result["kv_cache_bytes_after_prefill"] == result["prompt_tokens"] * per_token
    assert result["kv_cache_bytes_peak"] == (result["prompt_tokens"] + result["new_tokens"] - 1) * per_token


def test_an_upper_case_picture_suffix_is_written_in_its_format(tmp_path):
    for name, kind in (("MAP.PNG", "PNG"), ("map.JPG", "JPEG")):
        out = tmp_path / name
        assert main.main(["--image", str(IMAGE), "--max-new-tokens", "1", "--attention-map", str(out), "--json"]) == 0
        with Image.open(out) as picture:
            assert picture.format == kind


def test_a_filter_layer_equal_to_the_layer_count_is_refused(capsys):
    """4 layers: a filter "before layer 4" never acts; the largest that does is 3."""
    rc = main.main(["--image", str(IMAGE), "--policy", "fastv", "--filter-layer", "4", "--max-new-tokens", "1"])
    assert rc == 2 and "give at most 3" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--steps", "--batch-size"])
def test_the_trainer_refuses_zero_steps_or_scenes(flag, tmp_path, capsys, monkeypatch):
    from tinyavl.toy import train
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail(f"trained with {flag} 0"))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out", str(tmp_path / "toy"), flag, "0"])
    assert exit_.value.code == 2 and f"{flag} must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS,
                                  errno.EACCES, errno.EPERM, errno.EIO])
def test_every_refusal_of_the_system_is_one_line(code, capsys):
    """cli.SYSTEM_REFUSALS as its comment lists them: a disk full, a quota, a name too long, a loop of links,
    a read-only disk, no permission, an I/O error."""
    def work(args):
        raise OSError(code, os.strerror(code))
    assert run_command(work, argparse.Namespace(json=True), show=print) == 1
    assert capsys.readouterr().err == f"error: [Errno {code}] {os.strerror(code)}\n"


def test_help_shows_no_default_for_an_option_not_given(capsys):
    """Nor for an on/off flag (--json, --force): False is no default a reader needs told."""
    with pytest.raises(SystemExit):
        main.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out and "--json" in out


def test_an_out_of_memory_error_with_a_cpp_stack_is_still_one_line(capsys):
    """TORCH_SHOW_CPP_STACKTRACES=1 appends the C++ frames to the allocator's message."""
    message = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
               "to allocate 10000000000000 bytes. Error code 12 (Cannot allocate memory)\n"
               "Exception raised from alloc_cpu at alloc_cpu.cpp:127 (most recent call first):\nframe #0: c10::...")

    def work(args):
        raise RuntimeError(message)
    assert run_command(work, argparse.Namespace(json=True), show=print) == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_a_flag_is_not_abbreviated():
    """--max-new is no --max-new-tokens (an abbreviation could later become another flag's)."""
    with pytest.raises(SystemExit) as end:
        main.build_parser().parse_args(["--image", "x.png", "--max-new", "3"])
    assert end.value.code == 2


def test_a_trainer_takes_up_to_max_threads():
    from tinyavl.cli import MAX_THREADS, check_training_args
    most = argparse.Namespace(steps=1, batch_size=1, threads=MAX_THREADS, lr=1e-3, eval_every=0, seed=0)
    check_training_args(ArgumentParser(), most)
    with pytest.raises(SystemExit):
        check_training_args(ArgumentParser(), argparse.Namespace(**{**vars(most), "threads": MAX_THREADS + 1}))


def test_progress_is_flushed_line_by_line(monkeypatch):
    """A training's log reaches a pipe (| tee log) as it is written, not in blocks."""
    import io
    from tinyavl.cli import print_progress
    flushed = []

    class Recorded(io.StringIO):
        def flush(self):
            flushed.append(self.getvalue())

    monkeypatch.setattr(sys, "stdout", Recorded())
    print_progress("step", 1)
    assert flushed and flushed[-1] == "step 1\n"


def test_a_commands_description_is_its_docstrings_first_paragraph_on_one_line():
    from tinyavl.cli import first_paragraph
    assert first_paragraph("Train the\n  toy model.\n\nMore.") == "Train the toy model."


def test_a_json_file_holding_true_is_named_for_it(tmp_path):
    from tinyavl.files import read_json_object
    (tmp_path / "c.json").write_text("true")
    with pytest.raises(UserError, match="holds true or false"):
        read_json_object(tmp_path / "c.json")
