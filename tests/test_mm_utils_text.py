from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    expand2square,
    get_model_name_from_path,
    process_images,
    tokenizer_image_token,
)
from llava.model.tokenizer_utils import train_tiny_tokenizer

PROMPT = "<|im_start|>user\n<image>\nWhat is the dog doing?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_tokenizer_image_token_places_one_image_index_between_pieces(tokenizer):
    before, after = PROMPT.split("<image>")
    ids = tokenizer_image_token(PROMPT, tokenizer)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids == _ids(tokenizer, before) + [IMAGE_TOKEN_INDEX] + _ids(tokenizer, after)


def test_tokenizer_image_token_handles_leading_and_repeated_images(tokenizer):
    ids = tokenizer_image_token("<image><image>\nhi", tokenizer)
    assert ids == [IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX] + _ids(tokenizer, "\nhi")


def test_tokenizer_image_token_without_image_equals_plain_tokenization(tokenizer):
    assert tokenizer_image_token("just text", tokenizer) == _ids(tokenizer, "just text")


def test_tokenizer_image_token_custom_index(tokenizer):
    assert tokenizer_image_token("a<image>b", tokenizer, image_token_index=-7).count(-7) == 1


def test_tokenizer_image_token_pt_returns_1d_long_tensor_equal_to_list(tokenizer):
    as_list = tokenizer_image_token(PROMPT, tokenizer)
    as_tensor = tokenizer_image_token(PROMPT, tokenizer, return_tensors="pt")
    assert isinstance(as_list, list)
    assert as_tensor.dtype == torch.long and as_tensor.dim() == 1
    assert as_tensor.tolist() == as_list


def test_tokenizer_image_token_rejects_unknown_return_tensors(tokenizer):
    with pytest.raises(ValueError):
        tokenizer_image_token(PROMPT, tokenizer, return_tensors="np")


class _BosTokenizer:
    """Mimics a Llama-style tokenizer that always prepends BOS (id 1)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = [100 + ord(c) for c in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + ids)


def test_tokenizer_image_token_prepends_bos_once_for_bos_tokenizers():
    ids = tokenizer_image_token("a<image>b", _BosTokenizer())
    assert ids == [1, 100 + ord("a"), IMAGE_TOKEN_INDEX, 100 + ord("b")]


@pytest.mark.parametrize(
    "path, name",
    [
        ("lmms-lab/llava-onevision-qwen2-7b-ov", "llava-onevision-qwen2-7b-ov"),
        ("/ckpts/slowfast-llava-7b/", "slowfast-llava-7b"),
        ("/ckpts/slowfast-llava-7b/checkpoint-500", "slowfast-llava-7b_checkpoint-500"),
        ("/ckpts/slowfast-llava-7b/checkpoint-500/", "slowfast-llava-7b_checkpoint-500"),
        ("local-model", "local-model"),
    ],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name


def test_expand2square_pads_wide_image_vertically_centred():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    out = expand2square(img, (10, 20, 30))
    assert out.size == (40, 40)
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((0, 39)) == (10, 20, 30)
    assert out.getpixel((0, 10)) == (255, 255, 255) and out.getpixel((39, 29)) == (255, 255, 255)
    assert out.getpixel((0, 9)) == (10, 20, 30) and out.getpixel((0, 30)) == (10, 20, 30)


def test_expand2square_pads_tall_image_horizontally_centred():
    img = Image.new("RGB", (10, 30), (255, 0, 0))
    out = expand2square(img, (0, 0, 255))
    assert out.size == (30, 30)
    assert out.getpixel((9, 15)) == (0, 0, 255) and out.getpixel((10, 15)) == (255, 0, 0)
    assert out.getpixel((19, 15)) == (255, 0, 0) and out.getpixel((20, 15)) == (0, 0, 255)


def test_expand2square_returns_square_image_unchanged():
    img = Image.new("RGB", (16, 16))
    assert expand2square(img, (0, 0, 0)) is img


class _FakeProcessor:
    """Resizes to 8x8 and returns [1, 3, 8, 8]; records the sizes and corner colours it was given."""

    image_mean = (0.5, 0.25, 0.0)

    def __init__(self):
        self.seen = []

    def preprocess(self, image, return_tensors="pt"):
        self.seen.append((image.size, image.getpixel((0, 0))))
        pixels = torch.from_numpy(np.asarray(image.resize((8, 8)), dtype=np.float32))
        return {"pixel_values": pixels.permute(2, 0, 1).unsqueeze(0) / 255.0}


def test_process_images_pad_fills_with_processor_mean_and_stacks():
    processor = _FakeProcessor()
    images = [Image.new("RGB", (20, 10), (255, 255, 255)), Image.new("RGB", (10, 10), (255, 255, 255))]
    out = process_images(images, processor, SimpleNamespace(image_aspect_ratio="pad"))
    assert out.shape == (2, 3, 8, 8)
    assert processor.seen[0] == ((20, 20), (127, 63, 0))


def test_process_images_without_pad_keeps_aspect_ratio():
    processor = _FakeProcessor()
    process_images([Image.new("RGB", (20, 10), (255, 255, 255))], processor, SimpleNamespace())
    assert processor.seen[0] == ((20, 10), (255, 255, 255))


def _criteria(tokenizer, prompt_ids, keywords=("<|im_end|>",)):
    return KeywordsStoppingCriteria(list(keywords), tokenizer, prompt_ids)


def test_keywords_stopping_criteria_stops_on_generated_keyword(tokenizer):
    prompt = torch.tensor([tokenizer("What is it?").input_ids])
    answer = tokenizer("A dog.<|im_end|>").input_ids
    done = _criteria(tokenizer, prompt)(torch.cat([prompt, torch.tensor([answer])], dim=1), None)
    assert done.dtype == torch.bool and done.tolist() == [True]


def test_keywords_stopping_criteria_does_not_stop_before_keyword(tokenizer):
    prompt = torch.tensor([tokenizer("What is it?").input_ids])
    answer = tokenizer("A dog.").input_ids
    done = _criteria(tokenizer, prompt)(torch.cat([prompt, torch.tensor([answer])], dim=1), None)
    assert done.tolist() == [False]


def test_keywords_stopping_criteria_ignores_keyword_in_prompt(tokenizer):
    prompt = torch.tensor([tokenizer("Hi<|im_end|>").input_ids])
    assert _criteria(tokenizer, prompt)(prompt, None).tolist() == [False]


def test_keywords_stopping_criteria_matches_keyword_spelled_with_other_tokens(tokenizer):
    prompt = torch.tensor([tokenizer("Q").input_ids])
    # "###" tokenised one character at a time still ends with the keyword.
    hashes = [tokenizer.convert_tokens_to_ids("#")] * 3
    seq = torch.cat([prompt, torch.tensor([tokenizer("ok").input_ids + hashes])], dim=1)
    assert _criteria(tokenizer, prompt, keywords=["###"])(seq, None).tolist() == [True]


def test_keywords_stopping_criteria_is_per_sequence(tokenizer):
    prompt = torch.tensor([tokenizer("Q").input_ids] * 2)
    yes = tokenizer("yes").input_ids
    stop = yes + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    go = yes + [tokenizer.convert_tokens_to_ids("!")]
    seq = torch.cat([prompt, torch.tensor([stop, go])], dim=1)
    assert _criteria(tokenizer, prompt)(seq, None).tolist() == [True, False]
