"""Train a Slow-Fast video LLM: stage 1 (pretrain) from a Qwen2 causal LM, stage 2 (SFT) from stage 1's output.

    torchrun --nproc_per_node 8 -m llava.train.train --deepspeed scripts/zero2.json \\
        --model_name_or_path Qwen/Qwen2-7B-Instruct --tune_mm_mlp_adapter True ... --output_dir out/stage1

The output folder is a complete checkpoint (config, weights, tokenizer, image processor) that
``load_pretrained_model`` and the CLI load directly. A run whose output folder holds complete ``checkpoint-*``
folders resumes from the newest one (:mod:`llava.train.checkpoints`).

Before the model is built, rank 0 chooses the checkpoint to resume from and checks it against this run (world
size, ZeRO stage, data fingerprint, arguments: :mod:`llava.train.resume`); every process resumes from it or
refuses with the same message.

On ``SIGUSR1`` or ``SIGTERM``, or before ``--max_train_hours`` runs out, every process finishes its step, one
complete checkpoint is saved and the run stops (:mod:`llava.train.stopping`). Exit status: 0 when training
finished, :data:`~llava.train.stopping.STOPPED_EXIT_STATUS` (75) when it stopped early with a checkpoint (run
the same command again to continue), 2 for bad arguments or data. Under torchrun, which reports any non-zero
worker status as a crash, an early stop exits with 0; ``OUTPUT_DIR/run_status.json`` records the outcome either
way (``scripts/launch_train.sh`` turns it into status 75). Launched by ``scripts/launch_train.sh`` (which sets
``LLAVA_LAUNCH_REFUSAL_FILE``), a refusal that every process shares also exits 0 under torchrun, with its message
in that file, so that torchrun adds no traceback; the script then prints the message last and exits 2.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser

from llava.model import LlavaQwenSlowFastConfig, LlavaQwenSlowFastForCausalLM
from llava.model.builder import resolve_attn_implementation
from llava.train.arguments import ModelArguments, TrainingArguments
from llava.train.checkpoints import find_resume_checkpoint
from llava.train.data import DataArguments, make_supervised_data_module
from llava.train.resume import RunRefused, agreed, choose_resume
from llava.train.run_record import current_run_record
from llava.train.stopping import STOPPED_EXIT_STATUS, StopRequest
from llava.train.trainer import CROSS_ATTN, PROJECTOR, VISION_TOWER, SlowFastTrainer

logger = logging.getLogger("llava.train")
SLOW_POSITION = "slow_token_position_"  # the slow-token position encoding, trained with the projector in stage 1

# Fields of ModelArguments copied to a new model's config under the same name.
_CONFIG_FIELDS = (
    "mm_projector_type",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
    "mm_patch_merge_type",
    "mm_video_pooling_stride",
    "mm_vision_chunk_frames",
    "min_fast_frames",
    "tile_image_input",
    "fast_token_spatial_stride",
    "fast_token_temporal_stride",
    "fast_token_temporal_sampling_stride",
    "cross_attn_every_n_layers",
    "cross_attn_min_layer_depth",
    "cross_attn_max_layer_depth",
    "cross_attn_implementation",
    "cross_attn_gating_type",
    "cross_attn_query_source",
    "slow_token_position_encoding",
)


# Slow/fast options that a stage-2 command line sets over the stage-1 checkpoint's config when it gives them
# (ModelArguments leaves them None otherwise). The architecture (hybrid layers, tower, projector) always comes
# from the checkpoint.
_STAGE2_MODEL_FIELDS = (
    "fast_token_spatial_stride",
    "fast_token_temporal_stride",
    "fast_token_temporal_sampling_stride",
    "mm_video_pooling_stride",
    "min_fast_frames",
    "mm_vision_chunk_frames",
    "slow_token_position_encoding",
)


def run_settings(data_args: DataArguments, training_args: TrainingArguments) -> dict:
    """Config fields that record how this run trains, set in either stage: the image padding, the length
    budget and the frame count (``video_frames``, and ``mm_training_video_frames`` under the reference's name)."""
    return {
        "image_aspect_ratio": data_args.image_aspect_ratio,
        "tokenizer_model_max_length": training_args.model_max_length,
        "video_frames": data_args.video_frames,
        "mm_training_video_frames": data_args.video_frames,
    }


def apply_stage2_settings(
    config: LlavaQwenSlowFastConfig, model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments
) -> dict[str, tuple]:
    """Set the command line's slow/fast options and run settings on a stage-1 checkpoint's ``config``, as the
    reference does, and log what changed.

    Returns:
        ``{field: (old, new)}`` for every field whose value changed.
    """
    wanted = {name: getattr(model_args, name) for name in _STAGE2_MODEL_FIELDS if getattr(model_args, name) is not None}
    wanted.update(run_settings(data_args, training_args))
    changed = {}
    for name, value in wanted.items():
        old = getattr(config, name, None)
        if old != value:
            changed[name] = (old, value)
            setattr(config, name, value)
    config.validate_slow_fast()
    if changed:
        logger.info(
            "stage 2: the command line changes the checkpoint's config: %s",
            ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items()),
        )
    else:
        logger.info("stage 2: the checkpoint's config already has the command line's settings")
    return changed


