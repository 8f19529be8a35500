"""The params.yaml sections of the task world (``rewards``, ``curriculum``, ``tasks``) and of
meta-learning (``meta``): models only, importing nothing of the project.

They live apart from the modules that use them so that :mod:`agent.config` can hold every
section in its one resolved :class:`~agent.config.Config` without importing ``agent.tasks`` or
``agent.meta`` (both of which import the config). Like every section, the models declare types
and bounds but no values: the values live in ``params.yaml``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base of every params.yaml section: unknown keys are errors, values frozen once validated."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True
    )


# --------------------------------------------------------------------------- rewards


class RewardSection(Section):
    """Weights of the reward components (the spec's RewardConfig defaults)."""

    base_reward: float
    """Weight of the task's progress: the fraction of the task accomplished this step."""
    time_penalty: float = Field(le=0.0)
    """Paid every step, to make shorter episodes better."""
    collision_penalty: float = Field(le=0.0)
    """Paid on every step that ends in a collision (obstacle, wall, teammate)."""
    completion_bonus: float = Field(ge=0.0)
    """Paid once, on the step that completes the task."""
    exploration_bonus: float = Field(ge=0.0)
    """Per newly covered cell; a found resource counts as ``tasks.exploration.resource_value`` cells."""
    cooperation_bonus: float = Field(ge=0.0)
    """Times the team's formation improvement, plus once for a joint finish."""
    efficiency_bonus: float = Field(ge=0.0)
    """On success, times the mean smoothness of the episode's actions (1 = never changed)."""


# --------------------------------------------------------------------------- curriculum


class StageSection(Section):
    """One curriculum stage (see agent/tasks/curriculum.py)."""

    workspace_size: tuple[float, float, float]
    """Workspace extent (x, y, z) in metres."""
    num_obstacles: int = Field(ge=0, le=64)
    """Obstacles placed in each episode."""
    time_limit: float = Field(gt=0.0)
    """Seconds per episode; steps = ceil(time_limit / tasks.dt)."""
    vision_required: bool
    """Range sensors (and, per task, other seen things) fill their observation slots."""
    tool_use_enabled: bool
    """Tool actions (scanner, gripper) work; otherwise they are invalid actions."""
    cooperation_required: bool
    """Multi-agent: success needs a joint action (every agent signalling at the goal)."""
    success_rate_threshold: float = Field(gt=0.0, le=1.0)
    """Success rate over the recent window needed to leave the stage."""
    min_episodes: int = Field(ge=1)
    """Episodes played in the stage before it may be left."""
    completion_criteria: dict[str, float]
    """Further metric thresholds (means over the window); rates and errors are upper bounds."""


class CurriculumSection(Section):
    window: int = Field(ge=1)
    """Recent episodes over which success rate and criteria are measured."""
    history_limit: int = Field(ge=1)
    """Per-episode metrics kept per stage (older ones only count in the running means)."""
    stages: dict[str, StageSection]
    """Stages in order of difficulty, keyed by difficulty name."""


# --------------------------------------------------------------------------- tasks


class NavigationSection(Section):
    goal_radius: float = Field(gt=0.0)
    """Distance to the goal that counts as reached (m)."""
    min_goal_distance: float = Field(ge=0.0)
    """Goals are placed at least this far from the start (m), so no episode is trivial."""


class ExplorationSection(Section):
    grid_cells: int = Field(ge=2, le=32)
    """Coverage grid is grid_cells x grid_cells at every workspace size (constant observation)."""
    num_resources: int = Field(ge=1, le=16)
    """Hidden resources per episode."""
    detect_radius: float = Field(gt=0.0)
    """A resource is found when the agent comes this close (m)."""
    scan_radius: float = Field(gt=0.0)
    """The scanner tool finds resources this close (m), at the cost of a step."""
    coverage_target: float = Field(gt=0.0, le=1.0)
    """Coverage that, with every resource found, completes the task."""
    resource_value: float = Field(ge=0.0)
    """A found resource is worth this many new cells in the exploration bonus."""


class MultiAgentSection(Section):
    num_agents: int = Field(ge=2, le=8)
    """Agents per team (rows per copy); fixed across stages, so the observation size is too."""
    formation_radius: float = Field(gt=0.0)
    """Agents keep a regular polygon of this radius around the team centroid (m)."""
    formation_tolerance: float = Field(gt=0.0)
    """Slot error under which an agent counts as in formation, and the goal as reached (m)."""
    comm_levels: int = Field(ge=2, le=8)
    """Levels of the communication signal; the top level is the 'ready' signal."""


class ManipulationSection(Section):
    joint_velocity_limit: float = Field(gt=0.0)
    """Joint speed limit (rad/s); one discrete action moves one joint at this speed."""
    joint_limit: float = Field(gt=0.0)
    """Pitch joints move in [-joint_limit, joint_limit] rad; the base yaw in [-pi, pi]."""
    reach_fraction: float = Field(gt=0.0, le=1.0)
    """Arm reach as a fraction of half the smaller horizontal workspace side."""
    target_radius: float = Field(gt=0.0)
    """End-effector distance to the target that counts as reached, as a fraction of the reach."""
    grasp_radius: float = Field(gt=0.0)
    """End-effector distance to the tool at which the gripper catches it, fraction of the reach."""
    obstacle_radius: float = Field(gt=0.0)
    """Radius of the spherical obstacles, as a fraction of the reach."""


class TasksSection(Section):
    dt: float = Field(gt=0.0)
    """Seconds per environment step: the step limit is ceil(time_limit / dt)."""
    agent_radius: float = Field(gt=0.0)
    """Radius of a mobile agent's body (m)."""
    obstacle_radius: tuple[float, float]
    """Obstacle radii (m) of the planar tasks are drawn uniformly from this range."""
    safety_distance: float = Field(ge=0.0)
    """Clearance (m) under which the near-obstacle speed limit applies."""
    max_velocity_near_obstacle: float = Field(gt=0.0)
    """Speed limit near obstacles and teammates (m/s)."""
    min_agent_distance: float = Field(ge=0.0)
    """Teammates closer than this count as 'near' for the speed limit (m)."""
    range_sensors: int = Field(ge=0, le=64)
    """Rays of the range sensor (evenly spread); without vision their slots read 1 (nothing sensed)."""
    sensor_range: float = Field(gt=0.0)
    """Maximum range of a ray (m); readings are divided by it."""
    navigation: NavigationSection
    exploration: ExplorationSection
    multi_agent: MultiAgentSection
    manipulation: ManipulationSection


# --------------------------------------------------------------------------- meta


TransferLayers = Literal["all", "body", "none"]
"""Which layers of a source policy a transfer copies: every one that fits, the hidden layers only
(the output head starts fresh), or none (a from-scratch start, the baseline a search must beat)."""


class MetaConfig(Section):
    """The ``meta`` section of params.yaml (agent/meta/: searches, adaptation, online tuning)."""

    storage_url: str = Field(min_length=1)
    """Optuna storage: sqlite:///FILE, an RDB URL (postgresql://...), or journal:FILE."""
    study_name: str = Field(min_length=1)
    """Studies are named '{study_name}/{task}/{kind}', so each task and search kind keeps its own."""
    optimization_metric: Literal["mean_reward", "success_rate"]
    """What a trial returns: the mean greedy reward (or task success rate) of its last evaluation."""
    direction: Literal["maximize", "minimize"]
    """Whether the metric is to be maximised or minimised."""
    n_trials: int = Field(ge=1)
    """Trials per search (on top of those the study already has)."""
    timeout: float | None = Field(gt=0)
    """Seconds after which a search starts no new trial (null: no limit)."""
    pruner: Literal["median", "hyperband", "none"]
    """'median' stops a trial whose evaluation falls below the median of earlier trials' at that step."""
    n_startup_trials: int = Field(ge=0)
    """Trials sampled at random and never pruned before TPE and pruning start."""
    n_jobs: int = Field(ge=1)
    """Trials run at the same time: threads of one process, or Ray tasks (``trial_runner``)."""
    trial_runner: Literal["threads", "ray"] = "threads"
    """Where a search's trials run: threads of this process, or Ray tasks (on the Ray instance
    this process is connected to, RAY_ADDRESS's, or a local one) sharing the study through its
    storage (on one machine SQLite or journal:FILE; across machines PostgreSQL)."""
    trial_timesteps: int = Field(ge=1)
    """Environment steps each trial trains for."""
    eval_interval: int = Field(ge=1)
    """Steps between a trial's intermediate evaluations (its pruning points)."""
    eval_episodes: int = Field(ge=1)
    """Greedy episodes per trial evaluation."""
    adapt_timesteps: int = Field(ge=1)
    """Fine-tuning budget of a policy adaptation (and of the from-scratch baseline)."""
    adapt_epsilon_start: float | None = Field(ge=0.0, le=1.0)
    """Exploration when fine-tuning starts (None: train.epsilon_start, as for the from-scratch run)."""
    adapt_match_features: bool = True
    """Between task types, also keep the input weights of the observation slots and the output
    rows of the actions both tasks share (by name), not only the layers of identical shape."""
    adapt_transfer_layers: TransferLayers = "all"
    """Layers a policy adaptation copies from the source: 'all' that fit, 'body' (hidden layers;
    a fresh output head) or 'none' (see ``lagent optimize --kind transfer``)."""
    online_trials: int = Field(ge=1)
    """Candidates tried by each periodic optimisation during training (besides the unchanged settings)."""
    online_timesteps: int = Field(ge=1)
    """Steps each periodic-optimisation candidate trains from a copy of the live agent."""
