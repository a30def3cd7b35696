"""Multi-process training on CPU, launched the way trainers/README.md tells users: 2-process DDP over gloo (with
`accelerate launch` and with `torchrun`) and 2-process DeepSpeed ZeRO-2 and ZeRO-3. Each run is a bounded subprocess."""

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from hf_vla import AutoModelForVLA

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "trainers" / "recipes"
TINY_RUN = [
    "--trainer.max_steps", "3", "--trainer.logging_steps", "1", "--trainer.save_steps", "2",
    "--trainer.disable_tqdm", "true", "--trainer.per_device_train_batch_size", "2",
    "--model.image_size", "[28, 28]", "--model.action_horizon", "4",
    "--data.synthetic.num_episodes", "2", "--data.synthetic.length", "8", "--data.eval_split", "0",
]  # fmt: skip
LAUNCHERS = {
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "trainers" / "accelerate" / "ddp.yaml"), "--num_processes", "2"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
}  # fmt: skip

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, output_dir: Path, *overrides: str, recipe: str = "oft", timeout: int = 300,
           succeeds: bool = True) -> str:
    # a fresh rendezvous port per run: a default port still held by an earlier run would hang the new one
    port = ["--main_process_port" if launcher == "accelerate" else "--master_port", str(free_port())]
    command = [*LAUNCHERS[launcher], *port, str(REPO / "trainers" / "train_vla.py"), str(RECIPES / f"{recipe}.yaml"),
               "--trainer.output_dir", str(output_dir), *TINY_RUN, *overrides]  # fmt: skip
    return run_bounded(command, output_dir.parent / f"{launcher}.log", timeout, succeeds)


def run_bounded(command: list[str], log_path: Path, timeout: int, succeeds: bool = True) -> str:
    """Runs a launcher command to its end or `timeout`, then kills whatever it left running; returns its output
    (and fails the test unless the command exited with 0, or with an error when `succeeds` is False)."""
    marker = f"{os.getpid()}-{log_path}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_VLA_TEST_LAUNCH=marker,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))  # fmt: skip
    # Output goes to a file, not a pipe: a worker that outlives its launcher would keep a pipe open and block the read.
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_launch(process, marker)
            pytest.fail(f"{log_path.stem} run did not finish within {timeout} s:\n{log_path.read_text()[-6000:]}")
        finally:
            kill_launch(process, marker)  # workers left behind by a launcher that exited
    output = log_path.read_text()
    assert (process.returncode == 0) == succeeds, output[-6000:]
    return output


