"""`AutoModelForVLA` and every Auto* registration of the variants.

`AutoModelForVLA` is a real transformers auto class: `from_pretrained` / `from_config` read the config's `model_type`
and dispatch to the variant's model class, exactly as `AutoModelForCausalLM` does for language models.
"""

from __future__ import annotations

from collections import OrderedDict

from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.models.auto.auto_factory import _BaseAutoModelClass, _LazyAutoMapping, auto_class_update
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

from .models.bins import VLABinsConfig, VLABinsForActionPrediction
from .models.fast import VLAFASTConfig, VLAFASTForActionPrediction
from .models.gr00t import VLAGR00TConfig, VLAGR00TForActionPrediction
from .models.oft import VLAOFTConfig, VLAOFTForActionPrediction
from .models.pi import VLAPIConfig, VLAPIForActionPrediction
from .models.pi_v3 import VLAPIv3Config, VLAPIv3ForActionPrediction
from .processing_vla import VLAProcessor

VARIANTS = {
    "vla_oft": (VLAOFTConfig, VLAOFTForActionPrediction),
    "vla_gr00t": (VLAGR00TConfig, VLAGR00TForActionPrediction),
    "vla_pi": (VLAPIConfig, VLAPIForActionPrediction),
    "vla_pi_v3": (VLAPIv3Config, VLAPIv3ForActionPrediction),
    "vla_fast": (VLAFASTConfig, VLAFASTForActionPrediction),
    "vla_bins": (VLABinsConfig, VLABinsForActionPrediction),
}

MODEL_FOR_VLA_MAPPING = _LazyAutoMapping(CONFIG_MAPPING_NAMES, OrderedDict())


class _AutoModelForVLA(_BaseAutoModelClass):
    _model_mapping = MODEL_FOR_VLA_MAPPING

    @classmethod
    def from_vlm(cls, vlm_name_or_path: str, variant: str = "oft", **kwargs):
        """A new VLA of `variant` ("oft", ...) around a pretrained VLM; keyword arguments set config fields
        (`action_dim`, `action_horizon`, `state_dim`, head settings) or pass `dtype`."""
        model_type = f"vla_{variant}"
        if model_type not in VARIANTS:
            known = sorted(name.removeprefix("vla_") for name in VARIANTS)
            raise ValueError(f"variant: unknown variant {variant!r}; known variants: {known}")
        return VARIANTS[model_type][1].from_vlm(vlm_name_or_path, **kwargs)


AutoModelForVLA = auto_class_update(_AutoModelForVLA, head_doc="vision-language-action")
AutoModelForVLA.__name__ = AutoModelForVLA.__qualname__ = "AutoModelForVLA"


def register_variant(config_class, model_class) -> None:
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForVLA.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(config_class, VLAProcessor, exist_ok=True)


for _config_class, _model_class in VARIANTS.values():
    register_variant(_config_class, _model_class)

__all__ = ["AutoModelForVLA", "MODEL_FOR_VLA_MAPPING", "VARIANTS", "register_variant", "CONFIG_MAPPING"]


if __name__ == "__main__":
    import tempfile

    from .testing import build_tiny_vla

    print("variants:", ", ".join(name.removeprefix("vla_") for name in VARIANTS))
    model, processor = build_tiny_vla("gr00t")
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        for auto_class in (AutoConfig, AutoModelForVLA, AutoModel, AutoProcessor):
            print(f"{auto_class.__name__}.from_pretrained → {type(auto_class.from_pretrained(directory)).__name__}")
