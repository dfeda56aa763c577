"""Write a trained checkpoint as a small, self-contained inference folder in a chosen dtype.

    python -m llava.model.export SRC DST [--dtype float16]

The training output holds optimizer-free weights in fp32 plus trainer bookkeeping (``trainer_state.json``,
``training_args.bin``). The export keeps what inference needs (config, weights, tokenizer, chat template,
image processor, generation config), casts floating-point weights to ``--dtype``, and clears
``vision_tower_pretrained``, a training-time path that means nothing on another machine. Loading the
export on CPU upcasts to fp32 again (see :func:`llava.model.builder.load_pretrained_model`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from llava.model.builder import CheckpointError, load_pretrained_model

__all__ = ["DTYPES", "export_checkpoint", "main"]

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def export_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str = "float16") -> Path:
    """Load ``src`` on CPU, cast it to ``dtype`` and write the inference files to ``dst``.

    ``dst`` must not exist or be an empty folder, so an export never mixes with older files. Returns ``dst``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"export destination '{dst}' exists and is not an empty folder")
    if dst.resolve() == src.resolve():
        raise ValueError("export destination must differ from the source checkpoint")
    tokenizer, model, image_processor, _ = load_pretrained_model(str(src), None, device="cpu", torch_dtype="float32")
    model.config.vision_tower_pretrained = None
    model.to(DTYPES[dtype])
    model.config.dtype = dtype
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    if image_processor is not None:
        image_processor.save_pretrained(dst)
    # generation_config.json is written by save_pretrained; the chat template by the tokenizer.
    for extra in ("README.md", "LICENSE"):
        if (src / extra).is_file():
            shutil.copy2(src / extra, dst / extra)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="trained checkpoint folder")
    parser.add_argument("dst", help="new folder for the export (must not exist or be empty)")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.src, args.dst, args.dtype)
    except (CheckpointError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
