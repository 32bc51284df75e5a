"""`controller deploy`: the fleet's rendered files onto its hosts, over SSH with Ansible.

One deploy, in order (controller/deploy/engine.py):

    lock      one deploy of a fleet at a time (lock.py); an audit line per deploy (audit.py)
    bundle    per host, every file it must hold: rendered files, the resolved spec, secrets (0600),
              the mesh config, the models its llama.cpp workers read (bundle.py)
    probe     one Ansible task per host reads what is there (ansible/files/probe.py): file digests, the
              last deploy's manifest, the fleet's containers, tools, the CDI spec's GPUs, listening ports
    preflight from the probe: SSH, runtime, CDI names the planned GPUs, ports free; a failure stops
              everything before anything changed (preflight.py)
    diff      per host: files added / changed / removed, services started / restarted / removed (diff.py)
    apply     `--check` stops before this. Per host: back up, push, mesh, images, restart only the changed
              services, gate each started worker on a one-token inference, roll the host back if a step
              fails (ansible/deploy.yml, role fleet_host)

The controller's own records of a fleet live under ``<state-dir>/fleets/<fleet>/``: the worker secret,
the mesh keys, the deploy lock and the audit log.
"""
