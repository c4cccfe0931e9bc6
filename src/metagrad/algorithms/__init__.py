"""Meta-learning algorithms (MAML, first-order MAML, ANIL; Meta-SGD's rates) over a meta-batch of tasks."""

from metagrad.algorithms.anil import anil_task_loss
from metagrad.algorithms.check import ModelCheck, check_model
from metagrad.algorithms.inner_loop import ALGORITHMS, Algorithm, InnerLoop
from metagrad.algorithms.learned_rates import lslr_rates, meta_sgd_rates
from metagrad.algorithms.maml import maml_task_loss
from metagrad.algorithms.meta_batch import (
    MetaBatchOutput,
    chunk_gradients,
    evaluate,
    evaluate_with_losses,
    meta_batch_loss,
    meta_rates,
    meta_train_step,
    strategy_for,
    task_losses,
)

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "InnerLoop",
    "MetaBatchOutput",
    "ModelCheck",
    "anil_task_loss",
    "check_model",
    "chunk_gradients",
    "evaluate",
    "evaluate_with_losses",
    "lslr_rates",
    "maml_task_loss",
    "meta_batch_loss",
    "meta_rates",
    "meta_sgd_rates",
    "meta_train_step",
    "strategy_for",
    "task_losses",
]
