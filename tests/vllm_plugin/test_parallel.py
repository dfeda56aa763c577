"""Tensor parallelism 2 on vLLM's CPU backend: the hybrid layers' projections split by head, the gate reduced over
the shards; the greedy tokens stay the transformers model's."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

from .conftest import request_spec as _request


def test_tensor_parallel_2_gives_the_transformers_tokens(checkpoints, reference, media, python_for_subprocess,
                                                        workdir):
    names = ["video8", "text", "image"]
    requests = [_request(n, media) for n in names]
    script = workdir / "tensor_parallel.py"
    script.write_text(textwrap.dedent(f"""
        import json, numpy as np
        from PIL import Image
        from vllm import LLM, SamplingParams

        def prompt(r):
            p = {{"prompt": r["prompt"]}}
            if r.get("video"):
                p["multi_modal_data"] = {{"video": np.load(r["video"])}}
            elif r.get("image"):
                p["multi_modal_data"] = {{"image": Image.fromarray(np.load(r["image"]))}}
            return p

        def main():
            requests = json.loads({json.dumps(requests)!r})
            llm = LLM(model={checkpoints['released']!r}, dtype="float32", max_model_len=1024, max_num_seqs=2,
                      seed=0, tensor_parallel_size=2, enforce_eager=True)
            params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
            out = llm.generate([prompt(r) for r in requests], params, use_tqdm=False)
            print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in out]))

        if __name__ == "__main__":
            main()
    """))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    done = subprocess.run([python_for_subprocess, str(script)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=workdir)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TOKENS ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    tokens = json.loads(lines[-1].split(" ", 1)[1])
    assert tokens == [reference["released"][n]["tokens"] for n in names]
