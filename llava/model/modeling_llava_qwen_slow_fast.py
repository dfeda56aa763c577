"""``LlavaQwenSlowFastForCausalLM``: Qwen2 with a ConvNeXt tower, a projector, fast tokens in the sequence
and slow tokens read by hybrid decoder layers.

The language model is transformers' Qwen2 (its layers, attention interface, masks and rotary embedding);
this file only adds the vision path, the merge of fast tokens into the text, and the routing of slow tokens
to the hybrid layers (see ``slow_fast.py``, ``hybrid_layer.py`` and ``cache.py``).

Longer than 700 lines because it holds the two model classes transformers expects of a modeling file, the decoder
loop that routes the slow tokens and the causal LM (the vision path, the merge, forward, generation inputs and
cache handling), which share their private helpers; the pieces with one job each live in the modules above.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)
from transformers import initialization as init
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..constants import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TOKEN_TYPE_PAD,
    TOKEN_TYPE_RESPONSE,
    TOKEN_TYPE_TEXT,
    TOKEN_TYPE_VISUAL,
)
from .cache import SlowFastCache, SlowFastStaticCache, SlowKeyValues
from .compat import cache_kwargs, output_cache, take_cache
from .configuration_llava_qwen_slow_fast import CROSS_ATTN_KV_INIT_LAYOUTS, LlavaQwenSlowFastConfig
from .hybrid_layer import SlowCrossAttention, SlowFastAttention, SlowFastDecoderLayer, cross_attn_query_mask
from .packing import prepare_packed_inputs
from .projector import ProjectorLinear, build_projector
from .slow_fast import SlowFastParams, SlowFastTokens, SlowTokenPositionEncoding, match_images_to_tokens, split_slow_fast
from .vision_tower import ConvNeXtVisionTower, _ConvNeXtBlockWeightNamed

logger = logging.getLogger(__name__)


@dataclass
class MultimodalInputs:
    """A batch with the fast tokens merged into the text.

    ``inputs_embeds`` ``[B, L, hidden]``, ``attention_mask``/``position_ids``/``token_types`` ``[B, L]``,
    ``labels`` ``[B, L]`` or None; ``slow_tokens`` ``[B, S, hidden]`` and ``slow_token_mask`` ``[B, S]``
    (None when no sample has visual input); ``cross_attn_query_mask`` ``[B, L]`` bool or None.
    ``truncated_tokens``: text tokens cut from the end of each sample to fit ``max_length`` (all 0 when no
    limit was given or every sample fit).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    token_types: torch.Tensor
    labels: torch.Tensor | None
    slow_tokens: torch.Tensor | None
    slow_token_mask: torch.Tensor | None
    cross_attn_query_mask: torch.Tensor | None
    truncated_tokens: list[int] = field(default_factory=list)

    @property
    def num_fast_tokens(self) -> list[int]:
        return (self.token_types == TOKEN_TYPE_VISUAL).sum(1).tolist()

    @property
    def num_slow_tokens(self) -> list[int]:
        if self.slow_token_mask is None:
            return [0] * self.inputs_embeds.shape[0]
        return self.slow_token_mask.sum(1).tolist()


class LlavaQwenSlowFastPreTrainedModel(Qwen2PreTrainedModel):
    config: LlavaQwenSlowFastConfig
    config_class = LlavaQwenSlowFastConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen2DecoderLayer", "SlowFastDecoderLayer", "ConvNeXtVisionTower"]
    # The reference keeps the tower's unused classifier; its width differs between checkpoints.
    _keys_to_ignore_on_load_unexpected = [r"vision_tower\.vision_tower\.head\.fc\."]
    # Recorded by transformers' output capturing: every layer's output and self-attention weights (eager), and
    # the hybrid layers' cross-attention weights over the slow tokens (eager; requested with output_attentions).
    _can_record_outputs = {
        "hidden_states": Qwen2DecoderLayer,
        "attentions": Qwen2Attention,
        "cross_attentions": OutputRecorder(SlowCrossAttention, index=1),
    }

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        """Checkpoint the ConvNeXt tower's stages too (timm's own switch): without it a long video's tower
        activations dominate a training step's memory."""
        super()._set_gradient_checkpointing(enable, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, ConvNeXtVisionTower):
                module.vision_tower.set_grad_checkpointing(enable)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SlowFastAttention) and module.cross_attn_warm_up_gate is not None:
            init.zeros_(module.cross_attn_warm_up_gate)
        if isinstance(module, _ConvNeXtBlockWeightNamed) and module.gamma is not None:
            init.constant_(module.gamma, 1e-6)
        if isinstance(module, SlowTokenPositionEncoding):
            init.zeros_(module.weight)  # starts as a no-op: a loaded checkpoint computes what it did without it
        if isinstance(module, ProjectorLinear):
            # nn.Linear.reset_parameters, through transformers' init (which leaves loaded weights alone)
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)


