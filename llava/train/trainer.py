"""``SlowFastTrainer``: the Hugging Face Trainer with per-module learning rates and the modality-length sampler."""

from __future__ import annotations

import torch
from transformers import Trainer

PROJECTOR = "mm_projector"
CROSS_ATTN = "cross_attn_"
VISION_TOWER = "vision_tower"


def parameter_group_of(name: str) -> str:
    """``projector``, ``cross_attn``, ``vision_tower`` or ``language_model`` for a parameter name."""
    if PROJECTOR in name:
        return "projector"
    if CROSS_ATTN in name:
        return "cross_attn"
    if VISION_TOWER in name:
        return "vision_tower"
    return "language_model"


class SlowFastTrainer(Trainer):
    """Adds separate learning rates (``mm_projector_lr``, ``cross_attention_layer_lr``, ``vision_tower_lr``),
    ``group_by_modality_length`` sampling and the choice of loss normalisation (``loss_reduction``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
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

            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                world_size=self.args.world_size,
                lengths=dataset.modality_lengths,
                group_by_modality=True,
            )
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        rates = {
            "projector": self.args.mm_projector_lr,
            "cross_attn": self.args.cross_attention_layer_lr,
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
