"""vLLM's OpenAI-compatible server on the committed tiny checkpoint, driven by the official ``openai`` client with
``video_url`` parts: the CLI's greedy answers, and clear refusals of bad input that leave the server serving."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, chat_prompt, run_reference

TINY = REPO / "assets" / "tiny-slowfast"
DEMO_VIDEO = REPO / "assets" / "demo.mp4"
MODEL_NAME = "tiny-slowfast"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(workdir):
    """``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) on a free local port."""
    import requests

    port = _free_port()
    log = open(workdir / "server.log", "w")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(TINY), "--served-model-name",
         MODEL_NAME, "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4", "--host", "127.0.0.1",
         "--port", str(port), "--allowed-local-media-path", str(REPO / "assets")],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {(workdir / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(2)
        else:
            pytest.fail("the server did not become healthy in 300 s")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def cli_answers(workdir) -> dict[str, str]:
    spec = {"cli": {"checkpoint": str(TINY), "video": str(DEMO_VIDEO), "questions": "demo"}}
    return run_reference(spec, workdir / "cli")["answers"]


def _ask(client, question: str, url: str, kind: str = "video_url") -> str:
    reply = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": question}]}],
    )
    return reply.choices[0].message.content.strip()


def test_server_answers_the_demo_questions_as_the_cli(client, cli_answers):
    assert len(cli_answers) == 6
    answers = {q: _ask(client, q, DEMO_VIDEO.as_uri()) for q in cli_answers}
    assert answers == cli_answers


def test_server_reads_a_base64_video_as_the_file(client, cli_answers):
    question = next(iter(cli_answers))
    data = base64.b64encode(DEMO_VIDEO.read_bytes()).decode()
    assert _ask(client, question, f"data:video/mp4;base64,{data}") == cli_answers[question]


def test_server_streams_the_same_answer(client, cli_answers):
    question = list(cli_answers)[3]
    stream = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=64, stream=True,
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": DEMO_VIDEO.as_uri()}},
                                               {"type": "text", "text": question}]}],
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.strip() == cli_answers[question]


@pytest.mark.parametrize(
    "case",
    ["undecodable_video", "outside_allowed_folder", "two_videos"],
)
def test_server_refuses_bad_media_and_keeps_serving(client, cli_answers, workdir, case):
    from openai import BadRequestError

    video = {"type": "video_url", "video_url": {"url": DEMO_VIDEO.as_uri()}}
    if case == "undecodable_video":
        broken = Path(REPO / "assets" / "tiny-slowfast" / "config.json")  # a file inside the folder, not a video
        content = [{"type": "video_url", "video_url": {"url": broken.as_uri()}}]
    elif case == "outside_allowed_folder":
        content = [{"type": "video_url", "video_url": {"url": Path("/etc/hostname").as_uri()}}]
    else:
        content = [video, video]
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, max_tokens=4,
                                       messages=[{"role": "user", "content": content + [{"type": "text", "text": "?"}]}])
    question = next(iter(cli_answers))
    assert _ask(client, question, DEMO_VIDEO.as_uri()) == cli_answers[question]



def test_server_answers_an_image_url_as_the_transformers_model(client, workdir):
    """One image through the chat API (vLLM passes an id per image along with it): the transformers model's tokens."""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer

    question, frame = "What is in the picture?", np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    np.save(workdir / "server-image.npy", frame)
    Image.fromarray(frame).save(workdir / "server-image.png")  # lossless: the same pixels
    spec = {"checkpoint": str(TINY), "requests": [{"prompt": chat_prompt(question), "image": str(workdir / "server-image.npy"),
                                                   "max_tokens": 8}]}
    (expected,) = run_reference(spec, workdir / "server-image")["results"]
    data = base64.b64encode((workdir / "server-image.png").read_bytes()).decode()
    reply = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, max_tokens=8, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                               {"type": "text", "text": question}]}],
    )
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    assert reply.choices[0].message.content == tokenizer.decode(expected["tokens"], skip_special_tokens=True)
