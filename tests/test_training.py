"""VLATrainer on CPU: losses fall for each head family, per-module learning rates and freezing, cosine_with_min_lr,
exact resume, loadable checkpoints, evaluation in robot units, co-training, and the train_vla.py recipe script."""

import importlib.util
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoProcessor, TrainingArguments

from hf_vla import AutoModelForVLA, VLAPolicy, VLAProcessor
from hf_vla.data import load_lerobot, write_lerobot_dataset
from hf_vla.data.collators import CoTrainingCollator, VLACollator
from hf_vla.normalization import normalize
from hf_vla.training import VLATrainer
from hf_vla.training.recipe import dump_recipe, load_recipe, split_trainer_section

REPO = Path(__file__).resolve().parents[1]
CAMERAS = {"observation.images.front": "primary", "observation.images.wrist": "wrist"}
HORIZON, ACTION_DIM, STATE_DIM = 4, 3, 3
TINY_HEADS = {
    "oft": {},
    "gr00t": dict(dit_hidden_size=32, num_dit_layers=2, attention_head_dim=16, dit_output_dim=24, head_hidden_size=48,
                  dropout=0.0, repeated_diffusion_steps=2),
    "bins": dict(num_action_tokens=32),
    "fast": dict(max_action_tokens=16),
}  # fmt: skip


def toy_episodes(num_episodes=3, length=8, size=32):
    """Smooth state/action trajectories; each frame's pixels encode (episode, frame) so images carry the signal."""
    episodes = []
    for e in range(num_episodes):
        t = np.arange(length, dtype=np.float32)
        state = np.stack([np.sin(t / 3 + e), np.cos(t / 3 + e), np.full_like(t, e / 3)], axis=1)
        action = 0.5 * state + 0.1 * np.stack([t / length, -t / length, np.full_like(t, e)], axis=1)
        front = np.broadcast_to((40 * e + 20 * t).astype(np.uint8)[:, None, None, None], (length, size, size, 3))
        wrist = np.broadcast_to((200 - 30 * e - 10 * t).astype(np.uint8)[:, None, None, None], (length, size, size, 3))
        frames = {"observation.images.front": front.copy(), "observation.images.wrist": wrist.copy(),
                  "observation.state": state.astype(np.float32), "action": action.astype(np.float32)}  # fmt: skip
        episodes.append({"task": f"move the cube {'left' if e % 2 else 'right'}", "frames": frames})
    return episodes


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lerobot") / "toy"
    return write_lerobot_dataset(root, toy_episodes(), fps=10, robot_type="toy", video=False)


@pytest.fixture(scope="module")
def dataset(dataset_root):
    return load_lerobot(dataset_root, action_horizon=HORIZON, camera_rename=CAMERAS)


@pytest.fixture(scope="module")
def vlm_dir(tiny_vlm_dirs):
    return tiny_vlm_dirs["qwen2_5_vl"]


def make_model(vlm_dir, dataset, variant="oft", seed=0):
    stats = dataset.compute_stats()
    kwargs = dict(action_dim=ACTION_DIM, action_horizon=HORIZON, state_dim=STATE_DIM, **TINY_HEADS[variant])
    if variant == "fast":
        from hf_vla.action_tokenizers import FASTTokenizer

        chunks = np.stack([normalize(dataset[i]["actions"], stats["action"]) for i in range(len(dataset))])
        kwargs["action_tokenizer"] = FASTTokenizer.fit(chunks, scale=10, vocab_size=256)
    torch.manual_seed(seed)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, **kwargs)
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[28, 28])
    processor.set_norm_stats("toy", stats)
    return model, processor


