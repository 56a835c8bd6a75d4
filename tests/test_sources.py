r"""Every Python source of the project compiles without warnings, and no docstring holds a
control character.

An invalid escape in a docstring (``"\ "``) is only a ``SyntaxWarning`` (a ``DeprecationWarning``
before Python 3.12), printed once when the module is first compiled and never again from the
cached bytecode. A valid one is worse: ``W^\top`` in a plain string is a tab followed by ``op``,
and the math in the rendered docs is silently wrong. Docstrings with backslashes are raw strings.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p for top in ("src", "plugins", "benchmarks", "tests", "docs", "examples")
    if (ROOT / top).is_dir()
    for p in (ROOT / top).rglob("*.py")
    if ".venv" not in p.parts and "_build" not in p.parts
)
CONTROL = {"\t": r"\t", "\b": r"\b", "\f": r"\f", "\v": r"\v", "\a": r"\a", "\r": r"\r"}


def _problems(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    where = str(path.relative_to(ROOT))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tree = ast.parse(text, where)
    except (SyntaxError, SyntaxWarning, DeprecationWarning) as e:
        return [f"{where}: {e}"]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            for char, escape in CONTROL.items():
                if doc and char in doc:
                    name = getattr(node, "name", "module")
                    out.append(f"{where}: docstring of {name} holds {escape} (make it a raw string, r\"\"\"...)")
    return out


def test_sources_compile_without_warnings_and_docstrings_hold_no_control_characters():
    assert len(SOURCES) > 50
    problems = [p for path in SOURCES for p in _problems(path)]
    assert not problems, "\n".join(problems)
