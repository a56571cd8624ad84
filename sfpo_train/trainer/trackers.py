"""verl's ``trainer.logger``: where a run's metrics go besides ``metrics.jsonl`` / ``metrics.csv``.

The value is a list of backends (a single name is read as a list of one), as
verl 0.9.1's ``verl.utils.tracking.Tracking`` takes it; each receives every row
the run appends to ``metrics.jsonl`` (the validation before training at step 0,
then one row per iteration), with the row's ``training/global_step`` as the step:

- ``console``: one line per row in verl's format, ``step:N - key:value - ...``
  (numbers only), printed above the progress bar;
- ``tensorboard``: TensorBoard's ``SummaryWriter`` (``torch.utils.tensorboard``, the
  ``tensorboard`` package), one scalar per number, in ``$TENSORBOARD_DIR`` or else
  ``tensorboard_log/<project_name>/<experiment_name>`` under the working directory (verl's);
  a resumed run hides the events past its checkpoint (``purge_step``) before it logs them again;
- ``wandb``: a Weights & Biases run (``wandb.init(project=project_name, name=experiment_name,
  entity=$WANDB_ENTITY, config=<the resolved config>)``, as verl starts it); wandb's own
  variables apply (``WANDB_MODE=offline`` logs without a network, ``WANDB_DIR``);
- ``file``: verl's file logger, ``{"step": N, "data": {...}}`` per line, in
  ``$VERL_FILE_LOGGER_PATH`` or else ``$VERL_FILE_LOGGER_ROOT`` (default ``.``) ``/<project_name>/<experiment_name>.jsonl``;
  a new run starts the file afresh (as verl does), a resumed one keeps its rows up to the checkpoint.

``metrics.jsonl`` is written whatever the value (the reports read it). verl's other
backends (mlflow, swanlab, clearml, ...) are refused by name, as is any unknown value;
a backend whose package is missing is a ``ValueError`` naming the key, the value and the
pip extra (:func:`check_loggers`, run by the config's validation before any work).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

from sfpo_train.trainer.run_guard import write_atomic, writing

LOGGERS = ("console", "file", "tensorboard", "wandb")
"""The backends this trainer writes, in verl's names."""
# verl 0.9.1's other Tracking backends: known names, told apart from typos in the error
VERL_ONLY_LOGGERS = ("mlflow", "swanlab", "vemlp_wandb", "clearml", "trackio", "rl_insight")
# backend -> (the module it imports, the pip extra that installs it)
LOGGER_PACKAGES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
KEY = "trainer.logger"


def logger_names(value) -> list[str]:
    """``trainer.logger`` as a list of names: a single string is a list of one (verl's ``Tracking`` reads it so).

    ``TypeError`` for anything else than a string or a list of strings.
    """
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence) or not all(isinstance(n, str) for n in value):  # omegaconf's lists are Sequences
        raise TypeError(f"{KEY} must be a list of names, got {value!r}")
    return list(value)


def known_loggers(value) -> bool:
    """The rule of the key: every name is one of :data:`LOGGERS` (no repeats, which verl would not tell apart)."""
    names = logger_names(value)
    return all(n in LOGGERS for n in names) and len(set(names)) == len(names)


def check_loggers(value) -> None:
    """``ValueError`` for a name this trainer does not write or a backend whose package is missing.

    The packages are imported here, once, so that a missing or broken install stops the run before any work.
    """
    shown = _shown(value)
    names = logger_names(value)
    for name in names:
        if name in VERL_ONLY_LOGGERS:
            raise ValueError(
                f"{KEY}={shown}: {name!r} is one of verl's loggers that sfpo train does not write; "
                f"use {', '.join(LOGGERS)}"
            )
        if name not in LOGGERS:
            raise ValueError(f"{KEY}={shown}: unknown logger {name!r}; one of {', '.join(LOGGERS)}")
    for name in names:
        if name in LOGGER_PACKAGES:
            module, extra = LOGGER_PACKAGES[name]
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ValueError(
                    f"{KEY}={shown}: {name!r} needs the {extra} package ({e}); install the {extra} extra: "
                    f"pip install 'sfpo[{extra}]'"
                ) from None


def _shown(value) -> str:
    """The value as the command line writes it: ``[console,tensorboard]``."""
    try:
        return "[" + ",".join(logger_names(value)) + "]"
    except TypeError:
        return repr(value)


def numeric_items(metrics: dict) -> dict[str, float]:
    """The row's numbers as floats (a bool as 0/1); None (no value this step) and anything else are left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (bool, int, float))}


class ConsoleLogger:
    """verl's console logger: ``step:N - key:value - ...`` per row, numbers only."""

    location = None

    def __init__(self, write: Callable[[str], None]):
        self.write = write

    def log(self, metrics: dict, step: int) -> None:
        numbers_only = {k: v for k, v in metrics.items() if isinstance(v, (bool, int, float))}
        self.write(" - ".join([f"step:{step}", *(f"{k}:{v!r}" for k, v in numbers_only.items())]))

    def finish(self, exit_code: int) -> None:
        pass


