"""``from_pretrained(..., tp_plan="auto")``: the model shards over 2 CPU processes (gloo) and computes the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import tiny_model

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    sys.path.insert(0, sys.argv[3])
    from conftest import prompt_ids, random_video
    from llava.model import LlavaQwenSlowFastForCausalLM

    path, out = sys.argv[1], sys.argv[2]
    sharded = LlavaQwenSlowFastForCausalLM.from_pretrained(path, tp_plan="auto")
    whole = LlavaQwenSlowFastForCausalLM.from_pretrained(path)
    ids, video = prompt_ids(4, 6), random_video(8)
    with torch.no_grad():
        diff = (sharded(ids, images=[video]).logits - whole(ids, images=[video]).logits).abs().max().item()
    tokens = sharded.generate(ids, images=[video], max_new_tokens=5, do_sample=False).tolist()
    expected = whole.generate(ids, images=[video], max_new_tokens=5, do_sample=False).tolist()
    attn = sharded.model.layers[0].self_attn
    local = lambda p: tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
    own_q = attn.cross_attn_q_proj
    result = dict(diff=diff, tokens=tokens, expected=expected, q=local(attn.q_proj.weight),
                  kv=local(attn.cross_attn_kv_proj.weight), gate=local(attn.cross_attn_gate_proj[0].weight),
                  own_q=None if own_q is None else local(own_q.weight))
    with open(f"{out}.{os.environ['RANK']}.json", "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.parametrize("query_source, port", [("self_attn", 29645), ("own", 29646)])
def test_tp_plan_auto_shards_the_hybrid_layers_and_matches_the_unsharded_model(tmp_path, query_source, port):
    model = tiny_model(cross_attn_query_source=query_source)
    model.save_pretrained(tmp_path / "ckpt")
    script = tmp_path / "tp.py"
    script.write_text(SCRIPT)
    tests_dir = Path(__file__).resolve().parent
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(script), str(tmp_path / "ckpt"), str(tmp_path / "result"), str(tests_dir)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    hidden, heads, kv_heads = 64, 4, 2
    head_dim = hidden // heads
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}.json").read_text())
        assert result["diff"] < 1e-4
        assert result["tokens"] == result["expected"]
        assert result["q"] == [heads * head_dim // 2, hidden]  # query heads split over the 2 ranks
        assert result["kv"] == [2 * kv_heads * head_dim // 2, hidden]  # one key/value head (its [k, v]) per rank
        assert result["gate"] == [1, heads * head_dim // 2]  # the gate reads the local heads, reduced like o_proj
        # an own query is split by head like q_proj
        assert result["own_q"] == (None if query_source == "self_attn" else [heads * head_dim // 2, hidden])
