from .configuration_pi import VLAPIConfig
from .modeling_pi import VLAPIForActionPrediction

__all__ = ["VLAPIConfig", "VLAPIForActionPrediction"]