def kill_launch(process: subprocess.Popen, marker: str):
    """Kills the launcher's process group and every process started with this run's marker in its environment
    (elastic launchers may put workers in sessions of their own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    needle = f"HF_VLA_TEST_LAUNCH={marker}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


def trained_steps(output_dir: Path) -> list[dict]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    return [entry for entry in state["log_history"] if "loss" in entry]


def assert_loadable(output_dir: Path):
    model = AutoModelForVLA.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    assert model.config.action_horizon == 4 and processor.camera_names == ["primary", "wrist"]
    assert (output_dir / "training_recipe.yaml").is_file()


def test_ddp_accelerate_launch_with_activation_checkpointing(tmp_path):
    # checkpointing + OFT's unused lm_head is the combination that breaks DDP unless find_unused_parameters is on
    output = launch("accelerate", tmp_path / "run", "--trainer.activation_checkpointing", "true")
    assert "world size 2" in output
    assert len(trained_steps(tmp_path / "run")) == 3
    assert_loadable(tmp_path / "run")


def test_ddp_torchrun_co_training(tmp_path):
    from test_training import write_chat_data

    chat = write_chat_data(tmp_path)
    output = launch("torchrun", tmp_path / "run", "--data.vlm_chat", str(chat), "--data.chat_batch_size", "1")
    assert "world size 2" in output
    steps = trained_steps(tmp_path / "run")
    assert all("action_loss" in entry and "vlm_loss" in entry for entry in steps)
    assert_loadable(tmp_path / "run")


@pytest.mark.deepspeed
def test_deepspeed_zero2_saves_a_loadable_model(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 avoids building its ops)")
    # the first run JIT-compiles DeepSpeed's shared-memory op (~40-80 s, cached in ~/.cache/torch_extensions)
    deepspeed_config = str(REPO / "trainers" / "deepspeed" / "zero2.json")
    output = launch("torchrun", tmp_path / "run", "--trainer.deepspeed", deepspeed_config, timeout=480)
    assert "world size 2; DeepSpeed ZeRO-2" in output
    assert (tmp_path / "run" / "checkpoint-2" / "global_step2").is_dir()  # DeepSpeed's own optimizer state
    assert len(trained_steps(tmp_path / "run")) == 3
    assert_loadable(tmp_path / "run")


@pytest.mark.deepspeed
def test_deepspeed_zero3_gathers_the_trained_weights_on_save(tmp_path):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 avoids building its ops)")
    from safetensors.torch import load_file

    # PI_v3: a layer-wise head with frozen modules (proj_out_1/2, state_encoder), the case ZeRO-3 partitions unevenly
    deepspeed_config = str(REPO / "trainers" / "deepspeed" / "zero3.json")
    output = launch("torchrun", tmp_path / "run", "--trainer.deepspeed", deepspeed_config, recipe="pi_v3", timeout=480)
    assert "world size 2; DeepSpeed ZeRO-3" in output
    assert len(trained_steps(tmp_path / "run")) == 3
    # every tensor whole (ZeRO-3 holds 1/2 of each per rank; an ungathered save writes empty tensors)
    final = load_file(tmp_path / "run" / "model.safetensors")
    step2 = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    AutoModelForVLA.from_pretrained(tmp_path / "run").save_pretrained(tmp_path / "plain")  # a one-process save
    expected = {name: tensor.shape for name, tensor in load_file(tmp_path / "plain" / "model.safetensors").items()}
    assert {name: tensor.shape for name, tensor in final.items()} == expected
    # the third step changed the trained head and left the frozen modules as they were
    head = "action_head.model.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(final[head], step2[head])
    frozen = [name for name in final if ".proj_out_" in name or ".state_encoder." in name]
    assert frozen and all(torch.equal(final[name], step2[name]) for name in frozen)
    assert_loadable(tmp_path / "run")


# ------------------------------------------------------------------ LoRA (trainers/README.md, "LoRA")

LORA_RUN = ["--lora.r", "4", "--trainer.learning_rate", "1e-2"]


def assert_merged_is_base_plus_adapter(output_dir: Path) -> dict:
    """The output directory holds the plain model PEFT makes of lora_base/ + lora_adapter/ in one process (same keys,
    equal tensors) and the adapter moved the base; returns the adapter's tensors."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base_dir, adapter_dir = output_dir / "lora_base", output_dir / "lora_adapter"
    base = AutoModelForVLA.from_pretrained(base_dir)
    base_weights = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    expected = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()
    merged = load_file(output_dir / "model.safetensors")
    assert merged.keys() == load_file(base_dir / "model.safetensors").keys()  # a plain model's names, no PEFT prefix
    reloaded = AutoModelForVLA.from_pretrained(output_dir).state_dict()
    assert reloaded.keys() == expected.keys()
    assert max((reloaded[name] - expected[name]).abs().max().item() for name in expected) == 0
    assert not torch.equal(expected["vlm.model.language_model.layers.0.self_attn.q_proj.weight"],
                           base_weights["vlm.model.language_model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    assert not list(output_dir.glob("*.tmp-*"))  # every rank's private build renamed or removed
    assert_loadable(output_dir)
    return load_file(adapter_dir / "adapter_model.safetensors")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_ddp_lora_with_activation_checkpointing_merges_and_resumes_exactly(tmp_path):
    """PEFT + checkpointing + DDP (the case that fails with "Expected to mark a variable ready only once" when
    checkpointing is reentrant); its checkpoint-2 adapter, resumed under torchrun, ends on the same losses and
    merged weights."""
    from safetensors.torch import load_file

    run = [*LORA_RUN, "--trainer.activation_checkpointing", "true"]
    output = launch("accelerate", tmp_path / "run", *run)
    assert "with LoRA r=4" in output and "world size 2" in output
    steps = trained_steps(tmp_path / "run")
    assert len(steps) == 3
    assert_merged_is_base_plus_adapter(tmp_path / "run")

    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    launch("torchrun", tmp_path / "resumed", *run, "--trainer.resume_from_checkpoint", str(checkpoint))
    assert [entry["loss"] for entry in trained_steps(tmp_path / "resumed")] == [entry["loss"] for entry in steps]
    assert not (tmp_path / "resumed" / "lora_base").exists()  # the checkpoint's base, not a new one
    merged, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("run", "resumed"))
    assert merged.keys() == resumed.keys() and all(torch.equal(merged[name], resumed[name]) for name in merged)


def test_ddp_refuses_reentrant_activation_checkpointing_before_training(tmp_path):
    # without the check, both ranks fail at the first backward: "Expected to mark a variable ready only once"
    output = launch("accelerate", tmp_path / "run", *LORA_RUN, "--trainer.activation_checkpointing", "true",
                    "--trainer.activation_checkpointing_kwargs", "{use_reentrant: true}", succeeds=False)  # fmt: skip
    assert "activation_checkpointing_kwargs: use_reentrant=True does not work under DDP" in output
    assert "mark a variable ready only once" not in output and not (tmp_path / "run" / "checkpoint-2").exists()


@pytest.mark.deepspeed
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_lora_merges_the_gathered_adapter(stage, tmp_path):
    """Under ZeRO-3 each rank holds half of every tensor: the adapter is saved whole (the engine gathers it) and the
    merged model is made from it and the base on the main process, not from the engine's (prefixed) weights."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 avoids building its ops)")
    from peft import get_peft_model_state_dict

    from hf_vla.training import add_lora

    deepspeed_config = str(REPO / "trainers" / "deepspeed" / f"zero{stage}.json")
    output = launch("torchrun", tmp_path / "run", *LORA_RUN, "--trainer.deepspeed", deepspeed_config, timeout=480)
    assert f"world size 2; DeepSpeed ZeRO-{stage}" in output
    assert len(trained_steps(tmp_path / "run")) == 3
    adapter = assert_merged_is_base_plus_adapter(tmp_path / "run")
    one_process = get_peft_model_state_dict(add_lora(AutoModelForVLA.from_pretrained(tmp_path / "run" / "lora_base"),
                                                     r=4))  # fmt: skip
    assert {name: tensor.shape for name, tensor in adapter.items()} == \
        {name: tensor.shape for name, tensor in one_process.items()}  # fmt: skip
    assert all(tensor.abs().max() > 0 for name, tensor in adapter.items() if "lora_B" in name)  # trained from zero


@pytest.mark.deepspeed
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_deepspeed_zero3_trains_tied_action_token_rows(tmp_path):
    """What FSDP2 refuses (trainable tokens on tied embeddings, see train_vla.check_lora_sharding) ZeRO-3 trains: the
    merged model is base + adapter, still tied, with the action tokens' rows trained and no other row changed."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed; DS_BUILD_OPS=0 avoids building its ops)")
    output = launch("torchrun", tmp_path / "run", *LORA_RUN, "--lora.train_embeddings", "true",
                    "--model.tiny_vlm.tie_word_embeddings", "true", "--trainer.deepspeed",
                    str(REPO / "trainers" / "deepspeed" / "zero3.json"), recipe="bins", timeout=480)  # fmt: skip
    assert "world size 2; DeepSpeed ZeRO-3" in output
    adapter = assert_merged_is_base_plus_adapter(tmp_path / "run")
    merged, base = (AutoModelForVLA.from_pretrained(tmp_path / "run" / name) for name in (".", "lora_base"))
    assert all(model.vlm.lm_head.weight is model.get_input_embeddings().weight for model in (merged, base))
    rows = (merged.get_input_embeddings().weight != base.get_input_embeddings().weight).any(dim=1).nonzero().flatten()
    offset, count = merged.config.action_token_offset, merged.config.num_action_tokens
    assert rows.tolist() == list(range(offset, offset + count))
    deltas = [tensor for name, tensor in adapter.items() if "trainable_tokens_delta" in name]
    assert [tuple(delta.shape) for delta in deltas] == [(count, merged.config.vlm_config.text_config.hidden_size)]


# ------------------------------------------------------------------ FSDP2 (accelerate's sharding, on CPU processes)

FSDP_CONFIG = REPO / "trainers" / "accelerate" / "fsdp.yaml"
FSDP_CASES = {  # variant: (family, backbone text-config overrides)
    "oft": ("qwen2_5_vl", {"tie_word_embeddings": True}),  # LM head tied to the input embeddings, as Qwen2.5-VL-3B's
    "pi": ("qwen3_vl", {}),  # the head cross-attends to every VLM layer's hidden states
}
FSDP_LORA_CASES = {  # case: (variant, backbone text-config overrides, add_lora settings), on Qwen2.5-VL
    "oft_lora": ("oft", {"tie_word_embeddings": True}, {"r": 4}),  # the head in modules_to_save, a tied backbone
    "bins_lora": ("bins", {}, {"r": 4, "train_embeddings": True}),  # the action-token rows of both matrices
}
FLOW_VARIANTS = ("gr00t", "pi", "pi_v3")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("variant", ["oft", "fast", "gr00t", "pi", "pi_v3", "bins"])
def test_fsdp_config_wraps_each_layer_of_either_backbone_and_head(variant, family, monkeypatch):
    """fsdp.yaml names no layer class: accelerate then wraps the model's `_no_split_modules`, which `post_init`
    gathers from the backbone (decoder layers, vision blocks) and the flow heads declare (DiT blocks)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from fsdp_worker import launch_environment
    from transformers import AutoConfig

    from hf_vla.testing import TINY_HEADS, build_tiny_tokenizer, tiny_vlm_config

    for name, value in launch_environment(str(FSDP_CONFIG)).items():
        monkeypatch.setenv(name, value)
    vlm_config = tiny_vlm_config(family, build_tiny_tokenizer(family))
    config = AutoConfig.for_model(f"vla_{variant}", vlm_config=vlm_config.to_dict(), action_dim=7, action_horizon=4,
                                  **TINY_HEADS[variant])  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForVLA.from_config(config)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(model)  # what fsdp2_prepare_model does first
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [name for name, module in model.named_modules() if name and wraps(module)]
    layers = [f"vlm.model.language_model.layers.{i}" for i in range(vlm_config.text_config.num_hidden_layers)]
    blocks = [f"vlm.model.visual.blocks.{i}" for i in range(vlm_config.vision_config.depth)]
    head = getattr(model, "action_head", None)
    dit = [] if head is None or not hasattr(head, "model") else [
        f"action_head.model.transformer_blocks.{i}" for i in range(head.num_layers)
    ]  # fmt: skip
    assert sorted(units) == sorted(layers + blocks + dit)
    assert bool(dit) == (variant in ("gr00t", "pi", "pi_v3"))


def split_batch(batch: dict, start: int, stop: int) -> dict:
    """Samples `start:stop` of a processor batch: their rows of every tensor, their views' patches, and their copies
    in flow matching's `noise` / `time` (copy r of sample b is row r · batch + b)."""
    size = len(batch["input_ids"])
    views = len(batch["image_grid_thw"]) // size  # each sample's views are consecutive
    patch_offsets = torch.cat([torch.zeros(1, dtype=torch.long), batch["image_grid_thw"].prod(-1).cumsum(0)])
    part = {name: value[start:stop] for name, value in batch.items()}
    part["image_grid_thw"] = batch["image_grid_thw"][start * views : stop * views]
    part["pixel_values"] = batch["pixel_values"][patch_offsets[start * views] : patch_offsets[stop * views]]
    for name in ("noise", "time"):
        if name in batch:
            part[name] = batch[name].unflatten(0, (-1, size))[:, start:stop].flatten(0, 1)
    return part


def prepare_fsdp_case(case: Path, variant: str, family: str, vlm_overrides: dict, lora: dict | None = None) -> dict:
    """A tiny VLA saved in `case/initial` (with `lora`: add_lora's settings in `case/lora.json`), a batch of 4 and
    each rank's half of it; returns the batch."""
    from hf_vla.testing import build_tiny_vla, random_observation

    model, processor = build_tiny_vla(variant, case / "build", family=family, vlm_overrides=vlm_overrides,
                                      **({"dropout": 0.0} if variant in FLOW_VARIANTS else {}))  # fmt: skip
    model.save_pretrained(case / "initial")
    if lora is not None:
        (case / "lora.json").write_text(json.dumps(lora))
    batch = dict(processor(**random_observation(processor, batch_size=4, with_actions=True)))
    if variant in FLOW_VARIANTS:  # the flow-matching sample fixed, so that both runs draw the same
        generator = torch.Generator().manual_seed(0)
        copies = 4 * model.config.repeated_diffusion_steps
        batch["noise"] = torch.randn(copies, 4, 7, generator=generator)
        batch["time"] = torch.rand(copies, generator=generator)
    for rank in (0, 1):
        torch.save(split_batch(batch, 2 * rank, 2 * rank + 2), case / f"rank{rank}.pt")
    return batch


def sgd_step(model, batch: dict) -> float:
    """The step the FSDP worker takes, on one process."""
    loss = model(**batch).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return loss.item()


def predicted_actions(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval().predict_action(**inputs)


def vlm_loss(model, batch: dict) -> float:
    from fsdp_worker import chat_batch

    with torch.no_grad():
        return model.vlm_loss(**chat_batch(batch)).item()


def run_fsdp_worker(tmp_path: Path, cases) -> None:
    worker = str(Path(__file__).with_name("fsdp_worker.py"))
    command = [*LAUNCHERS["torchrun"], "--master_port", str(free_port()), worker, str(FSDP_CONFIG),
               *(str(tmp_path / case) for case in cases)]  # fmt: skip
    run_bounded(command, tmp_path / "fsdp.log", timeout=240)


def test_fsdp2_training_step_equals_the_one_process_step(tmp_path):
    """Two gloo processes, each with half the batch, sharded as fsdp.yaml asks (accelerate's own FSDP2 code): one SGD
    step gives the loss and weights one process gives on the whole batch; the gathered weights save and load as a
    model that predicts what that one-process model predicts, and so does the sharded model itself (its VLM loss
    too), where VLATrainer runs it outside forward."""
    from fsdp_worker import prediction_inputs

    batches = {variant: prepare_fsdp_case(tmp_path / variant, variant, family, overrides)
               for variant, (family, overrides) in FSDP_CASES.items()}  # fmt: skip
    run_fsdp_worker(tmp_path, batches)

    accelerates_own_units = {"vlm.model.language_model.embed_tokens", "vlm.lm_head"}  # one unit when tied (OFT's)
    for variant, batch in batches.items():
        case = tmp_path / variant
        run = json.loads((case / "fsdp" / "run.json").read_text())
        reference = AutoModelForVLA.from_pretrained(case / "initial")
        assert run["wrapped"] == sorted(reference._no_split_modules)
        dit_blocks = {f"action_head.model.transformer_blocks.{i}" for i in range(2)} if variant == "pi" else set()
        assert accelerates_own_units | dit_blocks <= set(run["units"])
        initial = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
        assert run["loss"] == pytest.approx(sgd_step(reference, batch), abs=1e-5)

        gathered = AutoModelForVLA.from_pretrained(case / "fsdp")
        weights, expected = gathered.state_dict(), reference.state_dict()
        assert weights.keys() == expected.keys()
        assert max((weights[name] - expected[name]).abs().max().item() for name in expected) < 1e-5
        trained = {name for name in expected if not torch.equal(expected[name], initial[name])}
        assert {"vlm.model.language_model.layers.0.mlp.up_proj.weight", "vlm.model.visual.blocks.0.attn.qkv.weight",
                "vlm.model.language_model.embed_tokens.weight"} <= trained  # fmt: skip
        inputs = prediction_inputs(batch, seed=0)
        torch.testing.assert_close(predicted_actions(gathered, inputs), predicted_actions(reference, inputs),
                                   atol=1e-4, rtol=0)  # fmt: skip
        for rank, sharded in enumerate(run["per_rank"]):  # each rank's half
            half = torch.load(case / f"rank{rank}.pt")
            assert sharded["vlm_loss"] == pytest.approx(vlm_loss(reference, half), abs=1e-5)
            expected_actions = predicted_actions(reference, prediction_inputs(half, seed=rank))
            torch.testing.assert_close(torch.tensor(sharded["actions"]), expected_actions, atol=1e-4, rtol=0)


def test_fsdp2_lora_step_and_its_saved_adapter_equal_the_one_process_ones(tmp_path):
    """The PeftModel sharded as accelerate shards it under fsdp.yaml (LoRA and frozen base weights in the layers'
    units, OFT's head in modules_to_save, bins' trainable action-token rows in the embeddings' and LM head's units):
    one SGD step on two processes gives the one-process loss and trained parameters, the sharded model runs outside
    forward, and the adapter saved from the gathered state dict, merged into its base in one process, is the
    one-process trained model merged."""
    from fsdp_worker import prediction_inputs
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from hf_vla.training import add_lora
    from hf_vla.training.lora import action_token_ids

    batches = {case: prepare_fsdp_case(tmp_path / case, variant, "qwen2_5_vl", overrides, lora)
               for case, (variant, overrides, lora) in FSDP_LORA_CASES.items()}  # fmt: skip
    run_fsdp_worker(tmp_path, batches)

    for case_name, batch in batches.items():
        case, lora = tmp_path / case_name, FSDP_LORA_CASES[case_name][2]
        run = json.loads((case / "fsdp" / "run.json").read_text())
        layer_and_head = {"base_model.model.vlm.model.language_model.layers.0", "base_model.model.vlm.lm_head"}
        assert layer_and_head <= set(run["units"])
        torch.manual_seed(0)  # the worker's adapter initialisation
        reference = add_lora(AutoModelForVLA.from_pretrained(case / "initial"), **lora)
        assert run["loss"] == pytest.approx(sgd_step(reference, batch), abs=1e-5)

        adapter, expected = load_file(case / "fsdp" / "adapter_model.safetensors"), get_peft_model_state_dict(reference)
        assert adapter.keys() == expected.keys()
        assert max((adapter[name] - expected[name]).abs().max().item() for name in expected) < 1e-5
        assert all(adapter[name].abs().max() > 0 for name in adapter if "lora_B" in name)  # trained from zero
        for rank, sharded in enumerate(run["per_rank"]):
            half = torch.load(case / f"rank{rank}.pt")
            assert sharded["vlm_loss"] == pytest.approx(vlm_loss(reference, half), abs=1e-5)
            expected_actions = predicted_actions(reference, prediction_inputs(half, seed=rank))
            torch.testing.assert_close(torch.tensor(sharded["actions"]), expected_actions, atol=1e-4, rtol=0)

        base = AutoModelForVLA.from_pretrained(case / "initial")
        initial = {name: tensor.clone() for name, tensor in base.state_dict().items()}
        merged = PeftModel.from_pretrained(base, case / "fsdp").merge_and_unload().state_dict()
        one_process = reference.merge_and_unload().state_dict()
        assert merged.keys() == one_process.keys()
        assert max((merged[name] - one_process[name]).abs().max().item() for name in one_process) < 1e-5
        trained = {name for name in merged if not torch.equal(merged[name], initial[name])}
        assert "vlm.model.language_model.layers.0.self_attn.q_proj.weight" in trained
        assert not any("visual" in name for name in trained)  # the vision tower stays frozen
        if case_name == "oft_lora":
            assert any(name.startswith("action_head.") for name in trained)
        else:  # action tokens' rows (those the batch holds, for the input embeddings) and no other
            rows = set(action_token_ids(base))
            for name in ("vlm.model.language_model.embed_tokens.weight", "vlm.lm_head.weight"):
                changed = set((merged[name] != initial[name]).any(-1).nonzero().flatten().tolist())
                assert changed and changed <= rows
