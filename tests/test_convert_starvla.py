"""`convert_starvla`: StarVLA run directories → hf_vla model directories computing exactly what the run's weights do.

Every run here is written the way StarVLA writes one (starvla.md §6, §10): `config.yaml` with StarVLA's fields,
`dataset_statistics.json` without modes, and `checkpoints/steps_N_pytorch_model.pt` holding a flat state dict under
StarVLA's names. The weights are a freshly built hf_vla model's, renamed by `to_starvla` below, which is written from
the reference's key list and shares nothing with the converter. Converting must give back the very same tensors,
StarVLA's prompt text (written out by hand), and the same losses and predictions.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_published_configs import QWEN2_5_VL_3B, QWEN3_VL_4B
from test_starvla_reference_deployment import starvla_forward
from transformers import AutoTokenizer

from hf_vla import AutoModelForVLA, VLAProcessor
from hf_vla.action_tokenizers import FASTTokenizer
from hf_vla.auto import VARIANTS
from hf_vla.hub import convert_starvla as convert_starvla_module
from hf_vla.hub.convert_starvla import (
    StarVLAConversionError,
    build_config,
    choose_action_modes,
    choose_attention_mode,
    choose_cameras,
    choose_condition_mask,
    choose_state_modes,
    convert_starvla,
    image_size_for,
    locate_files,
    main,
    map_key,
)
from hf_vla.normalization import normalize
from hf_vla.testing import build_tiny_vlm

COT = ("Your task is {instruction}. To identify the key objects for your task. "
       "Locate their bounding boxes in [x1,y1,x2,y2] format.")  # the released OXE / LIBERO CoT_prompt
H, A, S = 4, 7, 5  # horizon, action dim, state dim
STATE = np.array([[0.0, 0.5, -1.0, 1.0, -0.25]])  # with q01 = -1, q99 = 1 normalised = raw: bins 128 192 0 255 96
STATE_TEXT = "[STATE] 128 192 0 255 96 [ACTION]"


def unexpected_call(*args, **kwargs):
    raise AssertionError("called where it should not be")


def pads(n):
    return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """Tiny backbones named like StarVLA's base_vlm paths. Qwen2.5-VL: untied, rows padded past the tokenizer (as
    Qwen's are) and "🔍" added as one token (the real Qwen vocabulary has it; the tiny BPE would split it).
    Qwen3-VL: tied embeddings (as Qwen3-VL-4B), so StarVLA's checkpoint holds the lm_head duplicate."""
    root = tmp_path_factory.mktemp("Pretrained_models")
    q25 = build_tiny_vlm(root / "Qwen2.5-VL-tiny-Instruct", family="qwen2_5_vl", vocab_size=544)
    tokenizer = AutoTokenizer.from_pretrained(q25)
    tokenizer.add_tokens(["🔍"])
    tokenizer.save_pretrained(q25)
    q3 = build_tiny_vlm(root / "Qwen3-VL-tiny-Instruct", family="qwen3_vl", tie_word_embeddings=True)
    return {"qwen2_5_vl": q25, "qwen3_vl": q3}


def to_starvla(state: dict, variant: str, legacy_layout: bool = False) -> dict:
    """hf_vla names → StarVLA's (starvla.md §10). `legacy_layout`: transformers < 4.52 Qwen2.5-VL names."""
    out = {}
    for key, tensor in state.items():
        if key.startswith("vlm.lm_head."):
            new = "qwen_vl_interface.model.lm_head." + key[len("vlm.lm_head."):]
        elif key.startswith("vlm.model.visual.") and legacy_layout:
            new = "qwen_vl_interface.model.visual." + key[len("vlm.model.visual."):]
        elif key.startswith("vlm.model.language_model.") and legacy_layout:
            new = "qwen_vl_interface.model.model." + key[len("vlm.model.language_model."):]
        elif key.startswith("vlm.model."):
            new = "qwen_vl_interface.model.model." + key[len("vlm.model."):]
        elif key.startswith("action_head.project_layers."):
            new = "project_layers." + key[len("action_head.project_layers."):]
        elif key.startswith("action_head."):
            new = ("action_model.model." if variant == "oft" else "action_model.") + key[len("action_head."):]
        else:
            raise AssertionError(f"unexpected hf_vla key {key}")
        out[new] = tensor.detach().clone()
    return out


def statistics(mask=None):
    def feature(dim):
        return {"mean": [0.0] * dim, "std": [1.0] * dim, "max": [2.0] * dim, "min": [-2.0] * dim,
                "q01": [-1.0] * dim, "q99": [1.0] * dim}  # fmt: skip

    action = {**feature(A), "mask": mask or [True] * (A - 1) + [False]}
    return {"franka": {"action": action, "state": feature(S), "num_transitions": 100, "num_trajectories": 3}}


def write_run(run_dir, framework, base_vlm, state_dict, action_model, vla_data=None, fmt="pt", **top):
    """A StarVLA run directory: config.yaml, dataset_statistics.json, checkpoints/steps_10_*, an older steps_5."""
    config = {
        "run_id": top.pop("run_id", "starvla_test"), "seed": 42, "version_id": "0.21",
        "framework": {"name": framework, "qwenvl": {"base_vlm": str(base_vlm), "attn_implementation": "sdpa"},
                      "action_model": action_model},
        "datasets": {"vla_data": {"dataset_py": "lerobot_datasets", "per_device_batch_size": 2, **(vla_data or {})}},
        "trainer": {"max_train_steps": 10, **top.pop("trainer", {})},
    }  # fmt: skip
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    (run_dir / "dataset_statistics.json").write_text(json.dumps(statistics()))
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir()
    torch.save({"stale": torch.zeros(1)}, checkpoints / "steps_5_pytorch_model.pt")  # older: must not be picked
    if fmt == "pt":
        torch.save(state_dict, checkpoints / "steps_10_pytorch_model.pt")
    else:
        from safetensors.torch import save_file

        save_file(state_dict, str(checkpoints / "steps_10_model.safetensors"))
    return run_dir


def views(seed, cameras, size):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(cameras)]]


def assert_same_weights(original, converted):
    expected, got = original.state_dict(), converted.state_dict()
    assert set(expected) == set(got)
    for key, tensor in expected.items():
        assert torch.equal(tensor, got[key]), key


def prompt_of(processor, inputs):
    return processor.tokenizer.decode(inputs["input_ids"][0])


# ---------------------------------------------------------------------------------------------------- OFT


