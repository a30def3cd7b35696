import os
import tempfile
from pathlib import Path

# Tests never touch the network, and module/cache writes stay out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Child processes (CLI runs, launchers, the closed-loop training) train tiny models too: one thread each, like the
# one_thread fixture below gives this process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
_scratch = tempfile.mkdtemp(prefix="hf_vla_tests_")
os.environ.setdefault("HF_HOME", os.path.join(_scratch, "hf_home"))
os.environ.setdefault("HF_MODULES_CACHE", os.path.join(_scratch, "modules"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models train much faster on one intra-op thread, and far more steadily on a shared 2-core machine: with
    two threads a step waits for whichever core another process holds (measured 3-8x slower under load). Every test
    gets it; the modules that still name it in `pytestmark` opted in before it applied to the whole session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory):
    """One tiny random backbone directory per supported family, built once per session."""
    from hf_vla.testing import build_tiny_vlm

    root = tmp_path_factory.mktemp("vlms")
    return {family: build_tiny_vlm(root / family, family=family) for family in FAMILIES}


@pytest.fixture(scope="session")
def instruct_like_vlm(tiny_vlm_dirs, tmp_path_factory):
    """The tiny Qwen2.5-VL saved the way published Instruct checkpoints are: bf16 weights and a generation config
    with a repetition penalty."""
    import shutil

    from transformers import AutoModelForImageTextToText

    out = tmp_path_factory.mktemp("instruct_like") / "vlm"
    shutil.copytree(tiny_vlm_dirs["qwen2_5_vl"], out)
    vlm = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16)
    vlm.generation_config.repetition_penalty = 1.05
    vlm.save_pretrained(out)
    return str(out)


def random_views(rng, batch, cameras=2, size=48):
    return [[rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(cameras)] for _ in range(batch)]


def make_oft(vlm_dir, action_dim=7, action_horizon=4, state_dim=6, seed=0):
    """A tiny OFT model and its processor (two cameras, 56 px views) with statistics for embodiment 'bridge'."""
    from hf_vla import AutoModelForVLA, VLAProcessor

    torch.manual_seed(seed)
    model = AutoModelForVLA.from_vlm(
        vlm_dir, variant="oft", action_dim=action_dim, action_horizon=action_horizon, state_dim=state_dim
    )
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
    rng = np.random.default_rng(seed)
    processor.compute_norm_stats(
        "bridge", rng.normal(size=(256, action_dim)), rng.normal(size=(256, state_dim)) if state_dim else None
    )
    return model, processor


def _waits_for_trained_model(item) -> bool:
    """The closed-loop Meta-World tests: they need the model its module trains in a child process."""
    return "trained_model" in getattr(item, "fixturenames", ()) and hasattr(item.module, "prepare_trained_model")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    # the tests that wait for the closed-loop model run last, so that it trains beside the rest of the suite
    waiting = [item for item in items if _waits_for_trained_model(item)]
    items[:] = [item for item in items if not _waits_for_trained_model(item)] + waiting


def pytest_collection_finish(session):
    waiting = [item for item in session.items if _waits_for_trained_model(item)]
    if waiting and not session.config.option.collectonly:
        factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's basetemp: old runs get removed
        root = factory.mktemp("closed_loop") if factory else Path(tempfile.mkdtemp(prefix="closed_loop_", dir=_scratch))
        waiting[0].module.prepare_trained_model(root)


def pytest_sessionfinish(session):
    for item in session.items:
        if _waits_for_trained_model(item):
            item.module.stop_pipeline()
            break


def pytest_configure(config):
    config.addinivalue_line("markers", "deepspeed: needs the deepspeed package (installed by `make test`)")
