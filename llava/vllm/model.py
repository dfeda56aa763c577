"""``LlavaQwenSlowFastForCausalLM`` for vLLM: an encoder-decoder model whose encoder is the vision tower and projector
and whose decoder is the Qwen2 language model with hybrid (cross-attending) layers.

The encoder output of one visual item is ``[slow; fast]``: its slow tokens (with their position encoding, when the
config has one), then its fast tokens. The slow rows go to every hybrid layer's paged cross-attention, written once
when the request's prompt runs; the fast rows replace the decoder prompt's fast-token placeholders (see
``processing.py``), the way the transformers model merges them into the text. vLLM runs an encoder-decoder prompt in
one step (no chunked prefill) together with its encoder input, so both happen in that step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    MultiModalEmbeddings,
    SupportsMultiModal,
)
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..constants import DEFAULT_IMAGE_TOKEN
from .convnext import ConvNeXtTower, TowerShape
from .layers import SlowFastDecoderLayer
from .model_parts.configuration_llava_qwen_slow_fast import cross_attn_query_mode
from .model_parts.slow_fast import (
    SlowFastParams,
    SlowTokenPositionEncoding,
    split_slow_fast,
)
from .processing import (
    FRAMES_KEY,
    PIXELS_KEY,
    SlowFastDummyInputsBuilder,
    SlowFastMultiModalProcessor,
    SlowFastProcessingInfo,
    fast_token_id,
)

# Stacked vLLM parameters and the checkpoint weights that fill them (shard ids as vLLM's Qwen2 loader uses them).
_STACKED = (
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)
# Checkpoint weights the model does not use: the tower's classifier head (never run) and RoPE caches.
_UNUSED_PREFIXES = ("model.vision_tower.vision_tower.head.",)


def build_projector(projector_type: str, vision_width: int, hidden: int) -> nn.Module:
    """The projector of ``mm_projector_type`` (same module layout as ``llava.model.projector``): ``[..., vision_width]``
    -> ``[..., hidden]``."""
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    if projector_type == "linear":
        return nn.Linear(vision_width, hidden)
    if projector_type == "identity" and vision_width == hidden:
        return nn.Identity()
    raise ValueError(f"mm_projector_type={projector_type!r} with mm_hidden_size={vision_width}, hidden_size={hidden}")


class SlowFastModel(nn.Module):
    """``embed_tokens``, ``layers``, ``norm``, ``vision_tower``, ``mm_projector`` and the optional
    ``slow_token_position_encoding``: the checkpoint's ``model.*``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        hybrid = set(config.hybrid_layer_indices)
        self.layers = nn.ModuleList(
            [
                (SlowFastDecoderLayer if i in hybrid else Qwen2DecoderLayer)(
                    config, cache_config, quant_config, prefix=f"{prefix}.layers.{i}"
                )
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.mm_vision_tower is None:
            raise ValueError("mm_vision_tower is None: this checkpoint has no vision tower (serve it as plain Qwen2)")
        shape = TowerShape.from_config(config)
        self.vision_tower = ConvNeXtTower(shape)
        width = config.mm_hidden_size or shape.dims[-1]
        if width != shape.dims[-1]:
            raise ValueError(f"mm_hidden_size={width} does not match the vision tower's width {shape.dims[-1]}")
        self.mm_projector = build_projector(config.mm_projector_type, width, config.hidden_size)
        self.slow_token_position_encoding = None
        if config.slow_token_position_encoding != "none":
            self.slow_token_position_encoding = SlowTokenPositionEncoding(
                config.slow_token_position_encoding, config.hidden_size
            )

    def encode(self, pixel_values: torch.Tensor, num_frames: list[int], params: SlowFastParams) -> list[torch.Tensor]:
        """Frames ``[sum T, 3, S, S]`` of several items -> one ``[slow; fast]`` tensor per item."""
        chunk = self.config.mm_vision_chunk_frames or max(pixel_values.shape[0], 1)
        features = torch.cat(
            [self.mm_projector(self.vision_tower(part)) for part in pixel_values.split(chunk)]
        )
        outputs = []
        for item in features.split(num_frames):
            tokens = split_slow_fast(item, params)
            slow = tokens.slow
            if self.slow_token_position_encoding is not None:
                slow = self.slow_token_position_encoding(slow, tokens.slow_positions)
            outputs.append(torch.cat([slow, tokens.fast.to(slow.dtype)]))
        return outputs

    def forward(
        self,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor,
        slow_tokens: torch.Tensor | None,
        query_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        hidden_states, residual = inputs_embeds, None
        for layer in self.layers:
            if isinstance(layer, SlowFastDecoderLayer):
                hidden_states, residual = layer(positions, hidden_states, residual, slow_tokens, query_mask)
            else:
                hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


@MULTIMODAL_REGISTRY.register_processor(
    SlowFastMultiModalProcessor, info=SlowFastProcessingInfo, dummy_inputs=SlowFastDummyInputsBuilder
)
class SlowFastForConditionalGeneration(nn.Module, SupportsMultiModal):
    """The Slow-Fast video LLM in vLLM (architecture name ``LlavaQwenSlowFastForCausalLM``, as in the checkpoints)."""

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality in ("image", "video"):
            return DEFAULT_IMAGE_TOKEN
        raise ValueError(f"modality {modality!r} is not supported: send a video or an image")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = SlowFastModel(vllm_config=vllm_config, prefix="model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.slow_fast_params = SlowFastParams.from_config(config)
        self.query_mode = cross_attn_query_mode(config.cross_attn_implementation)
        self.decode_attends = config.cross_attn_decode_mode == "attend"
        from vllm.tokenizers import cached_tokenizer_from_config

        self.fast_token_id = fast_token_id(config, cached_tokenizer_from_config(vllm_config.model_config))
        self._hybrid = [layer for layer in self.model.layers if isinstance(layer, SlowFastDecoderLayer)]

    def get_language_model(self) -> nn.Module:
        return self.model

    # -- encoder --------------------------------------------------------------------------------------------------
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One ``[slow + fast, hidden]`` tensor per visual item."""
        pixels = kwargs.get(PIXELS_KEY)
        frames = kwargs.get(FRAMES_KEY)
        if pixels is None or frames is None:
            return []
        if isinstance(pixels, (list, tuple)):
            pixels = torch.cat(list(pixels))
        counts = [int(n) for n in (frames.flatten().tolist() if isinstance(frames, torch.Tensor) else frames)]
        return self.model.encode(pixels, counts, self.slow_fast_params)

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The fast tokens are merged in forward, where the encoder outputs arrive (encoder-decoder path).
        return self.model.embed_tokens(input_ids)

    # -- decoder --------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_outputs: list[torch.Tensor] | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        slow_tokens, query_mask = None, None
        # a step of generated tokens only, where the decode rule adds no cross-attention (the reference's): skip it
        requests = self._requests() if encoder_outputs or self.decode_attends else None
        if requests is not None:
            query_start, encoder_lens = requests
            is_fast, first_fast = None, None
            if encoder_outputs:
                inputs_embeds, slow_tokens, is_fast, first_fast = self._merge_prompt_visuals(
                    input_ids, positions, inputs_embeds, encoder_outputs, query_start, encoder_lens
                )
            query_mask = self._query_mask(positions, query_start, encoder_lens, is_fast, first_fast)
        return self.model(positions, inputs_embeds, slow_tokens, query_mask)

    def _requests(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(query_start_loc [R + 1], encoder lengths [R])`` of this step's requests, read from the first hybrid
        layer's cross-attention metadata; None outside a real step (profiling) or without hybrid layers."""
        if not self._hybrid or not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):  # micro-batches: not supported by encoder-decoder models anyway
            metadata = metadata[0] if metadata else None
        if not metadata:
            return None
        cross = metadata.get(self._hybrid[0].self_attn.cross_attn.layer_name)
        if cross is None:
            return None
        return cross.query_start_loc, cross.seq_lens

    def _merge_prompt_visuals(self, input_ids, positions, inputs_embeds, encoder_outputs, query_start, encoder_lens):
        """Put each prompt's fast tokens at its placeholders and gather the slow tokens.

        ``encoder_outputs`` holds one ``[slow; fast]`` tensor per request whose prompt (with a visual item) runs in
        this step, in batch order, as vLLM's cross-attention expects its keys. Returns the embeddings, the slow
        tokens ``[S, hidden]`` (those requests' in batch order), ``is_fast`` ``[T]`` and the first fast position of
        each request (``[R]``, ``T`` where none). A prompt's run starts at position 0 (no chunked prefill).
        """
        starts = query_start.tolist()
        lengths = encoder_lens.tolist()
        first_positions = positions[query_start[:-1]].tolist()
        prompts = [r for r, (p, n) in enumerate(zip(first_positions, lengths)) if p == 0 and n > 0]
        if len(prompts) != len(encoder_outputs):
            raise RuntimeError(
                f"{len(encoder_outputs)} encoder outputs for {len(prompts)} prompts with a visual item in this step"
            )
        num_tokens = inputs_embeds.shape[0]
        is_fast = torch.zeros(num_tokens, dtype=torch.bool, device=inputs_embeds.device)
        first_fast = torch.full((len(lengths),), num_tokens, dtype=torch.long, device=inputs_embeds.device)
        slow_parts = []
        for r, output in zip(prompts, encoder_outputs):
            slow_len = lengths[r]
            fast = output[slow_len:]
            segment = input_ids[starts[r] : starts[r + 1]]
            where = (segment == self.fast_token_id).nonzero().flatten()[: fast.shape[0]] + starts[r]
            if where.numel() != fast.shape[0] or slow_len > output.shape[0]:
                raise RuntimeError(
                    f"request {r} of the step: its prompt has {where.numel()} fast-token positions and "
                    f"{slow_len} slow tokens, its encoder output {output.shape[0]} rows with {fast.shape[0]} fast"
                )
            inputs_embeds[where] = fast.to(inputs_embeds.dtype)
            is_fast[where] = True
            if where.numel():
                first_fast[r] = where[0]
            slow_parts.append(output[:slow_len].to(inputs_embeds.dtype))
        return inputs_embeds, torch.cat(slow_parts), is_fast, first_fast

    def _query_mask(self, positions, query_start, encoder_lens, is_fast, first_fast) -> torch.Tensor:
        """``[T]`` bool: the positions whose hybrid layers add the cross-attention term (as
        ``llava.model.hybrid_layer.cross_attn_query_mask`` and the transformers model's decode rule)."""
        num_tokens = positions.shape[0]
        index = torch.arange(num_tokens, device=positions.device)
        request = torch.searchsorted(query_start[1:], index, right=True).clamp(max=encoder_lens.shape[0] - 1)
        has_slow = encoder_lens[request] > 0
        in_prompt = (positions[query_start[:-1]] == 0)[request]
        if self.query_mode == "all":
            prompt_rows = torch.ones_like(has_slow)
        else:
            prompt_rows = ~is_fast if is_fast is not None else torch.ones_like(has_slow)
            if self.query_mode == "text_after_visual" and first_fast is not None:
                prompt_rows = prompt_rows & (index > first_fast[request])
        decode_rows = torch.full_like(has_slow, self.decode_attends)
        return has_slow & torch.where(in_prompt, prompt_rows, decode_rows)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # -- weights --------------------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a checkpoint saved by the project (or released): names as in the transformers model."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected = []
        for name, tensor in weights:
            if name.startswith(_UNUSED_PREFIXES) or "rotary_emb.inv_freq" in name:
                continue
            if name.startswith("lm_head.") and self.config.tie_word_embeddings:
                continue
            for param_suffix, weight_suffix, shard in _STACKED:
                if weight_suffix in name and "cross_attn" not in name:
                    target = name.replace(weight_suffix, param_suffix)
                    if target in params:
                        params[target].weight_loader(params[target], tensor, shard)
                        loaded.add(target)
                        break
            else:
                if name not in params:
                    unexpected.append(name)
                    continue
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        if unexpected:
            raise ValueError(
                f"the checkpoint does not fit this Slow-Fast config: {len(unexpected)} weights have no place in the "
                f"model, e.g. {unexpected[:3]}"
            )
        missing = sorted(set(params) - loaded - ({"lm_head.weight"} if self.config.tie_word_embeddings else set()))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} weights of this Slow-Fast config, e.g. {missing[:3]}")
        return loaded