@pytest.mark.parametrize("legacy_layout", [False, True], ids=["transformers-4.57-layout", "pre-4.52-layout"])
def test_oft_round_trip(vlms, tmp_path, legacy_layout):
    torch.manual_seed(0)
    original = AutoModelForVLA.from_vlm(vlms["qwen2_5_vl"], variant="oft", action_dim=A, action_horizon=H,
                                        state_dim=S, action_token="🔍", prompt_template=COT)  # fmt: skip
    run = write_run(
        tmp_path / "run", "QwenOFT", vlms["qwen2_5_vl"], to_starvla(original.state_dict(), "oft", legacy_layout),
        {"action_dim": A, "state_dim": S, "future_action_window_size": H - 1},
        {"CoT_prompt": COT, "obs_image_size": [56, 56], "include_state": True, "data_mix": "libero_goal"},
    )  # fmt: skip
    out = convert_starvla(run, tmp_path / "out")
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["sources"]["checkpoint"].endswith("steps_10_pytorch_model.pt")
    assert report["keys"]["checkpoint"] == report["keys"]["loaded"] == len(original.state_dict())
    # LIBERO's DataConfig: min_max for xyz/rpy, gripper unnormalised; two views, primary first.
    # The state has S != 8 dimensions, so it is not LIBERO's DataConfig state (8 keys, left raw): the default, q99.
    assert report["normalization_modes"]["franka"] == {"action": ["min_max"] * 6 + ["identity"], "state": ["q99"] * S}
    assert report["state_modes_source"].startswith("default q99")
    assert report["cameras"] == ["primary", "wrist"]

    model = AutoModelForVLA.from_pretrained(out)
    processor = VLAProcessor.from_pretrained(out)
    assert_same_weights(original, model)
    assert model.config.action_token == "🔍" and model.config.action_token_id == original.config.action_token_id

    inputs = processor(images=views(0, 2, 56), text=["open the drawer"], state=STATE, actions=np.zeros((1, H, A)))
    # StarVLA (§3.1): system turn, images first, instruction + state bins + OFT suffix substituted into CoT_prompt.
    assert prompt_of(processor, inputs) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + pads(4) + pads(4)
        + "Your task is open the drawer " + STATE_TEXT
        + " Please predict the next 4 robot actions: <action>🔍🔍🔍🔍<action>.. To identify the key objects for your "
        "task. Locate their bounding boxes in [x1,y1,x2,y2] format.<|im_end|>\n<|im_start|>assistant\n"
    )  # fmt: skip
    assert torch.equal(model.predict_action(**inputs), original.predict_action(**inputs))
    assert torch.equal(model(**inputs).loss, original(**inputs).loss)


def test_oft_state_width_and_bad_statistics_or_dtype(vlms, tmp_path, capsys):
    torch.manual_seed(0)
    original = AutoModelForVLA.from_vlm(vlms["qwen2_5_vl"], variant="oft", action_dim=A, action_horizon=H,
                                        state_dim=S, action_token="🔍", prompt_template=COT)  # fmt: skip
    # QwenOFT's own config often has no state_dim: with include_state the statistics give the width
    run = write_run(tmp_path / "run", "QwenOFT", vlms["qwen2_5_vl"], to_starvla(original.state_dict(), "oft"),
                    {"action_dim": A, "future_action_window_size": H - 1},
                    {"CoT_prompt": COT, "obs_image_size": [56, 56], "include_state": True, "data_mix": "libero_goal"})  # fmt: skip
    out = convert_starvla(run, tmp_path / "out")
    assert AutoModelForVLA.from_pretrained(out).config.state_dim == S
    # a --base-vlm folder given relative to the working directory is recorded as the folder (a card made elsewhere
    # would read `vlms/qwen2_5_vl` as a hub id)
    vlm = Path(vlms["qwen2_5_vl"])
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(vlm.parent.parent)
        relative = convert_starvla(run, tmp_path / "relative", base_vlm=f"{vlm.parent.name}/{vlm.name}")
    assert AutoModelForVLA.from_pretrained(relative).config.base_vlm == str(vlm.resolve())
    assert VLAProcessor.from_pretrained(out).norm_stats["franka"]["state"]["mode"] == ["q99"] * S
    # --state-modes overrides the decision, and the command line says where each mode came from
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "cli"), "--state-modes", "min_max"]) == 0
    assert VLAProcessor.from_pretrained(tmp_path / "cli").norm_stats["franka"]["state"]["mode"] == ["min_max"] * S
    assert json.loads((tmp_path / "cli" / "conversion_report.json").read_text())["state_modes_source"] == (
        "explicit argument")  # fmt: skip
    assert f"state {['min_max'] * S} (explicit argument)" in capsys.readouterr().out

    with pytest.raises(StarVLAConversionError, match=r"dtype: expected a floating-point torch dtype, got 'int8'"):
        convert_starvla(run, tmp_path / "int8", dtype="int8")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint" * 10)
    for path, message in ((tmp_path / "missing.pt", r"checkpoint file not found: .*missing\.pt"),
                          (corrupt, r"corrupt\.pt: not a readable checkpoint \(UnpicklingError")):  # fmt: skip
        with pytest.raises(StarVLAConversionError, match=message):
            convert_starvla(run, tmp_path / "unread", checkpoint_path=path)
    stats_file = run / "dataset_statistics.json"
    for edit, message in [
        (lambda s: s["franka"]["state"].pop("q01"), r"franka\.state: missing \['q01'\]|state_dim"),
        (lambda s: s["franka"]["action"].pop("mean"), r"franka\.action: missing \['mean'\]"),
        (lambda s: s["franka"].pop("action"), r"no entry has 'action' statistics \(keys: \['franka'\]\)"),
    ]:
        stats = statistics()
        edit(stats)
        stats_file.write_text(json.dumps(stats))
        with pytest.raises(StarVLAConversionError, match=message):
            convert_starvla(run, tmp_path / "bad")


def tiny_oft_run(vlms, run_dir, wrap=lambda state: state):
    """A QwenOFT run of a fresh model on the tiny Qwen2.5-VL, its StarVLA state dict passed through `wrap`."""
    torch.manual_seed(0)
    original = AutoModelForVLA.from_vlm(vlms["qwen2_5_vl"], variant="oft", action_dim=A, action_horizon=H,
                                        state_dim=S, action_token="🔍", prompt_template=COT)  # fmt: skip
    run = write_run(run_dir, "QwenOFT", vlms["qwen2_5_vl"], wrap(to_starvla(original.state_dict(), "oft")),
                    {"action_dim": A, "state_dim": S, "future_action_window_size": H - 1},
                    {"CoT_prompt": COT, "obs_image_size": [56, 56], "include_state": True,
                     "data_mix": "libero_goal"})  # fmt: skip
    return original, run


@pytest.mark.parametrize("wrapper", ["module.", "_orig_mod.", "module._orig_mod.", "compiled-submodule"])
def test_checkpoints_saved_through_ddp_or_torch_compile_convert(vlms, tmp_path, wrapper):
    """DDP / DeepSpeed prefix every key with `module.`, torch.compile the compiled module's keys with `_orig_mod.`
    (a compiled submodule: `action_model._orig_mod.model.fc1.weight`): the weights are the same, the report says so."""
    def wrap(state):
        if wrapper == "compiled-submodule":
            return {k.replace("action_model.", "action_model._orig_mod.", 1): v for k, v in state.items()}
        return {wrapper + k: v for k, v in state.items()}

    original, run = tiny_oft_run(vlms, tmp_path / "run", wrap)
    out = convert_starvla(run, tmp_path / "out")
    assert_same_weights(original, AutoModelForVLA.from_pretrained(out))
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["keys"]["checkpoint"] == report["keys"]["loaded"] == len(original.state_dict())
    removed = {"module.": ["module."], "module._orig_mod.": ["module.", "_orig_mod."]}.get(wrapper, ["_orig_mod."])
    assert any(note.startswith(f"the checkpoint's keys carried the wrapper prefixes {removed}")
               for note in report["notes"]), report["notes"]  # fmt: skip


