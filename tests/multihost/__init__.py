"""The multihost tier: several fake hosts on this machine, each in network, mount, UTS, IPC and PID namespaces of its own
with its own address, sshd, /etc, /var, /run and container store (see `hosts.py`); `controller deploy` deploys to them."""
