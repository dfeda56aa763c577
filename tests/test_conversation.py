from llava.conversation import Conversation, SeparatorStyle, conv_templates, default_conversation

QUESTION = "What is the man doing?"
SYSTEM_BLOCK = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _qwen() -> Conversation:
    return conv_templates["qwen_1_5"].copy()


def test_qwen_1_5_single_turn_prompt_is_byte_exact():
    conv = _qwen()
    conv.append_message(conv.roles[0], f"<image>\n{QUESTION}")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        f"{SYSTEM_BLOCK}<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_1_5_filled_answer_is_closed_with_im_end():
    conv = _qwen()
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], "He is running.")
    assert conv.get_prompt().endswith("<|im_start|>assistant\nHe is running.<|im_end|>\n")


def test_qwen_1_5_two_turn_prompt_is_byte_exact():
    conv = _qwen()
    conv.append_message(conv.roles[0], f"<image>\n{QUESTION}")
    conv.append_message(conv.roles[1], "He is running.")
    conv.append_message(conv.roles[0], "Where?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        f"{SYSTEM_BLOCK}"
        f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\nHe is running.<|im_end|>\n"
        "<|im_start|>user\nWhere?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen_2_is_an_alias_of_qwen_1_5():
    assert conv_templates["qwen_2"] is conv_templates["qwen_1_5"]


def test_default_conversation_is_qwen_chatml():
    assert default_conversation.sep_style == SeparatorStyle.CHATML
    assert default_conversation.sep == "<|im_end|>"


def test_tuple_message_renders_only_its_text():
    with_tuple, with_text = _qwen(), _qwen()
    with_tuple.append_message(with_tuple.roles[0], (f"<image>\n{QUESTION}", object(), "Default"))
    with_text.append_message(with_text.roles[0], f"<image>\n{QUESTION}")
    assert with_tuple.get_prompt() == with_text.get_prompt()


def test_copy_does_not_share_messages_with_template():
    conv = _qwen()
    conv.append_message(conv.roles[0], "hi")
    assert conv_templates["qwen_1_5"].messages == []


def test_dict_is_json_friendly_and_drops_images():
    conv = _qwen()
    conv.append_message(conv.roles[0], ("hi", object(), "Default"))
    d = conv.dict()
    assert d["messages"] == [["<|im_start|>user", "hi"]]
    assert d["sep_style"] == "CHATML"
    assert d["system"] == "You are a helpful assistant."


def test_plain_template_concatenates_messages():
    conv = conv_templates["plain"].copy()
    conv.append_message(conv.roles[0], "<image>")
    conv.append_message(conv.roles[1], "a caption")
    assert conv.get_prompt() == "<image>\na caption\n"


def test_two_style_alternates_separators():
    conv = conv_templates["vicuna_v1"].copy()
    conv.system = "S"
    conv.append_message("USER", "q")
    conv.append_message("ASSISTANT", "a")
    conv.append_message("USER", "q2")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "S USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:"


def test_llama_2_style_wraps_system_and_instructions():
    conv = conv_templates["llava_llama_2"].copy()
    conv.system = "S"
    conv.append_message("USER", "q")
    conv.append_message("ASSISTANT", "a")
    conv.append_message("USER", "q2")
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == "[INST] <<SYS>>\nS\n<</SYS>>\n\nq [/INST] a </s><s>[INST] q2 [/INST]"
