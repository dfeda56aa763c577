"""The transformers side of the vLLM exactness tests, run in the project's main environment (vLLM's CPU build
cannot import timm, hence not the project's model): ``python tests/vllm_plugin/reference.py SPEC.json OUT.json``.

``SPEC.json`` (one job, or ``{"jobs": [...]}``): ``{"write": {...}}`` writes a tiny checkpoint (see :func:`write_checkpoint`); otherwise
``{"checkpoint": DIR, "requests": [...], "cross_attention": true}`` answers each request
``{"prompt": TEXT, "video": NPY | null, "image": NPY | null, "max_tokens": N}`` with greedy tokens (no end-of-sequence
stop) and the log-probability of every prompt token given the ones before it, over the merged sequence (text with
fast tokens), as the project's model computes them. ``{"cli": {"checkpoint", "video", "questions"}}`` gives the
CLI's answers (``ChatSession``) instead.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from PIL import Image


def write_checkpoint(out: str, options: dict) -> None:
    """A tiny random checkpoint with head size 32 (vLLM's CPU attention needs at least 32), variant ``options``
    (config fields), and gates large enough that the slow tokens change greedy tokens."""
    from llava.model import LlavaQwenSlowFastConfig, LlavaQwenSlowFastForCausalLM
    from llava.model.tiny import TinySpec, write_tiny_checkpoint

    spec = TinySpec(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, frames=options.pop("frames", 8),
                    image_size=64, vision_output_stride=16, temporal_stride=2, min_fast_frames=2, seed=options.pop("seed", 0))
    write_tiny_checkpoint(out, spec)
    config = LlavaQwenSlowFastConfig.from_pretrained(out)
    for key, value in options.items():
        setattr(config, key, value)
    config.validate_slow_fast()
    torch.manual_seed(spec.seed + 7)
    model = LlavaQwenSlowFastForCausalLM.from_pretrained(out, config=config, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.hybrid_layers:
            attn = layer.self_attn
            attn.cross_attn_gate_proj[0].weight.normal_(0, 0.5)
            attn.cross_attn_gate_proj[0].bias.fill_(1.5)
            if attn.cross_attn_warm_up_gate is not None:
                attn.cross_attn_warm_up_gate.fill_(1.5)
            attn.cross_attn_kv_proj.weight.normal_(0, 0.3)
            if attn.cross_attn_q_proj is not None:
                attn.cross_attn_q_proj.weight.normal_(0, 0.3)
        encoding = model.model.slow_token_position_encoding
        if encoding is not None:
            encoding.weight.normal_(0, 0.3)
    model.save_pretrained(out)


def _pixels(request: dict, processor, config) -> torch.Tensor | None:
    from llava.mm_utils import process_images

    if request.get("video"):
        return processor.preprocess(np.load(request["video"]), return_tensors="pt")["pixel_values"]
    if request.get("image"):
        return process_images([Image.fromarray(np.load(request["image"]))], processor, config)[0][None]
    return None


def answer(spec: dict) -> list[dict]:
    from llava.mm_utils import tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(spec["checkpoint"], device="cpu", torch_dtype="float32")
    if not spec.get("cross_attention", True):
        with torch.no_grad():
            for layer in model.hybrid_layers:
                layer.self_attn.cross_attn_gate_proj[0].weight.zero_()
                layer.self_attn.cross_attn_gate_proj[0].bias.zero_()
    results = []
    for request in spec["requests"]:
        ids = tokenizer_image_token(request["prompt"], tokenizer, return_tensors="pt")[None]
        pixels = _pixels(request, processor, model.config)
        images = [pixels] if pixels is not None else None
        with torch.no_grad():
            kwargs = dict(do_sample=False, max_new_tokens=request["max_tokens"], eos_token_id=None,
                          pad_token_id=tokenizer.pad_token_id)
            new = model.generate(ids, images=images, **kwargs) if images else model.generate(ids, **kwargs)[:, ids.shape[1]:]
            mm = model.prepare_multimodal_inputs(ids, images=images) if images else None
            if mm is not None:
                logits = model(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask,
                               position_ids=mm.position_ids, slow_tokens=mm.slow_tokens,
                               slow_token_mask=mm.slow_token_mask, cross_attn_query_mask=mm.cross_attn_query_mask).logits
                visual = (mm.token_types[0] == 3).tolist()
            else:
                logits = model(input_ids=ids).logits
                visual = [False] * ids.shape[1]
        logprobs = torch.log_softmax(logits[0].float(), -1)
        text_ids = ids[0][ids[0] != -200].tolist()
        merged = []  # the merged sequence's ids, -1 at fast-token positions
        it = iter(text_ids)
        merged = [-1 if v else next(it) for v in visual]
        prompt_logprobs = [None] + [
            None if merged[i] < 0 else float(logprobs[i - 1, merged[i]]) for i in range(1, len(merged))
        ]
        results.append({"tokens": new[0].tolist(), "prompt_logprobs": prompt_logprobs, "merged_length": len(merged)})
    return results


def cli_answers(spec: dict) -> dict[str, str]:
    """The CLI's greedy answer to each question (``"demo"``: the demo video's six), a new conversation each."""
    from llava.model.builder import load_pretrained_model
    from llava.serve.cli import ChatSession

    tokenizer, model, processor, _ = load_pretrained_model(spec["checkpoint"], device="cpu")
    session = ChatSession(tokenizer, model, processor)
    questions = spec["questions"]
    if questions == "demo":
        from playground.demo_video import DEMO_QUESTIONS

        questions = list(DEMO_QUESTIONS)
    answers = []
    for question in questions:
        session.load_video(spec["video"])
        answers.append(session.ask(question).text.strip())
    return dict(zip(questions, answers))


def run_job(spec: dict) -> dict:
    if "write" in spec:
        write_checkpoint(spec["write"]["out"], dict(spec["write"].get("options", {})))
        return {"checkpoint": spec["write"]["out"]}
    if "cli" in spec:
        return {"answers": cli_answers(spec["cli"])}
    return {"results": answer(spec)}


def main(argv: list[str]) -> int:
    """``SPEC.json`` holds one job or ``{"jobs": [...]}`` (one process for several: imports are slow)."""
    with open(argv[0]) as f:
        spec = json.load(f)
    result = [run_job(job) for job in spec["jobs"]] if "jobs" in spec else run_job(spec)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
