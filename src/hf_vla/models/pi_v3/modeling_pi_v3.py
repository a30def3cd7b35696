"""The PI_v3 variant: per-layer projectors compress every VLM layer to the DiT's width."""

from __future__ import annotations

from ..pi.modeling_pi import VLAPIForActionPrediction
from .configuration_pi_v3 import VLAPIv3Config


class VLAPIv3ForActionPrediction(VLAPIForActionPrediction):
    config_class = VLAPIv3Config

    def project_condition_dim(self, vlm_hidden: int, width: int) -> int | None:
        return vlm_hidden  # one LayerNorm + Linear(vlm_hidden → width) per layer (Identity when equal)


__all__ = ["VLAPIv3ForActionPrediction"]


if __name__ == "__main__":
    from ...testing import smoke_run

    smoke_run("pi_v3")