def build_config(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """A Slow-Fast config and whether the model is new.

    Stage 1 (a Qwen2 causal LM): the LM's fields plus the multimodal arguments. Stage 2 (a Slow-Fast
    checkpoint): the checkpoint's config with the command line's slow/fast options and run settings applied
    (:func:`apply_stage2_settings`); its architecture arguments are ignored.
    """
    base = AutoConfig.from_pretrained(model_args.model_name_or_path)
    if base.model_type == LlavaQwenSlowFastConfig.model_type:
        apply_stage2_settings(base, model_args, data_args, training_args)
        return base, False
    if base.model_type != "qwen2":
        raise ValueError(
            f"--model_name_or_path {model_args.model_name_or_path}: model_type {base.model_type!r} is neither "
            "a Qwen2 causal LM nor a Slow-Fast checkpoint"
        )
    if model_args.cross_attn_head_num not in (None, base.num_attention_heads):
        raise ValueError(
            f"--cross_attn_head_num {model_args.cross_attn_head_num} differs from the LM's "
            f"{base.num_attention_heads} heads: cross-attention reuses the self-attention queries"
        )
    fields = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    # an unset option keeps the config's default
    fields.update({name: getattr(model_args, name) for name in _CONFIG_FIELDS if getattr(model_args, name) is not None})
    fields.update(run_settings(data_args, training_args))
    fields.update(
        mm_vision_tower=model_args.vision_tower,
        mm_vision_tower_overrides=model_args.tower_overrides(),
        vision_tower_pretrained=model_args.vision_tower_pretrained,
        tokenizer_padding_side="right",
        architectures=["LlavaQwenSlowFastForCausalLM"],
    )
    return LlavaQwenSlowFastConfig(**fields), True


ATTENTION_IMPLEMENTATIONS = ("flash_attention_2", "sdpa", "eager")


def training_attention(requested: str | None, device: torch.device) -> str:
    """``--attn_implementation``, checked; unset: flash-attn where it is installed and the run is on CUDA, else SDPA
    (a request for flash-attn where it cannot run falls back to SDPA with a warning)."""
    if requested is not None and requested not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"--attn_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {requested!r}")
    if requested is None:
        requested = "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"
    return resolve_attn_implementation(requested, False, device)


def build_model(model_args, data_args, training_args, built_config=None) -> LlavaQwenSlowFastForCausalLM:
    """The model; ``built_config``: :func:`build_config`'s result when the caller has it already."""
    config, is_new = built_config or build_config(model_args, data_args, training_args)
    dtype = torch.bfloat16 if training_args.bf16 else (torch.float16 if training_args.fp16 else torch.float32)
    # A new model loads the LM weights into the Slow-Fast architecture directly: hybrid layers, tower and
    # projector are created by the model's own __init__ (ZeRO-3 partitions them as it builds), nothing is
    # copied between live modules.
    attention = training_attention(model_args.attn_implementation, training_args.device)
    model = LlavaQwenSlowFastForCausalLM.from_pretrained(
        model_args.model_name_or_path, config=config, dtype=dtype, attn_implementation=attention
    )
    if is_new:
        if model_args.vision_tower_pretrained:
            model.load_vision_tower_weights(model_args.vision_tower_pretrained)
        else:
            logger.warning("no --vision_tower_pretrained: the vision tower starts from random weights")
        if model_args.initialize_cross_attn_kv_from_lm:
            model.initialize_cross_attn_kv_from_lm(model_args.cross_attn_kv_init_layout)
    model.config.use_cache = False
    return model


