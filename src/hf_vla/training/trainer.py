"""VLATrainer: transformers' Trainer for VLA policies.

What it adds to `Trainer` (everything else — DDP, FSDP, DeepSpeed, bf16, gradient accumulation and checkpointing,
checkpoints, resuming, logging integrations — is Trainer's own):

* per-module learning rates (`learning_rates={"vlm.model.visual": 1e-5, "action_head": 1e-3}`, longest matching
  path wins, the rest at `args.learning_rate`, each group split into decay / no decay) and freezing
  (`freeze=["vlm.model.visual"]`), paths as in `hf_vla.training.param_groups`;
* co-training (StarVLA): when a batch carries `"vlm_batch"` (see `CoTrainingCollator`), the loss is
  `loss_scale["vla"] · action loss + loss_scale["vlm"] · model.vlm_loss(**vlm_batch)`, one backward, one step;
  `action_loss` and `vlm_loss` are logged beside `loss`. Under gradient accumulation (and DDP) each term is the
  mean over the whole step, valid action entries and reply tokens, as in one large batch (for models whose action
  loss averages over its entries: OFT and the flow heads);
* evaluation in robot units: `evaluate()` runs `predict_action`, decodes with the processor's statistics of each
  sample's embodiment and reports `eval_action_l1` / `eval_action_mse` against the un-normalised targets over the
  valid steps and dimensions (a mixture's narrower embodiment on its own ones), and `eval_action_valid_fraction`
  (token heads may emit a chunk that does not decode);
* the processor is the Trainer's `processing_class`, so `save_model()` and every `checkpoint-N` hold a loadable model
  directory (weights, config, processor files) next to Trainer's optimizer / scheduler / RNG state;
* a training dataset with `set_epoch` (`VLAMixture`) is told each epoch: with several processes, accelerate's
  `DataLoaderShard.set_epoch` reaches only the sampler, and a mixture would repeat its first epoch's draws;
* resuming (and `load_best_model_at_end`) reads checkpoint weights through `from_pretrained`. `save_pretrained` writes
  the backbone's original key names (Qwen2.5-VL: `visual.*`, not `model.visual.*`), which Trainer's own loader feeds
  to a plain non-strict `load_state_dict`: the backbone would silently keep its pre-checkpoint weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from transformers import EvalPrediction, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SchedulerType
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

from ..data.collators import METADATA_KEYS, VLM_BATCH_KEY, CoTrainingCollator, VLACollator
from ..heads.flow_matching import FlowMatchingActionHead
from ..modeling_vla import register_fsdp_forward_methods
from .param_groups import build_param_groups, check_paths, freeze_modules

logger = logging.get_logger(__name__)

DEFAULT_LOSS_SCALE = {"vla": 1.0, "vlm": 0.1}  # StarVLA's co-training defaults
MIN_LR_SCHEDULERS = (SchedulerType.COSINE_WITH_MIN_LR, SchedulerType.COSINE_WARMUP_WITH_MIN_LR)


def action_error_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
    """Masked L1 / MSE between predicted and target chunks in robot units.

    `predictions`: `[N, T, D]` decoded predictions (NaN rows for chunks a token head could not decode);
    `label_ids`: (`[N, T, D]` targets, `[N, T, D]` validity weights). Undecodable rows are left out of the errors
    and counted in `action_valid_fraction`; when no chunk decodes, the errors are NaN.
    """
    predicted = np.asarray(eval_prediction.predictions, dtype=np.float64)
    target, mask = (np.asarray(x, dtype=np.float64) for x in eval_prediction.label_ids)
    decoded = np.isfinite(predicted).all(axis=(1, 2))
    valid_fraction = float(decoded.mean()) if len(decoded) else 0.0
    weights = mask * decoded[:, None, None]
    total = weights.sum()
    if total == 0:  # nothing decoded (e.g. an untrained token head): no error to report, rather than an error of 0
        return {"action_l1": float("nan"), "action_mse": float("nan"), "action_valid_fraction": valid_fraction}
    error = np.where(weights > 0, np.nan_to_num(predicted) - target, 0.0)
    return {
        "action_l1": float((np.abs(error) * weights).sum() / total),
        "action_mse": float((error**2 * weights).sum() / total),
        "action_valid_fraction": valid_fraction,
    }


class DatasetEpochCallback(TrainerCallback):
    """Calls `set_epoch(epoch)` on the training dataset at the start of every epoch, before its workers start."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = getattr(train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(int(state.epoch + 1e-6))  # state.epoch: epochs done, fractional after a mid-epoch resume


