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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from controller.local.processes import base_env
from tests.contract.test_backends import program
from tests.stubs import free_ports, wait_until

pytestmark = pytest.mark.contract
TAG = os.environ.get("FLEET_OLLAMA_MODEL", "qwen2.5:0.5b")
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


@pytest.fixture
def ollama(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Ollama]:
    """`ollama serve` on a free loopback port with a models folder of its own, TAG pulled and copied to COPY."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kind = program("ollama", bin_dir, capsys)
    exe = shutil.which("ollama") if kind == "real" else str(bin_dir / "ollama")
    assert exe
    (port,) = free_ports(1)
    env = base_env() | {"OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_MODELS": str(tmp_path / "models")}
    env.pop("OLLAMA_KEEP_ALIVE", None)
    log = tmp_path / "ollama.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
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
        yield server
    finally:
        proc.terminate()
        proc.wait(30)


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
