"""Releases: model cards, pushing model directories to the Hub, remote code, StarVLA checkpoint conversion.

Names are imported lazily, so that `python -m hf_vla.hub.<module>` runs each module cleanly.
"""

from ..lazy_exports import lazy_exports

_EXPORTS = {"build_model_card": "card", "push_model": "push"}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
