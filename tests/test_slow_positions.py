"""The optional slow-token position encoding (``slow_token_position_encoding``): time in the clip and place in
the grid, added to the slow tokens, starting as an exact no-op."""

from __future__ import annotations

import pytest
import torch

from llava.model import LlavaQwenSlowFastConfig, LlavaQwenSlowFastForCausalLM
from llava.model.slow_fast import SlowFastParams, SlowTokenPositionEncoding, slow_token_positions, split_slow_fast
from llava.train.arguments import ModelArguments
from llava.train.train import set_trainable

from conftest import prompt_ids, random_video, tiny_config, tiny_model

KINDS = ["fourier", "fourier_spacetime"]
POSITION_WEIGHT = "model.slow_token_position_encoding.weight"


def positioned_model(kind: str = "fourier_spacetime", seed: int = 0, **overrides) -> LlavaQwenSlowFastForCausalLM:
    """A tiny model whose position encoding has been moved off zero (as training would)."""
    model = tiny_model(seed=seed, slow_token_position_encoding=kind, **overrides)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 100)
        weight = model.model.slow_token_position_encoding.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


def greedy(model, ids, images, **kwargs) -> list[list[int]]:
    return model.generate(ids, images=images, do_sample=False, max_new_tokens=6, **kwargs).tolist()


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------ config
def test_default_is_none_and_adds_no_parameters():
    model = tiny_model()
    assert model.config.slow_token_position_encoding == "none"
    assert model.model.slow_token_position_encoding is None
    assert not any("slow_token_position" in name for name, _ in model.named_parameters())


def test_unknown_encoding_is_refused_by_name():
    with pytest.raises(ValueError, match="slow_token_position_encoding='rope'"):
        tiny_config(slow_token_position_encoding="rope")


def test_parameters_live_under_a_position_name():
    model = tiny_model(slow_token_position_encoding="fourier")
    names = [name for name, _ in model.named_parameters() if "position" in name]
    assert names == [POSITION_WEIGHT]


# ------------------------------------------------------------------------------------------ positions
def test_positions_are_clip_fraction_and_cell_centres():
    positions = slow_token_positions(3, 2)
    assert positions.shape == (12, 3)
    assert positions[:, 0].unique().tolist() == [0.0, 0.5, 1.0]  # frame i of T: i / (T - 1)
    # frame by frame, row by row: token 1 of frame 0 is row 0, column 1
    assert positions[1].tolist() == [0.0, 0.25, 0.75]
    assert positions[-1].tolist() == [1.0, 0.75, 0.75]


def test_an_image_is_at_mid_clip_on_its_full_grid_and_a_video_on_its_pooled_grid():
    params = SlowFastParams(video_pooling_stride=2, min_fast_frames=1)
    image = split_slow_fast(torch.randn(1, 16, 4), params)
    assert image.slow_positions.shape == (16, 3)
    assert image.slow_positions[:, 0].eq(0.5).all()
    assert image.slow_positions[:4, 2].tolist() == [0.125, 0.375, 0.625, 0.875]
    video = split_slow_fast(torch.randn(5, 16, 4), params)
    assert video.slow_positions.shape == (video.slow.shape[0], 3) == (20, 3)
    assert video.slow_positions[:4, 2].tolist() == [0.25, 0.75, 0.25, 0.75]  # 2 x 2 after pooling, same scale


def test_time_spans_the_clip_whatever_the_frame_count():
    eight, sixteen = slow_token_positions(8, 2)[:, 0], slow_token_positions(16, 2)[:, 0]
    assert (eight.min(), eight.max()) == (sixteen.min(), sixteen.max()) == (0.0, 1.0)
    # frame 2 of 8 sits where frame 4 of 16 would be if it were 14/15 of the way: both are evenly spread in [0, 1]
    assert torch.allclose(eight.unique(), torch.linspace(0, 1, 8))
    assert torch.allclose(sixteen.unique(), torch.linspace(0, 1, 16))


def test_spacetime_features_tell_apart_opposite_motions_that_factorised_features_cannot():
    # one object over two frames: left-to-right against right-to-left, same cells at the same times
    right = torch.tensor([[0.0, 0.5, 0.25], [1.0, 0.5, 0.75]])
    left = torch.tensor([[0.0, 0.5, 0.75], [1.0, 0.5, 0.25]])
    factorised, spacetime = SlowTokenPositionEncoding("fourier", 8), SlowTokenPositionEncoding("fourier_spacetime", 8)
    assert torch.allclose(factorised.features(right).mean(0), factorised.features(left).mean(0))
    assert not torch.allclose(spacetime.features(right).mean(0), spacetime.features(left).mean(0))