def test_steps_written_after_final_model_are_named_in_the_report(vlms, tmp_path):
    """final_model/ is converted even when a resumed run later wrote newer steps beside it, and the report names
    those steps (by modification time, as the step numbers of two runs say nothing about which came last)."""
    original, run = tiny_oft_run(vlms, tmp_path / "run")
    checkpoints = run / "checkpoints"
    (run / "final_model").mkdir()
    final = (checkpoints / "steps_10_pytorch_model.pt").rename(run / "final_model" / "pytorch_model.pt")
    torch.save({"resumed": torch.zeros(1)}, checkpoints / "steps_12_pytorch_model.pt")
    written = final.stat().st_mtime
    os.utime(checkpoints / "steps_5_pytorch_model.pt", (written - 60, written - 60))
    os.utime(checkpoints / "steps_12_pytorch_model.pt", (written + 60, written + 60))
    report = json.loads((convert_starvla(run, tmp_path / "out") / "conversion_report.json").read_text())
    assert report["sources"]["checkpoint"] == str(final)
    assert ("checkpoints/ holds steps written after final_model/ (steps_12_pytorch_model.pt); final_model/ was "
            "converted, pass --checkpoint to convert one of those instead") in report["notes"]
    assert_same_weights(original, AutoModelForVLA.from_pretrained(tmp_path / "out"))
    for named in ({"run_dir": final}, {"run_dir": run, "checkpoint_path": final}):  # named, not chosen here
        report = json.loads((convert_starvla(out_dir=tmp_path / f"out_{len(named)}", **named)
                             / "conversion_report.json").read_text())  # fmt: skip
        assert not [note for note in report["notes"] if "final_model" in note], report["notes"]
    os.utime(checkpoints / "steps_12_pytorch_model.pt", (written - 30, written - 30))
    report = json.loads((convert_starvla(run, tmp_path / "out_3") / "conversion_report.json").read_text())
    assert not [note for note in report["notes"] if "final_model" in note], report["notes"]


def test_which_checkpoint_a_run_directory_gives(tmp_path):
    """The newest `checkpoints/steps_N_*` by step number (not by name), `final_model/` once training has ended,
    `--checkpoint` over both, a checkpoint file as the run (as StarVLA's from_pretrained takes one), from anywhere."""
    run = write_run(tmp_path / "run_2026-09-01", "QwenOFT", "Qwen2.5-VL", {}, {})  # steps_5 and steps_10
    checkpoints = run / "checkpoints"
    for name in ("steps_9_pytorch_model.pt", "steps_100_model.safetensors", "steps_99_pytorch_model.pt"):
        (checkpoints / name).touch()
    (checkpoints / "steps_1000_optimizer.pt").touch()  # not a model checkpoint
    assert locate_files(run).checkpoint == checkpoints / "steps_100_model.safetensors"
    (run / "final_model").mkdir()
    (run / "final_model" / "pytorch_model.pt").touch()
    assert locate_files(run).checkpoint == run / "final_model" / "pytorch_model.pt"
    chosen = locate_files(run, checkpoint_path=checkpoints / "steps_9_pytorch_model.pt")
    assert chosen.checkpoint == checkpoints / "steps_9_pytorch_model.pt" and chosen.run_dir == run
    for checkpoint in (checkpoints / "steps_5_pytorch_model.pt", run / "final_model" / "pytorch_model.pt"):
        files = locate_files(checkpoint)
        assert (files.checkpoint, files.run_dir, files.config) == (checkpoint, run, run / "config.yaml")
    # `.` and a checkpoint named from inside checkpoints/: the run is found, and dated by its folder's name
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run)
        files = locate_files(".")
        assert (files.run_dir, files.checkpoint) == (run, run / "final_model" / "pytorch_model.pt")
        given = locate_files(None, "config.yaml", "dataset_statistics.json", "checkpoints/steps_5_pytorch_model.pt")
        assert (given.config, given.checkpoint) == (run / "config.yaml", checkpoints / "steps_5_pytorch_model.pt")
        assert choose_condition_mask("gr00t", {}, files.run_dir)[0] == "always"  # run date 2026-09-01
        patch.chdir(checkpoints)
        files = locate_files("steps_10_pytorch_model.pt")
        assert (files.run_dir, files.statistics) == (run, run / "dataset_statistics.json")
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").touch()
    (empty / "dataset_statistics.json").touch()
    with pytest.raises(StarVLAConversionError, match=r"no checkpoint in .*empty: expected checkpoints/steps_N_"):
        locate_files(empty)


