"""One FSDP2 training step per case folder, sharded by accelerate's own FSDP2 code with the settings
`accelerate launch --config_file <config>` gives a process. Run under `torch.distributed.run` by
tests/test_distributed.py: accelerate enables FSDP for GPU process groups only, so this calls its sharding directly on
a CPU (gloo) group, in float32 (the config's bf16 mixed precision is the Trainer's, not applied here).

A case folder holds `initial/` (a saved VLA), `rank{r}.pt` (this process's half of the batch) and, for a LoRA case,
`lora.json` (add_lora's settings: the PeftModel is sharded, as Trainer hands it to accelerate). Rank 0 writes `fsdp/`:
the gathered model (a LoRA case: its adapter), saved from the sharded one as Trainer saves it, and `run.json` (the loss
over both halves, the shard units, the wrapped classes, and each rank's VLM loss and predicted actions after the
step)."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist


def launch_environment(config_file: str) -> dict:
    """The FSDP_* variables `accelerate launch --config_file config_file` sets in each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "--num_processes", "2", "train.py"])
    environment = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {name: value for name, value in environment.items() if name.startswith("FSDP_")}


def shard(model: torch.nn.Module):
    """What `Accelerator.prepare` does to the model under FSDP2, with the plugin read from the environment."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin()
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                  is_main_process=dist.get_rank() == 0, device=torch.device("cpu"))  # fmt: skip
    return fsdp2_prepare_model(accelerator, model), plugin.transformer_cls_names_to_wrap


def prediction_inputs(batch: dict, seed: int) -> dict:
    """`predict_action`'s inputs from a training batch; a flow head's starting noise drawn with `seed`."""
    inputs = {name: value for name, value in batch.items() if name not in ("actions", "noise", "time")}
    if "noise" in batch:
        inputs["noise"] = torch.randn(batch["actions"].shape, generator=torch.Generator().manual_seed(seed))
    return inputs


def chat_batch(batch: dict) -> dict:
    """A co-training chat batch from a training batch: the prompt tokens as their own labels."""
    chat = {name: batch[name] for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                           "mm_token_type_ids")}  # fmt: skip
    return {**chat, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)}


def initial_model(case: Path):
    """The case's saved VLA; with `lora.json` (add_lora's settings), wrapped in LoRA adapters initialised from seed 0,
    as the one-process run initialises them."""
    from hf_vla import AutoModelForVLA
    from hf_vla.training import add_lora

    model = AutoModelForVLA.from_pretrained(case / "initial")
    if not (case / "lora.json").is_file():
        return model
    torch.manual_seed(0)
    return add_lora(model, **json.loads((case / "lora.json").read_text()))


def train_step(case: Path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    from hf_vla.modeling_vla import register_fsdp_forward_methods

    rank = dist.get_rank()
    model, wrapped = shard(initial_model(case))
    units = sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))
    batch = torch.load(case / f"rank{rank}.pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    total = loss.detach().clone()
    dist.all_reduce(total)
    # what VLATrainer runs outside forward, on the sharded model: co-training's VLM loss (first, so that no forward
    # has gathered the root unit's parameters since the backward) and evaluation's prediction
    register_fsdp_forward_methods(model)
    with torch.no_grad():
        vlm_loss = model.vlm_loss(**chat_batch(batch)).item()
        actions = model.eval().predict_action(**prediction_inputs(batch, seed=rank)).tolist()
    outside_forward = {"vlm_loss": vlm_loss, "actions": actions}
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, outside_forward)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(case / "fsdp", state_dict=state)
        run = {"loss": total.item() / dist.get_world_size(), "units": units, "wrapped": sorted(wrapped),
               "per_rank": per_rank}  # fmt: skip
        (case / "fsdp" / "run.json").write_text(json.dumps(run))
    dist.barrier()


def main(config_file: str, *cases: str):
    os.environ.update(launch_environment(config_file))
    dist.init_process_group("gloo")
    try:
        for case in cases:
            train_step(Path(case))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
