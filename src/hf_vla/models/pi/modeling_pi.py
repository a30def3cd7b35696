"""The PI variant: every VLM layer conditions the DiT block of the same depth."""

from __future__ import annotations

from ..flow_matching_vla import VLAFlowMatchingModel
from .configuration_pi import VLAPIConfig


class VLAPIForActionPrediction(VLAFlowMatchingModel):
    config_class = VLAPIConfig
    layerwise = True

    def __init__(self, config: VLAPIConfig):
        super().__init__(config)
        hidden, layers = self.vlm_hidden_size, self.backbone.num_layers(config.vlm_config)
        if config.num_dit_layers is not None and config.num_dit_layers > layers:  # the blocks read the last N layers
            raise ValueError(f"num_dit_layers: the layer-wise head has at most one block per VLM layer ({layers}), "
                             f"got {config.num_dit_layers}")
        width = config.dit_hidden_size or hidden
        self.action_head = self.build_action_head(
            config,
            dit_hidden_size=width,
            num_layers=config.num_dit_layers or layers,
            layerwise=True,
            project_condition_dim=self.project_condition_dim(hidden, width),
        )
        self.post_init()

    def project_condition_dim(self, vlm_hidden: int, width: int) -> int | None:
        if vlm_hidden != width:
            raise ValueError(f"dit_hidden_size: the PI head runs at the VLM width {vlm_hidden}, got {width}; "
                             "use vla_pi_v3 for a compressed layer-wise head")
        return None


__all__ = ["VLAPIForActionPrediction"]


if __name__ == "__main__":
    from ...testing import smoke_run

    smoke_run("pi")
