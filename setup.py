"""The package list, found rather than listed; everything else is in pyproject.toml.

``[tool.setuptools.packages.find]`` would do, but it only sees folders that exist under their
package's name: ``sfpo_kernels.csrc`` exists only through pyproject's ``package-dir`` mapping
(the top-level ``csrc/``), so it is added here by name.
"""

from setuptools import find_packages, setup

setup(
    packages=[
        *find_packages(include=["sfpo_kernels", "sfpo_kernels.*", "sfpo_train", "sfpo_train.*"]),
        "sfpo_kernels.csrc",
    ]
)
