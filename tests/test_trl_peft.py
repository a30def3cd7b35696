"""PEFT LoRA on a composed VLA, a TRL SFT stage on the backbone alone, and TRL GRPO on a token-head VLA."""

import json

import numpy as np
import pytest
import torch
from conftest import make_oft, random_views
from PIL import Image
from test_token_variants import D, T, fast_tokenizer, make_token_model  # noqa: F401 (a fixture)
from transformers import AutoModelForImageTextToText, TrainingArguments

from hf_vla import AutoModelForVLA
from hf_vla.data.vlm_chat import load_vlm_chat
from hf_vla.training import VLATrainer
from hf_vla.testing import train_steps
from hf_vla.training.lora import add_lora
from hf_vla.training.trl import (
    action_generation_kwargs,
    action_reward,
    build_grpo_trainer,
    decode_completions,
    grpo_prompt_dataset,
)

pytest.importorskip("peft")
pytest.importorskip("trl")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dirs):
    return tiny_vlm_dirs["qwen2_5_vl"]


def oft_samples(rng, n, state_dim=6, action_dim=7, horizon=4):
    return [{"images": dict(zip(["primary", "wrist"], random_views(rng, 1)[0])), "instruction": "open the drawer",
             "state": rng.normal(size=state_dim).astype(np.float32),
             "actions": rng.normal(size=(horizon, action_dim)).astype(np.float32)} for _ in range(n)]  # fmt: skip


# ------------------------------------------------------------------------------------------------ PEFT LoRA


