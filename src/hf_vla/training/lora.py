"""PEFT LoRA on a composed VLA: adapters on the backbone's language model, the action head trained in full.

    model = AutoModelForVLA.from_pretrained(base_dir)   # load from a directory: see the note below
    peft_model = add_lora(model, r=8, alpha=16)         # LoRA on the LLM layers' attention / MLP projections
    VLATrainer(peft_model, args, ...).train()
    peft_model.save_pretrained(adapter_dir)              # adapter_config.json + adapter_model.safetensors
    processor.save_pretrained(adapter_dir)               # its statistics: the folder alone then makes a policy
    PeftModel.from_pretrained(AutoModelForVLA.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    AutoModelForVLA.from_pretrained(adapter_dir)         # or the base with the adapter applied, through PEFT

`target` is "language_model" (attention q/k/v/o and MLP gate/up/down projections of every LLM layer; the vision
tower and the merger stay frozen), "attention" (the attention projections only), or any regex PEFT matches with
`re.fullmatch` against module names. Heads with parameters (OFT's MLP, GR00T's DiT, π's expert, …) become
`modules_to_save` and train in full; token heads (FAST, bins) have none, so only the adapters train unless
`train_embeddings=True` also trains the action tokens' rows (`num_action_tokens` of them, from
`action_token_offset`) of the input embeddings and of `lm_head`, through PEFT's `trainable_token_indices`: every
other row stays as it was. A backbone with tied embeddings (Qwen2.5-VL-3B, Qwen3-VL-4B) trains those rows once, for
both, and its merged model stays tied; an untied one trains them in each matrix.

Note (PEFT): `adapter_config.json` records `base_model_name_or_path` from `model.name_or_path`. A model built with
`from_vlm` / `from_config` has none, so the adapter cannot later resolve its base. `add_lora` warns; save the base
with `save_pretrained` and load it back (or pass `base_model_name_or_path=`) before adding the adapter.

`trainers/train_vla.py` does all of this from a recipe's `lora:` section (see trainers/README.md, "LoRA").
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.utils import logging

logger = logging.get_logger(__name__)

LANGUAGE_MODEL_LAYERS = r".*vlm\.model\.language_model\.layers\.\d+\."
TARGETS = {
    "language_model": LANGUAGE_MODEL_LAYERS + r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "attention": LANGUAGE_MODEL_LAYERS + r"self_attn\.(q|k|v|o)_proj",
}
# Top-level children of a VLA that are not the backbone: trained in full with `train_head=True`.
BACKBONE_CHILDREN = ("vlm",)


def head_modules(model) -> list[str]:
    """Names of the VLA's top-level children that are not the backbone and hold parameters (the action head,
    state projections, …)."""
    return [name for name, child in model.named_children()
            if name not in BACKBONE_CHILDREN and any(True for _ in child.parameters())]  # fmt: skip


def lora_config(
    model,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target: str = "language_model",
    train_head: bool = True,
    train_embeddings: bool = False,
    modules_to_save: Sequence[str] | None = None,
    **kwargs,
):
    """The `peft.LoraConfig` that `add_lora` applies (see the module docstring)."""
    from peft import LoraConfig

    target_modules = TARGETS.get(target, target)
    saved = list(modules_to_save) if modules_to_save is not None else []
    if modules_to_save is None and train_head:
        saved = head_modules(model)
    if train_embeddings:
        kwargs["trainable_token_indices"] = trainable_action_tokens(model)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      modules_to_save=saved or None, **kwargs)  # fmt: skip


def action_token_ids(model) -> list[int]:
    """Ids of a token-head VLA's action tokens (the rows `from_vlm` reserved for them)."""
    offset = getattr(model.config, "action_token_offset", None)
    if offset is None:
        raise ValueError(f"train_embeddings: {type(model).__name__} has no action tokens in its vocabulary (only the "
                         "token heads FAST and bins do); to train whole embedding matrices, pass "
                         "modules_to_save=[..., 'embed_tokens', 'lm_head']")  # fmt: skip
    return list(range(offset, offset + model.config.num_action_tokens))


