"""How quickly the API server refuses what it should, and whether it keeps answering others meanwhile.

    python -m benchmarks.refusals                                  # this tree's server
    python -m benchmarks.refusals --baseline /path/to/old/tree     # and an older tree's, side by side

Each server runs as its own process (``python -m llava.serve.api`` on ``assets/tiny-slowfast``, a free
loopback port, ``--max-body-mb 32``), so its peak memory is its own: the script resets the process's peak
resident size (``/proc/PID/clear_refs``, Linux) before each request and reads it after. Cases:

* ``prompt``: a 24 MiB text message (``"word " * 5 Mi``) answered with 400: time, and peak memory above the
  resident size before the request;
* ``one keyframe``: a 1280x720 H.264 file of 60,000 frames with a single keyframe (written once with PyAV into
  ``--cache``; sampling it uniformly means decoding every frame) sent as a data URL: time to the answer,
  while a second client keeps asking a text-only question; its answers and their slowest latency are counted;
  then two such files at once (the old server's two decoding threads were then both busy);
* ``one keyframe, time limit``: the same file with ``--max-decode-frames`` out of the way, so that
  ``--max-decode-seconds 5`` stops it (this tree only).

The figures are printed as a table; they are not asserted anywhere.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "assets" / "tiny-slowfast"
PROMPT_BYTES = 24 * 2**20


def _status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M)[1]) * 1024


class Server:
    """``python -m llava.serve.api`` in a child process, from ``source`` (a tree holding ``llava/``)."""

    def __init__(self, source: Path, extra: list[str], memory_cap: int) -> None:
        env = dict(os.environ, PYTHONPATH=str(source))

        def cap() -> None:  # the old server tokenized a whole 24 MiB prompt: bound what it may take
            resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))

        command = [sys.executable, "-m", "llava.serve.api", "--model-path", str(CHECKPOINT), "--port", "0",
                   "--max-body-mb", "32", "--log-level", "warning", *extra]
        self.process = subprocess.Popen(command, cwd=source, env=env, text=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, preexec_fn=cap)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stderr], daemon=True).start()
        deadline = time.monotonic() + 300
        self.url = None
        while self.url is None:
            found = re.search(r"at (http://\S+)/v1", lines.get(timeout=max(0.1, deadline - time.monotonic())))
            self.url = found[1] if found else None

    def request(self, body: bytes) -> tuple[int, float, int]:
        """``(status, seconds, peak bytes above the resident size before)`` of one chat request (with requests
        sent at once, each reads the peak of all)."""
        pid = self.process.pid
        before = _status(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        start = time.perf_counter()
        response = httpx.post(f"{self.url}/v1/chat/completions", content=body, timeout=600,
                              headers={"content-type": "application/json"})
        seconds = time.perf_counter() - start
        return response.status_code, seconds, _status(pid, "VmHWM") - before

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def _body(content: list | str) -> bytes:
    return json.dumps({"model": "tiny-slowfast", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()


def one_keyframe_video(path: Path, frames: int = 60_000, width: int = 1280, height: int = 720,
                       keyframe_every: int | None = None, noise: bool = True) -> Path:
    """A ``width`` x ``height`` H.264 MP4 (no B-frames) of ``frames`` copies of one image (noise, or flat grey)
    with a single keyframe, or one every ``keyframe_every`` frames; kept if ``path`` exists."""
    if path.exists():
        return path
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    gop = str(keyframe_every or 2 * frames)
    with av.open(str(partial), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "g": gop, "keyint_min": gop, "sc_threshold": "0", "bframes": "0",
                          "tune": "zerolatency"}
        shape = (height, width, 3)
        image = (np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8) if noise
                 else np.full(shape, 90, np.uint8))
        frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        for i in range(frames):
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    partial.rename(path)
    return path


def remuxed(path: Path, tag: str) -> Path:
    """A copy of ``path`` with the same packets and ``tag`` as its title (other bytes: not in the video cache)."""
    import av

    copy = path.with_name(f"{path.stem}-{tag}{path.suffix}")
    if copy.exists():
        return copy
    with av.open(str(path)) as source, av.open(str(copy), mode="w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        target.metadata["title"] = tag
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    return copy


def _clip(video: Path) -> bytes:
    return _body([{"type": "video_url", "video_url": {
        "url": "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()}},
        {"type": "text", "text": "What happens?"}])


def while_busy(server: Server, bodies: list[bytes]) -> dict[str, float]:
    """Send ``bodies`` at once; meanwhile another client asks a text-only question again and again. Reports the
    slowest of them and the server's peak memory above its size before."""
    answered: list[float] = []
    done = threading.Event()

    def other() -> None:
        with httpx.Client(timeout=600) as client:
            while not done.is_set():
                start = time.perf_counter()
                reply = client.post(f"{server.url}/v1/chat/completions", content=_body("Say hello."),
                                    headers={"content-type": "application/json"})
                if reply.status_code == 200 and not done.is_set():
                    answered.append(time.perf_counter() - start)

    thread = threading.Thread(target=other, daemon=True)
    thread.start()
    time.sleep(0.5)  # the other client is under way
    results: list[tuple[int, float, int]] = []
    senders = [threading.Thread(target=lambda b=b: results.append(server.request(b))) for b in bodies]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(600)
    done.set()
    thread.join(600)
    statuses = sorted({status for status, _, _ in results})
    return {"status": "/".join(map(str, statuses)), "seconds": max(s for _, s, _ in results),
            "peak": max(p for _, _, p in results), "others": len(answered),
            "slowest_other": max(answered, default=float("nan"))}


