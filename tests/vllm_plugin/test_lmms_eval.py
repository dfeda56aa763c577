"""lmms-eval's own vLLM backend (``--model vllm --force_simple``: lmms-eval 0.7.3's chat variant decodes videos with
qwen-vl-utils; the simple one sends each sampled frame as an image, which the plugin reads as one video) scores the offline synthetic task through the plugin, and gives
the answers of the project's lmms-eval model (``slowfast_videomllm``, run in the main environment) on the committed
tiny checkpoint."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REFERENCE_PYTHON, REPO

import lmms_eval  # noqa: F401  (installed by .ci/lane_vllm.sh: without it this module fails, it is not skipped)

TINY = REPO / "assets" / "tiny-slowfast"
TASK = "synthetic_video_qa"
FRAMES = 16  # the checkpoint's trained count, and the task's frames per video


def _lmms_eval(python: str, model: str, model_args: str, out: Path, env: dict[str, str], extra: tuple = ()) -> list[dict]:
    command = [python, "-m", "lmms_eval", "--model", model, *extra, "--model_args", model_args, "--tasks", TASK,
               "--include_path", "playground/lmms_eval_tasks", "--batch_size", "4", "--log_samples", "--seed", "0",
               "--output_path", str(out)]
    env = {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "hf_datasets"),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (samples_file,) = glob.glob(str(out / "*" / f"*_samples_{TASK}.jsonl"))
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    (results_file,) = glob.glob(str(out / "*" / "*_results.json"))
    assert json.loads(Path(results_file).read_text())["results"][TASK]["accuracy,none"] >= 0
    return sorted(samples, key=lambda s: s["doc_id"])


def test_lmms_eval_vllm_backend_gives_the_answers_of_the_project_model(workdir):
    main_env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    main_env["PYTHONPATH"] = str(REPO)
    prepared = subprocess.run(
        [REFERENCE_PYTHON, "-c", "from playground.lmms_eval_tasks.synthetic_video_qa.prepare import prepare; prepare()"],
        cwd=REPO, env=main_env, capture_output=True, text=True, timeout=600,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    project = _lmms_eval(REFERENCE_PYTHON, "slowfast_videomllm",
                         f"pretrained={TINY},num_frames={FRAMES},device=cpu,dtype=float32,video_decode_backend=decord",
                         workdir / "lmms-project", main_env)
    vllm_env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    served = _lmms_eval(sys.executable, "vllm",
                        f"model={TINY},max_frame_num={FRAMES},dtype=float32,max_model_len=1024,enforce_eager=True",
                        workdir / "lmms-vllm", vllm_env, extra=("--force_simple",))
    assert [s["doc_id"] for s in served] == [s["doc_id"] for s in project]
    answers = [(s["doc_id"], s["filtered_resps"]) for s in served]
    assert answers == [(s["doc_id"], s["filtered_resps"]) for s in project]
    assert [s["accuracy"]["correct"] for s in served] == [s["accuracy"]["correct"] for s in project]
