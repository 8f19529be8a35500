"""TaskType: the task environments this package builds."""

from __future__ import annotations

import enum
from typing import Any


class TaskType(str, enum.Enum):
    """A task the agent can learn. A ``str`` enum, so ``TaskType("navigation")`` and
    ``TaskType.NAVIGATION == "navigation"`` both work, as config files and the CLI give strings."""

    NAVIGATION = "navigation"
    EXPLORATION = "exploration"
    MULTI_AGENT = "multi_agent"
    MANIPULATION = "manipulation"

    @classmethod
    def parse(cls, value: Any) -> "TaskType | None":
        """The task type named by ``value`` (a TaskType, its value or its name), else None."""
        if isinstance(value, cls):
            return value
        text = str(value.value if isinstance(value, enum.Enum) else value)
        for member in cls:
            if text in (member.value, member.name):
                return member
        return None