def test_statistics_of_several_embodiments_and_not_finite_ones(vlms, tmp_path, monkeypatch):
    """Every embodiment of dataset_statistics.json is kept under its own key (none is a default: the policy names
    one), with its own modes; a state of another width than the model's is left out with a note, an entry without
    'action' statistics is skipped, and a NaN anywhere is refused, naming where, before anything is written."""
    _, run = tiny_oft_run(vlms, tmp_path / "run")
    stats = statistics([True] * A)
    stats["widowx"] = {"action": {**stats["franka"]["action"], "mask": [True] * 6 + [False]},
                       "state": {k: v[:1] * 8 for k, v in stats["franka"]["state"].items()}}  # fmt: skip
    stats["no_state"] = {"action": stats["franka"]["action"], "num_transitions": 7}
    stats["summary"] = {"num_transitions": 107}
    (run / "dataset_statistics.json").write_text(json.dumps(stats))
    out = convert_starvla(run, tmp_path / "out")
    report = json.loads((out / "conversion_report.json").read_text())
    libero = ["min_max"] * 6 + ["identity"]  # data_mix libero_goal: the DataConfig's modes, not the mask's
    assert report["normalization_modes"] == {"franka": {"action": libero, "state": ["q99"] * S},
                                             "widowx": {"action": libero, "state": None},
                                             "no_state": {"action": libero, "state": None}}  # fmt: skip
    assert "widowx: the state statistics have 8 dimensions, the model 5; they are not stored" in report["notes"]
    processor = VLAProcessor.from_pretrained(out)
    assert {k: sorted(v) for k, v in processor.norm_stats.items()} == {
        "franka": ["action", "num_trajectories", "num_transitions", "state"], "widowx": ["action"],
        "no_state": ["action", "num_transitions"]}  # fmt: skip
    assert processor.norm_stats["widowx"]["action"]["q99"] == stats["widowx"]["action"]["q99"]
    with pytest.raises(ValueError, match=r"several embodiments are known, name one of \['franka', 'no_state', "):
        processor.decode_actions(np.zeros((1, H, A), np.float32))

    stats = statistics()
    stats["franka"]["state"]["q99"][3] = float("nan")  # json writes NaN, and reads it back
    (run / "dataset_statistics.json").write_text(json.dumps(stats))
    monkeypatch.setattr(convert_starvla_module, "build_model", unexpected_call)  # refused before the model is built
    with pytest.raises(StarVLAConversionError, match=r"dataset_statistics\.json: norm_stats\['franka'\]\['state'\]"
                                                     r"\.q99: not finite at dimension\(s\) \[3\]"):
        convert_starvla(run, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()


def test_two_conversions_are_byte_identical_and_serve_the_same_actions(vlms, tmp_path):
    """Converting a run twice writes the same bytes; loaded through the Auto classes and VLAPolicy, both give the
    original model's actions."""
    from transformers import AutoProcessor

    from hf_vla import VLAPolicy

    original, run = tiny_oft_run(vlms, tmp_path / "run")
    first, second = convert_starvla(run, tmp_path / "first"), convert_starvla(run, tmp_path / "second")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert {"config.json", "model.safetensors", "processor_config.json", "conversion_report.json"} <= {
        str(p) for p in files}  # fmt: skip
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name

    processor = AutoProcessor.from_pretrained(first)
    assert type(processor) is VLAProcessor and processor.camera_names == ["primary", "wrist"]
    inputs = processor(images=views(3, 2, 56), text=["open the drawer"], state=STATE)
    expected = original.predict_action(**inputs)
    assert torch.equal(AutoModelForVLA.from_pretrained(second).predict_action(**inputs), expected)
    rng = np.random.default_rng(4)
    obs = {"images": {camera: rng.integers(0, 256, (1, 56, 56, 3), dtype=np.uint8) for camera in ("primary", "wrist")},
           "instruction": ["open the drawer"], "state": STATE}  # fmt: skip
    actions = [VLAPolicy.from_pretrained(out).predict(obs, return_normalized=True) for out in (first, second)]
    np.testing.assert_array_equal(actions[0][0], actions[1][0])
    np.testing.assert_array_equal(actions[0][1], actions[1][1])
    views_of_obs = [[obs["images"]["primary"][0], obs["images"]["wrist"][0]]]
    inputs = processor(images=views_of_obs, text=["open the drawer"], state=STATE)
    np.testing.assert_array_equal(actions[0][1], original.predict_action(**inputs).numpy())
    np.testing.assert_array_equal(actions[0][0], processor.decode_actions(actions[0][1], "franka"))


def test_unreadable_config_or_statistics_are_reported_not_raised(tmp_path, capsys):
    """A half-copied run directory: the command names the file and the parser's complaint, with no traceback."""
    run = write_run(tmp_path / "run", "QwenOFT", "Qwen2.5-VL", {}, {})
    cases = [
        ("config.yaml", "framework: {name: QwenOFT\n", r"config\.yaml: not readable \(ParserError: expected ',' or "
                                                        r"'}', but got '<stream end>', line 2 column 1\)"),
        ("config.yaml", "- QwenOFT\n", r"config\.yaml: expected a mapping at the top level, got list"),
        ("dataset_statistics.json", '{"franka": {"action"', r"dataset_statistics\.json: not readable "
                                                             r"\(JSONDecodeError: Expecting ':' delimiter"),
        ("dataset_statistics.json", "[]", r"dataset_statistics\.json: expected a mapping at the top level, got list"),
    ]  # fmt: skip
    for name, text, message in cases:
        original = (run / name).read_text()
        (run / name).write_text(text)
        capsys.readouterr()
        assert main([str(run), str(tmp_path / "out")]) == 1, name
        err = capsys.readouterr().err
        assert re.match(rf"hf-vla convert-starvla: {re.escape(str(run))}/{message}", err), err
        (run / name).write_text(original)
    assert not (tmp_path / "out").exists()


def test_command_line_cameras_and_bad_options(vlms, tmp_path, capsys):
    """--cameras takes spaces after commas as --action-modes does; a camera named twice, a FAST tokenizer that is
    missing or fitted for another horizon are reported as conversion errors, with nothing written."""
    _, run = tiny_oft_run(vlms, tmp_path / "run")
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "out"), "--cameras", "front, wrist"]) == 0
    assert VLAProcessor.from_pretrained(tmp_path / "out").camera_names == ["front", "wrist"]
    assert f"checkpoint: {run / 'checkpoints' / 'steps_10_pytorch_model.pt'}\n" in capsys.readouterr().out
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "twice"), "--cameras", "front,front"]) == 1
    assert capsys.readouterr().err.startswith("hf-vla convert-starvla: camera_names: expected distinct names")

    chunks = np.random.default_rng(0).uniform(-1, 1, (50, H + 1, A)).astype(np.float32)
    FASTTokenizer.fit(chunks, scale=10, vocab_size=64).save_pretrained(tmp_path / "fast")
    torch.manual_seed(0)
    original = AutoModelForVLA.from_vlm(vlms["qwen2_5_vl"], variant="fast", action_dim=A, action_horizon=H,
                                        num_action_tokens=2048)  # fmt: skip
    weights = to_starvla(original.state_dict(), "fast")
    fast_run = write_run(tmp_path / "fast_run", "QwenFast", vlms["qwen2_5_vl"], weights,
                         {"action_dim": A, "future_action_window_size": H - 1})  # fmt: skip
    for tokenizer, message in ((tmp_path / "fast", f"fast_tokenizer: action_tokenizer.time_horizon: expected {H}"),
                               (tmp_path / "no_fast", "fast_tokenizer: ")):  # fmt: skip
        assert main([str(fast_run), str(tmp_path / "out_fast"), "--fast-tokenizer", str(tokenizer)]) == 1
        assert capsys.readouterr().err.startswith(f"hf-vla convert-starvla: {message}")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "out_fast").exists()


