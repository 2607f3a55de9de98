"""scripts/bench_data.py runs end to end on a tiny generated file (numbers are not checked)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_data_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "scripts" / "bench_data.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "data.json"
    args = ["--demos", "3", "--steps", "12", "--size", "32", "--batch", "8", "--workers", "0", "--quick"]
    res = bench.main([*args, "--out", str(out)])
    assert json.loads(out.read_text())["loader"] == res["loader"]
    assert {r["cache"] for r in res["loader"]} == {"ram", "lazy"}
    assert all(r["samples_per_s"] > 0 for r in res["loader"])
    assert 0 <= res["train_wait"][0]["wait_share"] <= 1 and "tiny" in res["model"]
