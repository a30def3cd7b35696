"""The FAST variant: the VLM writes the FAST tokens of the action chunk; its FAST tokenizer lives beside the weights
in `action_tokenizer/` (the published FAST format)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from transformers.utils import logging

from ...action_tokenizers.fast import FASTTokenizer
from ...modeling_vla import HUB_DOWNLOAD_KWARGS
from ..token_actions import VLATokenActionModel
from .configuration_fast import VLAFASTConfig

ACTION_TOKENIZER_DIR = "action_tokenizer"


logger = logging.get_logger(__name__)


class VLAFASTForActionPrediction(VLATokenActionModel):
    config_class = VLAFASTConfig

    def __init__(self, config: VLAFASTConfig):
        super().__init__(config)
        self.action_tokenizer: FASTTokenizer | None = None

    def set_action_tokenizer(self, tokenizer: FASTTokenizer | str | os.PathLike) -> None:
        """Attaches a FAST tokenizer (an object, a saved directory or a hub id such as the universal one)."""
        if not isinstance(tokenizer, FASTTokenizer):
            tokenizer = FASTTokenizer.from_pretrained(tokenizer)
        if tokenizer.vocab_size > self.config.num_action_tokens:
            raise ValueError(f"action_tokenizer: its vocabulary ({tokenizer.vocab_size}) exceeds the model's "
                             f"num_action_tokens ({self.config.num_action_tokens})")
        for name, expected in (("time_horizon", self.config.action_horizon), ("action_dim", self.config.action_dim)):
            if getattr(tokenizer, name) not in (None, expected):
                raise ValueError(f"action_tokenizer.{name}: expected {expected} (the model's), got {getattr(tokenizer, name)}")
        self.action_tokenizer = tokenizer

    def _tokenizer(self) -> FASTTokenizer:
        if self.action_tokenizer is None:
            raise ValueError("action_tokenizer: this FAST model has no FAST tokenizer; fit one with "
                             "FASTTokenizer.fit(normalised_chunks) and call model.set_action_tokenizer(...)")
        return self.action_tokenizer

    def encode_actions(self, actions: np.ndarray) -> list[list[int]]:
        return self._tokenizer()(actions)

    def decode_action_tokens(self, indices: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        return self._tokenizer().decode(
            indices, time_horizon=self.config.action_horizon, action_dim=self.config.action_dim, return_valid=True
        )

    def decodable_action_tokens(self) -> int:
        # a tokenizer fitted with a smaller vocabulary than the model's rows (a 1024-token BPE on a 2048-row -Action
        # backbone): the ids past its vocabulary would only decode to a NaN chunk
        return min(self.config.num_action_tokens, self._tokenizer().bpe.get_vocab_size(with_added_tokens=True))

    def generation_limits(self) -> tuple[int, int]:
        return 1, self.config.max_action_tokens

    def scored_reply_tokens(self, indices: list[list[int]], valid: np.ndarray) -> None:
        logger.warning_once(
            "FAST: action_mask marks entries invalid (steps past an episode's end, padded dimensions), but a FAST "
            "token codes the whole chunk (a DCT over time, then BPE), so they cannot be left out of the loss: the "
            "model learns them as they were padded."
        )
        return None

    # ------------------------------------------------------------------ the tokenizer travels with the weights

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """Also writes the FAST tokenizer to `action_tokenizer/`. With `push_to_hub=True` the folder is uploaded once
        the tokenizer is in it: transformers uploads from inside its own `save_pretrained`, before this could add it.
        `repo_id`, `commit_message`, `create_pr`, `private` and `token` go to the upload, as there."""
        upload = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private")
                  if key in kwargs}  # fmt: skip
        super().save_pretrained(save_directory, *args, **kwargs)
        if not self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            return
        if self.action_tokenizer is not None:
            self.action_tokenizer.save_pretrained(Path(save_directory) / ACTION_TOKENIZER_DIR)
        if push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=kwargs.get("token"))
            repo_id = upload.get("repo_id", Path(save_directory).name)
            repo_id = api.create_repo(repo_id, private=upload.get("private"), exist_ok=True).repo_id
            api.upload_folder(repo_id=repo_id, folder_path=save_directory, create_pr=upload.get("create_pr", False),
                              commit_message=upload.get("commit_message") or "Upload model and FAST tokenizer")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        subfolder = kwargs.get("subfolder") or ""
        location = Path(pretrained_model_name_or_path)
        if not location.is_dir():
            from huggingface_hub import snapshot_download

            hub_options = {k: kwargs[k] for k in HUB_DOWNLOAD_KWARGS if k in kwargs}
            pattern = f"{subfolder}/{ACTION_TOKENIZER_DIR}/*" if subfolder else f"{ACTION_TOKENIZER_DIR}/*"
            location = Path(snapshot_download(str(pretrained_model_name_or_path), allow_patterns=[pattern],
                                              **hub_options))  # fmt: skip
        if (location / subfolder / ACTION_TOKENIZER_DIR).is_dir():
            model.set_action_tokenizer(FASTTokenizer.from_pretrained(location / subfolder / ACTION_TOKENIZER_DIR))
        return model

    @classmethod
    def from_vlm(cls, vlm_name_or_path, dtype=None, action_tokenizer=None, **config_kwargs):
        """As `VLAPreTrainedModel.from_vlm`, plus the FAST tokenizer (object, directory or hub id), whose vocabulary
        size sets `num_action_tokens` unless given."""
        if action_tokenizer is not None and not isinstance(action_tokenizer, FASTTokenizer):
            action_tokenizer = FASTTokenizer.from_pretrained(action_tokenizer)
        if action_tokenizer is not None:
            config_kwargs.setdefault("num_action_tokens", action_tokenizer.vocab_size)
        model = super().from_vlm(vlm_name_or_path, dtype=dtype, **config_kwargs)
        if action_tokenizer is not None:
            model.set_action_tokenizer(action_tokenizer)
        return model


__all__ = ["VLAFASTForActionPrediction"]


if __name__ == "__main__":
    from ...testing import smoke_run

    smoke_run("fast")
