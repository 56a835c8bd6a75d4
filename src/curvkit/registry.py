"""Name -> part registry, one namespace per kind, with plugin discovery by entry points.

Kinds: ``"estimator"``, ``"preconditioner"``, ``"inverter"`` and ``"method"`` (presets: callables
that build a ready optimizer, such as ``curvkit.TNT``).

Plugins declare an entry point in the group ``curvkit.plugins``; its object is either a module
(importing it registers its parts through :func:`register`) or a callable taking the
:class:`Registry`. Entry points are loaded lazily, once, at the first lookup.

Example::

    @curvkit.register("inverter", "my_inverter")
    class MyInverter(curvkit.Inverter):
        ...
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import threading
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "Registry",
    "RegistryEntry",
    "UnknownPartError",
    "available",
    "get",
    "register",
    "registry",
]

#: The entry-point group plugins declare in their ``pyproject.toml``.
ENTRY_POINT_GROUP = "curvkit.plugins"
#: The kinds of registered objects, one namespace each.
KINDS = ("estimator", "preconditioner", "inverter", "method")

#: Names (and name prefixes) shipped by the first-party plugins, for install hints.
_PLUGIN_HINTS = {
    "kfac": "curvkit-kfac",
    "shampoo": "curvkit-shampoo",
    "coupled_newton": "curvkit-shampoo",
    "grafted": "curvkit-shampoo",
    "kbfgs": "curvkit-kbfgs",
    "k_bfgs": "curvkit-kbfgs",
}

T = TypeVar("T")


class UnknownPartError(LookupError, ValueError):
    """Raised for a name no registered part (and no installed plugin) provides."""


@dataclass(frozen=True)
class RegistryEntry:
    """One registered part: the object and where it came from (module or distribution)."""

    kind: str
    name: str
    obj: Any
    origin: str


class Registry:
    """Holds the parts of each kind by name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, RegistryEntry]] = {k: {} for k in KINDS}
        self._plugins_loaded = False
        self._plugin_errors: dict[str, str] = {}
        self._lock = threading.RLock()
        self._loading_origin: str | None = None

    # -- registration -------------------------------------------------------------------------
    def register(
        self, kind: str, name: str, obj: Any = None, *, replace: bool = False
    ) -> Any:
        """Register ``obj`` as ``kind``/``name``; usable as a decorator when ``obj`` is omitted.

        Raises:
            ValueError: for an unknown kind, an invalid name, or a name already taken (unless
                ``replace=True``).
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"part name must be a Python identifier, got {name!r}")

        def decorator(target: T) -> T:
            origin = self._loading_origin or getattr(inspect.getmodule(target), "__name__", "?")
            with self._lock:
                existing = self._entries[kind].get(name)
                if existing is not None and existing.obj is not target and not replace:
                    raise ValueError(
                        f"{kind} {name!r} is already registered (by {existing.origin}); "
                        f"pass replace=True to override it"
                    )
                self._entries[kind][name] = RegistryEntry(kind, name, target, origin)
            if kind != "method" and isinstance(target, type):
                # the part knows its own registry name (used in state_dict and block plans)
                if "name" not in target.__dict__ or not target.__dict__["name"]:
                    target.name = name
            return target

        if obj is None:
            return decorator
        return decorator(obj)

    def unregister(self, kind: str, name: str) -> None:
        """Remove a registered name (for tests and interactive use)."""
        with self._lock:
            self._entries[kind].pop(name, None)

    # -- lookup -------------------------------------------------------------------------------
    def load_plugins(self, *, force: bool = False) -> None:
        """Load every entry point of the ``curvkit.plugins`` group (once)."""
        with self._lock:
            if self._plugins_loaded and not force:
                return
            self._plugins_loaded = True
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(ep, "dist", None)
                origin = dist.name if dist is not None else ep.value
                self._loading_origin = origin
                try:
                    obj = ep.load()
                    if callable(obj) and not inspect.ismodule(obj):
                        obj(self)
                    self._credit(ep.module, origin)
                except Exception as exc:  # a broken plugin must not break the core
                    self._plugin_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                    warnings.warn(
                        f"curvkit plugin entry point {ep.name!r} ({ep.value}) failed to load: {exc}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                finally:
                    self._loading_origin = None

    def _credit(self, module: str, origin: str) -> None:
        """Name the distribution as origin of parts its module registered on an earlier import."""
        root = module.split(".")[0]
        for entries in self._entries.values():
            for key, entry in entries.items():
                if entry.origin == root or entry.origin.startswith(root + "."):
                    entries[key] = RegistryEntry(entry.kind, entry.name, entry.obj, origin)

    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``kind``/``name``.

        Raises:
            UnknownPartError: listing the known names of that kind and, for names of first-party
                plugins, the package to install.
        """
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.load_plugins()
        entry = self._entries[kind].get(name)
        if entry is not None:
            return entry.obj
        known = sorted(self._entries[kind])
        msg = f"unknown {kind} {name!r}. Known {kind}s: {', '.join(known) or '(none)'}."
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        hint = next((pkg for prefix, pkg in _PLUGIN_HINTS.items() if str(name).lower().startswith(prefix)), None)
        if hint:
            msg += f" {name!r} is provided by the plugin {hint}: pip install {hint}"
        else:
            msg += " If it comes from a plugin, install that plugin's package."
        if self._plugin_errors:
            msg += f" (plugins that failed to load: {self._plugin_errors})"
        raise UnknownPartError(msg)

    def available(self, kind: str | None = None) -> dict[str, dict[str, str]]:
        """``{kind: {name: origin}}`` of everything registered (plugins loaded first)."""
        self.load_plugins()
        kinds = KINDS if kind is None else (kind,)
        for k in kinds:
            if k not in KINDS:
                raise ValueError(f"kind must be one of {KINDS}, got {k!r}")
        return {k: {n: e.origin for n, e in sorted(self._entries[k].items())} for k in kinds}


#: The process-wide registry.
registry = Registry()


def register(kind: str, name: str, obj: Any = None, *, replace: bool = False) -> Any:
    """Register a part or preset in the global registry (decorator form when ``obj`` is None)."""
    return registry.register(kind, name, obj, replace=replace)


def get(kind: str, name: str) -> Any:
    """Look a name up in the global registry."""
    return registry.get(kind, name)


def available(kind: str | None = None) -> dict[str, dict[str, str]]:
    """Everything registered, by kind, with the module or distribution that registered it."""
    return registry.available(kind)