class TensorBoardLogger:
    """``SummaryWriter.add_scalar`` per number, in verl's directory; ``purge_step`` hides what a resume re-does."""

    def __init__(self, project: str, experiment: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.location = os.environ.get("TENSORBOARD_DIR") or os.path.join("tensorboard_log", project, experiment)
        with writing(self.location):
            os.makedirs(self.location, exist_ok=True)
            # Events at or past purge_step in this directory's earlier files are hidden: the steps after the
            # checkpoint a run resumes from (or a whole run started again) are logged afresh.
            self.writer = SummaryWriter(self.location, purge_step=start_step)

    def log(self, metrics: dict, step: int) -> None:
        for k, v in numeric_items(metrics).items():
            self.writer.add_scalar(k, v, step)

    def finish(self, exit_code: int) -> None:
        self.writer.close()


class WandbLogger:
    """A W&B run started as verl starts it; ``run.log(row, step=N)``."""

    def __init__(self, project: str, experiment: str, config: dict):
        import wandb

        try:
            self.run = wandb.init(
                project=project, name=experiment, entity=os.environ.get("WANDB_ENTITY"), config=config
            )
        except Exception as e:  # no API key, no network, a bad WANDB_* setting: one line, not wandb's traceback
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"{KEY}=wandb: wandb.init failed ({type(e).__name__}: {first}); WANDB_MODE=offline logs "
                "without a network or an account"
            ) from None
        self.location = os.path.dirname(self.run.dir)  # the run's directory (its files/ is run.dir)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(numeric_items(metrics), step=step)

    def finish(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


class FileLogger:
    """verl's file logger: ``{"step": N, "data": {...}}`` per line (NaN and infinities as null)."""

    def __init__(self, project: str, experiment: str, start_step: int):
        path = os.environ.get("VERL_FILE_LOGGER_PATH")
        if path is None:
            root = os.path.expanduser(os.environ.get("VERL_FILE_LOGGER_ROOT", "."))
            path = os.path.join(root, project, f"{experiment}.jsonl")
        self.location = path
        with writing(path):
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            kept = self._rows_before(path, start_step) if start_step > 0 else []
            write_atomic(path, "".join(kept))

    @staticmethod
    def _rows_before(path: str, step: int) -> list[str]:
        """The file's lines whose step is below ``step`` (what a resumed run keeps; a torn line is dropped)."""
        if not os.path.isfile(path):
            return []
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] < step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        return kept

    def log(self, metrics: dict, step: int) -> None:
        data = {k: _finite_or_none(v) for k, v in metrics.items()}
        with writing(self.location), open(self.location, "a") as f:
            f.write(json.dumps({"step": step, "data": data}) + "\n")

    def finish(self, exit_code: int) -> None:
        pass


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Trackers:
    """The backends ``trainer.logger`` names, opened together (each one's place told through ``write``);
    :meth:`log` sends a row to each; as a context manager, closed at its end.

    ``start_step`` is the first step the run logs now (0 for a new run; a resumed run's checkpoint
    step + 1). ``config`` is the resolved config as plain data (W&B records it).
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        project: str,
        experiment: str,
        config: dict,
        start_step: int,
        write: Callable[[str], None] = print,
    ):
        self.backends: dict[str, object] = {}
        try:
            for name in logger_names(names):
                if name == "console":
                    self.backends[name] = ConsoleLogger(write)
                elif name == "tensorboard":
                    self.backends[name] = TensorBoardLogger(project, experiment, start_step)
                elif name == "wandb":
                    self.backends[name] = WandbLogger(project, experiment, config)
                elif name == "file":
                    self.backends[name] = FileLogger(project, experiment, start_step)
                else:
                    raise ValueError(f"{KEY}: unknown logger {name!r}; one of {', '.join(LOGGERS)}")
        except BaseException:
            self.finish(exit_code=1)  # the ones already open (a W&B run) are closed, not left running
            raise
        for name, where in self.locations.items():
            write(f"{name}: metrics in {where}")

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close every backend: exit code 0 after success, 1 after an error (which stays the one raised)."""
        if exc_type is None:
            self.finish(exit_code=0)
        else:
            with contextlib.suppress(Exception):
                self.finish(exit_code=1)

    @property
    def locations(self) -> dict[str, str]:
        """``{backend: where it writes}`` for the backends that write somewhere."""
        return {name: b.location for name, b in self.backends.items() if b.location is not None}

    def log(self, metrics: dict, step: int) -> None:
        for backend in self.backends.values():
            backend.log(metrics, step)

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close every backend once; an error closing one does not keep the others open."""
        backends, self.backends = self.backends, {}
        errors = []
        for backend in backends.values():
            try:
                backend.finish(exit_code)
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


def console_write(line: str) -> None:
    """A line on standard output above any progress bar (tqdm's ``write``)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