def test_output_folder_must_be_new_or_empty(vlms, tmp_path, capsys):
    """Converting over an earlier model would leave its other files (a FAST run's action_tokenizer/) to be loaded with
    the new one: a non-empty folder or a file is refused before anything is written, an empty folder is used."""
    original, run = tiny_oft_run(vlms, tmp_path / "run")
    earlier = tmp_path / "earlier"
    (earlier / "action_tokenizer").mkdir(parents=True)
    (earlier / "action_tokenizer" / "config.json").write_text("{}")
    capsys.readouterr()
    assert main([str(run), str(earlier)]) == 1
    assert capsys.readouterr().err == (f"hf-vla convert-starvla: {earlier} exists and is not an empty folder; remove "
                                       "it or choose another output folder (a converted model is written into a new "
                                       "or empty one only)\n")  # fmt: skip
    assert sorted(p.name for p in earlier.rglob("*")) == ["action_tokenizer", "config.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(StarVLAConversionError, match="file exists and is not an empty folder"):
        convert_starvla(run, tmp_path / "file")
    with pytest.raises(StarVLAConversionError, match="run exists and is not an empty folder"):
        convert_starvla(run, run)  # into the run directory itself
    (tmp_path / "empty").mkdir()
    assert_same_weights(original, AutoModelForVLA.from_pretrained(convert_starvla(run, tmp_path / "empty")))


def test_a_run_on_relative_actions_needs_their_dimensions_named(vlms, tmp_path, capsys):
    torch.manual_seed(0)
    original = AutoModelForVLA.from_vlm(vlms["qwen2_5_vl"], variant="oft", action_dim=A, action_horizon=H,
                                        state_dim=S, action_token="🔍", prompt_template=COT)  # fmt: skip
    run = write_run(tmp_path / "run", "QwenOFT", vlms["qwen2_5_vl"], to_starvla(original.state_dict(), "oft"),
                    {"action_dim": A, "state_dim": S, "future_action_window_size": H - 1},
                    {"CoT_prompt": COT, "obs_image_size": [56, 56], "include_state": True, "action_mode": "delta",
                     "apply_keys": ["action.eef_position"]})  # fmt: skip
    # converted as absolute, its deltas would be executed as positions: refused until the dimensions are named
    with pytest.raises(StarVLAConversionError, match=r"datasets\.vla_data\.action_mode is 'delta': the checkpoint "
                                                     r"predicts actions relative to the state on the keys "
                                                     r"\['action\.eef_position'\]\. .*--relative-actions"):
        convert_starvla(run, tmp_path / "out")
    for given, message in (("delta,abs", r"relative_actions: expected 7 per-dimension modes, got 2"),
                           ("rel", r"relative_actions: expected 'abs' or the run's 'delta' \(datasets\.vla_data\."
                                   r"action_mode\) per dimension, got \['rel'\]")):  # fmt: skip
        with pytest.raises(StarVLAConversionError, match=message):
            convert_starvla(run, tmp_path / "out", relative_actions=given)
    modes = ["delta"] * 3 + ["abs"] * 4
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "out"), "--relative-actions", ", ".join(modes)]) == 0  # spaces allowed
    printed = capsys.readouterr().out
    assert "actions: 'delta' on dimensions [0, 1, 2] relative to the state (explicit argument)" in printed
    processor = VLAProcessor.from_pretrained(tmp_path / "out")
    assert processor.norm_stats["franka"]["action_mode"] == modes
    chunk = np.random.default_rng(0).uniform(-1, 1, size=(1, H, A)).astype(np.float32)
    raw = processor.decode_actions(chunk, "franka")  # without the state: as the model predicts them
    state = np.array([[0.5, -1.0, 2.0, 9.0, 9.0]], np.float32)
    absolute = processor.decode_actions(chunk, "franka", state=state)
    np.testing.assert_allclose(absolute[..., :3], state[:, None, :3] + np.cumsum(raw[..., :3], axis=1), rtol=1e-6)
    np.testing.assert_array_equal(absolute[..., 3:], raw[..., 3:])


def test_choose_relative_actions_for_each_kind_of_run():
    """Without an explicit value only an absolute run converts; a relative one ('rel' as well as 'delta') is refused;
    an explicit value takes 'abs' or the run's own kind per dimension, recorded in the statistics' compact form."""
    from hf_vla.hub.convert_starvla import choose_relative_actions

    def run(mode):
        return {"datasets": {"vla_data": {"action_mode": mode}}} if mode else {}

    assert choose_relative_actions(run(None), 3) == ("abs", "datasets.vla_data.action_mode")
    assert choose_relative_actions(run("abs"), 3) == ("abs", "datasets.vla_data.action_mode")
    for mode in ("rel", "delta"):
        with pytest.raises(StarVLAConversionError, match=rf"action_mode is '{mode}': the checkpoint predicts actions "
                                                         rf"relative to the state\. .*e\.g\. {mode},{mode},abs for"):
            choose_relative_actions(run(mode), 3)
        assert choose_relative_actions(run(mode), 3, mode) == (mode, "explicit argument")  # one for every dimension
        assert choose_relative_actions(run(mode), 3, [mode, "abs", mode]) == ([mode, "abs", mode], "explicit argument")
        assert choose_relative_actions(run(mode), 3, "abs") == ("abs", "explicit argument")
    with pytest.raises(StarVLAConversionError, match=r"expected 'abs' or the run's 'abs' .* got \['delta'\]"):
        choose_relative_actions(run("abs"), 2, "delta")  # an absolute run's actions are not made relative
    with pytest.raises(StarVLAConversionError, match=r"datasets\.vla_data\.action_mode: expected one of .*'relative'"):
        choose_relative_actions(run("relative"), 2, "abs")
    with pytest.raises(StarVLAConversionError, match=r"relative_actions: unknown action mode\(s\) \['absolute'\]"):
        choose_relative_actions(run("rel"), 2, "rel,absolute")


def test_refuses_checkpoints_that_do_not_map_exactly(vlms, tmp_path):
    torch.manual_seed(0)
    original = AutoModelForVLA.from_vlm(vlms["qwen2_5_vl"], variant="oft", action_dim=A, action_horizon=H,
                                        action_token="🔍")  # fmt: skip
    good = to_starvla(original.state_dict(), "oft")
    missing = {k: v for k, v in good.items() if k != "action_model.model.fc2.bias"}
    extra = {**good, "dino_encoder.body.cls_token": torch.zeros(1, 1, 8)}
    wrong = {**good, "action_model.model.fc2.weight": torch.zeros(A + 1, 128)}
    embed = next(k for k in good if k.endswith("embed_tokens.weight"))
    rows = {**good, embed: torch.cat([good[embed], torch.zeros(8, good[embed].shape[1])])}  # lm_head keeps its rows
    tied = original.config.get_text_config().tie_word_embeddings
    cases = [
        ("missing", missing, "action_head.fc2.bias"),
        ("extra", extra, "dino_encoder.body.cls_token"),
        ("rows", rows, "but of shape" if tied else "vocabulary size is the number of rows of the checkpoint's embed"),
        ("shape", wrong, "action_model.model.fc2.weight -> action_head.fc2.weight: checkpoint [8, 128]"),
    ]
    for name, state, needle in cases:
        run = write_run(tmp_path / name, "QwenOFT", vlms["qwen2_5_vl"], state, {"action_dim": A, "action_horizon": H})
        with pytest.raises(StarVLAConversionError, match="refusing to convert") as err:
            convert_starvla(run, tmp_path / f"out_{name}")
        assert needle in str(err.value)
        assert not (tmp_path / f"out_{name}").exists()
    assert err.value.report["mismatched"] and not err.value.report["missing"]


