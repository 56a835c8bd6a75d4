"""Write the local intersphinx inventories the docs link against (no network at build time).

The docs build runs offline (CI reaches PyPI only), so intersphinx cannot download
``objects.inv`` from pytorch.org or python.org. This script writes small inventories in
Sphinx's version-2 format (a four-line header, then zlib-compressed ``name domain:role priority
uri dispname`` lines) that cover the names the curvkit docs reference:

* ``_static/torch-objects.inv`` -> https://docs.pytorch.org/docs/stable/
* ``_static/python-objects.inv`` -> https://docs.python.org/3/
* ``_static/opt_einsum-objects.inv`` -> https://dgasmith.github.io/opt_einsum/

Run it after adding a name: ``python docs/make_inventories.py``. ``docs/conf.py`` checks at
build time that the committed files hold exactly what this script writes.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIC = HERE / "_static"

_GEN = "generated/{name}.html#{name}"

# (name, role, relative uri); "$" in the uri stands for the name (Sphinx's own shorthand).
TORCH: list[tuple[str, str, str]] = [
    ("torch", "module", "torch.html#module-torch"),
    ("torch.Tensor", "class", "tensors.html#torch.Tensor"),
    ("torch.Tensor.backward", "method", "generated/torch.Tensor.backward.html#torch.Tensor.backward"),
    ("torch.dtype", "class", "tensor_attributes.html#torch.dtype"),
    ("torch.device", "class", "tensor_attributes.html#torch.device"),
    ("torch.Generator", "class", _GEN.format(name="torch.Generator")),
    ("torch._C.Generator", "class", _GEN.format(name="torch.Generator")),
    ("torch.manual_seed", "function", _GEN.format(name="torch.manual_seed")),
    ("torch.no_grad", "class", _GEN.format(name="torch.no_grad")),
    ("torch.save", "function", _GEN.format(name="torch.save")),
    ("torch.load", "function", _GEN.format(name="torch.load")),
    ("torch.einsum", "function", _GEN.format(name="torch.einsum")),
    ("torch.compile", "function", _GEN.format(name="torch.compile")),
    ("torch.kron", "function", _GEN.format(name="torch.kron")),
    ("torch.cholesky_inverse", "function", _GEN.format(name="torch.cholesky_inverse")),
    ("torch.linalg", "module", "linalg.html#module-torch.linalg"),
    ("torch.linalg.eigh", "function", _GEN.format(name="torch.linalg.eigh")),
    ("torch.linalg.cholesky_ex", "function", _GEN.format(name="torch.linalg.cholesky_ex")),
    ("torch.linalg.inv", "function", _GEN.format(name="torch.linalg.inv")),
    ("torch.linalg.LinAlgError", "exception", "linalg.html"),
    ("torch.autograd.grad", "function", _GEN.format(name="torch.autograd.grad")),
    ("torch.nn.Module", "class", _GEN.format(name="torch.nn.Module")),
    ("torch.nn.modules.module.Module", "class", "generated/torch.nn.Module.html#torch.nn.Module"),
    ("torch.nn.Module.register_forward_hook", "method",
     "generated/torch.nn.Module.html#torch.nn.Module.register_forward_hook"),
    ("torch.nn.Module.named_parameters", "method",
     "generated/torch.nn.Module.html#torch.nn.Module.named_parameters"),
    ("torch.nn.Parameter", "class", "generated/torch.nn.parameter.Parameter.html#torch.nn.parameter.Parameter"),
    ("torch.nn.parameter.Parameter", "class",
     "generated/torch.nn.parameter.Parameter.html#torch.nn.parameter.Parameter"),
    ("torch.nn.Linear", "class", _GEN.format(name="torch.nn.Linear")),
    ("torch.nn.Conv2d", "class", _GEN.format(name="torch.nn.Conv2d")),
    ("torch.nn.modules.conv.Conv2d", "class", _GEN.format(name="torch.nn.Conv2d")),
    ("torch.nn.LayerNorm", "class", _GEN.format(name="torch.nn.LayerNorm")),
    ("torch.nn.Embedding", "class", _GEN.format(name="torch.nn.Embedding")),
    ("torch.nn.Sequential", "class", _GEN.format(name="torch.nn.Sequential")),
    ("torch.nn.functional.cross_entropy", "function", _GEN.format(name="torch.nn.functional.cross_entropy")),
    ("torch.nn.functional.binary_cross_entropy_with_logits", "function",
     _GEN.format(name="torch.nn.functional.binary_cross_entropy_with_logits")),
    ("torch.nn.parallel.DistributedDataParallel", "class",
     _GEN.format(name="torch.nn.parallel.DistributedDataParallel")),
    ("torch.distributed", "module", "distributed.html#module-torch.distributed"),
    ("torch.distributed.all_reduce", "function", "distributed.html#torch.distributed.all_reduce"),
    ("torch.optim", "module", "optim.html#module-torch.optim"),
    ("torch.optim.Optimizer", "class", "optim.html#torch.optim.Optimizer"),
    ("torch.optim.optimizer.Optimizer", "class", "optim.html#torch.optim.Optimizer"),
    ("torch.optim.Optimizer.step", "method", _GEN.format(name="torch.optim.Optimizer.step")),
    ("torch.optim.Optimizer.zero_grad", "method", _GEN.format(name="torch.optim.Optimizer.zero_grad")),
    ("torch.optim.Optimizer.state_dict", "method", _GEN.format(name="torch.optim.Optimizer.state_dict")),
    ("torch.optim.Optimizer.load_state_dict", "method",
     _GEN.format(name="torch.optim.Optimizer.load_state_dict")),
    ("torch.optim.Optimizer.add_param_group", "method",
     _GEN.format(name="torch.optim.Optimizer.add_param_group")),
    ("torch.optim.Adam", "class", _GEN.format(name="torch.optim.Adam")),
    ("torch.optim.SGD", "class", _GEN.format(name="torch.optim.SGD")),
    ("torch.optim.lr_scheduler.LRScheduler", "class", _GEN.format(name="torch.optim.lr_scheduler.LRScheduler")),
    ("torch.optim.lr_scheduler.StepLR", "class", _GEN.format(name="torch.optim.lr_scheduler.StepLR")),
]

PYTHON: list[tuple[str, str, str]] = [
    ("ValueError", "exception", "library/exceptions.html#ValueError"),
    ("LookupError", "exception", "library/exceptions.html#LookupError"),
    ("RuntimeError", "exception", "library/exceptions.html#RuntimeError"),
    ("RuntimeWarning", "exception", "library/exceptions.html#RuntimeWarning"),
    ("FloatingPointError", "exception", "library/exceptions.html#FloatingPointError"),
    ("dict", "class", "library/stdtypes.html#dict"),
    ("abc.ABC", "class", "library/abc.html#abc.ABC"),
    ("enum.Enum", "class", "library/enum.html#enum.Enum"),
    ("dataclasses.dataclass", "function", "library/dataclasses.html#dataclasses.dataclass"),
    ("contextlib.AbstractContextManager", "class", "library/contextlib.html#contextlib.AbstractContextManager"),
    ("contextlib.nullcontext", "function", "library/contextlib.html#contextlib.nullcontext"),
    ("importlib.metadata.entry_points", "function", "library/importlib.metadata.html#entry-points"),
    ("functools.lru_cache", "function", "library/functools.html#functools.lru_cache"),
    ("typing.NamedTuple", "class", "library/typing.html#typing.NamedTuple"),
    ("warnings.warn", "function", "library/warnings.html#warnings.warn"),
]

OPT_EINSUM: list[tuple[str, str, str]] = [
    ("opt_einsum.contract_expression", "function", "api_reference/#opt_einsumcontract_expression"),
    ("opt_einsum.contract_path", "function", "api_reference/#opt_einsumcontract_path"),
]


def render(project: str, version: str, entries: list[tuple[str, str, str]]) -> bytes:
    """The inventory file (header plus compressed body) for ``entries``."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    ).encode()
    lines = "".join(f"{name} py:{role} 1 {uri} -\n" for name, role, uri in sorted(entries))
    return header + zlib.compress(lines.encode(), 9)


def body(data: bytes) -> str:
    """The decompressed entry lines of an inventory (for comparing files independently of zlib)."""
    head, _, rest = data.partition(b"compressed using zlib.\n")
    return head.decode() + zlib.decompress(rest).decode()


INVENTORIES = {
    "torch-objects.inv": ("PyTorch", "stable", TORCH),
    "python-objects.inv": ("Python", "3", PYTHON),
    "opt_einsum-objects.inv": ("opt_einsum", "3", OPT_EINSUM),
}


def main() -> None:
    STATIC.mkdir(exist_ok=True)
    for filename, (project, version, entries) in INVENTORIES.items():
        (STATIC / filename).write_bytes(render(project, version, entries))
        print(f"wrote {STATIC / filename} ({len(entries)} names)")


if __name__ == "__main__":
    main()
