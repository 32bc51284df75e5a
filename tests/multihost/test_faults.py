"""Faults on the deployed fake fleet (tests/multihost/faults.py): a GPU host's link cut.

gpu1 holds one of tiny-chat's two replicas and tiny-embed's only one. Its link is cut as a real one is, a
blackhole (frames dropped, never a reset), while four clients keep sending short chat completions:

- Envoy's active health check takes gpu1's endpoints out of rotation within the window its running config allows
  (`faults.HealthWindow`: interval 5 s + jitter 0.5 s + timeout 2 s, then unhealthy interval 2 s + jitter + timeout:
  12 s), read off Envoy's admin;
- the tiny-chat load sees zero errors: a request caught on gpu1 (on a pooled connection, or in flight at the cut)
  is turned into a connection reset by the kernel timers the cluster sets (TCP_USER_TIMEOUT, TCP keepalive; see
  `controller.render.envoy._cluster`) and retried on gpu2 before its first byte; new ones go to gpu2;
- tiny-embed, with no replica elsewhere, answers 503 at once while its replica is out;
- the link restored, both endpoints come back into rotation and serve, without a deploy.

Then the two kernel timers apart, with gpu1's tiny-chat server stopped (SIGSTOP: a backend busy with a long
generation, whose kernel still acknowledges everything):
- on a live host they cut nothing: a request (and a stream not yet started) through `/proxy/<worker>` (no retries)
  waits the 18 s the server is stopped and is answered, since the host's kernel answers the keepalive probes;
- on a cut host they free the requests stuck there: requests in flight on gpu1 (acknowledged, no answer) when its
  link is cut are reset about keepalive time + interval (12 s) later and answered by gpu2.

A stream that had already sent bytes from gpu1 cannot be retried (the invariant: never after the first byte): its
client gets an error, which is why the load here is of short whole answers.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import openai
import pytest

from controller.render import envoy
from tests.multihost import faults
from tests.multihost.faults import measure_link_cut
from tests.multihost.fleet import Deploy, Fleet, gateway_client

pytestmark = [pytest.mark.multihost]

# Over the health-check window: the admin poll (0.1 s) and a loaded 2-core machine's scheduling.
SLACK_S = 3.0
# From the link's restoration to the endpoints back in rotation: a health check every unhealthy interval (2 s +
# jitter), the mesh's WireGuard handshake (retried every 5 s), a connect; measured about 2-5 s here.
BACK_S = 30.0
FAST_503_S = 3.0
# Each test's own part takes 30-90 s; the rest of the limit is the session's hosts, images and first deploy, which
# come with whichever test of the tier runs first (minutes on a loaded 2-core machine).
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def at_spec(fleet: Fleet, deployed: Deploy) -> Deploy:
    """The fleet at `fleet.spec` (a no-change deploy when it already is; test_deploy.py leaves other specs)."""
    again = fleet.deploy("--yes")
    assert again.rc == 0, f"{again.stderr[-3000:]}\n{json.dumps(again.out, indent=1)[-3000:]}"
    return again


@pytest.mark.timeout(TIMEOUT_S)
def test_a_gpu_hosts_link_cut(fleet: Fleet, at_spec: Deploy, note: Callable[[str], None]) -> None:
    r = measure_link_cut(fleet, "gpu1", clients=4, hold_s=20)
    summary = json.dumps(r.summary(), indent=1)
    print(summary)
    bound = r.window.bound_s + SLACK_S
    assert r.window.bound_s <= 15, r.window.describe()  # the rendered checks, as the issue states them
    # out of rotation within the window
    assert r.chat_failed_health_check_s is not None and r.chat_failed_health_check_s <= bound, summary
    assert r.chat_out_of_rotation_s is not None and r.chat_out_of_rotation_s <= bound, summary
    assert r.embed_out_of_rotation_s is not None and r.embed_out_of_rotation_s <= bound, summary
    # tiny-chat: zero client errors, and the load really ran through the cut
    assert r.errors == [], summary
    assert r.requests_during_cut >= 20, summary
    # tiny-embed: 503, fast
    assert [status for status, _ in r.embed_503] == [503] * 3, summary
    assert r.embed_codes == ["no_healthy_upstream"] * 3, summary  # Envoy's own answer: no replica left to try
    assert all(seconds <= FAST_503_S for _, seconds in r.embed_503), summary
    # back without a deploy
    assert r.back_chat_s is not None and r.back_chat_s <= BACK_S, summary
    assert r.back_embed_s is not None and r.back_embed_s <= BACK_S, summary
    assert r.embed_after is None, summary
    assert r.served_by_host_after > 0, summary
    note(
        f"gpu1 link cut: out of rotation after {r.chat_out_of_rotation_s:.1f} s (health check "
        f"{r.chat_failed_health_check_s:.1f} s, window {r.window.bound_s:g} s), {r.requests_during_cut} chat "
        f"requests during the cut, 0 failed (slowest {r.latency_s.get('max', 0):.1f} s), tiny-embed 503 in "
        f"{max(s for _, s in r.embed_503):.2f} s; back {r.back_chat_s:.1f} s after the link"
    )


@pytest.mark.timeout(TIMEOUT_S)
def test_a_silent_generation_on_a_live_host_is_not_cut(fleet: Fleet, at_spec: Deploy) -> None:
    gateway, port = fleet.hosts["gateway"], faults.admin_port(fleet)
    w = faults.worker(fleet, "tiny-chat", "gpu1")
    ca, key = faults.gateway_ca(fleet), faults.api_key(fleet, "alice")
    gw = gateway.address
    proxy = openai.OpenAI(
        base_url=f"https://{gw}/proxy/{w.name}/v1",
        api_key=key,
        http_client=gateway_client(gw, ca),
        max_retries=0,
        timeout=90,
    )
    chat = faults.endpoint_key(fleet, "tiny-chat", "gpu1")
    answers: dict[str, str] = {}

    def ask(kind: str) -> None:
        try:
            if kind == "whole":
                reply = proxy.chat.completions.create(
                    model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8
                )
                answers[kind] = "ok" if reply.choices[0].message.content is not None else "empty"
            else:
                chunks = list(
                    proxy.chat.completions.create(
                        model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
                    )
                )
                answers[kind] = "ok" if any(c.choices and c.choices[0].finish_reason for c in chunks) else "unfinished"
        except Exception as exc:  # reported by the assertion below
            answers[kind] = repr(exc)

    with faults.EnvoyWatch(gateway, port, [envoy.model_cluster("tiny-chat")]) as watch:
        plain = faults.sdk(fleet, key, ca)
        faults.wait_serving(watch, plain, [chat], 180, gateway)
        plain.close()
        threads = [threading.Thread(target=ask, args=(k,)) for k in ("whole", "stream")]
        with faults.paused(fleet.hosts["gpu1"], w.name):
            began = time.monotonic()
            for t in threads:
                t.start()
            time.sleep(18)  # past the 12 s a dead link's connection lives: only a live kernel's answers keep it
            assert answers == {}, answers
        for t in threads:
            t.join(60)
        took = time.monotonic() - began
        proxy.close()
        assert answers == {"whole": "ok", "stream": "ok"}, answers
        assert took >= 18
        assert watch.wait(chat, faults.in_rotation, time.monotonic(), 60) is not None, watch.flags(chat)


@pytest.mark.timeout(TIMEOUT_S)
def test_requests_in_flight_on_a_cut_host_are_answered_elsewhere(
    fleet: Fleet, at_spec: Deploy, note: Callable[[str], None]
) -> None:
    gateway, port = fleet.hosts["gateway"], faults.admin_port(fleet)
    gpu1 = fleet.hosts["gpu1"]
    w = faults.worker(fleet, "tiny-chat", "gpu1")
    chat = faults.endpoint_key(fleet, "tiny-chat", "gpu1")
    ka = faults.keepalive(gateway, port, chat.split("/")[0])
    bound = ka["keepalive_time"] + ka["keepalive_interval"] + SLACK_S
    ca, key = faults.gateway_ca(fleet), faults.api_key(fleet, "alice")
    client = faults.sdk(fleet, key, ca, timeout=90)
    results: list[tuple[float, str | None]] = []
    lock = threading.Lock()

    def ask() -> None:
        error = None
        try:
            client.chat.completions.create(
                model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        except Exception as exc:  # reported by the assertion below
            error = repr(exc)
        with lock:
            results.append((time.monotonic(), error))

    embed = faults.endpoint_key(fleet, "tiny-embed", "gpu1")
    with faults.EnvoyWatch(gateway, port, [chat.split("/")[0], embed.split("/")[0]]) as watch:
        faults.wait_serving(watch, client, [chat, embed], 180, gateway)
        threads = [threading.Thread(target=ask) for _ in range(12)]
        try:
            with faults.paused(gpu1, w.name):
                for t in threads:
                    t.start()
                deadline = time.monotonic() + 10
                while (stuck := faults.host_stat(gateway, port, chat, "rq_active")) == 0:
                    assert time.monotonic() < deadline, "no request reached gpu1's replica"
                    time.sleep(0.2)
                time.sleep(1)
                with faults.link_cut(gpu1) as began:
                    for t in threads:
                        t.join(max(0.1, began + bound + 30 - time.monotonic()))
                    ended = time.monotonic()
        finally:
            for t in threads:
                if t.is_alive():
                    t.join(60)
        errors = [e for _, e in results if e]
        assert errors == [] and len(results) == 12, results
        last = max(t for t, _ in results) - began
        assert last <= bound, f"the requests stuck on gpu1 were answered {last:.1f} s after the cut (bound {bound} s)"
        back = watch.wait(chat, faults.in_rotation, ended, BACK_S + 20)
        assert back is not None, f"gpu1 not back in rotation: {watch.flags(chat)}"
    client.close()
    note(
        f"{stuck} request(s) in flight on gpu1 at its link cut: answered by gpu2 {last:.1f} s after the cut (keepalive {ka})"
    )
