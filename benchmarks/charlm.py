r"""The ``char-lm`` problem: a small GPT trained character by character on text that ships with Python.

Data
    The standard library's ``pydoc_data/topics.py`` (about 750 kB of English: the help texts of
    Python's statements and types, as the source of a Python module), read from the running
    interpreter's installation; nothing is downloaded. The vocabulary is the set of characters of
    the whole file, in code-point order. The first 90 % of the characters are the training text,
    the last 10 % the validation text (a fixed, contiguous split). Each example is a window of
    ``block`` characters and its targets are the same window shifted by one; windows are cut at
    stride ``block`` (no overlap), so one epoch sees every training character once.

Model (:class:`CharGPT`)
    A GPT in the style of GPT-2 (Radford et al., 2019) and nanoGPT: learned token and position
    embeddings, ``layers`` pre-norm blocks (LayerNorm, causal multi-head self-attention, residual;
    LayerNorm, MLP with a 4x GELU hidden layer, residual), a final LayerNorm and an output head
    tied to the token embedding (logits :math:`= h E^\top`). No biases (LayerNorms have weights
    only), so every ``nn.Linear`` is a bias-free matrix. Initialisation: normal with standard
    deviation 0.02, the residual output projections scaled by :math:`1/\sqrt{2L}` (GPT-2).

Loss
    Mean cross-entropy per character (nats). The sampled (true-Fisher) pass of curvkit's
    optimizers draws one character per position from the model's softmax (``class_dim=-1`` of
    the ``(batch, time, vocab)`` logits).

Param groups (:func:`param_groups`)
    As in AdamW training of GPTs: weight decay on the matrices of the ``nn.Linear`` layers only,
    none on LayerNorm weights and embeddings (the tied output head is the token embedding).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CharGPT", "GPTConfig", "TEXT_MODULE", "Vocabulary", "char_windows", "load_text", "param_groups"]

#: The standard-library module whose source is the corpus.
TEXT_MODULE = "pydoc_data.topics"


@lru_cache(maxsize=1)
def load_text() -> str:
    """The source text of :data:`TEXT_MODULE` from this Python installation.

    Raises:
        FileNotFoundError: if the interpreter ships without it (some minimal distributions strip
            ``pydoc_data``); nothing is downloaded.
    """
    spec = importlib.util.find_spec(TEXT_MODULE)
    origin = getattr(spec, "origin", None)
    if not origin or not Path(origin).is_file() or not origin.endswith(".py"):
        raise FileNotFoundError(
            f"char-lm trains on the source of the standard library's {TEXT_MODULE} (pydoc_data/topics.py), "
            f"which this Python installation does not have as a .py file (found {origin!r}); nothing is "
            f"downloaded: use a full CPython installation"
        )
    return Path(origin).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Vocabulary:
    """Characters and their integer codes (code-point order)."""

    chars: str

    @classmethod
    def of(cls, text: str) -> "Vocabulary":
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        table = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([table[c] for c in text], dtype=torch.long)

    def decode(self, codes: Tensor) -> str:
        return "".join(self.chars[int(i)] for i in codes.reshape(-1))


def char_windows(codes: Tensor, block: int, *, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows of ``block`` codes and their one-step-shifted targets.

    Returns ``(x, y)`` of shape ``(n, block)`` with ``y[i, t] = x[i, t + 1]`` inside a window and
    ``y[i, block - 1]`` the code after it; ``limit`` keeps the first so many windows.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    n = (codes.numel() - 1) // block
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise ValueError(f"text of {codes.numel()} characters is too short for one window of {block} + 1")
    x = codes[: n * block].reshape(n, block)
    y = codes[1 : n * block + 1].reshape(n, block)
    return x.clone(), y.clone()


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of :class:`CharGPT`.

    Attributes:
        vocab: vocabulary size.
        block: context length (characters per window).
        width: embedding width :math:`d`.
        layers: number of transformer blocks.
        heads: attention heads (``width`` must be divisible by it).
    """

    vocab: int
    block: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab", "block", "width", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")


class _Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, bias=False)
        self.attn = _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, bias=False)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.out = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """A small pre-norm GPT with the output head tied to the token embedding.

    ``forward(x)`` maps ``(batch, time)`` codes to ``(batch, time, vocab)`` logits.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.block, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.cfg.block:
            raise ValueError(f"sequence of {t} characters is longer than the model's block ({self.cfg.block})")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h) @ self.tok.weight.T  # tied output head


def param_groups(model: nn.Module) -> list[dict]:
    """AdamW-style groups: ``nn.Linear`` weights (decayed) and everything else (LayerNorm weights,
    embeddings; ``weight_decay=0``). The optimizer's own ``weight_decay`` applies to the first."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    decay = [p for p in model.parameters() if id(p) in linear]
    rest = [p for p in model.parameters() if id(p) not in linear]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]
