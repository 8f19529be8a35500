"""Training: the loop that joins a Collector (acting) to a Learner (learning), evaluation and the
run's state. The spec's ``TrainingManager`` (``agent.manager``) adds meta-learning on top; nothing
in this package imports meta-learning."""

from agent.training.trainer import Trainer, TrainerCallback

__all__ = ["Trainer", "TrainerCallback"]
