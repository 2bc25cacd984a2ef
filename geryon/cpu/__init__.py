"""cpus: run commands anywhere in the cluster (Inferno's rstyx).

    runas.py    which local account each caller runs as
    process.py  one session's command: its process group, pipes or terminal, kill
    service.py  the gRPC servicer: authenticate, authorize, pump a session's stream
    server.py   `geryon cpu serve`: the server, its limits, shutdown
    client.py   finding a cpu in the registry and running a session on it
    nsinit.py   the exec wrapper that mounts disks in a session's own namespace
"""