def run_tree(name: str, source: Path, video: Path, new_flags: bool, memory_cap: int) -> list[dict]:
    rows = []
    prompt = _body("word " * (PROMPT_BYTES // 5))
    clips = [_clip(remuxed(video, tag)) for tag in ("a", "b", "c", "d")]  # four files the cache has not seen
    server = Server(source, [], memory_cap)
    try:
        server.request(_body("Say hello."))  # warm up
        status, seconds, peak = server.request(prompt)
        rows.append({"tree": name, "case": "24 MiB prompt", "status": status, "seconds": seconds, "peak": peak})
        rows.append({"tree": name, "case": "60,000 frames, one keyframe", **while_busy(server, clips[:1])})
        rows.append({"tree": name, "case": "two of them at once", **while_busy(server, clips[1:3])})
    finally:
        server.close()
    if new_flags:
        server = Server(source, ["--max-decode-frames", "100000000", "--max-decode-seconds", "5"], memory_cap)
        try:
            server.request(_body("Say hello."))
            rows.append({"tree": name, "case": "60,000 frames, time limit 5 s", **while_busy(server, clips[3:])})
        finally:
            server.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.refusals", description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="an older source tree to measure too")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slowfast-refusals"),
                        help="folder for the generated 60,000-frame video")
    parser.add_argument("--memory-cap-gb", type=float, default=12.0,
                        help="address space each server process may take (default 12 GiB)")
    args = parser.parse_args(argv)
    cap = int(args.memory_cap_gb * 2**30)
    video = one_keyframe_video(args.cache / "one_keyframe_1280x720_60000.mp4")
    rows = run_tree("this tree", REPO, video, True, cap)
    if args.baseline is not None:
        rows = run_tree(f"baseline ({args.baseline})", args.baseline, video, False, cap) + rows
    print(f"{'tree':<28} {'case':<32} {'status':>7} {'seconds':>8} {'peak MiB':>9} {'others answered':>16} "
          f"{'slowest other s':>16}")
    for row in rows:
        print(f"{row['tree'][:28]:<28} {row['case']:<32} {row['status']:>7} {row['seconds']:>8.2f} "
              f"{row['peak'] / 2**20:>9.0f} {row.get('others', ''):>16} "
              f"{row.get('slowest_other', float('nan')):>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
