"""The OpenAI-compatible server ``llava.serve.api``, driven by the official ``openai`` client.

Servers run in this process on a free loopback port (``serve_in_thread``), on the bundled trained checkpoint
``assets/tiny-slowfast``, and stop when their test or module ends; every client call has a timeout and no
retries, so nothing here can hang. Expected answers come from :class:`llava.serve.cli.ChatSession` (what the CLI
prints) on the same weights.
"""

from __future__ import annotations

import base64
import contextlib
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai", reason='the API tests need the openai client: pip install -e ".[test]"')
pytest.importorskip("fastapi", reason='the API server needs fastapi: pip install -e ".[serve]"')

from llava.model.builder import load_pretrained_model  # noqa: E402
from llava.serve import api  # noqa: E402
from llava.serve import batching  # noqa: E402
from llava.serve.batching import BatchingEngine  # noqa: E402
from llava.serve.cli import ChatSession, GenerationSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from playground.synthetic_data import write_video  # noqa: E402

CHECKPOINT = REPO / "assets" / "tiny-slowfast"
DEMO_VIDEO = REPO / "assets" / "demo.mp4"
MODEL = "tiny-slowfast"
QUESTION = "What color is the circle?"
MAX_TOKENS = 24
TIMEOUT_S = 60  # per client call: a broken server fails the test instead of hanging it
MAX_BODY = 256 * 1024
MAX_DECODED = 1024 * 1024  # the demo video's 16 frames of 64x64 (192 KiB) and their 64 px pixels (768 KiB) fit;
# 16 frames of 128x128 do not


def data_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def user(*parts: dict | str) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


DEMO_URL = data_url(DEMO_VIDEO.read_bytes())


@pytest.fixture(scope="module")
def weights():
    tokenizer, model, processor, context_len = load_pretrained_model(str(CHECKPOINT), device="cpu")
    return tokenizer, model, processor, context_len


@contextlib.contextmanager
def running_server(weights, engine_kwargs: dict | None = None, **options) -> Iterator[tuple[api.ChatServer, str]]:
    tokenizer, model, processor, context_len = weights
    engine = BatchingEngine(model, tokenizer, **(engine_kwargs or {}))
    settings = dict(model_name=MODEL, max_body_bytes=MAX_BODY, max_decoded_bytes=MAX_DECODED)
    server = api.ChatServer(tokenizer, model, processor, context_len,
                            api.ServerOptions(**{**settings, **options}), engine=engine)
    with api.serve_in_thread(api.create_app(server)) as url:
        yield server, url


def client_for(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "clips").mkdir()
    (root / "clips" / "demo.mp4").write_bytes(DEMO_VIDEO.read_bytes())
    outside = tmp_path_factory.mktemp("outside") / "secret.mp4"
    outside.write_bytes(DEMO_VIDEO.read_bytes())
    (root / "link.mp4").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def served(weights, media_root):
    with running_server(weights, media_root=str(media_root)) as (server, url):
        yield server, client_for(url)


@pytest.fixture
def server(served) -> api.ChatServer:
    return served[0]


@pytest.fixture
def client(served) -> openai.OpenAI:
    return served[1]


def ask(client: openai.OpenAI, messages: list[dict], **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def stream_chunks(client: openai.OpenAI, messages: list[dict], **kwargs) -> list:
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0)
    with client.chat.completions.create(model=MODEL, messages=messages, stream=True, **kwargs) as stream:
        return list(stream)


def streamed_text(chunks: list) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def cli_session(weights, max_new_tokens: int = MAX_TOKENS) -> ChatSession:
    tokenizer, model, processor, context_len = weights
    return ChatSession(tokenizer, model, processor, settings=GenerationSettings(max_new_tokens=max_new_tokens),
                       context_len=context_len)