def test_lora_on_oft_trains_saves_reloads_and_merges(vlm_dir, tmp_path):
    from peft import PeftModel

    model, processor = make_oft(vlm_dir)
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    model = AutoModelForVLA.from_pretrained(base_dir)  # sets name_or_path → adapter's base_model_name_or_path

    peft_model = add_lora(model, r=4, alpha=8)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "action_head.modules_to_save" in n for n in trainable), trainable
    assert any("action_head.modules_to_save" in n for n in trainable)
    lora_layers = {n.split(".lora_")[0].split("language_model.")[1] for n in trainable if "lora_" in n}
    assert {"layers.0.self_attn.q_proj", "layers.0.self_attn.o_proj", "layers.0.mlp.gate_proj",
            "layers.0.mlp.down_proj"} <= lora_layers  # fmt: skip
    assert not any("visual" in n or "embed_tokens" in n or "lm_head" in n for n in trainable)

    rng = np.random.default_rng(0)
    inputs = processor(images=random_views(rng, 2), text=["open the drawer", "close the door"],
                       state=rng.normal(size=(2, 6)), actions=rng.normal(size=(2, 4, 7)))  # fmt: skip
    frozen_before = peft_model.base_model.model.vlm.model.visual.state_dict()
    losses = train_steps(peft_model, inputs, steps=3, lr=1e-3)
    assert losses[-1] < losses[0], losses
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values())  # zero when added: every adapter trained
    for key, value in peft_model.base_model.model.vlm.model.visual.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    with torch.no_grad():
        expected = peft_model.predict_action(**inputs)

    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert (adapter_dir / "adapter_config.json").is_file() and (adapter_dir / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)  # add_lora's rank and scale, as asked

    reloaded = PeftModel.from_pretrained(AutoModelForVLA.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded.predict_action(**inputs), expected)
        merged = reloaded.merge_and_unload()
        assert type(merged) is type(model)
        torch.testing.assert_close(merged.predict_action(**inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gr00t", "bins"])
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_lora_adapter_folder_alone_reloads_the_trained_policy(vlm_dir, tmp_path, variant):
    # a flow head trains in full beside the adapters; a token head has none, and its action-token rows live in the
    # embeddings and lm_head (train_embeddings=True). The adapter folder, with the processor saved beside it, is all
    # a user needs: AutoModelForVLA resolves the base, AutoProcessor reads the statistics.
    from transformers import AutoProcessor

    from hf_vla import VLAProcessor
    from hf_vla.testing import TINY_HEADS

    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, action_dim=7, action_horizon=4, state_dim=6,
                                     **TINY_HEADS[variant])  # fmt: skip
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
    rng = np.random.default_rng(0)
    processor.compute_norm_stats("bridge", rng.normal(size=(256, 7)), rng.normal(size=(256, 6)))
    model.save_pretrained(tmp_path / "base")
    model = AutoModelForVLA.from_pretrained(tmp_path / "base")
    peft_model = add_lora(model, r=4, alpha=8, train_embeddings=variant == "bins")

    trainable = {n.split(".modules_to_save")[0].split(".token_adapter")[0].removeprefix("base_model.model.")
                 for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}  # fmt: skip
    expected = {"action_head"} if variant == "gr00t" else {"vlm.model.language_model.embed_tokens", "vlm.lm_head"}
    assert trainable == expected
    inputs = processor(images=random_views(rng, 2), text=["open the drawer", "close the door"],
                       state=rng.normal(size=(2, 6)), actions=rng.normal(size=(2, 4, 7)))  # fmt: skip
    train_steps(peft_model, inputs, steps=2, lr=1e-2)
    observation = {k: v for k, v in inputs.items() if k not in ("actions", "state")}
    if variant == "gr00t":
        observation.update(state=inputs["state"], noise=torch.randn(2, 4, 7))
    with torch.no_grad():
        expected_actions = peft_model.predict_action(**observation)
    untrained = AutoModelForVLA.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        assert not torch.equal(untrained.predict_action(**observation), expected_actions)

    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    reloaded = AutoModelForVLA.from_pretrained(adapter_dir).eval()
    assert type(reloaded) is type(model)
    assert AutoProcessor.from_pretrained(adapter_dir).norm_stats == processor.norm_stats
    with torch.no_grad():
        assert torch.equal(reloaded.predict_action(**observation), expected_actions)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged.predict_action(**observation), expected_actions, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tied_vlm_dir(tmp_path_factory):
    from hf_vla.testing import build_tiny_vlm

    return {family: build_tiny_vlm(tmp_path_factory.mktemp("tied") / family, family=family, tie_word_embeddings=True)
            for family in ("qwen2_5_vl", "qwen3_vl")}  # fmt: skip


@pytest.mark.parametrize("backbone", ["qwen2_5_vl tied", "qwen3_vl tied", "qwen2_5_vl untied"])
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_lora_train_embeddings_trains_the_action_token_rows_only(vlm_dir, tied_vlm_dir, tmp_path, backbone):
    # The published backbones tie lm_head to the input embeddings: the action rows train once for both, and the merged
    # model stays tied through a save and a load. An untied backbone trains the rows of each matrix.
    from safetensors.torch import load_file

    from hf_vla import VLAProcessor
    from hf_vla.testing import TINY_HEADS

    family, tie = backbone.split()
    tied = tie == "tied"
    backbone = tied_vlm_dir[family] if tied else vlm_dir
    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(backbone, variant="bins", action_dim=7, action_horizon=4, state_dim=6,
                                     **TINY_HEADS["bins"])  # fmt: skip
    processor = VLAProcessor.from_vlm(backbone, model.config, camera_names=["primary", "wrist"], image_size=[56, 56])
    rng = np.random.default_rng(0)
    processor.compute_norm_stats("bridge", rng.normal(size=(256, 7)), rng.normal(size=(256, 6)))
    model.save_pretrained(tmp_path / "base")
    base = AutoModelForVLA.from_pretrained(tmp_path / "base")
    base_tied = base.vlm.lm_head.weight is base.get_input_embeddings().weight
    assert base_tied == tied
    peft_model = add_lora(AutoModelForVLA.from_pretrained(tmp_path / "base"), r=4, alpha=8, train_embeddings=True)

    offset, count = model.config.action_token_offset, model.config.num_action_tokens
    rows, hidden = set(range(offset, offset + count)), model.vlm_hidden_size
    token_params = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert all("trainable_tokens_delta" in n for n in token_params), token_params
    assert sum(token_params.values()) == (1 if tied else 2) * count * hidden  # not 2 × vocabulary × hidden

    inputs = processor(images=random_views(rng, 2), text=["open the drawer", "close the door"],
                       state=rng.normal(size=(2, 6)), actions=rng.normal(size=(2, 4, 7)))  # fmt: skip
    # no weight decay: it would move every trainable row, whether the loss reaches it or not
    train_steps(peft_model, inputs, steps=2, lr=1e-2, weight_decay=0)
    observation = {k: v for k, v in inputs.items() if k not in ("actions", "state")}
    with torch.no_grad():
        expected_loss = peft_model(**inputs).loss
        expected_actions = peft_model.predict_action(**observation)

    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert all(t.shape == (count, hidden) for k, t in saved.items() if "lora_" not in k)
    with torch.no_grad():
        assert torch.equal(AutoModelForVLA.from_pretrained(adapter_dir).eval().predict_action(**observation),
                           expected_actions)  # fmt: skip
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).loss, expected_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(merged.predict_action(**observation), expected_actions, atol=1e-6, rtol=0)
    for trained, original in ((merged.get_input_embeddings(), base.get_input_embeddings()),
                              (merged.vlm.lm_head, base.vlm.lm_head)):  # fmt: skip
        changed = set((trained.weight != original.weight).any(dim=1).nonzero().flatten().tolist())
        assert changed and changed <= rows  # every other row bit-identical

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForVLA.from_pretrained(tmp_path / "merged").eval()
    reloaded_tied = reloaded.vlm.lm_head.weight is reloaded.get_input_embeddings().weight
    assert reloaded_tied == tied
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).loss, expected_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(reloaded.predict_action(**observation), expected_actions, atol=1e-6, rtol=0)


