"""The host mesh. Only WireGuard is generated here (``controller mesh``); Tailscale and Nebula meshes exist already
and the hosts' declared addresses are used as they are."""

from controller.mesh.wireguard import (
    KEEPALIVE_S,
    PRIVATE_KEY_PATH,
    HostMesh,
    KeysReport,
    MeshKeyError,
    Peer,
    check_mesh,
    ensure_keys,
    ensure_keys_report,
    host_sync_command,
    mesh_configs,
    mesh_hosts,
    mesh_problems,
    private_key_file,
    public_key,
    read_private_key,
    syncconf_text,
    unreachable_pairs,
)

__all__ = [
    "KEEPALIVE_S",
    "PRIVATE_KEY_PATH",
    "HostMesh",
    "KeysReport",
    "MeshKeyError",
    "Peer",
    "check_mesh",
    "ensure_keys",
    "ensure_keys_report",
    "host_sync_command",
    "mesh_configs",
    "mesh_hosts",
    "mesh_problems",
    "private_key_file",
    "public_key",
    "read_private_key",
    "syncconf_text",
    "unreachable_pairs",
]
