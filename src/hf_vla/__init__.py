"""hf_vla: vision-language-action robot policies as first-class Hugging Face models."""

from .auto import AutoModelForVLA
from .configuration_vla import VLAConfig
from .modeling_vla import VLAOutput, VLAPreTrainedModel
from .models.bins import VLABinsConfig, VLABinsForActionPrediction
from .models.fast import VLAFASTConfig, VLAFASTForActionPrediction
from .models.gr00t import VLAGR00TConfig, VLAGR00TForActionPrediction
from .models.oft import VLAOFTConfig, VLAOFTForActionPrediction
from .models.pi import VLAPIConfig, VLAPIForActionPrediction
from .models.pi_v3 import VLAPIv3Config, VLAPIv3ForActionPrediction
from .normalization import NORM_MODES, compute_stats
from .policy import VLAPolicy
from .processing_vla import VLAProcessor

__version__ = "0.1.0"

__all__ = [
    "AutoModelForVLA",
    "NORM_MODES",
    "VLABinsConfig",
    "VLABinsForActionPrediction",
    "VLAConfig",
    "VLAFASTConfig",
    "VLAFASTForActionPrediction",
    "VLAGR00TConfig",
    "VLAGR00TForActionPrediction",
    "VLAPIConfig",
    "VLAPIForActionPrediction",
    "VLAPIv3Config",
    "VLAPIv3ForActionPrediction",
    "VLAOFTConfig",
    "VLAOFTForActionPrediction",
    "VLAOutput",
    "VLAPolicy",
    "VLAPreTrainedModel",
    "VLAProcessor",
    "compute_stats",
]