def test_lora_train_embeddings_needs_action_tokens(vlm_dir):
    model, _ = make_oft(vlm_dir)
    with pytest.raises(ValueError, match="no action tokens"):
        add_lora(model, train_embeddings=True, base_model_name_or_path=str(vlm_dir))


def test_vla_trainer_trains_a_lora_model_with_learning_rate_groups(vlm_dir, tmp_path):
    model, processor = make_oft(vlm_dir)
    peft_model = add_lora(model, r=4, alpha=8, base_model_name_or_path=str(vlm_dir))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    trainer = VLATrainer(peft_model, args, train_dataset=oft_samples(np.random.default_rng(1), 4),
                         processing_class=processor, learning_rates={"action_head": 1e-2})  # fmt: skip
    head_before = model.action_head.modules_to_save.default.state_dict()
    head_before = {k: v.clone() for k, v in head_before.items()}
    trainer.train()
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert groups["action_head"]["initial_lr"] == 1e-2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    head_after = model.action_head.modules_to_save.default.state_dict()
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)


def test_lora_target_that_matches_nothing_raises(vlm_dir):
    model, _ = make_oft(vlm_dir)
    with pytest.raises(ValueError, match="matched no module"):
        add_lora(model, target=r".*no_such_module", base_model_name_or_path=str(vlm_dir))


# ------------------------------------------------------------------------------------------------ TRL SFT (VLM only)


@pytest.fixture
def chat_file(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / name)
    items = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "What is on the table?"},
                                             {"from": "gpt", "value": "A red block."}]},
        {"images": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image> then <image>: what changed?"},
            {"from": "gpt", "value": "The drawer opened."}]},
        {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Gray."}]},
    ]  # fmt: skip
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(items))
    return path


