"""Measure the HTTP server end to end: start `experiments.serve`, send it concurrent completion
requests, print one JSON line of figures (the last line of stdout), stop it with SIGTERM.

    python -m experiments.serve_bench --workdir=runs/shakespeare_char   # 16 clients, 16 + 40
    python -m experiments.serve_bench --workdir=runs/serve_gpt2 --prompt_tokens=32 \\
        --max_tokens=64 --peer=../shared/bench/hf_generate_ref.py --hf_dir=runs/serve_gpt2_hf
    python -m experiments.serve_bench --workdir=runs/shakespeare_char --clients=32 \\
        --load_requests=1000 --malformed_fraction=0.1

Throughput (the default mode): every request is greedy, a prompt of exactly `--prompt_tokens`
random token ids (seeded) sent as a list of ids, `max_tokens=--max_tokens` with `ignore_eos`
(so every request generates that many), streamed so that the time to the first token is seen
(`--nostream` measures the same requests answered in one piece: what streaming costs).
After one untimed warm-up round, each of `--rounds` rounds sends the same
`--clients` x `--requests_per_client` requests twice: from one client, one after another, then
from `--clients` concurrent clients (threads), each sending its share in turn. `tokens_per_s` is
all generated tokens over the concurrent phase's wall time (median over rounds), and
`batching_speedup` its ratio to the single client's; latencies and times to first token are
percentiles over every concurrent request of every round.

`--peer=hf_generate_ref.py --hf_dir=DIR` runs that script (Hugging Face `transformers`
`generate` on PyTorch, one request at a time and all in one padded batch) after the server has
stopped, on the same requests' shape, and reports our ratio to each of its figures: DIR should
hold the same weights (`experiments.export_checkpoint` of the workdir served).

`--load_requests=N` (load mode, instead of the throughput rounds): `--clients` threads send N
requests of varied shapes, a `--malformed_fraction` of them malformed in each of the ways of
`serve_client.MALFORMED`, and the JSON counts the well-formed ones answered (200 and a complete
answer), the malformed ones refused with a 4xx, any 5xx and connection errors, and the server's
resident memory after the warm-up and after the run.
"""

from __future__ import annotations

import importlib.metadata
import json
import pathlib
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from experiments import serve_client as client
from experiments.cli import parse_flags
from genai_jax.errors import UserError
from genai_jax.tokenization import load_tokenizer

_WORKDIR = flags.DEFINE_string("workdir", None, "a trained run to serve (or --export)")
_EXPORT = flags.DEFINE_string("export", None, "an export directory to serve (or --workdir)")
_CLIENTS = flags.DEFINE_integer("clients", 16, "concurrent clients")
_PROMPT = flags.DEFINE_integer("prompt_tokens", 16, "prompt length in tokens (random ids)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 40, "tokens generated per request")
_PER_CLIENT = flags.DEFINE_integer("requests_per_client", 1, "requests each concurrent client "
                                   "sends per round, one after another")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "timed rounds (each: one client, then all)")
_STREAM = flags.DEFINE_bool("stream", True, "stream the answers (server-sent events, one per "
                            "token); --nostream: one JSON answer each, time to first token = "
                            "latency")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the random prompts")
_SLOTS = flags.DEFINE_integer("slots", None, "the server's --slots (default: --clients, so that "
                              "every client's request can decode in the same batch)")
_SERVER_FLAGS = flags.DEFINE_multi_string("server_flag", [], "more flags for the server, e.g. "
                                          "--server_flag=--max_queue=64")
_STARTUP = flags.DEFINE_float("startup_timeout", 600, "seconds to wait for GET /healthz")
_PEER = flags.DEFINE_string("peer", None, "path of hf_generate_ref.py, run on --hf_dir")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "the Hugging Face export of the served weights")
_LOAD = flags.DEFINE_integer("load_requests", 0, "load mode: send this many requests")
_MALFORMED = flags.DEFINE_float("malformed_fraction", 0.1, "load mode: the malformed share")


def cpu_model() -> str:
    """lscpu's "Model name", else the platform's guess."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def in_threads(clients: int, work: list, send) -> tuple[list, float]:
    """`send(item)` for every item of `work` from `clients` threads taking items in turn; the
    replies in `work`'s order and the wall time."""
    todo: queue.Queue = queue.Queue()
    for i, item in enumerate(work):
        todo.put((i, item))
    replies = [None] * len(work)

    def worker():
        while True:
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            replies[i] = send(item)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies, time.perf_counter() - t0


