"""The web demo ``llava.serve.gradio_web``: its pieces on a tiny random checkpoint, then the page in headless Chromium.

The browser tests drive Debian's ``chromium`` (``apt-get install chromium``; ``CHROMIUM_PATH`` overrides) through
Playwright without downloading a browser, against a server started in this process on a free loopback port.
They use the trained ``assets/tiny-slowfast`` when it exists, else a tiny random checkpoint: either way the
expected answer is computed with :class:`llava.serve.cli.ChatSession` on the same checkpoint.

``UPDATE_SCREENSHOT=1`` writes the chat test's screenshot to ``assets/gradio_web.png`` (the README's; it needs the
trained checkpoint); otherwise it goes to the test's temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason='the web demo needs gradio: pip install -e ".[demo]"')
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")  # pandas deprecations inside Gradio

from llava.model.modeling_llava_qwen_slow_fast import LlavaQwenSlowFastForCausalLM
from llava.serve import cli
from llava.serve import gradio_web as web

REPO = Path(__file__).resolve().parents[1]
DEMO_VIDEO = REPO / "assets" / "demo.mp4"
TRAINED = REPO / "assets" / "tiny-slowfast"
SCREENSHOT = REPO / "assets" / "gradio_web.png"
QUESTIONS = ("What color is the circle?", "How many shapes are there?")  # the demo video: blue, two
MAX_NEW_TOKENS = 16
UPLOAD_LIMIT_MB = 0.05  # 51 KB: the demo video (4 KB) fits, the "big" file (100 KB) does not
TIMEOUT_MS = 60_000


def normalized(text: str) -> str:
    return " ".join(text.split())


def make_corrupt_video(folder: Path) -> Path:
    path = folder / "corrupt.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return path


def make_text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("a shopping list, not a video\n")
    return path


def make_big_file(folder: Path) -> Path:
    path = folder / "big.mp4"
    path.write_bytes(bytes(100_000))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_shared(checkpoint: str, *extra: str) -> tuple[web.SharedModel, object]:
    args = web.build_parser().parse_args(["--model-path", checkpoint, "--device", "cpu", *extra])
    return web.load_shared_model(args), args


@pytest.fixture(scope="module")
def shared(tiny_checkpoint) -> web.SharedModel:
    return load_shared(tiny_checkpoint)[0]


def expected_answers(shared: web.SharedModel, frames: int, questions=QUESTIONS) -> list[cli.AnswerStats]:
    """Greedy answers of :class:`cli.ChatSession` (the CLI's core) to ``questions`` about the demo video."""
    session = cli.ChatSession(shared.tokenizer, shared.model, shared.image_processor, conv_mode=shared.conv_mode,
                              settings=cli.GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    session.load_video(DEMO_VIDEO, frames)
    return [session.ask(question) for question in questions]


def expected_texts(shared: web.SharedModel, frames: int, questions=QUESTIONS) -> list[str]:
    return [answer.text.strip() for answer in expected_answers(shared, frames, questions)]


# --------------------------------------------------------------------------------------------------- command


def test_binds_loopback_by_default_and_takes_host_and_port():
    args = web.build_parser().parse_args([])
    assert (args.host, args.port) == ("127.0.0.1", 7860)
    assert args.max_upload_mb == 200
    assert Path(args.model_path) == TRAINED
    args = web.build_parser().parse_args(["--host", "0.0.0.0", "--port", "8000", "--max-upload-mb", "1.5"])
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert web.options_from_args(args).max_upload_bytes == int(1.5 * 1024 * 1024)


BAD_COMMANDS = {
    # case: (arguments, text the error line must contain)
    "port out of range": (["--port", "70000"], "--port"),
    "zero upload limit": (["--max-upload-mb", "0"], "--max-upload-mb"),
    "zero concurrency": (["--concurrency", "0"], "--concurrency"),
    "missing checkpoint": (["--model-path", "{tmp}/no-such-checkpoint"], "no-such-checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_command_exits_2_with_one_error_line(case, tmp_path, capfd):
    arguments, named = BAD_COMMANDS[case]
    status = web.main([argument.format(tmp=tmp_path) for argument in arguments])
    out, err = capfd.readouterr()
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and named in err


def test_missing_default_checkpoint_says_to_pass_model_path(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(web, "DEFAULT_MODEL_PATH", tmp_path / "tiny-slowfast")
    assert web.main([]) == 2
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert "tiny-slowfast" in err and "--model-path" in err


def listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on ``port``, from /proc/net/tcp (Linux)."""
    addresses = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads the listening sockets from /proc/net/tcp")
def test_the_command_serves_on_loopback_only_and_stops_on_ctrl_c(tiny_checkpoint):
    port = free_port()
    arguments = ["--model-path", tiny_checkpoint, "--port", str(port)]
    # python -m llava.serve.gradio_web ARGUMENTS, with Ctrl-C live even where this test runs with SIGINT ignored
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv[0] = 'gradio_web'; runpy.run_module('llava.serve.gradio_web', run_name='__main__')")
    server = subprocess.Popen([sys.executable, "-c", launcher, *arguments], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(120, server.kill)  # a server that never says it runs fails instead of hanging
    watchdog.start()
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if "Running on local URL" in line:
                break
        assert f"http://127.0.0.1:{port}" in "".join(lines), lines
        assert listening_addresses(port) == {"127.0.0.1"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert b"Slow-Fast video chat" in page.read()
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        watchdog.cancel()
        if server.poll() is None:
            server.kill()
            server.wait()


# --------------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("make", "max_bytes", "message"),
    [
        (make_text_file, 10**6, "not a video"),
        (make_corrupt_video, 10**6, "not a video"),
        (lambda folder: DEMO_VIDEO, 1000, "over the upload limit of 1000 bytes"),
    ],
    ids=["text file", "corrupt video", "over the limit"],
)
def test_decode_upload_refuses_with_a_message_naming_the_file(make, max_bytes, message, tmp_path):
    path = make(tmp_path)
    with pytest.raises(web.UploadRefused, match=message) as refused:
        web.decode_upload(str(path), 8, max_bytes)
    assert path.name in str(refused.value)
    assert str(tmp_path) not in str(refused.value)  # the server's paths stay private


def test_frame_strip_has_one_captioned_thumbnail_per_sampled_frame():
    clip, _ = web.decode_upload(str(DEMO_VIDEO), 8, 10**6)
    strip = web.frame_strip(clip, height=64)
    assert [caption for _, caption in strip] == [f"{t:.2f} s" for t in clip.frame_times]
    assert all(image.height == 64 for image, _ in strip)


def test_each_browser_session_gets_its_own_state_on_the_shared_weights(shared):
    demo = web.build_demo(shared)
    (state,) = [block for block in demo.blocks.values() if isinstance(block, gr.State)]
    assert demo.analytics_enabled is False  # no telemetry or version check: works offline
    first, second = state.value(), state.value()  # what Gradio does for each new session
    assert first is not second and first.session is not second.session
    assert first.session.model is shared.model and second.session.model is shared.model


def test_a_session_state_survives_gradios_deep_copy_on_the_shared_weights(shared):
    import copy

    # An event that reaches the server before the page's load event makes Gradio deep-copy the factory's
    # result: that copy must work, be a separate user, and copy no weights.
    demo = web.build_demo(shared)
    (state,) = [block for block in demo.blocks.values() if isinstance(block, gr.State)]
    original = state.value()
    original.session.load_video(DEMO_VIDEO, max_frames=4)
    original.messages.append({"role": "user", "content": "What color is the circle?"})

    copied = copy.deepcopy(original)

    assert copied is not original and copied.session is not original.session
    assert copied.lock is not original.lock and not copied.lock.locked()
    assert copied.session.model is shared.model and copied.session.tokenizer is original.session.tokenizer
    assert copied.session.visual_tokens is original.session.visual_tokens
    assert copied.session.video == original.session.video
    copied.messages.append({"role": "assistant", "content": "blue"})
    copied.session.conversation.append_message(copied.session.conversation.roles[0], "only in the copy")
    assert len(original.messages) == 1
    assert "only in the copy" not in original.session.conversation.get_prompt()
    with original.lock:  # the locks are independent
        assert copied.lock.acquire(blocking=False)
        copied.lock.release()


def test_sessions_are_the_clis_and_load_clip_encodes_as_load_video_does(shared):
    import torch

    session = shared.new_session()
    assert type(session) is cli.ChatSession  # the page uses the CLI's session as is
    clip, decode_s = web.decode_upload(str(DEMO_VIDEO), 8, 10**6)
    video = session.load_clip(clip, decode_s)
    reference = shared.new_session()
    expected = reference.load_video(DEMO_VIDEO, 8)
    same = ("path", "frames", "height", "width", "backend", "duration", "fast_tokens", "slow_tokens")
    assert {name: getattr(video, name) for name in same} == {name: getattr(expected, name) for name in same}
    assert video.decode_s == decode_s and video.encode_s > 0
    assert session.video is video and session.turns == 0 and session.conversation.messages == []
    assert torch.equal(session.visual_tokens.fast, reference.visual_tokens.fast)
    assert torch.equal(session.visual_tokens.slow, reference.visual_tokens.slow)
    blind = cli.ChatSession(shared.tokenizer, shared.model, None)
    with pytest.raises(ValueError, match="no vision tower"):
        blind.load_clip(clip)


def test_multi_turn_chat_encodes_the_video_once(shared, encode_spy, ask_spy):
    handlers = web._Handlers(shared, web.WebOptions())
    user = web._user_factory(shared)()
    handlers.decode(user, str(DEMO_VIDEO), 8)
    handlers.encode(user)
    answers = []
    for question in QUESTIONS:
        handlers.submit(user, question)
        *_, (_, chat, stats) = handlers.answer(user, 0.0, 1.0, MAX_NEW_TOKENS)
        answers.append(chat[-1]["content"])
        assert stats.startswith("**Last answer**")
    assert len(encode_spy.calls) == 1
    first, second = ask_spy.results
    assert second.prompt.startswith(first.prompt) and second.prompt.count("<image>") == 1
    assert [m["role"] for m in user.messages] == ["user", "assistant"] * 2
    assert answers == [first.text.strip(), second.text.strip()] == expected_texts(shared, 8)


def test_a_question_before_any_video_is_refused_politely(shared):
    handlers = web._Handlers(shared, web.WebOptions())
    user = web._user_factory(shared)()
    *_, stats = handlers.submit(user, "What moves?")
    assert "Load a video first" in stats
    assert user.messages == [] and user.pending_question is None


def test_stream_answer_yields_the_text_piece_by_piece_then_the_stats(shared):
    session = shared.new_session()
    session.load_video(DEMO_VIDEO, 8)
    session.settings = cli.GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    updates = list(web.stream_answer(session, QUESTIONS[0]))
    *partial, (final, stats) = updates
    assert len(partial) >= 2 and all(s is None for _, s in partial)
    assert stats is not None and stats.new_tokens == MAX_NEW_TOKENS
    assert final == stats.text.strip() == expected_texts(shared, 8, QUESTIONS[:1])[0]


def test_leaving_mid_answer_stops_generation_and_drops_the_question(shared, monkeypatch):
    put = cli._TimedStreamer.put
    steps: list[int] = []

    def counted_put(self, value):
        steps.append(1)
        time.sleep(0.005)  # leaves the consumer ample time to go away before the answer is complete
        return put(self, value)

    monkeypatch.setattr(cli._TimedStreamer, "put", counted_put)
    session = shared.new_session()
    session.load_video(DEMO_VIDEO, 8)
    session.settings = cli.GenerationSettings(max_new_tokens=400)
    stream = web.stream_answer(session, QUESTIONS[0])
    next(stream)
    stream.close()
    assert len(steps) < 400  # stopped early (at the next streamed piece)
    assert session.turns == 0 and session.conversation.messages == []


def frames_slider(demo) -> object:
    (slider,) = [block for block in demo.blocks.values() if isinstance(block, gr.Slider) and block.label == "Frames"]
    return slider


def test_page_starts_at_mm_training_video_frames_when_the_config_has_no_video_frames(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("video_frames", None)
    config["mm_training_video_frames"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    shared, _ = load_shared(str(folder))
    slider = frames_slider(web.build_demo(shared))
    assert slider.value == 96 and "trained with 96" in slider.info


def test_an_untrained_frame_count_is_shown_on_the_page_and_logged_once(shared, caplog):
    handlers = web._Handlers(shared, web.WebOptions())
    user = web._user_factory(shared)()
    with caplog.at_level(logging.WARNING, logger=web.logger.name):
        for _ in range(2):
            _, _, decoded_status, *_ = handlers.decode(user, str(DEMO_VIDEO), 4)
            _, encoded_status, *_ = handlers.encode(user)
            for status in (decoded_status, encoded_status):
                assert "**Warning**: this checkpoint was trained with 8 frames per video but 4" in status
        _, _, trained_status, *_ = handlers.decode(user, str(DEMO_VIDEO), 8)
    assert "Warning" not in trained_status
    logged = [record for record in caplog.records if "trained with 8 frames" in record.getMessage()]
    assert len(logged) == 1


# --------------------------------------------------------------------------------------------------- browser


@dataclass
class Server:
    url: str
    port: int
    shared: web.SharedModel
    frames: int
    trained: bool


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Server:
    """The demo on a free port, started the way ``main`` starts it (default host), with a 51 KB upload limit."""
    trained = (TRAINED / "config.json").is_file()
    port = free_port()
    shared, args = load_shared(str(TRAINED) if trained else tiny_checkpoint, "--port", str(port),
                               "--max-upload-mb", str(UPLOAD_LIMIT_MB), "--max-new-tokens", str(MAX_NEW_TOKENS))
    options = web.options_from_args(args)
    demo = web.build_demo(shared, options)
    web.launch(demo, options, args.host, args.port, block=False)
    try:
        assert demo.server_name == "127.0.0.1"
        assert demo.local_url == f"http://127.0.0.1:{port}/"
        yield Server(demo.local_url, port, shared, shared.new_session().default_max_frames, trained)
    finally:
        demo.close()


def chromium_path() -> str:
    return os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason='needs playwright: pip install -e ".[test]"')
    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip(f"no chromium at {path}: install Debian's (apt-get install chromium) or set CHROMIUM_PATH")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, headless=True)
        yield chromium
        chromium.close()


class Page:
    """A fresh browser session on the demo that refuses (and notes) every request beyond the loopback server."""

    def __init__(self, browser, server: Server) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 860})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.external: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.goto(server.url)

    def _route(self, route) -> None:
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            self.external.append(route.request.url)
            route.abort()

    def upload(self, path: Path) -> None:
        self.page.locator("#video-upload input[type=file]").set_input_files(str(path))

    def ask(self, question: str) -> None:
        self.page.locator("#question textarea").fill(question)
        self.page.locator("#send").click()

    def wait_for(self, event: threading.Event) -> None:
        """Wait for ``event`` while Playwright keeps serving the page (its routing runs in this thread)."""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while not event.is_set():
            assert time.monotonic() < deadline, "timed out"
            self.page.wait_for_timeout(50)

    def bot_messages(self):
        return self.page.locator('#chat [data-testid="bot"] .message-content')

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_page(browser, server):
    pages: list[Page] = []

    def opener() -> Page:
        pages.append(Page(browser, server))
        return pages[-1]

    yield opener
    for page in pages:
        page.close()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


# Records every text the newest bot message shows, to see the answer arrive in pieces.
RECORD_ANSWER_TEXTS = """() => {
    window.answerTexts = [];
    const chat = document.querySelector('#chat');
    new MutationObserver(() => {
        const bots = chat.querySelectorAll('[data-testid="bot"] .message-content');
        const text = bots.length ? bots[bots.length - 1].innerText : '';
        if (text && window.answerTexts[window.answerTexts.length - 1] !== text) window.answerTexts.push(text);
    }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_browser_chat_streams_the_checkpoints_answers_about_the_uploaded_video(
    server, open_page, monkeypatch, tmp_path, encode_spy
):
    if os.environ.get("UPDATE_SCREENSHOT") == "1" and not server.trained:
        pytest.fail(f"UPDATE_SCREENSHOT=1 needs the trained checkpoint at {TRAINED}")
    expected = expected_answers(server.shared, server.frames)  # the trained checkpoint may stop before 16 tokens
    encodings_before = len(encode_spy.calls)
    put, pace = cli._TimedStreamer.put, {"delay": 0.03}  # the first answer at a steady pace: the page shows pieces

    def paced_put(self, value):
        time.sleep(pace["delay"])
        return put(self, value)

    monkeypatch.setattr(cli._TimedStreamer, "put", paced_put)

    page = open_page()
    page.upload(DEMO_VIDEO)
    expect(page.page.locator("#video-status")).to_contain_text("reused by every question")
    expect(page.page.locator("#video-status")).to_contain_text(f"demo.mp4: {server.frames} frames")
    expect(page.page.locator("#frame-strip img")).to_have_count(server.frames)

    page.page.evaluate(RECORD_ANSWER_TEXTS)
    for turn, question in enumerate(QUESTIONS):
        page.ask(question)
        expect(page.bot_messages()).to_have_count(turn + 1)
        # the text token count tells this answer's stats from the previous one's
        expect(page.page.locator("#answer-stats")).to_contain_text(f", {expected[turn].text_tokens} text tokens")
        expect(page.page.locator("#answer-stats")).to_contain_text(f"Last answer: {expected[turn].new_tokens} tokens")
        assert normalized(page.bot_messages().nth(turn).inner_text()) == normalized(expected[turn].text)
        pace["delay"] = 0.0  # the screenshot shows the second answer's real speed
        stats = page.page.locator("#answer-stats").inner_text()
        for part in ("prefill", "decode", "fast", "slow video tokens", "text tokens"):
            assert part in stats
    assert len(encode_spy.calls) - encodings_before == 1  # two turns, one encoding

    texts = page.page.evaluate("window.answerTexts")
    first_answer = [t for t in texts if normalized(t) and normalized(expected[0].text).startswith(normalized(t))]
    # The streamer releases text at word ends, so an answer of several words shows up in pieces, then whole; a
    # one-word answer (the trained checkpoint's) arrives at once. Piecewise streaming of a long answer is also
    # checked without a browser (test_stream_answer_yields_the_text_piece_by_piece_then_the_stats).
    assert len(first_answer) >= (2 if " " in normalized(expected[0].text) else 1), texts
    assert page.external == []  # the page needs nothing beyond the server: it works offline

    path = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "gradio_web.png"
    page.page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_browser_refuses_non_video_uploads_and_keeps_working(server, open_page, tmp_path):
    page = open_page()
    status = page.page.locator("#video-status")
    for path in (make_text_file(tmp_path), make_corrupt_video(tmp_path)):
        page.upload(path)
        expect(status).to_contain_text(f"Refused: {path.name} is not a video this demo can read")
        expect(page.page.locator("#frame-strip img")).to_have_count(0)
    page.ask(QUESTIONS[0])
    expect(page.page.locator("#answer-stats")).to_contain_text("Load a video first")
    page.upload(DEMO_VIDEO)  # the page survived: a video still loads
    expect(status).to_contain_text("reused by every question")


def test_browser_refuses_an_upload_over_the_limit(server, open_page, tmp_path):
    import httpx

    big = make_big_file(tmp_path)
    page = open_page()
    page.upload(big)
    toast = page.page.get_by_text("exceed the maximum allowed size")
    expect(toast).to_be_visible()
    expect(toast).to_contain_text("big.mp4")
    expect(page.page.locator("#frame-strip img")).to_have_count(0)
    # the server enforces the limit too, whatever the page does
    upload_url = f"{server.url}gradio_api/upload"
    refused = httpx.post(upload_url, files={"files": ("big.mp4", big.read_bytes(), "video/mp4")})
    assert refused.status_code == 413
    accepted = httpx.post(upload_url, files={"files": ("demo.mp4", DEMO_VIDEO.read_bytes(), "video/mp4")})
    assert accepted.status_code == 200


def test_browser_a_long_answer_does_not_hold_up_another_users_video(server, open_page, monkeypatch):
    generating, release = threading.Event(), threading.Event()
    generate = LlavaQwenSlowFastForCausalLM.generate

    def held_generate(self, *args, **kwargs):
        generating.set()
        release.wait(TIMEOUT_MS / 1000)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LlavaQwenSlowFastForCausalLM, "generate", held_generate)
    try:
        first, second = open_page(), open_page()
        first.upload(DEMO_VIDEO)
        expect(first.page.locator("#video-status")).to_contain_text("reused by every question")
        first.ask(QUESTIONS[0])
        first.wait_for(generating)

        second.upload(DEMO_VIDEO)  # while the first user's answer is being generated
        expect(second.page.locator("#video-status")).to_contain_text("reused by every question")
        expect(second.page.locator("#frame-strip img")).to_have_count(server.frames)
        assert not release.is_set()
        expect(first.page.locator("#answer-stats")).not_to_contain_text("Last answer")
    finally:
        release.set()
    expect(first.page.locator("#answer-stats")).to_contain_text("Last answer")
    expect(second.bot_messages()).to_have_count(0)  # sessions do not share conversations
