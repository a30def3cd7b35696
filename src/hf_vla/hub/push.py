"""`hf-vla push`: a saved model directory, with a generated card, to a Hub repository."""

from __future__ import annotations

import hashlib
import logging
from fnmatch import fnmatch
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

from ..models.fast.modeling_fast import ACTION_TOKENIZER_DIR
from .card import base_model_of, build_model_card
from .remote_code import export_remote_code, generated_module_names, remove_remote_code

# What a release carries from the model directory's top level: weights, configs, processor/tokenizer/statistics,
# remote code, the training recipe and evaluation results; plus the FAST tokenizer's folder.
logger = logging.getLogger(__name__)
RELEASE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.py", "README.md", "training_recipe.yaml"]


def release_files(model_dir: Path) -> list[str]:
    """The files `push_model` uploads. Listed by name: in huggingface_hub's patterns `*` also matches `/`, so
    `*.safetensors` would ship a training run's `checkpoint-N/` weights and any backbone saved beside the model."""
    files = [p.name for p in model_dir.iterdir() if p.is_file() and any(fnmatch(p.name, g) for g in RELEASE_PATTERNS)]
    tokenizer_dir = model_dir / ACTION_TOKENIZER_DIR
    if tokenizer_dir.is_dir():
        files += [f"{ACTION_TOKENIZER_DIR}/{p.name}" for p in tokenizer_dir.iterdir() if p.is_file()]
    return sorted(files)


def base_model_license(api: HfApi, model_dir: Path) -> tuple[str, str | None, str | None]:
    """(license, license_name, license_link) of the base VLM's card on the Hub; apache-2.0 for a local backbone or
    a card that names none."""
    from transformers import AutoConfig

    base = base_model_of(AutoConfig.from_pretrained(model_dir))
    try:
        card = api.model_info(base).card_data if base else None
    except HfHubHTTPError as error:  # e.g. a private or removed base model
        logger.warning(f"license: could not read the base model {base}'s card ({error}); apache-2.0 unless license= "
                       "(--license) says otherwise")
        card = None
    if card is None or not card.get("license"):
        return "apache-2.0", None, None
    logger.info(f"license: {card.get('license')}, the base model {base}'s")
    return card.get("license"), card.get("license_name"), card.get("license_link")


