"""Rewrite a module so that mutmut mutates its decorated functions (run on the scratch copy only).

mutmut leaves every function under a decorator alone. Two decorators here change no behaviour that a mutant
could depend on: `functools.lru_cache` in front of a pure function (dropped: a cache inherited from mutmut's
stats run would answer for the original function) and aiohttp's `@routes.<method>(path)` (moved to a call
after the module's last line, which registers mutmut's trampoline instead of the function).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def _is_cache(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in ("functools.lru_cache", "functools.cache")


def _is_route(decorator: ast.expr) -> bool:
    return isinstance(decorator, ast.Call) and ast.unparse(decorator.func).startswith("routes.")


def undecorate(source: str) -> str:
    lines = source.splitlines(keepends=True)
    dropped: set[int] = set()
    registrations: list[str] = []
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.decorator_list:
            continue
        if not all(_is_cache(d) or _is_route(d) for d in node.decorator_list):
            continue
        for decorator in node.decorator_list:
            assert decorator.end_lineno is not None
            dropped.update(range(decorator.lineno - 1, decorator.end_lineno))
            if _is_route(decorator):
                registrations.append(f"{ast.unparse(decorator)}({node.name})\n")
    kept = [line for number, line in enumerate(lines) if number not in dropped]
    return "".join(kept) + ("\n\n" + "".join(registrations) if registrations else "")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name)
        path.write_text(undecorate(path.read_text()))