def refusal(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


# --------------------------------------------------------------------------------------------------- answers


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_video_question_gets_the_clis_greedy_answer_and_its_token_counts(client, weights):
    session = cli_session(weights)
    session.load_video(DEMO_VIDEO)
    expected = session.ask(QUESTION)

    reply = ask(client, [user(video_part(DEMO_URL), QUESTION)])
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "stop"
    split = reply.usage.slowfast
    assert (split["text_tokens"], split["fast_tokens"], split["slow_tokens"]) == (
        expected.text_tokens, expected.fast_tokens, expected.slow_tokens)
    assert reply.usage.prompt_tokens == expected.text_tokens + expected.fast_tokens
    assert reply.usage.completion_tokens == expected.new_tokens


def test_image_question_gets_the_clis_answer(client, weights, tmp_path):
    from PIL import Image

    from llava.video import load_video

    frame = load_video(DEMO_VIDEO, 1).frames[0]
    image = tmp_path / "frame.png"
    Image.fromarray(frame).save(image)
    session = cli_session(weights)
    session.load_video(image)
    expected = session.ask(QUESTION)

    part = {"type": "image_url", "image_url": {"url": data_url(image.read_bytes(), "image/png")}}
    reply = ask(client, [user(part, QUESTION)])
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.slowfast["slow_tokens"] == expected.slow_tokens


def test_multi_turn_history_gets_the_clis_second_answer(client, weights):
    session = cli_session(weights)
    session.load_video(DEMO_VIDEO)
    first = session.ask(QUESTION)
    second = session.ask("How many shapes are there?")

    history = [user(video_part(DEMO_URL), QUESTION), {"role": "assistant", "content": first.text},
               user("How many shapes are there?")]
    assert ask(client, history).choices[0].message.content == second.text


def test_system_message_replaces_the_templates_system_prompt(client, weights):
    session = cli_session(weights)
    session.load_video(DEMO_VIDEO)
    session.conversation.system = "You describe videos of coloured shapes in one word."
    expected = session.ask(QUESTION)

    messages = [{"role": "system", "content": session.conversation.system}, user(video_part(DEMO_URL), QUESTION)]
    reply = ask(client, messages)
    assert reply.usage.slowfast["text_tokens"] == expected.text_tokens
    assert reply.choices[0].message.content == expected.text


def test_max_frames_and_fps_in_the_extra_body_sample_the_video_as_the_cli_does(client, weights):
    session = cli_session(weights)
    video = session.load_video(DEMO_VIDEO, 8, fps=2.0)
    expected = session.ask(QUESTION)

    reply = ask(client, [user(video_part(DEMO_URL), QUESTION)], extra_body={"max_frames": 8, "fps": 2.0})
    split = reply.usage.slowfast
    assert (split["fast_tokens"], split["slow_tokens"]) == (video.fast_tokens, video.slow_tokens)
    assert reply.choices[0].message.content == expected.text


def test_cross_attn_decode_mode_in_the_extra_body_applies_to_that_request_only(client, weights, monkeypatch):
    model = weights[1]
    step = batching.RowTracker.__call__
    seen = []

    def spying_step(self, input_ids, scores=None, **kwargs):
        seen.append(model.config.cross_attn_decode_mode)
        return step(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(batching.RowTracker, "__call__", spying_step)
    default = model.config.cross_attn_decode_mode
    other = "reference" if default == "attend" else "attend"
    ask(client, [user(video_part(DEMO_URL), QUESTION)], extra_body={"cross_attn_decode_mode": other})
    assert seen and set(seen) == {other}
    assert model.config.cross_attn_decode_mode == default


def test_streaming_gives_the_non_streaming_answer_then_a_usage_chunk(client):
    messages = [user(video_part(DEMO_URL), QUESTION)]
    reply = ask(client, messages)
    chunks = stream_chunks(client, messages, stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_text(chunks) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == reply.usage.model_dump()


def test_max_tokens_ends_the_answer_with_finish_reason_length(client):
    reply = ask(client, [user(video_part(DEMO_URL), QUESTION)], max_tokens=5, extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_string_cuts_the_answer_streamed_or_not(client):
    messages = [user(video_part(DEMO_URL), "Describe the video.")]
    long = ask(client, messages, max_tokens=40, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = long[len(long) // 2 : len(long) // 2 + 2]
    expected = long[: long.index(stop)]
    reply = ask(client, messages, max_tokens=40, stop=[stop], extra_body={"ignore_eos": True})
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    chunks = stream_chunks(client, messages, max_tokens=40, stop=stop, extra_body={"ignore_eos": True})
    assert streamed_text(chunks) == expected


def test_seed_makes_sampling_repeatable(client):
    messages = [user(video_part(DEMO_URL), "Describe the video.")]
    answers = [ask(client, messages, temperature=2.0, seed=seed, max_tokens=16).choices[0].message.content
               for seed in (1, 1, 2)]
    assert answers[0] == answers[1]
    assert answers[0] != answers[2]


def test_a_video_sent_twice_is_encoded_once(client, server, encode_spy):
    clip = write_video_bytes(shape=(8, 64, 64), seed=3)  # a video no other test sends
    first = ask(client, [user(video_part(data_url(clip)), QUESTION)])
    second = ask(client, [user(video_part(data_url(clip)), "What moves?")])
    assert len(encode_spy.calls) == 1
    assert (first.usage.slowfast["videos_from_cache"], second.usage.slowfast["videos_from_cache"]) == (0, 1)


# --------------------------------------------------------------------------------------------------- batching


def test_two_concurrent_streams_complete_in_one_batch_with_their_own_answers(weights):
    # a long batch window and a batch of two: the worker waits for the second request, so both share a batch
    engine_kwargs = dict(max_batch_size=2, batch_window_s=30.0)
    questions = (QUESTION, "How many shapes are there?")
    with running_server(weights, engine_kwargs) as (server, url):
        client = client_for(url)
        results: dict[int, list] = {}

        def run(i: int) -> None:
            results[i] = stream_chunks(client, [user(video_part(DEMO_URL), questions[i])])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
        assert server.engine.stats["batches"] == 1 and server.engine.stats["largest_batch"] == 2
    for i, question in enumerate(questions):
        session = cli_session(weights)
        session.load_video(DEMO_VIDEO)
        assert streamed_text(results[i]) == session.ask(question).text
        assert results[i][-1].choices[0].finish_reason == "stop"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(weights, monkeypatch):
    step = batching.RowTracker.__call__
    release = threading.Event()
    steps = []

    def gated_step(self, input_ids, scores=None, **kwargs):  # from the second token on, wait for the test's go
        steps.append(1)
        if len(steps) > 1:
            release.wait(TIMEOUT_S)
        return step(self, input_ids, scores, **kwargs)

    monkeypatch.setattr(batching.RowTracker, "__call__", gated_step)
    with running_server(weights, dict(max_pending=1)) as (server, url):
        client = client_for(url)
        stream = client.chat.completions.create(
            model=MODEL, messages=[user(video_part(DEMO_URL), QUESTION)], max_tokens=300, stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + TIMEOUT_S
        while not any(job.cancelled.is_set() for job in server.engine.running()):
            assert time.monotonic() < deadline, "the server did not notice the disconnect"
            time.sleep(0.01)
        release.set()
        while server.engine.open_jobs:  # ended at its next step
            assert time.monotonic() < deadline, "the cancelled request did not end"
            time.sleep(0.01)
        reply = ask(client, [user(video_part(DEMO_URL), QUESTION)])  # the only slot is free again
        assert reply.choices[0].finish_reason == "stop"
        assert server.engine.stats["cancelled"] == 1
    assert len(steps) < 300


# --------------------------------------------------------------------------------------------------- refusals


def write_video_bytes(shape: tuple[int, int, int], seed: int = 0) -> bytes:
    """An H.264 video of ``shape`` = (frames, height, width), each frame one random colour."""
    frames, height, width = shape
    colors = np.random.default_rng(seed).integers(0, 256, size=(frames, 1, 1, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mp4"
        write_video(np.broadcast_to(colors, (frames, height, width, 3)).copy(), path)
        return path.read_bytes()


BAD_REQUESTS = {
    "undecodable video": (
        lambda: dict(messages=[user(video_part(data_url(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)), "Hi")]),
        400, "messages[0].content[0].video_url: cannot read the video",
    ),
    "not base64": (
        lambda: dict(messages=[user(video_part("data:video/mp4;base64,@@@@"), "Hi")]), 400, "not valid base64",
    ),
    "body too large": (
        lambda: dict(messages=[user(video_part(data_url(bytes(MAX_BODY))), "Hi")]), 413, "request body is over",
    ),
    "too many decoded frames": (
        lambda: dict(messages=[user(video_part(data_url(write_video_bytes((16, 128, 128)))), "Hi")]),
        413, "16 decoded frame(s) of 128x128",
    ),
    "unknown content part type": (
        lambda: dict(messages=[user({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})]),
        400, "unsupported content part type 'input_audio'",
    ),
    "unknown field": (
        lambda: dict(messages=[user("Hi")], extra_body={"max_frame": 4}), 400, "unknown field 'max_frame'",
    ),
    "remote url": (
        lambda: dict(messages=[user(video_part("https://example.com/clip.mp4"), "Hi")]), 400,
        "does not fetch remote URLs",
    ),
    "prompt over the context length": (
        lambda: dict(messages=[user(video_part(DEMO_URL), "word " * 600)]), 400, "beyond this model's context length",
    ),
    "answer over the context length": (
        lambda: dict(messages=[user(video_part(DEMO_URL), QUESTION)], max_tokens=5000), 400, "does not fit",
    ),
    "frames over the limit": (
        lambda: dict(messages=[user(video_part(DEMO_URL), QUESTION)], extra_body={"max_frames": 10_000}), 400,
        "over this server's limit",
    ),
    "n above one": (lambda: dict(messages=[user("Hi")], n=2), 400, "one choice per request"),
    "unknown model": (lambda: dict(messages=[user("Hi")], model="gpt-4o"), 404, "'gpt-4o' does not exist"),
    "last message not the user's": (
        lambda: dict(messages=[user("Hi"), {"role": "assistant", "content": "Hello"}]), 400, "last message",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS), ids=list(BAD_REQUESTS))
def test_a_bad_request_gets_an_openai_error_naming_the_problem_and_the_server_goes_on(client, case):
    make, status, message = BAD_REQUESTS[case]
    request = {"model": MODEL, "max_tokens": MAX_TOKENS, **make()}
    err = refusal(lambda: client.chat.completions.create(**request))
    assert err.status_code == status
    assert message in err.body["message"], err.body
    assert set(err.body) == {"message", "type", "param", "code"} and "Traceback" not in err.body["message"]
    assert ask(client, [user(video_part(DEMO_URL), QUESTION)]).choices[0].finish_reason == "stop"


def test_paths_are_read_inside_the_media_root_only(client, media_root):
    inside = ask(client, [user(video_part("clips/demo.mp4"), QUESTION)])
    by_url = ask(client, [user(video_part((media_root / "clips" / "demo.mp4").as_uri()), QUESTION)])
    assert inside.choices[0].message.content == by_url.choices[0].message.content
    assert by_url.usage.slowfast["videos_from_cache"] == 1  # same content, same cache entry
    for escape in ("../outside/secret.mp4", "link.mp4", str(DEMO_VIDEO), DEMO_VIDEO.as_uri()):
        err = refusal(lambda escape=escape: ask(client, [user(video_part(escape), QUESTION)]))
        assert err.status_code == 403 and "outside the server's media root" in err.body["message"], escape


def test_without_a_media_root_no_path_is_read(weights):
    with running_server(weights) as (_, url):
        err = refusal(lambda: ask(client_for(url), [user(video_part(str(DEMO_VIDEO)), QUESTION)]))
    assert err.status_code == 400 and "reads no files" in err.body["message"]


def test_api_key_is_required_when_set(weights):
    with running_server(weights, api_key="s3cret") as (_, url):
        err = refusal(lambda: client_for(url, "wrong").models.list())
        assert err.status_code == 401 and err.body["code"] == "invalid_api_key"
        err = refusal(lambda: ask(client_for(url, "wrong"), [user(QUESTION)]))
        assert err.status_code == 401
        assert [m.id for m in client_for(url, "s3cret").models.list().data] == [MODEL]


# --------------------------------------------------------------------------------------------------- command


def test_the_command_serves_on_loopback_and_stops_on_ctrl_c():
    command = [sys.executable, "-m", "llava.serve.api", "--model-path", str(CHECKPOINT), "--port", "0",
               "--log-level", "warning"]
    server = subprocess.Popen(command, cwd=REPO, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in server.stderr], daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            url = re.search(r"at (http://\S+)/v1", line)
        assert url[1].startswith("http://127.0.0.1:")
        with client_for(url[1]) as client:
            assert [m.id for m in client.models.list().data] == [MODEL]
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_bad_command_exits_2_with_one_error_line(capfd, tmp_path):
    assert api.main(["--model-path", str(tmp_path / "missing")]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
