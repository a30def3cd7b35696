from .configuration_gr00t import VLAGR00TConfig
from .modeling_gr00t import VLAGR00TForActionPrediction

__all__ = ["VLAGR00TConfig", "VLAGR00TForActionPrediction"]
