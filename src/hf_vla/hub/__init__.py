"""Releases: model cards, pushing model directories to the Hub, remote code, StarVLA checkpoint conversion.

Names are imported lazily, so that `python -m hf_vla.hub.<module>` runs each module cleanly.
"""

from importlib import import_module

_EXPORTS = {"build_model_card": "card", "push_model": "push"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return __all__
