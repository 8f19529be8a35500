"""Ape-X on Ray: many collector actors feeding the Memory service, one learner sampling it.

The parts are the single-process run's own (:class:`~agent.collector.Collector`,
:class:`~agent.learner.Learner`, :class:`~agent.replay_sources.MemoryReplay`); this package only
places them on Ray actors and runs the loop between them. :mod:`agent.distributed.actor` and
:mod:`agent.distributed.learner` are plain classes that never import Ray (they are tested and
usable in one process); :mod:`agent.distributed.run` imports Ray when a run starts.
"""

from agent.distributed.actor import ApexActor, PrioritizingSink, apex_epsilons
from agent.distributed.learner import ApexLearner
from agent.distributed.run import DistributedTrainer

__all__ = ["ApexActor", "ApexLearner", "DistributedTrainer", "PrioritizingSink", "apex_epsilons"]
