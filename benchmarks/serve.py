"""Serving: requests per second and time to first token through the OpenAI-compatible server, N requests sent
at once against the same N sent one at a time, in one run.

The server (``llava.serve.api``) runs in this process on a free loopback port; the official ``openai`` client
sends streamed chat requests about one video (``assets/demo.mp4``), each with its own question (so the prompts
differ in length and the batch is left-padded). The video is encoded by a warm-up request first, so the
measured requests find it in the server's cache and the comparison is about decoding requests together:
``sequential`` sends request ``i + 1`` when request ``i`` has finished, ``concurrent`` sends all N from N client
threads and the server batches them (``max_batch_size = N``, its default 5 ms batch window). Every answer is
``max_tokens`` long (``ignore_eos``), so both modes generate the same number of tokens.

Time to first token is measured by the client: from the request to the first streamed chunk, which the server
sends once the first token exists. Models: the bundled trained ``assets/tiny-slowfast`` (smoke), the small
shape with random weights (small), the released shape with random weights (released, GPU); the random models
use a tokenizer trained locally, so most of their tokens decode to no text, which changes nothing measured.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from . import serve_vllm
from .common import (
    LM_SHAPES,
    VISION_SHAPES,
    BenchResult,
    Check,
    Column,
    RunContext,
    Table,
    build_model,
    least_disturbed,
    make_config,
    ratio,
    time_requests,
)

NAME = "serve"
TITLE = "Serving: N concurrent vs. one-at-a-time requests through the OpenAI-compatible API"
BUILDS_RELEASED_MODEL = True  # --released-shape builds the 8.5 B model: needs a GPU
REQUESTS = {"smoke": 4, "small": 16, "released": 16}
MAX_TOKENS = {"smoke": 8, "small": 32, "released": 64}
FRAMES = 16  # the demo video has 16 frames
TARGET = 2.0  # concurrent requests/s at least this multiple of sequential (at N = 16)
REPO = Path(__file__).resolve().parents[1]
TINY_CHECKPOINT = REPO / "assets" / "tiny-slowfast"
DEMO_VIDEO = REPO / "assets" / "demo.mp4"
QUESTIONS = (
    "What color is the circle?",
    "How many shapes are there?",
    "Describe what happens in the video.",
    "Which shape moves fastest, and in which direction does it go?",
    "Is there a square?",
    "What is in the top left corner at the end of the video?",
    "Summarise the video in one sentence.",
    "Do any two shapes touch each other at some point in the video, and if so, when?",
)


def _load_model(ctx: RunContext) -> tuple[Any, Any, Any, int, str]:
    """``(tokenizer, model, image_processor, context_len, description)`` for the run's scale."""
    if ctx.scale == "smoke":
        from llava.model.builder import load_pretrained_model

        tokenizer, model, processor, context_len = load_pretrained_model(
            str(TINY_CHECKPOINT), device=ctx.device, torch_dtype=ctx.dtype
        )
        return tokenizer, model, processor, context_len, "assets/tiny-slowfast (trained, 4 layers, hidden 128)"
    from llava.model.tokenizer_utils import train_tiny_tokenizer

    lm, vision = LM_SHAPES[ctx.scale], VISION_SHAPES[ctx.scale]
    tokenizer = train_tiny_tokenizer(vocab_size=min(lm.vocab_size, 4096), model_max_length=lm.max_positions)
    model = build_model(make_config(lm, vision, video_frames=FRAMES), ctx.device, ctx.dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = model.get_vision_tower().image_processor
    description = (f"{ctx.scale} shape, random weights ({lm.num_layers} layers, hidden {lm.hidden_size}, vocabulary "
                   f"{lm.vocab_size}; ConvNeXt at {vision.image_size} px)")
    return tokenizer, model, processor, lm.max_positions, description


def _messages(index: int, video_url: str) -> list[dict[str, Any]]:
    question = QUESTIONS[index % len(QUESTIONS)]
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_url}},
                                         {"type": "text", "text": question}]}]


