"""vLLM's greedy tokens and prompt log-probabilities equal the project's transformers model's, on tiny random
checkpoints (head size 32) with the slow tokens switched well on."""

from __future__ import annotations

import math
import os
import subprocess
import textwrap

import pytest

from .conftest import VARIANTS, close_llm, greedy, make_llm, vllm_request
from .conftest import request_spec as _request

# Prompt log-probabilities: both sides compute in float32 on the CPU; vLLM's kernels (attention, RMSNorm, RoPE)
# round differently, which on these models moves a log-probability by well under 1e-3.
LOGPROB_TOLERANCE = 1e-3

@pytest.fixture(scope="module")
def released_llm(checkpoints):
    llm = make_llm(checkpoints["released"])
    yield llm
    close_llm(llm)


def _generate(llm, names: list[str], media: dict[str, str]) -> dict[str, list[int]]:
    requests = [_request(n, media) for n in names]
    outputs = llm.generate([vllm_request(r, media) for r in requests], [greedy(r["max_tokens"]) for r in requests],
                           use_tqdm=False)
    return {n: list(o.outputs[0].token_ids) for n, o in zip(names, outputs)}


def test_one_video_gives_the_transformers_greedy_tokens(released_llm, reference, media):
    tokens = _generate(released_llm, ["video8"], media)
    assert tokens["video8"] == reference["released"]["video8"]["tokens"]


def test_batched_videos_of_different_frame_counts_give_the_transformers_tokens(released_llm, reference, media):
    tokens = _generate(released_llm, ["video8", "video4"], media)
    for name in tokens:
        assert tokens[name] == reference["released"][name]["tokens"], name


def test_an_image_gives_the_transformers_greedy_tokens(released_llm, reference, media):
    tokens = _generate(released_llm, ["image"], media)
    assert tokens["image"] == reference["released"]["image"]["tokens"]


def test_text_only_and_video_requests_in_one_batch_give_the_transformers_tokens(released_llm, reference, media):
    tokens = _generate(released_llm, ["text", "video8"], media)
    for name in tokens:
        assert tokens[name] == reference["released"][name]["tokens"], name


def test_staggered_max_tokens_mixing_prefill_and_decode_give_the_transformers_tokens(released_llm, reference, media):
    # Two sequences at a time and five requests that stop after 3 to 12 tokens: prompts (with their encoder inputs)
    # are scheduled while other requests decode.
    names = ["video8", "video8b", "text", "video4", "image"]
    tokens = _generate(released_llm, names, media)
    for name in names:
        assert tokens[name] == reference["released"][name]["tokens"], name


def test_prompt_logprobs_match_the_transformers_model(released_llm, reference, media):
    names = ["video8", "image", "text"]
    requests = [_request(n, media) for n in names]
    outputs = released_llm.generate([vllm_request(r, media) for r in requests], greedy(1, prompt_logprobs=0),
                                    use_tqdm=False)
    for name, output in zip(names, outputs):
        expected = reference["released"][name]
        assert len(output.prompt_token_ids) == expected["merged_length"], name
        compared = 0
        for position, (token, logprobs) in enumerate(zip(output.prompt_token_ids, output.prompt_logprobs)):
            want = expected["prompt_logprobs"][position]
            if want is None:  # the first token, or a fast-token position (no text token to predict)
                continue
            got = logprobs[token].logprob
            assert math.isclose(got, want, abs_tol=LOGPROB_TOLERANCE), (name, position, got, want)
            compared += 1
        assert compared >= 10, name


def test_control_without_cross_attention_the_tokens_differ(released_llm, reference, media):
    """The comparison is not vacuous: the transformers model without its cross-attention term answers otherwise."""
    tokens = _generate(released_llm, ["video8", "video4", "image"], media)
    differing = [n for n in tokens if reference["no_cross_attention"][n]["tokens"] != tokens[n]]
    assert tokens == {n: reference["released"][n]["tokens"] for n in tokens}
    assert len(differing) == len(tokens), differing


def test_frames_sent_as_images_read_as_the_video(released_llm, reference, media):
    """lmms-eval's vLLM backend sends a video as one image per frame: the same tokens as the video itself."""
    import numpy as np
    from PIL import Image

    request = _request("video8", media)
    frames = [Image.fromarray(frame) for frame in np.load(request["video"])]
    prompt = request["prompt"].replace("<image>\n", "<image>\n" * len(frames))
    out = released_llm.generate({"prompt": prompt, "multi_modal_data": {"image": frames}},
                                greedy(request["max_tokens"]), use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == reference["released"]["video8"]["tokens"]


# The tests below start engines of their own. In this process vLLM keeps one set of parallel groups, and closing
# an engine clears it, so no test after them may use `released_llm`.
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "released"])
def test_every_cross_attention_variant_gives_the_transformers_tokens(variant, checkpoints, reference, media):
    llm = make_llm(checkpoints[variant])
    try:
        tokens = _generate(llm, ["video8", "text", "image"], media)
    finally:
        close_llm(llm)
    for name in tokens:
        assert tokens[name] == reference[variant][name]["tokens"], (variant, name)


def test_multiprocess_engine_loads_the_plugin_by_entry_point(checkpoints, reference, media, python_for_subprocess,
                                                             workdir):
    """A fresh interpreter with vLLM's engine in its own process: the model, its processor and config come from the
    ``vllm.general_plugins`` entry point alone (nothing of the plugin is imported by the script)."""
    request = _request("video8", media)
    script = workdir / "multiprocess.py"
    script.write_text(textwrap.dedent(f"""
        import json, numpy as np
        from vllm import LLM, SamplingParams

        def main():
            llm = LLM(model={checkpoints['released']!r}, dtype="float32", max_model_len=1024, max_num_seqs=2, seed=0)
            out = llm.generate({{"prompt": {request['prompt']!r},
                                 "multi_modal_data": {{"video": np.load({request['video']!r})}}}},
                               SamplingParams(temperature=0, max_tokens={request['max_tokens']}, ignore_eos=True),
                               use_tqdm=False)
            print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))

        if __name__ == "__main__":
            main()
    """))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    done = subprocess.run([python_for_subprocess, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=workdir)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    assert json_tokens(lines[-1]) == reference["released"]["video8"]["tokens"]


def json_tokens(line: str) -> list[int]:
    import json

    return json.loads(line.split(" ", 1)[1])

