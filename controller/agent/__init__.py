"""The per-host agent: NVML telemetry per GPU, GPU processes mapped to the workers that own them, worker health.
Run as ``fleet-agent``."""
