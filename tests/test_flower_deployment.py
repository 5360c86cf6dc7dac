"""The example Flower app on a real local deployment: one SuperLink and three SuperNodes, each a separate
process on 127.0.0.1, driven by `flwr run` (slow: minutes; `make test-flower` runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_local_deployment_finishes_every_round(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "flower_app" / "run_deployment.py"), "--rounds", "2",
                          "--result", str(result), "--timeout", "900"],
                         capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads(result.read_text())
    assert res["aggregator"] == "median" and [r["round"] for r in res["rounds"]] == [1, 2]
    assert all(0.0 <= r["ma"] <= 1.0 and 0.0 <= r["asr"] <= 1.0 for r in res["rounds"])
    assert res["rounds"][-1]["ma"] > 0.3  # 2 rounds of 3 clients on digits learn (10% is chance)
    assert len(res["last_weights"]) == 3  # all three SuperNodes took part in the last round
    assert "[deploy] 2 rounds in" in out.stdout
    # Every process the script started is gone: nothing listens on the SuperLink's port any more.
    port = int(out.stdout.split("--port ", 1)[1].split()[0])
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
