r"""The optimizer's state dict, in torch's per-parameter layout.

``state_dict()`` returns what :class:`torch.optim.Optimizer` returns -- ``"state"`` keyed by
parameter index and ``"param_groups"`` with index lists -- so checkpoint tools that understand
torch's layout (``torch.distributed.checkpoint.state_dict``) can map, save and reshard it. Each
block's state lives under the index of the block's first parameter as one *flat* dict of tensors
and plain values (keys like ``"estimator/grams/0"``; lists record their length under
``".../__len__"``), with the block's position, name, view shape and health counters under
``"meta/..."`` keys. The optimizer-level metadata -- the method signature (part names and
configs), the run counters and the sampling generators -- sits in the first param group under
``"curvkit"``: ``torch.distributed.checkpoint`` keeps exactly ``"state"`` and
``"param_groups"``, so nothing lives elsewhere.

Loading matches blocks by *position and shape*, as :mod:`torch.optim` matches parameters, so a
state saved from a wrapped model (``module.`` or ``_orig_mod.`` prefixes) or built from
``model.parameters()`` loads into an optimizer built on the bare model's named parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._tree import flatten_state, map_tensors, unflatten_state
from ..safeguards import warn_user

if TYPE_CHECKING:  # pragma: no cover
    from ..optimizer import CurvatureOptimizer

__all__ = ["FORMAT", "compare_methods", "load", "method_signature", "save"]

#: Version of the layout written by :func:`save` (1 = the wave-1 layout, still readable).
FORMAT = 3
#: The key, in the first param group, of the optimizer-level metadata.
META = "curvkit"


def method_signature(opt: "CurvatureOptimizer") -> dict[str, Any]:
    """Part names and configs of the optimizer."""
    return {
        kind: {"name": part.name, "config": part.config.to_dict()}
        for kind, part in (("estimator", opt.estimator), ("preconditioner", opt.preconditioner), ("inverter", opt.inverter))
    }


def compare_methods(opt: "CurvatureOptimizer", saved: dict[str, Any], *, options: bool = True) -> None:
    """Refuse a saved state whose parts (or meaning-changing options) differ; warn for the rest."""
    mine = method_signature(opt)
    parts = {"estimator": opt.estimator, "preconditioner": opt.preconditioner, "inverter": opt.inverter}
    kinds = ("estimator", "preconditioner", "inverter")
    for kind in kinds:
        if saved[kind]["name"] != mine[kind]["name"]:
            raise ValueError(
                f"state dict was saved with {kind} {saved[kind]['name']!r}, this optimizer uses "
                f"{mine[kind]['name']!r}: load it into an optimizer of the same method"
            )
    for kind in kinds if options else ():
        old, new = saved[kind].get("config", {}), mine[kind]["config"]
        neutral = set(getattr(parts[kind], "state_neutral_options", ()))
        for key in sorted(set(old) | set(new)):
            if key not in old or old.get(key) == new.get(key):
                continue
            message = (
                f"state dict was saved with {kind} {mine[kind]['name']!r} option {key}={old.get(key)!r}, "
                f"this optimizer has {key}={new.get(key)!r}"
            )
            if key in neutral:
                warn_user(f"curvkit: {message}; the state is loaded as is")
            else:
                raise ValueError(
                    f"{message}: that changes what the saved state means; build the optimizer with "
                    f"{key}={old.get(key)!r} to resume, or start its statistics afresh"
                )


def save(opt: "CurvatureOptimizer") -> dict[str, Any]:
    """The state dict (see the module docstring)."""
    index: dict[int, int] = {}
    groups = []
    for g in opt.param_groups:
        packed = {k: v for k, v in g.items() if k != "params"}
        packed["params"] = []
        for p in g["params"]:
            index.setdefault(id(p), len(index))
            packed["params"].append(index[id(p)])
        groups.append(packed)
    health = opt._health.state()
    state = {}
    for bi, b in enumerate(opt._blocks):
        flat = flatten_state(opt._state_of(b))
        flat["meta/block"] = bi
        flat["meta/name"] = b.name
        flat["meta/view"] = "x".join(str(d) for d in b.shape)
        for counter, value in health[bi].items():
            flat[f"meta/health/{counter}"] = value
        state[index[id(b.params[0])]] = flat
    groups[0][META] = {
        "format": FORMAT,
        "method": method_signature(opt),
        "run": opt._run.to_dict(),
        "seed": opt._seed,
        "generators": {k: g.get_state() for k, g in opt._collector.generators.items()},
        "blocks": len(opt._blocks),
    }
    return {"state": state, "param_groups": groups}


def _from_format_1(extra: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Block states and run counters of a wave-1 state dict (per-block list under "curvkit")."""
    states = [b["state"] for b in extra["blocks"]]
    run = {
        "step": int(extra["step"]),
        "stats_taken_at": int(extra["stats_taken_at"]),
        "ever_had_stats": bool(extra["ever_had_stats"]),
        "warm_started": bool(extra["warm_started"]),
    }
    return states, run


