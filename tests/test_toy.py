"""The committed toy LLaVA (weights/toy): it loads like any llava-hf folder and answers correctly.

The golden answers are the truth for the example images (checked by eye against the pictures, and
equal to weights/toy/examples/examples.json, whose generator tests/test_scenes.py checks against the
pixels). The evaluation runs on a small held-out set.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import main
import tinyavl
from tinyavl.evaluate import held_out_set, is_correct
from tinyavl.evaluate import main as evaluate_main

TOY = Path(__file__).resolve().parent.parent / "weights" / "toy"
EXAMPLES = TOY / "examples"


@pytest.fixture(scope="module")
def toy():
    return tinyavl.load_pretrained(TOY, device="cpu")


def answer(toy, image, question, policy="full", **params):
    model, processor = toy
    inputs = processor(processor.chat_prompt(question), image=image)
    ids, _ = tinyavl.generate(model, **inputs, max_new_tokens=64, eos_token_id=processor.eos_token_id,
                              policy=policy, **params)
    return processor.decode(ids)


def test_toy_is_a_small_llava_hf_folder(toy):
    model, processor = toy
    config = json.loads((TOY / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == "llama"
    assert model.config.num_image_tokens >= 64
    assert model.config.text.num_key_value_heads < model.config.text.num_attention_heads, "GQA"
    size = sum(f.stat().st_size for f in TOY.rglob("*") if f.is_file())
    assert size < 25 * 2 ** 20


GOLDEN = [  # (example image, question, the exact greedy answer)
    ("scene-0.png", "Describe the image.", "blue circle at row 1 column 3 with digit 5 and yellow square at row 1 "
                                           "column 4 and blue cross at row 3 column 2 with digit 9 and blue diamond "
                                           "at row 4 column 2 with digit 5"),
    ("scene-2.png", "What colour is the cross?", "red"),
    ("scene-1.png", "What shape is at row 4 column 2?", "triangle"),
    ("scene-3.png", "What digit is at row 1 column 1?", "2"),
    ("scene-0.png", "Where is the diamond?", "diamond at row 4 column 2"),
]


@pytest.mark.parametrize("image, question, expected", GOLDEN)
def test_golden_answers(toy, image, question, expected):
    assert answer(toy, EXAMPLES / image, question) == expected


def test_main_uses_the_toy_by_default(capsys):
    image, question, expected = GOLDEN[0]
    assert main.main(["--image", str(EXAMPLES / image), "--prompt", question, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == expected


def test_main_explains_missing_default_weights(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(main, "DEFAULT_WEIGHTS", tmp_path / "toy")
    image = EXAMPLES / GOLDEN[0][0]
    assert main.main(["--image", str(image)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights/README.md" in err and "train_toy" in err


# Lower bounds for the committed model on the first 10 held-out scenes of seed 1 (60 prompts), a little
# under what it measured there (full 1.00, avl 0.70; the README's 50-scene table: 1.00 and 0.72).
@pytest.mark.parametrize("policy, at_least", [("full", 0.95), ("avl", 0.65)])
def test_held_out_answers_under_policy(toy, policy, at_least):
    questions = held_out_set(seed=1, n_scenes=10)
    right = sum(is_correct(q, answer(toy, q.scene.image(), q.text, policy)) for q in questions)
    assert right / len(questions) >= at_least


def test_evaluate_command_json(capsys):
    assert evaluate_main(["--policy", "avl", "--n", "4", "--seed", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_questions"] == 24 and 0.5 <= report["accuracy"] <= 1
    assert set(report["accuracy_by_type"]) == {"colour", "shape", "count", "digit", "where", "caption"}
    assert 0.3 < report["kv_ratio"] < 0.8 and 0 < report["attended_ratio"] < 0.8


def test_evaluate_full_holds_exactly_the_dense_cache(capsys):
    assert evaluate_main(["--n", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_ratio"] == 1.0 and report["attended_ratio"] == 1.0


@pytest.mark.parametrize("argv", [["--n", "0"], ["--table", "--policy", "avl"], ["--weights", "nowhere"],
                                  ["--policy", "nope"]])
def test_evaluate_bad_input_is_one_line(capsys, argv):
    assert evaluate_main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_evaluate_bad_flag_in_a_subprocess():
    code = subprocess.run([sys.executable, "-m", "tinyavl.evaluate", "--policy", "avl", "--S", "2"],
                          capture_output=True, text=True)
    assert code.returncode == 2 and code.stderr.count("\n") == 1 and "Traceback" not in code.stderr


def test_attention_map_picture(tmp_path, capsys):
    image = EXAMPLES / GOLDEN[0][0]
    out = tmp_path / "map.png"
    assert main.main(["--image", str(image), "--policy", "avl", "--attention-map", str(out), "--json"]) == 0
    from PIL import Image
    with Image.open(out) as picture:
        assert picture.width > picture.height > 300
    assert main.main(["--image", str(image), "--attention-map", str(tmp_path / "nope" / "map.png")]) == 2
    assert main.main(["--image", str(image), "--attention-map", str(out), "--map-layer", "99"]) == 2
