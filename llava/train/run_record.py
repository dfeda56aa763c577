"""What a checkpoint records about the run that wrote it, and whether a resumed run matches it.

Every completion marker (:mod:`llava.train.checkpoints`) carries a ``run`` record:

- ``world_size``: the number of training processes, and ``zero_stage``: DeepSpeed's ZeRO stage (``null`` without
  DeepSpeed). The optimizer states are saved in one shard per process, laid out for that stage: a checkpoint
  resumes only with both unchanged, whatever ``--allow_resume_mismatch`` says.
- ``data``: a fingerprint of the training data, cheap to take however large the data (no annotation is parsed):
  the SHA-256 of a mixture file's bytes, and for every annotation file (the ``--data_path`` file, or each source a
  mixture names) its size and the SHA-256 of its first and last 64 KiB; plus ``--seed`` and ``--data_seed``.
- ``arguments``: every option's value after parsing, and ``given``: the options the command line set.

:func:`resume_mismatches` compares a checkpoint's record with the current run. The options compared are those
either command line set, less the ones that do not change what is trained (:data:`OPERATIONAL`: where to save,
how often to log or save, the time budget, the number of loader workers...). A run-length change
(:data:`RUN_LENGTH`: ``--max_steps``, ``--num_train_epochs``) is allowed, with a warning: extending a run is the
usual reason to resume with another command line (the learning-rate schedule is then stretched to the new length).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("llava.train")

__all__ = [
    "OPERATIONAL",
    "RUN_LENGTH",
    "current_run_record",
    "data_fingerprint",
    "given_options",
    "resume_mismatches",
]

# Options that do not change what is trained: never compared.
OPERATIONAL = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "allow_resume_mismatch", "max_train_hours",
    "stop_margin_minutes", "logging_strategy", "logging_steps", "logging_first_step", "logging_dir",
    "logging_nan_inf_filter", "log_on_each_node", "log_level", "log_level_replica", "disable_tqdm", "report_to",
    "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "save_strategy",
    "save_steps", "save_total_limit", "save_on_each_node", "save_safetensors", "enable_jit_checkpoint",
    "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context", "ddp_timeout", "deepspeed", "push_to_hub", "hub_token", "hub_private_repo",
    "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision", "local_rank", "skip_memory_metrics",
    "include_num_input_tokens_seen", "do_train", "do_eval", "do_predict", "lazy_preprocess",
    "seed", "data_seed",  # compared with the data fingerprint
})
# Options that set how long the run is: a change is allowed and logged.
RUN_LENGTH = frozenset({"max_steps", "num_train_epochs"})
_SECRET_WORDS = ("token", "password", "secret")
_SAMPLED_BYTES = 64 * 1024


# --------------------------------------------------------------------------------------------
# The record
# --------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return str(value)


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """The destinations (field names) that ``argv`` sets, parsed with ``parser`` (an ``HfArgumentParser``)."""
    unset = object()
    namespace = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    try:
        parsed, _ = parser.parse_known_args(list(argv), namespace=namespace)
    except (SystemExit, ValueError):  # the real parse reports the problem
        return []
    return sorted(name for name, value in vars(parsed).items() if value is not unset)


def _file_fingerprint(path: str) -> dict:
    """Size and the SHA-256 of the first and last 64 KiB of ``path`` (``{"missing": true}`` if unreadable)."""
    try:
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            digest.update(handle.read(_SAMPLED_BYTES))
            if size > 2 * _SAMPLED_BYTES:
                handle.seek(size - _SAMPLED_BYTES)
            digest.update(handle.read(_SAMPLED_BYTES))
    except OSError:
        return {"missing": True}
    return {"bytes": size, "sha256_ends": digest.hexdigest()}


def _mixture_sources(path: str, text: str) -> list[str] | None:
    """The ``annotation`` entries of a mixture file as written, or ``None`` if it does not parse (the data loader
    reports why)."""
    try:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            document = yaml.safe_load(text)
        else:
            document = json.loads(text)
    except Exception:  # noqa: BLE001 - any parse failure: the fingerprint keeps the file's hash only
        return None
    entries = document.get("sources") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        return None
    return [entry["annotation"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("annotation"), str)]


def data_fingerprint(data_path: str, seed: int | None, data_seed: int | None) -> dict:
    """A fingerprint of the training data that changes when its sample list may change (see the module's
    docstring); it reads at most 128 KiB of each annotation file."""
    from .mixture import is_mixture_file

    fingerprint: dict[str, Any] = {"seed": seed, "data_seed": data_seed}
    if not is_mixture_file(data_path):
        fingerprint["annotation"] = _file_fingerprint(data_path)
        return fingerprint
    try:
        with open(data_path, "rb") as handle:
            raw = handle.read()
    except OSError:
        fingerprint["mixture"] = {"missing": True}
        return fingerprint
    fingerprint["mixture"] = {"sha256": hashlib.sha256(raw).hexdigest()}
    sources = _mixture_sources(data_path, raw.decode("utf-8-sig", errors="replace"))
    if sources is not None:
        base = os.path.dirname(os.path.abspath(data_path))
        fingerprint["sources"] = {
            name: _file_fingerprint(os.path.normpath(os.path.join(base, os.path.expanduser(name)))) for name in sources
        }
    return fingerprint


def _zero_stage(training_args) -> int | None:
    config = getattr(training_args, "hf_deepspeed_config", None)
    if config is not None:
        return int(config.config.get("zero_optimization", {}).get("stage", 0))
    given = getattr(training_args, "deepspeed", None)
    if not given:
        return None
    if isinstance(given, str):
        with open(given, encoding="utf-8") as handle:
            given = json.load(handle)
    return int(given.get("zero_optimization", {}).get("stage", 0))


def current_run_record(
    model_args, data_args, training_args, parser: argparse.ArgumentParser, argv: Sequence[str]
) -> dict:
    """The ``run`` record of this run: world size, ZeRO stage, data fingerprint and arguments."""
    arguments = {}
    for group in (model_args, data_args, training_args):
        for item in dataclasses.fields(group):
            if item.init and not any(word in item.name for word in _SECRET_WORDS):
                arguments[item.name] = _jsonable(getattr(group, item.name))
    return {
        "world_size": int(training_args.world_size),
        "zero_stage": _zero_stage(training_args),
        "data": data_fingerprint(data_args.data_path, training_args.seed, training_args.data_seed),
        "arguments": arguments,
        "given": given_options(parser, argv),
    }


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _data_differences(then: dict, now: dict) -> list[str]:
    found = []
    for key in ("seed", "data_seed"):
        if then.get(key) != now.get(key):
            found.append(f"--{key} {_show(then.get(key))} -> {_show(now.get(key))}")
    kind_then = "mixture" if "mixture" in then else "annotation"
    kind_now = "mixture" if "mixture" in now else "annotation"
    if kind_then != kind_now:
        kinds = {"mixture": "a mixture file", "annotation": "an annotation file"}
        return found + [f"--data_path was {kinds[kind_then]}, now {kinds[kind_now]}"]
    if kind_now == "annotation":
        if then.get("annotation") != now.get("annotation"):
            found.append(f"the annotation file changed ({_describe_file(then.get('annotation'))} -> "
                         f"{_describe_file(now.get('annotation'))})")
        return found
    if then.get("mixture") != now.get("mixture"):
        found.append("the mixture file's content changed")
    sources_then, sources_now = then.get("sources") or {}, now.get("sources") or {}
    for name in sorted(set(sources_then) | set(sources_now)):
        if name not in sources_now:
            found.append(f"source '{name}' is no longer in the mixture")
        elif name not in sources_then:
            found.append(f"source '{name}' is new in the mixture")
        elif sources_then[name] != sources_now[name]:
            found.append(f"source '{name}' changed ({_describe_file(sources_then[name])} -> "
                         f"{_describe_file(sources_now[name])})")
    return found


def _describe_file(fingerprint: dict | None) -> str:
    if not fingerprint or fingerprint.get("missing"):
        return "missing"
    return f"{fingerprint.get('bytes')} bytes, ends {str(fingerprint.get('sha256_ends'))[:12]}"


def resume_mismatches(then: dict, now: dict) -> tuple[list[str], list[str], list[str]]:
    """Compare a checkpoint's ``run`` record (``then``) with this run's (``now``).

    Returns:
        ``(unsupported, differences, allowed)``: what cannot be resumed at all (world size, ZeRO stage), what
        ``--allow_resume_mismatch`` must accept (data, arguments), and the run-length changes that are only
        logged. Each item names the setting and its value then and now.
    """
    unsupported = []
    if then.get("world_size") != now.get("world_size"):
        unsupported.append(f"world size {then.get('world_size')} processes -> {now.get('world_size')}")
    if then.get("zero_stage") != now.get("zero_stage"):
        unsupported.append(f"ZeRO stage {_show(then.get('zero_stage'))} -> {_show(now.get('zero_stage'))}")
    differences = _data_differences(then.get("data") or {}, now.get("data") or {})
    allowed = []
    arguments_then, arguments_now = then.get("arguments") or {}, now.get("arguments") or {}
    for name in sorted(set(then.get("given") or ()) | set(now.get("given") or ())):
        if name in OPERATIONAL or name not in arguments_then or name not in arguments_now:
            continue
        if arguments_then[name] != arguments_now[name]:
            item = f"--{name} {_show(arguments_then[name])} -> {_show(arguments_now[name])}"
            (allowed if name in RUN_LENGTH else differences).append(item)
    return unsupported, differences, allowed
