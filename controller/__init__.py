"""Fleet controller: one fleet.yaml to pinned inference workers, a gateway and monitoring."""

__version__ = "0.1.0"