def checked(replies: list[client.Reply], max_tokens: int) -> list[client.Reply]:
    """The replies, or UserError naming the first that is not a complete `max_tokens` answer."""
    for r in replies:
        if r.status != 200 or not r.done or r.tokens != max_tokens:
            raise UserError(f"a benchmark request got status {r.status}, {r.tokens} tokens of "
                            f"{max_tokens}, {'complete' if r.done else 'incomplete'}: "
                            f"{r.error or 'no error text'}")
    return replies


def throughput(server: client.Server, vocab_size: int, model: str | None) -> dict:
    """The rounds of the default mode: one client, then `--clients` at once."""
    rng = np.random.default_rng(_SEED.value)
    n, m = _CLIENTS.value * _PER_CLIENT.value, _MAX_TOKENS.value
    bodies = [client.benchmark_request(rng.integers(0, vocab_size, _PROMPT.value).tolist(), m,
                                       model, stream=_STREAM.value) for _ in range(n)]

    def send(body):
        return client.complete(server.port, body)

    checked(in_threads(_CLIENTS.value, bodies, send)[0], m)  # warm-up, untimed
    single, many, concurrent = [], [], []
    for _ in range(_ROUNDS.value):
        replies, wall = in_threads(1, bodies, send)
        single.append(sum(r.tokens for r in checked(replies, m)) / wall)
        replies, wall = in_threads(_CLIENTS.value, bodies, send)
        concurrent.extend(checked(replies, m))
        many.append((sum(r.tokens for r in replies) / wall, len(replies) / wall))
    latency = [r.latency_s for r in concurrent]
    ttft = [r.ttft_s for r in concurrent]
    tokens_per_s = statistics.median(t for t, _ in many)
    single_tokens_per_s = statistics.median(single)
    return dict(
        tokens_per_s=tokens_per_s, requests_per_s=statistics.median(r for _, r in many),
        latency_p50_s=percentile(latency, 50), latency_p99_s=percentile(latency, 99),
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        single_client_tokens_per_s=single_tokens_per_s,
        batching_speedup=tokens_per_s / single_tokens_per_s,
        tokens_per_s_rounds=[t for t, _ in many], single_client_tokens_per_s_rounds=single,
        generated_tokens=sum(r.tokens for r in concurrent), requests=len(concurrent),
        requests_per_round=n, rounds=_ROUNDS.value, requests_per_client=_PER_CLIENT.value,
        stream=_STREAM.value)


def load(server: client.Server, vocab_size: int, model: str | None) -> dict:
    """Load mode: `--load_requests` requests from `--clients` threads, some malformed."""
    work = client.load_requests(_LOAD.value, _MALFORMED.value, _PROMPT.value, _MAX_TOKENS.value,
                                vocab_size, model, _SEED.value)
    warm = [body for ok, body in work if ok][:_CLIENTS.value]
    in_threads(_CLIENTS.value, warm, lambda body: client.complete(server.port, body))
    rss_warm = server.rss_bytes()
    replies, wall = in_threads(_CLIENTS.value, [body for _, body in work],
                               lambda body: client.complete(server.port, body))
    rss_after = server.rss_bytes()
    good = [r for (ok, _), r in zip(work, replies, strict=True) if ok]
    bad = [(body, r) for (ok, body), r in zip(work, replies, strict=True) if not ok]
    answered = [r for r in good if r.status == 200 and r.done]
    refused = [r for _, r in bad if 400 <= r.status < 500]
    statuses: dict[str, int] = {}
    for r in replies:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    unanswered = [(r.status, r.error) for r in good if not (r.status == 200 and r.done)]
    accepted_bad = [(str(body)[:120], r.status) for body, r in bad if not 400 <= r.status < 500]
    return dict(
        load_requests=len(work), well_formed=len(good), well_formed_answered=len(answered),
        malformed=len(bad), malformed_refused_4xx=len(refused),
        server_errors_5xx=sum(r.status >= 500 for r in replies),
        connection_errors=sum(r.status == 0 for r in replies), statuses=statuses,
        unanswered_examples=unanswered[:5], malformed_not_refused_examples=accepted_bad[:5],
        wall_s=wall, requests_per_s=len(work) / wall,
        generated_tokens=sum(r.tokens for r in answered),
        tokens_per_s=sum(r.tokens for r in answered) / wall,
        latency_p50_s=percentile([r.latency_s for r in answered], 50),
        latency_p99_s=percentile([r.latency_s for r in answered], 99),
        rss_after_warmup_bytes=rss_warm, rss_after_run_bytes=rss_after,
        rss_growth=(rss_after / rss_warm - 1) if rss_warm and rss_after else None)


