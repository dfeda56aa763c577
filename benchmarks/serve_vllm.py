"""vLLM beside the project's server in ``python -m benchmarks --only serve``: the same checkpoint, the same streamed
requests and the same modes (one at a time, then all at once), in the same run.

vLLM runs in its own environment (``.venv-vllm``, built by ``.ci/lane_vllm.sh``; vLLM's CUDA build on a GPU machine),
named by ``SLOWFAST_VLLM_PYTHON`` or found at ``.venv-vllm/bin/python`` (at ``--smoke``, the test suite's scale,
only when ``SLOWFAST_VLLM_PYTHON`` is set). Its OpenAI server starts in a child process on
a free loopback port with the ``slowfast`` plugin, the checkpoint's trained frame count and greedy requests of
``max_tokens`` new tokens (``ignore_eos``). Without such an environment the benchmark says so in its notes and
measures the project's server alone.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import least_disturbed, time_requests

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = REPO / "assets" / "tiny-slowfast" / "chat_template.jinja"  # the qwen_1_5 prompt
STARTUP_TIMEOUT_S = 600
MEMORY_LIMIT_BYTES = 16 * 2**30  # the CPU server's address space (prlimit; its KV cache is 1 GiB): a shared machine


def vllm_python() -> str | None:
    """The vLLM environment's interpreter, or None when there is none."""
    named = os.environ.get("SLOWFAST_VLLM_PYTHON")
    if named:
        return named if Path(named).exists() else None
    default = REPO / ".venv-vllm" / "bin" / "python"
    return str(default) if default.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` on ``checkpoint`` (what ``vllm serve`` runs)."""

    def __init__(self, python: str, checkpoint: str, device: str, dtype: str, max_seqs: int, log_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--served-model-name", "bench",
            "--host", "127.0.0.1", "--port", str(self.port), "--dtype", dtype, "--max-model-len", "4096",
            "--max-num-seqs", str(max_seqs), "--chat-template", str(CHAT_TEMPLATE), "--disable-log-stats",
        ]
        if device == "cuda":  # the project's model still holds its weights on the same GPU
            # eager, as the plugin's tests run it: CUDA graph capture of its per-step logic is untested
            command += ["--gpu-memory-utilization", "0.45", "--enforce-eager"]
        elif shutil.which("prlimit"):
            command = ["prlimit", f"--as={MEMORY_LIMIT_BYTES}", *command]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "vllm-server.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server exited: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"the vLLM server was not ready in {STARTUP_TIMEOUT_S} s (log: {self.log_path})")

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def measure(ctx, model, tokenizer, requests: list, max_tokens: int,
            request_fn: Callable[[Any, Any, int], dict]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows ``vllm sequential`` / ``vllm concurrent`` (best run of ``ctx.repeats`` by wall time) and notes.

    ``model``/``tokenizer`` are saved to a temporary checkpoint (the random-weight scales exist only in memory);
    ``request_fn(client, messages, max_tokens)`` is the project server's streamed request, reused as is.
    """
    if ctx.scale == "smoke" and not os.environ.get("SLOWFAST_VLLM_PYTHON"):  # the test suite's scale stays vLLM-free
        return [], ["vLLM: not measured at the smoke scale unless SLOWFAST_VLLM_PYTHON names its environment."]
    python = vllm_python()
    if python is None:
        return [], ["vLLM: not measured, no vLLM environment (.venv-vllm or SLOWFAST_VLLM_PYTHON; see docs/vllm.md, "
                    "'Serving at scale with vLLM')."]
    import openai

    runs: dict[str, list[dict[str, Any]]] = {"vllm sequential": [], "vllm concurrent": []}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dtype = ctx.dtype_name
        server = VllmServer(python, folder, "cuda" if ctx.device.startswith("cuda") else "cpu", dtype, len(requests),
                            Path(ctx.out_dir))
        try:
            ctx.log("  vLLM: starting its OpenAI server on the same checkpoint")
            server.wait_ready()
            with openai.OpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0, timeout=600) as client:
                send = lambda messages: request_fn(client, messages, max_tokens)
                send(requests[0])  # warm-up
                for _ in range(ctx.repeats):
                    for mode, results in runs.items():
                        result = time_requests(mode, send, requests)
                        results.append(result)
                        ctx.log(f"  {mode}: {result['requests_per_s']:.2f} requests/s, time to first token "
                                f"{result['ttft_ms_mean']:.0f} ms mean")
        finally:
            server.close()
    rows = least_disturbed(runs)
    for row in rows:
        row.update(batches=None, largest_batch=None)  # vLLM's scheduler does not report them
    notes = [
        "vLLM rows: vLLM's OpenAI server with the slowfast plugin on the same checkpoint, same requests and modes "
        f"(continuous batching, up to {len(requests)} sequences; {dtype}). vLLM keeps no encoded video between "
        "requests (its encoder-decoder path has no multimodal cache), so every vLLM request decodes and encodes the "
        "video again, where the project's server finds it in its cache.",
    ]
    return rows, notes