class LlavaQwenSlowFastModel(LlavaQwenSlowFastPreTrainedModel):
    """The decoder (``embed_tokens``, ``layers``, ``norm``) plus ``vision_tower`` and ``mm_projector``."""

    def __init__(self, config: LlavaQwenSlowFastConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        hybrid = set(config.hybrid_layer_indices)
        self.layers = nn.ModuleList(
            [
                SlowFastDecoderLayer(config, i) if i in hybrid else Qwen2DecoderLayer(config, i)
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = "sliding_attention" in config.layer_types

        self.vision_tower = ConvNeXtVisionTower(config) if config.mm_vision_tower else None
        if self.vision_tower is not None:
            if config.mm_hidden_size is None:
                config.mm_hidden_size = self.vision_tower.hidden_size
            elif config.mm_hidden_size != self.vision_tower.hidden_size:
                raise ValueError(
                    f"mm_hidden_size={config.mm_hidden_size} does not match the vision tower's width "
                    f"{self.vision_tower.hidden_size} (mm_vision_tower_overrides={config.mm_vision_tower_overrides})"
                )
            self.mm_projector = build_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        self.slow_token_position_encoding = None
        if config.slow_token_position_encoding != "none":
            self.slow_token_position_encoding = SlowTokenPositionEncoding(
                config.slow_token_position_encoding, config.hidden_size
            )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_vision_tower(self) -> ConvNeXtVisionTower | None:
        return self.vision_tower

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        slow_tokens: torch.Tensor | None = None,
        slow_token_mask: torch.Tensor | None = None,
        cross_attn_query_mask: torch.Tensor | None = None,
        cache=None,
        slow_segments=None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """Qwen2's decoder loop; hybrid layers also get ``slow_tokens`` ``[B, S, hidden]``, ``slow_token_mask``
        ``[B, S]`` and ``cross_attn_query_mask`` ``[B, L]`` (None: no cross-attention in this call).

        ``output_hidden_states`` / ``output_attentions`` add ``hidden_states`` (embeddings and every layer),
        ``attentions`` (self-attention weights, ``[B, H, L, L_total]`` per layer) and ``cross_attentions`` (the
        hybrid layers' weights over the slow tokens, ``[B, H, L, S]``); weights need ``attn_implementation="eager"``.
        ``attention_mask`` may be the mask mapping that ``generate`` prepares for a static cache. The cache may be
        passed as ``cache`` or ``past_key_values`` (its name before transformers 5.24) on every release."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = take_cache(cache, past_key_values)
        if use_cache and cache is None:
            cache = SlowFastCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None] + past_seen

        if isinstance(attention_mask, dict):  # already prepared by generate (static cache)
            masks = attention_mask
        else:
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                **cache_kwargs(cache),
            }
            masks = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        common = dict(
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_kwargs(cache),
            **kwargs,
        )
        for i, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            mask = masks[self.config.layer_types[i]]
            if isinstance(layer, SlowFastDecoderLayer):
                hidden_states = layer(
                    hidden_states,
                    slow_tokens,
                    attention_mask=mask,
                    slow_token_mask=slow_token_mask,
                    cross_attn_query_mask=cross_attn_query_mask,
                    slow_segments=slow_segments,
                    **common,
                )
            else:
                hidden_states = layer(hidden_states, attention_mask=mask, **common)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states, **cache_kwargs(cache if use_cache else None)
        )


class LlavaQwenSlowFastForCausalLM(LlavaQwenSlowFastPreTrainedModel, GenerationMixin):
    """The Slow-Fast video LLM.

    ``forward(input_ids, attention_mask, labels, images=[video, ...])`` with each video ``[T, 3, S, S]``
    (an image is ``[3, S, S]`` or ``[1, 3, S, S]``); each ``-200`` in ``input_ids`` takes the next entry of
    ``images``. ``generate(input_ids, images=[...])`` returns only the new tokens.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: LlavaQwenSlowFastConfig) -> None:
        super().__init__(config)
        self.model = LlavaQwenSlowFastModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.slow_fast_params = SlowFastParams.from_config(config)
        self.post_init()

    # -- the names LLaVA code calls -------------------------------------------------------------------
    def get_model(self) -> LlavaQwenSlowFastModel:
        return self.model

    def get_vision_tower(self) -> ConvNeXtVisionTower | None:
        return self.model.vision_tower

    @property
    def hybrid_layers(self) -> list[SlowFastDecoderLayer]:
        return [layer for layer in self.model.layers if isinstance(layer, SlowFastDecoderLayer)]

    # -- vision ----------------------------------------------------------------------------------------
    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frames ``[N, 3, S, S]`` -> projected tokens ``[N, g*g, hidden]`` (tower then projector, in chunks
        of ``mm_vision_chunk_frames`` so that peak activation memory does not grow with ``N``)."""
        tower = self.get_vision_tower()
        if tower is None:
            raise ValueError("this model has no vision tower (mm_vision_tower is None)")
        chunk = self.config.mm_vision_chunk_frames or pixel_values.shape[0]
        parts = [self.model.mm_projector(tower(part, chunk_frames=chunk)) for part in pixel_values.split(chunk)]
        return torch.cat(parts, dim=0)

    def encode_images(self, images) -> list[SlowFastTokens]:
        """One [`SlowFastTokens`] per visual item (video ``[T, 3, S, S]`` or image ``[3, S, S]``). With
        ``config.slow_token_position_encoding`` the slow tokens already carry their time and place."""
        items = _as_frame_stacks(images)
        tower = self.get_vision_tower()
        size = tower.spec.image_size
        for i, item in enumerate(items):
            if item.shape[-3:] != (3, size, size):
                raise ValueError(
                    f"images[{i}] has shape {tuple(item.shape)}; expected [frames, 3, {size}, {size}] "
                    f"(preprocess it with the model's image processor)"
                )
        frames = torch.cat(items, 0).to(device=tower.device, dtype=tower.dtype)
        features = self.encode_frames(frames).split([item.shape[0] for item in items])
        tokens = [split_slow_fast(f, self.slow_fast_params) for f in features]
        encoding = self.model.slow_token_position_encoding
        if encoding is not None:
            for t in tokens:
                t.slow = encoding(t.slow, t.slow_positions)
        return tokens

    # -- merging fast tokens into the text -------------------------------------------------------------
    def prepare_multimodal_inputs(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images=None,
        visual_tokens: list[SlowFastTokens] | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> MultimodalInputs:
        """Replace each ``-200`` by its fast tokens and gather the slow tokens of each sample.

        ``input_ids``/``attention_mask``/``labels`` ``[B, L]`` (either padding side); the result is padded
        on ``padding_side`` (default ``config.tokenizer_padding_side``; generation uses ``left``).
        ``max_length`` (generation passes ``config.tokenizer_model_max_length``) bounds each merged sample:
        see :func:`truncate_merged`.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        batch = input_ids.shape[0]
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.to(device=device, dtype=torch.bool)
        num_image_tokens = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        if visual_tokens is None:
            visual_tokens = self.encode_images(match_images_to_tokens(images, num_image_tokens)) if num_image_tokens else []
        if len(visual_tokens) != num_image_tokens:
            raise ValueError(
                f"the batch has {num_image_tokens} <image> tokens but {len(visual_tokens)} images/videos were given"
            )

        embed = self.get_input_embeddings()
        text_embeds = embed(input_ids.clamp(min=0))
        hidden = text_embeds.shape[-1]
        visual = iter(visual_tokens)
        rows = []  # (embeds [l, h], labels [l], types [l], slow [s, h] | None)
        for b in range(batch):
            keep = attention_mask[b]
            ids, embeds = input_ids[b][keep], text_embeds[b][keep]
            lab = labels[b][keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            types = torch.where(lab == IGNORE_INDEX, TOKEN_TYPE_TEXT, TOKEN_TYPE_RESPONSE)
            pieces_e, pieces_l, pieces_t, slows = [], [], [], []
            start = 0
            for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist() + [ids.shape[0]]:
                pieces_e.append(embeds[start:pos])
                pieces_l.append(lab[start:pos])
                pieces_t.append(types[start:pos])
                if pos < ids.shape[0]:
                    tokens = next(visual)
                    fast = tokens.fast.to(embeds.dtype)
                    pieces_e.append(fast)
                    pieces_l.append(lab.new_full((fast.shape[0],), IGNORE_INDEX))
                    pieces_t.append(types.new_full((fast.shape[0],), TOKEN_TYPE_VISUAL))
                    slows.append(tokens.slow.to(embeds.dtype))
                start = pos + 1
            slow = torch.cat(slows) if slows else None
            rows.append((torch.cat(pieces_e), torch.cat(pieces_l), torch.cat(pieces_t), slow))

        truncated = [0] * batch
        if max_length is not None:
            for b, (e, lab, t, slow) in enumerate(rows):
                keep = truncate_merged(t, max_length)
                if keep < t.shape[0]:
                    truncated[b] = t.shape[0] - keep
                    rows[b] = (e[:keep], lab[:keep], t[:keep], slow)
            if any(truncated):
                logger.warning(
                    "prompt longer than tokenizer_model_max_length=%d (text + fast tokens): cut %s text token(s) "
                    "from the end of sample(s) %s, as the reference does",
                    max_length, ", ".join(str(n) for n in truncated if n), [b for b, n in enumerate(truncated) if n],
                )

        side = padding_side or self.config.tokenizer_padding_side
        max_len = max(r[0].shape[0] for r in rows)
        dtype = text_embeds.dtype
        inputs_embeds = text_embeds.new_zeros(batch, max_len, hidden)
        new_labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.long, device=device)
        token_types = torch.full((batch, max_len), TOKEN_TYPE_PAD, dtype=torch.long, device=device)
        new_mask = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        max_slow = max((r[3].shape[0] for r in rows if r[3] is not None), default=0)
        slow_tokens = inputs_embeds.new_zeros(batch, max_slow, hidden) if max_slow else None
        slow_mask = torch.zeros(batch, max_slow, dtype=torch.bool, device=device) if max_slow else None
        for b, (e, lab, t, slow) in enumerate(rows):
            n = e.shape[0]
            span = slice(max_len - n, max_len) if side == "left" else slice(0, n)
            inputs_embeds[b, span] = e.to(dtype)
            new_labels[b, span] = lab
            token_types[b, span] = t
            new_mask[b, span] = 1
            if slow is not None and slow.shape[0]:
                slow_tokens[b, : slow.shape[0]] = slow
                slow_mask[b, : slow.shape[0]] = True
        position_ids = (new_mask.cumsum(1) - 1).clamp(min=0)
        query_mask = None
        if slow_mask is not None:
            query_mask = cross_attn_query_mask(token_types, self.config.cross_attn_implementation, slow_mask.any(1))
        return MultimodalInputs(
            inputs_embeds=inputs_embeds,
            attention_mask=new_mask,
            position_ids=position_ids,
            token_types=token_types,
            labels=new_labels if labels is not None else None,
            slow_tokens=slow_tokens,
            slow_token_mask=slow_mask,
            cross_attn_query_mask=query_mask,
            truncated_tokens=truncated,
        )

    # -- forward / generate ----------------------------------------------------------------------------
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images=None,
        image_sizes=None,
        modalities=None,
        slow_tokens: torch.Tensor | None = None,
        slow_token_mask: torch.Tensor | None = None,
        cross_attn_query_mask: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        packed_sample_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        """Logits ``[B, L', vocab]`` over the merged sequence (text with fast tokens) and the loss on ``labels``.

        With ``images``, ``input_ids`` holds ``-200`` placeholders; ``labels`` are aligned to ``input_ids``
        and re-aligned to the merged sequence. During generation the prompt's multimodal inputs arrive
        already merged (``inputs_embeds``, ``slow_tokens``, ``slow_token_mask``, ``cross_attn_query_mask``).
        ``packed_sample_ids`` ``[B, L]`` (training with ``--packing``): the rows hold several samples each, numbered
        ``1..n`` (0 on padding), each computed as if alone (:mod:`llava.model.packing`).
        The cache may be passed as ``cache`` or ``past_key_values`` (its name before transformers 5.24).
        """
        cache = take_cache(cache, past_key_values)
        slow_segments = None
        if packed_sample_ids is not None:
            packed = prepare_packed_inputs(self, input_ids, packed_sample_ids, labels, images, cache)
            input_ids, inputs_embeds, attention_mask = None, packed.inputs_embeds, None
            position_ids, labels, use_cache = packed.position_ids, packed.labels, False
            slow_tokens, slow_token_mask = packed.slow_tokens, packed.slow_token_mask
            cross_attn_query_mask, slow_segments = packed.cross_attn_query_mask, packed.slow_segments
            kwargs.update(packed.attention_kwargs)
        elif images is not None and inputs_embeds is None and input_ids is not None:
            mm = self.prepare_multimodal_inputs(input_ids, attention_mask, labels, images)
            input_ids, inputs_embeds, attention_mask, position_ids = None, mm.inputs_embeds, mm.attention_mask, mm.position_ids
            labels = mm.labels
            slow_tokens, slow_token_mask, cross_attn_query_mask = mm.slow_tokens, mm.slow_token_mask, mm.cross_attn_query_mask

        if self.training and slow_tokens is None and self.get_vision_tower() is not None:
            inputs_embeds, slow_tokens, slow_token_mask, cross_attn_query_mask = self._dummy_visual_path(
                input_ids, inputs_embeds
            )
            input_ids = None

        if slow_token_mask is not None and _is_decode_step(cache):
            # decode step: new tokens are text after the visual input
            if self.config.cross_attn_decode_mode == "reference":
                cross_attn_query_mask = None  # the reference zeroes decode-time cross-attention
            else:
                length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
                cross_attn_query_mask = slow_token_mask.any(1, keepdim=True).expand(-1, length)

        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            slow_tokens=slow_tokens,
            slow_token_mask=slow_token_mask,
            cross_attn_query_mask=cross_attn_query_mask,
            slow_segments=slow_segments,
            **kwargs,
        )
        hidden_states = _keep_positions(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithCrossAttentions(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions,
            **cache_kwargs(output_cache(outputs)),
        )

    def _dummy_visual_path(self, input_ids, inputs_embeds):
        """Run the vision path on one blank frame and add it with weight zero.

        A training batch without visual input would otherwise skip the tower, projector and ``cross_attn_*``
        parameters: the loss of a stage-1 batch would have no gradient, and under ZeRO-3 the ranks would
        disagree on which parameters to gather.
        """
        tower = self.get_vision_tower()
        size = tower.spec.image_size
        # The tower before the embeddings, in the order of a batch with visual input: under ZeRO-3 every rank
        # must gather the same parameters in the same order, whichever kind of batch it got.
        tokens = self.encode_images([torch.zeros(1, 3, size, size, device=tower.device, dtype=tower.dtype)])[0]
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds = inputs_embeds + 0.0 * tokens.fast.sum().to(inputs_embeds.dtype)
        batch = inputs_embeds.shape[0]
        slow = tokens.slow.to(inputs_embeds.dtype)[None].expand(batch, -1, -1)
        slow_mask = torch.zeros(slow.shape[:2], dtype=torch.bool, device=slow.device)
        query_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        return inputs_embeds, slow, slow_mask, query_mask

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        images=None,
        image_sizes=None,
        modalities=None,
        visual_tokens: list[SlowFastTokens] | None = None,
        **kwargs,
    ):
        """LLaVA-style ``generate(input_ids, images=[video])``: returns only the new tokens ``[B, N]``.

        Batches are left-padded after the fast tokens are merged, so prompts and videos of different lengths
        can share a batch. ``visual_tokens`` (from [`encode_images`]) skips re-encoding the video. A prompt
        longer than ``config.tokenizer_model_max_length`` (text + fast tokens) loses the end of its text, with
        a warning, as in the reference; the visual tokens are never cut (see :func:`truncate_merged`). A cache
        object may be passed as ``cache`` or ``past_key_values`` (its name before transformers 5.24).
        """
        cache = take_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        if images is None and visual_tokens is None:
            return super().generate(inputs, **kwargs, **cache_kwargs(cache) if cache is not None else {})
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None:
            raise ValueError("generate() with images needs input_ids containing the <image> placeholder (-200)")
        kwargs.pop("position_ids", None)
        if "inputs_embeds" in kwargs:
            raise ValueError("pass input_ids with images, not inputs_embeds")
        attention_mask = kwargs.pop("attention_mask", None)
        mm = self.prepare_multimodal_inputs(
            inputs.to(self.device),
            attention_mask.to(self.device) if attention_mask is not None else None,
            images=images,
            visual_tokens=visual_tokens,
            padding_side="left",
            max_length=self.config.tokenizer_model_max_length,
        )
        if kwargs.get("use_cache", True) and cache is None:
            cache = self._generation_cache(mm.inputs_embeds.shape[1], kwargs)
        if cache is not None:
            kwargs.update(cache_kwargs(cache))
        if mm.slow_tokens is not None:
            kwargs.update(
                slow_tokens=mm.slow_tokens,
                slow_token_mask=mm.slow_token_mask,
                cross_attn_query_mask=mm.cross_attn_query_mask,
            )
        return super().generate(inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, **kwargs)

    def _generation_cache(self, prompt_length: int, kwargs: dict) -> SlowFastCache | SlowFastStaticCache:
        """The cache for a generation with visual input: a [`SlowFastCache`], or with
        ``cache_implementation="static"`` (argument or generation config) a [`SlowFastStaticCache`] sized for the
        prompt plus the new tokens. Pops ``cache_implementation`` from ``kwargs`` (transformers refuses it next
        to a cache object)."""
        config = kwargs.get("generation_config") or self.generation_config
        implementation = kwargs.pop("cache_implementation", None) or getattr(config, "cache_implementation", None)
        if implementation in (None, "dynamic"):
            return SlowFastCache(config=self.config)
        if implementation != "static":
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported with images or videos: use 'dynamic' "
                "(default) or 'static' (fixed shapes, for compiled decoding)"
            )
        new_tokens = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if new_tokens is None:  # max_length counts the prompt's tokens too; an upper bound is enough here
            new_tokens = kwargs.get("max_length", getattr(config, "max_length", None) or 20)
        return SlowFastStaticCache(config=self.config, max_cache_len=prompt_length + int(new_tokens))

    # -- training helpers ------------------------------------------------------------------------------
    def load_vision_tower_weights(self, source: str | None = None) -> None:
        """Load the tower's weights from ``source`` (default ``config.vision_tower_pretrained``): a local
        file in timm, open_clip or reference layout, or a timm pretrained name such as
        ``convnext_xxlarge.clip_laion2b_soup``. Works with ZeRO-3 partitioned parameters."""
        source = source or self.config.vision_tower_pretrained
        if not source:
            raise ValueError("no vision tower weights given: pass a source or set config.vision_tower_pretrained")
        tower = self.get_vision_tower()
        with _gathered(list(tower.parameters())):
            tower.load_pretrained(source)

    def initialize_cross_attn_kv_from_lm(self, layout: str = "per_head") -> None:
        """Start every hybrid layer's ``cross_attn_kv_proj`` from its ``k_proj``/``v_proj`` (and an own
        ``cross_attn_q_proj`` from its ``q_proj``; see
        [`SlowFastAttention.init_cross_attn_kv_from_lm`]). Works with ZeRO-3 partitioned parameters."""
        if layout not in CROSS_ATTN_KV_INIT_LAYOUTS:
            raise ValueError(f"layout={layout!r}: use one of {list(CROSS_ATTN_KV_INIT_LAYOUTS)}")
        for layer in self.hybrid_layers:
            attn = layer.self_attn
            params = [attn.k_proj.weight, attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias]
            params += list(attn.cross_attn_kv_proj.parameters())
            if attn.cross_attn_q_proj is not None:
                params += [attn.q_proj.weight, attn.q_proj.bias, *attn.cross_attn_q_proj.parameters()]
            with _gathered(params):
                attn.init_cross_attn_kv_from_lm(layout)


