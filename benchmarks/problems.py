"""The benchmark problems: data, model and loss of each, by name.

============  ==========================================================  ==========================
name          model                                                       data
============  ==========================================================  ==========================
digits-ae     64-128-64-32-8-32-64-128-64 autoencoder (ReLU, linear code  scikit-learn digits (real)
              and output), BCE-with-logits summed over pixels
digits-cnn    small CNN on 1x8x8 images, cross-entropy, test accuracy     scikit-learn digits (real)
mnist-ae      the paper's 784-1000-500-250-30-250-500-1000-784            MNIST IDX files (user's)
              autoencoder, BCE-with-logits summed over pixels
curves-ae     the CURVES 784-400-200-100-50-25-6-... autoencoder          GENERATED curves
char-lm       a small GPT (2 pre-norm blocks, width 48, tied embedding),   Python's own
              character level, cross-entropy per character; validation   pydoc_data/topics.py
              loss, steps and seconds to a target validation loss         (real English text)
============  ==========================================================  ==========================

Autoencoder losses are summed over the outputs and averaged over the batch (the paper's
convention, so the numbers are comparable in scale with its MNIST table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import charlm
from .curves import generate_curves
from .data import Split, load_digits_split, load_mnist_images

__all__ = ["CHAR_LM", "PROBLEMS", "DataOptions", "Problem", "autoencoder", "digits_cnn", "get_problem", "lm_loss"]


@dataclass(frozen=True)
class DataOptions:
    """User options that change the data of a problem.

    Attributes:
        data_dir: directory of the MNIST IDX files (``mnist-ae`` only).
        n_train, n_test: size of the training and test sets (``curves-ae``: how many curves to
            generate; ``mnist-ae``: keep the first so many images; ignored by the digits problems).
    """

    data_dir: str | None = None
    n_train: int | None = None
    n_test: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def autoencoder(widths: list[int]) -> nn.Sequential:
    """A ReLU autoencoder with the given layer widths; the code layer (the narrowest) and the
    output layer are linear."""
    code = widths.index(min(widths))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i + 1 != code and i + 1 != len(widths) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def digits_cnn() -> nn.Sequential:
    """Conv(1->16, 3x3) ReLU, Conv(16->32, 3x3) ReLU, 2x2 max-pool, Linear(512->64) ReLU,
    Linear(64->10): a small classifier for 8x8 digits (about 40k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def bce_sum(out: Tensor, target: Tensor) -> Tensor:
    """BCE with logits summed over outputs, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(out, target, reduction="sum") / out.shape[0]


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        name: its name on the command line.
        title: a one-line description (says "GENERATED" when the data are generated).
        build_model: returns a fresh model (seed torch first for a reproducible init).
        load: returns the train/test split for the user's :class:`DataOptions`.
        loss_fn: training loss ``(outputs, targets) -> scalar``.
        curvature_loss: the likelihood name for ``opt.update_curvature(out, loss=...)``.
        classifier: whether test accuracy is reported (else test loss).
        generated: whether the data are generated rather than real.
        param_groups: ``model -> param groups`` handed to every optimizer instead of
            ``model.parameters()`` (``None``: one group); the optimizer's ``weight_decay`` applies
            to groups that do not set their own.
        curvature_outputs: maps the model outputs to what ``update_curvature`` samples from
            (``None``: the outputs themselves); ``char-lm`` flattens ``(batch, time, vocab)``
            logits to ``(batch * time, vocab)``, which the mean cross-entropy does not change.
        train_eval_examples: evaluate the training loss on a fixed subset of this many training
            examples (``None``: all of them).
        target_test_loss: report the steps and seconds each run needs to reach this test
            (validation) loss, as the modded-nanogpt speedruns do (``None``: not reported).
        rank_by: the curve :mod:`benchmarks.tune` ranks settings by, ``"train_loss"`` or
            ``"test_loss"`` (final values).
        skip_methods: methods that ``--methods all`` leaves out on this problem (with the reason
            in :data:`benchmarks.settings.PROBLEM_DEFAULTS`).
        test_name: what the test split is called in tables and plots.
    """

    name: str
    title: str
    build_model: Callable[[], nn.Module]
    load: Callable[[DataOptions], Split]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    curvature_loss: str
    classifier: bool = False
    generated: bool = False
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    curvature_outputs: Callable[[Tensor], Tensor] | None = None
    train_eval_examples: int | None = None
    target_test_loss: float | None = None
    rank_by: str = "train_loss"
    skip_methods: tuple[str, ...] = ()
    test_name: str = "test"


def _digits_ae(opts: DataOptions) -> Split:
    x_tr, _, x_te, _ = load_digits_split()
    return Split(x_tr, x_tr, x_te, x_te)


def _digits_images(opts: DataOptions) -> Split:
    x_tr, y_tr, x_te, y_te = load_digits_split()
    return Split(x_tr.reshape(-1, 1, 8, 8), y_tr, x_te.reshape(-1, 1, 8, 8), y_te)


def _mnist(opts: DataOptions) -> Split:
    return load_mnist_images(opts.data_dir, limit_train=opts.n_train, limit_test=opts.n_test)


def _curves(opts: DataOptions) -> Split:
    n_train = opts.n_train or 2000
    n_test = opts.n_test or 500
    x_tr = generate_curves(n_train, seed=1)
    x_te = generate_curves(n_test, seed=2)
    return Split(x_tr, x_tr, x_te, x_te)


#: Sizes of the ``char-lm`` model and data (see :mod:`benchmarks.charlm`).
CHAR_LM = {"block": 48, "width": 48, "layers": 2, "heads": 4, "val_windows": 256}


def _char_lm_data(opts: DataOptions) -> Split:
    text = charlm.load_text()
    vocab = charlm.Vocabulary.of(text)
    codes = vocab.encode(text)
    cut = int(0.9 * codes.numel())
    x_tr, y_tr = charlm.char_windows(codes[:cut], CHAR_LM["block"], limit=opts.n_train)
    x_te, y_te = charlm.char_windows(codes[cut:], CHAR_LM["block"], limit=opts.n_test or CHAR_LM["val_windows"])
    return Split(x_tr, y_tr, x_te, y_te)


def _char_lm_model() -> nn.Module:
    vocab = charlm.Vocabulary.of(charlm.load_text())
    sizes = {k: v for k, v in CHAR_LM.items() if k != "val_windows"}
    return charlm.CharGPT(charlm.GPTConfig(vocab=vocab.size, **sizes))


def lm_loss(out: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy per position of ``(batch, time, vocab)`` logits against ``(batch, time)``
    codes."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))


def _flatten_positions(out: Tensor) -> Tensor:
    return out.reshape(-1, out.shape[-1])


#: AdamW is Adam with decoupled weight decay; the problems of the paper run Adam (no decay).
_NO_ADAMW = ("AdamW",)

PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem(
            "digits-ae", "digits autoencoder 64-128-64-32-8-32-64-128-64 (scikit-learn's real 8x8 digits)",
            lambda: autoencoder([64, 128, 64, 32, 8, 32, 64, 128, 64]), _digits_ae, bce_sum, "bce_with_logits",
            skip_methods=_NO_ADAMW,
        ),
        Problem(
            "digits-cnn", "digits CNN classifier (scikit-learn's real 8x8 digits as 1x8x8 images)",
            digits_cnn, _digits_images, F.cross_entropy, "cross_entropy", classifier=True, skip_methods=_NO_ADAMW,
        ),
        Problem(
            "mnist-ae", "MNIST autoencoder 784-1000-500-250-30-250-500-1000-784 (the paper's, IDX files)",
            lambda: autoencoder([784, 1000, 500, 250, 30, 250, 500, 1000, 784]), _mnist, bce_sum, "bce_with_logits",
            skip_methods=_NO_ADAMW,
        ),
        Problem(
            "curves-ae", "CURVES autoencoder 784-400-200-100-50-25-6-25-50-100-200-400-784 on GENERATED curves",
            lambda: autoencoder([784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]), _curves, bce_sum,
            "bce_with_logits", generated=True, skip_methods=_NO_ADAMW,
        ),
        Problem(
            "char-lm", "character-level GPT (2 blocks, width 48, context 48, tied embedding) on Python's "
            "pydoc_data/topics.py (real English text)",
            _char_lm_model, _char_lm_data, lm_loss, "cross_entropy",
            param_groups=charlm.param_groups, curvature_outputs=_flatten_positions, train_eval_examples=256,
            target_test_loss=1.7, rank_by="test_loss", skip_methods=("Adam",), test_name="validation",
        ),
    )
}


def get_problem(name: str) -> Problem:
    """The problem called ``name`` (ValueError listing the known names otherwise)."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def evaluate(model: nn.Module, problem: Problem, x: Tensor, y: Tensor, *, batch: int = 2000) -> tuple[float, float | None]:
    """Mean loss over ``(x, y)`` (per example, as in training) and, for classifiers, accuracy."""
    model.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            out = model(xb)
            total += float(problem.loss_fn(out, yb)) * xb.shape[0]
            if problem.classifier:
                correct += int((out.argmax(dim=1) == yb).sum())
    model.train()
    n = x.shape[0]
    return total / n, (correct / n if problem.classifier else None)
