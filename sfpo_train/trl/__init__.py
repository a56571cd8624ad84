"""SFPO inside TRL: :class:`SFPOGRPOTrainer`, a ``trl.GRPOTrainer`` that takes ``sfpo=SFPOConfig(...)``.

Needs the ``trl`` extra (``pip install 'sfpo[trl]'``); importing this package does
not import TRL, the names load on first use::

    from sfpo_train.trl import SFPOConfig, SFPOGRPOTrainer

    trainer = SFPOGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                              train_dataset=..., sfpo=SFPOConfig(inner_steps=3, alpha=0.8))
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sfpo_train.sfpo import SFPOConfig
    from sfpo_train.trl.run_log import RunDirectoryCallback
    from sfpo_train.trl.trainer import SFPOGRPOTrainer

__all__ = ["RunDirectoryCallback", "SFPOConfig", "SFPOGRPOTrainer"]
_TRL_NAMES = {"SFPOGRPOTrainer": "sfpo_train.trl.trainer", "RunDirectoryCallback": "sfpo_train.trl.run_log"}


def __getattr__(name: str):
    if name == "SFPOConfig":
        from sfpo_train.sfpo import SFPOConfig

        return SFPOConfig
    if name in _TRL_NAMES:
        import importlib

        try:
            module = importlib.import_module(_TRL_NAMES[name])
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("trl", "accelerate", "datasets"):
                raise ModuleNotFoundError(
                    f"{name} needs TRL ({e.name} is not installed): pip install 'sfpo[trl]'", name=e.name
                ) from e
            raise
        return getattr(module, name)
    raise AttributeError(f"module 'sfpo_train.trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
