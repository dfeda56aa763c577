"""``SlowFastTrainer``: the Hugging Face Trainer with per-module learning rates, the modality-length sampler,
checkpoints marked complete only once fully written, stopping with a checkpoint on a signal or a time budget, and
DataLoader workers that leave stop signals to their trainer."""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import checkpoint_problem, rotate_checkpoints, set_aside, write_completion_marker
from .stopping import StopCallback, StopRequest
from .worker_signals import shield_workers

logger = logging.getLogger("llava.train")

PROJECTOR = "mm_projector"
CROSS_ATTN = "cross_attn_"
VISION_TOWER = "vision_tower"
SLOW_POSITION = "slow_token_position_encoding"


def parameter_group_of(name: str) -> str:
    """``projector``, ``cross_attn``, ``slow_position``, ``vision_tower`` or ``language_model`` for a parameter
    name."""
    if SLOW_POSITION in name:
        return "slow_position"
    if PROJECTOR in name:
        return "projector"
    if CROSS_ATTN in name:
        return "cross_attn"
    if VISION_TOWER in name:
        return "vision_tower"
    return "language_model"


def _epoch_samplers(dataloader) -> list:
    """The samplers with ``set_epoch`` inside a (possibly accelerate-wrapped) data loader."""
    found, seen, todo = [], set(), [dataloader]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.utils.data.Sampler) and hasattr(item, "set_epoch"):
            found.append(item)
        todo.extend(getattr(item, name, None) for name in ("base_dataloader", "batch_sampler", "sampler"))
    return found


class SlowFastTrainer(Trainer):
    """Adds separate learning rates (``mm_projector_lr``, ``cross_attention_layer_lr``, ``slow_token_position_lr``,
    ``vision_tower_lr``),
    ``group_by_modality_length`` sampling, the choice of loss normalisation (``loss_reduction``), complete-or-
    ignored checkpoints (:mod:`llava.train.checkpoints`) and early stops with a checkpoint
    (:mod:`llava.train.stopping`, ``stop_request``). ``run_record`` (:mod:`llava.train.run_record`) goes into
    every checkpoint's completion marker."""

    def __init__(
        self, *args, stop_request: StopRequest | None = None, run_record: dict | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.run_record = run_record
        self._completed_step: int | None = None  # the step of the last checkpoint this run completed
        if stop_request is None:
            stop_request = StopRequest(
                getattr(self.args, "max_train_hours", None), getattr(self.args, "stop_margin_minutes", 5.0)
            )
        self.stop_request = stop_request
        self.add_callback(StopCallback(stop_request))
        reduction = getattr(self.args, "loss_reduction", None)  # None: plain TrainingArguments, transformers' way
        if reduction == "micro_batch":
            # The Trainer normalises by the supervised tokens of the whole step (``num_items_in_batch``) only
            # for a model that takes loss kwargs. Without them the model returns each micro-batch's mean, which
            # the Trainer divides by the accumulation steps (DeepSpeed then does not scale it again) and DDP /
            # DeepSpeed average over the devices: the reference's reduction under transformers 4.45.
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False
        elif reduction == "token" and not self.model_accepts_loss_kwargs:
            raise ValueError(
                "--loss_reduction token needs a model whose forward takes loss kwargs (num_items_in_batch); "
                f"{type(self.model).__name__} does not"
            )

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.group_by_modality_length and hasattr(dataset, "modality_lengths"):
            from .data import LengthGroupedSampler

            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                world_size=self.args.world_size,
                lengths=dataset.modality_lengths,
                group_by_modality=True,
                seed=seed,
            )
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self):
        """The Trainer's loader, or one of planned micro-batches with ``--packing`` / ``--max_tokens_per_batch``
        (:mod:`llava.train.loader`); DataLoader workers are forked after the parent's objects are frozen, and a
        cluster's stop signal reaching them is ignored (the trainer decides)."""
        from .loader import freeze_before_fork, planned_batch_sampler, planned_dataloader

        if self.args.dataloader_num_workers:
            freeze_before_fork()
        sampler = planned_batch_sampler(self.train_dataset, self.args)
        if sampler is None:
            return shield_workers(super().get_train_dataloader())
        loader = planned_dataloader(self.train_dataset, sampler, self.data_collator, self.args)
        return self.accelerator.prepare(shield_workers(loader))

    def get_eval_dataloader(self, eval_dataset=None):
        return shield_workers(super().get_eval_dataloader(eval_dataset))

    def _run_epoch(self, *args, **kwargs):
        # A resumed run wraps the data loader to skip the steps already trained, and accelerate's set_epoch
        # does not reach the sampler through that wrapper: without this the resumed epoch would be drawn in
        # the order of epoch 0.
        epoch = kwargs.get("epoch")
        if epoch is not None:
            for sampler in _epoch_samplers(kwargs.get("train_dataloader")):
                sampler.set_epoch(epoch)
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, marked complete once every process has written its part; older
        checkpoints are rotated out (``save_total_limit``) only after that. A step whose checkpoint this run has
        already completed (a stop's save, then the epoch-end save of ``--save_strategy epoch``) is not saved
        again."""
        step = self.state.global_step
        if self._completed_step == step:
            logger.info("checkpoint-%d is complete already: not saving it again", step)
            return
        started = time.monotonic()
        run_dir = self._get_output_dir(trial=trial)
        folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        replaced = None
        if self.args.should_save and os.path.isdir(folder):
            problem = checkpoint_problem(folder)
            if problem:
                logger.warning("replacing %s left by an earlier run (%s)", folder, problem)
                shutil.rmtree(folder)
            else:  # kept until the new one is complete: a complete checkpoint is never deleted for a new one
                replaced = set_aside(folder, "a complete checkpoint of an earlier run at the step this run saves")
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer would rotate before the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_completion_marker(folder, step, run=self.run_record)
            rotate_checkpoints(run_dir, limit, protected=[self.state.best_model_checkpoint or ""], just_written=folder)
            if replaced:
                logger.info("deleting %s: replaced by the complete %s", replaced, folder)
                shutil.rmtree(replaced, ignore_errors=True)
        # nobody leaves (and may exit) before the marker is written
        self.accelerator.wait_for_everyone()
        self._completed_step = step
        self.stop_request.record_save(time.monotonic() - started)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        rates = {
            "projector": self.args.mm_projector_lr,
            "cross_attn": self.args.cross_attention_layer_lr,
            "slow_position": getattr(self.args, "slow_token_position_lr", None),
            "vision_tower": self.args.vision_tower_lr,
            "language_model": None,
        }
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((parameter_group_of(name), name in decay), []).append(param)
        param_groups = []
        for (group, decayed), params in sorted(groups.items()):
            entry = {"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0}
            if rates[group] is not None:
                entry["lr"] = rates[group]
            param_groups.append(entry)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer
