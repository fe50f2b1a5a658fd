"""Exports and the OpenAI-compatible server, for real: a tiny LM is trained, exported with
`experiments.export_compiled`, loaded in a process that must not import flax or the model code,
and served by `experiments.serve` on 127.0.0.1, spoken to with the official `openai` client.

The model has a byte-level BPE tokenizer with a chat template and an end-of-sequence token, so
every route and stop condition is exercised. Greedy output is compared token for token with
`experiments.sample`: the server prefills one request at a padded bucket length and decodes it
in a batch of slots, which must not change a single argmax on this model.
"""

from __future__ import annotations

import http.client
import json
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import tiny_lm_config
from tests.hf_models import save_tokenizer
from tests.test_cli import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
openai = pytest.importorskip("openai")
FORBIDDEN = ("flax", "genai_jax.models", "genai_jax.nn")
PROMPTS = ["The quick brown", "Seven wizards"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def workdir(text_file, tmp_path_factory):
    from genai_jax.train import train

    tokenizer = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tokenizer)
    workdir = tmp_path_factory.mktemp("serve_run")
    config = tiny_lm_config(**{"data.path": str(text_file), "data.tokenizer": f"hf:{tokenizer}",
                               "model.block_size": 64, "train.steps": 150,
                               "eval.every": 150, "checkpoint.every": 150})
    train(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def exported(workdir, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    proc = cli("export_compiled", f"--workdir={workdir}", f"--out={out}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["functions"] == ["decode", "prefill"]
    return out


@pytest.fixture(scope="module")
def reference(workdir, env):
    """`experiments.sample`'s greedy continuations of PROMPTS (text after the prompt)."""
    proc = cli("sample", f"--workdir={workdir}", *[f"--prompt={p}" for p in PROMPTS],
               "--temperature=0", f"--max_new_tokens={NEW_TOKENS}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = proc.stdout.removesuffix("\n").split("\n" + "-" * 40 + "\n")  # print's newline
    assert [t[:len(p)] for t, p in zip(texts, PROMPTS, strict=True)] == PROMPTS
    return [t[len(p):] for t, p in zip(texts, PROMPTS, strict=True)]


def run_without_model_code(code: str, env) -> dict:
    """Run `code` in a fresh process that fails if it imported flax or the model code; the
    last stdout line is its JSON result."""
    check = (f"\nimport sys\nbad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
             "assert not bad, f'imported {bad}'\n")
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_runs_without_the_model_code_and_reproduces_sample(exported, reference, env):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["family"] == "transformer" and manifest["platforms"] == ["cpu"]
    assert manifest["functions"]["decode"]["inputs"][:2] == ["int32[b]", "int32[b]"]
    assert manifest["functions"]["prefill"]["outputs"][0].endswith("[b, p, 280]")
    code = f"""
import json
from genai_jax.serving.lm import LanguageModel
lm = LanguageModel({str(exported)!r})
prompts = [lm.tokenizer.encode_prompt(p) for p in {PROMPTS!r}]
out = lm.generate(prompts, {NEW_TOKENS})
print(json.dumps([lm.tokenizer.decode(list(t)[:list(t).index(lm.eos_token_id)]
                  if lm.eos_token_id in list(t) else t) for t in out]))
"""
    assert run_without_model_code(code, env) == reference


def test_export_lowers_for_every_platform_asked(workdir, env, tmp_path):
    out = tmp_path / "all"
    proc = cli("export_compiled", f"--workdir={workdir}", f"--out={out}",
               "--platforms=cpu,cuda,tpu", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
    for entry in manifest["functions"].values():
        assert entry["platforms"] == ["cpu", "cuda", "tpu"]
    assert cli("export_compiled", f"--workdir={workdir}", f"--out={out}",
               env=env).returncode == 2  # never into a directory that holds something


class Served:
    """A live `experiments.serve` process and how to reach it."""

    def __init__(self, args: list[str], env, saw_unready: bool = False):
        self.proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", "--port=0",
                                      *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("serving "), line + self.proc.stderr.read()[-3000:]
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.statuses = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            status, _ = self.get("/healthz")
            self.statuses.append(status)
            if status == 200:
                self.compiles_at_ready = self.metric("genai_compile_events_total")
                return
            assert self.proc.poll() is None, self.proc.stderr.read()[-3000:]
            time.sleep(0.2)
        raise AssertionError("the server did not become ready")

    def request(self, method: str, path: str, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        conn.request(method, path, data, {"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, payload

    def get(self, path: str):
        try:
            return self.request("GET", path)
        except ConnectionError:
            return 0, b""

    def post(self, path: str, body, **headers):
        status, payload = self.request("POST", path, body, headers)
        return status, json.loads(payload)

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        values = [float(line.split()[-1]) for line in text.decode().splitlines()
                  if line.startswith(name + " ") or line.startswith(name + "{")]
        return sum(values)

    def client(self, key: str = "test-key") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def server(exported, env):
    served = Served([f"--export={exported}", "--slots=4", "--max_queue=4",
                     "--api_key=test-key", "--model_name=tiny"], env)
    yield served
    assert served.stop() == 0


def test_health_reports_ready_only_after_warm_up(server):
    assert server.statuses[0] == 503 and server.statuses[-1] == 200
    assert server.metric("genai_ready") == 1


def test_greedy_completion_equals_sample(server, reference):
    client = server.client()
    for prompt, expected in zip(PROMPTS, reference, strict=True):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW_TOKENS,
                                        temperature=0)
        assert out.choices[0].text == expected
        assert out.choices[0].finish_reason in ("stop", "length")
        assert out.usage.completion_tokens <= NEW_TOKENS
        assert out.usage.prompt_tokens > 0


def test_streamed_equals_whole(server, reference):
    client = server.client()
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], temperature=0,
                                            max_tokens=NEW_TOKENS, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reference[0]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0)
    streamed = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
        temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == \
        chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"


def test_seeded_requests_are_the_same_whatever_shares_their_batch(server):
    client = server.client()
    ask = dict(model="tiny", prompt="The lazy", max_tokens=10, temperature=1.0, top_p=0.9,
               seed=7, extra_body={"top_k": 20})
    alone = client.completions.create(**ask).choices[0].text
    results, errors = {}, []

    def one(i):
        try:
            kw = ask if i % 2 == 0 else dict(ask, seed=100 + i, prompt="Hello there")
            results[i] = client.completions.create(**kw).choices[0].text
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0] == results[2] == alone
    # n choices of one seeded request: the first is the request alone, the others their own
    # streams
    three = client.completions.create(**dict(ask, n=3))
    texts = [c.text for c in three.choices]
    assert texts[0] == alone and len(set(texts)) > 1


def test_stop_logprobs_and_echo(server):
    client = server.client()
    out = client.completions.create(model="tiny", prompt="The quick", max_tokens=3,
                                    temperature=0, logprobs=2, echo=True)
    choice = out.choices[0]
    assert choice.text.startswith("The quick")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    # greedy: each generated token is the most likely one
    generated = out.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs[-generated:], lp.top_logprobs[-generated:],
                           strict=True):
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)
    # a stop string ends the text where it starts
    full = client.completions.create(model="tiny", prompt="The quick", max_tokens=12,
                                     temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt="The quick", max_tokens=12,
                                    temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 64}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": "hi", "n": 5}, 400, "n"),  # more than the queue ever holds
    ({"model": "tiny", "prompt": [[]], "echo": True, "logprobs": 1}, 400, "prompt"),
    ("{not json", 400, None),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status,
                                                                    param):
    code, answer = server.post("/v1/completions", body, authorization="Bearer test-key")
    assert code == status, answer
    assert set(answer["error"]) >= {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param
    assert server.client().completions.create(model="tiny", prompt="hi",
                                              max_tokens=2).choices


def test_a_full_queue_answers_429_and_any_seed_is_fine(server):
    """4 slots and a queue of 4: long requests sent together fill both, and the ones beyond
    are refused with 429 while the others are answered. (The engine frees a slot after 62
    tokens, a few tens of milliseconds here: the requests go out at once, and a round that
    happened to see no 429 is tried again.)"""
    body = {"model": "tiny", "prompt": "a", "max_tokens": 62, "ignore_eos": True,
            "temperature": 0, "seed": 2**40}
    def send(statuses):
        statuses.append(server.post("/v1/completions", body, authorization="Bearer test-key")[0])

    for _ in range(3):
        statuses = []
        threads = [threading.Thread(target=send, args=(statuses,)) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 8, statuses
        if 429 in statuses:
            return
    raise AssertionError("16 requests at once never filled 4 slots and a queue of 4")


def test_api_key_is_required(server):
    for headers in ({}, {"authorization": "Bearer wrong"}):
        code, answer = server.post("/v1/completions", {"model": "tiny", "prompt": "hi"},
                                   **headers)
        assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    assert server.get("/healthz")[0] == 200  # health and metrics need no key


def test_metrics_count_requests_tokens_and_no_compilation_after_warm_up(server):
    tokens = server.metric("genai_generation_tokens_total")
    assert server.post("/v1/completions", {"model": "tiny"},
                       authorization="Bearer test-key")[0] == 400
    client = server.client()
    for prompt, n in (("a", 1), ("A much longer prompt than the others, to use a bucket", 2)):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=5, n=n, logprobs=1,
                                  temperature=0.5, top_p=0.5)
    # nothing compiled since warm-up, whatever the requests before (other buckets, samplers)
    assert server.compiles_at_ready > 0
    assert server.metric("genai_compile_events_total") == server.compiles_at_ready
    assert server.metric("genai_generation_tokens_total") > tokens
    _, text = server.get("/metrics")
    text = text.decode()
    for name in ("genai_requests_total{route=\"/v1/completions\",status=\"200\"}",
                 "genai_requests_total{route=\"/v1/completions\",status=\"400\"}",
                 "genai_prompt_tokens_total", "genai_queue_wait_seconds_bucket",
                 "genai_time_to_first_token_seconds_bucket", "genai_batch_occupancy_bucket"):
        assert name in text, name


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.metric("genai_generation_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": "tiny", "prompt": "a", "max_tokens": 62, "ignore_eos": True,
            "stream": True, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"content-type": "application/json", "authorization": "Bearer test-key"})
    response = conn.getresponse()
    assert response.status == 200
    response.fp.readline()  # the first event, then hang up
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 30
    while server.metric("genai_decode_slots_busy") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("genai_decode_slots_busy") == 0
    # the slot is free for others
    assert server.client().completions.create(model="tiny", prompt="b", max_tokens=3).choices
    assert server.metric("genai_generation_tokens_total") - before < 62 + 3


def test_sigterm_finishes_requests_in_flight_then_exits_0(exported, env):
    served = Served([f"--export={exported}", "--slots=2", "--grace=60"], env)
    client = served.client()
    name = exported.name
    results = {}

    def long_request():
        results["out"] = client.completions.create(
            model=name, prompt="x", max_tokens=60, temperature=0,
            extra_body={"ignore_eos": True})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 30
    while served.metric("genai_decode_slots_busy") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert served.stop() == 0
    thread.join(30)
    assert results["out"].usage.completion_tokens == 60
    assert "draining" in served.proc.stderr.read()


def test_serve_refuses_bad_flags_in_one_line(env, tmp_path):
    proc = cli("serve", "--port=0", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("error: give one of")
    proc = cli("serve", f"--export={tmp_path}", "--port=0", env=env)
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
