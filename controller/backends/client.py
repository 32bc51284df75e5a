"""Talking to a running worker: health, model presence, load/unload, metrics.

Only the backends' documented APIs (each checked against the real program's
source or docs; the doubles in tests/doubles follow the same and cite where):
- vLLM (0.11.0, the pinned image): `GET /health`, `GET /v1/models`,
  `GET /metrics` (`vllm:*`), and sleep mode: `POST /sleep?level=1` (weights
  to CPU memory, KV cache dropped), `POST /wake_up`, `GET /is_sleeping`.
  Those three exist only when the server runs with `VLLM_SERVER_DEV_MODE=1`
  (else 404), and free GPU memory only with `--enable-sleep-mode` (without
  it they answer 200 and free nothing). A request served while asleep, or in
  flight when the sleep comes, kills vLLM's engine: unload only a drained
  worker (docs/features/sleep_mode.md; vllm/entrypoints/openai/api_server.py,
  vllm/executor/executor_base.py, vllm/device_allocator/cumem.py);
- llama.cpp `llama-server`: `GET /health`, `GET /v1/models`, `GET /metrics`
  (`llamacpp:*`, with `--metrics`); a single-model server cannot unload;
- Ollama (0.12.6): `GET /api/version`, `GET /api/tags`, `POST /api/pull`,
  `POST /api/copy`, `GET /api/ps`, and `POST /api/generate` with no prompt to
  load, and with `keep_alive: 0` to unload (docs/api.md). `/api/ps` lists a
  loaded model *file* once, under the name it was first loaded by, so a model
  and its copies (the served names) are one entry: match it by digest, which
  /api/tags and /api/ps give alike. Ollama exports no Prometheus metrics.
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from controller import backends
from controller.backends.vllm import VLLM
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
# Pulling a model can take many minutes; loading one, or moving its weights to and from CPU memory, minutes for a
# large model; everything else should answer fast.
PULL_TIMEOUT_S = 3600.0
LOAD_TIMEOUT_S = 600.0
SLEEP_MODE_HINT = (
    "make the model on demand (`swap`), which runs its worker with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode "
    "(behind its guard)"
)


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

    def _call(self, method: str, path: str, what: str, missing: str = "", **kwargs: Any) -> httpx.Response:
        """One request; an error status is a BackendError, a 404 with ``missing`` (what it means) if given."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise BackendError(f"{self.backend} at {self.base_url}: {what} failed: {exc}") from None
        if response.status_code == 404 and missing:
            raise BackendError(f"{self.backend} at {self.base_url}: {path} is not there (404): {missing}")
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
        return listed_names(self.backend, self._call("GET", models_path(self.backend), "listing models").json())

    def missing_names(self, model: Model) -> list[str]:
        """The names of ``model`` this worker should answer to and does not (none: all there)."""
        return missing_names(self.backend, model, self.served_models())

    def ensure_model(self, model: Model) -> list[str]:
        """Make the worker answer to every served name of ``model``; return what was done."""
        present = set(self.served_models())
        if self.backend != "ollama":
            missing = missing_names(self.backend, model, present)
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
        """Make ``model`` resident: Ollama loads it (and keeps it), vLLM wakes up."""
        if self.backend == "ollama":
            body = {"model": model.name, "keep_alive": -1}  # a number: the string "-1" is no Go duration
            self._call("POST", "/api/generate", "loading", json=body, timeout=LOAD_TIMEOUT_S)
        elif self.backend == "vllm":
            self._sleep_route("POST", "/wake_up", "waking up")
        else:
            raise BackendError("a single-model llama-server cannot load or unload; start or stop its worker")

    def unload(self, model: Model) -> None:
        """Free the GPU memory ``model`` holds: Ollama unloads it, vLLM sleeps at level 1 (weights kept in CPU
        memory, so waking is fast). vLLM must be drained first: it is refused while requests are in flight."""
        if self.backend == "ollama":
            self._call("POST", "/api/generate", "unloading", json={"model": model.name, "keep_alive": 0})
        elif self.backend == "vllm":
            if not VLLM.sleep_mode(model):
                raise BackendError(
                    f"{self.backend} at {self.base_url}: without --enable-sleep-mode, sleeping frees no GPU memory; "
                    f"{SLEEP_MODE_HINT}"
                )
            busy = self.queue_depth()
            if busy:
                raise BackendError(
                    f"{self.backend} at {self.base_url}: requests running or waiting: {busy:g}; drain the worker "
                    "before it sleeps (vLLM's engine dies serving while asleep)"
                )
            self._sleep_route("POST", "/sleep", "putting to sleep", params={"level": 1})
        else:
            raise BackendError("a single-model llama-server cannot load or unload; start or stop its worker")

    def loaded(self, model: Model) -> bool:
        if self.backend == "ollama":
            tags = self._call("GET", "/api/tags", "listing models").json().get("models") or []
            digests = {str(m.get("name")): m.get("digest") for m in tags}
            digest = digests.get(model.name) or digests.get(_with_latest(model.name))
            running = self._call("GET", "/api/ps", "listing loaded models").json().get("models") or []
            return digest is not None and any(m.get("digest") == digest for m in running)
        if self.backend == "vllm":
            answer = self._sleep_route("GET", "/is_sleeping", "asking whether it sleeps").json()
            return not bool(answer.get("is_sleeping"))
        return self.healthy()

    def _sleep_route(self, method: str, path: str, what: str, **kwargs: Any) -> httpx.Response:
        """A vLLM sleep-mode route, which exists only in vLLM's development mode."""
        missing = f"vLLM has sleep mode only in its development mode; {SLEEP_MODE_HINT}"
        return self._call(method, path, what, missing, timeout=LOAD_TIMEOUT_S, **kwargs)

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


def models_path(backend: str) -> str:
    """Where a worker of ``backend`` lists the models it answers to."""
    return "/api/tags" if backend == "ollama" else "/v1/models"


def listed_names(backend: str, answer: Any) -> list[str]:
    """The model names in a worker's answer at `models_path` (Ollama's tags; OpenAI's list, llama.cpp's aliases)."""
    if not isinstance(answer, dict):
        raise ValueError("the model list is not a JSON object")
    if backend == "ollama":
        return [str(m.get("name") or m.get("model")) for m in answer.get("models") or []]
    data = answer.get("data") or []
    names = [str(m["id"]) for m in data]
    for m in data:
        names += [str(a) for a in m.get("aliases") or []]
    return names


def missing_names(backend: str, model: Model, present: list[str] | set[str]) -> list[str]:
    """The names of ``model`` a worker of ``backend`` that lists ``present`` should answer to and does not.

    vLLM serves --served-model-name (every served name); llama.cpp answers to --alias, the model's name (a
    single-model server ignores `model` in requests); Ollama lists tags, ``name`` and ``name:latest`` alike.
    """
    have = set(present)
    if backend == "ollama":
        return [n for n in model.served_names if n not in have and _with_latest(n) not in have]
    wanted = model.served_names if backend == "vllm" else [model.name]
    return [n for n in wanted if n not in have]


def _with_latest(name: str) -> str:
    return name if ":" in name else f"{name}:latest"
