"""A client process holding a lease, for the death-notice workload.

    python -m bench.holder geryon HOST:PORT NAME
    python -m bench.holder etcd HOST:PORT NAME

It registers NAME under a lease it keeps alive, prints "holding ttl=SECONDS"
and waits to be killed with ``kill -9`` (or gives up after ``LIFETIME_S``).

Geryon's holder is a real Geryon client: ``Client.lease()`` with a 10 s TTL,
so the deletion the benchmark times comes from the KeepAlive stream rule (the
stream's client went away), not from the TTL; the same holder serves a
front of Geryon's etcd store. etcd has no such rule: its
holder asks for a 1 s TTL, which etcd raises to its minimum, renews every
third of it, and its entry goes when the TTL runs out.
"""

from __future__ import annotations

import argparse
import asyncio

LIFETIME_S = 120.0
GERYON_TTL_MS = 10_000
ATTRS = {"svc": "holder", "proto": "tcp"}


async def hold_geryon(address: str, name: str) -> None:
    from geryon.client import Client

    async with Client(address, retry_for=10.0) as client:
        lease = client.lease(GERYON_TTL_MS)
        await lease.start()
        await client.register(name, ATTRS, lease=lease.id)
        print(f"holding ttl={GERYON_TTL_MS / 1000:g}", flush=True)
        await asyncio.sleep(LIFETIME_S)
        await lease.close(revoke=True)


async def hold_etcd(address: str, name: str) -> None:
    import grpc

    from bench.etcd_side import PREFIX, encode, put_method
    from geryon.etcdpb import rpc_pb2 as pb
    from geryon.etcdpb import rpc_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        leases = pb_grpc.LeaseStub(channel)
        grant = await leases.LeaseGrant(pb.LeaseGrantRequest(TTL=1), timeout=10)
        await put_method(channel)(
            pb.PutRequest(key=PREFIX + name.encode(), value=encode(ATTRS), lease=grant.ID),
            timeout=10,
        )
        call = leases.LeaseKeepAlive()
        await call.write(pb.LeaseKeepAliveRequest(ID=grant.ID))
        await asyncio.wait_for(call.read(), 10)
        print(f"holding ttl={grant.TTL}", flush=True)
        loop = asyncio.get_running_loop()
        until = loop.time() + LIFETIME_S
        while loop.time() < until:
            await asyncio.sleep(grant.TTL / 3)
            await call.write(pb.LeaseKeepAliveRequest(ID=grant.ID))
            await asyncio.wait_for(call.read(), 10)


def main() -> None:
    p = argparse.ArgumentParser(prog="bench.holder", description=__doc__)
    p.add_argument("server", choices=["geryon", "etcd"])
    p.add_argument("address")
    p.add_argument("name")
    args = p.parse_args()
    if args.server == "geryon":
        asyncio.run(hold_geryon(args.address, args.name))
    else:
        asyncio.run(hold_etcd(args.address, args.name))


if __name__ == "__main__":
    main()
