r"""The arithmetic floor of a step: the same work timed piece by piece with plain torch calls.

Each *piece* (:data:`PIECES`) is one kind of arithmetic a step does, on the model's shapes, timed
alone (median of ``reps`` repetitions after one untimed run; CUDA synchronised around each). Every
piece that is not itself a pass through the model is timed right after an untimed forward and
backward pass, so that it meets the caches as it does inside a training step: timed back to back,
a memory-bound piece finds its operands in cache from its previous repetition, which no training
step does (torch.optim's Adam measured 1.6x its floor that way at batch 128, its update alone 2.4x
the piece). The pieces:

``forward``
    the model and the loss (building the autograd graph).
``backward``
    ``loss.backward()`` of that graph.
``sampled_backward_params``
    draw Bernoulli targets from the model's own predictions and backpropagate the sampled
    loss's gradient in the outputs, :math:`(\sigma(z) - y)/N` in closed form, with
    ``torch.autograd.grad`` with respect to every parameter (TNT's true-Fisher evidence; what
    :func:`curvkit.fisher.sampled_output_gradient` gives the optimizers).
``sampled_backward_outputs``
    the same draw and gradient, backpropagated with respect to the layers' outputs only (all KFAC
    needs: its ``G`` factors are Grams of output gradients; no weight-gradient products).
``grams_params``
    the mode Grams of every parameter gradient folded into an EMA in place, one
    :func:`curvkit.contractions.add_gram_` (or ``addr_`` for a bias) per factor:
    :math:`S \leftarrow \beta S + (1 - \beta) G_{(i)} G_{(i)}^\top`. ``add_gram_`` is one
    ``addmm_``, or, for large factors on a CPU, three on column halves (3/4 of the
    multiply-adds of a symmetric product), as the optimizers compute them.
``grams_layers``
    KFAC's statistics: :math:`A \leftarrow \beta A + (1-\beta) a^\top a / n` of the layer inputs
    (with the homogeneous 1) and :math:`G` of the output gradients, one ``add_gram_`` each.
``grams_inputs``
    the ``A`` statistics alone (K-BFGS).
``inverse_cholesky_params`` / ``inverse_cholesky_layers``
    :math:`(S + \epsilon I)^{-1}` of every factor by ``torch.linalg.cholesky`` and
    ``torch.cholesky_inverse``, factors of the same size stacked into one batched call (power 1:
    TNT's and KFAC's inverse).
``inverse_roots_params``
    :math:`(S + \epsilon I)^{-1/(2k)}` of every factor by one batched ``torch.linalg.eigh`` per
    size and :math:`V \operatorname{diag}(\lambda^{-p}) V^\top` (Shampoo's roots).
``mode_products_params`` / ``mode_products_layers``
    the direction :math:`V_1 M V_2^\top` (``V M`` for a bias) of every parameter, or
    :math:`G^{-1} M A^{-1}` of every layer's ``(out, in + 1)`` block.
``momentum_update``
    ``torch._foreach_mul_``, ``_foreach_add_`` (momentum) and ``_foreach_add_`` (the update)
    over all parameters.
``adam_update``
    Adam's elementwise arithmetic with ``torch._foreach_*`` (``lerp_``, ``mul_``, ``addcmul_``,
    ``sqrt``, ``div_``, ``add_``, ``addcdiv_``).
``bfgs_a`` / ``bfgs_g``
    K-BFGS's per-step updates of :math:`H_a` (:math:`s = H_a \bar a`, :math:`y = A s + \mu s`)
    and :math:`H_g` (:math:`H_g y`), each folded in by the dense BFGS inverse update (three outer
    products per layer).
``lbfgs_direction``
    K-BFGS(L): :math:`H_g M H_a` with :math:`H_g` in the compact L-BFGS form of 100 pairs
    (:math:`\gamma M + U (C (U^\top M))`, :math:`U` of ``2m`` columns), plus :math:`H_g y`.

The pieces compute on random tensors of the right shapes (the passes through the model run on
the real batch): only their cost matters, and dense kernels cost the same whatever the values.

A *recipe* (:data:`RECIPES`) lists the pieces of a method with their cadence: every step,
every statistics step (divided by :math:`T_1`) or every inversion (divided by :math:`T_2`).
The floor of a method at a schedule is :math:`\sum` piece time x count / cadence
(:func:`floor_breakdown`). It is the cost of the method's arithmetic done by plain torch calls,
with no bookkeeping, no host synchronisation, no copies and no warm-up inversions: a lower bound
an implementation can approach, not one it can beat by much.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from curvkit.contractions import add_gram_

from ..problems import bce_sum

__all__ = [
    "EVERY",
    "INVERSE",
    "PIECES",
    "RECIPES",
    "STATS",
    "floor_breakdown",
    "floor_ms",
    "measure_pieces",
]

#: Cadences of a recipe entry.
EVERY, STATS, INVERSE = "step", "statistics", "inversion"
#: Every piece :func:`measure_pieces` times, in order.
PIECES: tuple[str, ...] = (
    "forward", "backward", "sampled_backward_params", "sampled_backward_outputs",
    "grams_params", "grams_layers", "grams_inputs",
    "inverse_cholesky_params", "inverse_cholesky_layers", "inverse_roots_params",
    "mode_products_params", "mode_products_layers",
    "momentum_update", "adam_update", "bfgs_a", "bfgs_g", "lbfgs_direction",
)
_FB = (("forward", EVERY, 1), ("backward", EVERY, 1))
#: ``recipe -> ((piece, cadence, count), ...)``.
RECIPES: dict[str, tuple[tuple[str, str, int], ...]] = {
    "sgd": (*_FB, ("momentum_update", EVERY, 1)),
    "adam": (*_FB, ("adam_update", EVERY, 1)),
    "tnt": (*_FB, ("sampled_backward_params", STATS, 1), ("grams_params", STATS, 1),
            ("inverse_cholesky_params", INVERSE, 1), ("mode_products_params", EVERY, 1),
            ("momentum_update", EVERY, 1)),
    "tnt_empirical": (*_FB, ("grams_params", STATS, 1), ("inverse_cholesky_params", INVERSE, 1),
                      ("mode_products_params", EVERY, 1), ("momentum_update", EVERY, 1)),
    "shampoo": (*_FB, ("grams_params", STATS, 1), ("inverse_roots_params", INVERSE, 1),
                ("mode_products_params", EVERY, 1), ("momentum_update", EVERY, 1)),
    "kfac": (*_FB, ("sampled_backward_outputs", STATS, 1), ("grams_layers", STATS, 1),
             ("inverse_cholesky_layers", INVERSE, 1), ("mode_products_layers", EVERY, 1),
             ("momentum_update", EVERY, 1)),
    "kbfgs": (("forward", EVERY, 2), ("backward", EVERY, 2), ("grams_inputs", STATS, 1), ("bfgs_a", EVERY, 1),
              ("bfgs_g", EVERY, 1), ("mode_products_layers", EVERY, 1), ("momentum_update", EVERY, 1)),
    "kbfgs_l": (("forward", EVERY, 2), ("backward", EVERY, 2), ("grams_inputs", STATS, 1), ("bfgs_a", EVERY, 1),
                ("lbfgs_direction", EVERY, 1), ("momentum_update", EVERY, 1)),
}
_LBFGS_MEMORY = 100


def floor_breakdown(recipe: str, schedule: tuple[int, int] | None, pieces: Mapping[str, float]) -> dict[str, float]:
    """Milliseconds per step each piece of ``recipe`` contributes at ``schedule``.

    A piece done every step counts fully, a statistics piece ``1 / T1``, an inversion piece
    ``1 / T2``, each times its count (K-BFGS's two forward and backward passes). ``schedule=None``
    (a method's own schedule) is :math:`(1, 1)`.

    Raises:
        ValueError: for an unknown recipe, a bad schedule or a missing piece.
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    t1, t2 = schedule if schedule is not None else (1, 1)
    for name, value in (("T1", t1), ("T2", t2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"schedule {name} must be an integer >= 1, got {value!r}")
    out: dict[str, float] = {}
    for piece, cadence, count in RECIPES[recipe]:
        if piece not in pieces:
            raise ValueError(f"recipe {recipe!r} needs piece {piece!r}, which was not measured")
        divisor = {EVERY: 1, STATS: t1, INVERSE: t2}[cadence]
        out[piece] = out.get(piece, 0.0) + pieces[piece] * count / divisor
    return out


def floor_ms(recipe: str, schedule: tuple[int, int] | None, pieces: Mapping[str, float]) -> float:
    """The floor of ``recipe`` at ``schedule``: the sum of :func:`floor_breakdown`."""
    return sum(floor_breakdown(recipe, schedule, pieces).values())


# ------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(run: Callable[[Any], Any], prepare: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median milliseconds of ``run(prepare())`` over ``reps`` runs, after one untimed run."""
    times = []
    for i in range(reps + 1):
        arg = prepare()
        _sync(device)
        start = time.perf_counter()
        run(arg)
        _sync(device)
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


def _linear_forward(model: nn.Sequential, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Forward through ``model`` keeping each Linear layer's input and output."""
    inputs, outputs = [], []
    h = x
    for layer in model:
        if isinstance(layer, nn.Linear):
            inputs.append(h)
            h = layer(h)
            outputs.append(h)
        else:
            h = layer(h)
    return h, inputs, outputs


def _sampled_seed(out: Tensor) -> Tensor:
    """The sampled BCE loss's gradient in the outputs, :math:`(\\sigma(z) - y) / N` with
    :math:`y \\sim \\mathrm{Bernoulli}(\\sigma(z))` (what the optimizers backpropagate, in closed form)."""
    with torch.no_grad():
        probs = torch.sigmoid(out)
        target = (torch.rand_like(probs) < probs).to(probs.dtype)
        return (probs - target) / out.shape[0]


def _stack_by_size(sizes: Sequence[int], device: torch.device, dtype: torch.dtype) -> dict[int, Tensor]:
    """One batch of SPD ``(b, d, d)`` matrices per distinct size (Grams of random data)."""
    counts: dict[int, int] = {}
    for d in sizes:
        counts[d] = counts.get(d, 0) + 1
    out = {}
    gen = torch.Generator().manual_seed(1)
    for d, b in counts.items():
        r = torch.randn(b, d, d + 8, generator=gen, dtype=dtype).to(device)
        out[d] = r @ r.mT / (d + 8)
    return out


def measure_pieces(model: nn.Sequential, x: Tensor, y: Tensor, *, reps: int = 5,
                   progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Time every piece of :data:`PIECES` on ``model``'s shapes and the batch ``(x, y)``.

    Returns:
        ``{piece: median milliseconds}``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    device, dtype = x.device, x.dtype
    params = [p for p in model.parameters()]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    shapes = [(m.out_features, m.in_features) for m in linears]
    n = x.shape[0]
    beta = 0.9
    gen = torch.Generator().manual_seed(2)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    results: dict[str, float] = {}

    def record(name: str, run: Callable[[Any], Any], prepare: Callable[[], Any] | None = None) -> None:
        if progress is not None:
            progress(name)
        results[name] = _time(run, after_pass if prepare is None else prepare, reps, device)

    def after_pass() -> None:
        # a training step's pass through the model before the piece (untimed), so the piece
        # meets the caches as it would in training, not warm from its own previous repetition
        bce_sum(model(x), y).backward()
        clear_grads()

    def clear_grads() -> None:
        for p in params:
            p.grad = None

    # --- passes through the model
    record("forward", lambda _: bce_sum(model(x), y), clear_grads)

    def fresh_loss() -> Tensor:
        clear_grads()
        return bce_sum(model(x), y)

    record("backward", lambda loss: loss.backward(), fresh_loss)
    record("sampled_backward_params",
           lambda out: torch.autograd.grad(out, params, _sampled_seed(out), retain_graph=True), lambda: model(x))
    record("sampled_backward_outputs",
           lambda f: torch.autograd.grad(f[0], f[2], _sampled_seed(f[0]), retain_graph=True), lambda: _linear_forward(model, x))
    clear_grads()

    # --- statistics (each piece below runs after an untimed pass through the model: after_pass)
    grads = [rand(*p.shape) for p in params]
    grams = []
    for g in grads:
        if g.dim() == 2:
            grams.append((g, rand(g.shape[0], g.shape[0]), rand(g.shape[1], g.shape[1])))
        else:
            grams.append((g, rand(g.shape[0], g.shape[0]), None))

    def param_grams(_: Any) -> None:
        for g, s_out, s_in in grams:
            if s_in is None:
                s_out.mul_(beta).addr_(g, g, alpha=1 - beta)
            else:
                add_gram_(s_out, g.T, alpha=1 - beta, beta=beta)
                add_gram_(s_in, g, alpha=1 - beta, beta=beta)

    record("grams_params", param_grams)
    with torch.no_grad():
        _, acts, _ = _linear_forward(model, x)
    acts = [torch.cat([a.detach(), torch.ones(n, 1, dtype=dtype, device=device)], 1) for a in acts]
    outgrads = [rand(n, o) for o, _ in shapes]
    a_stats = [rand(i + 1, i + 1) for _, i in shapes]
    g_stats = [rand(o, o) for o, _ in shapes]

    def layer_grams(with_g: bool) -> Callable[[Any], None]:
        def run(_: Any) -> None:
            for a, s in zip(acts, a_stats):
                add_gram_(s, a, alpha=(1 - beta) / n, beta=beta)
            if with_g:
                for g, s in zip(outgrads, g_stats):
                    add_gram_(s, g, alpha=(1 - beta) * n, beta=beta)
        return run

    record("grams_layers", layer_grams(True))
    record("grams_inputs", layer_grams(False))

    # --- inverses, same-size factors batched
    param_sizes = [d for p in params for d in p.shape]
    layer_sizes = [d for o, i in shapes for d in (o, i + 1)]
    eps = 0.1

    def chol_inverse(stacks: dict[int, Tensor]) -> Callable[[Any], None]:
        def run(_: Any) -> None:
            for d, s in stacks.items():
                eye = torch.eye(d, dtype=dtype, device=device)
                torch.cholesky_inverse(torch.linalg.cholesky(s + eps * eye))
        return run

    p_stacks = _stack_by_size(param_sizes, device, dtype)
    l_stacks = _stack_by_size(layer_sizes, device, dtype)
    record("inverse_cholesky_params", chol_inverse(p_stacks))
    record("inverse_cholesky_layers", chol_inverse(l_stacks))
    # Shampoo's power -1/(2k): k = 2 for a weight's modes, 1 for a bias
    orders: dict[int, list[int]] = {}
    for p in params:
        for d in p.shape:
            orders.setdefault(d, []).append(p.dim())
    powers = {d: torch.tensor([-1.0 / (2 * k) for k in ks], dtype=dtype, device=device) for d, ks in orders.items()}

    def roots(_: Any) -> None:
        for d, s in p_stacks.items():
            eye = torch.eye(d, dtype=dtype, device=device)
            w, v = torch.linalg.eigh(s + eps * eye)
            scale = w.clamp_min(eps).pow(powers[d].unsqueeze(-1))
            (v * scale.unsqueeze(-2)) @ v.mT

    record("inverse_roots_params", roots)

    # --- directions
    prods = []
    for p, g in zip(params, grads):
        if g.dim() == 2:
            prods.append((g, rand(g.shape[0], g.shape[0]), rand(g.shape[1], g.shape[1])))
        else:
            prods.append((g, rand(g.shape[0], g.shape[0]), None))

    def param_products(_: Any) -> None:
        for m, v_out, v_in in prods:
            (v_out @ m @ v_in) if v_in is not None else v_out @ m

    record("mode_products_params", param_products)
    blocks = [(rand(o, i + 1), rand(o, o), rand(i + 1, i + 1)) for o, i in shapes]

    def layer_products(_: Any) -> None:
        for m, h_g, h_a in blocks:
            h_g @ m @ h_a

    record("mode_products_layers", layer_products)

    # --- elementwise
    weights = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(w) for w in weights]
    second = [torch.zeros_like(w) for w in weights]

    def momentum(_: Any) -> None:
        torch._foreach_mul_(bufs, 0.9)
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(weights, bufs, alpha=-1e-4)

    def adam(_: Any) -> None:
        torch._foreach_lerp_(bufs, grads, 0.1)
        torch._foreach_mul_(second, 0.999)
        torch._foreach_addcmul_(second, grads, grads, value=0.001)
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, math.sqrt(0.5))
        torch._foreach_add_(denom, 1e-8)
        torch._foreach_addcdiv_(weights, bufs, denom, value=-1e-3)

    record("momentum_update", momentum)
    record("adam_update", adam)

    # --- K-BFGS
    def bfgs(h: Tensor, s: Tensor, y_vec: Tensor, hy: Tensor) -> Tensor:
        rho = 1.0 / (y_vec @ s)
        c = rho + rho * rho * (y_vec @ hy)
        return h - rho * (torch.outer(s, hy) + torch.outer(hy, s)) + c * torch.outer(s, s)

    ha = [(torch.eye(i + 1, dtype=dtype, device=device), s, a.mean(0)) for (_, i), s, a in zip(shapes, a_stats, acts)]
    hg = [(torch.eye(o, dtype=dtype, device=device), rand(o), rand(o)) for o, _ in shapes]

    def bfgs_a(_: Any) -> None:
        for h, a_mat, abar in ha:
            s = h @ abar
            yv = a_mat @ s + 0.5 * s
            bfgs(h, s, yv, h @ yv)

    def bfgs_g(_: Any) -> None:
        for h, s, yv in hg:
            bfgs(h, s, yv, h @ yv)

    record("bfgs_a", bfgs_a)
    record("bfgs_g", bfgs_g)
    mem = _LBFGS_MEMORY
    lb = [(rand(mem, o), rand(mem, o), rand(o), m, h_a) for (o, _), (m, _, h_a) in zip(shapes, blocks)]

    def lbfgs(_: Any) -> None:
        for s_pairs, y_pairs, yv, m, h_a in lb:
            sy = s_pairs @ y_pairs.T
            core = torch.linalg.solve_triangular(torch.triu(sy) + mem * torch.eye(mem, dtype=dtype, device=device),
                                                 torch.eye(mem, dtype=dtype, device=device), upper=True)
            u = torch.cat([s_pairs, y_pairs]).T  # (out, 2m)
            c = torch.block_diag(core, core)
            (m + u @ (c @ (u.T @ m))) @ h_a
            yv + u @ (c @ (u.T @ yv))

    record("lbfgs_direction", lbfgs)
    return results