def set_trainable(model, model_args: ModelArguments) -> None:
    """Stage 1 (``tune_mm_mlp_adapter``): only the projector, ``cross_attn_*`` and ``slow_token_position_*``. Stage 2: everything,
    except the vision tower with ``freeze_mm_vision_encoder``. ``freeze_cross_attn`` holds ``cross_attn_*``
    fixed in either stage."""
    for name, param in model.named_parameters():
        if model_args.freeze_cross_attn and CROSS_ATTN in name:
            param.requires_grad_(False)
        elif model_args.tune_mm_mlp_adapter:
            param.requires_grad_(PROJECTOR in name or CROSS_ATTN in name or SLOW_POSITION in name)
        elif model_args.freeze_mm_vision_encoder and VISION_TOWER in name:
            param.requires_grad_(False)
        else:
            param.requires_grad_(True)


def apply_lora(model, training_args: TrainingArguments):
    """LoRA on the language model's linear layers; projector, tower and cross-attention stay fully trainable."""
    from peft import LoraConfig, get_peft_model

    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and not any(key in name for key in (PROJECTOR, CROSS_ATTN, VISION_TOWER, "lm_head"))
        }
    )
    full = [n for n, _ in model.named_modules() if any(n.endswith(k) for k in (PROJECTOR, "cross_attn_kv_proj", "cross_attn_gate_proj", "slow_token_position_encoding"))]
    lora_config = LoraConfig(
        r=training_args.lora_r,
        lora_alpha=training_args.lora_alpha,
        lora_dropout=training_args.lora_dropout,
        bias=training_args.lora_bias,
        target_modules=targets,
        modules_to_save=full,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


RUN_STATUS_FILE = "run_status.json"


def last_checkpoint(output_dir: str) -> str | None:
    """The newest complete ``checkpoint-*`` of ``output_dir``, or ``None``."""
    return find_resume_checkpoint(output_dir)[0]


def _write_run_status(output_dir: str, status: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_STATUS_FILE)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(status, handle, indent=1)
    os.replace(temporary, path)


def train(argv: list[str] | None = None) -> dict:
    """Parse the command line and train.

    Returns:
        The run's outcome, as written to ``OUTPUT_DIR/run_status.json``: ``status`` ``"finished"`` or
        ``"stopped"`` (early, with a checkpoint: ``reason`` and ``checkpoint``), and ``global_step``.
    """
    started = time.monotonic()
    command_line = list(sys.argv[1:] if argv is None else argv)
    parser = _ArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=command_line)
    except ValueError as err:  # the same command line on every process: they all refuse alike
        raise RunRefused(str(err)) from None
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.local_process_index == 0 else logging.WARNING,
    )
    stop_request = StopRequest(training_args.max_train_hours, training_args.stop_margin_minutes, start=started)
    with stop_request.handling_signals():
        return _train(model_args, data_args, training_args, stop_request, parser, command_line)


