"""Generation with the slow-key/value cache, batching, and training-time behaviours of the full model."""

from __future__ import annotations

import pytest
import torch

from llava.model import SlowFastCache

from conftest import prompt_ids, random_video, tiny_model


def count_kv_projections(model) -> list[int]:
    calls = []
    for layer in model.hybrid_layers:
        layer.self_attn.cross_attn_kv_proj.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("implementation", ["text-only-vanilla-flashattn", "text-only-vanilla-masksystem", "vanilla"])
def test_attend_mode_greedy_tokens_equal_teacher_forced_argmax(implementation):
    model = tiny_model(cross_attn_implementation=implementation)
    ids, video = prompt_ids(4, 6), random_video(8)
    new = model.generate(ids, images=[video], max_new_tokens=8, do_sample=False)
    assert new.shape == (1, 8)
    full = torch.cat([ids, new[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, images=[video]).logits
    assert logits[0, -8:].argmax(-1).tolist() == new[0].tolist()


def test_reference_decode_mode_breaks_teacher_forced_consistency():
    model = tiny_model()
    model.config.cross_attn_decode_mode = "reference"
    ids, video = prompt_ids(4, 6), random_video(8)
    new = model.generate(ids, images=[video], max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, new[:, :-1]], dim=1), images=[video]).logits
    assert logits[0, -8:].argmax(-1).tolist() != new[0].tolist()


def test_slow_key_values_are_projected_once_per_prompt():
    model = tiny_model()
    calls = count_kv_projections(model)
    model.generate(prompt_ids(4, 6), images=[random_video(8)], max_new_tokens=2, do_sample=False)
    short = len(calls)
    calls.clear()
    model.generate(prompt_ids(4, 6), images=[random_video(8)], max_new_tokens=12, do_sample=False)
    assert short == len(calls) == len(model.hybrid_layers)


def test_reference_decode_mode_never_reads_slow_tokens_after_the_prompt():
    model = tiny_model()
    model.config.cross_attn_decode_mode = "reference"
    ids, video = prompt_ids(4, 6), random_video(8)
    new = model.generate(ids, images=[video], max_new_tokens=6, do_sample=False)
    # equivalent: prefill with the slow path, then plain decoding from the same cache
    with torch.no_grad():
        mm = model.prepare_multimodal_inputs(ids, images=[video])
        cache = SlowFastCache(config=model.config)
        out = model(inputs_embeds=mm.inputs_embeds, slow_tokens=mm.slow_tokens, slow_token_mask=mm.slow_token_mask,
                    cross_attn_query_mask=mm.cross_attn_query_mask, past_key_values=cache, use_cache=True)
        tokens = [out.logits[0, -1].argmax().item()]
        for _ in range(5):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            tokens.append(out.logits[0, -1].argmax().item())
    assert new[0].tolist() == tokens


def test_generate_returns_only_new_tokens():
    model = tiny_model()
    new = model.generate(prompt_ids(4, 6), images=[random_video(4)], max_new_tokens=5, do_sample=False)
    assert new.shape == (1, 5)
    assert (new >= 0).all()


def test_batched_generation_with_videos_of_different_lengths_matches_single():
    model = tiny_model()
    prompts = [prompt_ids(4, 6, seed=1)[0], prompt_ids(2, 9, seed=2)[0]]
    videos = [random_video(8, seed=1), random_video(4, seed=2)]
    singles = [model.generate(p[None], images=[v], max_new_tokens=6, do_sample=False)[0] for p, v in zip(prompts, videos)]
    length = max(len(p) for p in prompts)
    ids = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, p in enumerate(prompts):  # right-padded, as a tokenizer would give; generate re-pads on the left
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    batched = model.generate(ids, attention_mask=mask, images=videos, max_new_tokens=6, do_sample=False)
    assert batched[0].tolist() == singles[0].tolist()
    assert batched[1].tolist() == singles[1].tolist()


def test_beam_search_and_multiple_samples_keep_the_slow_cache_consistent():
    model = tiny_model()
    ids, video = prompt_ids(4, 6), random_video(8)
    beams = model.generate(ids, images=[video], max_new_tokens=5, num_beams=3, do_sample=False)
    assert beams.shape == (1, 5)
    torch.manual_seed(0)
    samples = model.generate(ids, images=[video], max_new_tokens=5, do_sample=True, num_return_sequences=3)
    assert samples.shape == (3, 5)


