"""The swap coordinator `fleet-swapper`: on-demand models on shared GPUs (the spec's `swap_groups`).

Runs on the gateway host beside Envoy. Envoy sends a request for an on-demand model to the model's own cluster
while its worker is resident, and here otherwise (an aggregate cluster, controller/render/envoy.py): this
service makes the model resident — evicting others of its swap group, least recently used first, each only once
its requests have finished — while the request waits in a bounded queue (a streaming client gets SSE comments
meanwhile), then sends the queued requests on in order. Envoy learns residency from this service's answers to
its health checks (`/resident/<worker>`), so once a model is resident its requests no longer pass here.

- `coordinator.py`: the decisions (queue, eviction, thrash guard, per-user swap limit, the VRAM guard, TTL);
- `movers.py`: how a worker is loaded and unloaded: the local supervisor (`controller up`) or the host agents;
- `service.py`: the HTTP service (held requests, Envoy's health answers, status, metrics, load/unload actions).
"""
