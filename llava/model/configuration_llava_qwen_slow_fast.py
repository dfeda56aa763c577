"""Configuration of the Slow-Fast video LLM: a Qwen2 config plus the vision, projector, slow/fast and
cross-attention fields of the reference checkpoints (same names, so their ``config.json`` loads as is)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config

SUPPORTED_VISION_TOWERS = ("convnext-576",)
SUPPORTED_PROJECTORS = ("mlp2x_gelu", "linear", "identity")
CROSS_ATTN_DECODE_MODES = ("attend", "reference")
CROSS_ATTN_KV_INIT_LAYOUTS = ("per_head", "reference")
SLOW_TOKEN_POSITION_ENCODINGS = ("none", "fourier", "fourier_spacetime")
CROSS_ATTN_QUERY_SOURCES = ("self_attn", "own")
_OVERRIDE_KEYS = {"depths", "dims", "image_size", "norm_eps", "output_stride"}
_OWN_QUERY_TP_KEY = "layers.*.self_attn.cross_attn_q_proj"
_HYBRID_TP_PLAN = {  # the hybrid layers' projections in the tensor-parallel plan (see base_model_tp_plan)
    "layers.*.self_attn.cross_attn_kv_proj": "colwise",
    _OWN_QUERY_TP_KEY: "colwise",
    "layers.*.self_attn.cross_attn_gate_proj.*": "rowwise",
}


def cross_attn_query_mode(implementation: str) -> str:
    """Map a ``cross_attn_implementation`` name to its query mode.

    Returns ``"text"`` (text tokens query), ``"text_after_visual"`` (text tokens after the sample's first
    visual token) or ``"all"`` (every position). The ``-flashattn`` suffix only picks a kernel.
    """
    if implementation.startswith("text-only-vanilla"):
        return "text_after_visual" if "masksystem" in implementation else "text"
    if implementation.startswith("vanilla"):
        return "all"
    raise ValueError(
        f"cross_attn_implementation={implementation!r} is not supported: use a name starting with "
        "'text-only-vanilla' (optionally with 'masksystem') or 'vanilla', optionally ending in '-flashattn'"
    )


def parse_gating_type(gating_type: str) -> tuple[bool, bool]:
    """Parse ``cross_attn_gating_type`` into ``(use_tanh, use_warmup)``.

    Only the ``whole-dynamic`` family works in the reference: ``whole-dynamic``, ``whole-dynamic-tanh``,
    ``whole-dynamic-warmup`` and ``whole-dynamic-tanh-warmup``. Anything else is refused.
    """
    valid = {
        "whole-dynamic": (False, False),
        "whole-dynamic-tanh": (True, False),
        "whole-dynamic-warmup": (False, True),
        "whole-dynamic-tanh-warmup": (True, True),
    }
    if gating_type not in valid:
        raise ValueError(
            f"cross_attn_gating_type={gating_type!r} is not supported (it does not work in the reference "
            f"either); choose one of {sorted(valid)}"
        )
    return valid[gating_type]


@strict
class LlavaQwenSlowFastConfig(Qwen2Config):
    r"""Configuration of [`LlavaQwenSlowFastForCausalLM`].

    The language-model fields are Qwen2's. The defaults of the multimodal fields are those of the released
    64-frame checkpoint (ConvNeXt-XXL at 576 px, 2x2 video pooling, fast tokens pooled 4x in time, hybrid
    layers every 8 layers).

    Fields beyond the reference's:
        mm_vision_tower_overrides: ``{"depths", "dims", "image_size", "norm_eps", "output_stride"}`` to shrink the tower
            (tiny test models).
        vision_tower_pretrained: local weight file or timm pretrained name for a *new* model's tower.
        mm_vision_chunk_frames: encode at most this many frames at once (bounds peak memory); None = all.
        video_frames: frames per video the model was trained with (the CLI's default ``--max-frames``).
        mm_training_video_frames: the same count under the name the reference's trainer writes; read when
            ``video_frames`` is absent (see :attr:`trained_video_frames`).
        tokenizer_model_max_length: the training length budget (text plus fast tokens); generation cuts a
            longer prompt's text to it, as the reference does.
        cross_attn_decode_mode: ``"attend"`` (decode tokens read the slow tokens, as in training) or
            ``"reference"`` (they do not, which reproduces the reference's outputs).
        slow_token_position_encoding: ``"none"`` (the reference: slow tokens carry no time or place),
            ``"fourier"`` or ``"fourier_spacetime"``: each slow token gets its frame's time (a fraction of the
            clip) and its row and column in the grid, through a learned map that starts at zero (see
            ``llava.model.slow_fast.SlowTokenPositionEncoding``).
        cross_attn_query_source: ``"self_attn"`` (the reference: the hybrid layers query the slow tokens with the
            self-attention's query, after its rotary embedding) or ``"own"``: each hybrid layer has a
            ``cross_attn_q_proj`` of its own, without rotary embedding, so that a query matches a slow key by
            content wherever the text sits (see ``llava.model.hybrid_layer.SlowFastAttention``).
    """

    model_type = "llava_qwen_slow_fast"

    # vision tower and projector
    mm_vision_tower: str | None = "convnext-576"
    mm_vision_tower_overrides: dict | None = None
    vision_tower_pretrained: str | None = None
    mm_vision_select_layer: int = -1
    mm_vision_select_feature: str = "patch"
    mm_hidden_size: int | None = None
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_chunk_frames: int | None = None
    mm_patch_merge_type: str = "flat"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    use_mm_proj: bool = True
    tune_mm_mlp_adapter: bool = False
    image_aspect_ratio: str = "pad"
    tile_image_input: bool = False
    tokenizer_padding_side: str = "right"
    tokenizer_model_max_length: int | None = None

    # slow / fast tokens
    video_frames: int | None = None
    mm_training_video_frames: int | None = None
    mm_video_pooling_stride: int = 2
    fast_token_spatial_stride: int = 1
    fast_token_temporal_stride: int = 4
    fast_token_temporal_sampling_stride: int = 1
    min_fast_frames: int = 16

    # hybrid layers
    cross_attn_every_n_layers: int = 8
    cross_attn_min_layer_depth: int = 0
    cross_attn_max_layer_depth: int | None = None
    cross_attn_implementation: str = "text-only-vanilla-flashattn"
    cross_attn_gating_type: str = "whole-dynamic-tanh-warmup"
    cross_attn_decode_mode: str = "attend"
    slow_token_position_encoding: str = "none"
    cross_attn_query_source: str = "self_attn"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_slow_fast()

    @property
    def trained_video_frames(self) -> int | None:
        """Frames per video the checkpoint was trained with: ``video_frames``, else the reference trainer's
        ``mm_training_video_frames``; None when the config records neither."""
        return self.video_frames or self.mm_training_video_frames

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Qwen2's tensor-parallel plan plus the projections that this configuration's hybrid layers have (none
        without hybrid layers; ``cross_attn_q_proj`` only with ``cross_attn_query_source="own"``), so that every
        entry names modules that exist (transformers reads this where Qwen2 has a class attribute).

        The slow tokens' key/value projection is split by key/value head like ``k_proj``/``v_proj`` (its output is
        laid out per head), an own query by head like ``q_proj``; the gate reads the attention output before
        ``o_proj``, which is split by head, so its partial sums are reduced like ``o_proj``'s. Entries set on the
        configuration are kept (transformers 5.16-5.19 add ``embed_tokens`` when the embeddings are tied).
        """
        plan = dict(Qwen2Config.base_model_tp_plan)
        set_here = self.__dict__.get("base_model_tp_plan") or {}
        plan.update({key: value for key, value in set_here.items() if key not in _HYBRID_TP_PLAN})
        if self.hybrid_layer_indices:
            for key, value in _HYBRID_TP_PLAN.items():
                if key != _OWN_QUERY_TP_KEY or self.cross_attn_query_source == "own":
                    plan[key] = value
        return plan

    @base_model_tp_plan.setter
    def base_model_tp_plan(self, plan: dict[str, str] | None) -> None:
        # kept in the instance under the name transformers leaves out of config.json
        self.__dict__["base_model_tp_plan"] = dict(plan or {})

    @property
    def hybrid_layer_indices(self) -> list[int]:
        """Indices of the decoder layers that cross-attend to the slow tokens."""
        stop = self.num_hidden_layers if self.cross_attn_max_layer_depth is None else self.cross_attn_max_layer_depth
        stop = min(stop, self.num_hidden_layers)
        return list(range(self.cross_attn_min_layer_depth, stop, self.cross_attn_every_n_layers))

    def validate_slow_fast(self) -> None:
        """Check the multimodal fields; raise ``ValueError`` naming the first bad one."""

        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{type(self).__name__}.{field}={getattr(self, field)!r}: {why}")

        if self.mm_vision_tower is not None and self.mm_vision_tower not in SUPPORTED_VISION_TOWERS:
            raise bad("mm_vision_tower", f"unsupported vision tower; supported: {list(SUPPORTED_VISION_TOWERS)}")
        if self.mm_vision_tower_overrides is not None:
            unknown = set(self.mm_vision_tower_overrides) - _OVERRIDE_KEYS
            if unknown:
                raise bad("mm_vision_tower_overrides", f"unknown keys {sorted(unknown)}; allowed {sorted(_OVERRIDE_KEYS)}")
            ov = self.mm_vision_tower_overrides
            if ("depths" in ov) != ("dims" in ov) or ("depths" in ov and len(ov["depths"]) != len(ov["dims"])):
                raise bad("mm_vision_tower_overrides", "'depths' and 'dims' must be given together, of equal length")
            stride = ov.get("output_stride", 32)
            if stride not in (8, 16, 32):
                raise bad("mm_vision_tower_overrides", "'output_stride' must be 8, 16 or 32")
            if "image_size" in ov and (not isinstance(ov["image_size"], int) or ov["image_size"] % stride):
                raise bad("mm_vision_tower_overrides", f"'image_size' must be an int divisible by the output stride {stride}")
        if self.mm_projector_type not in SUPPORTED_PROJECTORS:
            raise bad("mm_projector_type", f"supported: {list(SUPPORTED_PROJECTORS)}")
        if self.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise bad("mm_vision_select_feature", "must be 'patch' or 'cls_patch'")
        if self.mm_vision_chunk_frames is not None and self.mm_vision_chunk_frames < 1:
            raise bad("mm_vision_chunk_frames", "must be a positive number of frames or None")
        for field in (
            "mm_video_pooling_stride",
            "fast_token_spatial_stride",
            "fast_token_temporal_stride",
            "fast_token_temporal_sampling_stride",
            "min_fast_frames",
            "cross_attn_every_n_layers",
            "cross_attn_min_layer_depth",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(field, f"must be an integer, got {type(value).__name__}")
            if value < (0 if field == "cross_attn_min_layer_depth" else 1):
                raise bad(field, "must be >= 1" if field != "cross_attn_min_layer_depth" else "must be >= 0")
        optional_counts = ("video_frames", "mm_training_video_frames", "tokenizer_model_max_length")
        for field in ("cross_attn_max_layer_depth", "mm_vision_chunk_frames", *optional_counts):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise bad(field, f"must be an integer or None, got {type(value).__name__}")
        for field in ("cross_attn_implementation", "cross_attn_gating_type", "cross_attn_decode_mode", "mm_projector_type"):
            if not isinstance(getattr(self, field), str):
                raise bad(field, "must be a string")
        for field in optional_counts:
            if getattr(self, field) is not None and getattr(self, field) < 1:
                raise bad(field, "must be >= 1 or None")
        if self.cross_attn_max_layer_depth is not None and self.cross_attn_max_layer_depth < 0:
            raise bad("cross_attn_max_layer_depth", "must be >= 0 or None")
        try:
            cross_attn_query_mode(self.cross_attn_implementation)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}.{err}") from None
        try:
            parse_gating_type(self.cross_attn_gating_type)
        except ValueError as err:
            raise ValueError(f"{type(self).__name__}.{err}") from None
        if self.cross_attn_decode_mode not in CROSS_ATTN_DECODE_MODES:
            raise bad("cross_attn_decode_mode", f"must be one of {list(CROSS_ATTN_DECODE_MODES)}")
        if self.slow_token_position_encoding not in SLOW_TOKEN_POSITION_ENCODINGS:
            raise bad("slow_token_position_encoding", f"must be one of {list(SLOW_TOKEN_POSITION_ENCODINGS)}")
        if self.cross_attn_query_source not in CROSS_ATTN_QUERY_SOURCES:
            raise bad("cross_attn_query_source", f"must be one of {list(CROSS_ATTN_QUERY_SOURCES)}")
        if self.image_aspect_ratio not in ("pad", "square", "original", "resize"):
            raise bad("image_aspect_ratio", "must be 'pad' or 'square' (others are treated as 'square')")
        if self.tokenizer_padding_side not in ("left", "right"):
            raise bad("tokenizer_padding_side", "must be 'left' or 'right'")


__all__ = ["LlavaQwenSlowFastConfig", "cross_attn_query_mode", "parse_gating_type"]
