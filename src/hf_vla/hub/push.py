"""`hf-vla push`: a saved model directory, with a generated card, to a Hub repository."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from .card import build_model_card
from .remote_code import export_remote_code

# What a release carries: weights, configs, processor/tokenizer/statistics, the FAST tokenizer, remote code,
# the training recipe and evaluation results.
RELEASE_PATTERNS = [
    "*.json", "*.safetensors", "*.jinja", "*.txt", "*.py", "README.md", "training_recipe.yaml",
    "action_tokenizer/*",
]  # fmt: skip


def push_model(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    commit_message: str = "Upload hf_vla model",
    write_card: bool = True,
    remote_code: bool = False,
) -> str:
    """Uploads `model_dir` to `repo_id` (created if missing) and returns the commit URL. The model card is rendered
    into `model_dir/README.md` first unless `write_card=False` (then an existing README.md is uploaded as it is).
    `remote_code=True` also writes self-contained modules + `auto_map`, so the release loads without hf_vla."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a directory written by save_pretrained")
    if remote_code:
        export_remote_code(model_dir)
    if write_card:
        build_model_card(model_dir, repo_id=repo_id, license=license, datasets=datasets).save(model_dir / "README.md")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(model_dir),
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=RELEASE_PATTERNS,
    )
    return str(info)
