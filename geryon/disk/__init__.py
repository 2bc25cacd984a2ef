"""Disks: a chunk file holding a file system, served over 9P2000.

styx.py     the 9P2000 messages (the table at its top) and their bytes
users.py    /adm/users: who may do what on a disk
fs.py       the file system inside a chunk (one SQLite database)
server.py   the chunk server: one disk over 9P, plain or in TLS
client.py   a 9P client: requests in flight, file operations by path
mount.py    `geryon mount`: a disk name as a FUSE file system that follows its entry
"""