def training_args(output_dir, **overrides):
    settings = dict(
        per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=12, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def logged_losses(output_dir: Path) -> dict:
    """{step: loss} of a train_vla run, from the trainer_state.json it saved."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


# ------------------------------------------------------------------------------------------------ training


# (base learning rate, action-head rate, required after/before ratio of the training-set loss after 20 steps).
# The flow-matching loss has a large irreducible part (it regresses noise - action at random times), so it falls
# slowly; the before/after losses use the same noise draws, so even a few percent is a real decrease.
LOSS_FALLS = {
    "oft": (3e-3, 1e-2, 0.9), "gr00t": (1e-3, 1e-2, 0.97), "bins": (3e-3, None, 0.8), "fast": (3e-3, None, 0.8),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(LOSS_FALLS))
def test_loss_falls_with_cosine_with_min_lr(variant, vlm_dir, dataset, tmp_path):
    base_rate, head_rate, ratio = LOSS_FALLS[variant]
    model, processor = make_model(vlm_dir, dataset, variant)
    args = training_args(tmp_path, max_steps=20, learning_rate=base_rate, lr_scheduler_type="cosine_with_min_lr",
                         lr_scheduler_kwargs={"min_lr": 1e-5}, prediction_loss_only=True)
    trainer = VLATrainer(model, args, train_dataset=dataset, eval_dataset=dataset, processing_class=processor,
                         learning_rates={"action_head": head_rate} if head_rate else None)

    def dataset_loss():
        torch.manual_seed(0)  # flow heads draw noise: the same draws before and after training
        return trainer.evaluate()["eval_loss"]

    before = dataset_loss()
    trainer.train()
    after = dataset_loss()
    assert after < ratio * before, (before, after)
    losses = logged(trainer, "loss")
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert logged(trainer, "action_loss") == pytest.approx(losses)  # no auxiliary terms: the action loss is the loss
    # after the last step the cosine sits at min_lr for the base group, other groups at the same fraction of peak
    rates = {group["name"]: group["lr"] for group in trainer.optimizer.param_groups}
    assert rates["base"] == pytest.approx(1e-5)
    # total_flos is Trainer's 6 × tokens × non-embedding parameters, summed over the steps
    tokens = sum(len(batch["input_ids"].flatten()) for batch in trainer.get_train_dataloader())
    expected = 6 * model.num_parameters(exclude_embeddings=True) * tokens * 20 / len(trainer.get_train_dataloader())
    assert trainer.state.total_flos == pytest.approx(expected, rel=0.2)
    if head_rate:
        assert rates["action_head"] == pytest.approx(1e-5 * head_rate / base_rate)


def test_gradient_accumulation_equals_one_large_batch_when_chunks_are_partly_padded(vlm_dir, dataset, tmp_path):
    # the last frames of an episode hold 4, 3, 2 and 1 valid steps: micro-batches of unequal weight
    tail = torch.utils.data.Subset(dataset, [4, 5, 6, 7])
    assert [int(dataset[i]["action_mask"].sum()) for i in tail.indices] == [4, 3, 2, 1]
    weights = {}
    for batch_size, accumulation in ((4, 1), (1, 4), (2, 2)):
        model, processor = make_model(vlm_dir, dataset)
        args = training_args(tmp_path / f"{batch_size}x{accumulation}", per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                             lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)  # fmt: skip
        trainer = VLATrainer(model, args, train_dataset=tail, processing_class=processor)
        trainer.train()
        weights[batch_size, accumulation] = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses = logged(trainer, "loss")
        if batch_size == 4:
            reference_loss = losses[0]
        assert losses[0] == pytest.approx(reference_loss, rel=1e-4) and logged(trainer, "action_loss") == pytest.approx(losses)
    for setting in ((1, 4), (2, 2)):  # an SGD step of rate 1 is the gradient itself
        for name, value in weights[setting].items():
            torch.testing.assert_close(value, weights[4, 1][name], rtol=1e-4, atol=1e-6, msg=f"{setting} {name}")


def test_gradient_accumulation_equals_one_large_batch_when_co_training_replies_differ_in_length(vlm_dir, dataset,
                                                                                                tmp_path):
    """Reply tokens weigh the chat term as valid entries weigh the action term: a 3-token reply next to a long one
    counts per token, whether the step's chat samples come in one batch or in several."""
    from hf_vla.data.vlm_chat import VLMChatCollator

    replies = {"Say hi.": "Hi.", "Describe the robot.": "A small arm with a parallel gripper, mounted on a table "
                                                         "beside a red block and a bowl."}
    chat = [{"images": [], "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]}
            for question, reply in replies.items()]
    tail = torch.utils.data.Subset(dataset, [4, 5, 6, 7])  # 4, 3, 2 and 1 valid steps
    weights, losses = {}, {}
    for batch_size, accumulation in ((4, 1), (1, 4), (2, 2)):
        model, processor = make_model(vlm_dir, dataset)
        # one chat sample per robot sample: every setting draws the same 4 from the seeded stream, in the same order
        collator = CoTrainingCollator(VLACollator(processor), chat, VLMChatCollator(processor),
                                      chat_batch_size=batch_size, seed=1)  # fmt: skip
        args = training_args(tmp_path / f"{batch_size}x{accumulation}", per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=1.0,
                             lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0)  # fmt: skip
        trainer = VLATrainer(model, args, data_collator=collator, train_dataset=tail, loss_scale={"vlm": 3.0})
        trainer.train()
        weights[batch_size, accumulation] = {n: p.detach().clone() for n, p in model.named_parameters()}
        losses[batch_size, accumulation] = [logged(trainer, key)[0] for key in ("loss", "action_loss", "vlm_loss")]
    for setting in ((1, 4), (2, 2)):
        assert losses[setting] == pytest.approx(losses[4, 1], rel=1e-4)
        for name, value in weights[setting].items():  # an SGD step of rate 1 is the gradient itself
            torch.testing.assert_close(value, weights[4, 1][name], rtol=1e-4, atol=1e-6, msg=f"{setting} {name}")


def test_learning_rate_groups_and_freezing(vlm_dir, dataset, tmp_path):
    model, processor = make_model(vlm_dir, dataset)
    rates = {"vlm.model.visual": 1e-5, "vlm.model.language_model": 1e-4, "vlm.model.language_model.layers.1": 3e-4,
             "action_head": 1e-3}  # fmt: skip
    trainer = VLATrainer(model, training_args(tmp_path, learning_rate=5e-5, weight_decay=0.1),
                         train_dataset=dataset, processing_class=processor,
                         learning_rates=rates, freeze=["vlm.model.visual.blocks.0"])  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert {name.removesuffix(" (no decay)") for name in groups} == set(rates) | {"base"}
    for name, group in groups.items():
        path = name.removesuffix(" (no decay)")
        assert group["initial_lr"] == (5e-5 if path == "base" else rates[path])
        assert group["weight_decay"] == (0.0 if name.endswith("(no decay)") else 0.1)

    owner = {id(p): name for name, group in groups.items() for p in group["params"]}
    decays = set(trainer.get_decay_parameter_names(model))
    for name, param in model.named_parameters():
        if name.startswith("vlm.model.visual.blocks.0."):
            assert not param.requires_grad and id(param) not in owner, name
            continue
        assert param.requires_grad
        expected = ("vlm.model.language_model.layers.1" if name.startswith("vlm.model.language_model.layers.1.")
                    else next((p for p in rates if name.startswith(p + ".")), "base"))  # fmt: skip
        assert owner[id(param)].removesuffix(" (no decay)") == expected, name
        assert owner[id(param)].endswith("(no decay)") == (name not in decays), name

    with pytest.raises(ValueError, match="match no parameter"):
        VLATrainer(model, training_args(tmp_path), processing_class=processor, learning_rates={"vlm.visual": 1e-5})
    with pytest.raises(ValueError, match="match no parameter"):
        VLATrainer(model, training_args(tmp_path), processing_class=processor, freeze=["actionhead"])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_learning_rate_paths_inside_a_peft_model(vlm_dir, dataset, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, processor = make_model(vlm_dir, dataset)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
                      modules_to_save=["action_head"])  # fmt: skip
    trainer = VLATrainer(get_peft_model(model, lora), training_args(tmp_path), train_dataset=dataset,
                         processing_class=processor, learning_rates={"action_head": 1e-3, "vlm": 2e-4})
    trainer.create_optimizer()
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert set(groups) == {"action_head", "action_head (no decay)", "vlm"}  # LoRA A/B matrices, the head copy
    assert len(groups["vlm"]["params"]) == 8 and groups["vlm"]["lr"] == 2e-4

    # paths inside the trained head copy (PEFT names it action_head.modules_to_save.default.*) work as well
    trainer = VLATrainer(get_peft_model(make_model(vlm_dir, dataset)[0], lora), training_args(tmp_path),
                         processing_class=processor, learning_rates={"action_head.layer_norm1": 1e-3})  # fmt: skip
    trainer.create_optimizer()
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    assert len(groups["action_head.layer_norm1 (no decay)"]["params"]) == 2


def test_a_model_from_model_init_is_frozen_and_checked(vlm_dir, dataset, tmp_path):
    processor = make_model(vlm_dir, dataset)[1]
    trainer = VLATrainer(model_init=lambda: make_model(vlm_dir, dataset)[0], args=training_args(tmp_path),
                         train_dataset=dataset, processing_class=processor, freeze=["vlm.model.visual"])  # fmt: skip
    assert not any(p.requires_grad for p in trainer.model.vlm.model.visual.parameters())
    assert all(p.requires_grad for p in trainer.model.action_head.parameters())
    with pytest.raises(ValueError, match=r"learning_rates: \['vlm.visual'\] match no parameter"):
        VLATrainer(model_init=lambda: make_model(vlm_dir, dataset)[0], args=training_args(tmp_path),
                   processing_class=processor, learning_rates={"vlm.visual": 1e-5})  # fmt: skip


def test_frozen_visual_with_activation_checkpointing_and_bf16(vlm_dir, dataset, tmp_path):
    model, processor = make_model(vlm_dir, dataset)
    visual = {k: v.clone() for k, v in model.vlm.model.visual.state_dict().items()}
    head = {k: v.clone() for k, v in model.action_head.state_dict().items()}
    args = training_args(tmp_path, max_steps=2, activation_checkpointing=True, bf16=True)
    trainer = VLATrainer(model, args, train_dataset=dataset, processing_class=processor, freeze=["vlm.model.visual"])
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and all(math.isfinite(x) for x in logged(trainer, "loss"))
    assert model.vlm.model.language_model.gradient_checkpointing
    assert all(torch.equal(v, visual[k]) for k, v in model.vlm.model.visual.state_dict().items())
    assert not all(torch.equal(v, head[k]) for k, v in model.action_head.state_dict().items())


def test_resume_continues_exactly_and_checkpoints_load(vlm_dir, dataset, tmp_path):
    def run(output_dir, resume=None):
        model, processor = make_model(vlm_dir, dataset)
        args = training_args(output_dir, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=5e-4)
        trainer = VLATrainer(model, args, train_dataset=dataset, processing_class=processor,
                             learning_rates={"action_head": 1e-3})
        trainer.train(resume_from_checkpoint=resume)
        return trainer, {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}

    full, full_losses = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    _, resumed_losses = run(tmp_path / "resumed", resume=str(checkpoint))
    assert set(resumed_losses) >= {3, 4}  # steps 1-2 come from the checkpoint's trainer_state.json
    assert resumed_losses[3] == full_losses[3] and resumed_losses[4] == full_losses[4]

    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                 "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):  # fmt: skip
        assert (checkpoint / name).is_file(), name
    final = tmp_path / "final"
    full.save_model(str(final))
    model = AutoModelForVLA.from_pretrained(final)
    processor = AutoProcessor.from_pretrained(final)
    assert isinstance(processor, VLAProcessor) and processor.camera_names == ["primary", "wrist"]
    batch = VLACollator(processor)([dataset[i] for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k not in ("raw_actions", "embodiment")}
    assert torch.equal(model.predict_action(**inputs), full.model.predict_action(**inputs))


class EpochRecorder(torch.utils.data.Dataset):
    def __init__(self, base):
        self.base, self.epochs = base, []

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index]

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def test_the_training_dataset_is_told_every_epoch_also_behind_a_sharded_loader(vlm_dir, dataset, tmp_path):
    from accelerate.data_loader import prepare_data_loader

    model, processor = make_model(vlm_dir, dataset)
    recorder = EpochRecorder(dataset)
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=2, per_device_train_batch_size=8)
    trainer = VLATrainer(model, args, train_dataset=recorder, processing_class=processor)
    trainer.train()
    assert sorted(set(recorder.epochs)) == [0, 1]

    # a 2-process run's loader: accelerate's set_epoch stops at the seedable sampler, the callback reaches the dataset
    loader = torch.utils.data.DataLoader(recorder, batch_size=2, sampler=torch.utils.data.RandomSampler(recorder))
    sharded = prepare_data_loader(loader, num_processes=2, process_index=0, put_on_device=False,
                                  use_seedable_sampler=True)  # fmt: skip
    recorder.epochs.clear()
    trainer.callback_handler.train_dataloader = sharded
    trainer.state.epoch = 3.0
    trainer.callback_handler.on_epoch_begin(trainer.args, trainer.state, trainer.control)
    assert recorder.epochs == [3]


def test_eval_metrics_in_robot_units(vlm_dir, dataset, tmp_path):
    model, processor = make_model(vlm_dir, dataset)
    # the last frames of the first episode: their chunks run past the episode end, so masking matters
    samples = torch.utils.data.Subset(dataset, range(3, 8))
    trainer = VLATrainer(model, training_args(tmp_path), eval_dataset=samples, processing_class=processor)
    metrics = trainer.evaluate()

    raw = [samples[i] for i in range(len(samples))]
    batch = VLACollator(processor)(raw)
    inputs = {k: v for k, v in batch.items() if k not in ("raw_actions", "embodiment")}
    predicted = processor.decode_actions(model.predict_action(**inputs), unnorm_key="toy")
    target = np.stack([s["actions"] for s in raw])
    mask = np.stack([s["action_mask"] for s in raw])
    assert not mask.all()
    error = (predicted - target)[mask]  # [valid steps, D]
    assert metrics["eval_action_l1"] == pytest.approx(np.abs(error).mean(), rel=1e-5)
    assert metrics["eval_action_mse"] == pytest.approx((error**2).mean(), rel=1e-5)
    assert metrics["eval_action_valid_fraction"] == 1.0
    assert metrics["eval_loss"] == pytest.approx(model(**inputs).loss.item(), rel=1e-5)


def test_eval_decodes_each_sample_with_its_own_embodiments_statistics(vlm_dir, dataset, tmp_path):
    from hf_vla.normalization import unnormalize

    model, processor = make_model(vlm_dir, dataset)
    toy = processor.norm_stats["toy"]
    wide = {**toy, "action": {**toy["action"], "q01": [v - 5.0 for v in toy["action"]["q01"]],
                              "q99": [v + 5.0 for v in toy["action"]["q99"]]}}  # fmt: skip
    processor.set_norm_stats("wide", wide)
    samples = [{**dataset[i], "embodiment": key} for i, key in zip(range(2, 6), ("toy", "wide", "wide", "toy"))]
    trainer = VLATrainer(model, training_args(tmp_path), eval_dataset=samples, processing_class=processor)
    metrics = trainer.evaluate()

    batch = VLACollator(processor)(samples)
    inputs = {k: v for k, v in batch.items() if k not in ("raw_actions", "embodiment")}
    normalized = model.predict_action(**inputs).numpy()
    predicted = np.stack([unnormalize(normalized[b], processor.norm_stats[s["embodiment"]]["action"])
                          for b, s in enumerate(samples)])  # fmt: skip
    target = np.stack([s["actions"] for s in samples])
    error = (predicted - target)[np.stack([s["action_mask"] for s in samples])]
    assert metrics["eval_action_l1"] == pytest.approx(np.abs(error).mean(), rel=1e-5)
    assert metrics["eval_action_mse"] == pytest.approx((error**2).mean(), rel=1e-5)


def test_eval_on_a_mixture_scores_each_embodiment_at_its_own_width(vlm_dir, dataset, tmp_path):
    from hf_vla.data import MixtureEntry, VLAMixture
    from hf_vla.data.lerobot_writer import synthetic_episodes

    narrow_root = write_lerobot_dataset(tmp_path / "narrow", synthetic_episodes(2, 6, size=16, state_dim=2, action_dim=2),
                                        fps=10, video=False)
    narrow = load_lerobot(narrow_root, action_horizon=HORIZON, camera_rename=CAMERAS)
    mixture = VLAMixture([MixtureEntry(dataset, 1.0, "toy"), MixtureEntry(narrow, 1.0, "narrow")], seed=0)
    model, processor = make_model(vlm_dir, dataset)
    for key, stats in mixture.compute_norm_stats().items():
        processor.set_norm_stats(key, stats)
    samples = [mixture[i] for i in range(8)]
    assert {s["embodiment"] for s in samples} == {"toy", "narrow"}
    trainer = VLATrainer(model, training_args(tmp_path), eval_dataset=samples, processing_class=processor)
    metrics = trainer.evaluate()  # the narrow embodiment decodes to 2 of the model's 3 dimensions

    batch = VLACollator(processor)(samples)
    inputs = {k: v for k, v in batch.items() if k not in ("raw_actions", "embodiment")}
    normalized = model.predict_action(**inputs).numpy()
    errors = []
    for b, sample in enumerate(samples):
        predicted = processor.decode_actions(normalized[b], unnorm_key=sample["embodiment"])
        width = predicted.shape[-1]
        errors.append((predicted - sample["actions"][:, :width])[sample["action_mask"][:, :width]])
    error = np.concatenate(errors)
    assert metrics["eval_action_l1"] == pytest.approx(np.abs(error).mean(), rel=1e-5)
    assert metrics["eval_action_mse"] == pytest.approx((error**2).mean(), rel=1e-5)


def test_action_error_metrics_mask_steps_and_leave_out_undecodable_chunks():
    from transformers import EvalPrediction

    from hf_vla.training import action_error_metrics

    target = np.zeros((3, 2, 2))
    predicted = np.stack([np.full((2, 2), 1.0), np.full((2, 2), 3.0), np.full((2, 2), np.nan)])
    mask = np.ones((3, 2, 2))
    mask[1, 1] = 0  # the second step of chunk 1 is past the episode end
    metrics = action_error_metrics(EvalPrediction(predictions=predicted, label_ids=(target, mask)))
    # valid entries: 4 of chunk 0 (error 1) and 2 of chunk 1 (error 3); chunk 2 did not decode
    assert metrics == pytest.approx({"action_l1": 10 / 6, "action_mse": 22 / 6, "action_valid_fraction": 2 / 3})


def test_collator_names_the_missing_camera(dataset, vlm_dir):
    _, processor = make_model(vlm_dir, dataset)
    samples = [dataset[0], dict(dataset[1], images={"primary": dataset[1]["images"]["primary"]})]
    with pytest.raises(KeyError, match=r"sample 1 has no image for camera 'wrist'"):
        VLACollator(processor)(samples)
    unmasked = {k: v for k, v in dataset[1].items() if k != "action_mask"}
    with pytest.raises(ValueError, match=r"sample 1 lacks 'action_mask', sample 0 has"):
        VLACollator(processor)([dataset[0], unmasked])
    with pytest.raises(ValueError, match=r"sample 1 has 'action_mask', sample 0 does not"):
        VLACollator(processor)([unmasked, dataset[0]])  # its past-the-end steps would have been trained on
    unnamed = {k: v for k, v in dataset[0].items() if k != "embodiment"}
    with pytest.raises(ValueError, match=r"unknown key 'other_robot'; known keys: \['"):
        VLACollator(processor)([unnamed, dict(dataset[1], embodiment="other_robot")])  # not relabelled
    listed = dict(dataset[1], images=list(dataset[1]["images"].values()))
    with pytest.raises(ValueError, match=r"^VLACollator: sample 1: images: expected a dict camera -> image, got list"):
        VLACollator(processor)([dataset[0], listed])
    with pytest.raises(ValueError, match=r"^VLACollator: sample\(s\) \[0\] have no 'instruction'"):
        VLACollator(processor)([{k: v for k, v in dataset[0].items() if k != "instruction"}, dataset[1]])
    narrow = dict(dataset[1], state=dataset[1]["state"][:-1])
    with pytest.raises(ValueError, match=r"^VLACollator: 'state' of sample 1 has shape \[\d+\], sample 0's \[\d+\]"):
        VLACollator(processor)([dataset[0], narrow])


def test_collator_batch_is_the_processors_on_views_in_camera_order(dataset, vlm_dir):
    """What training sees must be what `VLAPolicy` sends at inference: each sample's views in the processor's camera
    order (the two toy cameras differ), its state, actions and mask, plus the raw targets and the statistics key."""
    _, processor = make_model(vlm_dir, dataset)
    samples = [dataset[i] for i in (0, 5, 7)]  # 7: a chunk that runs past its episode's end
    batch = VLACollator(processor)(samples)
    expected = processor(images=[[s["images"][c] for c in processor.camera_names] for s in samples],
                         text=[s["instruction"] for s in samples], state=np.stack([s["state"] for s in samples]),
                         actions=np.stack([s["actions"] for s in samples]),
                         action_mask=np.stack([s["action_mask"] for s in samples]), embodiment="toy")  # fmt: skip
    assert set(batch) == {*expected, "raw_actions", "embodiment"}
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert not batch["action_mask"].all()
    assert torch.equal(batch["raw_actions"], torch.from_numpy(np.stack([s["actions"] for s in samples])).float())
    assert batch["embodiment"] == ["toy"] * 3


def test_logged_action_loss_is_weighted_as_trainer_weighs_loss(vlm_dir, dataset, tmp_path):
    """24 samples in batches of 4 with 4-step accumulation: an epoch's steps hold 4 and 2 batches. Without co-training
    action_loss must equal loss; a second train() on the same trainer starts from clean sums."""
    model, processor = make_model(vlm_dir, dataset)
    args = training_args(tmp_path, max_steps=3, logging_steps=2, gradient_accumulation_steps=4)
    trainer = VLATrainer(model, args, train_dataset=dataset, processing_class=processor)
    for _ in range(2):
        trainer.train()
        losses, action = logged(trainer, "loss"), logged(trainer, "action_loss")
        assert len(action) == len(losses) >= 1 and action == pytest.approx(losses, rel=1e-5)


# ------------------------------------------------------------------------------------------------ co-training


def write_chat_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(root / name)
    items = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is on the table?"},
                                             {"from": "gpt", "value": "A red block next to the bowl."}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "Where is the drawer?"},
                                             {"from": "gpt", "value": "The drawer is open on the left."}]},
    ]  # fmt: skip
    path = root / "chat.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def test_co_training_chat_stream_moves_on_every_epoch_in_workers_and_is_reproducible():
    def chat_ids(num_workers):
        torch.manual_seed(0)  # what Trainer's seed does for the DataLoader's worker seeds
        collator = CoTrainingCollator(lambda samples: {}, list(range(40)), lambda chat: chat, chat_batch_size=2, seed=7)
        loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, collate_fn=collator,
                                             num_workers=num_workers)  # fmt: skip
        return [[i for batch in loader for i in batch["vlm_batch"]] for _epoch in range(3)]

    for num_workers in (0, 1):
        epochs = chat_ids(num_workers)
        assert len({tuple(ids) for ids in epochs}) == 3, (num_workers, epochs)  # fresh chat samples each epoch
        assert chat_ids(num_workers) == epochs