def trainable_action_tokens(model) -> dict[str, list[int]]:
    """`trainable_token_indices`: the action-token rows of the input embeddings and of the LM head, under their full
    module names (PEFT recognises a tied LM head only by its full name, and then trains one copy of the rows)."""
    ids = action_token_ids(model)
    layers = (model.get_input_embeddings(), model.get_output_embeddings())
    names = {module: name for name, module in model.named_modules()}
    return {names[layer]: ids for layer in layers}


def trains_tied_token_rows(peft_model) -> bool:
    """Whether `peft_model` (from `add_lora`) trains action-token rows that tied input embeddings and LM head share:
    PEFT then wraps both in trainable-tokens layers over one weight and one set of rows."""
    adapter = getattr(peft_model.get_base_model().get_output_embeddings(), "token_adapter", None)
    return adapter is not None and adapter.tied_adapter is not None


def add_lora(
    model,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target: str = "language_model",
    train_head: bool = True,
    train_embeddings: bool = False,
    modules_to_save: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    **kwargs,
):
    """Wraps a VLA (or a plain VLM, whose modules carry no `vlm.` prefix: pass a regex `target`) in a `PeftModel`.

    `train_embeddings=True` (FAST, bins) also trains the action tokens' rows of the input embeddings and `lm_head`,
    and nothing else of them. Returns the `PeftModel`; `peft_model.print_trainable_parameters()` reports what trains.
    Extra keyword arguments go to `LoraConfig` (e.g. `use_rslora=True`).
    """
    from peft import get_peft_model

    config = lora_config(model, r=r, alpha=alpha, dropout=dropout, target=target, train_head=train_head,
                         train_embeddings=train_embeddings, modules_to_save=modules_to_save, **kwargs)  # fmt: skip
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = str(base_model_name_or_path)
        model.name_or_path = str(base_model_name_or_path)
    elif not getattr(model, "name_or_path", None):
        logger.warning("add_lora: the model has no name_or_path (built with from_vlm / from_config?), so the adapter's "
                       "base_model_name_or_path will be empty; save and reload the base, or pass "
                       "base_model_name_or_path=")  # fmt: skip
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # peft's NoMatchingPeftModuleError
        if "No modules were targeted" not in str(err):
            raise
        raise ValueError(f"add_lora: target {config.target_modules!r} matched no module of {type(model).__name__} "
                         "(module names look like 'vlm.model.language_model.layers.0.self_attn.q_proj')") from err
    if not any(True for _ in _lora_parameters(peft_model)):
        raise ValueError(f"add_lora: target {config.target_modules!r} matched no module of {type(model).__name__}")
    return peft_model


def _lora_parameters(model):
    return (p for n, p in model.named_parameters() if "lora_" in n)


__all__ = ["TARGETS", "action_token_ids", "add_lora", "head_modules", "lora_config", "trainable_action_tokens",
           "trains_tied_token_rows"]


if __name__ == "__main__":

    import torch

    from ..auto import AutoModelForVLA
    from ..testing import build_tiny_vla, random_observation, scratch_dir, train_steps

    torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a shared CPU
    work_dir = scratch_dir("lora_demo_")
    model, processor = build_tiny_vla("oft")
    model.save_pretrained(work_dir / "base")  # the adapter records where its base lives (see the module docstring)
    model = AutoModelForVLA.from_pretrained(work_dir / "base")
    total = model.num_parameters()
    peft_model = add_lora(model, r=4, alpha=8)
    trainable = {name: param.numel() for name, param in peft_model.named_parameters() if param.requires_grad}
    adapted = sorted({name.split(".lora_")[0].split("language_model.")[1] for name in trainable if "lora_" in name})
    adapters = sum(count for name, count in trainable.items() if "lora_" in name)
    print(f"LoRA r=4 on {len(adapted)} projections of the LLM: {adapted[0]}, ..., {adapted[-1]}")
    print(f"trainable {sum(trainable.values()):,} of {total:,} base parameters: {adapters:,} in LoRA adapters, "
          f"{sum(trainable.values()) - adapters:,} in the fully trained head {head_modules(model)}")
    inputs = processor(**random_observation(processor, with_actions=True))
    losses = train_steps(peft_model, inputs, steps=8, lr=2e-3)
    print("training losses (one batch):", [round(loss, 4) for loss in losses])
    peft_model.save_pretrained(work_dir / "adapter")
    print("adapter files:", sorted(path.name for path in (work_dir / "adapter").iterdir()))
