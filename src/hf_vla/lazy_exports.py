"""Subpackages whose names are imported from their modules on first use (`hf_vla.data`, `hf_vla.training`, ...).

A subpackage that imported its modules eagerly would have them in `sys.modules` before `python -m
hf_vla.<package>.<module>` runs one as `__main__`, which then runs twice (runpy warns), and importing the subpackage
would pay for every dependency of every module (trl, transformers' Trainer) at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for `package`, where `exports` maps each public name to the module (relative to the
    package) that defines it."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f".{exports[name]}", package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


if __name__ == "__main__":
    import sys

    for package in ("hf_vla.data", "hf_vla.training", "hf_vla.hub", "hf_vla.serving"):
        module = import_module(package)
        loaded = sorted(name.rsplit(".", 1)[1] for name in sys.modules if name.startswith(package + "."))
        print(f"{package}: {len(dir(module))} names, modules imported so far {loaded or 'none'}")
    from hf_vla.serving import packb  # noqa: F401 (the first use imports its module)

    print("after `from hf_vla.serving import packb`:",
          sorted(n.rsplit(".", 1)[1] for n in sys.modules if n.startswith("hf_vla.serving.")))
