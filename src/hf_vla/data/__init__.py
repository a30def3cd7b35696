"""Robot datasets on disk: LeRobot v3.0 / v2.1 reading and writing without the `lerobot` package, and video decoding.

Names are imported lazily so that `python -m hf_vla.data.<module>` runs each module cleanly.
"""

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "CoTrainingCollator": "collators",
    "VLACollator": "collators",
    "ACTION_MODES": "lerobot",
    "LeRobotDataset": "lerobot",
    "apply_action_mode": "lerobot",
    "load_lerobot": "lerobot",
    "LeRobotWriter": "lerobot_writer",
    "write_lerobot_dataset": "lerobot_writer",
    "MixtureEntry": "mixture",
    "VLAMixture": "mixture",
    "load_mixture": "mixture",
    "VLMChatCollator": "vlm_chat",
    "VLMChatDataset": "vlm_chat",
    "load_vlm_chat": "vlm_chat",
    "PreloadedDecoder": "video",
    "PyAVDecoder": "video",
    "VideoDecodeError": "video",
    "VideoDecoder": "video",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
