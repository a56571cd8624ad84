"""What every key of the standalone trainer's configuration means: ``sfpo train --help`` prints it.

The text is each key's declaration (:data:`sfpo_train.trainer.schema.KEYS`):
SFPO's keys take the help text of ``SFPOConfig``'s fields, the loss's keys that
of :meth:`sfpo_kernels.loss_options.GRPOLossOptions.help`.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from sfpo_train.trainer.config import KEYS, TrainerConfig, config_keys
from sfpo_train.trainer.keys import shown_value

KEY_HELP: dict[str, str] = {name: k.help for name, k in KEYS.items()}
"""``{dotted key: help text}``, derived from the declarations."""


def describe_keys(cfg: DictConfig | None = None) -> str:
    """Every key with its value in ``cfg`` (default: the defaults) and what it means, for ``--help``."""
    cfg = cfg if cfg is not None else OmegaConf.structured(TrainerConfig)
    lines, section = [], None
    for key in config_keys():
        head = key.rsplit(".", 1)[0]
        if head != section:
            lines.append(f"  {head}.")
            section = head
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig) or hasattr(value, "_content"):
            value = OmegaConf.to_container(value)
        lines.append(f"    {key.rsplit('.', 1)[1]}={shown_value(value)}  -- {KEY_HELP.get(key, '')}")
    return "\n".join(lines)


json_value = shown_value  # the older name