# ------------------------------------------------------------------------------------------ no-op start
@pytest.mark.parametrize("kind", KINDS)
def test_enabling_on_a_saved_checkpoint_changes_no_logit(kind, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    # Both sides are loaded from the same files: a model built in memory can take other CPU kernel paths than one
    # loaded from disk (the tensors' alignment), which moves logits by ~1e-6 with no change of weights.
    trained = LlavaQwenSlowFastForCausalLM.from_pretrained(tmp_path).eval()
    assert trained.model.slow_token_position_encoding is None
    ids, video = prompt_ids(4, 6), random_video(8)
    with torch.no_grad():
        before = trained(input_ids=ids, images=[video]).logits
    enabled = LlavaQwenSlowFastForCausalLM.from_pretrained(tmp_path, slow_token_position_encoding=kind).eval()
    assert enabled.model.slow_token_position_encoding is not None
    assert enabled.model.slow_token_position_encoding.weight.eq(0).all()
    with torch.no_grad():
        after = enabled(input_ids=ids, images=[video]).logits
    assert torch.equal(before, after)


def test_a_new_model_starts_at_zero_yet_the_encoding_gets_a_gradient():
    model = tiny_model(slow_token_position_encoding="fourier_spacetime").train()
    weight = model.model.slow_token_position_encoding.weight
    assert weight.eq(0).all()
    ids = prompt_ids(4, 6)
    labels = ids.clone()
    labels[ids < 0] = -100
    model(input_ids=ids, labels=labels, images=[random_video(4)]).loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ the encoding in use
def test_encoding_moves_each_slow_token_by_its_time_and_place():
    model = positioned_model()
    video = random_video(4)
    plain = split_slow_fast(model.encode_frames(video), model.slow_fast_params)
    tokens = model.encode_images([video])[0]
    expected = plain.slow + model.model.slow_token_position_encoding.features(plain.slow_positions) @ (
        model.model.slow_token_position_encoding.weight.t()
    )
    assert torch.allclose(tokens.slow, expected, atol=1e-5)
    # the fast tokens are untouched
    assert torch.equal(tokens.fast, plain.fast)


def test_images_and_videos_of_different_lengths_in_one_padded_batch_match_each_alone():
    model = positioned_model()
    items = [random_video(8, seed=1), random_video(1, seed=2)[0], random_video(4, seed=3)]
    prompts = [prompt_ids(4, 6, seed=1)[0], prompt_ids(2, 9, seed=2)[0], prompt_ids(3, 3, seed=3)[0]]
    ids, mask = left_padded(prompts)
    batched = greedy(model, ids, items, attention_mask=mask)
    alone = [greedy(model, p[None], [item])[0] for p, item in zip(prompts, items)]
    assert batched == alone
    assert batched != greedy(tiny_model(), ids, items, attention_mask=mask)  # the encoding is in use


def test_chunked_vision_encoding_gives_the_same_slow_tokens():
    video = random_video(7)
    whole = positioned_model().encode_images([video])[0]
    chunked = positioned_model(mm_vision_chunk_frames=3).encode_images([video])[0]
    assert torch.allclose(whole.slow, chunked.slow, atol=1e-5)
    assert torch.equal(whole.slow_positions, chunked.slow_positions)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_equal_the_teacher_forced_argmax(cache):
    model = positioned_model()
    ids, video = prompt_ids(4, 6), random_video(8)
    new = torch.tensor(greedy(model, ids, [video], cache_implementation=cache))
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, new[:, :-1]], dim=1), images=[video]).logits
    assert logits[0, -6:].argmax(-1).tolist() == new[0].tolist()


def test_static_cache_batch_generates_like_the_dynamic_cache():
    model = positioned_model()
    ids, mask = left_padded([prompt_ids(4, 6, seed=1)[0], prompt_ids(2, 9, seed=2)[0]])
    videos = [random_video(8, seed=1), random_video(4, seed=2)]
    dynamic = greedy(model, ids, videos, attention_mask=mask)
    assert greedy(model, ids, videos, attention_mask=mask, cache_implementation="static") == dynamic


@pytest.mark.parametrize("frames", [8, 16])
def test_eight_and_sixteen_frames_run_with_the_same_parameters(frames):
    model = positioned_model()
    tokens = model.encode_images([random_video(frames)])[0]
    assert tokens.slow.shape[0] == frames * 4  # 4 x 4 grid pooled 2 x 2
    assert tokens.slow_positions[:, 0].max() == 1.0 and tokens.slow_positions[:, 0].min() == 0.0
    new = greedy(model, prompt_ids(4, 6), [random_video(frames)])
    assert len(new[0]) == 6


def test_save_and_load_keep_the_position_weights(tmp_path):
    model = positioned_model()
    model.save_pretrained(tmp_path)
    loaded = LlavaQwenSlowFastForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.slow_token_position_encoding == "fourier_spacetime"
    assert torch.equal(loaded.state_dict()[POSITION_WEIGHT], model.state_dict()[POSITION_WEIGHT])
    ids, video = prompt_ids(4, 6), random_video(8)
    with torch.no_grad():
        # the same weights; a model loaded from disk may take other CPU kernel paths (float rounding, ~1e-6)
        torch.testing.assert_close(loaded(input_ids=ids, images=[video]).logits, model(input_ids=ids, images=[video]).logits,
                                   rtol=0, atol=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------------------ training
def test_stage1_trains_the_position_encoding_with_projector_and_cross_attention():
    model = tiny_model(slow_token_position_encoding="fourier")
    set_trainable(model, ModelArguments(model_name_or_path="x", tune_mm_mlp_adapter=True))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert POSITION_WEIGHT in trainable
    assert all("mm_projector" in n or "cross_attn_" in n or n == POSITION_WEIGHT for n in trainable)


def test_config_round_trips_the_option():
    config = tiny_config(slow_token_position_encoding="fourier")
    assert LlavaQwenSlowFastConfig.from_dict(config.to_dict()).slow_token_position_encoding == "fourier"


def test_stage2_command_line_enables_it_on_a_checkpoints_config(tmp_path):
    from llava.train.arguments import TrainingArguments
    from llava.train.data import DataArguments
    from llava.train.train import apply_stage2_settings

    config = tiny_config()
    changed = apply_stage2_settings(
        config, ModelArguments(model_name_or_path="x", slow_token_position_encoding="fourier"),
        DataArguments(data_path="x"), TrainingArguments(output_dir=str(tmp_path)),
    )
    assert changed["slow_token_position_encoding"] == ("none", "fourier")
    assert config.slow_token_position_encoding == "fourier"
