"""Early stopping: one object owns the improvement test, the patience count and the kept weights.

Its state lives in `TrainingState` variables, so it is checkpointed with the weights and a
resumed run continues the count exactly where the interrupted one stopped.
"""

from __future__ import annotations

from typing import Any

import keras

from tapework.catalogue import HIGHER_IS_BETTER
from tapework.checkpoint import TrainingState
from tapework.errors import DataError
from tapework.params import EarlyStoppingParams


class EarlyStopping:
    def __init__(self, params: EarlyStoppingParams, state: TrainingState) -> None:
        self.params = params
        self.state = state
        # Scores are kept as "lower is better": accuracy and R^2 are negated.
        self.sign = -1.0 if params.monitor in HIGHER_IS_BETTER else 1.0

    @property
    def enabled(self) -> bool:
        return self.params.patience > 0

    def should_stop(self) -> bool:
        """True once `patience` epochs in a row brought no improvement (also right after a resume)."""
        return self.enabled and int(self.state.epochs_without_improvement) >= self.params.patience

    def update(self, row: dict[str, Any], model: keras.Model) -> bool:
        """Record one epoch's history row; remember the weights if it improved. Returns should_stop()."""
        if self.params.monitor not in row:  # r2 on a constant validation target is not defined (MetricSet leaves it out)
            if not self.enabled:
                return False
            raise DataError(
                f"train.early_stopping.monitor = {self.params.monitor} has no value: it is not defined on this validation "
                "split (a constant target). Monitor val_loss instead, or use data whose target varies"
            )
        score = self.sign * row[self.params.monitor]
        if score < float(self.state.best_value) - self.params.min_delta:
            self.state.best_value.assign(score)
            self.state.best_epoch.assign(int(row["epoch"]))
            self.state.epochs_without_improvement.assign(0)
            self.state.remember_best(model)
        else:
            self.state.epochs_without_improvement.assign_add(1)
        return self.should_stop()

    def finish(self, model: keras.Model, epochs_run: int) -> int:
        """The epoch whose weights the model holds at the end (the best one if `restore_best`)."""
        if self.enabled and self.params.restore_best:
            self.state.restore_best(model)
            return int(self.state.best_epoch)
        return epochs_run
