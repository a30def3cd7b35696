from .configuration_fast import VLAFASTConfig
from .modeling_fast import VLAFASTForActionPrediction

__all__ = ["VLAFASTConfig", "VLAFASTForActionPrediction"]
