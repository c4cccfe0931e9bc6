"""Meta-learning algorithms (``registry.ALGORITHMS``: one file each) and the engine that runs any of them on a
meta-batch of tasks (``meta_batch``), on any strategy (``strategies``)."""

from metagrad.algorithms.anil import ANIL
from metagrad.algorithms.base import Algorithm, Tasks
from metagrad.algorithms.check import ModelCheck, check_model
from metagrad.algorithms.learned_rates import lslr_rates, meta_sgd_rates
from metagrad.algorithms.maml import MAML
from metagrad.algorithms.meta_batch import (
    MetaBatchOutput,
    chunk_gradients,
    evaluate,
    evaluate_with_losses,
    meta_batch_loss,
    meta_rates,
    meta_train_step,
    task_objectives,
)
from metagrad.algorithms.registry import ALGORITHMS, check_algorithm, make
from metagrad.algorithms.strategies import STRATEGIES, strategy_for

__all__ = [
    "ALGORITHMS",
    "ANIL",
    "MAML",
    "STRATEGIES",
    "Algorithm",
    "MetaBatchOutput",
    "ModelCheck",
    "Tasks",
    "check_algorithm",
    "check_model",
    "chunk_gradients",
    "evaluate",
    "evaluate_with_losses",
    "lslr_rates",
    "make",
    "meta_batch_loss",
    "meta_rates",
    "meta_sgd_rates",
    "meta_train_step",
    "strategy_for",
    "task_objectives",
]
