"""The benchmark runs on CPU and ends with one JSON line of measured figures."""

import json

from pallas_kernels import benchmark


def test_benchmark_prints_json_last(capsys):
    benchmark.main(["--batch", "1", "--seq", "64", "--heads", "2", "--head_dim", "32",
                    "--causal", "--iters", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report["seq"] == 64 and report["causal"] is True
    for name in ("pallas_interpret", "xla"):
        assert report["results"][name]["fwd_ms"] > 0
        assert report["results"][name]["fwd_bwd_tflops"] > 0
