from .configuration_bins import VLABinsConfig
from .modeling_bins import VLABinsForActionPrediction

__all__ = ["VLABinsConfig", "VLABinsForActionPrediction"]
