"""Model cards rendered from `model_cards/` templates with facts read from a model directory."""

from __future__ import annotations

import json
import keyword
import re
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData

from ..normalization import describe_action_mode, is_relative

STARVLA_NAMES = {"oft": "StarVLA QwenOFT", "gr00t": "StarVLA QwenGR00T", "pi": "StarVLA QwenPI",
                 "pi_v3": "StarVLA QwenPI_v3", "fast": "StarVLA QwenFast", "bins": "OpenVLA-style bins"}  # fmt: skip
HEADS = {
    "oft": "an MLPResNet that regresses every action step from its action-query token in one forward pass (L1)",
    "gr00t": "a flow-matching DiT that cross-attends to the last VLM layer",
    "pi": "a layer-wise flow-matching DiT whose block i cross-attends to VLM layer i",
    "pi_v3": "a compressed layer-wise flow-matching DiT (per-layer LayerNorm + Linear projectors)",
    "fast": "FAST action tokens (DCT + BPE) decoded autoregressively from the VLM's own vocabulary",
    "bins": "uniform per-dimension action bins decoded as tokens of the VLM's vocabulary",
}
RELEASE_FILES = ("training_recipe.yaml", "eval_results.json")


def template_path() -> Path:
    """The card template shipped with the package (a copy of model_cards/vla_model_card.md)."""
    return Path(str(resources.files("hf_vla.hub").joinpath("vla_model_card.md")))


def parameter_table(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Parameters per top-level block: vision tower, language model, LM head, and each action-head child."""
    rows = []
    for name, module in model.named_children():
        if name == "vlm":
            rows += [(f"vlm.model.{n}", sum(p.numel() for p in m.parameters()))
                     for n, m in module.model.named_children()]
            lm_head = module.get_output_embeddings()
            tied = lm_head is not None and lm_head.weight is module.get_input_embeddings().weight
            if lm_head is not None and not tied:
                rows.append(("vlm.lm_head", lm_head.weight.numel()))
        else:
            children = list(module.named_children()) or [("", module)]
            rows += [(f"{name}.{n}".rstrip("."), sum(p.numel() for p in m.parameters())) for n, m in children]
    return [(n, c) for n, c in rows if c]


def build_model_card(
    model_dir: str | Path,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    template: str | Path | None = None,
    revision: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
) -> ModelCard:
    """Renders the card of a saved model directory (config, processor and optional recipe/evaluation files).
    `revision`: the branch the card is pushed to; its usage snippets then load that branch. `license="other"` takes
    the licence's `license_name` (and `license_link`), as the Hub asks of it."""
    if license == "other" and not license_name:
        raise ValueError("license_name: a licence 'other' needs its name (e.g. qwen-research) and, best, license_link")
    from ..auto import AutoModelForVLA
    from ..processing_vla import VLAProcessor

    model_dir = Path(model_dir)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForVLA.from_config(config)
    table = parameter_table(model)
    processor = VLAProcessor.from_pretrained(model_dir)
    recipe_path = model_dir / "training_recipe.yaml"
    recipe = recipe_path.read_text(encoding="utf-8") if recipe_path.exists() else None
    evaluation, held_out = _evaluation(model_dir / "eval_results.json")
    datasets = list(datasets or _recipe_datasets(recipe))
    variant = config.variant
    repo_id = repo_id or model_dir.name
    card_data = ModelCardData(
        library_name="hf_vla",
        pipeline_tag="robotics",
        license=license,
        license_name=license_name,
        license_link=license_link,
        base_model=base_model_of(config),
        datasets=[d for d in datasets if _looks_like_hub_id(d)] or None,
        tags=sorted({"robotics", "vision-language-action", "hf_vla", f"vla_{variant}", *(tags or [])}),
    )
    normalisation = [
        {"key": key, "action_modes": _modes(stats.get("action")), "state_modes": _modes(stats.get("state")),
         "relative_to_state": _relative_to_state(processor.embodiment_action_mode(key)),
         "transitions": stats.get("num_transitions", "–")}
        for key, stats in processor.norm_stats.items()
    ]  # fmt: skip
    return ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        revision_arg=f', revision="{revision}"' if revision not in (None, "main") else "",
        variant=f"vla_{variant}",
        starvla_name=STARVLA_NAMES.get(variant, variant),
        head_description=HEADS.get(variant, "an action head"),
        backbone=config.vlm_config.model_type,
        base_model=card_data.base_model,
        action_horizon=config.action_horizon,
        action_dim=config.action_dim,
        state_dim=config.state_dim,
        state_usage=_state_usage(config, processor, model),
        prompt_template=config.prompt_template,
        cameras=processor.camera_names,
        camera_variables=_variable_names(processor.camera_names),
        image_size=processor.image_size,
        normalisation=normalisation,
        default_unnorm_key=next(iter(processor.norm_stats), "…"),
        # relative actions decode to absolute ones only with the state they were predicted from
        default_relative=is_relative(processor.embodiment_action_mode(next(iter(processor.norm_stats), None))),
        parameter_table=table,
        total_parameters=sum(c for _, c in table),
        # a local folder is named, not located: its path means nothing on the Hub
        datasets=[f"[{d}](https://huggingface.co/datasets/{d})" if _looks_like_hub_id(d)
                  else f"`{Path(d).name}` (local)"
                  for d in datasets],  # fmt: skip
        recipe=recipe.strip() if recipe else None,
        evaluation=evaluation,
        held_out=held_out,
        remote_code=bool(config.auto_map) if hasattr(config, "auto_map") else False,
    )


