"""tools/serve_bench.py: its three ways measured, the table printed with the machine's load."""

import mlflow
import pytest

from tools import serve_bench


@pytest.mark.slow
def test_the_quick_benchmark_measures_the_three_ways(capsys, store):
    serve_bench.main(["--quick"])
    assert mlflow.get_tracking_uri() == store.tracking_uri  # not its deleted temporary store
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("machine: ") and any(line.startswith("load average") for line in out)
    rows = [line.split(" | ") for line in out if line.startswith("| ") and "---" not in line][1:]
    assert [row[0] for row in rows] == [f"| {way}" for way in serve_bench.WAYS]
    for row in rows:
        assert float(row[1]) > 0 and float(row[2]) > 0 and row[3].endswith(" ms |")
