from .configuration_oft import VLAOFTConfig
from .modeling_oft import VLAOFTForActionPrediction

__all__ = ["VLAOFTConfig", "VLAOFTForActionPrediction"]