def action_entries(batch: Mapping) -> torch.Tensor:
    """How many entries of the batch's target chunks are valid (`action_mask`: per step or per entry)."""
    actions, mask = batch["actions"], batch.get("action_mask")
    if mask is None:
        return torch.tensor(actions.numel())
    mask = mask.bool()
    return mask.sum() * actions.shape[-1] if mask.dim() == actions.dim() - 1 else mask.sum()


def reply_tokens(chat_batch: Mapping) -> torch.Tensor:
    """How many tokens a chat batch's causal-LM loss scores (labels shifted by one, as the loss compares them)."""
    return chat_batch["labels"][..., 1:].ne(-100).sum()


class ChatStreamResume(TrainerCallback):
    """On resume, moves a co-training collator's chat stream past the draws of the micro-batches already trained, so
    that a resumed run sees the chat samples the uninterrupted one would have. Exact when batches are collated in
    the training process (`dataloader_num_workers=0`); worker processes re-seed their streams every epoch."""

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        collator = getattr(train_dataloader, "collate_fn", None)
        if not state.global_step or not isinstance(collator, CoTrainingCollator) or args.ignore_data_skip:
            return
        if args.dataloader_num_workers:
            logger.warning("resuming co-training with dataloader workers: the chat stream restarts (exact with "
                           "dataloader_num_workers=0)")
            return
        try:
            batches = len(train_dataloader)
        except TypeError:  # an iterable dataset: no epoch length to count the trained batches with
            logger.warning("resuming co-training on an iterable dataset: the chat stream restarts")
            return
        steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        epochs, steps = divmod(state.global_step, steps_per_epoch)
        collator.skip(epochs * batches + steps * args.gradient_accumulation_steps)


