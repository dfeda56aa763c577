"""The released checkpoints' usage, written against this package's LLaVA-compatible API.

Same calls as the model cards (``load_pretrained_model``, ``conv_templates["qwen_1_5"]``,
``tokenizer_image_token``, ``image_processor.preprocess`` on decoded frames, ``model.generate(input_ids,
images=[video], ...)``). Tensors go to ``model.device``, so it runs on a GPU and on a CPU alike; the
model casts the half-precision video to its own dtype. Run: ``python playground/model_card_snippet.py``.
"""

import os

import numpy as np
import torch

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import get_model_name_from_path, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.utils import disable_torch_init
from llava.video import load_video

model_path = "shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame64-s1t4"
video_path = "assets/catinterrupt.mp4"
question = "Please describe this video in detail."
max_frames = 64

disable_torch_init()
model_path = os.path.expanduser(model_path)
model_name = get_model_name_from_path(model_path)
tokenizer, model, image_processor, context_len = load_pretrained_model(model_path, None, model_name, use_flash_attn=True)

if model.config.mm_use_im_start_end:
    user_turn = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + question
else:
    user_turn = DEFAULT_IMAGE_TOKEN + "\n" + question
conv = conv_templates["qwen_1_5"].copy()
conv.append_message(conv.roles[0], user_turn)
conv.append_message(conv.roles[1], None)
prompt = conv.get_prompt()

frames: np.ndarray = load_video(video_path, max_frames).frames  # uint8 [T, H, W, 3]
video_tensor = image_processor.preprocess(frames, return_tensors="pt")["pixel_values"].half().to(model.device)
input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0).to(model.device)

with torch.inference_mode():
    output_ids = model.generate(
        input_ids,
        images=[video_tensor],
        do_sample=True,
        temperature=0.2,
        top_p=1.0,
        num_beams=1,
        max_new_tokens=64,
        use_cache=True,
    )
outputs = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
print(f"User input: {question}\n")
print(outputs)
