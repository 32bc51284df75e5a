"""`controller up` checks the inotify instances its Envoy needs before anything starts (controller/local/limits.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

import pytest

from controller.errors import ControllerError
from controller.local import limits
from controller.plan import make_plan
from controller.render import envoy
from controller.spec import load_spec
from tests.helpers import MINIMAL, write_spec


def test_an_inotify_instance_of_this_process_is_counted() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    before = limits.inotify_in_use()
    fd = libc.inotify_init1(0)
    assert fd >= 0, os.strerror(ctypes.get_errno())
    try:
        assert limits.inotify_in_use() == before + 1
    finally:
        os.close(fd)
    assert limits.inotify_in_use() == before


def test_a_stack_whose_envoy_could_not_start_is_refused_with_the_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = make_plan(load_spec(write_spec(tmp_path / "fleet.yaml", MINIMAL)))
    need = envoy.inotify_instances(plan) - envoy.INOTIFY_OTHERS
    in_use = limits.inotify_in_use()
    limit = tmp_path / "max_user_instances"
    monkeypatch.setattr(limits, "INOTIFY_LIMIT", limit)
    limit.write_text(f"{in_use + need + 64}\n")  # room, with some to spare for what starts meanwhile
    limits.check_inotify(plan)
    limit.write_text(f"{need // 2}\n")  # less than Envoy alone needs, whatever else holds some
    with pytest.raises(ControllerError) as caught:
        limits.check_inotify(plan)
    message = str(caught.value)
    files = len(plan.fleet.models) + len(plan.workers)
    assert f"Envoy would watch {files} endpoint files (about {need} inotify instances)" in message, message
    assert f"of the {need // 2} that fs.inotify.max_user_instances allows" in message, message
    assert f"> {limit}`" in message and "/etc/sysctl.d/60-fleet-envoy.conf" in message, message


def test_a_reload_needs_instances_only_for_the_new_endpoint_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a reload the running Envoy holds its instances already (they are counted in use): the changed spec needs
    one more for each endpoint file it adds, none for those the Envoy watches."""
    plan = make_plan(load_spec(write_spec(tmp_path / "fleet.yaml", MINIMAL)))
    files = sorted(envoy.eds_files(plan))
    in_use = limits.inotify_in_use()
    limit = tmp_path / "max_user_instances"
    monkeypatch.setattr(limits, "INOTIFY_LIMIT", limit)
    monkeypatch.setattr(limits, "inotify_in_use", lambda uid=None: in_use)
    limit.write_text(f"{in_use}\n")  # no room at all: only a reload that adds no file passes
    limits.check_inotify(plan, watched=files)
    with pytest.raises(ControllerError) as caught:
        limits.check_inotify(plan, watched=files[1:])
    message = str(caught.value)
    assert "the changed spec gives the running Envoy 1 more endpoint file to watch" in message, message
    assert f"hold {in_use} of the {in_use} that" in message and f"echo {in_use + 1 + envoy.INOTIFY_OTHERS} >" in message
    with pytest.raises(ControllerError):
        limits.check_inotify(plan)  # a first start needs Envoy's own as well