class GroupRatesAtStep(TrainerCallback):
    """Snapshots the per-group learning rates when the optimizer steps, before the scheduler moves them on: the
    rates a step used, as Trainer's own logged `learning_rate` is."""

    def __init__(self, trainer: VLATrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._rates_at_last_step = self.trainer._group_learning_rates()


class VLATrainer(Trainer):
    r"""
    `Trainer` for `VLAPreTrainedModel`s; see the module docstring.

    Args (beyond `Trainer`'s):
        learning_rates (`dict[str, float]`, *optional*): module path → learning rate; other trainable parameters use
            `args.learning_rate`.
        freeze (`list[str]`, *optional*): module paths whose parameters get `requires_grad=False` (and stay out of the
            optimizer).
        loss_scale (`dict`, *optional*): `{"vla": w_vla, "vlm": w_vlm}` weights of the co-training loss terms
            (defaults 1.0 and 0.1, StarVLA's).

    `processing_class` is the `VLAProcessor` (taken from the collator when omitted); it is needed for evaluation and
    saved with every checkpoint. `data_collator` defaults to `VLACollator(processing_class)`. The Trainer sets
    `args.remove_unused_columns=False` (raw-sample collators need every column) and, unless given,
    `args.ddp_find_unused_parameters`: True for plain VLA training (the regression and flow heads leave the VLM's
    `lm_head` unused), False for co-training (the VLM loss runs outside DDP's forward, so DDP must not search that
    forward's graph for unused parameters; every trainable parameter is reached by one of the two losses).

    With `lr_scheduler_type="cosine_with_min_lr"` and `lr_scheduler_kwargs={"min_lr": x}`, the base group decays to
    `x` and every other group to the same fraction (`x / args.learning_rate`) of its own peak rate.
    """

    # Trainer divides every micro-batch's loss by the gradient-accumulation steps; `compute_loss` scales the action
    # term so that, after that division, the step's gradient is that of one batch of all its micro-batches.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model=None,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        learning_rates: Mapping[str, float] | None = None,
        freeze: Sequence[str] | None = None,
        loss_scale: Mapping[str, float] | None = None,
        compute_metrics=None,
        **kwargs,
    ):
        if processing_class is None:
            processing_class = _processor_of(data_collator)
        if processing_class is None:
            raise ValueError("VLATrainer: pass the VLAProcessor as processing_class= (it decodes actions for "
                             "evaluation and is saved beside the weights)")
        if data_collator is None:
            data_collator = VLACollator(processing_class)
        self.learning_rates = dict(learning_rates or {})
        if "base" in self.learning_rates:
            raise ValueError("learning_rates: set the rate of the remaining parameters with args.learning_rate, not "
                             "a 'base' entry")
        self.loss_scale = {**DEFAULT_LOSS_SCALE, **(loss_scale or {})}
        unknown = sorted(set(self.loss_scale) - set(DEFAULT_LOSS_SCALE))
        if unknown:
            raise ValueError(f"loss_scale: unknown keys {unknown}; expected {sorted(DEFAULT_LOSS_SCALE)}")
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")
        if args.remove_unused_columns:
            logger.info("VLATrainer: setting remove_unused_columns=False (collators read raw-sample columns)")
            args.remove_unused_columns = False
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = not isinstance(data_collator, CoTrainingCollator)
        self.freeze = list(freeze or [])
        if model is not None:
            self._check_and_freeze(model)
        self._loss_parts: torch.Tensor | None = None  # running sums of (action loss, vlm loss, micro-batches, vlm ones)
        self._reply_tokens_in_step: torch.Tensor | None = None  # what the step's chat batches score (co-training)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics or action_error_metrics,
            **kwargs,
        )
        self._check_checkpointing_under_ddp()
        self.add_callback(DatasetEpochCallback)
        self._rates_at_last_step: dict[str, float] = {}
        self.add_callback(GroupRatesAtStep(self))
        self.add_callback(ChatStreamResume)

    def _check_checkpointing_under_ddp(self) -> None:
        """Reentrant activation checkpointing under DDP with find_unused_parameters fails at the first backward
        ("Expected to mark a variable ready only once": each checkpointed layer's reentrant backward marks its
        parameters again); the default non-reentrant checkpointing works."""
        args = self.args
        reentrant = (args.activation_checkpointing_kwargs or {}).get("use_reentrant", False)
        ddp = args.world_size > 1 and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if args.activation_checkpointing and reentrant and ddp and args.ddp_find_unused_parameters:
            raise ValueError("activation_checkpointing_kwargs: use_reentrant=True does not work under DDP with "
                             "ddp_find_unused_parameters=True (which VLA training needs: the regression and flow "
                             "heads leave the VLM's lm_head unused); leave use_reentrant out (non-reentrant)")

    def _check_and_freeze(self, model) -> None:
        check_paths(model, self.learning_rates, "learning_rates")
        for module in model.modules():
            if isinstance(module, FlowMatchingActionHead):
                module.freeze_unused_parameters()
        if self.freeze:
            frozen = freeze_modules(model, self.freeze)
            logger.info(f"VLATrainer: froze {frozen:,} parameters under {self.freeze}")

    def call_model_init(self, trial=None):
        """A model built by `model_init` (at construction, and again by `train()`) is checked and frozen too."""
        model = super().call_model_init(trial)
        self._check_and_freeze(model)
        return model

    # ------------------------------------------------------------------ optimisation

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            groups = build_param_groups(
                opt_model,
                base_learning_rate=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                decay_parameter_names=self.get_decay_parameter_names(opt_model),
                learning_rates=self.learning_rates,
            )
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            # Each group carries its own "lr"; the optimizer's default stays args.learning_rate (the base rate).
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """As Trainer's, with `lr_scheduler_kwargs={"min_lr": x}` given to the scheduler as `min_lr_rate =
        x / args.learning_rate`: what transformers computes from `optimizer.defaults["lr"]`, which DeepSpeed's
        optimizer wrapper does not have. Every group decays to that fraction of its own peak rate."""
        kwargs = self.args.lr_scheduler_kwargs
        if (
            self.lr_scheduler is not None
            or SchedulerType(self.args.lr_scheduler_type) not in MIN_LR_SCHEDULERS
            or not isinstance(kwargs, dict)
            or "min_lr" not in kwargs
        ):
            return super().create_scheduler(num_training_steps, optimizer)
        rate_kwargs = {k: v for k, v in kwargs.items() if k != "min_lr"}
        rate_kwargs["min_lr_rate"] = float(kwargs["min_lr"]) / self.args.learning_rate
        self.args.lr_scheduler_kwargs = rate_kwargs
        try:
            return super().create_scheduler(num_training_steps, optimizer)
        finally:
            self.args.lr_scheduler_kwargs = kwargs

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation scores actions only: a co-training collator's VLA part collates its batches (chat batches
        would be built for nothing, and would move the training run's chat stream)."""
        return self._without_chat(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._without_chat(super().get_test_dataloader, test_dataset)

    def _without_chat(self, build, dataset):
        collator = self.data_collator
        if not isinstance(collator, CoTrainingCollator):
            return build(dataset)
        self.data_collator = collator.vla_collator
        try:
            return build(dataset)
        finally:
            self.data_collator = collator

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`loss_scale["vla"]` · action loss (+ `loss_scale["vlm"]` · VLM loss when co-training). With
        `num_items_in_batch` (the valid action entries of the whole optimizer step, see `_get_num_items_in_batch`),
        a micro-batch's mean action loss is weighted by its share of them: a sample whose chunk is mostly padding
        weighs as much under gradient accumulation or DDP as in one large batch."""
        vlm_batch = inputs.get(VLM_BATCH_KEY)
        model_inputs = {k: v for k, v in inputs.items() if k not in METADATA_KEYS and k != VLM_BATCH_KEY}
        outputs = model(**model_inputs)
        action_loss = outputs.action_loss if outputs.action_loss is not None else outputs.loss
        share = None
        if num_items_in_batch is not None and model.training and "actions" in inputs and self.compute_loss_func is None:
            share = action_entries(inputs).to(outputs.loss.device) / num_items_in_batch.clamp_min(1)
        vla_term = outputs.loss if share is None else outputs.loss * share * self._step_scale()
        loss = self.loss_scale["vla"] * vla_term
        vlm_loss = chat_share = None
        if vlm_batch is not None and model.training:
            self._register_fsdp_forward_methods(model)
            with self.accelerator.autocast():  # accelerate patches only forward() with autocast
                vlm_loss = self.accelerator.unwrap_model(model).vlm_loss(**vlm_batch)
            if share is not None and self._reply_tokens_in_step is not None:  # the action term's weighting, in tokens
                chat_share = reply_tokens(vlm_batch).to(vlm_loss.device) / self._reply_tokens_in_step.clamp_min(1)
            vlm_term = vlm_loss if chat_share is None else vlm_loss * chat_share * self._step_scale()
            loss = loss + self.loss_scale["vlm"] * vlm_term
        if model.training:
            self._record_loss_parts(action_loss, vlm_loss, share, chat_share)
        return (loss, outputs) if return_outputs else loss

    def _register_fsdp_forward_methods(self, model) -> None:
        """`vlm_loss` and `predict_action` run the sharded model outside `forward` (see
        `modeling_vla.register_fsdp_forward_methods`); a no-op without FSDP, and once done."""
        if self.is_fsdp_enabled:
            register_fsdp_forward_methods(model)

    def _step_scale(self) -> float:
        """Undoes what Trainer and DDP do to a micro-batch's loss (divide by the accumulation steps, average over
        processes) for a term already weighted by its share of the whole step."""
        averaged = self.args.average_tokens_across_devices and self.args.world_size > 1
        return self.current_gradient_accumulation_steps * (self.args.world_size if averaged else 1)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The valid action entries of one optimizer step's micro-batches (summed over processes when
        `average_tokens_across_devices`), for models whose loss averages over them; Trainer's label count
        otherwise."""
        model = self.accelerator.unwrap_model(self.model)
        self._reply_tokens_in_step = None
        if not getattr(model, "loss_averages_action_entries", False) or not all("actions" in b for b in batch_samples):
            return super()._get_num_items_in_batch(batch_samples, device)
        if isinstance(self.data_collator, CoTrainingCollator):  # every batch of every process carries a chat batch
            self._reply_tokens_in_step = self._across_processes(
                sum(reply_tokens(batch[VLM_BATCH_KEY]) for batch in batch_samples).to(device))
        return self._across_processes(sum(action_entries(batch) for batch in batch_samples).to(device))

    def _across_processes(self, count: torch.Tensor) -> torch.Tensor:
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            return self.accelerator.gather(count).sum()
        return count

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate (6 × tokens × parameters), with the parameters counted once per model instead of by a
        walk over every module at every step (a measurable share of a small model's step)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        counted = getattr(self, "_counted_parameters", None)
        if counted is None or counted[0] is not self.model:
            counted = self._counted_parameters = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * counted[1]

    def _record_loss_parts(self, action_loss: torch.Tensor, vlm_loss: torch.Tensor | None,
                           share: torch.Tensor | None = None, chat_share: torch.Tensor | None = None) -> None:
        # Weighted as Trainer weighs the logged `loss`: a mean over optimizer steps of each step's mean (each term by
        # the micro-batch's share of the step's valid entries / reply tokens when known), and an epoch's last step
        # may hold fewer micro-batches than the others.
        weight = 1.0 / getattr(self, "current_gradient_accumulation_steps", 1)
        action_weight = weight if share is None else share.detach().float()
        vlm_weight = 0.0 if vlm_loss is None else weight if chat_share is None else chat_share.detach().float()
        zero = action_loss.new_zeros((), dtype=torch.float32)
        part = torch.stack([
            action_loss.detach().float() * action_weight,
            zero if vlm_loss is None else vlm_loss.detach().float() * vlm_weight,
            zero + action_weight,
            zero + vlm_weight,
        ])  # fmt: skip
        self._loss_parts = part if self._loss_parts is None else self._loss_parts + part

    def train(self, *args, **kwargs):
        self._loss_parts = None  # sums a previous run left after its last log must not enter this run's first one
        return super().train(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training logs carry "loss"; every rank logs at the same steps, so the reduction below is collective-safe.
        if "loss" in logs and self._loss_parts is not None:
            parts = self._loss_parts
            if self.args.world_size > 1:
                parts = self.accelerator.reduce(parts.to(self.args.device), reduction="sum")
            action_sum, vlm_sum, count, vlm_count = parts.tolist()
            if count:
                logs["action_loss"] = action_sum / count
            if vlm_count:
                logs["vlm_loss"] = vlm_sum / vlm_count
            self._loss_parts = None
            self._log_group_learning_rates(logs)
        super().log(logs, start_time)

    def _log_group_learning_rates(self, logs: dict) -> None:
        logs.update(getattr(self, "_rates_at_last_step", None) or self._group_learning_rates())

    def _group_learning_rates(self) -> dict[str, float]:
        if not self.learning_rates or self.optimizer is None:
            return {}
        rates = {}
        for group in self.optimizer.param_groups:  # a path's decay and no-decay groups share its rate
            name = group.get("name", "").removesuffix(" (no decay)")
            if name in self.learning_rates:
                rates[f"learning_rate/{name}"] = float(group["lr"])
        return rates

    # ------------------------------------------------------------------ end of run

    def end(self) -> None:
        """Waits for every rank, then finishes the trackers and destroys the process group (`Trainer.end`).

        A rank that destroys its group while another still saves or logs can leave that one blocked on a peer that is
        gone, hence the barrier. After it, Gloo's worker thread may still be releasing the barrier's work (and the
        collectives it waited for), whose tensors need the GIL to free their Python objects, while destroying the
        group joins that thread with the GIL held: a deadlock that left one rank hanging at exit (native stacks:
        `~ProcessGroupGloo` → `thread::join` against `~AsyncBarrierWork` → `gil_scoped_acquire`). Releasing the GIL
        for a moment lets the thread finish first.
        """
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()
            time.sleep(0.2)
        super().end()

    # ------------------------------------------------------------------ checkpoints

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self._load_checkpoint_weights(resume_from_checkpoint, self.model if model is None else model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if not self._load_checkpoint_weights(self.state.best_model_checkpoint, self.model):
            super()._load_best_model()

    def _load_checkpoint_weights(self, checkpoint: str, model) -> bool:
        """Loads a checkpoint's safetensors the way `from_pretrained` does (key renaming included), strictly.
        False where Trainer's own path applies: DeepSpeed / FSDP states, PEFT adapters, other weight formats."""
        weight_files = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        saved = any(os.path.isfile(os.path.join(checkpoint, name)) for name in weight_files)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(model, PreTrainedModel) or not saved:
            return False
        logger.info(f"Loading model weights from {checkpoint} with {type(model).__name__}.from_pretrained")
        reloaded = type(model).from_pretrained(checkpoint, dtype=model.dtype)
        model.load_state_dict(reloaded.state_dict())
        return True

    # ------------------------------------------------------------------ evaluation

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss on the batch and, unless `prediction_loss_only`, (decoded predictions, (targets, weights)), all in
        robot units and shaped `[B, T, D]`."""
        inputs = self._prepare_inputs(inputs)
        inputs = {k: v for k, v in inputs.items() if k != VLM_BATCH_KEY}
        has_targets = inputs.get("actions") is not None
        with torch.no_grad():
            loss = None
            if has_targets:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, inputs).detach().mean()
            if prediction_loss_only or inputs.get("raw_actions") is None:
                return loss, None, None
            model_inputs = {k: v for k, v in inputs.items() if k not in METADATA_KEYS}
            self._register_fsdp_forward_methods(model)
            with self.accelerator.autocast():
                predicted = self.accelerator.unwrap_model(model).predict_action(**model_inputs)
        decoded = self._decode(predicted, inputs["embodiment"])
        target = inputs["raw_actions"].float()
        return loss, decoded.to(target.device), (target, _expanded_mask(inputs.get("action_mask"), target))

    def _decode(self, predicted: torch.Tensor, embodiments: Sequence[str | None]) -> torch.Tensor:
        predicted = predicted.detach().float().cpu().numpy()
        # a mixture pads narrower embodiments to the model's width: one key decodes to the embodiment's own width, and
        # the padded dimensions (masked out of the targets) stay 0
        decoded = np.zeros_like(predicted)
        for key in dict.fromkeys(embodiments):
            rows = [b for b, k in enumerate(embodiments) if k == key]
            own = self.processing_class.decode_actions(predicted[rows], unnorm_key=key)
            decoded[rows, ..., : own.shape[-1]] = own
        return torch.from_numpy(decoded)


def _expanded_mask(action_mask: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """Validity weights `[B, T, D]` from a `[B, T]` / `[B, T, D]` mask (all ones when absent)."""
    if action_mask is None:
        return torch.ones_like(target)
    mask = action_mask.to(target.dtype)
    return (mask[..., None] if mask.ndim == 2 else mask).expand_as(target).contiguous()


def _processor_of(collator):
    for candidate in (collator, getattr(collator, "vla_collator", None)):
        processor = getattr(candidate, "processor", None)
        if processor is not None:
            return processor
    return None


__all__ = ["DEFAULT_LOSS_SCALE", "VLATrainer", "action_error_metrics"]


if __name__ == "__main__":

    from transformers import PrinterCallback

    from ..data.lerobot import load_lerobot
    from ..data.lerobot_writer import synthetic_episodes, write_lerobot_dataset
    from ..testing import build_tiny_vla, scratch_dir

    torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a shared CPU
    work_dir = scratch_dir("vla_trainer_demo_")
    root = write_lerobot_dataset(work_dir / "data", synthetic_episodes(3, 8, state_dim=4, action_dim=4), fps=10,
                                 video=False)  # fmt: skip
    dataset = load_lerobot(root, action_horizon=4, camera_rename={"observation.images.front": "primary",
                                                                  "observation.images.wrist": "wrist"})  # fmt: skip
    model, processor = build_tiny_vla("oft", action_dim=4, state_dim=4, action_horizon=4)
    processor.set_norm_stats("demo", dataset.compute_stats())  # the data's statistics instead of random ones
    args = TrainingArguments(str(work_dir / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             max_steps=12, learning_rate=3e-3, lr_scheduler_type="cosine_with_min_lr",
                             lr_scheduler_kwargs={"min_lr": 3e-5}, logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = VLATrainer(model, args, train_dataset=dataset, eval_dataset=dataset, processing_class=processor,
                         learning_rates={"action_head": 1e-2}, freeze=["vlm.model.visual"])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the lines below summarise Trainer's per-step log dicts
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"{type(model).__name__}, {len(dataset)} frames of {dataset.num_episodes} synthetic episodes, "
          f"{args.max_steps} steps of batch {args.per_device_train_batch_size}, vlm.model.visual frozen")
    print("training loss per step:", [round(entry["loss"], 4) for entry in trainer.state.log_history
                                      if "loss" in entry])  # fmt: skip
    print("learning rate per group, peak → last step:", ", ".join(
        f"{group['name']} {group['initial_lr']:.0e} → {group['lr']:.0e}" for group in trainer.optimizer.param_groups
        if "no decay" not in group["name"]))  # fmt: skip
    for name, metrics in (("before", before), ("after", after)):
        print(f"eval {name} training: loss {metrics['eval_loss']:.4f}, action L1 {metrics['eval_action_l1']:.4f} "
              f"(robot units), valid chunks {metrics['eval_action_valid_fraction']:.0%}")
