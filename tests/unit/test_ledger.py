"""The usage ledger: each request counted once, whatever is read twice; torn lines wait for their end."""

from __future__ import annotations

import json
from pathlib import Path

from controller.services.ledger import Entry, Ledger, utc_day


def line(request_id: str, user: str = "me", prompt: int = 3, completion: int = 5, ts: float = 1795600000.0) -> str:
    entry = {
        "time": f"{ts:.3f}",
        "request_id": request_id,
        "user": user,
        "key_id": "0123456789ab",
        "model": "tiny-chat",
        "status": 200,
        "prompt_tokens": str(prompt),
        "completion_tokens": str(completion),
        "ms": 4,
    }
    return json.dumps(entry) + "\n"


def test_each_request_counts_once_even_when_the_log_is_read_again(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    log.write_text(line("a") + line("b") + line("a"))  # "a" twice: a retried write
    ledger = Ledger(tmp_path / "usage.db")
    seen: list[Entry] = []
    assert ledger.ingest(log, seen.append) == 2
    assert [e.request_id for e in seen] == ["a", "b"]
    day = utc_day(1795600000.0)
    assert ledger.tokens_on("me", day) == 16
    # The saved offset lost (as after a crash between the insert and its commit elsewhere): read from 0 again.
    ledger._db.execute("DELETE FROM source")
    with log.open("a") as out:
        out.write(line("c", completion=7))
    assert ledger.ingest(log, seen.append) == 1
    assert [e.request_id for e in seen] == ["a", "b", "c"]
    assert ledger.tokens_on("me", day) == 26
    ledger.close()


def test_a_torn_line_waits_for_its_end(tmp_path: Path) -> None:
    log = tmp_path / "usage.log"
    whole = line("x")
    log.write_text(whole[:20])
    ledger = Ledger(tmp_path / "usage.db")
    assert ledger.ingest(log) == 0
    log.write_text(whole + "not json\n")  # the rest arrives; a foreign line is skipped, never fatal
    assert ledger.ingest(log) == 1
    assert ledger.ingest(log) == 0
    ledger.close()


def test_utc_day_turns_at_midnight_utc() -> None:
    midnight = 1795651200.0  # 2026-11-26T00:00:00Z
    assert utc_day(midnight - 0.001) == "2026-11-25"
    assert utc_day(midnight) == "2026-11-26"
