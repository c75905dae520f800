"""`vhostlab bench`: the report's shape and its internal consistency (the
numbers themselves are measured, never asserted)."""
from __future__ import annotations

import argparse
import json
import os

from vhostlab import bench


def test_bench_json_report_covers_every_case(capsys):
    assert bench.main(["--json", "--quick", "--no-startup"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"compile_s", "warm_start_s", "compile_wall_s",
                           "warm_start_wall_s", "results", "kicked_frame_ms_by_log_size"}
    assert report["compile_s"] is None and report["warm_start_s"] is None
    cases = [(r["ring"], r["name"], r["impl"], r["frame_bytes"], r["burst"], r["log"])
             for r in report["results"]]
    assert sorted(cases) == sorted(
        (ring, n, i, f, b, g) for ring in ("split", "packed") for n in ("tx", "rx")
        for i in ("numba", "python") for f in (64, 1500) for b in (32, 256)
        for g in (False, True))
    for r in report["results"]:
        assert r["desc_per_s"] > 0
        assert abs(r["gbit_per_s"] - r["desc_per_s"] * r["frame_bytes"] * 8 / 1e9) < 0.01


def test_bench_table_and_cli_hooks(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--quick", "--no-startup"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "tx   numba     64   256 off" in out
    assert "numba / python" in out and "logging costs" in out
    assert "tx   numba     64   256 off" in out.split("packed / split")[0]
    assert "tx 64 B burst 256: numba packed / split = " in out


def test_startup_probe_runs_in_a_fresh_process():
    """The probe the compile/warm-start numbers come from (warm cache here)."""
    result = bench._probe(dict(os.environ))
    assert set(result) == {"import_s", "first_call_s", "import_cpu_s", "first_call_cpu_s"}
    assert all(value > 0 for value in result.values())
