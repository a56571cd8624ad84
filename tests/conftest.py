"""Test setup shared by every test file.

- Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch
  must be set before ``triton.jit`` wraps our kernels, i.e. before the first
  import of ``sfpo_kernels``, hence here at the top.
- Every buffer sfpo allocates for a kernel to fill starts as NaN
  (``SFPO_POISON_ALLOCATIONS``), so an element a kernel forgets to write fails
  the comparison instead of passing by luck.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["SFPO_POISON_ALLOCATIONS"] = "1"
