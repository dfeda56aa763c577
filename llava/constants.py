"""Project-wide constants shared by data, model, serving and evaluation code."""

# Serving heart-beat timings (seconds).
CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15

LOGDIR = "."

# Label value ignored by the cross-entropy loss.
IGNORE_INDEX = -100
# Sentinel id put in `input_ids` where visual features are spliced in; never a real vocabulary id.
IMAGE_TOKEN_INDEX = -200

DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"

# Per-position token types carried alongside the multimodal input embeddings.
TOKEN_TYPE_TEXT = 1  # system prompt and user text
TOKEN_TYPE_RESPONSE = 2  # assistant answer
TOKEN_TYPE_VISUAL = 3  # image / video features
TOKEN_TYPE_PAD = 4  # padding