def test_co_training_draws_chat_batch_size_samples_a_batch_cycling_evenly_through_the_chat_data():
    def stream(seed):
        collator = CoTrainingCollator(lambda samples: {}, list(range(10)), lambda chat: chat, chat_batch_size=3,
                                      seed=seed)  # fmt: skip
        batches = [collator([0, 1, 2, 3])["vlm_batch"] for _ in range(20)]
        assert [len(batch) for batch in batches] == [3] * 20  # the configured ratio, at every step
        return [i for batch in batches for i in batch]

    drawn = stream(seed=1)
    cycles = [drawn[k : k + 10] for k in range(0, 60, 10)]
    assert all(sorted(cycle) == list(range(10)) for cycle in cycles)  # every chat sample once per pass
    assert len({tuple(cycle) for cycle in cycles}) == 6  # reshuffled each pass
    assert stream(seed=1) == drawn and stream(seed=2) != drawn


def test_co_training_workers_do_not_replay_a_chat_stream_the_main_process_started():
    torch.manual_seed(0)
    collator = CoTrainingCollator(lambda samples: {}, list(range(40)), lambda chat: chat, chat_batch_size=2, seed=7)
    collator([0])  # a batch looked at before training: each worker gets a copy of the stream as it now stands
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, collate_fn=collator, num_workers=2)
    epochs = [[batch["vlm_batch"] for batch in loader] for _epoch in range(2)]
    streams = [tuple(i for batch in epoch[worker::2] for i in batch) for epoch in epochs for worker in (0, 1)]
    assert len(set(streams)) == 4, streams  # each worker of each epoch draws its own chat samples


