"""Shared by the verl tests: the tiny model directory, with verl set up for the CPU."""

import pytest

from tests.helpers.optional import import_or_skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model, with verl set up for the CPU; the gloo group that set-up starts ends with the module."""
    import torch.distributed as dist

    import_or_skip("verl")
    from tests.helpers import verl_scenarios as vs

    started_here = not dist.is_initialized()
    vs.setup_cpu()
    yield vs.save_tiny_qwen2(str(tmp_path_factory.mktemp("qwen2")))
    if started_here and dist.is_initialized():
        dist.destroy_process_group()
