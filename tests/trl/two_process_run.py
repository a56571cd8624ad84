"""One rank of a 2-process SFPOGRPOTrainer run (torchrun, gloo): writes what each SFPO iteration left behind.

Run by tests/trl/test_two_processes.py as
``python -m torch.distributed.run --nproc_per_node 2 tests/trl/two_process_run.py OUT``;
rank r writes ``OUT/rank{r}.json``: after every iteration the SFPO schedule and a
checksum of the weights; then the checksum of a second run resumed from the first's
checkpoint at step 2 (each rank resumes its own pending generation batches).
"""

import json
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from sfpo_train.sfpo import SFPOConfig
from tests.helpers.trl_setup import make_trainer


class Record(TrainerCallback):
    def __init__(self):
        self.trainer, self.rows, self.iterations = None, [], 0

    def on_step_end(self, args, state, control, **kwargs):
        sfpo = self.trainer.sfpo
        if sfpo.iteration != self.iterations:  # an iteration just finished (the SFPO callback ran first)
            self.iterations = sfpo.iteration
            params = [p.detach().double() for p in self.trainer.model.parameters()]
            self.rows.append(
                {
                    "step": state.global_step,
                    "iteration": sfpo.iteration,
                    "alpha": sfpo.alpha,
                    "fired_at": sfpo.fired_at,
                    "entropies": list(sfpo.entropies),
                    "weights_sum": sum(p.sum().item() for p in params),
                    "weights_abs_sum": sum(p.abs().sum().item() for p in params),
                    "first_values": params[0].flatten()[:8].tolist(),
                }
            )


def main(out: str) -> None:
    torch.manual_seed(0)
    config = SFPOConfig(inner_steps=1, alpha=0.8, zscore_window=2, zscore_threshold=0.5, trigger="abs")
    settings = dict(sfpo=config, max_steps=6, per_device_train_batch_size=4)
    trainer = make_trainer(Path(out) / "run", save_strategy="steps", save_steps=2, **settings)
    record = Record()
    record.trainer = trainer
    trainer.add_callback(record)
    trainer.train()
    rank = trainer.accelerator.process_index
    resumed = make_trainer(Path(out) / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(Path(out) / "run" / "checkpoint-2"))
    payload = {
        "world": trainer.accelerator.num_processes,
        "generations": trainer.generations,
        "rows": record.rows,
        "resumed_prompts": resumed.generated_prompts,
        "whole_prompts": trainer.generated_prompts,
        "resumed_weights_sum": sum(p.detach().double().sum().item() for p in resumed.model.parameters()),
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(payload))


if __name__ == "__main__":
    main(sys.argv[1])
