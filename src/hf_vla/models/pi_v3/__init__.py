from .configuration_pi_v3 import VLAPIv3Config
from .modeling_pi_v3 import VLAPIv3ForActionPrediction

__all__ = ["VLAPIv3Config", "VLAPIv3ForActionPrediction"]
