"""SFPO training: the update rule, a standalone trainer, reports, the ``sfpo`` command line and the verl plugin.

- :class:`SFPOConfig`, :class:`SFPO` (:mod:`sfpo_train.sfpo`): paper Algorithm 1
  around any policy-gradient pass (``SFPO.step(update_pass, batch, entropy=None)``),
  with the entropy-triggered switch to plain GRPO and exact ``state_dict`` resume.
- :mod:`sfpo_train.trainer` (``sfpo train``): a standalone GRPO / Dr. GRPO / DAPO
  trainer with SFPO, verl's config keys and metric names, and an embedded
  default task and model (:mod:`sfpo_train.tasks`, :mod:`sfpo_train.assets`).
- :mod:`sfpo_train.reports` (``sfpo report``, ``sfpo compare``): per-stage time and
  memory, and SFPO against GRPO over seeds.
- :mod:`sfpo_train.cli`: the ``sfpo`` command, one module per subcommand.
- :mod:`sfpo_train.verl`: SFPO inside verl 0.9.1 as a plugin (needs the ``verl`` extra).

The rule's names are loaded on first use, so that ``sfpo --help`` (which imports
this package) does not pull in the kernels and Triton.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and IDEs resolve the names to
    from sfpo_train.sfpo import SFPO, SFPOConfig, entropy_zscore, scheduled_alpha

__all__ = ["SFPO", "SFPOConfig", "entropy_zscore", "scheduled_alpha"]


def __getattr__(name: str):
    if name in __all__:
        from sfpo_train import sfpo

        return getattr(sfpo, name)
    raise AttributeError(f"module 'sfpo_train' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
