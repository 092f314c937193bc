"""Shared pytest set-up.

Triton reads TRITON_INTERPRET when `kernels.sparse_attention` is first imported, so it is set here,
before any test module imports it: without a GPU the kernel runs in Triton's CPU interpreter
(numpy), with a GPU the tests exercise the real compiled kernel.
"""
import os

import pytest
import torch
from PIL import ImageDraw

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The session fixture of tiny random llava-hf checkpoints, for every test module.
from tiny_checkpoints import tiny_ckpt  # noqa: E402,F401


@pytest.fixture
def drawn_text(monkeypatch):
    """Every line of text PIL draws from here on, as (xy, text, its width in pixels): where a picture's labels
    went, to compare with positions worked out by hand."""
    lines, draw_text = [], ImageDraw.ImageDraw.text

    def recorded(self, xy, text, *args, **kwargs):
        lines.append((xy, text, self.textlength(text, font=kwargs.get("font"))))
        return draw_text(self, xy, text, *args, **kwargs)
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", recorded)
    return lines
