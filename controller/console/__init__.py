"""The operator console at `/console`: every GPU, worker, request and warning of the fleet, live, for admins.

Served by the gatekeeper (controller/console/routes.py, mounted on its app); Envoy routes `/console` there.
`auth` decides who may see it, `snapshot` collects the picture once a second for every open console, `live`
reads the requests in flight from Envoy's live log, `actions` does what an admin asks and writes the audit log.
The page itself is `static/` (a plain module, no build step).
"""
