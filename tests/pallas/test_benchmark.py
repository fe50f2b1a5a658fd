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


def test_denoise_benchmarks_print_json_last(capsys):
    for op in ("groupnorm", "sampler"):
        benchmark.main(["--op", op, "--batch", "1", "--height", "4", "--width", "4",
                        "--channels", "32", "--groups", "8", "--iters", "1"])
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert report["op"] == op and report["shape"] == [1, 4, 4, 32]
        for name in ("pallas_interpret", "xla"):
            figures = report["results"][name]
            figures = figures["fwd_bwd"] if op == "groupnorm" else figures
            assert figures["ms"] > 0 and figures["gbytes_per_s"] > 0
