"""The runner times training apart from evaluation and checkpointing, as it times it apart from probes."""

from __future__ import annotations

import time

from normzoo.config import RunConfig
from normzoo.runner import Trainer

EVAL_SLEEP = 1.0


def test_evaluations_are_not_timed_as_training(tmp_path, monkeypatch):
    """Evaluations every 2 steps, right after each logged window, each made 1 s slower: none of it may count as
    training time (it used to land in the next window, lowering its images/s)."""
    evaluate = Trainer.evaluate_and_save

    def slow_evaluate(self, step):
        time.sleep(EVAL_SLEEP)
        return evaluate(self, step)

    monkeypatch.setattr(Trainer, "evaluate_and_save", slow_evaluate)
    config = RunConfig(backbone="vgg11,width=0.0625", dataset="synthetic,n=96,n_test=32,size=32,channels=3,classes=4",
                       batch_size=16, lr=0.05, steps=6, log_every=2, eval_every=2, device="cpu", out=str(tmp_path))
    trainer = Trainer(config, quiet=True)
    start = time.perf_counter()
    summary = trainer.fit().summary
    wall = time.perf_counter() - start
    evaluations = 3  # steps 2, 4 and 6
    assert summary["train_time_s"] < wall - evaluations * EVAL_SLEEP
