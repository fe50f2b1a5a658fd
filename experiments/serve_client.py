"""The serving benchmark's side of the wire: the server as a subprocess, one completion request
over HTTP (streamed or not), and the requests a load test sends, well-formed and malformed.

The HTTP side is the standard library's (`http.client`, threads), plus numpy for the prompts:
the benchmark's client shares the machine with the server it measures, so it stays light, and
it imports neither jax nor the server.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from genai_jax.errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m experiments.serve ARGS --port=P` on 127.0.0.1, its output in a temporary file
    (a pipe nobody reads would block it), stopped with SIGTERM."""

    def __init__(self, args: list[str]):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve_", suffix=".log", delete=False)
        self.command = [sys.executable, "-m", "experiments.serve", *args, f"--port={self.port}"]
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=pathlib.Path(__file__).resolve().parents[1])

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output, each line indented (so no line of it reads as this
        program's own `error:` line)."""
        text = pathlib.Path(self.log.name).read_text(errors="replace")[-chars:]
        return "\n".join("  " + line for line in text.splitlines())

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until GET /healthz answered 200; UserError with the server's output if it
        exits first or does not answer within `timeout_s`."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise UserError(f"the server exited with status {self.proc.returncode} before "
                                f"it was ready ({' '.join(self.command)}); its output ends:\n"
                                f"{self.log_tail()}")
            try:
                status, _ = get(self.port, "/healthz", timeout=5)
                if status == 200:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise UserError(f"the server did not answer GET /healthz with 200 within {timeout_s:.0f} "
                        f"s (--startup_timeout); its output ends:\n{self.log_tail()}")

    def rss_bytes(self) -> int | None:
        """The server's resident memory (VmRSS of /proc/PID/status)."""
        try:
            for line in pathlib.Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM, then the exit status (None if it had to be killed after `timeout_s`)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        self.log.close()
        return self.proc.returncode

    def remove_log(self) -> None:
        os.unlink(self.log.name)


def get(port: int, path: str, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclasses.dataclass
class Reply:
    """What one completion request got: HTTP status, generated tokens, seconds to the first
    token and to the end, and the error of a refused or broken request."""

    status: int
    tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    error: str = ""
    done: bool = False  # a stream that ended with `data: [DONE]`, or a complete JSON body


def complete(port: int, body: bytes | dict, timeout: float = 600) -> Reply:
    """POST /v1/completions with `body` (a dict, or raw bytes to send as they are). A streamed
    request counts its tokens from the usage chunk (`stream_options.include_usage`) where the
    server sends one, else one per chunk that carries a choice; a plain one from `usage`."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    stream = isinstance(body, dict) and body.get("stream", False)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=data,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return Reply(response.status, error=response.read()[:300].decode(errors="replace"))
        if not stream:
            out = json.loads(response.read())
            end = time.perf_counter() - t0
            return Reply(200, tokens=out.get("usage", {}).get("completion_tokens", 0),
                         ttft_s=end, latency_s=end, done=bool(out.get("choices")))
        reply, chunks, usage = Reply(200), 0, None
        for raw in response:  # SSE: `data: {...}` lines, blank lines between events
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                reply.done = True
                break
            event = json.loads(payload)
            if event.get("usage"):
                usage = event["usage"].get("completion_tokens", usage)
            if event.get("choices"):
                chunks += 1
                if reply.ttft_s is None:
                    reply.ttft_s = time.perf_counter() - t0
        reply.latency_s = time.perf_counter() - t0
        reply.tokens = usage if usage is not None else chunks
        return reply
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Reply(0, error=f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def benchmark_request(prompt: list[int], max_tokens: int, model: str | None,
                      stream: bool = True) -> dict:
    """A greedy request that runs to `max_tokens` whatever the model says."""
    body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body if model is None else dict(body, model=model)


# Each malformed request breaks one rule; the load test cycles through them.
MALFORMED = ("missing prompt", "prompt of the wrong type", "max_tokens of the wrong type",
             "max_tokens beyond the context", "unknown model", "negative temperature",
             "token id outside the vocabulary", "top_p above 1", "bad JSON", "not an object")


def malformed_request(kind: str, good: dict, vocab_size: int) -> bytes | dict:
    if kind == "missing prompt":
        return {k: v for k, v in good.items() if k != "prompt"}
    if kind == "prompt of the wrong type":
        return dict(good, prompt={"text": "hello"})
    if kind == "max_tokens of the wrong type":
        return dict(good, max_tokens="many")
    if kind == "max_tokens beyond the context":
        return dict(good, max_tokens=10 ** 7)
    if kind == "unknown model":
        return dict(good, model="no-such-model-here")
    if kind == "negative temperature":
        return dict(good, temperature=-1.0)
    if kind == "token id outside the vocabulary":
        return dict(good, prompt=[1, vocab_size + 7])
    if kind == "top_p above 1":
        return dict(good, top_p=1.5)
    if kind == "bad JSON":
        return json.dumps(good).encode()[:-7]
    if kind == "not an object":
        return b"[1, 2, 3]"
    raise ValueError(kind)


def load_requests(n: int, malformed_fraction: float, prompt_tokens: int, max_tokens: int,
                  vocab_size: int, model: str | None, seed: int) -> list[tuple[bool, object]]:
    """`n` requests as (well_formed, body), a `malformed_fraction` of them malformed (kinds in
    turn, at random positions). The well-formed ones vary: prompt length 1..prompt_tokens,
    max_tokens 1..max_tokens, streamed or not, greedy or sampled."""
    rng = np.random.default_rng(seed)
    bad = set(rng.choice(n, size=round(n * malformed_fraction), replace=False).tolist())
    out, k = [], 0
    for i in range(n):
        length = int(rng.integers(1, prompt_tokens + 1))
        body = benchmark_request(rng.integers(0, vocab_size, length).tolist(),
                                 int(rng.integers(1, max_tokens + 1)), model, stream=i % 2 == 0)
        if i % 3 == 0:
            body.update(temperature=0.8, top_k=20, seed=i)
        if i in bad:
            out.append((False, malformed_request(MALFORMED[k % len(MALFORMED)], body, vocab_size)))
            k += 1
        else:
            out.append((True, body))
    return out
