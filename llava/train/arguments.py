"""Command-line arguments of the trainer, with the reference's names so its published command lines work."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import transformers

LOSS_REDUCTIONS = ("micro_batch", "token")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A Qwen2 causal LM (stage 1) or a Slow-Fast checkpoint (stage 2)."})
    version: str = field(default="qwen_1_5", metadata={"help": "Conversation template."})
    vision_tower: str | None = field(default="convnext-576", metadata={"help": "Vision tower name."})
    vision_tower_pretrained: str | None = field(
        default=None,
        metadata={"help": "Weights for a new model's tower: a local file (timm/open_clip layout) or a timm name, "
                  "e.g. convnext_xxlarge.clip_laion2b_soup."},
    )
    mm_vision_tower_overrides: str | None = field(
        default=None, metadata={"help": 'JSON, e.g. {"depths": [1,1,1,1], "dims": [16,24,32,48], "image_size": 64}.'}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "The language model's attention: flash_attention_2, sdpa or eager. Default: "
                          "flash_attention_2 when flash-attn is installed and training runs on CUDA (what --packing "
                          "needs for its variable-length kernel), else sdpa."},
    )
    mm_projector_type: str = field(default="mlp2x_gelu")
    mm_vision_select_layer: int = field(default=-1, metadata={"help": "Kept for compatibility: the ConvNeXt tower "
                                                              "always uses its last stage."})
    mm_vision_select_feature: str = field(default="patch")
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=False)
    mm_patch_merge_type: str = field(default="flat")
    tune_mm_mlp_adapter: bool = field(
        default=False, metadata={"help": "Stage 1: train only the projector and the cross-attention parameters."}
    )
    freeze_mm_vision_encoder: bool = field(default=False, metadata={"help": "Keep the vision tower frozen in SFT."})
    freeze_cross_attn: bool = field(
        default=False,
        metadata={"help": "Keep the hybrid layers' cross_attn_* parameters frozen. With a warm-up gate (zero at the "
                          "start) the model then trains on fast tokens only, a curriculum stage before the slow path."},
    )
    # Slow/fast token options. Unset (None) means: a new model takes the config's default (given in the help),
    # stage 2 keeps the stage-1 checkpoint's value. Given, they override the checkpoint's config, as in the
    # reference, whose SFT scripts repeat them.
    mm_video_pooling_stride: int | None = field(
        default=None, metadata={"help": "Spatial average pooling of every video frame's grid (new model: 2)."}
    )
    mm_vision_chunk_frames: int | None = field(default=None, metadata={"help": "Encode at most this many frames at once."})
    min_fast_frames: int | None = field(
        default=None, metadata={"help": "Fewest frames the fast tokens are pooled down to (new model: 16)."}
    )
    tile_image_input: bool = field(default=False)
    fast_token_spatial_stride: int | None = field(
        default=None, metadata={"help": "Spatial pooling of the fast tokens (new model: 1)."}
    )
    fast_token_temporal_stride: int | None = field(
        default=None, metadata={"help": "Temporal average pooling of the fast tokens (new model: 4)."}
    )
    fast_token_temporal_sampling_stride: int | None = field(
        default=None, metadata={"help": "Keep every n-th frame for the fast tokens before pooling (new model: 1)."}
    )
    slow_token_position_encoding: str | None = field(
        default=None,
        metadata={"help": "Give each slow token its frame's time and grid row/column: none, fourier or "
                          "fourier_spacetime (new model: none). Starts as a no-op; trained with the projector."},
    )
    cross_attn_every_n_layers: int = field(default=8)
    cross_attn_min_layer_depth: int = field(default=0)
    cross_attn_max_layer_depth: int | None = field(default=None)
    cross_attn_implementation: str = field(default="text-only-vanilla-flashattn")
    cross_attn_gating_type: str = field(default="whole-dynamic-tanh-warmup")
    cross_attn_query_source: str = field(
        default="self_attn",
        metadata={"help": "How hybrid layers query the slow tokens: self_attn (the reference: the self-attention's "
                          "query after RoPE) or own (a cross_attn_q_proj per layer, without RoPE)."},
    )
    cross_attn_head_num: int | None = field(
        default=None, metadata={"help": "Accepted for the reference's command lines; must equal the LM's heads."}
    )
    cross_attn_kv_head_num: int | None = field(
        default=None, metadata={"help": "Accepted for the reference's command lines; the LM's kv heads are used."}
    )
    initialize_cross_attn_kv_from_lm: bool = field(
        default=False, metadata={"help": "Start cross_attn_kv_proj from each hybrid layer's k_proj/v_proj."}
    )
    cross_attn_kv_init_layout: str = field(
        default="per_head", metadata={"help": "'per_head' (intended) or 'reference' (the reference's stacked layout)."}
    )

    def tower_overrides(self) -> dict | None:
        if not self.mm_vision_tower_overrides:
            return None
        try:
            value = json.loads(self.mm_vision_tower_overrides)
        except json.JSONDecodeError as err:
            raise ValueError(f"--mm_vision_tower_overrides is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise ValueError("--mm_vision_tower_overrides must be a JSON object")
        return value


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the dataset's pixel columns (the model reads them through the collator)."}
    )
    model_max_length: int = field(default=4096, metadata={"help": "Longest sequence the LM sees (text + fast tokens)."})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "Learning rate of the projector."})
    cross_attention_layer_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the cross_attn_* parameters."}
    )
    vision_tower_lr: float | None = field(default=None, metadata={"help": "Learning rate of the vision tower."})
    slow_token_position_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the slow-token position encoding (default: --learning_rate). Its map "
                          "starts at zero, so a higher rate lets the hybrid layers read time and place sooner."},
    )
    group_by_modality_length: bool = field(default=False)
    lora_enable: bool = field(default=False)
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_bias: str = field(default="none")
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "Warm-up as a fraction of the steps (the reference's name); sets warmup_steps."}
    )
    loss_reduction: str = field(
        default="micro_batch",
        metadata={
            "help": "How the token losses of one optimiser step are averaged. 'micro_batch' (default): each "
            "micro-batch's loss is the mean over its supervised tokens, and the step's loss the mean of those "
            "over the accumulation steps and devices, as in the reference (transformers 4.45), whose released "
            "checkpoints and learning rates were obtained this way; with one sample per micro-batch (the SFT "
            "recipe) a one-letter answer weighs as much as a long caption. 'token': the mean over every "
            "supervised token of all accumulation steps and devices (transformers 5's default), which weighs "
            "samples by their number of supervised tokens. With --packing a micro-batch is one device's packed "
            "row(s) of one accumulation step: 'micro_batch' then averages over the supervised tokens of every sample "
            "packed in it (what an unpacked micro-batch of the same samples gives), so within a row samples weigh by "
            "their supervised tokens; 'token' is the same with or without packing."
        },
    )

    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several samples into each row of up to --max_packed_length positions (text + fast tokens): "
            "positions restart and attention stays within each sample, each sample's text reads only its own slow "
            "tokens. A micro-batch is --per_device_train_batch_size packed rows, planned from the samples' lengths."
        },
    )
    max_packed_length: int | None = field(
        default=None,
        metadata={"help": "With --packing: the most positions of a packed row (default and minimum: --model_max_length)."},
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Token-budget batches: each micro-batch holds as many samples as fit this many positions, padding "
            "included (samples x longest), at least --model_max_length. With --packing: budget // max_packed_length "
            "rows per micro-batch. Planned from the lengths, the same on every resume."
        },
    )
    max_train_hours: float | None = field(
        default=None,
        metadata={
            "help": "Wall-clock budget of this process, in hours from its start: the run saves a checkpoint and "
            "stops (exit status 75) once the time left would not cover one more step and a save."
        },
    )
    stop_margin_minutes: float = field(
        default=5.0,
        metadata={
            "help": "With --max_train_hours: minutes kept for the final save, on top of the longest step so far "
            "(the longest save of this run replaces it when longer)."
        },
    )

    allow_resume_mismatch: bool = field(
        default=False,
        metadata={
            "help": "Resume from a checkpoint although this run's data (mixture file, annotation files, seeds) or "
            "arguments differ from those of the run that wrote it (each difference is logged). Without it such a "
            "resume is refused before the model is built. A different process count or ZeRO stage is refused "
            "either way."
        },
    )

    def __post_init__(self):
        if self.max_train_hours is not None and not self.max_train_hours > 0:
            raise ValueError(f"--max_train_hours must be positive, got {self.max_train_hours}")
        if not self.stop_margin_minutes >= 0:
            raise ValueError(f"--stop_margin_minutes must be >= 0, got {self.stop_margin_minutes}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"--loss_reduction {self.loss_reduction!r}: must be one of {list(LOSS_REDUCTIONS)}")
        self._check_batching()
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()

    def _check_batching(self) -> None:
        for name in ("max_packed_length", "max_tokens_per_batch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if not self.packing:
            if self.max_packed_length is not None:
                raise ValueError("--max_packed_length has no effect without --packing")
        else:
            if self.max_packed_length is None:
                self.max_packed_length = self.model_max_length
            if self.max_packed_length < self.model_max_length:
                raise ValueError(
                    f"--max_packed_length {self.max_packed_length} is below --model_max_length {self.model_max_length}: "
                    "a sample of the full length would fit no row"
                )
        if self.max_tokens_per_batch is not None:
            floor = self.max_packed_length if self.packing else self.model_max_length
            if self.max_tokens_per_batch < floor:
                which = "--max_packed_length" if self.packing else "--model_max_length"
                raise ValueError(
                    f"--max_tokens_per_batch {self.max_tokens_per_batch} is below {which} {floor}: a sample (or a "
                    "packed row) of that length would fit no batch"
                )
