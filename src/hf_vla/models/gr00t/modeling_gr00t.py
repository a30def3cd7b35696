"""The GR00T variant: last-layer VLM features → interleaved cross/self-attention DiT → action decoder."""

from __future__ import annotations

from ..flow_matching_vla import VLAFlowMatchingModel
from .configuration_gr00t import VLAGR00TConfig


class VLAGR00TForActionPrediction(VLAFlowMatchingModel):
    config_class = VLAGR00TConfig

    def __init__(self, config: VLAGR00TConfig):
        super().__init__(config)
        self.action_head = self.build_action_head(
            config,
            dit_hidden_size=config.dit_hidden_size or self.vlm_hidden_size,  # None: as the config documents
            num_layers=config.num_dit_layers or self.backbone.num_layers(config.vlm_config),
            cross_attention_dim=self.vlm_hidden_size,
        )
        self.post_init()


__all__ = ["VLAGR00TForActionPrediction"]


if __name__ == "__main__":
    from ...testing import smoke_run

    smoke_run("gr00t")