def test_precomputed_visual_tokens_give_the_same_answer():
    model = tiny_model()
    ids, video = prompt_ids(4, 6), random_video(8)
    direct = model.generate(ids, images=[video], max_new_tokens=6, do_sample=False)
    tokens = model.encode_images([video])
    reused = model.generate(ids, visual_tokens=tokens, max_new_tokens=6, do_sample=False)
    assert direct.tolist() == reused.tolist()


def test_single_image_input_is_one_frame_sample():
    model = tiny_model()
    image = random_video(1)[0]
    mm = model.prepare_multimodal_inputs(prompt_ids(2, 3), images=[image])
    assert mm.num_slow_tokens == [16] and mm.num_fast_tokens == [16]


def test_image_count_mismatch_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="1 <image> tokens but 2"):
        model.prepare_multimodal_inputs(prompt_ids(2, 3), images=[random_video(2), random_video(2)])


def test_wrong_image_size_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"expected \[frames, 3, 128, 128\]"):
        model.prepare_multimodal_inputs(prompt_ids(2, 3), images=[torch.zeros(2, 3, 64, 64)])


def test_chunked_vision_encoding_equals_all_at_once():
    model = tiny_model()
    video = random_video(10)
    whole = model.encode_frames(video)
    model.config.mm_vision_chunk_frames = 3
    torch.testing.assert_close(model.encode_frames(video), whole, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    ids = prompt_ids(4, 6)
    labels = ids.clone()
    labels[:, :5] = -100
    video = random_video(8)

    def run(checkpointing: bool):
        model = tiny_model().train()
        if checkpointing:  # the name from transformers 5.23; gradient_checkpointing_enable before (deprecated since)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        loss = model(input_ids=ids, labels=labels, images=[video], use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in ("model.mm_projector.0.weight", "model.layers.0.self_attn.cross_attn_kv_proj.weight",
                 "model.layers.2.self_attn.cross_attn_warm_up_gate"):
        assert grads_a[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_generate_cuts_prompt_text_beyond_tokenizer_model_max_length_with_a_warning(caplog):
    model = tiny_model()
    ids, video = prompt_ids(4, 10), random_video(8)  # 4 + 8 fast + 10 = 22 positions
    expected = model.generate(ids[:, :-4], images=[video], max_new_tokens=5, do_sample=False)
    model.config.tokenizer_model_max_length = 18
    with caplog.at_level("WARNING", logger="llava.model.modeling_llava_qwen_slow_fast"):
        cut = model.generate(ids, images=[video], max_new_tokens=5, do_sample=False)
    assert cut.tolist() == expected.tolist()
    (warning,) = [r.getMessage() for r in caplog.records if "tokenizer_model_max_length" in r.getMessage()]
    assert "tokenizer_model_max_length=18" in warning and "cut 4 text token(s)" in warning


def test_prompt_truncation_cuts_each_sample_to_the_limit_and_counts_the_cut():
    model = tiny_model()
    long, short = prompt_ids(4, 10, seed=1), prompt_ids(2, 3, seed=2)
    ids = torch.zeros(2, long.shape[1], dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = long[0], 1
    ids[1, : short.shape[1]], mask[1, : short.shape[1]] = short[0], 1
    mm = model.prepare_multimodal_inputs(ids, mask, images=[random_video(8), random_video(8)], max_length=18)
    assert mm.truncated_tokens == [4, 0]
    assert mm.attention_mask.sum(1).tolist() == [18, 2 + 8 + 3]


def test_prompt_truncation_never_cuts_into_the_visual_tokens():
    model = tiny_model()
    ids, video = prompt_ids(4, 10), random_video(8)
    model.config.tokenizer_model_max_length = 12  # the text before the video and its 8 fast tokens: still fits
    model.generate(ids, images=[video], max_new_tokens=1, do_sample=False)
    model.config.tokenizer_model_max_length = 11
    with pytest.raises(ValueError, match="tokenizer_model_max_length is 11.*fewer frames"):
        model.generate(ids, images=[video], max_new_tokens=1, do_sample=False)