def _request(client: Any, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Send one streamed request; returns its time to first chunk, latency, text and generated tokens."""
    start = time.perf_counter()
    first = None
    text, tokens = [], 0
    stream = client.chat.completions.create(
        model="bench", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    with stream:
        for chunk in stream:
            if first is None:
                first = time.perf_counter()
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"ttft_s": (first or end) - start, "latency_s": end - start, "text": "".join(text), "tokens": tokens}


def _measure(mode: str, client: Any, requests: list[list[dict[str, Any]]], max_tokens: int,
             engine: Any) -> dict[str, Any]:
    """Send ``requests`` one at a time (``sequential``) or all at once (``concurrent``); the row counts the
    engine's batches too."""
    batches_before = engine.stats["batches"]
    engine.stats["largest_batch"] = 0
    row = time_requests(mode, lambda messages: _request(client, messages, max_tokens), requests)
    row.update(batches=engine.stats["batches"] - batches_before, largest_batch=engine.stats["largest_batch"])
    return row


def run(ctx: RunContext) -> BenchResult:
    """Serve the scale's model and time N streamed requests sent one at a time, then all at once."""
    import base64

    import openai

    from llava.serve.api import ChatServer, ServerOptions, create_app, serve_in_thread
    from llava.serve.batching import BatchingEngine

    start = time.perf_counter()
    count, max_tokens = REQUESTS[ctx.scale], MAX_TOKENS[ctx.scale]
    tokenizer, model, processor, context_len, description = _load_model(ctx)
    engine = BatchingEngine(model, tokenizer, max_batch_size=count)
    options = ServerOptions(model_name="bench", max_frames=FRAMES, max_tokens=max_tokens)
    server = ChatServer(tokenizer, model, processor, context_len, options, engine=engine)
    video_url = "data:video/mp4;base64," + base64.b64encode(DEMO_VIDEO.read_bytes()).decode()
    requests = [_messages(i, video_url) for i in range(count)]
    runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
    with serve_in_thread(create_app(server)) as url, openai.OpenAI(
        base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600
    ) as client:
        ctx.log(f"  warm-up: encoding the video, {count} requests of {max_tokens} tokens per mode")
        _request(client, requests[0], max_tokens)
        _measure("concurrent", client, requests[:2], max_tokens, engine)  # first batched generate
        for _ in range(ctx.repeats):
            for mode, results in runs.items():  # interleaved, so drift in the machine's load hits both alike
                result = _measure(mode, client, requests, max_tokens, engine)
                results.append(result)
                ctx.log(f"  {mode}: {result['requests_per_s']:.2f} requests/s, time to first token "
                        f"{result['ttft_ms_mean']:.0f} ms mean, {result['batches']} batch(es)")
    rows = least_disturbed(runs)
    sequential, concurrent_row = rows
    # vLLM beside it: same checkpoint, same requests, same modes (benchmarks/serve_vllm.py)
    vllm_rows, vllm_notes = serve_vllm.measure(ctx, model, tokenizer, requests, max_tokens, _request)
    rows += vllm_rows
    best_seq = min(runs["sequential"], key=lambda r: r["wall_s"])
    best_con = min(runs["concurrent"], key=lambda r: r["wall_s"])
    same = sum(a == b for a, b in zip(best_seq["texts"], best_con["texts"]))
    gain = ratio(concurrent_row["requests_per_s"], sequential["requests_per_s"])
    ttft_ratio = ratio(concurrent_row["ttft_ms_mean"], sequential["ttft_ms_mean"])
    summary = {
        "sequential_requests_per_s": sequential["requests_per_s"],
        "concurrent_requests_per_s": concurrent_row["requests_per_s"],
        "concurrent_vs_sequential_requests_per_s": gain,
        "sequential_ttft_ms": sequential["ttft_ms_mean"],
        "concurrent_ttft_ms": concurrent_row["ttft_ms_mean"],
        "concurrent_vs_sequential_ttft": ttft_ratio,
        "identical_answers": float(same),
    }
    for row in vllm_rows:
        key = row["mode"].replace(" ", "_")
        summary[f"{key}_requests_per_s"] = row["requests_per_s"]
        summary[f"{key}_ttft_ms"] = row["ttft_ms_mean"]
    checks = [
        Check(
            target=f"{count} concurrent requests served at least {TARGET:g}x the requests/s of one at a time",
            measured=gain,
            limit=TARGET,
            met=gain is not None and gain >= TARGET,
            reading=(f"{concurrent_row['requests_per_s']:.2f} vs {sequential['requests_per_s']:.2f} requests/s "
                     f"({gain:.2f}x) in {concurrent_row['batches']} batch(es) of up to "
                     f"{concurrent_row['largest_batch']}"),
            at_least=True,
        )
    ]
    notes = [
        f"Model: {description}; {ctx.dtype_name} on {ctx.device_name}.",
        f"{count} streamed requests of exactly {max_tokens} new tokens (ignore_eos) about one {FRAMES}-frame video "
        "(already encoded by a warm-up request: every measured request hits the video cache), each with its own "
        "question; greedy decoding.",
        "Time to first token: client-side, from sending the request to the first streamed chunk; mean over the "
        "requests of a run. Wall time: from the first request sent to the last answer received. Best run of "
        f"{ctx.repeats} by wall time (medians in results.json).",
        f"Greedy answers identical in both modes for {same} of {count} requests (batching left-pads the prompts; "
        "a difference comes from floating-point sums in another order, not from the prompts).",
        "Concurrent requests arriving within the server's 5 ms batch window share a batch; later ones join the "
        "next batch (the table gives how many batches the run took).",
        *vllm_notes,
    ]
    return BenchResult(
        name=NAME,
        title=TITLE,
        device=ctx.device_name,
        scale=ctx.scale,
        setup=dict(model=description, requests=count, max_tokens=max_tokens, frames=FRAMES,
                   max_batch_size=count, batch_window_ms=engine.batch_window_s * 1000, dtype=ctx.dtype_name,
                   repeats=ctx.repeats),
        tables=[
            Table(
                title=f"{count} requests, {max_tokens} tokens each, {ctx.scale} shape, {ctx.device_name}",
                columns=[
                    Column("mode", "mode"),
                    Column("requests_per_s", "requests/s", "{:.2f}"),
                    Column("tokens_per_s", "tokens/s", "{:.1f}"),
                    Column("ttft_ms_mean", "time to first token, mean ms", "{:.0f}"),
                    Column("ttft_ms_median", "median ms", "{:.0f}"),
                    Column("ttft_ms_max", "max ms", "{:.0f}"),
                    Column("latency_ms_mean", "latency, mean ms", "{:.0f}"),
                    Column("wall_s", "wall s", "{:.2f}"),
                    Column("batches", "batches"),
                    Column("largest_batch", "largest batch"),
                ],
                rows=rows,
            )
        ],
        summary=summary,
        checks=checks,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