class _ArgumentParser(HfArgumentParser):
    """Reports a bad command line as a ``ValueError`` (argparse prints the usage and exits)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        raise ValueError(message)


def _train(model_args, data_args, training_args, stop_request: StopRequest, parser, command_line) -> dict:
    transformers.set_seed(training_args.seed)
    # Set up the process group (gloo on CPU) before ZeRO-3 builds the model, or DeepSpeed starts its own.
    _ = training_args.device
    if training_args.deepspeed:
        import deepspeed

        # ZeRO-3 reads the world size from DeepSpeed's own communicator, which accelerate sets up on GPUs only.
        deepspeed.init_distributed(dist_backend=training_args.ddp_backend or ("gloo" if training_args.use_cpu else "nccl"))

    # Where to resume, checked against this run before the model is built; the same on every process.
    run = agreed(lambda: current_run_record(model_args, data_args, training_args, parser, command_line))
    resume = choose_resume(training_args, run)
    built_config = agreed(lambda: build_config(model_args, data_args, training_args))
    model = build_model(model_args, data_args, training_args, built_config)
    set_trainable(model, model_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, model_max_length=training_args.model_max_length)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    if training_args.lora_enable:
        model = apply_lora(model, training_args)
    base_model = model.get_base_model() if training_args.lora_enable else model
    image_processor = base_model.get_vision_tower().image_processor

    data_seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    data_module = agreed(lambda: make_supervised_data_module(
        tokenizer, image_processor, data_args, base_model.config, max_length=training_args.model_max_length,
        seed=data_seed, max_packed_length=training_args.max_packed_length if training_args.packing else None,
    ))
    trainer = SlowFastTrainer(
        model=model, args=training_args, processing_class=tokenizer, stop_request=stop_request, run_record=run,
        **data_module,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %d", trainable)

    if training_args.should_save:
        stale = os.path.join(training_args.output_dir, RUN_STATUS_FILE)
        if os.path.exists(stale):
            os.remove(stale)
    trainer.train(resume_from_checkpoint=resume)

    skipped = data_module["train_dataset"].skipped_count()
    logger.warning("skipped %d sample(s) that could not be loaded", skipped) if skipped else logger.info("no sample skipped")
    step = trainer.state.global_step
    if stop_request.reason is not None and step < trainer.state.max_steps:
        checkpoint = os.path.join(training_args.output_dir, f"checkpoint-{step}")
        outcome = {"status": "stopped", "reason": stop_request.reason, "global_step": step,
                   "max_steps": trainer.state.max_steps, "checkpoint": checkpoint}
        logger.warning(
            "stopped after step %d of %d (%s); %s is complete: run the same command again to resume",
            step, trainer.state.max_steps, stop_request.reason, checkpoint,
        )
    else:
        trainer.save_state()
        save_checkpoint(trainer, base_model, tokenizer, image_processor, training_args)
        outcome = {"status": "finished", "global_step": step, "max_steps": trainer.state.max_steps}
    if training_args.should_save:
        _write_run_status(training_args.output_dir, outcome)
    return outcome


def save_checkpoint(trainer, model, tokenizer, image_processor, training_args) -> None:
    """A complete checkpoint in ``output_dir``: config, weights (LoRA merged), tokenizer, image processor."""
    model.config.use_cache = True
    model.config.tune_mm_mlp_adapter = False
    if training_args.lora_enable:
        merged = trainer.model.merge_and_unload()
        trainer.model = merged
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        tokenizer.save_pretrained(training_args.output_dir)
        image_processor.save_pretrained(training_args.output_dir)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.save_pretrained(training_args.output_dir)


REFUSAL_FILE_ENV = "LLAVA_LAUNCH_REFUSAL_FILE"


def _refuse(message: str, shared: bool) -> int:
    """Report a refusal (bad arguments or data); ``shared``: every process refuses alike. Returns the exit status."""
    message = " ".join(message.split()) or "refused"
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if first or not shared:
        print(f"error: {message}", file=sys.stderr, flush=True)
    launcher_file = os.environ.get(REFUSAL_FILE_ENV)
    if launcher_file and (first or not shared):
        temporary = f"{launcher_file}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(f"2\n{message}\n")
        os.replace(temporary, launcher_file)
    if shared and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if shared and launcher_file and "TORCHELASTIC_RUN_ID" in os.environ:
        return 0  # the launch script reads the file and exits 2: torchrun would print a traceback for a 2
    return 2


def main(argv: list[str] | None = None) -> int:
    """Train; return the exit status: 0 finished, 75 stopped early with a checkpoint (0 under torchrun),
    2 bad arguments or data (0 under torchrun from the launch script when every process refused alike)."""
    try:
        outcome = train(argv)
    except RunRefused as err:
        return _refuse(str(err), shared=True)
    except (ValueError, FileNotFoundError) as err:
        return _refuse(str(err), shared=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank leaves together: a rank that tears the group down while another still finishes its last
        # collective (the final save, a stop signal's checkpoint) can abort gloo's threads at exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if outcome["status"] == "stopped" and "TORCHELASTIC_RUN_ID" not in os.environ:
        return STOPPED_EXIT_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