def _state_usage(config, processor, model) -> str:
    """How the model reads the robot state: prompt text, the action head's encoder, or not at all (FAST, and OFT
    without the state in its prompt, have no other input for it)."""
    if not config.state_dim:
        return "not used"
    if config.state_in_prompt:
        written = "action tokens" if processor.state_token_template else "numbers"
        return (f"{config.state_dim} dimensions, written into the prompt as {written}: each dimension's bin among "
                f"{processor.state_bins} uniform bins over [-1, 1]")
    if model.reads_state:
        return f"{config.state_dim} dimensions, encoded by the action head"
    return f"{config.state_dim} dimensions in the statistics, but this model does not read the state"


def _variable_names(cameras: list[str]) -> list[str]:
    """The usage snippet's variable for each camera view: its name where that is a Python identifier, else the name
    with other characters replaced (LeRobot's `observation.images.top` would read as an attribute lookup)."""
    names = []
    for camera in cameras:
        name = re.sub(r"\W", "_", camera)
        name = f"view_{name}" if not name.isidentifier() or keyword.iskeyword(name) else name
        while name in names:  # `cam-1` and `cam_1`
            name += "_"
        names.append(name)
    return names


def _relative_to_state(mode: str | list[str]) -> str:
    return mode if isinstance(mode, str) else describe_action_mode(mode)


def _modes(stats) -> str:
    if not stats:
        return "–"
    modes = stats["mode"]
    return modes[0] if len(set(modes)) == 1 else ", ".join(modes)


def base_model_of(config) -> str | None:
    """The hub id of the backbone the model `config` describes was built from, or None for a local one."""
    return _base_model(config.base_vlm)


def _base_model(base_vlm: str | None) -> str | None:
    """The hub id of the backbone a model was built from: `base_vlm` itself, or the repository of a hub-cache
    snapshot folder (`.../models--Qwen--Qwen2.5-VL-3B-Instruct/snapshots/<commit>`); None for other local folders."""
    cached = re.search(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/[^/]+/?$", base_vlm or "")
    if cached:
        return "/".join(cached.groups())
    return base_vlm if _looks_like_hub_id(base_vlm) else None


def _looks_like_hub_id(value) -> bool:
    return (isinstance(value, str) and value.count("/") == 1 and not value.startswith((".", "/"))
            and not Path(value).exists())


def _recipe_datasets(recipe: str | None) -> list[str]:
    """The training data a recipe names: `data.lerobot` (train_vla's key), the entries of `data.mixture` (inline, or
    a mixture file that is still where the recipe says), or `data.datasets` / `dataset` / `path`."""
    if not recipe:
        return []
    import yaml

    data = (yaml.safe_load(recipe) or {}).get("data", {}) or {}
    mixture, base = data.get("mixture"), None
    if isinstance(mixture, str) and Path(mixture).is_file():
        mixture, base = yaml.safe_load(Path(mixture).read_text(encoding="utf-8")), Path(mixture).parent
    if isinstance(mixture, dict):
        found = mixture.get("datasets") or []
    else:
        found = data.get("lerobot") or data.get("datasets") or data.get("dataset") or data.get("path") or []
    found = [found] if isinstance(found, (str, dict)) else found
    names = [str(d.get("path") or d.get("repo_id")) if isinstance(d, dict) else str(d) for d in found]
    # a mixture file's relative paths are relative to its folder (as load_mixture reads them)
    return [str(base / name) if base is not None and (base / name).exists() else name for name in names]


def _evaluation(path: Path) -> tuple[list[dict], list[tuple[str, float]]]:
    """From an `eval_results.json`: closed-loop rows (`{"tasks": {name: {"success_rate", "episodes", "ci95": [lo,
    hi]}}}`, written by `hf-vla eval`) and the held-out action errors that `Trainer.save_metrics("eval")` writes into
    the same file (`eval_action_l1`, ...)."""
    if not path.exists():
        return [], []
    report = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for task, result in report.get("tasks", {}).items():
        low, high = result.get("ci95") or (None, None)
        interval = f"{100 * low:.1f}–{100 * high:.1f}%" if None not in (low, high) else "–"
        rows.append({"task": task, "success_rate": result["success_rate"], "episodes": result["episodes"],
                     "interval": interval})  # fmt: skip
    held_out = [(key.removeprefix("eval_"), float(value)) for key, value in report.items()
                if key.startswith("eval_action_") and isinstance(value, (int, float))]  # fmt: skip
    return rows, held_out


if __name__ == "__main__":
    from ..testing import build_tiny_vla, scratch_dir

    model_dir = scratch_dir("card_demo_") / "tiny-oft"
    model, processor = build_tiny_vla("oft")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (model_dir / "training_recipe.yaml").write_text("model:\n  variant: oft\ndata:\n  lerobot: lerobot/pusht\n")
    closed_loop = {"push-t": {"success_rate": 0.75, "episodes": 20, "ci95": [0.53, 0.89]}}
    (model_dir / "eval_results.json").write_text(json.dumps({"tasks": closed_loop, "eval_action_l1": 0.042}))
    card = build_model_card(model_dir, repo_id="tester/tiny-oft")
    print("metadata:", card.data.to_dict())
    lines = card.text.strip().splitlines()
    print("\n".join(lines[:5]))
    print(f"[... {len(lines)} lines; its tables:]")
    print("\n".join(line for line in lines if line.startswith("|") and not line.startswith("| ---")))
