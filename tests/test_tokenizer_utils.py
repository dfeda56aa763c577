import time

import pytest
from transformers import AutoTokenizer

from llava.model.tokenizer_utils import QWEN2_SPECIAL_TOKENS, train_tiny_tokenizer

TEXTS = [
    "What is the red ball doing in the video?",
    "  Leading spaces, tabs\tand\nnew lines\n\n; digits 0123456789 and symbols !@#$%^&*()[]{}<>~`|\\/",
    "It's 12:30 -- they'll say \"yes\".",
    "Rare words: zygomorphic quixotic xylophone.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def test_trains_in_under_ten_seconds():
    start = time.perf_counter()
    train_tiny_tokenizer()
    assert time.perf_counter() - start < 10


def test_vocab_size_matches_request(tokenizer):
    assert len(tokenizer) == 512


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in QWEN2_SPECIAL_TOKENS]
    assert len(set(ids)) == 3 and tokenizer.unk_token_id not in ids
    for token, token_id in zip(QWEN2_SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]


def test_special_tokens_are_not_split_inside_text(tokenizer):
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer("ab<|im_start|>user\ncd<|im_end|>ef").input_ids
    assert ids.count(im_start) == 1 and ids.count(im_end) == 1


def test_qwen2_token_roles(tokenizer):
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.unk_token is None and tokenizer.bos_token is None


def test_no_special_tokens_are_added_when_encoding(tokenizer):
    assert tokenizer("hello").input_ids == tokenizer("hello", add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_digits_are_split_one_per_token(tokenizer):
    assert tokenizer.tokenize("2024") == ["2", "0", "2", "4"]


def test_save_and_autotokenizer_reload_gives_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded.chat_template == tokenizer.chat_template


def test_training_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    train_tiny_tokenizer(extra_texts=["purple elephants"]).save_pretrained(first)
    train_tiny_tokenizer(extra_texts=["purple elephants"]).save_pretrained(second)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_extra_texts_shape_the_vocabulary():
    text = "zqzqzqzq " * 50
    plain = train_tiny_tokenizer()
    tuned = train_tiny_tokenizer(extra_texts=[text] * 20)
    assert len(tuned.tokenize(text)) < len(plain.tokenize(text))


def test_model_max_length_is_settable():
    assert train_tiny_tokenizer(model_max_length=128).model_max_length == 128


def test_chat_template_matches_qwen_conversation(tokenizer):
    from llava.conversation import conv_templates

    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is it?")
    conv.append_message(conv.roles[1], None)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nWhat is it?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == conv.get_prompt()


def test_rejects_vocab_smaller_than_byte_alphabet():
    with pytest.raises(ValueError):
        train_tiny_tokenizer(vocab_size=100)
