"""Grafana on the gateway host: provisioning and dashboards.

Files: `<gateway>/grafana/provisioning/datasources/prometheus.yaml` (the
gateway's Prometheus, fixed uid), `<gateway>/grafana/provisioning/dashboards/fleet.yaml`
(a file provider for the dashboards folder) and
`<gateway>/grafana/dashboards/<uid>.json`, one per fragment in
``monitoring/dashboards/``.

A fragment holds only what a dashboard says (panels, queries, legends,
units); this module adds what Grafana needs (ids, grid positions, the data
source, field config) and the fleet's alert thresholds, so a panel's red
line is the alert's threshold. Dumped as JSON with stable key order.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from controller.errors import RenderError
from controller.plan.models import Plan
from controller.render import ASSETS, Files, dump_yaml, renderer
from controller.spec.models import Thresholds

DATASOURCE = {"type": "prometheus", "uid": "fleet-prometheus"}
DASHBOARDS_IN_CONTAINER = "/etc/grafana/dashboards"
GRID_WIDTH = 24
HEIGHT = {"stat": 4}  # others: 8
PANEL_TYPES = {"timeseries", "stat", "table", "bargauge", "state-timeline"}
PANEL_KEYS = {"title", "type", "w", "unit", "max", "steps", "base", "threshold", "description", "targets"}
TARGET_KEYS = {"expr", "legend", "instant"}
HEADER = "# Rendered by `controller render` from the fleet spec; do not edit.\n"


@renderer("grafana")
def render(plan: Plan) -> Files:
    gw = plan.fleet.gateway.host
    out: Files = {
        f"{gw}/grafana/provisioning/datasources/prometheus.yaml": HEADER + _yaml(datasources(plan)),
        f"{gw}/grafana/provisioning/dashboards/fleet.yaml": HEADER + _yaml(providers(plan)),
    }
    for path in sorted((ASSETS / "monitoring" / "dashboards").glob("*.yaml")):
        fragment = yaml.safe_load(path.read_text(encoding="utf-8"))
        doc = dashboard(plan, fragment, source=path.name)
        out[f"{gw}/grafana/dashboards/{doc['uid']}.json"] = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    return out


def _yaml(doc: dict[str, Any]) -> str:
    return dump_yaml(doc)


def datasources(plan: Plan) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "uid": DATASOURCE["uid"],
                "type": "prometheus",
                "access": "proxy",
                "url": f"http://127.0.0.1:{plan.fleet.gateway.ports.prometheus}",
                "isDefault": True,
                "editable": False,
                "jsonData": {"timeInterval": "15s"},
            }
        ],
    }


def providers(plan: Plan) -> dict[str, Any]:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "fleet",
                "orgId": 1,
                "folder": f"Fleet {plan.fleet.name}",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 60,
                "options": {"path": DASHBOARDS_IN_CONTAINER},
            }
        ],
    }


def dashboard(plan: Plan, fragment: dict[str, Any], *, source: str) -> dict[str, Any]:
    thresholds = plan.fleet.observability.thresholds
    panels: list[dict[str, Any]] = []
    x = y = row_height = 0
    for item in fragment["panels"]:
        if "row" in item:
            y += row_height
            x = row_height = 0
            panels.append(_row(len(panels) + 1, item["row"], y))
            y += 1
            continue
        panel = _panel(len(panels) + 1, item, thresholds, source)
        w, h = panel["gridPos"]["w"], panel["gridPos"]["h"]
        if x + w > GRID_WIDTH:
            y += row_height
            x = row_height = 0
        panel["gridPos"].update(x=x, y=y)
        x += w
        row_height = max(row_height, h)
        panels.append(panel)
    return {
        "uid": fragment["uid"],
        "title": f"{fragment['title']} ({plan.fleet.name})",
        "description": fragment.get("description", ""),
        "tags": ["fleet", plan.fleet.name],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "templating": {"list": [_variable(v) for v in fragment.get("variables", [])]},
        "panels": panels,
    }


def _row(panel_id: int, title: str, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
        "panels": [],
    }


def _panel(panel_id: int, item: dict[str, Any], thresholds: Thresholds, source: str) -> dict[str, Any]:
    where = f"monitoring/dashboards/{source}: panel {item.get('title')!r}"
    unknown = set(item) - PANEL_KEYS
    kind = item.get("type", "timeseries")
    if unknown or kind not in PANEL_TYPES or not item.get("targets"):
        raise RenderError(f"{where}: unknown keys {sorted(unknown)}, type {kind!r} or no targets")
    marks: list[tuple[float, str]] = sorted((item.get("steps") or {}).items())
    if "threshold" in item:
        if item["threshold"] not in Thresholds.model_fields:
            raise RenderError(f"{where}: threshold {item['threshold']!r} is not in observability.thresholds")
        marks = sorted([*marks, (getattr(thresholds, item["threshold"]), "red")])
    steps: list[dict[str, Any]] = [{"color": item.get("base", "green"), "value": None}]
    steps += [{"color": color, "value": value} for value, color in marks]
    defaults: dict[str, Any] = {
        "unit": item.get("unit", "short"),
        "thresholds": {"mode": "absolute", "steps": steps},
    }
    if "max" in item:
        defaults["min"], defaults["max"] = 0, item["max"]
    if kind == "timeseries" and len(steps) > 1:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    if kind in ("stat", "state-timeline"):
        defaults["color"] = {"mode": "thresholds"}
    return {
        "id": panel_id,
        "type": kind,
        "title": item["title"],
        "description": item.get("description", ""),
        "datasource": dict(DATASOURCE),
        "gridPos": {"h": HEIGHT.get(kind, 8), "w": item.get("w", 12), "x": 0, "y": 0},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": _options(kind),
        "targets": [_target(chr(ord("A") + i), t, where) for i, t in enumerate(item["targets"])],
    }


def _options(kind: str) -> dict[str, Any]:
    reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    if kind == "stat":
        return {"reduceOptions": reduce, "colorMode": "background", "graphMode": "none", "textMode": "value"}
    if kind == "bargauge":
        return {"reduceOptions": reduce, "orientation": "horizontal", "displayMode": "gradient"}
    if kind == "table":
        return {"showHeader": True}
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def _target(ref: str, target: dict[str, Any], where: str) -> dict[str, Any]:
    unknown = set(target) - TARGET_KEYS
    if unknown or "expr" not in target:
        raise RenderError(f"{where}: target {ref}: unknown keys {sorted(unknown)} or no expr")
    instant = bool(target.get("instant", False))
    out: dict[str, Any] = {
        "refId": ref,
        "datasource": dict(DATASOURCE),
        "expr": target["expr"],
        "legendFormat": target.get("legend", "__auto"),
        "range": not instant,
        "instant": instant,
    }
    if instant:
        out["format"] = "table"
    return out


def _variable(v: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": v["name"],
        "label": v.get("label", v["name"]),
        "type": "query",
        "datasource": dict(DATASOURCE),
        "definition": v["query"],
        "query": {"query": v["query"], "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {},
        "sort": 1,
    }
