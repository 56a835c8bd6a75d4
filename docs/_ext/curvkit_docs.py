"""Sphinx helpers for the curvkit docs: alias resolution, API coverage, inventory freshness.

* **Aliases.** curvkit re-exports its public classes and functions at the top level
  (``curvkit.CurvatureOptimizer`` is defined in ``curvkit.optimizer``). The API pages document
  each object once, in its defining module; a cross-reference to a re-exported name is resolved
  to that definition here, so docstrings and pages may use either spelling.
* **Coverage.** Every name in the ``__all__`` of every module of ``curvkit_api_packages`` must be
  documented; a missing one is a build warning (an error under ``-W``) that names it.
* **Signatures.** Dataclass ``<factory>`` defaults are shown as ``...`` (see :func:`_signature`).
* **Inventories.** The committed ``_static/*-objects.inv`` must equal what
  ``make_inventories.py`` writes.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: Short spellings that appear in string annotations, mapped to their documented names.
_ANNOTATION_ALIASES = {
    "Tensor": "torch.Tensor",
    "nn.Module": "torch.nn.Module",
    "nn.Parameter": "torch.nn.Parameter",
    "Optimizer": "torch.optim.Optimizer",
}


def _lookup(dotted: str) -> Any:
    """The object named by a dotted path, importing the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _canonical(dotted: str) -> str | None:
    """Where the object behind ``dotted`` is defined (``module.qualname``), if it differs."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        head = _lookup(".".join(parts[:cut]))
        if head is None or inspect.ismodule(head):
            continue
        module = getattr(head, "__module__", None)
        qualname = getattr(head, "__qualname__", None)
        if not (isinstance(module, str) and isinstance(qualname, str)):
            continue  # a property or a constant: try its owner
        name = ".".join([module, qualname, *parts[cut:]])
        return name if name != dotted else None
    return None


_MISSING = object()


def _alternatives(dotted: str, domain: Any) -> list[str]:
    """Other documented names of the object behind ``dotted``: where it is defined, or (for
    data such as constants, which know no module) a documented module holding the same object."""
    found = []
    canonical = _canonical(dotted)
    if canonical:
        found.append(canonical)
    module_name, _, name = dotted.rpartition(".")
    obj = _lookup(dotted) if module_name else _MISSING
    if obj is not _MISSING and obj is not None and not inspect.ismodule(obj):
        for other in domain.modules:
            module = sys.modules.get(other)
            if other != module_name and module is not None and getattr(module, name, _MISSING) is obj:
                found.append(f"{other}.{name}")
    return found


def _resolve(app: Sphinx, env: Any, node: nodes.Element, contnode: nodes.Element) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    domain = env.get_domain("py")
    module = node.get("py:module")
    candidates = []
    if target in _ANNOTATION_ALIASES:
        candidates.append(_ANNOTATION_ALIASES[target])
    candidates += _alternatives(target, domain)
    if module and not target.startswith(module + "."):  # a short name inside a module's docstring
        candidates += _alternatives(f"{module}.{target}", domain)
    if "." not in target:  # a bare name: a unique documented match in this module, or anywhere
        for prefix in ([module + "."] if module else []) + [""]:
            matches = [n for n in domain.objects if n.startswith(prefix) and n.endswith("." + target)]
            if len(matches) == 1:
                candidates.append(matches[0])
                break
    for candidate in candidates:
        new = node.deepcopy()
        new["reftarget"] = candidate
        found = domain.resolve_xref(env, node.get("refdoc", ""), app.builder, node["reftype"], candidate, new, contnode)
        if found is None:
            anything = domain.resolve_any_xref(env, node.get("refdoc", ""), app.builder, candidate, new, contnode)
            found = anything[0][1] if anything else None
        if found is None and "sphinx.ext.intersphinx" in app.extensions:
            from sphinx.ext import intersphinx

            found = intersphinx.missing_reference(app, env, new, contnode)
        if found is not None:
            return found
    return None


def _signature(app: Sphinx, what: str, name: str, obj: Any, options: Any, signature: str | None,
               return_annotation: str | None) -> tuple[str | None, str | None] | None:
    """Dataclass fields with a ``default_factory`` show ``<factory>``, which is not Python and makes
    Sphinx split the signature at every comma; show ``...`` instead."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def _public_modules(package: str) -> list[Any]:
    root = importlib.import_module(package)
    modules = [root]
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=package + "."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def _check_coverage(app: Sphinx, env: Any) -> None:
    domain = env.get_domain("py")
    documented = set(domain.objects) | set(domain.modules)
    missing = []
    for package in app.config.curvkit_api_packages:
        for module in _public_modules(package):
            parent = module.__name__.rpartition(".")[0]
            reexported = parent in domain.modules and all(
                getattr(sys.modules[parent], name, _MISSING) is getattr(module, name)
                for name in getattr(module, "__all__", [])
            )
            if module.__name__ not in domain.modules and not reexported:
                # a submodule whose every public name its documented package re-exports is
                # covered by the package's page
                missing.append(f"module {module.__name__}")
            for name in getattr(module, "__all__", []):
                obj = getattr(module, name)
                if inspect.ismodule(obj):
                    if obj.__name__ not in domain.modules:
                        missing.append(f"module {obj.__name__}")
                    continue
                dotted = f"{module.__name__}.{name}"
                if dotted not in documented and not any(a in documented for a in _alternatives(dotted, domain)):
                    missing.append(dotted)
    summary = (Path(app.srcdir) / "api" / "index.rst").read_text()
    listed = set(re.findall(r"^   (\w+)$", summary, re.M))
    for name in getattr(importlib.import_module("curvkit"), "__all__", []):
        if not inspect.ismodule(getattr(importlib.import_module("curvkit"), name)) and name not in listed:
            missing.append(f"curvkit.{name} (in the top-level table of docs/api/index.rst)")
    for item in sorted(set(missing)):
        logger.warning(
            "public name not documented: %s -- add it to a page under docs/api/ "
            "(automodule with :members: picks up a module's __all__)", item, type="curvkit", subtype="coverage",
        )


def _check_inventories(app: Sphinx) -> None:
    import make_inventories as inv

    for filename, (project, version, entries) in inv.INVENTORIES.items():
        path = inv.STATIC / filename
        expected = inv.body(inv.render(project, version, entries))
        if not path.exists() or inv.body(path.read_bytes()) != expected:
            logger.warning(
                "%s is out of date with docs/make_inventories.py: run python docs/make_inventories.py", path,
                type="curvkit", subtype="inventory",
            )


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_config_value("curvkit_api_packages", [], "env")
    app.connect("missing-reference", _resolve, priority=400)
    app.connect("autodoc-process-signature", _signature)
    app.connect("env-check-consistency", _check_coverage)
    app.connect("builder-inited", _check_inventories)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