def push_model(
    model_dir: str | Path,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    commit_message: str = "Upload hf_vla model",
    write_card: bool = True,
    remote_code: bool = False,
    license_name: str | None = None,
    license_link: str | None = None,
) -> str:
    """Uploads `model_dir` to `repo_id` (created if missing) and returns the commit URL. The model card is rendered
    into `model_dir/README.md` first unless `write_card=False` (then an existing README.md is uploaded as it is).
    `remote_code=True` also writes self-contained modules + `auto_map`, so the release loads without hf_vla;
    `remote_code=False` removes those of an earlier export. Release files that an earlier push to the same branch
    left and this one does not carry are deleted in the same commit.

    `license` (with `license_name` / `license_link` for "other"): None takes the base VLM's, read from its card on
    the Hub (a fine-tune of Qwen2.5-VL-3B is under its qwen-research licence), else apache-2.0."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() and (model_dir / "adapter_config.json").is_file():
        # an adapter's base is a folder of the run (lora_base/), which a Hub user could not resolve
        raise ValueError(f"{model_dir}: a LoRA adapter, not a model; push the merged model train_vla writes into the "
                         "run's output directory")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a directory written by save_pretrained")
    if (model_dir / "model.safetensors").is_file() and (model_dir / "model.safetensors.index.json").is_file():
        # a sharded save_pretrained leaves an earlier unsharded file in place, and loaders prefer that one
        raise ValueError(f"{model_dir}: holds both model.safetensors and model.safetensors.index.json (shards); "
                         "remove the one an earlier save_pretrained left")
    readme = model_dir / "README.md"  # checked before the folder is changed: a refused push leaves it as it was
    if write_card and readme.is_file() and not is_unedited_card(readme.read_text(encoding="utf-8")):
        raise ValueError(f"{readme}: not the card an earlier push generated (hand-written, or edited since); upload "
                         "it as it is with write_card=False (hf-vla push --no-card), or delete it to generate the card")
    if remote_code:
        export_remote_code(model_dir)
    else:  # an earlier --remote-code push's modules would otherwise ship again (stale after an upgrade)
        remove_remote_code(model_dir)
    api = HfApi(token=token)
    if write_card:
        if license is None:
            license, license_name, license_link = base_model_license(api, model_dir)
        card = build_model_card(model_dir, repo_id=repo_id, license=license, datasets=datasets, revision=revision,
                                license_name=license_name, license_link=license_link)  # fmt: skip
        readme.write_text(signed_card(str(card)), encoding="utf-8")
    api.create_repo(repo_id, private=private, exist_ok=True)
    if private and api.repo_info(repo_id).private is False:  # exist_ok leaves an existing repo's visibility alone
        raise ValueError(f"private: {repo_id} exists and is public, and pushing does not change that; make it private "
                         "on the Hub first, or push without private")
    if revision not in (None, "main") and not revision.startswith("refs/"):  # the Hub commits only to existing branches
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    files = release_files(model_dir)
    # release files of an earlier push that this one does not carry (e.g. model.safetensors after a switch to
    # shards, which loaders would still prefer) go in the same commit; the README and anything else stay
    stale = [name for name in api.list_repo_files(repo_id, revision=revision)
             if name not in files and name != "README.md" and _is_release_file(name)]  # fmt: skip
    info = api.upload_folder(
        folder_path=str(model_dir),
        repo_id=repo_id,
        revision=revision,
        commit_message=commit_message,
        allow_patterns=files,
        delete_patterns=stale or None,
    )
    return str(info)


def signed_card(text: str) -> str:
    """The card with a last line recording its digest, so that a later push can tell it was not edited."""
    return f"{text.rstrip()}\n\n<!-- hf-vla push: {_digest(text.rstrip())} -->\n"


def is_unedited_card(text: str) -> bool:
    """A signed card whose text matches its signature, or an unsigned card of an hf_vla version that did not sign
    (its front matter names the library)."""
    body, _, signature = text.rstrip().rpartition("\n\n<!-- hf-vla push: ")
    if body:
        return signature == f"{_digest(body)} -->"
    front_matter = text.split("---", 2)[1] if text.startswith("---") and text.count("---") >= 2 else ""
    return "library_name: hf_vla" in front_matter


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# What save_pretrained (model, processor, tokenizer), Trainer and train_vla write at a model directory's top level
WRITTEN_FILES = {
    "config.json", "generation_config.json", "processor_config.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "model.safetensors.index.json", "eval_results.json", "train_results.json", "all_results.json",
    "trainer_state.json", "training_recipe.yaml",
}  # fmt: skip


def _is_release_file(name: str) -> bool:
    """A file an hf_vla release writes (so a later release may delete it): weights, the known configs and results,
    the generated remote-code modules and the FAST tokenizer's folder. Other files on the branch (a LICENSE, an
    endpoint's handler.py) are the user's."""
    if name.startswith(f"{ACTION_TOKENIZER_DIR}/"):
        return True
    if "/" in name:
        return False
    return name in WRITTEN_FILES or fnmatch(name, "model*.safetensors") or name in generated_module_names()


if __name__ == "__main__":
    from ..testing import build_tiny_vla, scratch_dir

    class OfflineApi:
        """Stands in for HfApi so that nothing leaves the machine: reports what push_model would send."""

        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            print(f"would create {'private' if private else 'public'} repo {repo_id} (exist_ok={exist_ok})")

        def repo_info(self, repo_id):
            return type("RepoInfo", (), {"private": None})()

        def create_branch(self, repo_id, branch, exist_ok=False):
            print(f"would create branch {branch} of {repo_id} (exist_ok={exist_ok})")

        def list_repo_files(self, repo_id, revision=None):
            return []

        def upload_folder(self, folder_path, repo_id, allow_patterns, revision=None, commit_message=None,
                          delete_patterns=None):
            return f"would upload {len(allow_patterns)} files to {repo_id}@{revision or 'main'}: {commit_message!r}"

    HfApi = OfflineApi  # push_model looks HfApi up in this module
    model_dir = scratch_dir("push_demo_")
    model, processor = build_tiny_vla("oft", out_dir=model_dir)  # its backbone stays in model_dir/vlm, as in training
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    print(push_model(model_dir, "tester/tiny-oft", private=True, remote_code=True))
    shipped = release_files(model_dir)
    kept = sorted({str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()} - set(shipped))
    print(f"shipped ({len(shipped)}):", ", ".join(shipped))
    print(f"kept back ({len(kept)}):", ", ".join(kept))
