"""Requests the plugin refuses before they reach the engine, each with an error naming the problem; the engine keeps
answering afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import chat_prompt, close_llm, greedy, make_llm


@pytest.fixture(scope="module")
def llm(checkpoints):
    engine = make_llm(checkpoints["released"])
    yield engine
    close_llm(engine)


def _video(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 64, 64, 3), dtype=np.uint8)


def _still_answers(llm) -> None:
    out = llm.generate({"prompt": chat_prompt("ok?"), "multi_modal_data": {"video": _video(8)}}, greedy(2),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("video_and_image", "one video, one image, or the frames of one video"),
        ("no_placeholder", "placeholder"),
        ("too_many_frames", "over this model's 8 per video"),
        ("reserved_token_in_text", "reserves for video positions"),
        ("not_rgb_frames", "RGB frames"),
    ],
)
def test_bad_request_is_refused_with_its_reason_and_the_engine_keeps_serving(llm, case, message):
    from PIL import Image

    prompt, data = chat_prompt("What is it?"), {"video": _video(8)}
    if case == "video_and_image":
        data["image"] = Image.fromarray(_video(1)[0])
    elif case == "no_placeholder":
        prompt = chat_prompt("What is it?", visual=False)
    elif case == "too_many_frames":
        data["video"] = _video(9)
    elif case == "reserved_token_in_text":
        prompt = chat_prompt("What is <|endoftext|> here?")
    else:
        data["video"] = _video(8)[..., :2]
    with pytest.raises(ValueError, match=message):
        llm.generate({"prompt": prompt, "multi_modal_data": data}, greedy(2), use_tqdm=False)
    _still_answers(llm)


def test_hf_overrides_raise_the_frames_per_video(checkpoints):
    engine = make_llm(checkpoints["released"], hf_overrides={"vllm_max_frames": 12})
    try:
        out = engine.generate({"prompt": chat_prompt("What is it?"), "multi_modal_data": {"video": _video(12)}},
                              greedy(3), use_tqdm=False)
    finally:
        close_llm(engine)
    assert len(out[0].outputs[0].token_ids) == 3