def test_resumed_co_training_continues_the_chat_stream(vlm_dir, dataset, tmp_path):
    from hf_vla.data.vlm_chat import VLMChatCollator, load_vlm_chat

    chat = [*load_vlm_chat(write_chat_data(tmp_path)), {"images": [], "messages": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi, I am a robot arm."}]}]
    # 3 samples, 1 per batch: which ones a step draws depends on the stream's position

    def run(output_dir, resume=None):
        model, processor = make_model(vlm_dir, dataset)
        collator = CoTrainingCollator(VLACollator(processor), chat, VLMChatCollator(processor), chat_batch_size=1,
                                      seed=5)  # fmt: skip
        # 24 samples in batches of 4 with accumulation 2: 3 steps an epoch, so step 4 is in the second epoch
        args = training_args(output_dir, max_steps=5, save_strategy="steps", save_steps=4, learning_rate=2e-3,
                             gradient_accumulation_steps=2)  # fmt: skip
        trainer = VLATrainer(model, args, data_collator=collator, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=resume)
        return {entry["step"]: entry["vlm_loss"] for entry in trainer.state.log_history if "vlm_loss" in entry}

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed[5] == pytest.approx(full[5], rel=1e-5)


def test_co_training_logs_both_losses_and_the_vlm_loss_falls(vlm_dir, dataset, tmp_path):
    from hf_vla.data.vlm_chat import VLMChatCollator, load_vlm_chat

    model, processor = make_model(vlm_dir, dataset)
    chat = load_vlm_chat(write_chat_data(tmp_path))
    collator = CoTrainingCollator(VLACollator(processor), chat, VLMChatCollator(processor), chat_batch_size=2)
    args = training_args(tmp_path / "out", max_steps=10, logging_steps=2, learning_rate=2e-3)
    trainer = VLATrainer(model, args, data_collator=collator, train_dataset=dataset, loss_scale={"vlm": 0.5})
    assert trainer.processing_class is processor  # taken from the collator
    trainer.train()
    losses, action, vlm = logged(trainer, "loss"), logged(trainer, "action_loss"), logged(trainer, "vlm_loss")
    assert len(losses) == len(action) == len(vlm) == 5
    assert losses == pytest.approx([a + 0.5 * v for a, v in zip(action, vlm)], rel=1e-5)
    assert vlm[-1] < 0.9 * vlm[0], vlm


def test_co_training_logs_parts_that_add_up_to_the_loss_under_gradient_accumulation(vlm_dir, dataset, tmp_path):
    # micro-batches whose chunks hold different numbers of valid steps weigh the action loss unequally; the logged
    # action_loss must be weighted as the loss is, the vlm_loss averaged over the micro-batches
    from hf_vla.data.vlm_chat import VLMChatCollator, load_vlm_chat

    model, processor = make_model(vlm_dir, dataset)
    chat = load_vlm_chat(write_chat_data(tmp_path))
    collator = CoTrainingCollator(VLACollator(processor), chat, VLMChatCollator(processor), chat_batch_size=1, seed=3)
    args = training_args(tmp_path / "out", max_steps=3, gradient_accumulation_steps=2, logging_steps=1)
    trainer = VLATrainer(model, args, data_collator=collator, train_dataset=dataset,
                         loss_scale={"vla": 0.5, "vlm": 2.0})  # fmt: skip
    trainer.train()
    losses, action, vlm = logged(trainer, "loss"), logged(trainer, "action_loss"), logged(trainer, "vlm_loss")
    assert len(losses) == len(action) == len(vlm) == 3
    assert losses == pytest.approx([0.5 * a + 2.0 * v for a, v in zip(action, vlm)], rel=1e-5)


def test_co_training_loss_is_the_weighted_sum_of_action_loss_and_reply_token_cross_entropy(vlm_dir, dataset, tmp_path):
    from hf_vla.data.vlm_chat import VLMChatCollator, load_vlm_chat

    model, processor = make_model(vlm_dir, dataset)
    chat = load_vlm_chat(write_chat_data(tmp_path))
    collator = CoTrainingCollator(VLACollator(processor), chat, VLMChatCollator(processor), chat_batch_size=2, seed=0)
    trainer = VLATrainer(model, training_args(tmp_path / "out"), data_collator=collator, train_dataset=dataset,
                         loss_scale={"vla": 2.0, "vlm": 0.25})  # fmt: skip
    batch = collator([dataset[i] for i in range(4)])
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        action_loss = model(**{k: v for k, v in batch.items() if k not in ("raw_actions", "embodiment", "vlm_batch")})
        chat_batch = batch["vlm_batch"]
        logits = model.vlm(**{k: v for k, v in chat_batch.items() if k != "labels"}).logits.float()
    # the next-token cross-entropy, averaged over the reply tokens of both chat samples
    targets = chat_batch["labels"][:, 1:]
    scored = targets != -100
    assert scored.sum() > 10 and scored.sum() < chat_batch["attention_mask"].sum() / 2  # the replies only
    log_probs = logits[:, :-1].log_softmax(-1)[scored]
    cross_entropy = -log_probs.gather(-1, targets[scored][:, None]).mean()
    assert float(loss) == pytest.approx(2.0 * float(action_loss.loss) + 0.25 * float(cross_entropy), rel=1e-5)
    model.eval()  # evaluation scores actions only
    with torch.no_grad():
        assert float(trainer.compute_loss(model, batch)) == pytest.approx(2.0 * float(action_loss.loss), rel=1e-5)


@pytest.mark.parametrize("variant", ["oft", "gr00t", "pi", "pi_v3", "bins"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_co_training_reaches_every_trainable_parameter(variant, lora, vlm_dir, dataset, tmp_path):
    # Co-training runs DDP without its unused-parameter search, so a trainable parameter that neither loss reaches
    # hangs the reducer (the layer-wise heads' proj_out_1/2 did, and PEFT's head copy made them trainable again).
    from hf_vla.data.vlm_chat import VLMChatCollator, load_vlm_chat
    from hf_vla.training import add_lora
    from hf_vla.testing import TINY_HEADS as HEADS

    torch.manual_seed(0)
    model = AutoModelForVLA.from_vlm(vlm_dir, variant=variant, action_dim=ACTION_DIM, action_horizon=HORIZON,
                                     state_dim=STATE_DIM, **HEADS[variant])  # fmt: skip
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary", "wrist"], image_size=[28, 28])
    processor.set_norm_stats("toy", dataset.compute_stats())
    if lora:
        model = add_lora(model, r=4, base_model_name_or_path=str(vlm_dir))
    chat = load_vlm_chat(write_chat_data(tmp_path))
    collator = CoTrainingCollator(VLACollator(processor), chat, VLMChatCollator(processor), chat_batch_size=2)
    trainer = VLATrainer(model, training_args(tmp_path / "out"), data_collator=collator, train_dataset=dataset)
    assert trainer.args.ddp_find_unused_parameters is False
    model.train()
    trainer.compute_loss(model, collator([dataset[i] for i in range(4)])).backward()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    unreached = sorted(name for name, param in model.named_parameters() if param.requires_grad and param.grad is None)
    assert trainable and not unreached, unreached


# ------------------------------------------------------------------------------------------------ recipes


def test_recipe_overrides():
    recipe = load_recipe(REPO / "trainers" / "recipes" / "oft.yaml", [
        "--trainer.learning_rate.action_head", "1e-4", "--trainer.learning_rate.vlm.model.visual=2e-6",
        "--model.variant", "gr00t", "--trainer.freeze", "vlm.model.visual,action_head", "--data.mixture", "mix.yaml",
    ])  # fmt: skip
    assert recipe["model"]["variant"] == "gr00t" and recipe["data"]["mixture"] == "mix.yaml"
    fields, rates, freeze, loss_scale = split_trainer_section(recipe["trainer"])
    assert rates == {"vlm.model.visual": 2e-6, "action_head": 1e-4}
    assert fields["learning_rate"] == 1e-4 and fields["lr_scheduler_kwargs"] == {"min_lr": 1e-6}
    assert freeze == ["vlm.model.visual", "action_head"] and loss_scale == {"vla": 1.0, "vlm": 0.1}
    with pytest.raises(ValueError, match="must start with"):
        load_recipe(None, ["--max_steps", "3"])

    recipe = load_recipe(REPO / "trainers" / "recipes" / "oft.yaml", ["--trainer.learning_rate", "3e-5"])
    fields, rates, _, _ = split_trainer_section(recipe["trainer"])
    assert fields["learning_rate"] == 3e-5 and rates == {"vlm.model.visual": 1e-5, "action_head": 1e-3}  # kept

    # a parent path set on the command line keeps a rate written nested under it in the file
    recipe = load_recipe(None, ["--trainer.learning_rate.vlm", "3e-5"],
                         defaults={"trainer": {"learning_rate": {"base": 1e-4, "vlm": {"model": {"visual": 1e-5}}}}})
    assert split_trainer_section(recipe["trainer"])[1] == {"vlm.model.visual": 1e-5, "vlm": 3e-5}

    # a comma-separated freeze list may have spaces after its commas; exponents need no sign or dot to be floats
    recipe = load_recipe(None, ["--trainer.freeze", "vlm.model.visual, action_head", "--trainer.max_grad_norm", "1e1",
                                "--trainer.weight_decay", "5E-2"])  # fmt: skip
    fields, _, freeze, _ = split_trainer_section(recipe["trainer"])
    assert freeze == ["vlm.model.visual", "action_head"]
    assert fields == {"max_grad_norm": 10.0, "weight_decay": 0.05}
    assert all(type(value) is float for value in fields.values())

    # the optional lora section: null, set whole, or key by key (a null section becomes a mapping)
    assert load_recipe(None, ["--lora.r", "16"])["lora"] == {"r": 16} and "lora" not in load_recipe(None)
    assert load_recipe(None, ["--lora", "null"], defaults={"lora": {"r": 8}})["lora"] is None
    assert load_recipe(None, ["--lora.alpha", "32"], defaults={"lora": None})["lora"] == {"alpha": 32}

    for override, message in [(["--trainer.learning_rate.action_head", "abc"], r"learning_rate\.action_head: .*'abc'"),
                              (["--trainer.learning_rate.action_head", "null"], r"learning_rate\.action_head: .*None"),
                              (["--trainer.learning_rate", "fast"], r"trainer\.learning_rate: expected a number"),
                              (["--trainer.loss_scale", "0.5"], r"trainer\.loss_scale: expected a mapping"),
                              (["--trainer.loss_scale.vlm", "true"], r"trainer\.loss_scale\.vlm: expected a number"),
                              (["--trainer.freeze", "5"], r"trainer\.freeze: expected module paths")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            split_trainer_section(load_recipe(None, override)["trainer"])


@pytest.fixture(scope="module")
def train_vla():
    spec = importlib.util.spec_from_file_location("train_vla", REPO / "trainers" / "train_vla.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("variant", ["oft", "gr00t", "pi", "pi_v3", "fast", "bins"])
def test_every_recipe_trains_with_its_defaults(variant, train_vla, tmp_path):
    """Each recipe as shipped (tiny backbone, generated dataset; FAST fits its tokenizer), shortened to 2 steps."""
    out = tmp_path / variant
    metrics = train_vla.main([
        str(REPO / "trainers" / "recipes" / f"{variant}.yaml"), "--trainer.output_dir", str(out),
        "--trainer.max_steps", "2", "--trainer.save_strategy", "no", "--trainer.disable_tqdm", "true",
        "--model.image_size", "[28, 28]", "--data.synthetic.num_episodes", "2", "--data.synthetic.length", "8",
    ])  # fmt: skip
    assert math.isfinite(metrics["train_loss"]) and "eval_action_l1" in metrics
    recipe = yaml.safe_load((out / "training_recipe.yaml").read_text())
    assert recipe["model"]["variant"] == variant
    # the folder is a policy that predicts a chunk in robot units, built as the saved recipe says
    policy = VLAPolicy.from_pretrained(str(out))
    config = policy.model.config
    assert config.model_type == f"vla_{variant}" and recipe["model"]["head"]
    assert {key: getattr(config, key) for key in recipe["model"]["head"]} == recipe["model"]["head"]
    assert (config.action_dim, config.state_dim, config.action_horizon) == (4, 4, 8)
    assert policy.processor.image_size == [28, 28] and policy.processor.camera_names == ["primary", "wrist"]
    sample = load_lerobot(out / "synthetic_dataset", action_horizon=8,
                          camera_rename=train_vla.SYNTHETIC_CAMERA_RENAME)[3]  # fmt: skip
    chunk = policy.predict({"images": sample["images"], "instruction": sample["instruction"], "state": sample["state"]})
    # a 2-step FAST model's reply is rarely a whole token sequence: it decodes to NaN, as documented
    assert chunk.shape == (8, 4) and (variant == "fast" or np.isfinite(chunk).all())


def test_train_vla_script_end_to_end(train_vla, tmp_path, dataset_root, caplog):
    out = tmp_path / "run"
    run = [
        str(REPO / "trainers" / "recipes" / "oft.yaml"),
        "--trainer.output_dir", str(out), "--trainer.max_steps", "3", "--trainer.save_steps", "2",
        "--trainer.disable_tqdm", "true", "--trainer.logging_steps", "1",
        "--trainer.learning_rate.action_head", "3e-3",
        "--data.lerobot", str(dataset_root), "--data.embodiment", "toy", "--data.eval_split", "0.2",
        "--model.action_horizon", "4", "--model.image_size", "[28, 28]",
    ]  # fmt: skip
    metrics = train_vla.main(run)
    assert load_recipe(out / "checkpoint-2" / "training_recipe.yaml") == load_recipe(out / "training_recipe.yaml")
    # resuming with other data settings continues, but says what differs from the checkpoint's run
    train_vla.main([*run, "--trainer.output_dir", str(tmp_path / "resumed"), "--trainer.resume_from_checkpoint",
                    str(out / "checkpoint-2"), "--data.embodiment", "toy2", "--data.eval_split", "0"])  # fmt: skip
    assert "\"data.embodiment: 'toy' -> 'toy2'\", 'data.eval_split: 0.2 -> 0']" in caplog.text
    assert "with model/data/lora settings other than its run's" in caplog.text and "model.vlm" not in caplog.text
    # the synthetic set's cameras are named for the recipes; selecting one of them keeps its name
    train_vla.main([str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.output_dir", str(tmp_path / "one"),
                    "--trainer.max_steps", "1", "--data.cameras", "[observation.images.front]",
                    "--model.image_size", "[28, 28]", "--data.eval_split", "0"])  # fmt: skip
    assert AutoProcessor.from_pretrained(tmp_path / "one").camera_names == ["primary"]
    assert {"train_loss", "eval_action_l1", "eval_action_mse"} <= set(metrics)
    recipe = yaml.safe_load((out / "training_recipe.yaml").read_text())
    assert recipe["trainer"]["learning_rate"]["action_head"] == 3e-3
    assert recipe["model"]["vlm"] == str(out / "tiny_vlm") and recipe["data"]["lerobot"] == str(dataset_root)
    assert (out / "checkpoint-2" / "processor_config.json").is_file()
    model = AutoModelForVLA.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.action_horizon == 4 and sorted(processor.norm_stats) == ["toy"]
    head_rates = [entry["learning_rate/action_head"] for entry in json.loads(
        (out / "trainer_state.json").read_text())["log_history"] if "learning_rate/action_head" in entry]
    assert head_rates and max(head_rates) <= 3e-3


def test_train_vla_help_prints_the_recipe_sections(train_vla, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_vla.main(["trainers/recipes/oft.yaml", "--help"])
    assert exit_info.value.code == 0 and "Recipe sections" in capsys.readouterr().out


def test_fsdp_that_accelerate_does_not_enable_is_reported(train_vla, caplog, monkeypatch):
    # accelerate turns FSDP on for GPU process groups only; on CPU the same launch runs plain DDP
    trainer = SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=False,
                              args=SimpleNamespace(fsdp_plugin_args=None))  # fmt: skip
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert train_vla.sharding(trainer) == "" and "FSDP" not in caplog.text
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    assert train_vla.sharding(trainer) == ""
    assert "FSDP was asked for, but accelerate enables it on GPUs only" in caplog.text


def test_resuming_the_latest_checkpoint_needs_one(train_vla, tmp_path):
    for output_dir in (tmp_path / "missing", tmp_path):
        with pytest.raises(ValueError, match=rf"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-N"):
            train_vla.main([str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.output_dir", str(output_dir),
                            "--trainer.resume_from_checkpoint", "true"])  # fmt: skip
    # a misspelt checkpoint path is refused before the data and the model are loaded, not by Trainer afterwards
    for checkpoint in (str(tmp_path / "run" / "checkpoint-3"), "5"):
        with pytest.raises(ValueError, match=re.escape(f"trainer.resume_from_checkpoint: expected true (the latest "
                                                       f"checkpoint-N of output_dir) or a checkpoint folder, got "
                                                       f"{yaml.safe_load(checkpoint)!r}, which is not a folder")):
            train_vla.main([str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.output_dir", str(tmp_path),
                            "--trainer.resume_from_checkpoint", checkpoint])  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_generated_backbone_and_dataset_are_not_reused_for_other_settings(train_vla, tmp_path):
    """The tiny backbone and the synthetic dataset are built once into the output directory; a later run there with
    other `model.tiny_vlm` / `data.synthetic` settings is refused instead of silently training on the old ones (while
    its training_recipe.yaml would claim the new ones)."""
    run = [str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.output_dir", str(tmp_path), "--trainer.max_steps",
           "1", "--trainer.save_strategy", "no", "--trainer.disable_tqdm", "true", "--data.eval_split", "0",
           "--model.image_size", "[28, 28]", "--data.synthetic.num_episodes", "2", "--data.synthetic.length", "8"]  # fmt: skip
    train_vla.main(run)
    train_vla.main(run)  # the same settings: both folders are reused
    synthetic = {"num_episodes": 2, "length": 8, "size": 32, "state_dim": 4, "action_dim": 4}
    wider = {**synthetic, "state_dim": 7}
    with pytest.raises(ValueError, match=re.escape(
            f"data.synthetic: expected {synthetic} (the settings {tmp_path / 'synthetic_dataset'} was built with; "
            f"remove that folder or use another trainer.output_dir to build it anew), got {wider}")):
        train_vla.main([*run, "--data.synthetic.state_dim", "7"])
    tiny = {"family": "qwen2_5_vl", "hidden_size": 64, "num_layers": 2}
    with pytest.raises(ValueError, match=re.escape(f"model.tiny_vlm: expected {tiny} (the settings {tmp_path / 'tiny_vlm'} "
                                                   f"was built with; ")):
        train_vla.main([*run, "--model.tiny_vlm.hidden_size", "32"])


def test_train_vla_refuses_keys_it_would_not_read(train_vla, tmp_path):
    recipe = str(REPO / "trainers" / "recipes" / "oft.yaml")
    # unknown keys are named with their closest known key; values of the wrong type are refused before anything runs
    checked_early = [
        (["--data.lerobt", "/data/x"], r"data: unknown key\(s\) \['lerobt'\] \(closest known: lerobt → lerobot\)"),
        (["--trainer.max_step", "3"], r"trainer: unknown key\(s\) \['max_step'\] \(closest known: max_step → "
                                      r"max_steps\); expected TrainingArguments"),
        (["--trainer.max_steps", "abc"], r"trainer\.max_steps: expected an integer, got 'abc'"),
        (["--trainer.max_steps", "true"], r"trainer\.max_steps: expected an integer, got True"),
        (["--trainer.bf16", "1"], r"trainer\.bf16: expected true or false, got 1"),
        (["--trainer.weight_decay", "[0.1]"], r"trainer\.weight_decay: expected a number, got "),
        (["--model.action_horizon", "0"], r"model\.action_horizon: expected a positive integer"),
        (["--model.variant", "gr00"], r"model\.variant: expected one of \['bins', 'fast', 'gr00t', 'oft', 'pi', "
                                      r"'pi_v3'\], got 'gr00'"),
        (["--model.variant", "gr00t", "--model.head", "{num_dit_layer: 1}"],
         r"model\.head: unknown key\(s\) \['num_dit_layer'\] \(closest known: num_dit_layer → num_dit_layers\); "
         r"expected VLAGR00TConfig fields$"),
        (["--model.variant", "gr00t"], r"model\.head: unknown key\(s\) \['head_hidden_dim', 'head_num_blocks'\].* "
                                       r"\(oft fields: to switch variants, start from that variant's recipe or reset"),
        (["--model.head.action_horizon", "4"], r"model\.head: \['action_horizon'\] are set by the model section; use "
                                               r"model\.action_horizon instead"),
        (["--model.head", "[4]"], r"model\.head: expected \{field: value\} of the variant's config"),
        (["--data.augment.random_shfit", "4"], r"data\.augment: unknown key\(s\) \['random_shfit'\] \(closest known: "
                                               r"random_shfit → random_shift\)"),
        (["--lora.aplha", "32"], r"lora: unknown key\(s\) \['aplha'\] \(closest known: aplha → alpha\); expected "
                                 r"\['alpha', 'dropout', 'modules_to_save', 'r', 'target', 'train_embeddings', "
                                 r"'train_head'\] \(add_lora's settings\)"),
        (["--lora", "16"], r"lora: expected null \(full fine-tuning\) or \{key: value\} of \['alpha', "),
        (["--lora.r", "0"], r"lora\.r: expected a positive integer, got 0"),
        (["--lora.r", "8.5"], r"lora\.r: expected a positive integer, got 8\.5"),
        (["--lora.dropout", "1"], r"lora\.dropout: expected a fraction in \[0, 1\), got 1"),
        (["--lora.train_head", "yes"], r"lora\.train_head: expected true or false, got 'yes'"),
        (["--lora.modules_to_save", "action_head"], r"lora\.modules_to_save: expected null or a list of module names, "
                                                    r"got 'action_head'"),
        (["--lora.train_embeddings", "true"], r"lora\.train_embeddings: only the token heads \(fast, bins\) have "
                                              r"action-token rows to train; model\.variant is oft"),
    ]
    for override, message in [*checked_early,
                              (["--model.action_horizn", "16"], r"model: unknown key\(s\) \['action_horizn'\]"),
                              (["--model.image_size", "224"], r"model\.image_size: expected \[height, width\] in pixels, got 224"),
                              (["--model.dtype", "bf16"], r"model\.dtype: expected null, auto or a torch dtype name .*got 'bf16'"),
                              (["--data.eval_split", "-0.1"], r"data\.eval_split: expected a fraction in \[0, 1\), got -0\.1"),
                              (["--data.eval_split", "1"], r"data\.eval_split: expected a fraction in \[0, 1\), got 1"),
                              (["--data.normalization", "q99"], r"data\.normalization: expected \{action: mode, state: mode\}, got 'q99'"),
                              (["--data.augment.random_shift", "abc"], r"data\.augment: expected \{random_shift: pixels")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            train_vla.main([recipe, "--trainer.output_dir", str(tmp_path), *override])
    assert not any(tmp_path.iterdir())  # refused before anything was written
    assert set(train_vla.LORA_VALUES) == set(train_vla.LORA_DEFAULTS)  # every add_lora setting has its value check


def test_train_vla_head_overrides_reach_the_model_and_the_saved_recipe(train_vla, tmp_path):
    """One nested head field set on the command line changes that field and keeps the recipe's others; `model.head:
    null` builds the variant's default head (it used to stop the run with a TypeError)."""
    run = ["--trainer.max_steps", "1", "--trainer.save_strategy", "no", "--trainer.disable_tqdm", "true",
           "--data.eval_split", "0", "--model.image_size", "[28, 28]", "--data.synthetic.num_episodes", "2",
           "--data.synthetic.length", "8"]  # fmt: skip
    out = tmp_path / "gr00t"
    train_vla.main([str(REPO / "trainers" / "recipes" / "gr00t.yaml"), *run, "--trainer.output_dir", str(out),
                    "--model.head.num_dit_layers", "1", "--model.head.dropout", "0.25"])  # fmt: skip
    config = AutoModelForVLA.from_pretrained(out).config
    head = yaml.safe_load((REPO / "trainers" / "recipes" / "gr00t.yaml").read_text())["model"]["head"]
    expected = {**head, "num_dit_layers": 1, "dropout": 0.25}
    assert {key: getattr(config, key) for key in expected} == expected and head["num_dit_layers"] != 1
    assert load_recipe(out / "training_recipe.yaml")["model"]["head"] == expected
    out = tmp_path / "oft"
    train_vla.main([str(REPO / "trainers" / "recipes" / "oft.yaml"), *run, "--trainer.output_dir", str(out),
                    "--model.head", "null"])  # fmt: skip
    assert load_recipe(out / "training_recipe.yaml")["model"]["head"] is None
    from hf_vla.models.oft import VLAOFTConfig

    assert AutoModelForVLA.from_pretrained(out).config.head_num_blocks == VLAOFTConfig().head_num_blocks


def test_train_vla_learning_rates_loss_scale_and_freeze_from_the_command_line(train_vla, tmp_path):
    """A dict given to --trainer.learning_rate replaces the recipe's rates (the recipe's vlm.model.visual rate is
    gone); --trainer.loss_scale.vla weighs the logged loss; a freeze path that matches nothing is named."""
    run = [str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.max_steps", "2", "--trainer.save_strategy", "no",
           "--trainer.logging_steps", "1", "--trainer.disable_tqdm", "true", "--data.eval_split", "0",
           "--model.image_size", "[28, 28]", "--model.action_horizon", "4", "--data.synthetic.num_episodes", "2",
           "--data.synthetic.length", "8"]  # fmt: skip
    out = tmp_path / "run"
    train_vla.main([*run, "--trainer.output_dir", str(out), "--trainer.learning_rate",
                    "{base: 1e-4, action_head: 2e-3}", "--trainer.loss_scale.vla", "2.5"])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    history = [entry for entry in history if "loss" in entry]
    assert [entry["loss"] for entry in history] == pytest.approx([2.5 * entry["action_loss"] for entry in history])
    assert [sorted(key for key in entry if key.startswith("learning_rate")) for entry in history] == [
        ["learning_rate", "learning_rate/action_head"]] * 2
    assert (history[1]["learning_rate"], history[1]["learning_rate/action_head"]) == pytest.approx((2.5e-5, 5e-4))
    recipe = load_recipe(out / "training_recipe.yaml")["trainer"]
    assert recipe["learning_rate"] == {"base": 1e-4, "action_head": 2e-3} and recipe["loss_scale"]["vla"] == 2.5
    with pytest.raises(ValueError, match=r"freeze: \['vlm\.model\.visul'\] match no parameter of "
                                         r"VLAOFTForActionPrediction\. .* top-level modules: \['action_head', 'vlm'\]"):
        train_vla.main([*run, "--trainer.output_dir", str(tmp_path / "frozen"), "--trainer.freeze", "vlm.model.visul"])


def test_train_vla_statistics_keys_of_several_datasets(train_vla, tmp_path):
    from hf_vla.data.lerobot import compute_union_stats

    roots = [write_lerobot_dataset(tmp_path / name / "toy", toy_episodes(num_episodes=2 + i), fps=10, video=False)
             for i, name in enumerate(("a", "b"))]  # fmt: skip
    run = [str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.max_steps", "1", "--trainer.save_strategy",
           "no", "--trainer.disable_tqdm", "true", "--data.eval_split", "0", "--model.action_horizon", "4",
           "--model.image_size", "[28, 28]", "--data.lerobot", f"[{roots[0]}, {roots[1]}]"]  # fmt: skip
    # both folders are called "toy": named after them, the second's statistics would silently replace the first's
    with pytest.raises(ValueError, match=r"data\.embodiment: .* \['toy'\] repeat; give one statistics key per"):
        train_vla.main([*run, "--trainer.output_dir", str(tmp_path / "guessed")])
    train_vla.main([*run, "--trainer.output_dir", str(tmp_path / "one_key"), "--data.embodiment", "[toy, toy]",
                    "--data.action_mode", "[delta, delta, abs]"])  # fmt: skip
    saved = AutoProcessor.from_pretrained(tmp_path / "one_key").norm_stats["toy"]
    union = compute_union_stats([load_lerobot(root, action_horizon=4, action_mode=["delta", "delta", "abs"])
                                 for root in roots])  # fmt: skip
    assert saved["action_mode"] == ["delta", "delta", "abs"]  # saved with the model: VLAPolicy returns absolute actions
    assert saved["num_transitions"] == union["num_transitions"] == 5 * 8  # one key: statistics of both datasets
    np.testing.assert_allclose(saved["action"]["q99"], union["action"]["q99"], rtol=1e-6)
    np.testing.assert_allclose(saved["state"]["mean"], union["state"]["mean"], rtol=1e-6)


def test_train_vla_evaluates_every_datasets_tail_in_its_own_robot_units_every_eval_steps(train_vla, tmp_path):
    """data.eval_split holds out the tail of each dataset; `eval_strategy: steps` evaluates every `eval_steps`, and
    the final metrics are the saved policy's errors on those frames, each decoded with its own embodiment's statistics
    (the second dataset's actions are 20 times larger: decoded with the first's statistics they would be far off)."""
    from hf_vla.data.lerobot_writer import synthetic_episodes

    roots = []
    for name, scale, seed in (("small", 1.0, 0), ("large", 20.0, 1)):
        episodes = synthetic_episodes(2, 8, size=16, state_dim=2, action_dim=3, seed=seed)
        for episode in episodes:
            episode["frames"]["action"] = episode["frames"]["action"] * scale
        roots.append(write_lerobot_dataset(tmp_path / name, episodes, fps=10, video=False))
    out = tmp_path / "run"
    metrics = train_vla.main([
        str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.output_dir", str(out), "--trainer.max_steps", "4",
        "--trainer.save_strategy", "no", "--trainer.disable_tqdm", "true", "--trainer.eval_strategy", "steps",
        "--trainer.eval_steps", "2", "--data.eval_split", "0.25", "--data.lerobot", f"[{roots[0]}, {roots[1]}]",
        "--data.embodiment", "[small, large]", "--model.image_size", "[28, 28]", "--model.action_horizon", "4",
        "--data.camera_rename", "{observation.images.front: primary, observation.images.wrist: wrist}",
    ])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_action_l1" in entry] == [2, 4]

    policy = VLAPolicy.from_pretrained(str(out))
    errors = []
    for root, key in zip(roots, ("small", "large")):
        dataset = load_lerobot(root, action_horizon=4, camera_rename=CAMERAS)
        held_out = range(len(dataset) - round(len(dataset) * 0.25), len(dataset))  # 17 frames: the last 4
        for index in held_out:
            sample = dataset[index]
            chunk = policy.predict({"images": sample["images"], "instruction": sample["instruction"],
                                    "state": sample["state"]}, unnorm_key=key)  # fmt: skip
            errors.append((chunk - sample["actions"])[sample["action_mask"]])
    errors = np.concatenate(errors)
    assert metrics["eval_action_l1"] == pytest.approx(np.abs(errors).mean(), rel=1e-4)
    assert metrics["eval_action_mse"] == pytest.approx((errors**2).mean(), rel=1e-4)
    assert metrics["eval_action_l1"] > 5  # the large dataset's errors, in its own units


def test_train_vla_with_a_mixture(train_vla, tmp_path, dataset_root, caplog):
    cameras = dict(CAMERAS)
    mixture = {"datasets": [{"path": str(dataset_root), "embodiment": "toy_a", "cameras": cameras},
                            {"path": str(dataset_root), "embodiment": "toy_b", "cameras": cameras, "weight": 2.0,
                             "normalization": {"action": "min_max"}}]}  # fmt: skip
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    out = tmp_path / "run"
    train_vla.main([
        str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.output_dir", str(out),
        "--trainer.max_steps", "2", "--trainer.save_strategy", "no", "--trainer.disable_tqdm", "true",
        "--data.mixture", str(tmp_path / "mix.yaml"), "--data.eval_split", "0",
        "--model.action_horizon", "4", "--model.image_size", "[28, 28]",
        "--data.camera_rename", "{observation.images.front: primary}",
    ])  # fmt: skip
    processor = AutoProcessor.from_pretrained(out)
    assert sorted(processor.norm_stats) == ["toy_a", "toy_b"]
    assert processor.norm_stats["toy_b"]["action"]["mode"] == ["min_max"] * ACTION_DIM
    assert "data.camera_rename: not used with data.mixture" in caplog.text  # the mixture YAML renames per dataset


def test_train_vla_checks_each_dataset_has_the_processors_cameras_by_name(train_vla, tmp_path, dataset_root):
    """data.camera_names skips the same-names check: each dataset must still have every one of those cameras, or a
    batch holding one of its (rarely drawn) frames would stop training at a random step. Views are read by name, so
    the same names in another order are the same cameras."""
    front_only = {"observation.images.front": "primary"}
    mixture = {"datasets": [{"path": str(dataset_root), "embodiment": "both", "cameras": CAMERAS},
                            {"path": str(dataset_root), "embodiment": "front", "cameras": front_only, "weight": 0.01}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    data = {**train_vla.DEFAULTS["data"], "mixture": str(tmp_path / "mix.yaml"), "video_decoder": None}
    model = {**train_vla.DEFAULTS["model"], "action_horizon": HORIZON}
    with pytest.raises(ValueError, match=re.escape(
            "data.camera_names: datasets[1] ('front').cameras: expected views named ['wrist', 'primary'], got "
            "['primary'] (missing ['wrist'])")):
        train_vla.load_mixture_data({**data, "camera_names": ["wrist", "primary"]}, model)
    *_, camera_names, _ = train_vla.load_mixture_data({**data, "camera_names": ["primary"]}, model)
    assert camera_names == ["primary", "wrist"]  # the first dataset's; main() then takes data.camera_names
    # the same names in another order are the same cameras: the collator reads each view by name
    reordered = {"observation.images.wrist": "wrist", "observation.images.front": "primary"}
    mixture["datasets"][1]["cameras"] = reordered
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture, sort_keys=False))
    train, *_, camera_names, _ = train_vla.load_mixture_data(data, model)
    assert camera_names == ["primary", "wrist"] and train.entries[1].dataset.camera_names == ["wrist", "primary"]
    del mixture["datasets"][1]["cameras"]["observation.images.wrist"]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture, sort_keys=False))
    with pytest.raises(ValueError, match=re.escape("data.mixture: the datasets name their cameras differently "
                                                   "[['primary', 'wrist'], ['primary']]")):
        train_vla.load_mixture_data(data, model)
    episodes = toy_episodes()  # the cameras in the other order in info.json, so the reader lists them wrist first
    for episode in episodes:
        episode["frames"] = {key: episode["frames"][key] for key in reversed(list(episode["frames"]))}
    swapped = write_lerobot_dataset(tmp_path / "swapped", episodes, fps=10, video=False)
    lerobot = {**train_vla.DEFAULTS["data"], "lerobot": [str(dataset_root), str(swapped)], "embodiment": ["a", "b"],
               "camera_rename": CAMERAS, "video_decoder": None}
    train, *_, camera_names, _ = train_vla.load_lerobot_data(lerobot, model, tmp_path)
    assert camera_names == ["primary", "wrist"] and list(train[len(train) - 1]["images"]) == ["wrist", "primary"]


def test_one_camera_rename_serves_folders_with_different_feature_keys(train_vla, tmp_path):
    """data.lerobot as a list whose folders key their cameras differently: the camera-name error says to use
    data.camera_rename, and one map with both folders' keys does it (each folder takes its own entries)."""
    episodes = toy_episodes()
    for episode in episodes:
        frames = episode["frames"]
        frames["observation.images.image"] = frames.pop("observation.images.front")
    other = write_lerobot_dataset(tmp_path / "other", episodes, fps=10, video=False)
    toy = write_lerobot_dataset(tmp_path / "toy", toy_episodes(), fps=10, video=False)
    model = {**train_vla.DEFAULTS["model"], "action_horizon": HORIZON}
    data = {**train_vla.DEFAULTS["data"], "lerobot": [str(toy), str(other)], "embodiment": ["toy", "toy"],
            "video_decoder": None}
    with pytest.raises(ValueError, match="name their cameras differently .*; use data.camera_rename"):
        train_vla.load_lerobot_data(data, model, tmp_path)
    rename = {**CAMERAS, "observation.images.image": "primary"}
    train, *_, camera_names, _ = train_vla.load_lerobot_data({**data, "camera_rename": rename}, model, tmp_path)
    assert camera_names == ["primary", "wrist"] and set(train[len(train) - 1]["images"]) == {"primary", "wrist"}
    with pytest.raises(ValueError, match=re.escape("data.camera_rename: ['observation.images.imag'] not among")):
        train_vla.load_lerobot_data({**data, "camera_rename": {**CAMERAS, "observation.images.imag": "primary"}},
                                    model, tmp_path)  # fmt: skip


def test_saved_recipe_reloads_unchanged(tmp_path):
    """Strings that look like numbers or YAML 1.1 booleans stay strings through dump_recipe → load_recipe (and any
    plain YAML reader)."""
    recipe = {"model": {"variant": "oft"}, "data": {"lerobot": "/data/x"},
              "trainer": {"run_name": "1e5", "save_strategy": "no", "tag": "true", "version": "1.5", "note": "null",
                          "learning_rate": {"base": 1e-5}, "bf16": False, "max_steps": 3}}  # fmt: skip
    dump_recipe(recipe, tmp_path / "resolved.yaml")
    assert load_recipe(tmp_path / "resolved.yaml") == recipe
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == recipe


def test_group_learning_rates_logged_for_no_decay_only_paths():
    from types import SimpleNamespace

    groups = [{"name": "base", "lr": 1e-4}, {"name": "action_head", "lr": 1e-3},
              {"name": "action_head (no decay)", "lr": 1e-3}, {"name": "vlm.model.norm (no decay)", "lr": 5e-6}]
    trainer = SimpleNamespace(learning_rates={"action_head": 1e-3, "vlm.model.norm": 5e-6},
                              optimizer=SimpleNamespace(param_groups=groups))  # fmt: skip
    assert VLATrainer._group_learning_rates(trainer) == {"learning_rate/action_head": 1e-3,
                                                         "learning_rate/vlm.model.norm": 5e-6}


def test_group_learning_rates_are_logged_beside_the_rate_the_step_used(vlm_dir, dataset, tmp_path):
    model, processor = make_model(vlm_dir, dataset)
    args = training_args(tmp_path, max_steps=4, warmup_steps=2, learning_rate=1e-4, lr_scheduler_type="linear")
    trainer = VLATrainer(model, args, train_dataset=dataset, processing_class=processor,
                         learning_rates={"action_head": 1e-3})  # fmt: skip
    trainer.train()
    rows = [(entry["learning_rate"], entry["learning_rate/action_head"]) for entry in trainer.state.log_history
            if "learning_rate/action_head" in entry]  # fmt: skip
    assert len(rows) == 4 and rows[0] == (0.0, 0.0)  # the first warm-up step runs at rate 0, in every group
    assert [head for _, head in rows[1:]] == pytest.approx([10 * base for base, _ in rows[1:]])


def test_train_vla_data_split_and_statistics_modes(train_vla, dataset_root, tmp_path):
    """The eval split is the tail of the frames, held out of training; each feature gets its own normalisation."""
    data = {**train_vla.DEFAULTS["data"], "lerobot": str(dataset_root), "embodiment": "toy", "camera_rename": CAMERAS,
            "eval_split": 0.25, "normalization": {"action": "min_max", "state": "mean_std"}}
    model = {**train_vla.DEFAULTS["model"], "action_horizon": HORIZON}
    train, evaluation, stats, camera_names, action_only = train_vla.load_lerobot_data(data, model, tmp_path)
    assert (len(train), len(evaluation)) == (18, 6)  # 24 frames, round(24 * 0.25) = 6 held out
    assert [evaluation[i]["frame_index"] for i in range(6)] == [2, 3, 4, 5, 6, 7]  # the last episode's tail
    assert {(train[i]["episode_index"], train[i]["frame_index"]) for i in range(18)}.isdisjoint(
        {(evaluation[i]["episode_index"], evaluation[i]["frame_index"]) for i in range(6)})
    assert evaluation[0]["episode_index"] == 2 and train[17]["embodiment"] == "toy"
    assert stats["toy"]["action"]["mode"] == ["min_max"] * ACTION_DIM
    assert stats["toy"]["state"]["mode"] == ["mean_std"] * STATE_DIM
    assert camera_names == ["primary", "wrist"] and action_only[0][1] == "toy"


def test_train_vla_takes_dimensions_from_the_dataset_and_the_recipe_camera_names_and_image_size(train_vla, tmp_path):
    from hf_vla.data.lerobot_writer import synthetic_episodes

    root = write_lerobot_dataset(tmp_path / "narrow", synthetic_episodes(2, 6, size=16, state_dim=2, action_dim=3),
                                 fps=10, video=False)
    run = [str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.max_steps", "1", "--trainer.save_strategy",
           "no", "--trainer.disable_tqdm", "true", "--data.eval_split", "0", "--model.action_horizon", "2",
           "--data.lerobot", str(root), "--data.embodiment", "arm",
           "--data.camera_rename", "{observation.images.front: primary, observation.images.wrist: wrist}"]  # fmt: skip
    out = tmp_path / "dims"
    train_vla.main([*run, "--trainer.output_dir", str(out), "--model.image_size", "[32, 24]",
                    "--data.camera_names", "[wrist, primary]"])  # fmt: skip
    config, processor = AutoModelForVLA.from_pretrained(out).config, AutoProcessor.from_pretrained(out)
    assert (config.action_dim, config.state_dim) == (3, 2)
    assert processor.camera_names == ["wrist", "primary"] and processor.image_size == [32, 24]
    recipe = yaml.safe_load((out / "training_recipe.yaml").read_text())
    assert (recipe["model"]["action_dim"], recipe["model"]["state_dim"]) == (3, 2)  # resolved values are saved
    stateless = tmp_path / "stateless"  # no state input: the state statistics are not kept
    train_vla.main([*run, "--trainer.output_dir", str(stateless), "--model.image_size", "[28, 28]",
                    "--model.state_dim", "0"])  # fmt: skip
    assert AutoModelForVLA.from_pretrained(stateless).config.state_dim == 0
    assert "state" not in AutoProcessor.from_pretrained(stateless).norm_stats["arm"]
    # an explicit value is kept and checked against the data before anything is built (or a FAST tokenizer fitted)
    for option, message in (("--model.action_dim", r"model.action_dim: the data's actions \('arm'\) have 3 dimensions, "
                                                   r"got 5; leave it null"),
                            ("--model.state_dim", r"model.state_dim: expected the data's state width 2 \('arm'\) or 0 "
                                                  r"\(a model without state\), got 5")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            train_vla.main([*run, "--trainer.output_dir", str(tmp_path / "wide"), option, "5"])
    assert not (tmp_path / "wide").exists()
    message = r"model.state_dim: expected 0: the data \('toy'\) has no state, got 2"
    with pytest.raises(ValueError, match=message):
        train_vla.check_model_widths({"action_dim": 3, "state_dim": 2}, {"toy": {"action": {"mean": [0.0] * 3}}})


def test_the_resolved_recipe_names_local_data_by_absolute_paths(train_vla, dataset_root, tmp_path, monkeypatch):
    """The recipe travels with the model: a model card made from another folder would read `data/toy` as a hub id."""
    monkeypatch.chdir(dataset_root.parent.parent)
    relative = f"{dataset_root.parent.name}/{dataset_root.name}"
    (tmp_path / "mix.yaml").write_text("datasets: []\n")
    data = {"lerobot": relative, "mixture": None}
    train_vla.absolute_data_paths(data)
    assert data == {"lerobot": str(dataset_root.resolve()), "mixture": None}
    data = {"lerobot": [relative, "lerobot/not_here"], "mixture": str(tmp_path / "mix.yaml")}
    train_vla.absolute_data_paths(data)
    assert data == {"lerobot": [str(dataset_root.resolve()), "lerobot/not_here"], "mixture": str(tmp_path / "mix.yaml")}


def test_fast_tokenizer_is_fitted_on_normalised_chunks(train_vla, dataset, monkeypatch):
    from hf_vla.action_tokenizers import FASTTokenizer

    seen = {}
    original = FASTTokenizer.fit.__func__

    def spy(cls, chunks, **kwargs):
        seen["chunks"], seen["kwargs"] = np.asarray(chunks), kwargs
        return original(cls, chunks, **kwargs)

    monkeypatch.setattr(FASTTokenizer, "fit", classmethod(spy))
    stats = {"toy": dataset.compute_stats()}
    fast = {"scale": 10.0, "vocab_size": 128, "fit_samples": 5}
    train_vla.fit_fast_tokenizer(fast, stats, [(dataset, "toy")], None, seed=0)
    rows = np.random.default_rng(0).choice(len(dataset), size=5, replace=False)
    low, high = np.asarray(stats["toy"]["action"]["q01"]), np.asarray(stats["toy"]["action"]["q99"])
    expected = [2 * (dataset[int(i)]["actions"] - low) / (high - low) - 1 for i in rows]  # q99 mode, by hand
    np.testing.assert_allclose(seen["chunks"], np.clip(expected, -1, 1), rtol=1e-5, atol=1e-6)
    assert seen["kwargs"] == {"scale": 10.0, "vocab_size": 128}


class ConstantChunks:
    """A dataset whose frame i is the chunk filled with `first + i`, so a fitted chunk names the frame it came from."""

    def __init__(self, first: int, frames: int):
        self.first, self.frames = first, frames

    def __len__(self):
        return self.frames

    def __getitem__(self, index):
        if not 0 <= index < self.frames:
            raise IndexError(index)
        return {"actions": np.full((HORIZON, ACTION_DIM), self.first + index, np.float32)}


def fitted_frames(train_vla, monkeypatch, sources, fit_samples, seed=0) -> list[int]:
    """The frames (their values) `fit_fast_tokenizer` fits on, with identity statistics (normalised == raw)."""
    from hf_vla.action_tokenizers import FASTTokenizer

    seen = []
    monkeypatch.setattr(FASTTokenizer, "fit", classmethod(lambda cls, chunks, **kwargs: seen.append(chunks) or "fit"))
    identity = {name: [1.0 if name == "std" else 0.0] * ACTION_DIM for name in ("mean", "std", "min", "max", "q01",
                                                                                "q99")}  # fmt: skip
    stats = {key: {"action": {**identity, "mode": ["identity"] * ACTION_DIM}} for _, key in sources}
    fast = {"scale": 10.0, "vocab_size": 128, "fit_samples": fit_samples}
    train_vla.fit_fast_tokenizer(fast, stats, sources, None, seed=seed)
    chunks = np.asarray(seen[0])
    assert (chunks == chunks[:, :1, :1]).all()  # each chunk one frame's, whole
    return chunks[:, 0, 0].astype(int).tolist()


def test_fast_tokenizer_fit_draws_fit_samples_frames_uniformly_over_all_training_frames(train_vla, monkeypatch):
    """As the Trainer samples a concatenation of datasets: each in proportion to its size, every frame at most once,
    `fit_samples` chunks in all (a small dataset or many datasets neither shrink nor grow the sample)."""
    small, large = ConstantChunks(0, 10), ConstantChunks(1000, 90)
    frames = fitted_frames(train_vla, monkeypatch, [(small, "a"), (large, "b")], fit_samples=50, seed=3)
    drawn = np.random.default_rng(3).choice(100, size=50, replace=False)
    assert frames == [int(i) if i < 10 else 1000 + int(i) - 10 for i in drawn]
    assert len(set(frames)) == 50 and sum(f < 1000 for f in frames) == sum(int(i) < 10 for i in drawn) < 25
    # a dataset smaller than an even share, and fewer samples than datasets
    assert len(fitted_frames(train_vla, monkeypatch, [(ConstantChunks(0, 3), "a"), (large, "b")], 60)) == 60
    many = [(ConstantChunks(1000 * k, 5), f"e{k}") for k in range(3)]
    assert len(fitted_frames(train_vla, monkeypatch, many, fit_samples=2)) == 2
    # more samples than frames: every frame once; the same seed, the same frames
    assert sorted(fitted_frames(train_vla, monkeypatch, many, fit_samples=100)) == [
        1000 * k + i for k in range(3) for i in range(5)]
    assert fitted_frames(train_vla, monkeypatch, many, 7, seed=5) == fitted_frames(train_vla, monkeypatch, many, 7, 5)


def test_fast_tokenizer_is_not_fitted_on_the_held_out_frames(train_vla, dataset_root, tmp_path, monkeypatch):
    data = {**train_vla.DEFAULTS["data"], "lerobot": str(dataset_root), "embodiment": "toy", "camera_rename": CAMERAS,
            "eval_split": 0.25}
    model = {**train_vla.DEFAULTS["model"], "action_horizon": HORIZON}
    train, evaluation, stats, _, action_only = train_vla.load_lerobot_data(data, model, tmp_path)
    from hf_vla.action_tokenizers import FASTTokenizer

    seen = []
    monkeypatch.setattr(FASTTokenizer, "fit", classmethod(lambda cls, chunks, **kwargs: seen.append(chunks) or "fit"))
    fast = {"scale": 10.0, "vocab_size": 128, "fit_samples": 1000}  # more than there are frames: all of them
    train_vla.fit_fast_tokenizer(fast, stats, action_only, train, seed=0)
    fitted = {np.asarray(chunk).tobytes() for chunk in seen[0]}
    training = [normalize(train[i]["actions"], stats["toy"]["action"]) for i in range(len(train))]
    held_out = [normalize(evaluation[i]["actions"], stats["toy"]["action"]) for i in range(len(evaluation))]
    assert len(seen[0]) == len(train) == 18 and fitted == {chunk.tobytes() for chunk in training}
    assert not fitted & {chunk.tobytes() for chunk in held_out}


def test_fast_tokenizer_fit_on_a_mixture_draws_as_training_does_and_reads_no_image(train_vla, dataset_root, tmp_path,
                                                                                     monkeypatch):
    """A mixture's fitting chunks are its own draws (weights, embodiments) read without camera views: decoding up to
    fit_samples frames of video per camera before training starts would only be thrown away."""
    from hf_vla.action_tokenizers import FASTTokenizer
    from hf_vla.data.lerobot import LeRobotDataset

    mixture = {"datasets": [{"path": str(dataset_root), "embodiment": "a", "cameras": CAMERAS},
                            {"path": str(dataset_root), "embodiment": "b", "cameras": CAMERAS, "weight": 3.0,
                             "normalization": {"action": "min_max"}}]}  # fmt: skip
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    data = {**train_vla.DEFAULTS["data"], "mixture": str(tmp_path / "mix.yaml"), "video_decoder": None}
    model = {**train_vla.DEFAULTS["model"], "action_horizon": HORIZON}
    train, _, stats, _, action_only = train_vla.load_mixture_data(data, model)
    fit_samples = 12
    drawn = np.random.default_rng(0).choice(len(train), size=fit_samples, replace=False)
    samples = [train[int(i)] for i in drawn]
    assert {sample["embodiment"] for sample in samples} == {"a", "b"} and all(sample["images"] for sample in samples)
    expected = [normalize(sample["actions"], stats[sample["embodiment"]]["action"]) for sample in samples]
    seen = []
    monkeypatch.setattr(FASTTokenizer, "fit", classmethod(lambda cls, chunks, **kwargs: seen.append(chunks) or "fit"))
    monkeypatch.setattr(LeRobotDataset, "_embedded_image", lambda *args: pytest.fail("an image was read to fit FAST"))
    fast = {"scale": 10.0, "vocab_size": 128, "fit_samples": fit_samples}
    assert train_vla.fit_fast_tokenizer(fast, stats, action_only, train, seed=0) == "fit"
    np.testing.assert_array_equal(seen[0], np.stack(expected))


def test_fitted_fast_tokenizer_travels_with_the_model_and_a_resumed_run_keeps_it(train_vla, tmp_path, monkeypatch):
    """The tokenizer fitted by train_vla is saved beside the weights (the final folder and each checkpoint) and
    reloads to the same token ids and decoded chunks. A resumed run continues with its checkpoint's tokenizer: a
    refit (here on other frames, from another seed) would give the trained token ids other meanings."""
    from hf_vla.action_tokenizers import FASTTokenizer

    fitted = []
    fit = train_vla.fit_fast_tokenizer
    monkeypatch.setattr(train_vla, "fit_fast_tokenizer", lambda *args: fitted.append(fit(*args)) or fitted[-1])
    run = [str(REPO / "trainers" / "recipes" / "fast.yaml"), "--trainer.save_steps", "1", "--trainer.disable_tqdm",
           "true", "--model.image_size", "[28, 28]", "--data.synthetic.num_episodes", "2", "--data.synthetic.length",
           "8", "--data.eval_split", "0", "--model.action_horizon", "4", "--model.fast.fit_samples", "6"]  # fmt: skip
    out = tmp_path / "run"
    train_vla.main([*run, "--trainer.output_dir", str(out), "--trainer.max_steps", "1"])
    (tokenizer,) = fitted
    chunks = np.random.default_rng(0).uniform(-1, 1, (16, 4, 4)).cumsum(axis=1) / 4  # smooth, in the fitted range
    ids = tokenizer(chunks)
    for folder in (out, out / "checkpoint-1"):
        saved = AutoModelForVLA.from_pretrained(folder).action_tokenizer
        assert saved.bpe.to_str() == tokenizer.bpe.to_str() and (saved.scale, saved.min_token, saved.vocab_size) == (
            tokenizer.scale, tokenizer.min_token, tokenizer.vocab_size)
        assert saved(chunks) == ids
        np.testing.assert_array_equal(saved.decode(ids), tokenizer.decode(ids))
    assert FASTTokenizer.from_pretrained(out / "action_tokenizer")(chunks) == ids

    resumed = tmp_path / "resumed"
    train_vla.main([*run, "--trainer.output_dir", str(resumed), "--trainer.max_steps", "2", "--trainer.seed", "7",
                    "--trainer.resume_from_checkpoint", str(out / "checkpoint-1")])  # fmt: skip
    assert len(fitted) == 1  # no refit
    data = {**train_vla.DEFAULTS["data"], "lerobot": str(out / "synthetic_dataset"), "eval_split": 0}
    train, _, stats, _, action_only = train_vla.load_lerobot_data(data, {"action_horizon": 4}, tmp_path)
    refit = fit({"scale": 10.0, "vocab_size": 128, "fit_samples": 6}, stats, action_only, train, 7)
    assert refit.bpe.to_str() != tokenizer.bpe.to_str()  # what the resumed run would otherwise have trained with
    assert AutoModelForVLA.from_pretrained(resumed).action_tokenizer.bpe.to_str() == tokenizer.bpe.to_str()


@pytest.mark.parametrize("variant", ["oft", "gr00t"])
def test_train_vla_resumed_run_continues_exactly(variant, train_vla, tmp_path):
    """A run resumed from checkpoint-2 logs the uninterrupted run's losses at steps 3 and 4, for a regression head and
    a flow head (whose noise and timesteps come from the restored RNG), with random image shifts drawn in between."""
    run = [str(REPO / "trainers" / "recipes" / f"{variant}.yaml"), "--trainer.max_steps", "4", "--trainer.save_steps",
           "2", "--trainer.logging_steps", "1", "--trainer.disable_tqdm", "true", "--data.eval_split", "0",
           "--model.image_size", "[28, 28]", "--model.action_horizon", "4", "--data.augment.random_shift", "2",
           "--data.synthetic.num_episodes", "2", "--data.synthetic.length", "8"]  # fmt: skip
    train_vla.main([*run, "--trainer.output_dir", str(tmp_path / "full")])
    train_vla.main([*run, "--trainer.output_dir", str(tmp_path / "resumed"), "--trainer.resume_from_checkpoint",
                    str(tmp_path / "full" / "checkpoint-2")])  # fmt: skip
    full, resumed = logged_losses(tmp_path / "full"), logged_losses(tmp_path / "resumed")
    assert sorted(full) == [1, 2, 3, 4] and len(set(full.values())) == 4
    assert resumed[3] == full[3] and resumed[4] == full[4]


def test_train_vla_resume_true_continues_the_latest_checkpoint(train_vla, tmp_path, dataset_root):
    """`resume_from_checkpoint: true` picks the newest checkpoint-N of the output directory and continues from its
    weights: a marker written into checkpoint-2's weights is still there after one more step (a fresh start, or the
    older checkpoint-1, would not carry it)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    run = [str(REPO / "trainers" / "recipes" / "oft.yaml"), "--trainer.output_dir", str(out), "--trainer.save_steps",
           "1", "--trainer.save_total_limit", "3", "--trainer.disable_tqdm", "true", "--data.lerobot",
           str(dataset_root), "--data.embodiment", "toy", "--data.eval_split", "0", "--model.action_horizon", "4",
           "--model.image_size", "[28, 28]", "--trainer.learning_rate", "1e-3"]  # fmt: skip
    train_vla.main([*run, "--trainer.max_steps", "2"])
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    marked = [name for name in weights if name.startswith("action_head") and name.endswith("bias")][0]
    weights[marked] = torch.full_like(weights[marked], 50.0)
    save_file(weights, out / "checkpoint-2" / "model.safetensors", metadata={"format": "pt"})
    # a finished run is not resumed past its end (transformers' Trainer would train a third step)
    with pytest.raises(ValueError, match=r"trainer\.max_steps: expected more than the 2 steps .*checkpoint-2 has "
                                         r"trained, got 2; raise it to train further"):
        train_vla.main([*run, "--trainer.max_steps", "2", "--trainer.resume_from_checkpoint", "true"])
    assert not (out / "checkpoint-3").exists()
    train_vla.main([*run, "--trainer.max_steps", "3", "--trainer.resume_from_checkpoint", "true"])
    final = load_file(out / "model.safetensors")[marked]
    assert (final - 50.0).abs().max() < 1.0, final  # one AdamW step of lr 1e-3 moves a value by about 1e-3
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    # the saved recipe says how the model trains, not how this run started: run again elsewhere, it starts afresh
    for folder in (out, out / "checkpoint-3"):
        assert "resume_from_checkpoint" not in yaml.safe_load((folder / "training_recipe.yaml").read_text())["trainer"]


TINY_LORA_RUN = ["--trainer.disable_tqdm", "true", "--trainer.logging_steps", "1", "--data.eval_split", "0",
                 "--model.image_size", "[28, 28]", "--model.action_horizon", "4", "--data.synthetic.num_episodes", "2",
                 "--data.synthetic.length", "8", "--trainer.warmup_steps", "0",
                 "--lora.r", "4", "--lora.alpha", "8"]  # fmt: skip


def synthetic_inputs(train_vla, out: Path, processor, count=3) -> dict:
    samples = load_lerobot(out / "synthetic_dataset", action_horizon=4, camera_rename=train_vla.SYNTHETIC_CAMERA_RENAME)
    batch = VLACollator(processor)([samples[i] for i in range(count)])
    return {k: v for k, v in batch.items() if k not in ("raw_actions", "embodiment", "actions", "action_mask")}


def changed_weights(model, base) -> dict[str, torch.Tensor]:
    """{name: rows that differ} for every tensor of `model` that differs from `base`'s."""
    before = base.state_dict()
    differs = {name: torch.atleast_1d(value != before[name]) for name, value in model.state_dict().items()}
    return {name: rows.reshape(len(rows), -1).any(dim=1).nonzero().flatten() for name, rows in differs.items()
            if rows.any()}  # fmt: skip


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_train_vla_lora_run_merges_into_the_output_directory_and_keeps_its_adapter(train_vla, tmp_path, caplog):
    """`--lora.r` trains adapters on the built VLA saved as lora_base/ (its head is new, so the hub VLM is no base);
    the output directory holds the merged model (a plain model directory to load, serve and push), lora_adapter/
    the adapter with the processor, which reloads to the same policy through PEFT."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from hf_vla.hub.push import release_files
    from hf_vla.training.lora import head_modules

    out = tmp_path / "run"
    train_vla.main([str(REPO / "trainers" / "recipes" / "oft.yaml"), *TINY_LORA_RUN, "--trainer.output_dir", str(out),
                    "--trainer.max_steps", "3", "--trainer.save_strategy", "no",
                    "--trainer.learning_rate", "1e-2"])  # fmt: skip
    base_dir, adapter_dir = out / "lora_base", out / "lora_adapter"
    assert load_recipe(out / "training_recipe.yaml")["lora"] == {**train_vla.LORA_DEFAULTS, "r": 4, "alpha": 8}
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    merged, base = AutoModelForVLA.from_pretrained(out).eval(), AutoModelForVLA.from_pretrained(base_dir).eval()
    assert type(merged) is type(base) and not (out / "adapter_config.json").exists()
    # the language model's projections (through the adapters) and the head trained; nothing else moved
    changed = changed_weights(merged, base)
    adapted = {name for name in changed if name.startswith("vlm.")}
    assert adapted and all(re.fullmatch(r"vlm\.model\.language_model\.layers\.\d+\.(self_attn|mlp)\."
                                        r"(q|k|v|o|gate|up|down)_proj\.weight", name) for name in adapted), adapted
    assert "action_head" in {name.split(".")[0] for name in set(changed) - adapted} <= set(head_modules(base))
    # the logged count is what trains: the adapters and the head's copy, the tensors the adapter file holds
    trainable = sum(tensor.numel() for tensor in load_file(adapter_dir / "adapter_model.safetensors").values())
    assert re.search(rf"VLAOFTForActionPrediction with LoRA r=4: [\d,]+ parameters, {trainable:,} trainable",
                     caplog.text)  # fmt: skip

    processor = AutoProcessor.from_pretrained(out)
    assert AutoProcessor.from_pretrained(adapter_dir).norm_stats == processor.norm_stats
    inputs = synthetic_inputs(train_vla, out, processor)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForVLA.from_pretrained(base_dir), adapter_dir).merge_and_unload()
        expected = expected.eval().predict_action(**inputs)
        assert torch.equal(merged.predict_action(**inputs), expected)
        torch.testing.assert_close(AutoModelForVLA.from_pretrained(adapter_dir).eval().predict_action(**inputs),
                                   expected, atol=1e-5, rtol=1e-5)  # fmt: skip
        assert not torch.allclose(base.predict_action(**inputs), expected, atol=1e-3)
    assert VLAPolicy.from_pretrained(str(out)).model.config.to_dict() == merged.config.to_dict()
    # a release is the merged model: neither the base (a whole second model) nor the adapter goes to the Hub
    assert "model.safetensors" in release_files(out) and all("/" not in name for name in release_files(out))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_train_vla_lora_train_embeddings_trains_only_the_action_token_rows(train_vla, tmp_path):
    out = tmp_path / "bins"
    train_vla.main([str(REPO / "trainers" / "recipes" / "bins.yaml"), *TINY_LORA_RUN, "--trainer.output_dir", str(out),
                    "--trainer.max_steps", "2", "--trainer.save_strategy", "no",
                    "--lora.train_embeddings", "true"])  # fmt: skip
    merged = AutoModelForVLA.from_pretrained(out)
    base = AutoModelForVLA.from_pretrained(out / "lora_base")
    offset, count = merged.config.action_token_offset, merged.config.num_action_tokens
    changed = changed_weights(merged, base)
    embeddings = {"vlm.model.language_model.embed_tokens.weight", "vlm.lm_head.weight"}
    assert embeddings <= set(changed) and merged.vlm.lm_head.weight is not merged.get_input_embeddings().weight
    for name in embeddings:  # rows of the action tokens only (those the batches reached), every other row unchanged
        assert len(changed[name]) and all(offset <= row < offset + count for row in changed[name].tolist()), name
    assert all(".layers." in name and name.endswith("_proj.weight") for name in set(changed) - embeddings), changed


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_train_vla_refuses_fsdp2_for_trainable_tokens_on_tied_embeddings(train_vla, tmp_path):
    """accelerate's FSDP2 finds tied embeddings by the identity of the two modules' `weight`, which PEFT's
    trainable-tokens wrappers make anew on each read: it would shard their one weight twice (torch fails). train_vla
    refuses that before training; the untied backbone (checked under FSDP2 in test_distributed.py) and LoRA without
    train_embeddings go on, and so does the tied one without FSDP2."""
    from hf_vla.testing import build_tiny_vla
    from hf_vla.training import add_lora

    lora = {**train_vla.LORA_DEFAULTS, "train_embeddings": True}
    for tied in (True, False):
        model, _ = build_tiny_vla("bins", tmp_path / str(tied), vlm_overrides={"tie_word_embeddings": tied})
        peft_model = add_lora(model, r=4, train_embeddings=True)
        # what accelerate compares to tell tied embeddings: never the same tensor, tied or not
        assert peft_model.get_input_embeddings().weight is not peft_model.get_output_embeddings().weight
        fsdp2 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
        trainer = SimpleNamespace(model=peft_model, is_fsdp_enabled=True, accelerator=fsdp2)
        for settings in (lora, {**lora, "train_embeddings": False}, None):
            if tied and settings is lora:
                with pytest.raises(ValueError, match="lora.train_embeddings: the backbone ties its LM head"):
                    train_vla.check_lora_sharding(trainer, settings)
            else:
                train_vla.check_lora_sharding(trainer, settings)
        train_vla.check_lora_sharding(SimpleNamespace(model=peft_model, is_fsdp_enabled=False), lora)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # raised inside peft
def test_train_vla_lora_resumed_run_continues_exactly(train_vla, tmp_path):
    """A LoRA run's checkpoint-N holds the adapter (its base stays lora_base/); resuming it logs the uninterrupted run's
    losses and ends on the same merged weights. A checkpoint is resumed only with the kind of training it came from."""
    from safetensors.torch import load_file

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = [str(REPO / "trainers" / "recipes" / "oft.yaml"), *TINY_LORA_RUN, "--trainer.max_steps", "4",
           "--trainer.save_steps", "2", "--data.augment.random_shift", "2", "--lora.dropout", "0.1"]  # fmt: skip
    train_vla.main([*run, "--trainer.output_dir", str(full)])
    checkpoint = full / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    with pytest.raises(ValueError, match=re.escape(f"lora: {checkpoint} holds a LoRA adapter; resume it with the lora "
                                                   "section of its run")):
        train_vla.main([*run, "--trainer.output_dir", str(resumed), "--trainer.resume_from_checkpoint", str(checkpoint),
                        "--lora", "null"])  # fmt: skip
    with pytest.raises(ValueError, match=r"lora: .* is a checkpoint of full fine-tuning \(no adapter_config\.json\)"):
        train_vla.main([*run, "--trainer.output_dir", str(resumed), "--trainer.resume_from_checkpoint",
                        str(tmp_path)])  # fmt: skip
    assert not resumed.exists()
    train_vla.main([*run, "--trainer.output_dir", str(resumed), "--trainer.resume_from_checkpoint", str(checkpoint)])
    full_losses, resumed_losses = logged_losses(full), logged_losses(resumed)
    assert sorted(full_losses) == [1, 2, 3, 4] and len(set(full_losses.values())) == 4
    assert resumed_losses[3] == full_losses[3] and resumed_losses[4] == full_losses[4]
    assert json.loads((resumed / "lora_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((full / "lora_base").resolve())  # fmt: skip
    merged, merged_after_resume = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert merged.keys() == merged_after_resume.keys()
    assert all(torch.equal(merged[name], merged_after_resume[name]) for name in merged)


def test_trainers_readme_from_python_snippets_run_as_written(vlm_dir, tmp_path):
    """trainers/README.md, "From Python": both snippets with a local backbone and dataset for the hub id and /data
    path, and sizes cut down to seconds (max_steps, batch size, image size, bf16 off on CPU)."""
    from hf_vla.action_tokenizers import FASTTokenizer
    from hf_vla.data.lerobot_writer import synthetic_episodes

    episodes = synthetic_episodes(num_episodes=2, length=10, state_dim=7, action_dim=7, cameras=("image_0", "image_1"))
    root = write_lerobot_dataset(tmp_path / "bridge_lerobot", episodes, fps=10, video=False)

    dataset = load_lerobot(root, action_horizon=16, cameras=["observation.images.image_0"],
                           camera_rename={"observation.images.image_0": "primary"})  # only the camera the model sees
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="oft", action_dim=7, action_horizon=16,
                                     state_dim=dataset[0]["state"].shape[-1])
    processor = VLAProcessor.from_vlm(vlm_dir, model.config, camera_names=["primary"], image_size=[28, 28])
    processor.set_norm_stats("bridge", dataset.compute_stats())
    out = tmp_path / "oft-bridge"
    args = TrainingArguments(str(out), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-5,
                             lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-6},
                             save_steps=5000, report_to="none", use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = VLATrainer(model, args, train_dataset=dataset, processing_class=processor,
                         learning_rates={"vlm.model.visual": 1e-5, "action_head": 1e-4}, freeze=[])
    trainer.train()
    trainer.save_model()
    trainer.end()
    assert AutoProcessor.from_pretrained(out).norm_stats.keys() == {"bridge"}
    assert AutoModelForVLA.from_pretrained(out).config.action_horizon == 16

    stats = dataset.compute_stats()
    actions_only = dataset.without_images()
    rows = np.random.default_rng(0).choice(len(dataset), size=min(2000, len(dataset)), replace=False)
    chunks = np.stack([normalize(actions_only[int(i)]["actions"], stats["action"]) for i in rows])
    model = AutoModelForVLA.from_vlm(vlm_dir, variant="fast", action_dim=7, action_horizon=16,
                                     state_dim=7, state_in_prompt=True, action_tokenizer=FASTTokenizer.fit(chunks))
    assert model.config.model_type == "vla_fast" and model.config.state_in_prompt
