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


def launch(launcher: str, output_dir: Path, *overrides: str, recipe: str = "oft", timeout: int = 300) -> str:
    # a fresh rendezvous port per run: a default port still held by an earlier run would hang the new one
    port = ["--main_process_port" if launcher == "accelerate" else "--master_port", str(free_port())]
    command = [*LAUNCHERS[launcher], *port, str(REPO / "trainers" / "train_vla.py"), str(RECIPES / f"{recipe}.yaml"),
               "--trainer.output_dir", str(output_dir), *TINY_RUN, *overrides]  # fmt: skip
    marker = f"{os.getpid()}-{output_dir}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_VLA_TEST_LAUNCH=marker,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))  # fmt: skip
    # Output goes to a file, not a pipe: a worker that outlives its launcher would keep a pipe open and block the read.
    log_path = output_dir.parent / f"{launcher}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_launch(process, marker)
            pytest.fail(f"{launcher} run did not finish within {timeout} s:\n{log_path.read_text()[-6000:]}")
        finally:
            kill_launch(process, marker)  # workers left behind by a launcher that exited
    output = log_path.read_text()
    assert process.returncode == 0, output[-6000:]
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
