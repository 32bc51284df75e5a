"""The operator console in a real browser: sign-in, every worker and GPU, a live stream, keys, swaps, a killed
worker. Each test opens its own page; the stack (tests/browser/conftest.py) is shared by the module."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from controller.plan import make_plan
from controller.spec import load_spec
from tests.browser.conftest import CHROMIUM_ARGS, ON_DEMAND, Console
from tests.e2e.test_monitoring_stack import GPU_MODEL

pytestmark = pytest.mark.browser

DOCS = Path(__file__).resolve().parents[2] / "docs"  # the screenshots the README shows
DOWN_WITHIN_S = 2.0  # the bound: a killed worker's card shows it down within this


@pytest.fixture
def shots(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where a test's screenshots go: docs/ with `--update-golden` (as golden files are refreshed), else a
    temporary folder, so a test run leaves the checkout as it was."""
    return DOCS if request.config.getoption("--update-golden") else tmp_path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def signed_in(browser: Browser, console: Console, key: str) -> Page:
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(console.url)
    expect(page).to_have_url(f"{console.url}/login")
    page.fill("#key", key)
    page.click("button[type=submit]")
    return page


def live(page: Page) -> None:
    expect(page.locator("#link")).to_have_text("live")


def api(console: Console, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with console.stack.http() as http:
        return http.request(method, console.stack.base_url.removesuffix("/v1") + path, headers=headers, **kwargs)


def usage_by_app(console: Console) -> dict[str | None, int]:
    rows = json.loads(console.stack.ctl("usage", "--json", "--by", "app").stdout)
    return {row["app"]: row["total_tokens"] for row in rows}


def test_a_plain_user_is_refused_and_so_is_a_forged_action(browser: Browser, console: Console) -> None:
    page = signed_in(browser, console, console.plain_key)
    expect(page.locator(".error")).to_contain_text("alice is not an admin")
    assert page.url.endswith("/console/login")
    page.context.close()
    assert api(console, "GET", "/console/api/snapshot", console.plain_key).status_code == 403
    assert api(console, "GET", "/console/api/snapshot", None).status_code == 401
    assert api(console, "GET", "/console/events", "sk-fleet-0000000000000000-nope").status_code == 401
    # A signed-in admin's cookie without the session's CSRF token (what a cross-site form would send): refused.
    page = signed_in(browser, console, console.stack.key)
    live(page)
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    with console.stack.http(cookies=cookies) as http:
        forged = http.post(f"{console.url}/api/actions", json={"action": "create_key", "target": "demo"})
        assert forged.status_code == 403, forged.text
        other_site = http.post(
            f"{console.url}/api/actions",
            json={"action": "create_key", "target": "demo"},
            headers={"x-csrf-token": "x", "origin": "https://evil.example"},
        )
        assert other_site.status_code == 403
        assert "access-control-allow-origin" not in {k.lower() for k in other_site.headers}
    page.context.close()


def test_the_admin_sees_every_worker_and_gpu(browser: Browser, console: Console, shots: Path) -> None:
    page = signed_in(browser, console, console.stack.key)
    live(page)
    plan = make_plan(load_spec(console.stack.spec))
    assert len(plan.workers) >= 2
    for worker in plan.workers:
        card = page.locator(f"[data-worker='{worker.name}']")
        expect(card).to_contain_text(worker.model)
        expect(card).to_contain_text(worker.backend)
    expect(page.locator(f"[data-worker='{console.vllm_worker}'] .health")).to_contain_text("up")
    for use in plan.gpus:
        expect(page.locator(f"[data-gpu='{use.gpu.uuid}']")).to_be_visible()
    # The vLLM double's process is on its planned GPU, owned by its worker (the agent, from the NVML double).
    (gpu,) = next(w for w in plan.workers if w.model == GPU_MODEL).gpus
    expect(page.locator(f"[data-gpu='{gpu.uuid}']")).to_contain_text(f"{console.vllm_pid}: 2 GiB {console.vllm_worker}")
    expect(page.locator(f"[data-worker='{console.vllm_worker}']")).to_contain_text("pinning")
    page.screenshot(path=str(shots / "console.png"), full_page=True)
    page.context.close()


def test_a_streaming_request_appears_while_it_runs_and_then_in_the_activity(
    browser: Browser, console: Console, shots: Path
) -> None:
    page = signed_in(browser, console, console.stack.key)
    live(page)
    done: dict[str, Any] = {}

    def stream() -> None:
        client = console.stack.openai()
        chunks = client.chat.completions.create(
            model=GPU_MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=80, stream=True
        )
        done["chunks"] = sum(1 for _ in chunks)

    thread = threading.Thread(target=stream)
    thread.start()
    row = page.locator("#in-flight tbody tr[data-request]")
    expect(row.first).to_contain_text(GPU_MODEL, timeout=10_000)
    expect(row.first).to_contain_text("demo")
    expect(row.first.locator(".phase")).to_have_text("generating")
    expect(row.first).to_contain_text(console.vllm_worker)
    page.screenshot(path=str(shots / "console-live.png"), full_page=False)
    rid = row.first.get_attribute("data-request")
    thread.join(timeout=30)
    assert done.get("chunks"), "the stream did not finish"
    expect(page.locator(f"#in-flight tr[data-request='{rid}']")).to_have_count(0, timeout=10_000)
    expect(page.locator(f"#recent tr[data-request='{rid}']")).to_contain_text("200", timeout=10_000)
    page.context.close()


def test_a_key_is_created_shown_once_and_revoked_from_the_page(browser: Browser, console: Console) -> None:
    page = signed_in(browser, console, console.stack.key)
    live(page)
    page.fill("#new-key input[name=user]", "demo")
    page.fill("#new-key input[name=label]", "from the console")
    page.fill("#new-key input[name=app]", "need-job")
    page.click("#new-key button[type=submit]")
    page.click("#confirm-ok")
    shown = page.locator("#new-key-value")
    try:
        expect(shown).to_have_text(re.compile(r"^sk-fleet-"))
    except AssertionError:
        raise AssertionError(f"no key shown; the page said: {page.locator('#toast').inner_text()!r}") from None
    key = shown.inner_text()
    page.click("#shown-once button")
    assert api(console, "GET", "/v1/models", key).status_code == 200
    ident = key.split("-")[2]
    row = page.locator(f"#keys tr[data-key='{ident}']")
    expect(row).to_contain_text("from the console")
    expect(row).to_contain_text("need-job")
    # The key's requests carry its app: in the console's activity and in the ledger (`controller usage --by app`).
    reply = console.stack.openai(key).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    recent = page.locator("#recent tr[data-request]:has-text('need-job')")
    expect(recent.first).to_contain_text("demo", timeout=10_000)
    expect(recent.first).to_contain_text("tiny-chat")
    assert reply.usage is not None
    deadline = time.monotonic() + 15
    while (by_app := usage_by_app(console)).get("need-job") != reply.usage.total_tokens:
        assert time.monotonic() < deadline, f"the ledger has no {reply.usage.total_tokens} tokens of need-job: {by_app}"
        time.sleep(0.5)
    row.locator("button[data-act=revoke_key]").click()
    page.click("#confirm-ok")
    expect(row.locator(".state")).to_have_text("revoked")
    deadline = time.monotonic() + 15
    while api(console, "GET", "/v1/models", key).status_code != 401:
        assert time.monotonic() < deadline, "the revoked key still works"
        time.sleep(0.5)
    audit = page.locator("#audit tbody")
    expect(audit).to_contain_text("revoke_key")
    expect(audit).to_contain_text("create_key")
    page.context.close()


def test_an_on_demand_model_is_unloaded_and_loaded_from_the_page(browser: Browser, console: Console) -> None:
    page = signed_in(browser, console, console.stack.key)
    live(page)
    swap = page.locator(f"#swap tr[data-swap='{ON_DEMAND}']")
    page.locator(f"#swap tr[data-swap='{ON_DEMAND}'] button[data-act=load]").click()
    page.click("#confirm-ok")
    expect(swap.locator(".state")).to_have_text("resident", timeout=60_000)
    page.locator(f"#swap tr[data-swap='{ON_DEMAND}'] button[data-act=unload]").click()
    page.click("#confirm-ok")
    expect(swap.locator(".state")).to_have_text("unloaded", timeout=60_000)
    expect(page.locator("#audit tbody")).to_contain_text("unload")
    page.context.close()


def test_a_killed_worker_shows_down_with_a_warning_and_clears_when_it_is_back(
    browser: Browser, console: Console
) -> None:
    page = signed_in(browser, console, console.stack.key)
    live(page)
    (name, row), *_ = console.stack.workers("tiny-chat").items()
    card = page.locator(f"[data-worker='{name}']")
    expect(card).to_have_class("card health-up")
    # Every change of the card's health and of the warnings, as the page draws them, with the page's clock.
    page.evaluate(
        """(name) => {
          window.seen = [];
          const note = () => {
            const card = document.querySelector(`[data-worker='${name}']`);
            const down = [...document.querySelectorAll('#warnings li')].some((li) => li.textContent.includes(name));
            window.seen.push({t: performance.timeOrigin + performance.now(), card: card && card.className, down});
          };
          new MutationObserver(note).observe(document.body, {subtree: true, childList: true, attributes: true});
        }""",
        name,
    )
    killed = time.time() * 1000
    os.kill(int(row["pid"]), signal.SIGKILL)
    expect(card).not_to_have_class("card health-up", timeout=5_000)
    expect(card).to_have_class("card health-up", timeout=60_000)
    expect(page.locator("#warnings")).not_to_contain_text(name, timeout=30_000)
    seen: list[dict[str, Any]] = page.evaluate("window.seen")
    first_down = next(s["t"] for s in seen if s["card"] and "health-up" not in s["card"])
    warned = [s for s in seen if s["down"]]
    print(f"\n[browser] {name} killed: its card not up after {(first_down - killed) / 1000:.2f} s")
    assert first_down - killed <= DOWN_WITHIN_S * 1000, f"card down after {(first_down - killed) / 1000:.2f} s"
    assert warned, "no warning named the killed worker"
    page.context.close()
