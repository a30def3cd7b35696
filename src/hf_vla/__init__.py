"""hf_vla: vision-language-action robot policies as first-class Hugging Face models."""

from .auto import AutoModelForVLA
from .configuration_vla import VLAConfig
from .modeling_vla import VLAOutput, VLAPreTrainedModel
from .models.oft import VLAOFTConfig, VLAOFTForActionPrediction
from .normalization import NORM_MODES, compute_stats
from .policy import VLAPolicy
from .processing_vla import VLAProcessor

__version__ = "0.1.0"

__all__ = [
    "AutoModelForVLA",
    "NORM_MODES",
    "VLAConfig",
    "VLAOFTConfig",
    "VLAOFTForActionPrediction",
    "VLAOutput",
    "VLAPolicy",
    "VLAPreTrainedModel",
    "VLAProcessor",
    "compute_stats",
]
