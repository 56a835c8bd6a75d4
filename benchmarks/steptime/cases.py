r"""The measured cases: the model, the data, and how every method is built and stepped.

Model: the TNT paper's MNIST autoencoder, widths 784-1000-500-250-30-250-500-1000-784 (ReLU,
linear code and output layer), loss BCE-with-logits summed over the 784 pixels and averaged over
the batch (:func:`benchmarks.problems.bce_sum`), on random data (pixels uniform in [0, 1], the
targets are the inputs). ``--quick`` uses a 64-32-8-32-64 autoencoder of the same form.

Cases (:class:`Case`):

* every curvkit preset in the registry (``curvkit.available("method")``), plus TNT with
  ``evidence="empirical"``, at each schedule :math:`(T_1, T_2)` = (``curvature_every``,
  ``invert_every``), the paper's (1, 20) and (10, 100) by default, with the
  ``mnist-ae`` settings of :mod:`benchmarks.settings` (learning rates and dampings do not change
  the arithmetic of a step). K-BFGS and K-BFGS(L) have their own schedule and are measured once
  with their presets' (statistics and BFGS pairs every step, one extra forward and backward per
  step through the closure);
* :class:`torch.optim.Adam` and :class:`torch.optim.SGD` (momentum 0.9), both with torch's
  default ``foreach`` implementation;
* peers, when installed (the optional ``peers`` extra): ASDL (``pip install asdfghjkl``) K-FAC
  with Monte-Carlo-sampled targets, Shampoo and K-BFGS, each driving a :class:`torch.optim.SGD`
  with momentum 0.9; heavyball's SOAP (eager: heavyball's ``torch.compile`` is switched off so
  that its compile time does not count and the comparison is eager against eager);
  :class:`torch.optim.Muon` on the weight matrices with Adam on the biases; Distributed Shampoo
  (facebookresearch/optimizers, the ``distributed_shampoo`` package, not on PyPI: install it from
  a clone) at each schedule with :math:`T_1 = 1`, configured for Shampoo's work here: factor EMA
  0.9, :math:`\epsilon` 3e-4, roots :math:`-1/(2k)` by ``eigh`` every :math:`T_2` steps, no
  grafting, no blocking.

Every step is the training step of :mod:`benchmarks.runner`: forward, loss, ``zero_grad``,
``update_curvature`` (curvkit; a no-op unless sampled statistics are due), ``backward``,
``step`` (with a closure for K-BFGS).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memory import state_bytes
from ..problems import autoencoder, bce_sum

__all__ = [
    "MNIST_WIDTHS",
    "OWN_SCHEDULE",
    "PAPER_SCHEDULES",
    "QUICK_SCHEDULES",
    "QUICK_WIDTHS",
    "RECIPE_OF",
    "Case",
    "Stepper",
    "build_model",
    "build_stepper",
    "discover_cases",
    "make_data",
    "measurement_window",
    "peers_installed",
]

#: The paper's MNIST autoencoder.
MNIST_WIDTHS: tuple[int, ...] = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
#: The ``--quick`` autoencoder.
QUICK_WIDTHS: tuple[int, ...] = (64, 32, 8, 32, 64)
#: The paper's schedules :math:`(T_1, T_2)`: MNIST autoencoder (1, 20) and CNN (10, 100).
PAPER_SCHEDULES: tuple[tuple[int, int], ...] = ((1, 20), (10, 100))
#: The ``--quick`` schedules.
QUICK_SCHEDULES: tuple[tuple[int, int], ...] = ((1, 2), (2, 4))
#: Methods measured once at their own schedule, and why.
OWN_SCHEDULE: dict[str, str] = {
    "KBFGS": "K-BFGS updates A and the BFGS pairs every step (one extra forward and backward "
    "through the closure); H_a is inverted exactly once, so there is no T2",
    "KBFGS_L": "as K-BFGS, with H_g the L-BFGS operator of the last 100 pairs (the warm-up covers "
    "100 steps so that the memory is full)",
    "SOAP": "SOAP updates its Shampoo statistics every step and refreshes the eigenbasis every "
    "precondition_frequency steps (10, the paper's default); it has no separate T1",
    "Muon": "Muon keeps no curvature statistics and inverts nothing: one Newton-Schulz "
    "orthogonalisation per step",
}
#: The floor recipe (see :mod:`benchmarks.steptime.floor`) of each method and peer.
RECIPE_OF: dict[str, str] = {
    "SGD-m": "sgd",
    "Adam": "adam",
    "TNT": "tnt",
    "TNT-empirical": "tnt_empirical",
    "KFAC": "kfac",
    "Shampoo": "shampoo",
    "KBFGS": "kbfgs",
    "KBFGS_L": "kbfgs_l",
    "ASDL KFAC": "kfac",
    "ASDL Shampoo": "shampoo",
    "ASDL KBFGS": "kbfgs",
    "Distributed Shampoo": "shampoo",
}
_ORDER = ("SGD-m", "Adam", "TNT", "TNT-empirical", "KFAC", "Shampoo", "KBFGS", "KBFGS_L")
#: Settings of the peers (lr, damping as in the paper's MNIST table; they do not change the cost).
_ASDL = {
    "ASDL KFAC": ("KFAC", {"lr": 3e-3, "damping": 0.3}),
    "ASDL Shampoo": ("Shampoo", {"lr": 3e-4, "damping": 3e-4}),
    "ASDL KBFGS": ("KBFGS", {"lr": 0.03, "damping": 0.3}),
}


def build_model(widths: Sequence[int]) -> nn.Sequential:
    """The ReLU autoencoder with these widths (linear code and output layers)."""
    return autoencoder(list(widths))


def make_data(widths: Sequence[int], batch: int, *, device: torch.device | str = "cpu",
              seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random batch: pixels uniform in [0, 1]; the targets are the inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, widths[0], generator=gen).to(device)
    return x, x.clone()


def measurement_window(case: "Case", *, quick: bool = False, periods: int = 1) -> tuple[int, int]:
    """``(warmup, steps)`` of a case: the steps excluded, then the steps averaged.

    The warm-up is the first 21 steps, longer where the method's own warm-up is longer: curvkit
    inverts on every statistics step while :math:`t < T_2`, so the warm-up covers :math:`T_2 + 1`
    steps, and K-BFGS(L) needs 100 steps to fill its memory. The measured window is ``periods``
    whole inversion periods (at least 20 steps, ``--quick``: at least 4), so an inversion is
    included once per :math:`T_2` steps: amortised.
    """
    if periods < 1:
        raise ValueError(f"periods must be >= 1, got {periods}")
    floor_steps = 4 if quick else 20
    t2 = case.schedule[1] if case.schedule is not None else 1
    warmup = max(3 if quick else 21, t2 + 1)
    if case.name == "KBFGS_L" and not quick:
        warmup = max(warmup, 101)
    steps = t2 * periods
    while steps < floor_steps:
        steps += t2
    return warmup, steps


@dataclass(frozen=True)
class Case:
    """One measured configuration.

    Attributes:
        name: the method (``"TNT"``, ``"Adam"``, ``"ASDL KFAC"``, ...).
        kind: ``"curvkit"``, ``"baseline"`` (torch.optim) or ``"peer"``.
        schedule: :math:`(T_1, T_2)`, or ``None`` for a method's own schedule.
        origin: where the method comes from.
        peer_of: for a peer, the curvkit method it implements too (the ``x peer`` column).
    """

    name: str
    kind: str
    schedule: tuple[int, int] | None
    origin: str
    peer_of: str | None = None

    @property
    def label(self) -> str:
        """``"TNT (1,20)"``; methods at their own schedule get no suffix."""
        if self.schedule is None:
            return self.name
        return f"{self.name} ({self.schedule[0]},{self.schedule[1]})"

    @property
    def recipe(self) -> str | None:
        """The floor recipe, or ``None`` if this method has none."""
        return RECIPE_OF.get(self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "schedule": list(self.schedule) if self.schedule else None,
                "origin": self.origin, "peer_of": self.peer_of, "label": self.label, "recipe": self.recipe}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Case":
        sched = d.get("schedule")
        return cls(d["name"], d["kind"], tuple(sched) if sched else None, d["origin"], d.get("peer_of"))


def peers_installed() -> dict[str, bool]:
    """Which peer implementations this environment has."""
    return {
        "ASDL": importlib.util.find_spec("asdl") is not None,
        "heavyball": importlib.util.find_spec("heavyball") is not None,
        "torch.optim.Muon": hasattr(torch.optim, "Muon"),
        "Distributed Shampoo": importlib.util.find_spec("distributed_shampoo") is not None,
    }


def discover_cases(schedules: Sequence[tuple[int, int]], *, peers: bool = True) -> tuple[list[Case], list[str], list[str]]:
    """Every case this environment can measure.

    Returns:
        ``(cases, notes, not_installed)``: notes about plugins that failed to load, and the
        peers (and first-party curvkit methods) that are not installed.
    """
    import curvkit

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered = curvkit.available("method")["method"]
    notes.extend(str(w.message) for w in caught if "plugin" in str(w.message))
    names = dict(registered)
    if "TNT" in names:
        names["TNT-empirical"] = f"{names['TNT']} (evidence='empirical')"
    order = [n for n in _ORDER if n in names] + sorted(n for n in names if n not in _ORDER)
    cases = [Case("SGD-m", "baseline", None, "torch.optim.SGD (momentum 0.9, foreach)"),
             Case("Adam", "baseline", None, "torch.optim.Adam (foreach)")]
    for name in order:
        if name in ("SGD-m", "Adam"):
            continue
        if name in OWN_SCHEDULE:
            cases.append(Case(name, "curvkit", None, names[name]))
        else:
            cases.extend(Case(name, "curvkit", tuple(s), names[name]) for s in schedules)
    not_installed = [n for n in ("KFAC", "Shampoo", "KBFGS", "KBFGS_L") if n not in names]
    if peers:
        have = peers_installed()
        if have["ASDL"]:
            for peer, (of, _) in _ASDL.items():
                if of == "KBFGS":
                    cases.append(Case(peer, "peer", None, "asdfghjkl (ASDL) KronBfgsGradientMaker + SGD", of))
                else:
                    maker = "KfacGradientMaker (fisher_mc)" if of == "KFAC" else "ShampooGradientMaker"
                    cases.extend(Case(peer, "peer", tuple(s), f"asdfghjkl (ASDL) {maker} + SGD", of)
                                 for s in schedules)
        else:
            not_installed.append("ASDL (pip install asdfghjkl)")
        if have["heavyball"]:
            for t2 in sorted({s[1] for s in schedules}):
                cases.append(Case("heavyball SOAP", "peer", (1, t2),
                                  f"heavyball.SOAP (precondition_frequency={t2}, eager)"))
        else:
            not_installed.append("heavyball (pip install heavyball)")
        if have["Distributed Shampoo"]:  # it updates its factors at every step: T1 = 1 only
            cases.extend(Case("Distributed Shampoo", "peer", tuple(s), "facebookresearch/optimizers DistributedShampoo "
                              f"(eigh roots every {s[1]} steps, no grafting)", "Shampoo") for s in schedules if s[0] == 1)
        else:
            not_installed.append("Distributed Shampoo (facebookresearch/optimizers, from a clone)")
        if have["torch.optim.Muon"]:
            cases.append(Case("torch Muon", "peer", None, "torch.optim.Muon on weight matrices + Adam on biases"))
        else:
            not_installed.append("torch.optim.Muon (torch >= 2.9)")
    return cases, notes, not_installed


# ------------------------------------------------------------------------------ stepping
@dataclass
class Stepper:
    """A ready optimizer: ``step()`` runs one training step and returns the (detached) loss;
    ``state_bytes()`` the bytes of the tensors of its state."""

    step: Callable[[], Tensor]
    state_bytes: Callable[[], int]
    note: str = ""


def _asdl_loss(out: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """:func:`bce_sum` with the ``reduction`` keyword ASDL requires (``"sum"``: over the batch too)."""
    total = F.binary_cross_entropy_with_logits(out, target, reduction="sum")
    return total if reduction == "sum" else total / out.shape[0]


def _SKIP_ATTR(key: str) -> bool:
    """Attributes that hold parameters, the batch, outputs or the loss, not optimizer state."""
    return key == "_parameters" or any(part in key for part in ("model_", "loss", "args", "output"))


def _reachable_bytes(roots: Sequence[Any], exclude: set[int], depth: int = 6) -> int:
    """Bytes of the distinct tensors reachable from ``roots`` through dicts, sequences and object
    attributes (``exclude``: ids of tensors not to count, e.g. parameters and gradients)."""
    seen: set[int] = set()
    total = 0
    stack = [(r, 0) for r in roots]
    visited: set[int] = set()
    while stack:
        obj, d = stack.pop()
        if isinstance(obj, Tensor):
            if id(obj) not in exclude and id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
            continue
        if d >= depth or id(obj) in visited or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        visited.add(id(obj))
        if isinstance(obj, dict):
            stack.extend((v, d + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend((v, d + 1) for v in obj)
        elif hasattr(obj, "__dict__") and not callable(obj) or isinstance(obj, nn.Module):
            stack.extend((v, d + 1) for k, v in vars(obj).items() if not _SKIP_ATTR(k))
    return total


def build_stepper(case: Case, model: nn.Module, x: Tensor, y: Tensor) -> Stepper:
    """Build the optimizer of ``case`` for ``model`` and return its :class:`Stepper`."""
    if case.kind == "baseline":
        cls = torch.optim.Adam if case.name == "Adam" else torch.optim.SGD
        kw: dict[str, Any] = {"lr": 1e-3} if case.name == "Adam" else {"lr": 0.01, "momentum": 0.9}
        return _plain(model, [cls(model.parameters(), **kw)], x, y)
    if case.kind == "curvkit":
        return _curvkit(case, model, x, y)
    if case.name in _ASDL:
        return _asdl(case, model, x, y)
    if case.name == "heavyball SOAP":
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # eager: no compile time, no autotuning in the timings
        t2 = case.schedule[1] if case.schedule else 20
        opt = heavyball.SOAP(model.parameters(), lr=3e-3, precondition_frequency=t2, use_precond_schedule=False)
        return _plain(model, [opt], x, y, note="heavyball eager (compile_mode=None)")
    if case.name == "Distributed Shampoo":
        return _distributed_shampoo(case, model, x, y)
    if case.name == "torch Muon":
        mats = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        return _plain(model, [torch.optim.Muon(mats, lr=0.02), torch.optim.Adam(rest, lr=1e-3)], x, y)
    raise ValueError(f"unknown case {case.name!r}")


def _plain(model: nn.Module, opts: list[torch.optim.Optimizer], x: Tensor, y: Tensor, note: str = "") -> Stepper:
    def step() -> Tensor:
        loss = bce_sum(model(x), y)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        return loss.detach()

    return Stepper(step, lambda: sum(state_bytes(o.state_dict()) for o in opts), note)


def _curvkit(case: Case, model: nn.Module, x: Tensor, y: Tensor) -> Stepper:
    import curvkit

    from ..settings import settings_for

    name = "TNT" if case.name == "TNT-empirical" else case.name
    kwargs = dict(settings_for("mnist-ae", case.name).kwargs)
    if case.name == "TNT-empirical":
        kwargs["evidence"] = "empirical"
    if case.schedule is not None:
        kwargs["curvature_every"], kwargs["invert_every"] = case.schedule
    preset = curvkit.get("method", name)
    opt = preset(model.parameters(), model=model, **kwargs)
    needs_closure = bool(getattr(opt, "needs_closure", False))

    def closure() -> Tensor:
        opt.zero_grad()
        value = bce_sum(model(x), y)
        value.backward()
        return value

    def step() -> Tensor:
        out = model(x)
        loss = bce_sum(out, y)
        opt.zero_grad()
        opt.update_curvature(out, loss="bce_with_logits")
        loss.backward()
        opt.step(closure if needs_closure else None)
        return loss.detach()

    return Stepper(step, lambda: state_bytes(opt.state_dict()), f"settings {kwargs}")


def _distributed_shampoo(case: Case, model: nn.Module, x: Tensor, y: Tensor) -> Stepper:
    r"""Distributed Shampoo doing Shampoo's work of the ``mnist-ae`` settings: per-mode factor
    EMAs (decay 0.9) updated every step, damped inverse roots :math:`(L + \epsilon I)^{-1/(2k)}`
    by ``eigh`` every :math:`T_2` steps (its default root solver and exponent), the gradient's
    EMA (0.9) as momentum, no grafting, no blocking below 4,096, no bias correction."""
    from distributed_shampoo import DistributedShampoo

    from ..settings import settings_for

    kw = settings_for("mnist-ae", "Shampoo").kwargs
    t2 = case.schedule[1] if case.schedule is not None else 20
    opt = DistributedShampoo(model.parameters(), lr=kw["lr"], betas=(0.9, 0.9), epsilon=kw["damping"],
                             max_preconditioner_dim=4096, precondition_frequency=t2, start_preconditioning_step=t2,
                             use_bias_correction=False, grafting_config=None)
    return _plain(model, [opt], x, y, note=f"DistributedShampoo(precondition_frequency={t2})")


def _nvtx_no_op() -> None:
    """ASDL marks NVTX ranges, which raise in a CPU build of torch: make them no-ops there."""
    from torch.cuda import nvtx

    try:
        nvtx.range_push("curvkit-steptime")
        nvtx.range_pop()
    except (RuntimeError, AttributeError):
        nvtx.range_push = lambda msg: 0  # type: ignore[assignment]
        nvtx.range_pop = lambda: 0  # type: ignore[assignment]


def _asdl(case: Case, model: nn.Module, x: Tensor, y: Tensor) -> Stepper:
    import asdl

    of, kw = _ASDL[case.name]
    _nvtx_no_op()
    t1, t2 = case.schedule if case.schedule is not None else (1, 1)
    config = asdl.PreconditioningConfig(data_size=x.shape[0], damping=kw["damping"], curvature_upd_interval=t1,
                                        preconditioner_upd_interval=t2, ema_decay=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if of == "KFAC":
            # ASDL samples MC targets for "cross_entropy" or "mse" likelihoods only; the Gaussian
            # ("mse") draw costs what the Bernoulli draw costs: one sampled backward per update.
            maker = asdl.KfacGradientMaker(model, config, fisher_type=asdl.FISHER_MC, loss_type=asdl.LOSS_MSE)
        elif of == "Shampoo":
            maker = asdl.ShampooGradientMaker(model, config)
        else:
            maker = asdl.KronBfgsGradientMaker(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=kw["lr"], momentum=0.9)
    dummy = maker.setup_model_call(model, x)
    maker.setup_loss_call(_asdl_loss, dummy, y)

    def step() -> Tensor:
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, loss = maker.forward_and_backward()
        opt.step()
        return loss.detach()

    params = {id(p) for p in model.parameters()}

    def state() -> int:
        grads = {id(p.grad) for p in model.parameters() if p.grad is not None}
        # ASDL keeps its curvature on the maker and on the modules, not in opt.state_dict()
        return state_bytes(opt.state_dict()) + _reachable_bytes([maker, *model.modules()], params | grads | {id(x), id(y)})

    return Stepper(step, state, "loss_type mse for the MC draw (ASDL has no Bernoulli likelihood)" if of == "KFAC" else "")
