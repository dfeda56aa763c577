"""The API server refuses what it should, before the work, and keeps answering others.

Hostile requests are built by the tests: FFmpeg playlists naming a canary file (watched with inotify and an
audit hook), a PNG bomb, a 60,000-frame video with one keyframe, a 24 MiB prompt, nested JSON, foreign
``Host``/``Origin`` headers, a ``text/plain`` POST. Servers run in this process on free loopback ports with the
bundled ``assets/tiny-slowfast`` (context 512 tokens, 64 px frames).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from media_helpers import OpenWatch, assert_stopped, write_one_keyframe_video, write_png_bomb
from test_api import (
    CHECKPOINT,
    DEMO_URL,
    DEMO_VIDEO,
    MODEL,
    QUESTION,
    TIMEOUT_S,
    ask,
    client_for,
    data_url,
    refusal,
    running_server,
    stream_chunks,
    user,
    video_part,
    write_video_bytes,
)

from llava.media_gate import MediaLimits
from llava.model.builder import load_pretrained_model
from llava.serve import api, batching
from llava.serve.limits import Admission
from llava.serve.prompt import bounded_token_count
from llava.serve.protocol import ApiError

CHAT = "/v1/chat/completions"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def post(url: str, body: bytes | str, **headers) -> httpx.Response:
    headers.setdefault("content-type", "application/json")
    return httpx.post(f"{url}{CHAT}", content=body, headers=headers, timeout=TIMEOUT_S)


def chat_body(messages: list[dict], **fields) -> str:
    return json.dumps({"model": MODEL, "messages": messages, "max_tokens": 8, **fields})


@pytest.fixture(scope="module")
def weights():
    return load_pretrained_model(str(CHECKPOINT), device="cpu")


@pytest.fixture(scope="module")
def one_keyframe(tmp_path_factory) -> Path:
    return write_one_keyframe_video(tmp_path_factory.mktemp("long") / "one_keyframe.mp4", frames=60_000)


BIG_BODY = 4 * 2**20  # the 60,000-frame video is 0.8 MB


@pytest.fixture(scope="module")
def served(weights):
    with running_server(weights, max_body_bytes=BIG_BODY) as (server, url):
        yield server, url


@pytest.fixture
def canary(tmp_path) -> Path:
    path = tmp_path / "canary.mp4"
    shutil.copy(DEMO_VIDEO, path)
    return path


# ------------------------------------------------------------------------------------------ no local files


def test_a_concat_playlist_uploaded_as_a_video_is_refused_and_no_file_it_names_is_read(served, canary):
    server, url = served
    relative = os.path.relpath(canary, tempfile.gettempdir())  # where the server writes the upload
    playlist = f"ffconcat version 1.0\nfile {relative}\nfile '{canary}'\n".encode()
    watch = OpenWatch(canary)
    err = refusal(lambda: ask(client_for(url), [user(video_part(data_url(playlist)), QUESTION)]))
    assert err.status_code == 400 and err.body["code"] == "unsupported_media"
    assert err.body["param"] == "messages[0].content[0].video_url"
    assert "concat script" in err.body["message"] and str(canary) not in err.body["message"]
    assert watch.opened() == []
    assert ask(client_for(url), [user(video_part(DEMO_URL), QUESTION)]).choices[0].finish_reason == "stop"


def test_a_playlist_in_the_media_root_reads_nothing_outside_it(weights, tmp_path, canary):
    root = tmp_path / "media"
    root.mkdir()
    (root / "stream.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
                                      f"#EXTINF:2.0,\n{canary}\n#EXT-X-ENDLIST\n")
    (root / "list.mp4").write_text(f"ffconcat version 1.0\nfile '{canary}'\n")
    watch = OpenWatch(canary)
    with running_server(weights, media_root=str(root)) as (_, url):
        for name, kind in (("stream.m3u8", "HLS playlist"), ("list.mp4", "concat script")):
            err = refusal(lambda name=name: ask(client_for(url), [user(video_part(name), QUESTION)]))
            assert err.status_code == 400 and kind in err.body["message"], err.body
    assert watch.opened() == []


def test_a_png_bomb_is_refused_by_its_pixel_count(served, tmp_path):
    _, url = served
    bomb = write_png_bomb(tmp_path / "bomb.png").read_bytes()
    err = refusal(lambda: ask(client_for(url), [user(image_part(data_url(bomb, "image/png")), QUESTION)]))
    assert err.status_code == 413 and "13000x13000" in err.body["message"] and "max_pixels" in err.body["message"]
    assert err.body["param"] == "messages[0].content[0].image_url"


# ------------------------------------------------------------------------------------------ endless decodes


def test_a_video_with_one_keyframe_is_refused_by_its_decoding_work(served, one_keyframe):
    # 60,000 frames, one keyframe: sampling 16 means decoding them all (test_media_gate shows no frame is decoded)
    _, url = served
    err = refusal(lambda: ask(client_for(url), [user(video_part(data_url(one_keyframe.read_bytes())), QUESTION)]))
    assert err.status_code == 413 and "max_decode_frames" in err.body["message"], err.body
    assert "decoding 60,000 frames" in err.body["message"]
    assert ask(client_for(url), [user(video_part(DEMO_URL), QUESTION)]).choices[0].finish_reason == "stop"


def test_a_decode_over_its_time_limit_is_stopped_and_frees_its_thread(weights, one_keyframe):
    import dataclasses
    
    limits = MediaLimits(max_decode_frames=None, max_decode_seconds=0.05)
    with running_server(weights, media_limits=limits, decode_workers=1, max_body_bytes=BIG_BODY) as (server, url):
        client = client_for(url)
        err = refusal(lambda: ask(client, [user(video_part(data_url(one_keyframe.read_bytes())), QUESTION)]))
        assert err.status_code == 413 and "max_decode_seconds" in err.body["message"], err.body
        assert_stopped()  # killed, not waited for
        server.options.media_limits = dataclasses.replace(limits, max_decode_seconds=60.0)
        fresh = data_url(write_video_bytes(shape=(4, 32, 32), seed=11))  # not cached: needs the one decode thread
        assert ask(client, [user(video_part(fresh), QUESTION)]).choices[0].finish_reason == "stop"


@pytest.fixture
def stuck_decoding(monkeypatch):
    """Decoding blocks until the test sets the returned event (an endless decode, without the cost of one)."""
    release = threading.Event()
    started = []
    decode = api.ChatServer.decode

    def blocking(self, plan):
        if plan.needs_decoding:
            started.append(plan)
            release.wait(TIMEOUT_S)
        return decode(self, plan)

    monkeypatch.setattr(api.ChatServer, "decode", blocking)
    yield release, started
    release.set()


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_other_clients_are_answered_while_the_decoding_threads_are_busy(weights, stuck_decoding):
    release, started = stuck_decoding
    with running_server(weights, decode_workers=2) as (server, url):
        client = client_for(url)
        videos = [data_url(write_video_bytes(shape=(4, 32, 32), seed=20 + i)) for i in range(2)]
        results = []
        threads = [threading.Thread(target=lambda v=v: results.append(ask(client, [user(video_part(v), QUESTION)])))
                   for v in videos]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(started) == 2, "both decoding threads to be busy")
        assert ask(client, [user("Say hello.")]).choices[0].finish_reason in ("stop", "length")
        assert not results  # the videos are still decoding
        release.set()
        for thread in threads:
            thread.join(TIMEOUT_S)
        assert len(results) == 2


def test_requests_waiting_for_decoding_count_in_the_queue_limit(weights, stuck_decoding):
    release, started = stuck_decoding
    with running_server(weights, max_queue=2, decode_workers=1) as (server, url):
        client = client_for(url)
        videos = [data_url(write_video_bytes(shape=(4, 32, 32), seed=30 + i)) for i in range(2)]
        threads = [threading.Thread(target=lambda v=v: ask(client, [user(video_part(v), QUESTION)])) for v in videos]
        for thread in threads:
            thread.start()
        wait_for(lambda: server.admission.open == 2, "two requests to be held")
        assert server.engine.open_jobs == 0  # neither has reached the engine
        err = refusal(lambda: ask(client, [user("Say hello.")]))
        assert err.status_code == 429 and "--max-queue" in err.body["message"]
        release.set()
        for thread in threads:
            thread.join(TIMEOUT_S)
        wait_for(lambda: server.admission.open == 0, "the requests to end")
        assert ask(client, [user("Say hello.")]).choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------ refuse before working


def test_a_24_mib_prompt_is_refused_without_tokenizing_it(weights, monkeypatch):
    tokenizer = weights[0]
    seen = []
    call = type(tokenizer).__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text) if isinstance(text, str) else 0)
        return call(self, text, *args, **kwargs)

    with running_server(weights, max_body_bytes=32 * 2**20, max_inflight_bytes=64 * 2**20) as (server, url):
        monkeypatch.setattr(type(tokenizer), "__call__", spy)
        response = post(url, chat_body([user("word " * (24 * 2**20 // 5))]))
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert max(seen, default=0) < 100_000


def test_token_counting_stops_once_the_text_cannot_fit(weights):
    tokenizer = weights[0]
    text = "word " * 200_000
    assert bounded_token_count(text, tokenizer, limit=1000, longest_token=13) is None  # by its characters alone
    lengths = []

    class Counting:
        def __call__(self, piece, **kwargs):
            lengths.append(len(piece))
            return tokenizer(piece, **kwargs)

    assert bounded_token_count(text, Counting(), limit=1000, longest_token=1000) is None
    assert 0 < max(lengths) <= 16_384
    short = "What color is the circle? " * 20
    exact = len(tokenizer(short, add_special_tokens=False).input_ids)
    assert bounded_token_count(short, tokenizer, limit=exact, longest_token=13) == exact


def test_the_predicted_prompt_is_checked_against_the_context_before_decoding(served, monkeypatch):
    server, url = served
    decoded = []
    monkeypatch.setattr(server, "decode", lambda plan: decoded.append(plan))
    long_video = data_url(write_video_bytes(shape=(64, 16, 16), seed=5))
    # about 340 text tokens fit the 512 of context; with the 256 fast tokens of 64 frames they do not
    err = refusal(lambda: ask(client_for(url), [user(video_part(long_video), "word " * 100)],
                              extra_body={"max_frames": 64}))
    assert err.status_code == 400 and "predicted from the videos' headers" in err.body["message"], err.body
    assert decoded == []


def test_the_per_request_memory_limit_counts_the_preprocessed_pixels(weights):
    # the demo video: 16 decoded frames of 64x64 (192 KiB) fit 512 KiB; their float32 pixels (768 KiB) do not
    with running_server(weights, max_decoded_bytes=512 * 1024) as (_, url):
        err = refusal(lambda: ask(client_for(url), [user(video_part(DEMO_URL), QUESTION)]))
    assert err.status_code == 413 and "preprocessed pixels" in err.body["message"]


def test_admission_reserves_memory_and_releases_it():
    admission = Admission(max_open=2, memory_bytes=100)
    first = admission.enter()
    first.reserve(80, "the body")
    second = admission.enter()
    with pytest.raises(ApiError) as busy:
        second.reserve(30, "the body")
    assert busy.value.status == 429 and "--max-inflight-mb" in busy.value.message
    with pytest.raises(ApiError) as never:
        second.reserve(101, "the body")
    assert never.value.status == 413
    with pytest.raises(ApiError) as full:
        admission.enter()
    assert full.value.status == 429
    first.close()
    second.reserve(30, "the body")
    assert (admission.open, admission.reserved) == (1, 30)
    second.close()
    assert (admission.open, admission.reserved) == (0, 0)


# ------------------------------------------------------------------------------------------ malformed requests


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_is_a_400(served, depth):
    _, url = served
    body = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "metadata": %s%s}' % (
        MODEL, "[" * depth, "]" * depth)
    response = post(url, body)
    assert response.status_code == 400 and "nests lists and objects" in response.json()["error"]["message"]
    assert ask(client_for(url), [user("Say hello.")]).choices[0].finish_reason in ("stop", "length")


def test_a_post_that_does_not_say_it_is_json_is_a_415(served):
    _, url = served
    response = post(url, chat_body([user("Say hello.")]), **{"content-type": "text/plain"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_without_an_api_key_only_the_servers_own_host_names_are_answered(weights):
    body = chat_body([user("Say hello.")])
    with running_server(weights, allowed_hosts=("llava.internal",)) as (_, url):
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "llava.internal"):
            assert post(url, body, host=host).status_code == 200, host
        response = post(url, body, host=f"attacker.example:{port}")
        assert response.status_code == 403 and response.json()["error"]["code"] == "host_not_allowed"
        assert httpx.get(f"{url}/v1/models", headers={"host": "attacker.example"}).status_code == 403
        response = post(url, body, origin="http://attacker.example")
        assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
        assert post(url, body, origin=f"http://localhost:{port}").status_code == 200
    with running_server(weights, api_key="s3cret") as (_, url):
        assert post(url, body, host="attacker.example", authorization="Bearer s3cret").status_code == 200


# ------------------------------------------------------------------------------------------ failure isolation


def test_a_failing_request_fails_alone_with_a_generic_500(weights, monkeypatch, caplog):
    model = weights[1]
    encode = model.encode_images
    poison = write_video_bytes(shape=(4, 32, 32), seed=41)

    def fragile(images):
        if any(p.shape[0] == 4 for p in images):  # the poisoned video (4 frames; the demo has 16)
            raise RuntimeError("simulated failure in the vision tower")
        return encode(images)

    monkeypatch.setattr(model, "encode_images", fragile)
    with running_server(weights, dict(max_batch_size=2, batch_window_s=30.0)) as (server, url), \
            caplog.at_level(logging.ERROR, logger="llava.serve.api"):
        client = client_for(url)
        outcomes: dict[str, object] = {}

        def run(name: str, video: str) -> None:
            try:
                outcomes[name] = ask(client, [user(video_part(video), QUESTION)])
            except Exception as err:  # noqa: BLE001 - the test inspects it
                outcomes[name] = err

        threads = [threading.Thread(target=run, args=("good", DEMO_URL)),
                   threading.Thread(target=run, args=("bad", data_url(poison)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
        assert server.engine.stats["retried_alone"] == 2
    assert outcomes["good"].choices[0].finish_reason == "stop"
    bad = outcomes["bad"]
    assert bad.status_code == 500 and "simulated" not in bad.body["message"]
    error_id = bad.body["message"].split("error id ")[1].split(";")[0]
    assert any(error_id in record.getMessage() and record.exc_info for record in caplog.records)


def test_out_of_memory_in_a_batch_is_retried_row_by_row(weights, monkeypatch):
    model = weights[1]
    encode = model.encode_images

    def needs_room(images):
        if len(images) > 1:
            raise torch.cuda.OutOfMemoryError("simulated: two videos do not fit")
        return encode(images)

    monkeypatch.setattr(model, "encode_images", needs_room)
    videos = [data_url(write_video_bytes(shape=(8, 32, 32), seed=50 + i)) for i in range(2)]
    with running_server(weights, dict(max_batch_size=2, batch_window_s=30.0)) as (server, url):
        client = client_for(url)
        replies = []
        threads = [threading.Thread(target=lambda v=v: replies.append(ask(client, [user(video_part(v), QUESTION)])))
                   for v in videos]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT_S)
    assert [r.choices[0].finish_reason for r in replies] == ["stop", "stop"]


def test_the_vision_pass_runs_in_chunks_of_bounded_frames(weights, monkeypatch):
    tokenizer, model, processor, _ = weights
    calls = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda images: calls.append([p.shape[0] for p in images])
                        or encode(images))
    engine = batching.BatchingEngine(model, tokenizer, vision_chunk_frames=16)
    pixels = [torch.zeros(n, 3, 64, 64) for n in (8, 8, 8, 40)]
    jobs = [batching.GenerationJob(torch.tensor([1, -200, 2]), [batching.VisualInput(i, 0, 0, pixels=p)],
                                   batching.SamplingParams(1), "attend", lambda event: None)
            for i, p in enumerate(pixels)]
    engine._encode(jobs)
    assert calls == [[8, 8], [8], [40]]
    assert all(job.visuals[0].tokens is not None for job in jobs)


# ------------------------------------------------------------------------------------------ logprobs, metrics


def test_logprobs_come_from_the_answers_forward_pass_and_parse_with_the_official_client(served, weights):
    tokenizer, model = weights[0], weights[1]
    _, url = served
    messages = [user("Describe the video.")]
    reply = ask(client_for(url), messages, max_tokens=6, logprobs=True, top_logprobs=3,
                extra_body={"ignore_eos": True})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert b"".join(bytes(e.bytes) for e in content).decode() == reply.choices[0].message.content
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    # the same numbers from one forward pass over the prompt and the answer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from llava.mm_utils import tokenizer_image_token

    prompt, _ = api.build_prompt(api.parse_request({"model": MODEL, "messages": messages}).messages, "qwen_1_5")
    prompt_ids = tokenizer_image_token(prompt, tokenizer)
    table = bytes_to_unicode()
    answer_ids = [tokenizer.convert_tokens_to_ids("".join(table[b] for b in e.bytes)) for e in content]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    expected = [float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(answer_ids)]
    assert [e.logprob for e in content] == pytest.approx(expected, abs=1e-4)

    chunks = stream_chunks(client_for(url), messages, max_tokens=6, logprobs=True, top_logprobs=3,
                           extra_body={"ignore_eos": True})
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_top_logprobs_without_logprobs_is_refused(served):
    _, url = served
    err = refusal(lambda: ask(client_for(url), [user("Hi")], top_logprobs=2))
    assert err.status_code == 400 and err.body["param"] == "top_logprobs"


def test_metrics_are_served_in_prometheus_text_format(served):
    from prometheus_client.parser import text_string_to_metric_families

    server, url = served
    client = client_for(url)
    ask(client, [user(video_part(DEMO_URL), QUESTION)])
    ask(client, [user(video_part(DEMO_URL), "How many shapes are there?")])  # the video from the cache
    refusal(lambda: ask(client, [user("Hi")], n=2))
    response = httpx.get(f"{url}/metrics", timeout=TIMEOUT_S)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    route = ("route", CHAT)
    assert samples[("slowfast_requests_total", (route, ("status", "200")))] >= 2
    assert samples[("slowfast_requests_total", (route, ("status", "400")))] >= 1
    assert samples[("slowfast_batch_size_count", ())] >= 2
    assert samples[("slowfast_prompt_tokens_total", ())] > 0 and samples[("slowfast_generation_tokens_total", ())] > 0
    assert samples[("slowfast_video_cache_hits_total", ())] >= 1
    assert samples[("slowfast_decode_seconds_count", ())] >= 1
    assert samples[("slowfast_generation_seconds_count", ())] >= 2
    assert samples[("slowfast_requests_open", ())] == 0


# ------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize("argv", [
    ["--max-decode-seconds", "0"], ["--max-pixels", "-5"], ["--max-inflight-mb", "8", "--max-body-mb", "64"],
    ["--max-prompt-chars", "many"], ["--max-video-seconds", "nan"], ["--allowed-host", "http://evil.example/"],
])
def test_limit_options_are_validated(argv, capfd, tmp_path):
    assert api.main(["--model-path", str(tmp_path), *argv]) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and argv[0] in err
