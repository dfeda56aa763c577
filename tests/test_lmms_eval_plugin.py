"""The lmms-eval model ``slowfast_videomllm``: registration, request handling, and real lmms-eval runs."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# lmms-eval comes with the eval extra, which the README's test command installs: if it does not import (as with
# filelock 4.3), every test here must fail with the import error, not skip.
from lmms_eval.api.instance import Instance  # noqa: E402
from loguru import logger  # noqa: E402
from PIL import Image  # noqa: E402

from llava.eval.lmms_eval_model import RequestSettings, SlowFastVideoMLLM, resolve_protocol  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402
from playground.synthetic_data import write_video  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK, SPLIT = "toy", "test"


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("a", "b", "c"):
        frames = rng.integers(0, 256, size=(12, 64, 64, 3), dtype=np.uint8)
        write_video(frames, folder / f"{name}.mp4")
        paths[name] = str(folder / f"{name}.mp4")
    broken = folder / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 10)
    paths["broken"] = str(broken)
    return paths


@pytest.fixture(scope="module")
def lmm(tiny_checkpoint) -> SlowFastVideoMLLM:
    return SlowFastVideoMLLM(pretrained=tiny_checkpoint, num_frames=6, device="cpu", video_decode_backend="pyav")


def attach_docs(lmm: SlowFastVideoMLLM, docs: list[dict]) -> None:
    lmm.task_dict = {TASK: {SPLIT: docs}}


def doc_to_visual(doc: dict) -> list:
    return doc["visual"]


def generate_request(doc_id: int, question: str, gen_kwargs: dict | None = None) -> Instance:
    args = (question, dict(gen_kwargs or {}), doc_to_visual, doc_id, TASK, SPLIT)
    return Instance(request_type="generate_until", arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def likelihood_request(doc_id: int, context: str, continuation: str) -> Instance:
    args = (context, continuation, doc_to_visual, doc_id, TASK, SPLIT)
    return Instance(request_type="loglikelihood", arguments=args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def texts(results) -> list[str]:
    return [r.text for r in results]


# ------------------------------------------------------------------------------------------ registration
def test_entry_point_registers_the_model():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()
    assert registry.get_model_class("slowfast_videomllm") is SlowFastVideoMLLM


def test_unknown_model_argument_is_named(tiny_checkpoint):
    with pytest.raises(ValueError, match="num_frame"):
        SlowFastVideoMLLM.create_from_arg_string(f"pretrained={tiny_checkpoint},num_frame=8,device=cpu")


@pytest.mark.parametrize(
    "arg, field",
    [("num_frames=0", "num_frames"), ("fps=-1", "fps"), ("video_decode_backend=opencv", "video_decode_backend"),
     ("cross_attn_decode_mode=zero", "cross_attn_decode_mode"), ("conv_template=vicuna", "conv_template"),
     ("batch_size=auto", "batch_size")],
)  # fmt: skip
def test_bad_model_argument_is_named(tiny_checkpoint, arg, field):
    with pytest.raises(ValueError, match=field):
        SlowFastVideoMLLM.create_from_arg_string(f"pretrained={tiny_checkpoint},device=cpu,{arg}")


def test_model_args_batch_size_wins_over_the_cli_default(tiny_checkpoint):
    lmm = SlowFastVideoMLLM.create_from_arg_string(
        f"pretrained={tiny_checkpoint},batch_size=3,device=cpu", {"batch_size": 1, "max_batch_size": None, "device": None}
    )
    assert lmm.batch_size == 3
    assert lmm.num_frames == 8  # the checkpoint's video_frames when num_frames is not given


# ------------------------------------------------------------------------------------------ settings
def test_request_settings_parse_generation_kwargs():
    greedy = RequestSettings.from_gen_kwargs({"temperature": 0, "do_sample": False, "max_new_tokens": 16}, 1024)
    assert (greedy.do_sample, greedy.max_new_tokens, greedy.until) == (False, 16, ())
    sampled = RequestSettings.from_gen_kwargs({"temperature": 0.7, "top_p": 0.9, "until": "\n", "num_beams": 2}, 1024)
    assert sampled.generate_kwargs() == {
        "max_new_tokens": 1024, "num_beams": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9,
    }  # fmt: skip
    assert sampled.until == ("\n",)
    assert not RequestSettings.from_gen_kwargs({"temperature": 0.7, "do_sample": False}, 8).do_sample
    with pytest.raises(ValueError, match="top_p"):
        RequestSettings.from_gen_kwargs({"top_p": 1.5}, 8)


def test_generate_until_passes_each_request_its_own_settings(lmm, videos, monkeypatch):
    attach_docs(lmm, [{"visual": [videos["a"]]}, {"visual": [videos["b"]]}])
    calls = []
    real_generate = lmm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(lmm.model, "generate", spy)
    requests = [
        generate_request(0, "What is shown?", {"max_new_tokens": 3, "temperature": 0}),
        generate_request(1, "What is shown?", {"max_new_tokens": 5, "temperature": 0.8, "top_p": 0.5, "num_beams": 2}),
    ]
    results = lmm.generate_until(requests)
    seen = sorted((c["max_new_tokens"], c["do_sample"], c["temperature"], c["top_p"], c["num_beams"]) for c in calls)
    assert seen == [(3, False, None, None, 1), (5, True, 0.8, 0.5, 2)]
    assert results[0].token_counts.output_tokens <= 3
    assert results[1].token_counts.output_tokens <= 5


def test_until_cuts_the_answer(lmm, videos):
    attach_docs(lmm, [{"visual": [videos["a"]]}])
    full = lmm.generate_until([generate_request(0, "Describe it.", {"max_new_tokens": 12})])[0].text
    assert len(full) >= 4, "the tiny model should produce a few characters"
    stop = full[2:4]
    cut = lmm.generate_until([generate_request(0, "Describe it.", {"max_new_tokens": 12, "until": [stop]})])[0].text
    assert cut == full[: full.index(stop)].strip()


def test_batched_generation_equals_one_request_at_a_time(lmm, videos):
    attach_docs(lmm, [{"visual": [videos["a"]]}, {"visual": [videos["b"]]}, {"visual": []}])
    requests = [
        generate_request(0, "What color is it?", {"max_new_tokens": 6}),
        generate_request(1, "Which way does the square move, and how fast?", {"max_new_tokens": 6}),
        generate_request(2, "Hello", {"max_new_tokens": 6}),
    ]
    lmm._batch_size = 1
    alone = texts(lmm.generate_until(requests))
    lmm._batch_size = 3
    try:
        batched = texts(lmm.generate_until(requests))
    finally:
        lmm._batch_size = 1
    assert batched == alone


def test_questions_on_one_video_encode_it_once(lmm, videos, monkeypatch):
    lmm._video_cache.clear()
    attach_docs(lmm, [{"visual": [videos["c"]]}, {"visual": [videos["c"]]}])
    encoded = []
    real_encode = lmm.model.encode_images
    monkeypatch.setattr(lmm.model, "encode_images", lambda images: encoded.append(1) or real_encode(images))
    lmm.generate_until([generate_request(0, "First?", {"max_new_tokens": 2}), generate_request(1, "Second?", {"max_new_tokens": 2})])
    assert len(encoded) == 1


def test_unreadable_video_is_reported_once_and_scored_empty(lmm, videos):
    attach_docs(lmm, [{"visual": [videos["broken"]]}, {"visual": [videos["broken"]]}, {"visual": [videos["a"]]}])
    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        results = lmm.generate_until([generate_request(i, "What is shown?", {"max_new_tokens": 4}) for i in range(3)])
        scores = lmm.loglikelihood([likelihood_request(0, "What is shown?", "red")])
    finally:
        logger.remove(sink)
    reports = [m for m in messages if videos["broken"] in m]
    assert len(reports) == 1
    assert [r.text for r in results[:2]] == ["", ""]
    alone = lmm.generate_until([generate_request(2, "What is shown?", {"max_new_tokens": 4})])[0].text
    assert results[2].text == alone
    assert scores[0].text == (float("inf"), False)


def test_image_requests_are_answered(lmm):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    attach_docs(lmm, [{"visual": [image]}])
    answer = lmm.generate_until([generate_request(0, "What color?", {"max_new_tokens": 5})])[0].text

    pixels = process_images([image], lmm.image_processor, lmm.model.config)
    prompt = lmm.build_prompt("What color?", 1)
    ids = tokenizer_image_token(prompt, lmm.tokenizer, return_tensors="pt")[None]
    expected = lmm.model.generate(ids, images=[pixels[0]], max_new_tokens=5, do_sample=False, eos_token_id=lmm.eot_token_id)
    assert answer == lmm.tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_prompt_puts_one_image_marker_per_visual(lmm):
    assert lmm.build_prompt("Q?", 2).count("<image>") == 2
    assert lmm.build_prompt("<image>\nQ?", 1).count("<image>") == 1
    assert "<image>" not in lmm.build_prompt("<image> Q?", 0)


# ------------------------------------------------------------------------------------------ likelihood
def video_pixels(lmm: SlowFastVideoMLLM, path: str) -> torch.Tensor:
    """``[T, 3, S, S]`` frames of ``path`` as the plugin samples and preprocesses them."""
    from llava.video import load_video

    clip = load_video(path, lmm.num_frames, backend="pyav")
    return lmm.image_processor.preprocess(clip.frames, return_tensors="pt")["pixel_values"]


def test_loglikelihood_is_the_teacher_forced_negative_log_likelihood(lmm, videos):
    attach_docs(lmm, [{"visual": [videos["a"]]}])
    choices = ["red", "blue square", "up"]
    results = [r.text for r in lmm.loglikelihood([likelihood_request(0, "Which?", c) for c in choices])]

    pixels = video_pixels(lmm, videos["a"])
    prompt = lmm.build_prompt("Which?", 1)
    for choice, (nll, greedy) in zip(choices, results):
        prompt_ids = tokenizer_image_token(prompt, lmm.tokenizer)
        cont = lmm.tokenizer(choice, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + cont])
        with torch.no_grad():
            logits = lmm.model(ids, images=[pixels]).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1)[-len(cont) - 1 : -1]
        target = torch.tensor(cont)
        expected = -logprobs.gather(-1, target[:, None]).sum().item()
        assert nll == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert greedy == bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_does_not_depend_on_batch_size(lmm, videos):
    attach_docs(lmm, [{"visual": [videos["a"]]}, {"visual": [videos["b"]]}])
    requests = [likelihood_request(d, "Which?", c) for d in (0, 1) for c in ("red", "green", "a blue circle")]
    lmm._batch_size = 1
    alone = [r.text for r in lmm.loglikelihood(requests)]
    lmm._batch_size = 3
    try:
        batched = [r.text for r in lmm.loglikelihood(requests)]
    finally:
        lmm._batch_size = 1
    for (a, ga), (b, gb) in zip(alone, batched):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-4) and ga == gb


# ------------------------------------------------------------------------------------------ frames and protocols
def reference_wrapper_indices(video: str, num_frames: int, target_fps: float = 2) -> list[int]:
    """The frames the reference's lmms-eval wrapper reads from ``video`` with its defaults (PyAV, 2 fps),
    restated from its formula: the container's frame count and average rate (a Fraction), every
    ``max(round(rate / target_fps), 1)``-th frame from 0, then, when that gives at least ``num_frames``, the
    ``round((i + 1) * scale - 1)``-th of them with ``scale = 1.0 * len / num_frames``."""
    import av

    with av.open(video) as container:
        stream = container.streams.video[0]
        total, rate = stream.frames, stream.average_rate
    every = [i for i in range(0, total, max(round(rate / target_fps), 1))]
    if len(every) < num_frames:
        return every
    scale = 1.0 * len(every) / num_frames
    return [every[round((i + 1) * scale - 1)] for i in range(num_frames)]


def decoded_frames(video: str) -> np.ndarray:
    import av

    with av.open(video) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def reference_frames_checkpoint(tiny_checkpoint, tmp_path_factory) -> str:
    """The tiny checkpoint with its frame count only under the reference trainer's name: 96."""
    folder = tmp_path_factory.mktemp("mm_training_video_frames") / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("video_frames", None)
    config["mm_training_video_frames"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def reference_lmm(tiny_checkpoint) -> SlowFastVideoMLLM:
    # float32 and short answers keep it quick on a CPU; everything else is the preset
    return SlowFastVideoMLLM(pretrained=tiny_checkpoint, protocol="reference", num_frames=96, device="cpu",
                             dtype="float32", max_new_tokens=2)  # fmt: skip


def warnings_of(build) -> list[str]:
    messages = []
    sink = logger.add(lambda m: messages.append(str(m)), level="WARNING")
    try:
        build()
    finally:
        logger.remove(sink)
    return messages


def test_frames_default_to_mm_training_video_frames_when_the_config_has_no_video_frames(reference_frames_checkpoint):
    built = []
    messages = warnings_of(lambda: built.append(
        SlowFastVideoMLLM(pretrained=reference_frames_checkpoint, device="cpu", video_decode_backend="pyav")
    ))  # fmt: skip
    assert built[0].num_frames == 96
    assert not [m for m in messages if "frames per video" in m]


def test_a_frame_count_other_than_the_trained_one_is_warned_once(tiny_checkpoint, videos):
    holder = []
    messages = warnings_of(lambda: holder.append(
        SlowFastVideoMLLM(pretrained=tiny_checkpoint, num_frames=6, device="cpu", video_decode_backend="pyav")
    ))  # fmt: skip
    lmm = holder[0]
    attach_docs(lmm, [{"visual": [videos["a"]]}, {"visual": [videos["b"]]}])
    messages += warnings_of(lambda: lmm.generate_until([generate_request(d, "Q?", {"max_new_tokens": 2}) for d in (0, 1)]))
    frames = [m for m in messages if "frames per video" in m]
    assert len(frames) == 1 and "trained with 8 frames per video but 6" in frames[0]


def test_reference_protocol_takes_the_reference_wrappers_settings_unless_given(tiny_checkpoint):
    assert resolve_protocol("reference") == {
        "video_decode_backend": "pyav", "fps": 2.0, "dtype": "float16", "image_aspect_ratio": "crop",
        "cross_attn_decode_mode": "reference", "generation": "reference",
    }  # fmt: skip
    lmm = SlowFastVideoMLLM.create_from_arg_string(f"pretrained={tiny_checkpoint},protocol=reference,device=cpu")
    assert (lmm.model.dtype, lmm.fps, lmm.video_decode_backend) == (torch.float16, 2.0, "pyav")
    assert (lmm.image_aspect_ratio, lmm.generation, lmm.default_max_new_tokens) == ("crop", "reference", 256)
    assert lmm.model.config.cross_attn_decode_mode == "reference"
    given = SlowFastVideoMLLM.create_from_arg_string(
        f"pretrained={tiny_checkpoint},protocol=reference,device=cpu,dtype=float32,fps=none,video_decode_backend=decord,"
        "cross_attn_decode_mode=attend,image_aspect_ratio=pad,generation=task,max_new_tokens=7"
    )
    assert (given.model.dtype, given.fps, given.video_decode_backend) == (torch.float32, None, "decord")
    assert (given.image_aspect_ratio, given.generation, given.default_max_new_tokens) == ("pad", "task", 7)
    assert given.model.config.cross_attn_decode_mode == "attend"
    with pytest.raises(ValueError, match="protocol"):
        SlowFastVideoMLLM.create_from_arg_string(f"pretrained={tiny_checkpoint},protocol=paper,device=cpu")


@pytest.mark.parametrize(
    "video_fps, frames",
    [(4, 208), (8, 12), (25, 130)],
    ids=["104 candidates for 96 frames (a rounding tie)", "a clip shorter than 48 s: fewer frames", "25 fps: step 12"],
)
def test_reference_protocol_reproduces_the_reference_wrappers_frame_indices(
    reference_lmm, tmp_path, monkeypatch, video_fps, frames
):
    video = str(tmp_path / "clip.mp4")
    pixels = np.random.default_rng(frames).integers(0, 256, (frames, 16, 16, 3), dtype=np.uint8)
    write_video(pixels, video, fps=video_fps)
    expected = reference_wrapper_indices(video, 96)
    seen = []
    preprocess = reference_lmm.image_processor.preprocess
    monkeypatch.setattr(reference_lmm.image_processor, "preprocess",
                        lambda images, **kw: seen.append(images) or preprocess(images, **kw))  # fmt: skip
    attach_docs(reference_lmm, [{"visual": [video]}])
    record = reference_lmm.generate_until([generate_request(0, "Q?")])[0].token_counts.to_dict()["visuals"][0]
    assert record["frame_indices"] == expected and record["num_frames"] == len(expected)
    assert record["frame_times_s"] == [round(i / video_fps, 3) for i in expected]
    assert record["sampling"].startswith("reference") and record["backend"] == "pyav"
    np.testing.assert_array_equal(seen[0], decoded_frames(video)[expected])


def test_reference_generation_ignores_the_tasks_generation_kwargs(tiny_checkpoint, videos, monkeypatch):
    lmm = SlowFastVideoMLLM(pretrained=tiny_checkpoint, protocol="reference", max_new_tokens=6, device="cpu",
                            dtype="float32")  # fmt: skip
    attach_docs(lmm, [{"visual": [videos["a"]]}])
    calls, outputs = [], []
    real_generate = lmm.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs)
        outputs.append(real_generate(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(lmm.model, "generate", spy)
    task_asks = {"max_new_tokens": 2, "temperature": 0.9, "top_p": 0.5, "num_beams": 2, "until": ["a", "e", "o", " "]}
    answer = lmm.generate_until([generate_request(0, "Describe it.", task_asks)])[0].text
    assert (calls[0]["max_new_tokens"], calls[0]["do_sample"], calls[0]["num_beams"]) == (6, False, 1)
    assert "stopping_criteria" not in calls[0]  # the task's stop strings neither stop nor cut the answer
    tokens = outputs[0][0].tolist()
    eos = [i for i, t in enumerate(tokens) if t in calls[0]["eos_token_id"]]
    assert answer == lmm.tokenizer.decode(tokens[: eos[0] + 1 if eos else None], skip_special_tokens=True).strip()


def test_reference_protocol_centre_crops_single_images(reference_lmm, monkeypatch):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    attach_docs(reference_lmm, [{"visual": [image]}])
    encoded = []
    real_encode = reference_lmm.model.encode_images
    monkeypatch.setattr(reference_lmm.model, "encode_images",
                        lambda images: encoded.append(images) or real_encode(images))  # fmt: skip
    result = reference_lmm.generate_until([generate_request(0, "What color?", {"max_new_tokens": 2})])[0]
    cropped = reference_lmm.image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(encoded[0][0], cropped)
    assert result.token_counts.to_dict()["visuals"] == [{"image": [80, 48], "preprocess": "crop"}]


def test_log_record_counts_the_prompt_tokens_cut_at_tokenizer_model_max_length(lmm, videos, monkeypatch):
    attach_docs(lmm, [{"visual": [videos["a"]]}])
    request = generate_request(0, "Which way does the square move, and how fast is it going?", {"max_new_tokens": 2})
    whole = lmm.generate_until([request])[0].token_counts
    assert whole.truncated_tokens == 0
    monkeypatch.setattr(lmm.model.config, "tokenizer_model_max_length", whole.input_tokens - 3)
    cut = lmm.generate_until([request])[0].token_counts
    assert (cut.truncated_tokens, cut.input_tokens) == (3, whole.input_tokens - 3)
    assert cut.to_dict()["truncated_tokens"] == 3


# ------------------------------------------------------------------------------------------ real runs
EVAL_SCRIPTS = {
    "videomme": "videomme", "videomme_w_subtitle": "videomme_w_subtitle", "mlvu": "mlvu_dev",
    "mvbench": "mvbench", "egoschema": "egoschema", "longvideobench": "longvideobench_val_v",
    "perceptiontest": "perceptiontest_val_mc", "nextqa": "nextqa_mc_test", "activitynetqa": "activitynetqa",
    "tempcompass": "tempcompass_multi_choice",
}  # fmt: skip


def test_eval_scripts_name_real_lmms_eval_tasks():
    import re

    from lmms_eval.tasks import TaskManager

    known = set(TaskManager(verbosity="ERROR").all_tasks)
    for script, task in EVAL_SCRIPTS.items():
        text = (ROOT / "scripts" / "eval" / f"{script}.sh").read_text()
        named = re.search(r"run_lmms_eval\.sh\" (\S+)", text)
        assert named and named.group(1) == task, f"{script}.sh should run {task}"
        assert task in known, f"{task} is not an lmms-eval task"
    all_sh = (ROOT / "scripts" / "eval" / "all.sh").read_text()
    assert all(name in all_sh for name in EVAL_SCRIPTS)


def _results(out: Path) -> dict:
    files = glob.glob(str(out / "*" / "*_results.json"))
    assert len(files) == 1, f"expected one results file under {out}, found {files}"
    return json.loads(Path(files[0]).read_text())


def _run(command: list[str], tmp_path: Path, **env: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false", **env}  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_a_failure_inside_lmms_eval_makes_the_script_exit_non_zero_with_the_reason(tmp_path):
    # lmms-eval itself logs "Error during evaluation" and exits 0 when the model cannot be built.
    missing = tmp_path / "no_such_checkpoint"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CKPT": str(missing), "NUM_PROCESSES": "1",
           "OUTPUT_DIR": str(tmp_path / "out"), "PYTHON": sys.executable}  # fmt: skip
    command = ["bash", "scripts/eval/run_lmms_eval.sh", "synthetic_video_qa", "--include_path", "playground/lmms_eval_tasks"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    reason = proc.stderr.strip().splitlines()[-1]
    assert reason.startswith("lmms-eval failed: Error during evaluation:") and str(missing) in reason


def test_lmms_eval_runs_the_local_task_in_one_and_two_processes(tiny_checkpoint, tmp_path):
    from playground.lmms_eval_tasks.synthetic_video_qa.prepare import prepare

    summary = prepare()
    tasks = "synthetic_video_qa,synthetic_video_qa_mc"
    include = ["--include_path", "playground/lmms_eval_tasks", "--seed", "0"]

    # One process, through the project's evaluation script.
    script_env = dict(CKPT=tiny_checkpoint, NUM_PROCESSES="1", BATCH_SIZE="4", DECODE_MODE="attend",
                      OUTPUT_DIR=str(tmp_path / "one"), PYTHON=sys.executable)  # fmt: skip
    _run(["bash", "scripts/eval/run_lmms_eval.sh", tasks, *include], tmp_path, **script_env)
    single = _results(tmp_path / "one")
    for task in tasks.split(","):
        assert single["n-samples"][task]["effective"] == summary["num_docs"]
    accuracy = single["results"]["synthetic_video_qa"]["accuracy,none"]
    mc_accuracy = single["results"]["synthetic_video_qa_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 100.0 and 0.0 <= mc_accuracy <= 1.0
    assert glob.glob(str(tmp_path / "one" / "*" / "*_samples_synthetic_video_qa.jsonl"))

    # Two processes: each scores half of the documents; the gathered results are the same.
    model_args = f"pretrained={tiny_checkpoint},num_frames=8,device=cpu,batch_size=4,cross_attn_decode_mode=attend"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631"]
    lmms = ["-m", "lmms_eval", "--model", "slowfast_videomllm", "--model_args", model_args, "--tasks", tasks,
            *include, "--output_path", str(tmp_path / "two")]  # fmt: skip
    _run([sys.executable, "-m", "llava.eval.checked_run", "--", *torchrun, *lmms], tmp_path)
    double = _results(tmp_path / "two")
    assert double["n-samples"] == single["n-samples"]
    assert double["results"]["synthetic_video_qa"]["accuracy,none"] == accuracy
    assert double["results"]["synthetic_video_qa_mc"]["acc,none"] == pytest.approx(mc_accuracy)


def test_script_runs_the_reference_protocol_and_logs_each_videos_frames(tiny_checkpoint, tmp_path):
    from playground.lmms_eval_tasks.synthetic_video_qa.prepare import prepare

    prepare()
    # fp32 and short answers only keep the run quick on a CPU
    env = dict(CKPT=tiny_checkpoint, NUM_PROCESSES="1", PROTOCOL="reference",
               EXTRA_MODEL_ARGS="dtype=float32,max_new_tokens=4", OUTPUT_DIR=str(tmp_path / "out"),
               PYTHON=sys.executable)  # fmt: skip
    command = ["bash", "scripts/eval/run_lmms_eval.sh", "synthetic_video_qa", "--include_path",
               "playground/lmms_eval_tasks", "--limit", "3"]  # fmt: skip
    _run(command, tmp_path, **env)
    (samples_file,) = glob.glob(str(tmp_path / "out" / "*" / "*_samples_synthetic_video_qa.jsonl"))
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    assert len(samples) == 3
    for sample in samples:
        (record,) = sample["token_counts"][0]["visuals"]
        assert record["sampling"] == "reference, 2 fps" and record["backend"] == "pyav"
        assert record["frame_indices"] == reference_wrapper_indices(record["path"], 8)
        assert len(record["frame_times_s"]) == record["num_frames"] == len(record["frame_indices"])
