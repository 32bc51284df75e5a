"""Ollama's model listing, loaded models, keep_alive and OpenAI-compatible routes, the real `ollama serve` where
installed, else the double (tests/doubles/ollama.py).

Each behaviour checked here is Ollama 0.12.6's (the pinned image), from its docs (docs/api.md, the OpenAI
compatibility page) or, where they are silent, its source; the double's docstring says where.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.local.processes import base_env
from tests.contract.test_backends import program
from tests.doubles.common import PACE_ENV
from tests.stubs import free_ports, wait_until

pytestmark = pytest.mark.contract
TAG = os.environ.get("FLEET_OLLAMA_MODEL", "qwen2.5:0.5b")
OTHER = os.environ.get("FLEET_OLLAMA_OTHER_MODEL", "smollm:135m")  # another model file, pulled where a test needs two
COPY = "ol"  # a served name: a copy of TAG


@dataclass
class Ollama:
    url: str

    def get(self, path: str) -> Any:
        reply = httpx.get(f"{self.url}{path}", timeout=30)
        assert reply.status_code == 200, reply.text
        return reply.json()

    def post(self, path: str, body: dict[str, Any], timeout: float = 600) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=timeout)

    def ps(self) -> list[dict[str, Any]]:
        return list(self.get("/api/ps")["models"])

    def digest(self, name: str) -> str:
        (found,) = [m["digest"] for m in self.get("/api/tags")["models"] if m["name"] == name]
        return str(found)


Start = Callable[..., Ollama]


@pytest.fixture
def start_ollama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Start]:
    """``start(pace=0, **variables)``: `ollama serve` on a free loopback port with a models folder of its own and
    those OLLAMA_* variables (none of the caller's), TAG pulled and copied to COPY; ``pace``: the double's seconds
    per token (a test that must see a request in flight sets it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kind = program("ollama", bin_dir, capsys)
    exe = shutil.which("ollama") if kind == "real" else str(bin_dir / "ollama")
    assert exe
    started: list[subprocess.Popen[bytes]] = []

    def start(pace: float = 0, **variables: str) -> Ollama:
        (port,) = free_ports(1)
        env = {k: v for k, v in base_env().items() if not k.startswith("OLLAMA_")}
        env |= {"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path / "models"), PACE_ENV: str(pace)}
        env |= variables
        log = tmp_path / f"ollama-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [exe, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        started.append(proc)
        server = Ollama(f"http://127.0.0.1:{port}")

        def up() -> bool:
            try:
                return httpx.get(f"{server.url}/api/version", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: proc.poll() is not None or up(), 60, "ollama up")
        assert proc.poll() is None, log.read_text()
        pulled = server.post("/api/pull", {"model": TAG, "stream": False}, timeout=3600)
        assert pulled.status_code == 200, pulled.text
        copied = server.post("/api/copy", {"source": TAG, "destination": COPY})
        assert copied.status_code == 200, copied.text
        return server

    yield start
    for proc in started:
        proc.terminate()
    for proc in started:
        proc.wait(30)


@pytest.fixture
def ollama(start_ollama: Start) -> Ollama:
    """`ollama serve` as Ollama starts by default (no OLLAMA_* variable but its address and models folder)."""
    return start_ollama()


def test_v1_models_lists_names_with_their_tag(ollama: Ollama) -> None:
    """`/v1/models` ids are the names /api/tags lists: `ol:latest`, never a bare `ol`; owned by the namespace."""
    listed = ollama.get("/v1/models")
    ids = {m["id"] for m in listed["data"]}
    assert {f"{COPY}:latest", TAG} <= ids and COPY not in ids
    assert ids == {m["name"] for m in ollama.get("/api/tags")["models"]}
    assert all(m["object"] == "model" and m["owned_by"] == "library" for m in listed["data"])


def test_ps_lists_a_loaded_model_with_the_documented_fields(ollama: Ollama) -> None:
    """Load (no prompt) and unload (keep_alive 0) through /api/generate; /api/ps has one entry per loaded model
    file, under the name it was loaded by, with its digest as /api/tags gives it and its expiry."""
    assert ollama.ps() == []
    loaded = ollama.post("/api/generate", {"model": COPY, "keep_alive": "10m"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["done"] is True and loaded.json()["done_reason"] == "load"
    (entry,) = ollama.ps()
    assert entry["name"] == entry["model"] == f"{COPY}:latest"
    assert entry["digest"] == ollama.digest(f"{COPY}:latest") == ollama.digest(TAG)
    assert re.fullmatch(r"[0-9a-f]{64}", entry["digest"])
    assert isinstance(entry["size"], int) and entry["size"] > 0
    assert isinstance(entry["size_vram"], int) and 0 <= entry["size_vram"] <= entry["size"]
    assert {"format", "family", "parameter_size", "quantization_level"} <= set(entry["details"])
    left = parse_time(entry["expires_at"]) - now()
    assert datetime.timedelta(minutes=9) < left <= datetime.timedelta(minutes=10, seconds=5), left
    assert ollama.post("/api/generate", {"model": TAG}).status_code == 200
    (shared,) = ollama.ps()  # the tag and its copy are one model file: one entry, still named by the first loader
    assert shared["name"] == f"{COPY}:latest"
    assert ollama.post("/api/generate", {"model": TAG, "keep_alive": -1}).status_code == 200
    (forever,) = ollama.ps()
    assert parse_time(forever["expires_at"]) - now() > datetime.timedelta(days=365 * 100)
    unloaded = ollama.post("/api/generate", {"model": TAG, "keep_alive": 0})
    assert unloaded.status_code == 200 and unloaded.json()["done_reason"] == "unload", unloaded.text
    wait_until(lambda: ollama.ps() == [], 30, "unloaded")


def test_keep_alive_is_seconds_or_a_go_duration(ollama: Ollama) -> None:
    """A number is seconds, a string a Go duration: "-1" has no unit, so it is refused; a model goes once its
    keep_alive has run out."""
    refused = ollama.post("/api/generate", {"model": COPY, "keep_alive": "-1"})
    assert refused.status_code == 400 and "duration" in refused.json()["error"], refused.text
    assert ollama.ps() == []
    assert ollama.post("/api/generate", {"model": COPY, "keep_alive": 1}).status_code == 200
    assert [m["name"] for m in ollama.ps()] == [f"{COPY}:latest"]
    wait_until(lambda: ollama.ps() == [], 30, "unloaded once its keep_alive ran out")


def test_openai_completions(ollama: Ollama) -> None:
    """`/v1/completions`, whole and streamed (with usage last, before [DONE]); a missing model is a 404."""
    body = {"model": COPY, "prompt": "Say hello.", "max_tokens": 8}
    whole = ollama.post("/v1/completions", body)
    assert whole.status_code == 200, whole.text
    reply = whole.json()
    assert reply["object"] == "text_completion" and isinstance(reply["choices"][0]["text"], str)
    assert reply["usage"]["completion_tokens"] > 0
    streamed = ollama.post("/v1/completions", body | {"stream": True, "stream_options": {"include_usage": True}})
    assert streamed.status_code == 200, streamed.text
    events = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1])
    missing = ollama.post("/v1/completions", body | {"model": "no-such-model"})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]["message"], missing.text


def test_openai_embeddings(ollama: Ollama) -> None:
    """`/v1/embeddings`: one unit vector per input, in order; usage counts the input tokens."""
    reply = ollama.post("/v1/embeddings", {"model": COPY, "input": ["the sky", "the grass"]})
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["object"] == "list" and [d["index"] for d in answer["data"]] == [0, 1]
    for item in answer["data"]:
        assert item["object"] == "embedding"
        assert abs(math.sqrt(sum(x * x for x in item["embedding"])) - 1) < 1e-3
    assert answer["data"][0]["embedding"] != answer["data"][1]["embedding"]
    assert answer["usage"]["prompt_tokens"] > 0
    missing = ollama.post("/v1/embeddings", {"model": "no-such-model", "input": "x"})
    assert missing.status_code == 404, missing.text


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def parse_time(text: str) -> datetime.datetime:
    """Go's RFC 3339 time, whose fraction may have up to 9 digits."""
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    assert match, text
    fraction = (match.group(2) or ".0")[:7]
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    return datetime.datetime.fromisoformat(match.group(1) + fraction + zone)


def expires_in(entry: dict[str, Any]) -> datetime.timedelta:
    return parse_time(entry["expires_at"]) - now()


def chat(server: Ollama, model: str) -> None:
    """An OpenAI-compatible request, which carries no keep_alive (Ollama's OpenAI middleware sets none)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    reply = server.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text


def test_ollama_keep_alive_is_the_default_keep_alive(start_ollama: Start) -> None:
    """OLLAMA_KEEP_ALIVE is the keep_alive of a model loaded by a request without one: -1 keeps it for good (what
    an on-demand worker runs with: only the swap coordinator unloads it), unset is 5 minutes, a whole number is
    seconds. A request's own keep_alive sets its model's; one without leaves it as it was."""
    forever = start_ollama(OLLAMA_KEEP_ALIVE="-1")
    chat(forever, COPY)
    (entry,) = forever.ps()
    assert expires_in(entry) > datetime.timedelta(days=365 * 100)
    assert forever.post("/api/generate", {"model": COPY, "keep_alive": "10m"}).status_code == 200
    (entry,) = forever.ps()
    assert datetime.timedelta(minutes=9) < expires_in(entry) <= datetime.timedelta(minutes=10, seconds=5)
    chat(forever, COPY)  # no keep_alive: still the 10 minutes the last one set
    (entry,) = forever.ps()
    assert datetime.timedelta(minutes=9) < expires_in(entry) <= datetime.timedelta(minutes=10, seconds=5)
    unloaded = forever.post("/api/generate", {"model": COPY, "keep_alive": 0})
    assert unloaded.status_code == 200 and unloaded.json()["done_reason"] == "unload", unloaded.text
    wait_until(lambda: forever.ps() == [], 30, "unloaded")
    default = start_ollama()
    chat(default, COPY)
    (entry,) = default.ps()
    assert datetime.timedelta(minutes=4) < expires_in(entry) <= datetime.timedelta(minutes=5, seconds=5)
    seconds = start_ollama(OLLAMA_KEEP_ALIVE="2")
    chat(seconds, COPY)
    assert [m["name"] for m in seconds.ps()] == [f"{COPY}:latest"]
    wait_until(lambda: seconds.ps() == [], 30, "unloaded 2 s after its request")


def test_max_loaded_models_evicts_even_a_model_kept_for_good(start_ollama: Start) -> None:
    """OLLAMA_MAX_LOADED_MODELS=1 (an on-demand worker's): another model file unloads the loaded one, whatever its
    keep_alive, once its requests in flight are done, and a request waits for that; a copy of the loaded model is
    the same file and evicts nothing. Unset, several models stay loaded at once (3 per GPU, or 3 on CPU)."""
    one = start_ollama(pace=0.05, OLLAMA_MAX_LOADED_MODELS="1", OLLAMA_KEEP_ALIVE="-1")  # the double: 64 tokens, 3 s
    assert one.post("/api/pull", {"model": OTHER, "stream": False}, timeout=3600).status_code == 200
    assert one.post("/api/generate", {"model": COPY, "keep_alive": -1}).status_code == 200
    assert one.post("/api/generate", {"model": TAG}).status_code == 200  # the same file
    assert [m["name"] for m in one.ps()] == [f"{COPY}:latest"]
    assert one.post("/api/generate", {"model": OTHER}).status_code == 200
    assert [m["name"] for m in one.ps()] == [canonical(OTHER)]
    # A request for COPY while OTHER answers: it waits until OTHER's answer is done, then OTHER unloads.
    body = {"model": OTHER, "prompt": "Tell a long story.", "options": {"num_predict": 512}}
    with httpx.stream("POST", f"{one.url}/api/generate", json=body, timeout=300) as stream:
        lines = stream.iter_lines()
        first = next(lines)
        assert json.loads(first)["done"] is False
        loaded: list[float] = []

        def load() -> None:
            if one.post("/api/generate", {"model": COPY}).status_code == 200:
                loaded.append(time.monotonic())

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        time.sleep(1.0)
        assert loaded == [] and [m["name"] for m in one.ps()] == [canonical(OTHER)]  # still answering OTHER
        rest = [json.loads(line) for line in lines if line.strip()]
        ended = time.monotonic()
    assert rest[-1]["done"] is True and rest[-1]["done_reason"] in ("length", "stop")
    loader.join(60)
    assert loaded and loaded[0] >= ended - 0.5, (loaded, ended)
    assert [m["name"] for m in one.ps()] == [f"{COPY}:latest"]
    several = start_ollama()
    assert several.post("/api/generate", {"model": COPY}).status_code == 200
    assert several.post("/api/pull", {"model": OTHER, "stream": False}, timeout=3600).status_code == 200
    assert several.post("/api/generate", {"model": OTHER}).status_code == 200
    assert sorted(m["name"] for m in several.ps()) == sorted([f"{COPY}:latest", canonical(OTHER)])


def canonical(name: str) -> str:
    return name if ":" in name else f"{name}:latest"
