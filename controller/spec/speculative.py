"""Checks of a model's `speculative` settings that need the whole spec (backend, sources).

What each backend does with them is its adapter's (controller/backends/): llama.cpp's `--model-draft` and
`--draft-max` (or `--spec-type` in later builds), vLLM's `--speculative-config`. Here: which methods each
backend has, and what kind of draft model it takes.
"""

from __future__ import annotations

from collections.abc import Callable

from controller.errors import Problem
from controller.spec.models import Fleet, Model

ProblemAt = Callable[[tuple[str | int, ...], str], Problem]

# What each backend's server (as pinned: llama.cpp b6800 or the installed llama-server, vLLM 0.11) can do, and
# what to do instead.
DRAFT_KIND = {"llamacpp": "gguf", "vllm": "huggingface"}
DRAFT_FORM = {
    "llamacpp": "a local GGUF file (`draft: {gguf: PATH}`)",
    "vllm": "a Hugging Face repo (`draft: {huggingface: ORG/NAME}`)",
}


def check(fleet: Fleet, problem: ProblemAt) -> list[Problem]:
    out: list[Problem] = []
    for index, model in enumerate(fleet.models):
        if model.speculative is not None:
            out += _methods(model, ("models", index, "speculative"), problem)
    return out


def _methods(model: Model, where: tuple[str | int, ...], problem: ProblemAt) -> list[Problem]:
    """The method and the draft model against what the model's backend has."""
    spec = model.speculative
    assert spec is not None
    name, backend = model.name, model.backend
    if backend == "ollama":
        return [
            problem(
                where,
                f"model {name}: Ollama has no speculative decoding; remove `speculative`, or serve the model with "
                "llamacpp (method draft: a small GGUF of the same tokenizer) or vllm (method ngram or mtp)",
            )
        ]
    out: list[Problem] = []
    if spec.method == "draft" and spec.draft is None:
        out.append(
            problem(
                (*where, "draft"),
                f"model {name}: method draft needs `draft`, the small model of the same tokenizer that guesses: "
                f"for {backend}, {DRAFT_FORM[backend]}",
            )
        )
    if spec.method != "draft" and spec.draft is not None:
        out.append(
            problem(
                (*where, "draft"),
                f"model {name}: `draft` applies only to method draft; method {spec.method} uses no draft model: "
                "remove it",
            )
        )
    if spec.method == "mtp" and backend != "vllm":
        out.append(
            problem(
                (*where, "method"),
                f"model {name}: method mtp (the model's own multi-token-prediction layers) is vLLM's; for "
                f"{backend} use method draft with a small GGUF of the same tokenizer, or ngram",
            )
        )
    if spec.method == "draft" and spec.draft is not None:
        out += _draft(model, where, problem)
    return out


def _draft(model: Model, where: tuple[str | int, ...], problem: ProblemAt) -> list[Problem]:
    """The draft model's source, as the backend takes it."""
    spec = model.speculative
    assert spec is not None and spec.draft is not None
    name, backend, draft = model.name, model.backend, spec.draft
    out: list[Problem] = []
    if draft.kind != DRAFT_KIND[backend]:
        out.append(
            problem(
                (*where, "draft"),
                f"model {name}: {backend} takes as draft {DRAFT_FORM[backend]}, not a {draft.kind} source",
            )
        )
    elif backend == "llamacpp" and str(draft.gguf).startswith("https://"):
        out.append(
            problem(
                (*where, "draft", "gguf"),
                f"model {name}: llama-server takes a draft model from a file only (--model-draft PATH): download "
                f"{draft.gguf} and give its path",
            )
        )
    if backend == "vllm":
        # vllm/config/speculative.py (0.11.0): a draft model that is no EAGLE, Medusa, MLP or MTP head raises
        # NotImplementedError("Speculative decoding with draft model is not supported yet...") at start.
        out.append(
            problem(
                (*where, "method"),
                f"model {name}: vLLM 0.11 (the pinned image) has no speculative decoding with a draft model (its "
                "engine refuses one at start); use method ngram, method mtp for a model with MTP layers, or serve "
                "the model with llamacpp (method draft)",
            )
        )
    return out