def truncate_merged(token_types: torch.Tensor, max_length: int) -> int:
    """How many positions of one merged sample (``token_types`` ``[L]``, text with fast tokens) to keep.

    The reference keeps the first ``max_length`` positions of every merged sequence. Here the cut takes only
    text after the last visual token, as training does (``llava.train.data.truncate_to_budget``): a
    sample that fits is kept whole (``L``), otherwise its first ``max_length`` positions.

    Raises:
        ValueError: ``max_length`` is not positive, or it cannot hold the sample up to the end of its last
            visual token (cutting there would feed the model part of a video; use fewer frames).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    length = int(token_types.shape[0])
    if length <= max_length:
        return length
    visual = (token_types == TOKEN_TYPE_VISUAL).nonzero().flatten()
    needed = int(visual[-1]) + 1 if len(visual) else 1
    if needed > max_length:
        raise ValueError(
            f"the prompt takes {length} positions (text + fast tokens) but tokenizer_model_max_length is "
            f"{max_length}, which cannot hold it up to the end of its visual tokens ({needed} positions); "
            "sample fewer frames"
        )
    return max_length


def _keep_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of ``hidden_states`` ``[B, L, hidden]`` whose logits are wanted: an int keeps the last
    ``logits_to_keep`` (0 keeps all), a tensor names positions (as Qwen2's own ``forward`` reads it).

    transformers 5.23 moved this into ``modeling_utils.slice_logits_to_keep`` (which also takes 2-D tensors);
    that name does not exist before 5.23, so the forms ``generate`` passes are handled here for every version.
    """
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
    if logits_to_keep.dim() == 1:
        return hidden_states[:, logits_to_keep]
    if logits_to_keep.dtype == torch.bool:  # [B, L] mask: the kept rows, flattened to [N, hidden]
        return hidden_states[logits_to_keep]
    return torch.gather(  # [B, K] positions per sample
        hidden_states, 1, logits_to_keep[..., None].expand(-1, -1, hidden_states.shape[-1])
    )


def _is_decode_step(cache) -> bool:
    """Whether this call extends a prompt already in ``cache``. A slow-fast cache says so without reading a tensor
    (a compiled decoding step must not sync on ``get_seq_length``)."""
    if cache is None:
        return False
    if isinstance(cache, SlowKeyValues) and cache.has_slow:
        return True
    return cache.get_seq_length() > 0


def _gathered(params):
    """DeepSpeed ZeRO-3 gathers partitioned parameters for an in-place edit; otherwise a no-op context."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    from contextlib import nullcontext

    return nullcontext()


def _as_frame_stacks(images) -> list[torch.Tensor]:
    """Normalise ``images`` to a list of ``[T, 3, H, W]`` tensors."""
    if isinstance(images, torch.Tensor):
        images = [images] if images.dim() in (3, 4) else list(images)
    items = []
    for i, item in enumerate(images):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"images[{i}] is a {type(item).__name__}; expected a tensor [frames, 3, H, W]")
        if item.dim() == 3:
            item = item[None]
        if item.dim() != 4 or item.shape[0] == 0:
            raise ValueError(f"images[{i}] has shape {tuple(item.shape)}; expected [frames, 3, H, W] with frames >= 1")
        items.append(item)
    return items