def test_refuses_unsupported_framework_and_split_placeholder(vlms, tmp_path, capsys):
    run = write_run(tmp_path / "dual", "QwenDual", vlms["qwen2_5_vl"], {}, {"action_dim": A})
    with pytest.raises(StarVLAConversionError, match=r"unsupported framework 'QwenDual'.*QwenFast.*QwenOFT"):
        convert_starvla(run, tmp_path / "out")
    assert main([str(run), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith("hf-vla convert-starvla: unsupported framework 'QwenDual'")
    # The tiny Qwen3-VL tokenizer splits "🔍": an OFT checkpoint trained with one placeholder token cannot be served.
    run = write_run(tmp_path / "oft3", "QwenOFT", vlms["qwen3_vl"], {}, {"action_dim": A})
    with pytest.raises(StarVLAConversionError, match="placeholder '🔍' is [2-9] tokens"):
        convert_starvla(run, tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- flow heads

TINY_GR00T = {
    "action_model_type": "DiT-B", "hidden_size": 48, "repeated_diffusion_steps": 2, "num_inference_timesteps": 3,
    "diffusion_model_cfg": {"input_embedding_dim": 32, "attention_head_dim": 16, "num_attention_heads": 2,
                            "num_layers": 2, "output_dim": 24, "cross_attention_dim": 64, "dropout": 0.2,
                            "final_dropout": True, "interleave_self_attention": True},
}  # fmt: skip
FLOW_CASES = {
    # name: (framework, family, hf_vla kwargs of the original, StarVLA action_model, vla_data extra, top-level extra)
    "gr00t": ("QwenGR00T", "qwen2_5_vl",
              dict(dit_hidden_size=32, attention_head_dim=16, num_dit_layers=2, dit_output_dim=24, head_hidden_size=48,
                   repeated_diffusion_steps=2, num_inference_steps=3, prompt_template=COT),
              TINY_GR00T, {"CoT_prompt": COT, "obs_image_size": [56, 56], "obs": ["image_0"]}, {}),
    # Before PR #373 (run date in the run id) every layer-wise block cross-attends, whatever the config says.
    "pi": ("QwenPI", "qwen3_vl",
           dict(head_hidden_size=1024, dit_output_dim=26, interleave_self_attention=False, repeated_diffusion_steps=2),
           {"diffusion_model_cfg": {"interleave_self_attention": True}},
           {"CoT_prompt": "Describe the scene.", "obs_image_size": [64, 64]}, {"run_id": "qwenpi_libero_20260301"}),
    "pi_v3": ("QwenPI_v3", "qwen3_vl",
              dict(dit_hidden_size=32, attention_head_dim=2, head_hidden_size=1024, dit_output_dim=26,
                   interleave_self_attention=True, repeated_diffusion_steps=3, prompt_template=COT),
              {"diffusion_model_cfg": {"action_dit_hidden_dim": 32, "interleave_self_attention": True,
                                       "use_canonical_forward": True}},
              {"CoT_prompt": COT, "obs_image_size": [64, 64], "include_state": True},
              {"trainer": {"repeated_diffusion_steps": 3}}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_flow_round_trip(vlms, tmp_path, case):
    framework, family, kwargs, action_model, vla_data, top = FLOW_CASES[case]
    torch.manual_seed(0)
    original = AutoModelForVLA.from_vlm(
        vlms[family], variant=case, action_dim=A, action_horizon=H, state_dim=S, **kwargs
    )
    fmt = "safetensors" if case == "gr00t" else "pt"
    action_model = {"action_dim": A, "state_dim": S, "action_horizon": H, **action_model}
    run = write_run(tmp_path / "run", framework, vlms[family], to_starvla(original.state_dict(), case), action_model,
                    vla_data, fmt=fmt, **top)  # fmt: skip
    if case == "gr00t":  # through the command line
        assert main([str(run), str(tmp_path / "out")]) == 0
        out = tmp_path / "out"
    else:
        out = convert_starvla(run, tmp_path / "out")
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["attention_mode"] == ("interleaved" if kwargs.get("interleave_self_attention", True) else "all_cross")
    assert report["keys"]["tied_duplicates"] == (1 if family == "qwen3_vl" else 0)

    model = AutoModelForVLA.from_pretrained(out)
    processor = VLAProcessor.from_pretrained(out)
    assert type(model) is type(original)
    assert_same_weights(original, model)
    for field in ("interleave_self_attention", "repeated_diffusion_steps", "num_inference_steps", "dit_output_dim",
                  "head_hidden_size", "state_in_prompt", "prompt_template"):  # fmt: skip
        assert getattr(model.config, field) == getattr(original.config, field), field

    size = processor.image_size[0]
    inputs = processor(images=views(1, 1, size), text=["open the drawer"], state=STATE, actions=np.zeros((1, H, A)))
    expected_text = {
        "gr00t": "Your task is open the drawer. To identify the key objects for your task. Locate their bounding "
                 "boxes in [x1,y1,x2,y2] format.",
        "pi": "open the drawer",  # CoT_prompt without {instruction}: StarVLA sends the raw instruction
        "pi_v3": "Your task is open the drawer " + STATE_TEXT + ". To identify the key objects for your task. "
                 "Locate their bounding boxes in [x1,y1,x2,y2] format.",
    }[case]  # fmt: skip
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family == "qwen2_5_vl" else ""
    assert prompt_of(processor, inputs) == (
        system + "<|im_start|>user\n" + pads(4) + expected_text + "<|im_end|>\n<|im_start|>assistant\n"
    )

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, H, A, generator=generator)
    repeats = model.config.repeated_diffusion_steps
    train_noise, time = torch.randn(repeats, H, A, generator=generator), torch.rand(repeats, generator=generator)
    predicted = model.predict_action(**inputs, noise=noise)
    assert torch.equal(predicted, original.predict_action(**inputs, noise=noise))
    assert torch.equal(model(**inputs, noise=train_noise, time=time).loss,
                       original(**inputs, noise=train_noise, time=time).loss)  # fmt: skip

    # An undated run is taken as trained by StarVLA code that attended to prompt padding (choose_condition_mask): the
    # converted config records that, so left-padded batches are treated as that code treated them.
    assert model.config.condition_mask == report["condition_mask"] == "never"
    vlm_inputs = {k: v for k, v in inputs.items() if k not in ("state", "actions")}
    conditions, mask = model.conditions(**vlm_inputs)
    assert mask is None
    _, training_mask = model.conditions(training=True, **vlm_inputs)
    assert training_mask is None
    unmasked = model.action_head.sample(conditions, None, state=model.head_state(inputs["state"]), noise=noise)
    assert torch.equal(unmasked, predicted)


# ---------------------------------------------------------------------------------------------------- FAST


def test_fast_round_trip(vlms, tmp_path):
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, H)[None, :, None]
    phase = rng.uniform(0, 1, (300, 1, A))
    chunks = (rng.uniform(0.1, 0.6, (300, 1, A)) * np.sin(2 * np.pi * (t + phase))).astype(np.float32)
    fast = FASTTokenizer.fit(chunks, scale=10, vocab_size=64)
    fast.save_pretrained(tmp_path / "fast")
    torch.manual_seed(0)
    # StarVLA's -Action models add 2048 action tokens after the vocabulary: the checkpoint's rows differ from the base.
    original = AutoModelForVLA.from_vlm(vlms["qwen2_5_vl"], variant="fast", action_dim=A, action_horizon=H,
                                        num_action_tokens=2048, action_tokenizer=fast, prompt_template=COT)  # fmt: skip
    run = write_run(tmp_path / "run", "QwenFast", vlms["qwen2_5_vl"], to_starvla(original.state_dict(), "fast"),
                    {"action_dim": A, "future_action_window_size": H - 1},
                    {"CoT_prompt": COT, "obs_image_size": [56, 56]})  # fmt: skip
    out = convert_starvla(run, tmp_path / "out", fast_tokenizer=tmp_path / "fast")
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["vocab_rows"] == {"base": 544, "checkpoint": 544 + 2048}

    model = AutoModelForVLA.from_pretrained(out)
    processor = VLAProcessor.from_pretrained(out)
    assert_same_weights(original, model)
    assert model.config.action_token_offset == original.config.action_token_offset
    inputs = processor(images=views(2, 1, 56), text=["open the drawer"], actions=chunks[:1])
    assert torch.equal(model(**inputs).loss, original(**inputs).loss)
    del inputs["actions"]
    model.config.max_action_tokens = original.config.max_action_tokens = 8  # a short greedy reply is enough
    assert model.generate_actions(**inputs).action_token_ids == original.generate_actions(**inputs).action_token_ids


# ---------------------------------------------------------------------------------------------------- decisions


def test_attention_mode_decision():
    def decide(variant, diffusion=None, override=None, **top):
        config = {"framework": {"action_model": {"diffusion_model_cfg": diffusion or {}}}, **top}
        return choose_attention_mode(variant, config, None, override)[0]

    assert decide("pi", {"interleave_self_attention": True}) is False  # no evidence of post-#373 code
    assert decide("pi", {"interleave_self_attention": True}, run_id="run_2026-07-01") is True
    assert decide("pi", {}, run_id="20260615_pi") is False
    assert decide("pi", {"interleave_self_attention": True, "use_canonical_forward": True}) is True
    assert decide("pi", {"interleave_self_attention": True, "use_canonical_forward": False}) is False
    assert decide("pi", {"use_canonical_forward": True}) is True  # QwenPI's default: interleaved
    assert decide("pi_v3", {"use_canonical_forward": True}) is False  # QwenPI_v3's default since #434: all-cross
    assert decide("pi_v3", {"interleave_self_attention": False}, run_id="run_20260801") is False
    assert decide("pi", {"interleave_self_attention": True}, override=True) is True
    assert decide("pi_v3", {"use_canonical_forward": True, "interleave_self_attention": True}, override=False) is False
    assert decide("gr00t", {"interleave_self_attention": True}) is True  # GR00T always honoured the flag
    assert decide("oft") is None


def test_image_size_is_height_width_of_starvlas_pil_size():
    """obs_image_size is a PIL size, (width, height); default_image_resolution is [C, H, W]; [height, width] out."""
    assert image_size_for({"framework": {"obs_image_size": [320, 240]}}) == [240, 320]
    assert image_size_for({"datasets": {"vla_data": {"obs_image_size": [256, 128]}}}) == [128, 256]
    assert image_size_for({"datasets": {"vla_data": {"obs_image_size": [96]}}}) == [96, 96]
    assert image_size_for({"datasets": {"vla_data": {"default_image_resolution": [3, 180, 320]}}}) == [180, 320]
    assert image_size_for({}) == [224, 224]


def test_condition_mask_decision(tmp_path):
    """StarVLA's flow heads ignored the prompt's padding mask until its masking fix (by 2026-08-09), then used it in
    training and inference: the run's date decides, undated runs are taken as older, an argument overrides."""
    assert choose_condition_mask("oft", {})[0] is None
    assert choose_condition_mask("gr00t", {})[0] == "never"
    assert choose_condition_mask("pi", {"run_id": "libero_2026-07-30"})[0] == "never"
    mode, reason = choose_condition_mask("pi_v3", {"run_id": "libero_20260809"})
    assert mode == "always" and "2026-08-09" in reason
    assert choose_condition_mask("gr00t", {}, tmp_path / "run_2026_09_01")[0] == "always"
    assert choose_condition_mask("gr00t", {"run_id": "x_2026-09-01"}, override="never") == ("never", "explicit argument")
    with pytest.raises(StarVLAConversionError, match="condition_mask: expected"):
        choose_condition_mask("gr00t", {}, override="sometimes")


def test_normalisation_modes_and_cameras():
    stats = statistics()["franka"]["action"]
    config = {"datasets": {"vla_data": {"data_mix": "bridge_rt_1"}}}
    assert choose_action_modes(stats, config)[0] == ["q99"] * 6 + ["binary"]  # mask=False ↔ binary (OXE)
    libero = {"datasets": {"vla_data": {"data_mix": "libero_all", "obs": ["image_0"]}}}
    assert choose_action_modes(stats, libero)[0] == ["min_max"] * 6 + ["identity"]
    assert choose_action_modes(stats, libero, "q99")[0] == ["q99"] * 7
    for mix, modes in (("libero_all_q99", ["q99"] * 6 + ["identity"]), ("openpi_libero_all", ["q99"] * 7)):
        assert choose_action_modes(stats, {"datasets": {"vla_data": {"data_mix": mix}}})[0] == modes, mix
    modes = "mean_std,mean_std,mean_std,q99,q99,q99,binary"
    assert choose_action_modes(stats, config, modes)[0] == modes.split(",")
    with pytest.raises(StarVLAConversionError, match="7 comma-separated modes"):
        choose_action_modes(stats, config, "q99,binary")
    assert choose_cameras(config)[0] == ["primary"]
    assert choose_cameras({"datasets": {"vla_data": {"data_mix": "libero_goal"}}})[0] == ["primary", "wrist"]
    assert choose_cameras(libero)[0] == ["image_0"]  # the run's own observation keys win over the mixture table
    assert choose_cameras(libero, ["front", "wrist"])[0] == ["front", "wrist"]


def test_state_normalisation_modes():
    """State modes per dimension, in the DataConfig's state_keys order (the order of the statistics' 'state'):
    LIBERO's default config normalises no state key (raw → identity), its q99 and openpi variants all eight with
    q99, OXE bridge / RT-1 q99 with a binary gripper. dataset_statistics.json records no state modes, so anything
    else gets q99 unless --state-modes says otherwise."""
    eight = {"q01": [-1.0] * 8}

    def decide(data_mix, stats=eight, override=None):
        return choose_state_modes(stats, {"datasets": {"vla_data": {"data_mix": data_mix}}}, override)

    oxe = ["q99"] * 7 + ["binary"]
    for mix, modes in (("libero_goal", ["identity"] * 8), ("libero_all", ["identity"] * 8),
                       ("libero_all_q99", ["q99"] * 8), ("libero_goal_q99", ["q99"] * 8),
                       ("openpi_libero_all", ["q99"] * 8), ("bridge", oxe), ("bridge_rt_1", oxe),
                       ("simpler_env_fractal", oxe)):  # fmt: skip
        got, source = decide(mix)
        assert got == modes, mix
        assert source.startswith("data_mix matches"), (mix, source)
    for mix, stats in (("oxe_magic_soup", eight), ("custom_dataset", eight), (None, eight),
                       ("libero_goal", {"q01": [0.0] * 5})):  # fmt: skip  # unknown, or not the DataConfig's width
        got, source = decide(mix, stats)
        assert got == ["q99"] * len(stats["q01"]) and source.startswith("default q99"), (mix, source)
    assert decide("libero_goal", override="min_max") == (["min_max"] * 8, "explicit argument")
    assert decide("bridge", override=["mean_std"] * 7 + ["binary"])[0] == ["mean_std"] * 7 + ["binary"]
    with pytest.raises(StarVLAConversionError, match="state_modes: expected one mode or 8 comma-separated"):
        decide("bridge", override="q99,binary")
    # StarVLA's q99 keeps a constant dimension's raw value (bridge's pad, or a joint that never moved): identity
    constant = {"q01": [-1.0, 0.7, 0.0] + [-1.0] * 5, "q99": [1.0, 0.7, 0.0] + [1.0] * 5}
    got, source = decide("bridge", constant)
    assert got == ["q99", "identity", "identity"] + ["q99"] * 4 + ["binary"] and "constant dimension" in source
    assert decide("libero_goal", constant)[0] == ["identity"] * 8
    assert decide("bridge", constant, override="min_max")[0] == ["min_max"] * 8  # StarVLA's min_max gives 0 there
    stats = {**constant, "min": constant["q01"], "max": constant["q99"], "mean": [0.0] * 8, "std": [1.0] * 8}
    raw = np.array([0.5, 0.7, 0.0, 2.0, -0.2, 0.0, 0.9, 0.8], np.float32)
    expected = [starvla_forward(mode, raw[i], {k: v[i] for k, v in stats.items()}) for i, mode in enumerate(oxe)]
    np.testing.assert_allclose(normalize(raw, {**stats, "mode": got}), np.clip(expected, -1, 1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------- published sizes


def starvla_head_shapes(variant: str, vlm_hidden: int, vlm_layers: int) -> dict[str, tuple]:
    """StarVLA's head parameters at its published configurations (starvla.md §1.4, §1.5, §10), weights and biases."""
    width = {"gr00t": 768, "pi": vlm_hidden, "pi_v3": 1024}[variant]
    blocks = 16 if variant == "gr00t" else vlm_layers
    linears = {  # name: (out, in)
        "action_model.model.timestep_encoder.timestep_embedder.linear_1": (width, 256),
        "action_model.model.timestep_encoder.timestep_embedder.linear_2": (width, width),
        "action_model.model.proj_out_1": (2 * width, width),
        "action_model.model.proj_out_2": (1024 if variant == "gr00t" else 26, width),
        "action_model.state_encoder.layer1": (1024, 7),
        "action_model.state_encoder.layer2": (width, 1024),
        "action_model.action_encoder.layer1": (width, 7),
        "action_model.action_encoder.layer2": (width, 2 * width),
        "action_model.action_encoder.layer3": (width, width),
        "action_model.action_decoder.layer1": (1024, 1024 if variant == "gr00t" else width),
        "action_model.action_decoder.layer2": (7, 1024),
    }
    for i in range(blocks):
        block = f"action_model.model.transformer_blocks.{i}."
        kv = vlm_hidden if variant == "gr00t" and i % 2 == 0 else width  # GR00T: even blocks read the VLM
        linears.update({block + "norm1.linear": (2 * width, width), block + "attn1.to_q": (width, width),
                        block + "attn1.to_k": (width, kv), block + "attn1.to_v": (width, kv),
                        block + "attn1.to_out.0": (width, width), block + "ff.net.0.proj": (4 * width, width),
                        block + "ff.net.2": (width, 4 * width)})  # fmt: skip
        if variant == "pi_v3":
            linears[f"project_layers.{i}.1"] = (width, vlm_hidden)
    shapes = {f"{name}.{p}": shape if p == "weight" else shape[:1] for name, shape in linears.items()
              for p in ("weight", "bias")}  # fmt: skip
    shapes["action_model.future_tokens.weight"] = (32, width)
    shapes["action_model.position_embedding.weight"] = (1024, width)
    if variant == "pi_v3":
        shapes.update({f"project_layers.{i}.0.{p}": (vlm_hidden,) for i in range(blocks) for p in ("weight", "bias")})
    return shapes


@pytest.mark.parametrize("variant", ["gr00t", "pi", "pi_v3"])
def test_published_head_sizes_map_exactly(tmp_path, variant):
    """From released-style config.yaml fields, the converter's config gives StarVLA's head shapes key for key."""
    name, vlm_config = ("Qwen2.5-VL-3B-Instruct", QWEN2_5_VL_3B)
    if variant == "pi_v3":  # the released QwenPI_v3 sits on Qwen3-VL-4B
        name, vlm_config = ("Qwen3-VL-4B-Instruct", QWEN3_VL_4B)
    vlm_config.save_pretrained(tmp_path / name)
    text = vlm_config.get_text_config()
    starvla = starvla_head_shapes(variant, text.hidden_size, text.num_hidden_layers)
    action_model = {"action_dim": 7, "state_dim": 7, "future_action_window_size": 15, "diffusion_model_cfg": {}}
    if variant == "gr00t":  # examples/LIBERO/train_files/starvla_cotrain_libero.yaml
        action_model.update(action_model_type="DiT-B", hidden_size=1024, diffusion_model_cfg={
            "cross_attention_dim": 2048, "dropout": 0.2, "final_dropout": True, "interleave_self_attention": True,
            "num_layers": 16, "output_dim": 1024})  # fmt: skip
    config = {"framework": {"name": variant, "qwenvl": {"base_vlm": f"./playground/Pretrained_models/{name}"},
                            "action_model": action_model}}  # fmt: skip
    state = {k: torch.empty(shape, device="meta") for k, shape in starvla.items()}
    model_config, info = build_config(variant, config, state, str(tmp_path / name), None)
    with torch.device("meta"):
        model = VARIANTS[f"vla_{variant}"][1](model_config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("action_head.")}
    assert {map_key(k, variant): shape for k, shape in starvla.items()} == ours

    del action_model["future_action_window_size"]  # a config that names no horizon gets the framework's default
    assert build_config(variant, config, state, str(tmp_path / name), None)[0].action_horizon == (
        8 if variant == "gr00t" else 16)  # starvla.md §1.4-1.5