@pytest.mark.parametrize("collator", ["hf_vla", "trl"])
def test_vlm_sft_stage_then_build_a_vla_from_it(vlm_dir, chat_file, tmp_path, collator):
    from trl import SFTConfig

    from hf_vla.training.trl import VLMSFTTrainer

    model, processor = make_oft(vlm_dir)
    before = {k: v.clone() for k, v in model.vlm.state_dict().items()}
    args = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=2, max_steps=2,
                     learning_rate=1e-3,
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                     gradient_checkpointing=False)  # fmt: skip
    trainer = VLMSFTTrainer(model, args, train_dataset=load_vlm_chat(chat_file), processor=processor, collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    assert any(not torch.equal(before[k], v) for k, v in model.vlm.state_dict().items())  # trained in place

    out = tmp_path / "vlm_sft"
    trainer.save_model(str(out))
    vlm = AutoModelForImageTextToText.from_pretrained(out)
    for key, value in vlm.state_dict().items():
        assert torch.equal(value, model.vlm.state_dict()[key]), key
    vla = AutoModelForVLA.from_vlm(out, variant="oft", action_dim=7, action_horizon=4, state_dim=6)
    assert torch.equal(vla.vlm.get_input_embeddings().weight, model.vlm.get_input_embeddings().weight)


# ------------------------------------------------------------------------------------------- TRL GRPO (token heads)


def test_reward_decodes_completions_with_the_model(vlm_dir):
    model, _ = make_token_model(vlm_dir, "bins", None)
    offset, eos = model.config.action_token_offset, model.config.eos_token_id
    target = np.full((T, D), 0.25, dtype=np.float32)
    good = [offset + k for k in model.encode_actions(target[None])[0]]
    reward = action_reward(model, invalid_reward=-5.0)
    rewards = reward(None, None, [good + [eos], good[:-1], [eos], good[:3] + [7] + good[4:]], target=[target] * 4)
    expected = model.bins.centres(model.bins.encode(target[None]))[0]
    assert rewards[0] == pytest.approx(-np.abs(expected - target).mean()) and rewards[0] > -0.05
    assert rewards[1:] == [-5.0, -5.0, -5.0]  # short, empty, a non-action token
    actions, valid = decode_completions(model, [good])
    assert valid.all() and np.allclose(actions[0], expected)
    kwargs = action_generation_kwargs(model)
    assert kwargs["min_new_tokens"] == T * D and offset not in kwargs["suppress_tokens"]
    vocabulary = model.vlm.config.get_text_config().vocab_size
    assert eos in kwargs["suppress_tokens"] and len(kwargs["suppress_tokens"]) == vocabulary - 32


def test_reward_target_fn_score_fn_and_target_column_by_hand(vlm_dir):
    model, _ = make_token_model(vlm_dir, "bins", None)
    offset, eos = model.config.action_token_offset, model.config.eos_token_id
    # bins of width 2/31 on [-1, 1]: token 0 decodes to −1 + 1/31, token 31 (clipped to the last bin) to 1 − 1/31
    low, high = [offset] * (T * D) + [eos], [offset + 31] * (T * D) + [eos]
    completions = [low, high, [eos]]
    goal = np.full((T, D), 0.5)

    by_column = action_reward(model, target_column="goal")(None, None, completions, goal=[goal] * 3)
    assert by_column[:2] == [pytest.approx(-(0.5 + 1 - 1 / 31)), pytest.approx(-(0.5 - 1 / 31))]
    assert by_column[2] == -1.0  # the documented invalid_reward default

    seen = {}

    def target_fn(**columns):
        seen["target_fn"] = sorted(columns)
        return -np.asarray(columns["goal"])

    by_fn = action_reward(model, target_fn=target_fn)(None, None, completions, goal=[goal] * 3, task=["a"] * 3)
    assert seen["target_fn"] == ["goal", "task"]
    assert by_fn[:2] == [pytest.approx(-(1 - 1 / 31 - 0.5)), pytest.approx(-(1 - 1 / 31 + 0.5))]

    def score_fn(actions, valid, **columns):
        seen["score_fn"] = (actions.copy(), valid.copy())
        return actions[:, 0, 0] * 10  # a number for the invalid row too: it must still get invalid_reward

    reward = action_reward(model, score_fn=score_fn, invalid_reward=-7.0)
    assert reward(None, None, completions) == [pytest.approx(-10 + 10 / 31), pytest.approx(10 - 10 / 31), -7.0]
    actions, valid = seen["score_fn"]
    assert valid.tolist() == [True, True, False] and np.isnan(actions[2]).all()
    with pytest.raises(KeyError, match="no target_fn and no dataset column 'target'"):
        action_reward(model)(None, None, completions, goal=[goal] * 3)


def test_grpo_samples_only_the_action_tokens_a_fast_model_can_decode(vlm_dir, fast_tokenizer):  # noqa: F811
    # a 64-token FAST tokenizer on 96 reserved rows (a custom tokenizer on a StarVLA -Action backbone): ids past its
    # vocabulary never decode, so GRPO must not sample them (greedy decoding already does not)
    model, _ = make_token_model(vlm_dir, "fast", fast_tokenizer, num_action_tokens=96)
    offset, eos = model.config.action_token_offset, model.config.eos_token_id
    decodable = model.decodable_action_tokens()
    assert decodable == fast_tokenizer.bpe.get_vocab_size(with_added_tokens=True) < 96
    kwargs = action_generation_kwargs(model)
    vocabulary = model.vlm.get_output_embeddings().weight.shape[0]
    allowed = set(range(vocabulary)) - set(kwargs["suppress_tokens"])
    assert allowed == set(range(offset, offset + decodable)) | {eos}
    assert kwargs["min_new_tokens"] == 1
    good = [offset + k for k in model.encode_actions(np.zeros((1, T, D), np.float32))[0]]
    reward = action_reward(model, invalid_reward=-3.0)
    rewards = reward(None, None, [good + [eos], good[:-1] + [offset + decodable, eos]], target=np.zeros((2, T, D)))
    assert rewards[0] > -0.05 and rewards[1] == -3.0  # a reserved but undecodable id makes the completion invalid


def test_grpo_prompt_images_are_the_views_the_vla_trains_on(vlm_dir):
    # with concat_views the prompt carries one image of the stacked views, not the stack squashed to one view's size
    model, processor = make_token_model(vlm_dir, "bins", None, concat_views=True)
    rng = np.random.default_rng(3)
    views = [rng.integers(0, 256, (40, 72, 3), dtype=np.uint8) for _ in range(2)]  # resized to 56 × 56, then stacked
    dataset = grpo_prompt_dataset(processor, [{"images": views, "instruction": "open the drawer", "target": [0.0]}])
    (image,) = dataset[0]["images"]
    expected = processor._check_views([views], 1)[0][0]
    assert expected.shape == (112, 56, 3)
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_grpo_targets_from_raw_action_chunks_are_normalised_as_training_normalises_them(vlm_dir):
    """A LeRobot sample carries its chunk in robot units; the reward compares normalised ones."""
    _, processor = make_token_model(vlm_dir, "bins", None)
    rng = np.random.default_rng(4)
    processor.compute_norm_stats("arm", rng.normal(5.0, 3.0, (64, D)), rng.normal(size=(64, 2)))
    raw = rng.normal(5.0, 3.0, (T, D)).astype(np.float32)
    sample = {"images": random_views(rng, 1)[0], "instruction": "open the drawer", "embodiment": "arm"}
    dataset = grpo_prompt_dataset(processor, [{**sample, "actions": raw}, {**sample, "target": np.zeros((T, D))}])
    views = [np.zeros((8, 8, 3), np.uint8)] * 2
    expected = processor(images=[views], text=["go"], state=np.zeros((1, 2)), actions=raw[None],
                         embodiment="arm")["actions"][0].numpy()
    np.testing.assert_allclose(np.asarray(dataset[0]["target"]), expected, rtol=1e-6)
    assert np.abs(expected).max() <= 1 and not np.allclose(expected, raw)  # q99: within [-1, 1], not robot units
    np.testing.assert_array_equal(np.asarray(dataset[1]["target"]), np.zeros((T, D)))  # a given target as it is
    with pytest.raises(ValueError, match=rf"actions: expected shape \[1, {T}, {D}\]"):
        grpo_prompt_dataset(processor, [{**sample, "actions": raw[:, :1]}])


def test_grpo_trains_a_bins_vla_from_decoded_action_rewards(vlm_dir, tmp_path):
    from trl import GRPOConfig

    model, processor = make_token_model(vlm_dir, "bins", None)
    rng = np.random.default_rng(0)
    samples = [{"images": random_views(rng, 1)[0], "instruction": "open the drawer", "state": rng.uniform(-1, 1, 2),
                "embodiment": "sim", "target": rng.uniform(-0.5, 0.5, (T, D)).astype(np.float32)}
               for _ in range(4)]  # fmt: skip
    dataset = grpo_prompt_dataset(processor, samples)
    assert [part["type"] for part in dataset[0]["prompt"][0]["content"]] == ["image", "image", "text"]
    assert len(dataset[0]["images"]) == 2

    calls = []
    reward = action_reward(model)

    def recording_reward(prompts, completions, completion_ids, **columns):
        calls.append((completion_ids, columns))
        return reward(prompts, completions, completion_ids, **columns)

    with pytest.raises(ValueError, match=r"max_completion_length: 5 is shorter than an action reply \(12..12 tokens\)"):
        build_grpo_trainer(model, processor, dataset, reward,
                           GRPOConfig(str(tmp_path), max_completion_length=5, use_cpu=True, bf16=False))
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                      beta=0.0, use_cpu=True, max_steps=2, learning_rate=1e-3,
                      logging_steps=1, save_strategy="no", report_to="none", gradient_checkpointing=False,
                      disable_tqdm=True, seed=0)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = build_grpo_trainer(model, processor, dataset, recording_reward, args)
    assert trainer.model is model.vlm and trainer.processing_class.tokenizer.padding_side == "left"
    assert args.max_completion_length == T * D  # TRL's default would let a bins reply run on past its end
    trainer.train()

    assert len(calls) == 2
    for completion_ids, columns in calls:
        assert "target" in columns and "images" in columns
        assert all(len(ids) == T * D for ids in completion_ids)  # only action tokens were sampled
        actions, valid = decode_completions(model, completion_ids)
        assert valid.all() and np.isfinite(actions).all()
    assert all(np.isfinite(r).all() and v.all() for _, v, r in reward.history)
    logged = [entry["rewards/recording_reward/mean"] for entry in trainer.state.log_history
              if "rewards/recording_reward/mean" in entry]  # fmt: skip
    assert len(logged) == 2 and all(-1.0 <= r <= 0.0 for r in logged)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any("language_model.layers" in k for k in changed)