def run_peer() -> dict:
    """The peer's JSON line, our ratios to it added by the caller."""
    if not pathlib.Path(_PEER.value).is_file():
        raise UserError(f"--peer {_PEER.value} does not exist")
    command = [sys.executable, _PEER.value, "--hf_dir", _HF_DIR.value,
               "--requests", str(_CLIENTS.value * _PER_CLIENT.value),
               "--prompt_tokens", str(_PROMPT.value), "--max_tokens", str(_MAX_TOKENS.value)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise UserError(f"the peer {' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_flags() -> str:
    if bool(_WORKDIR.value) == bool(_EXPORT.value):
        raise UserError("pass one of --workdir (a trained run) or --export (an export directory)")
    source = _WORKDIR.value or _EXPORT.value
    if not pathlib.Path(source).is_dir():
        raise UserError(f"{source} is not a directory")
    if min(_CLIENTS.value, _PROMPT.value, _MAX_TOKENS.value, _PER_CLIENT.value,
           _ROUNDS.value) < 1:
        raise UserError("--clients, --prompt_tokens, --max_tokens, --requests_per_client and "
                        "--rounds must be >= 1")
    if bool(_PEER.value) != bool(_HF_DIR.value):
        raise UserError("--peer and --hf_dir go together: the peer runs on that Hugging Face "
                        "directory (experiments.export_checkpoint of the served run)")
    if _HF_DIR.value and not (pathlib.Path(_HF_DIR.value) / "config.json").is_file():
        raise UserError(f"--hf_dir {_HF_DIR.value} has no config.json: export the run with "
                        "python -m experiments.export_checkpoint --workdir=... --hf_dir=...")
    if _LOAD.value < 0 or not 0 <= _MALFORMED.value <= 1:
        raise UserError("--load_requests must be >= 0 and --malformed_fraction in [0, 1]")
    return source


def main(argv):
    del argv
    try:
        _bench()
    except UserError as e:  # one line, like every entry point (without experiments.common,
        sys.stderr.write(f"error: {e}\n")  # which imports jax: the client stays light)
        sys.exit(2)


def _bench() -> None:
    source = _check_flags()
    tokenizer = load_tokenizer(pathlib.Path(source))
    if tokenizer is None:
        raise UserError(f"{source} holds no tokenizer: is it a trained language model's run "
                        "or export?")
    slots = _SLOTS.value or _CLIENTS.value
    flag = f"--workdir={source}" if _WORKDIR.value else f"--export={source}"
    server = client.Server([flag, f"--slots={slots}", *_SERVER_FLAGS.value])
    try:
        startup_s = server.wait_healthy(_STARTUP.value)
        status, body = client.get(server.port, "/v1/models")
        models = json.loads(body).get("data", []) if status == 200 else []
        model = models[0]["id"] if models else None
        if _LOAD.value:
            result = load(server, tokenizer.vocab_size, model)
        else:
            result = throughput(server, tokenizer.vocab_size, model)
    except BaseException:
        server.stop()
        raise
    exit_code = server.stop()
    result = dict(result, clients=_CLIENTS.value, prompt_tokens=_PROMPT.value,
                  max_tokens=_MAX_TOKENS.value, slots=slots, server_startup_s=startup_s,
                  server_exit_code=exit_code, model=model, source=source, cpu=cpu_model(),
                  jax=importlib.metadata.version("jax"), python=platform.python_version())
    if exit_code != 0:
        result["server_log_tail"] = server.log_tail(2000)
    else:
        server.remove_log()
    if _PEER.value and not _LOAD.value:
        peer = run_peer()
        result.update(peer_sequential_tokens_per_s=peer["sequential_tokens_per_s"],
                      peer_batched_tokens_per_s=peer["batched_tokens_per_s"],
                      speedup_vs_sequential=result["tokens_per_s"] / peer[
                          "sequential_tokens_per_s"],
                      speedup_vs_batched=result["tokens_per_s"] / peer["batched_tokens_per_s"],
                      peer_versions={k: peer.get(k) for k in ("torch", "transformers",
                                                              "threads")})
    print(json.dumps(result))


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