def _split_meta(state_dict: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    groups = state_dict.get("param_groups") or [{}]
    meta = groups[0].get(META) if isinstance(groups[0], dict) else None
    if meta is None and isinstance(state_dict.get(META), dict):  # the wave-1 layout
        meta = state_dict[META]
    return meta, state_dict


def _by_block(packed: dict[Any, Any]) -> list[dict[str, Any]]:
    """Saved flat block states in block order (keys may be indices or names after DCP)."""
    states = [v for v in packed.values() if isinstance(v, dict) and "meta/block" in v]
    return sorted(states, key=lambda v: int(v["meta/block"]))


def _strip_meta(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    meta = {k[5:]: v for k, v in flat.items() if k.startswith("meta/")}
    return unflatten_state({k: v for k, v in flat.items() if not k.startswith("meta/")}), meta


def load(opt: "CurvatureOptimizer", state_dict: dict[str, Any], *, strict: bool) -> None:
    """Restore ``state_dict`` into ``opt`` (blocks matched by position and view shape)."""
    extra, sd = _split_meta(dict(state_dict))
    if not isinstance(extra, dict) or extra.get("format") not in (1, FORMAT):
        raise ValueError(
            "not a curvkit optimizer state dict (missing or unknown 'curvkit' metadata); save it with "
            "opt.state_dict() of a curvkit optimizer"
        )
    compare_methods(opt, extra["method"], options=False)
    shapes_mine = [b.shape for b in opt._blocks]
    if extra["format"] == 1:
        saved_blocks = extra["blocks"]
        got = [(s["name"], tuple(s["shape"])) for s in saved_blocks]
        block_states, run = _from_format_1(extra)
        health = [b.get("health", {}) for b in saved_blocks]
    else:
        flats = _by_block(sd.get("state", {}))
        block_states, metas = [], []
        for flat in flats:
            st, meta = _strip_meta(flat)
            block_states.append(st)
            metas.append(meta)
        got = [(m["name"], tuple(int(d) for d in str(m["view"]).split("x"))) for m in metas]
        run = extra["run"]
        health = [
            {k[len("health/"):]: int(v) for k, v in m.items() if k.startswith("health/")} for m in metas
        ]
    if [shape for _, shape in got] != shapes_mine:
        have = [(b.name, b.shape) for b in opt._blocks]
        raise ValueError(
            f"state dict has a different block layout (matched by position and view shape): saved {got}, "
            f"optimizer has {have}"
        )
    for b, st in zip(opt._blocks, block_states):
        opt.estimator.check_state(b, st["estimator"])
    compare_methods(opt, extra["method"])
    _load_groups(opt, sd.get("param_groups", []))
    opt.state.clear()
    for b, st in zip(opt._blocks, block_states):
        device = b.params[0].device
        opt.state[b.params[0]] = map_tensors(lambda t: t.detach().to(device=device, copy=True), st)
    opt._health.load(health)
    opt._run.load(run)
    opt._seed = int(extra["seed"])
    opt._collector.seed = opt._seed
    opt._collector.generators.clear()
    for key, gstate in extra["generators"].items():
        gen = torch.Generator(device=key)
        gen.set_state(gstate.cpu() if isinstance(gstate, Tensor) else gstate)
        opt._collector.generators[key] = gen
    _validate_loaded(opt, strict=strict)


def _validate_loaded(opt: "CurvatureOptimizer", *, strict: bool) -> None:
    """Non-finite statistics or momentum in a loaded state: restart/reset (counted) or raise."""
    bad = [opt._blocks[bi].name for bi in opt._repair_state(list(range(len(opt._blocks))))[0]]
    if bad and strict:
        raise ValueError(
            f"the loaded state holds non-finite statistics or momentum for blocks {bad}; it was saved "
            f"from a run that had diverged. Load it with strict=False to restart those statistics"
        )
    if bad:
        warn_user(
            f"curvkit: the loaded state held non-finite statistics or momentum for blocks {bad}; they "
            f"were restarted (see opt.health())"
        )


def _load_groups(opt: "CurvatureOptimizer", saved: list[dict[str, Any]]) -> None:
    """Param-group hyperparameters by position (the optimizer's ``state`` mapping is kept)."""
    if len(saved) != len(opt.param_groups):
        raise ValueError(
            f"state dict has {len(saved)} param groups, this optimizer has {len(opt.param_groups)}"
        )
    for gi, (mine, theirs) in enumerate(zip(opt.param_groups, saved)):
        if len(theirs["params"]) != len(mine["params"]):
            raise ValueError(
                f"param group {gi} of the state dict has {len(theirs['params'])} parameters, this "
                f"optimizer's has {len(mine['params'])}"
            )
        for key, value in theirs.items():
            if key not in ("params", META):
                mine[key] = value


def block_states(state_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """The nested state of every block of a saved state dict, in block order (for inspection
    and tests; the saved layout is flat per parameter)."""
    return [_strip_meta(flat)[0] for flat in _by_block(state_dict["state"])]


def set_block_state(state_dict: dict[str, Any], index: int, state: dict[str, Any]) -> None:
    """Replace the saved state of block ``index`` by a nested ``state`` (in place)."""
    for key, flat in state_dict["state"].items():
        if isinstance(flat, dict) and flat.get("meta/block") == index:
            meta = {k: v for k, v in flat.items() if k.startswith("meta/")}
            state_dict["state"][key] = {**flatten_state(state), **meta}
            return
    raise KeyError(f"no saved state for block {index}")


def block_layout(state_dict: dict[str, Any]) -> list[dict[str, Any]]:
    """``{"name", "shape"}`` of every saved block, in block order."""
    out = []
    for flat in _by_block(state_dict["state"]):
        out.append({"name": flat["meta/name"], "shape": tuple(int(d) for d in str(flat["meta/view"]).split("x"))})
    return out


def metadata(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The optimizer-level metadata of a saved state dict (method, run counters, ...)."""
    meta, _ = _split_meta(state_dict)
    if meta is None:
        raise ValueError("not a curvkit optimizer state dict")
    return meta
