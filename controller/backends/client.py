"""Talking to a running worker: health, model presence, load/unload, metrics.

Only the backends' documented APIs:
- vLLM: `GET /health`, `GET /v1/models`, `GET /metrics` (`vllm:*`),
  `POST /sleep?level=1`, `POST /wake_up`, `GET /is_sleeping` (sleep mode,
  started with `--enable-sleep-mode`);
- llama.cpp `llama-server`: `GET /health`, `GET /v1/models`, `GET /metrics`
  (`llamacpp:*`, with `--metrics`); a single-model server cannot unload;
- Ollama: `GET /api/version`, `GET /api/tags`, `POST /api/pull`,
  `POST /api/copy`, `GET /api/ps`, and `POST /api/generate` with only a
  model and `keep_alive` to load (-1) or unload (0). Ollama exports no
  Prometheus metrics.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from controller import backends
from controller.errors import BackendError
from controller.spec.models import Model

# Each backend's metric for: requests being served, requests queued, tokens in, tokens out.
METRICS = {
    "vllm": {
        "running": "vllm:num_requests_running",
        "waiting": "vllm:num_requests_waiting",
        "prompt_tokens": "vllm:prompt_tokens_total",
        "generation_tokens": "vllm:generation_tokens_total",
    },
    "llamacpp": {
        "running": "llamacpp:requests_processing",
        "waiting": "llamacpp:requests_deferred",
        "prompt_tokens": "llamacpp:prompt_tokens_total",
        "generation_tokens": "llamacpp:tokens_predicted_total",
    },
    "ollama": {},
}
# Pulling a model can take many minutes; everything else should answer fast.
PULL_TIMEOUT_S = 3600.0


class WorkerClient:
    def __init__(self, backend: str, base_url: str, timeout: float = 5.0, key: str | None = None) -> None:
        """``key``: the worker secret (controller/secrets.py), which llama.cpp and vLLM workers require."""
        self.backend = backend
        self.adapter = backends.get(backend)
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.backend} at {self.base_url}: {what} failed: {exc}") from None
        if response.status_code >= 400:
            raise BackendError(
                f"{self.backend} at {self.base_url}: {what} answered {response.status_code}: {response.text[:300]}"
            )
        return response

    def healthy(self) -> bool:
        try:
            return self.http.get(self.adapter.health_path).status_code == 200
        except httpx.HTTPError:
            return False

    def served_models(self) -> list[str]:
        """The model names this worker answers to."""
        if self.backend == "ollama":
            tags = self._call("GET", "/api/tags", "listing models").json().get("models") or []
            return [str(m.get("name") or m.get("model")) for m in tags]
        data = self._call("GET", "/v1/models", "listing models").json().get("data") or []
        names = [str(m["id"]) for m in data]
        for m in data:
            names += [str(a) for a in m.get("aliases") or []]
        return names

    def ensure_model(self, model: Model) -> list[str]:
        """Make the worker answer to every served name of ``model``; return what was done."""
        present = set(self.served_models())
        if self.backend != "ollama":
            # vLLM serves --served-model-name; llama.cpp answers to --alias (and ignores `model` when single).
            wanted = model.served_names if self.backend == "vllm" else [model.name]
            missing = [n for n in wanted if n not in present]
            if missing:
                raise BackendError(f"{self.backend} at {self.base_url} does not serve {', '.join(missing)}")
            return []
        done = []
        tag = str(model.source.ollama)
        if tag not in present and _with_latest(tag) not in present:
            self._call(
                "POST", "/api/pull", f"pulling {tag}", json={"model": tag, "stream": False}, timeout=PULL_TIMEOUT_S
            )
            done.append(f"pulled {tag}")
        present = set(self.served_models())
        for name in model.served_names:
            if name not in present and _with_latest(name) not in present:
                self._call("POST", "/api/copy", f"naming {tag} {name}", json={"source": tag, "destination": name})
                done.append(f"copied {tag} to {name}")
        return done

    def load(self, model: Model) -> None:
        if self.backend == "ollama":
            self._call("POST", "/api/generate", "loading", json={"model": model.name, "keep_alive": -1}, timeout=600)
        elif self.backend == "vllm":
            self._call("POST", "/wake_up", "waking up")
        else:
            raise BackendError("a single-model llama-server cannot load or unload; start or stop its worker")

    def unload(self, model: Model) -> None:
        if self.backend == "ollama":
            self._call("POST", "/api/generate", "unloading", json={"model": model.name, "keep_alive": 0})
        elif self.backend == "vllm":
            self._call("POST", "/sleep", "putting to sleep", params={"level": 1})
        else:
            raise BackendError("a single-model llama-server cannot load or unload; start or stop its worker")

    def loaded(self, model: Model) -> bool:
        if self.backend == "ollama":
            running = self._call("GET", "/api/ps", "listing loaded models").json().get("models") or []
            names = {str(m.get("name") or m.get("model")) for m in running}
            return model.name in names or _with_latest(model.name) in names
        if self.backend == "vllm":
            return not bool(self._call("GET", "/is_sleeping", "asking about sleep").json().get("is_sleeping"))
        return self.healthy()

    def metrics(self) -> dict[str, float]:
        """This backend's standard figures (running, waiting, tokens), from its own metric names."""
        names = METRICS[self.backend]
        if not names:
            return {}
        text = self._call("GET", self.adapter.metrics_path, "reading metrics").text
        values = parse_prometheus(text)
        return {key: values[name] for key, name in names.items() if name in values}

    def queue_depth(self) -> float | None:
        figures = self.metrics()
        if "running" not in figures:
            return None
        return figures["running"] + figures.get("waiting", 0.0)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of each metric's samples over its labels (enough for one worker's figures)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(3))
    return out


def _with_latest(name: str) -> str:
    return name if ":" in name else f"{name}:latest"
