"""SFPOGRPOTrainer under 2 CPU processes (torchrun, gloo): both ranks hold the same weights after every SFPO
iteration, the entropy trigger decides the same on both, and a resume continues exactly, each rank with its own
prompts (tests/trl/two_process_run.py is one rank)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers.trl_setup import trl_parts

trl_parts()
ROOT = Path(__file__).resolve().parents[2]


def test_two_ranks_agree_after_every_iteration(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port for the rendezvous (0 would give each rank its own)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run(
        [*command, str(ROOT / "tests" / "trl" / "two_process_run.py"), str(tmp_path)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    rows0, rows1 = ranks[0]["rows"], ranks[1]["rows"]
    # 2 iterations of 2 passes, the trigger fires at iteration 1, then one pass per iteration up to step 6
    assert [row["step"] for row in rows0] == [2, 4, 5, 6]
    assert rows0[-1]["fired_at"] == 1
    assert rows0 == rows1  # weights' checksums, entropies, alpha and the trigger, exactly
    assert ranks[0]["generations"] == ranks[1]["generations"] == 4
    for rank in ranks:  # resumed at step 2 (iteration 1): the same prompts and the same final weights
        assert rank["resumed_prompts"] == rank["whole_prompts"][1:]
        assert rank["resumed_weights_sum"] == rows0[-1]["weights_sum"]
    assert ranks[0]["whole_prompts"] != ranks[1]["whole_prompts"]  # each rank trains on its own slice
