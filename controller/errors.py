"""The controller's error hierarchy, drawn once.

    ControllerError          anything the CLI prints as one line and exits non-zero for
    ├── SpecError            the fleet file is malformed or inconsistent      (exit 2)
    ├── PlanError            the spec is valid but cannot be placed          (exit 2)
    ├── RenderError          a renderer could not produce a file             (exit 3)
    ├── DeployError          a remote step failed; names the host and step   (exit 4)
    └── BackendError         a worker backend misbehaved                     (exit 5)

Each error carries a list of ``Problem``s so that one run reports every
problem in a fleet file at once, each on its own line, in a stable order.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Problem:
    """One finding: where it is (file, line, dotted path) and what to do."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        subject = f"{self.path}: " if self.path else ""
        return f"{where}: {subject}{self.message}"


class ControllerError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_code = 1

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = sorted(problems or [], key=_problem_order)

    def lines(self) -> list[str]:
        """The human lines to print: one per problem, or the message alone."""
        if not self.problems:
            return [self.message]
        return [str(p) for p in self.problems]


def _problem_order(p: Problem) -> tuple[str, int, str, str]:
    return (p.file, p.line if p.line is not None else 0, p.path, p.message)


class SpecError(ControllerError):
    exit_code = 2


class PlanError(ControllerError):
    exit_code = 2


class RenderError(ControllerError):
    exit_code = 3


class DeployError(ControllerError):
    exit_code = 4


class BackendError(ControllerError):
    exit_code = 5
