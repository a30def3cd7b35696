"""Action tokenizers: continuous action chunks <-> discrete token ids for autoregressive VLA heads."""

from typing import TYPE_CHECKING

from .bins import UniformBins

if TYPE_CHECKING:
    from .fast import FASTTokenizer

__all__ = ["FASTTokenizer", "UniformBins"]


def __getattr__(name: str):
    # Imported on first use: keeps scipy optional and lets `python -m hf_vla.action_tokenizers.fast` run cleanly.
    if name == "FASTTokenizer":
        from .fast import FASTTokenizer

        return FASTTokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
