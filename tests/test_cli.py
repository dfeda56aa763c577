"""The command-line chat ``llava.serve.cli`` on a tiny random checkpoint and the demo video."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.serve import cli
from llava.video import load_video

REPO = Path(__file__).resolve().parents[1]
DEMO_VIDEO = REPO / "assets" / "demo.mp4"
MAX_NEW_TOKENS = "8"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> str:
    from llava.model.tiny import TinySpec, write_tiny_checkpoint

    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("cli") / "tiny"), TinySpec())


def cli_args(checkpoint: str, *extra: str, video: Path | str = DEMO_VIDEO) -> list[str]:
    return ["--model-path", checkpoint, "--video", str(video), "--max-new-tokens", MAX_NEW_TOKENS, *extra]


def run_subprocess(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=REPO, **kwargs,
    )


def test_command_streams_an_answer_to_stdout_and_nothing_to_stderr(checkpoint):
    result = run_subprocess(cli_args(checkpoint, "--question", "What moves in the video?"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr == ""


def test_verbose_reports_timings_and_token_counts_on_stderr(checkpoint, capsys, encode_spy):
    assert cli.main(cli_args(checkpoint, "--question", "What moves?", "--verbose")) == 0
    err = capsys.readouterr().err
    for label in ("video decoding", "vision encoding", "prefill"):
        assert re.search(rf"^{label}: \d+\.\d+ s", err, re.M), label
    assert re.search(r"^decode: \d+\.\d tokens/s", err, re.M)
    tokens = encode_spy.results[0][0]
    counts = re.search(r"^tokens: fast (\d+), slow (\d+), text (\d+)", err, re.M)
    assert counts is not None
    assert (int(counts[1]), int(counts[2])) == (tokens.fast.shape[0], tokens.slow.shape[0])
    assert int(counts[3]) > 0


def test_greedy_answer_equals_model_generate_on_the_same_prompt(checkpoint, capsys):
    question = "What moves in the video?"
    assert cli.main(cli_args(checkpoint, "--question", question)) == 0
    printed = capsys.readouterr().out

    tokenizer, model, processor, _ = load_pretrained_model(checkpoint, None, "tiny", device="cpu")
    clip = load_video(DEMO_VIDEO, model.config.video_frames)
    pixels = processor.preprocess(clip.frames, return_tensors="pt")["pixel_values"]
    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], f"<image>\n{question}")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    new = model.generate(ids, images=[pixels], max_new_tokens=int(MAX_NEW_TOKENS), do_sample=False)
    assert printed == tokenizer.decode(new[0], skip_special_tokens=True) + "\n"


def test_interactive_encodes_the_video_once_for_all_turns(checkpoint, capsys, monkeypatch, encode_spy, ask_spy):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is red?\nWhere does it go?\n"))
    assert cli.main(cli_args(checkpoint, "--interactive")) == 0
    assert len(ask_spy.calls) == 2
    assert len(encode_spy.calls) == 1


def test_interactive_second_prompt_holds_the_first_answer(checkpoint, capsys, monkeypatch, ask_spy):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Where does it go?\n"))
    assert cli.main(cli_args(checkpoint, "--interactive", "--question", "What is red?")) == 0
    first, second = ask_spy.results
    assert first.text.strip()
    assert first.text.strip() in second.prompt
    assert second.prompt.startswith(first.prompt)
    assert second.prompt.count("<image>") == 1


def test_interactive_stops_at_quit(checkpoint, capsys, monkeypatch, ask_spy):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is red?\nquit\nNever asked?\n"))
    assert cli.main(cli_args(checkpoint, "--interactive")) == 0
    assert len(ask_spy.calls) == 1


def test_main_without_argv_reads_sys_argv(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["slowfast-cli", "--model-path", "m", "--video", "v", "--question", "q",
                                      "--max-frames", "0"])
    assert cli.main() == 2
    assert "--max-frames" in capsys.readouterr().err


@pytest.fixture
def not_slow_fast_checkpoint(tmp_path) -> Path:
    folder = tmp_path / "qwen2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return folder


@pytest.fixture
def corrupt_video(tmp_path) -> Path:
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    return path


BAD_INPUTS = {
    # case: (argument overrides, text the error line must contain)
    "missing video": (["--video", "{tmp}/missing.mp4"], "missing.mp4"),
    "corrupt video": (["--video", "{corrupt}"], "corrupt.mp4"),
    "missing checkpoint dir": (["--model-path", "{tmp}/no-such-checkpoint"], "no-such-checkpoint"),
    "not a Slow-Fast checkpoint": (["--model-path", "{qwen2}"], "qwen2"),
    "zero max frames": (["--max-frames", "0"], "--max-frames"),
    "negative temperature": (["--temperature", "-1"], "--temperature"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_error_line(
    case, checkpoint, tmp_path, corrupt_video, not_slow_fast_checkpoint, capfd
):
    overrides, named = BAD_INPUTS[case]
    fill = {"tmp": tmp_path, "corrupt": corrupt_video, "qwen2": not_slow_fast_checkpoint}
    args = cli_args(checkpoint, "--question", "What moves?") + [arg.format(**fill) for arg in overrides]
    status = cli.main(args)
    out, err = capfd.readouterr()  # file-descriptor level: also catches FFmpeg's own messages
    assert status == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert named in err
    assert "Traceback" not in err


def test_bad_input_in_a_real_process_prints_only_the_error_line(checkpoint, corrupt_video):
    result = run_subprocess(cli_args(checkpoint, "--question", "What moves?", video=corrupt_video))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(corrupt_video) in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.fixture(scope="session")
def reference_frames_checkpoint(checkpoint, tmp_path_factory) -> str:
    """The tiny checkpoint with its frame count only under the reference trainer's name: 96."""
    folder = tmp_path_factory.mktemp("mm_training_video_frames") / "tiny"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("video_frames", None)
    config["mm_training_video_frames"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture
def load_video_spy(monkeypatch) -> list[int]:
    """The ``max_frames`` of every video the CLI decodes."""
    asked: list[int] = []

    def spy(path, max_frames=64, **kwargs):
        asked.append(max_frames)
        return load_video(path, max_frames, **kwargs)

    monkeypatch.setattr(cli, "load_video", spy)
    return asked


def test_frames_default_to_mm_training_video_frames_when_the_config_has_no_video_frames(
    reference_frames_checkpoint, capsys, load_video_spy
):
    assert cli.main(cli_args(reference_frames_checkpoint, "--question", "What moves?")) == 0
    assert load_video_spy == [96]
    assert "warning" not in capsys.readouterr().err


def test_a_frame_count_other_than_the_trained_one_is_warned_once(checkpoint, capsys, monkeypatch, load_video_spy):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is red?\nWhere does it go?\n"))
    assert cli.main(cli_args(checkpoint, "--interactive", "--max-frames", "4")) == 0
    assert load_video_spy == [4]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "trained with 8 frames per video but 4" in warnings[0]


def test_a_still_image_is_padded_to_a_square_before_encoding_as_in_training(checkpoint, tmp_path, monkeypatch):
    from PIL import Image

    from llava.mm_utils import process_images

    wide = tmp_path / "wide.png"
    Image.fromarray(load_video(DEMO_VIDEO, 1).frames[0]).resize((96, 48)).save(wide)
    tokenizer, model, image_processor, _ = load_pretrained_model(checkpoint, None, "tiny", device="cpu")
    assert model.config.image_aspect_ratio == "pad"
    seen = []
    monkeypatch.setattr(model, "encode_images", lambda pixels: seen.append(pixels[0]) or [None])
    session = cli.ChatSession(tokenizer, model, image_processor)
    with pytest.raises(AttributeError):  # the spy returns no tokens; only the pixels matter here
        session.load_video(wide)
    padded = process_images([Image.open(wide).convert("RGB")], image_processor, model.config)
    cropped = image_processor.preprocess(load_video(wide, 1).frames, return_tensors="pt")["pixel_values"]
    assert torch.equal(seen[0], padded) and not torch.equal(seen[0], cropped)
