"""A tiny Llama-style tokenizer.json for tests, built in a fraction of a second.

It has the same structure as the tokenizer.json of llava-hf/llava-1.5-7b-hf, only with a few hundred
tokens instead of 32002:
- ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`; ids 3..258 are the byte tokens `<0x00>`..`<0xFF>`, so any
  character outside the vocabulary (a newline, an emoji) still encodes, as bytes (BPE byte_fallback);
- the normalizer turns spaces into "▁" and prepends one "▁" to every chunk of text between special
  tokens (the legacy SentencePiece behaviour LLaVA-1.5 was trained with);
- a TemplateProcessing post-processor adds `<s>` in front; the decoder turns "▁" back into spaces;
- `<image>` and `<pad>` are special tokens appended after the vocabulary (32000 and 32001 in llava-hf).

The merges are learned with the `tokenizers` BPE trainer on the small corpus below, so common words
("image", "colour") are single tokens and prompts stay short.
"""
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CORPUS = [
    "What is in the image?",
    "What is shown in this picture?",
    "Describe the image in one sentence.",
    "Describe the picture in detail.",
    "What colour is the square?",
    "What colour is the circle on the left?",
    "How many shapes are there in the image?",
    "How many circles can you see?",
    "Is there a triangle in the picture?",
    "Where is the red square?",
    "Which shape is the largest?",
    "The image shows a red circle and a blue square.",
    "There is a green triangle on the right.",
    "A yellow star is in the top left corner.",
    "The square is blue and the circle is red.",
    "There are three shapes: a circle, a square and a triangle.",
    "The background is white.",
    "The background is black and the shapes are bright.",
    "A small purple circle sits next to a large orange square.",
    "Two green squares are above one blue circle.",
    "The picture is a photo of a cat on a sofa.",
    "A dog is running on the grass in the park.",
    "The sky is blue and the sun is yellow.",
    "There is a white cloud over the green hill.",
    "The red ball is under the table.",
    "Yes, there is a triangle.",
    "No, there is no circle in the image.",
    "The answer is two.",
    "The answer is red.",
    "I see four shapes in the image.",
    "The colour of the star is yellow.",
    "The shapes are small, medium and large.",
    "USER: What is in the image? ASSISTANT: A red circle.",
    "USER: Describe the picture. ASSISTANT: A blue square on a white background.",
    "USER: How many shapes? ASSISTANT: There are three shapes.",
    "Please answer with one word.",
    "Look at the image and answer the question.",
    "The top row has a circle, the bottom row has a square.",
]
SPECIAL = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
MODEL_VOCAB = 448  # specials + bytes + characters + merges; then <image> = 448, <pad> = 449


def _learn_bpe():
    """Vocab and merges of a BPE trained on CORPUS, with the Llama id layout (specials, then bytes)."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Train on words (split before each "▁") so no merge spans two words, as in SentencePiece.
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    # Listing the specials and bytes first gives them ids 0..258 in the learned vocab.
    trainer = trainers.BpeTrainer(vocab_size=MODEL_VOCAB, special_tokens=SPECIAL + BYTES, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    assert len(learned["vocab"]) == MODEL_VOCAB
    assert all(learned["vocab"][t] == i for i, t in enumerate(SPECIAL + BYTES))
    return learned["vocab"], [tuple(m) for m in learned["merges"]]


def build_tiny_tokenizer() -> Tokenizer:
    """The tokenizer in memory: learned BPE + the llava-hf normalizer, post-processor, decoder, specials."""
    vocab, merges = _learn_bpe()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    # The three specials exist in the vocab already; <image> and <pad> get the next free ids.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL + ["<image>", "<pad>"]])
    return tok


def write_tiny_tokenizer(folder) -> dict:
    """Write folder/tokenizer.json; return the ids a tiny LLaVA config needs."""
    tok = build_tiny_tokenizer()
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    return dict(vocab_size=tok.get_vocab_size(), image_token_id=tok.token_to_id("<image>"),
                pad_token_id=tok.token_to_id("<pad>"), bos_token_id=1, eos_token_id=2)