def test_grpo_steps_move_a_one_token_bins_policy_toward_higher_reward(vlm_dir, tmp_path):
    # one action value, one reply token: the policy's expected reward over the 16 bins can be computed exactly
    from trl import GRPOConfig

    from hf_vla import VLAProcessor

    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="bins", action_dim=1, action_horizon=1, state_dim=0,
                                     num_action_tokens=16)  # fmt: skip
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary"], image_size=[56, 56])
    processor.compute_norm_stats("sim", np.random.default_rng(0).normal(size=(64, 1)))
    view = np.random.default_rng(1).integers(0, 256, (56, 56, 3), dtype=np.uint8)
    samples = [{"images": [view], "instruction": "open the drawer", "target": np.full((1, 1), 0.6, np.float32)}] * 2
    offset = model.config.action_token_offset
    token_rewards = -np.abs(model.bins.centres(np.arange(16)) - 0.6)  # what action_reward gives each reply

    def expected_reward():
        with torch.no_grad():
            logits = model.vlm(**processor(images=[[view]], text=["open the drawer"])).logits[0, -1]
        return float(torch.softmax(logits[offset : offset + 16].double(), -1).numpy() @ token_rewards)

    before = expected_reward()
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=8, beta=0.0,
                      use_cpu=True, max_steps=3, learning_rate=5e-3, logging_steps=1, save_strategy="no",
                      report_to="none", gradient_checkpointing=False, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = build_grpo_trainer(model, processor, grpo_prompt_dataset(processor, samples), action_reward(model), args)
    trainer.train()
    assert expected_reward() > before + 0.03
