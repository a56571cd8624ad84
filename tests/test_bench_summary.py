"""The short summary ``pytest bench/ --benchmark-only`` prints at its end (``bench.summary.ratio_lines``)."""

from __future__ import annotations

import pandas as pd

from bench.summary import ratio_lines


def test_ratio_lines_set_sfpo_against_each_baseline_of_the_same_work():
    rows = [
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "float32",
            "extra_info.backend": "triton",
            "extra_info.impl": "sfpo_kernels.reposition_[triton]",
            "median_ms": 2.0,
        },
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "float32",
            "extra_info.backend": "baseline",
            "extra_info.impl": "foreach_lerp",
            "median_ms": 3.0,
        },
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "float32",
            "extra_info.backend": "baseline",
            "extra_info.impl": "authors_loop",
            "median_ms": 10.0,
        },
        {
            "extra_info.op": "reposition",
            "extra_info.dtype": "bfloat16",
            "extra_info.backend": "baseline",
            "extra_info.impl": "foreach_lerp",
            "median_ms": 1.0,
        },  # no sfpo row of this dtype: no line
        {"extra_info.op": "training_step", "extra_info.algo": "grpo", "median_ms": 100.0},
        {"extra_info.op": "training_step", "extra_info.algo": "sfpo", "median_ms": 250.0},
    ]
    lines = ratio_lines(pd.DataFrame(rows))
    assert len(lines) == 2
    assert lines[0].startswith("reposition float32: sfpo_kernels.reposition_[triton] 2 ms")
    assert "foreach_lerp 1.50x" in lines[0] and "authors_loop 5.00x" in lines[0]
    assert "SFPO/GRPO 2.50x" in lines[1]
    assert ratio_lines(pd.DataFrame()) == []
