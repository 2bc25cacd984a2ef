"""The registry end to end: a real geryon-registryd, the client library,
signals; on both stores (SQLite, and a front of a real three-member etcd)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest
from conftest import Registry, both_stores, collect, events_of, eventually

from geryon import errors
from geryon.client import Client
from geryon.convert import pb, pb_grpc
from geryon.model import EventType, Registration

backend = both_stores  # every test here on both stores, unless it narrows it


async def started(watch):
    """Wait for a watch from 'now' to be established; return its iterator."""
    it = aiter(watch)
    first = await asyncio.wait_for(anext(it), 10)
    assert first.kind == "progress"
    return it


async def test_register_get_find_update_unregister(client: Client) -> None:
    a = await client.register("tcp!host0!6701", {"id": "chunk0", "svc": "kfs"}, persist=True)
    b = await client.register(
        "tcp!host0!6702", {"id": "chunk1", "svc": "kfs", "x": ""}, persist=True
    )
    c = await client.register("tcp!host1!6701", {"svc": "rstyx"}, persist=True)
    assert a.create_revision == a.mod_revision < b.mod_revision < c.mod_revision
    assert (await client.get("tcp!host0!6701")).attrs == {"id": "chunk0", "svc": "kfs"}

    async def names(attrs=None, prefix=""):
        found, _ = await client.find(attrs, prefix=prefix)
        return [s.name for s in found]

    assert await names() == ["tcp!host0!6701", "tcp!host0!6702", "tcp!host1!6701"]
    assert await names({"svc": "kfs"}) == ["tcp!host0!6701", "tcp!host0!6702"]
    assert await names({"svc": "kfs", "id": "chunk1"}) == ["tcp!host0!6702"]
    assert await names({"x": "*"}) == ["tcp!host0!6702"]  # * matches the empty value
    assert await names({"id": "*"}) == ["tcp!host0!6701", "tcp!host0!6702"]
    assert await names({"svc": "nope"}) == []
    assert await names(prefix="tcp!host1") == ["tcp!host1!6701"]
    assert await names({"svc": "kfs"}, prefix="tcp!host0!6701") == ["tcp!host0!6701"]

    u = await client.update(
        "tcp!host0!6701", {"health": "passing", "svc": "cfs"}, remove_attrs=["id"]
    )
    assert u.attrs == {"svc": "cfs", "health": "passing"}
    assert u.create_revision == a.create_revision and u.mod_revision > c.mod_revision
    assert await names({"svc": "kfs"}) == ["tcp!host0!6702"]
    assert await names({"id": "chunk0"}) == []

    gone = await client.unregister("tcp!host0!6702")
    assert gone.name == "tcp!host0!6702"
    with pytest.raises(errors.NotFound):
        await client.get("tcp!host0!6702")
    with pytest.raises(errors.NotFound):
        await client.unregister("tcp!host0!6702")


async def test_upsert_by_owner_moves_lease_in_one_revision(registry: Registry) -> None:
    async with registry.client(user="node0") as c, registry.client(user="node1") as other:
        old, new = await c.grant(30_000), await c.grant(30_000)
        s1 = await c.register("tcp!h!1", {"a": "1"}, lease=old)
        again = await c.register("tcp!h!1", {"a": "1"}, lease=old)
        assert again.mod_revision == s1.mod_revision  # idempotent: no new revision
        watch = c.watch(prefix="tcp!h!")
        it = await started(watch)
        s2 = await c.register("tcp!h!1", {"a": "2"}, lease=new)
        assert s2.lease == new and s2.mod_revision > s1.mod_revision
        assert s2.create_revision == s1.create_revision
        got = await collect(it, lambda ms: events_of(ms))
        assert [(e.type, e.revision) for e in events_of(got)] == [(EventType.PUT, s2.mod_revision)]
        await watch.close()
        # The old lease no longer holds it: revoking it deletes nothing.
        assert await c.revoke(old) == 0
        assert (await c.get("tcp!h!1")).lease == new
        with pytest.raises(errors.AlreadyExists):
            await other.register("tcp!h!1", {"a": "3"}, persist=True)
        with pytest.raises(errors.NotFound, match=f"lease {new} not found"):
            await other.register("tcp!h!2", {}, lease=new)  # not other's: not told it exists


async def test_register_batch_is_one_revision_or_nothing(registry: Registry) -> None:
    async with registry.client(user="node0") as c, registry.client(user="node1") as other:
        lease = await c.grant(30_000)
        await other.register("tcp!h!taken", {}, lease=await other.grant(30_000))
        watch = c.watch(prefix="tcp!h!")
        it = await started(watch)
        batch = [
            Registration(f"tcp!h!{i}", {"svc": "kfs", "i": str(i)}, lease=lease) for i in range(100)
        ]
        done = await c.register_batch(batch)
        rev = done[0].mod_revision
        assert [s.name for s in done] == [r.name for r in batch]
        assert {(s.mod_revision, s.lease) for s in done} == {(rev, lease)}
        assert (await c.get("tcp!h!7")).owner == "node0"
        # A watcher gets the whole revision in one message.
        got = await collect(it, lambda ms: len(events_of(ms)) >= 100)
        assert len([m for m in got if m.kind == "events"]) == 1
        assert [(e.service.name, e.revision) for e in events_of(got)] == [
            (r.name, rev) for r in batch
        ]
        # One refused entry refuses the batch; the error names it and what the
        # others were, with the first refusal's code.
        with pytest.raises(errors.AlreadyExists) as err:
            await c.register_batch(
                [
                    Registration("tcp!h!new", {}, lease=lease),
                    Registration("tcp!h!taken", {}, lease=lease),
                ]
            )
        assert str(err.value) == (
            "1 of 2 entries refused, nothing registered: "
            "services[1] 'tcp!h!taken': tcp!h!taken is registered by node1"
        )
        with pytest.raises(errors.NotFound):
            await c.get("tcp!h!new")
        with pytest.raises(errors.InvalidArgument, match=r"^services: 101 entries, more than 100$"):
            await c.register_batch([Registration(f"x{i}", {}, persist=True) for i in range(101)])
        # Revoking the lease ends the batch's entries in one revision, as any.
        assert await c.revoke(lease) == 100
        assert (await c.find(prefix="tcp!h!"))[0] == [await other.get("tcp!h!taken")]
        await watch.close()


async def test_stale_mod_revision_is_failed_precondition(client: Client) -> None:
    s = await client.register("d0.mbox", {"addr": "tcp!h0!1"}, persist=True)
    s2 = await client.update("d0.mbox", {"addr": "tcp!h0!2"}, expected_mod_revision=s.mod_revision)
    with pytest.raises(errors.FailedPrecondition, match="mod_revision"):
        await client.update("d0.mbox", {"addr": "tcp!h0!3"}, expected_mod_revision=s.mod_revision)
    with pytest.raises(errors.FailedPrecondition):
        await client.unregister("d0.mbox", expected_mod_revision=s.mod_revision)
    # A create fence: create_only refuses to upsert what exists.
    with pytest.raises(errors.FailedPrecondition, match="create_only"):
        await client.register("d0.mbox", {"addr": "tcp!h0!4"}, persist=True, create_only=True)
    assert (await client.get("d0.mbox")) == s2
    await client.unregister("d0.mbox", expected_mod_revision=s2.mod_revision)
    made = await client.register("d0.mbox", {"addr": "tcp!h0!5"}, persist=True, create_only=True)
    assert made.create_revision == made.mod_revision


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.register("", {}, persist=True), "name"),
        (lambda c: c.register("a b", {}, persist=True), "name"),
        (lambda c: c.register("a/b", {}, persist=True), "name"),
        (lambda c: c.register("a\x01", {}, persist=True), "name"),
        (lambda c: c.register("x" * 256, {}, persist=True), "name"),
        (lambda c: c.register("new", {}, persist=True), "name"),
        (lambda c: c.register("event", {}, persist=True), "name"),
        (lambda c: c.register("ok", {"bad attr": "1"}, persist=True), "attrs"),
        (lambda c: c.register("ok", {"": "1"}, persist=True), "attrs"),
        (lambda c: c.register("ok", {"a": "v" * 1025}, persist=True), "attrs"),
        (lambda c: c.register("ok", {f"a{i}": "" for i in range(65)}, persist=True), "attrs"),
        (lambda c: c.register("ok", {}), "lease, persist"),
        (lambda c: c.register("ok", {}, lease=1, persist=True), "lease, persist"),
        (lambda c: c.register("ok", {}, lease=-1), "lease"),
        (lambda c: c.update("ok", {"a": "1"}, remove_attrs=["a"]), "remove_attrs"),
        (lambda c: c.update("ok", remove_attrs=["b@d"]), "remove_attrs"),
        (lambda c: c.grant(10), "ttl_ms"),
        (lambda c: c.grant(86_400_001), "ttl_ms"),
        (lambda c: c.find({"b@d": "1"}), "attrs"),
    ],
)
async def test_bad_input_is_invalid_argument(client: Client, call, field: str) -> None:
    await client.register("ok", {"b": "1"}, persist=True)
    with pytest.raises(errors.InvalidArgument) as info:
        await call(client)
    assert str(info.value).startswith(field + ":")
    assert "\n" not in str(info.value)
    # Nothing was lost or changed by the bad request.
    assert (await client.get("ok")).attrs == {"b": "1"}


async def test_unknown_lease_and_name_are_not_found(client: Client) -> None:
    with pytest.raises(errors.NotFound):
        await client.register("x", {}, lease=999)
    with pytest.raises(errors.NotFound):
        await client.revoke(999)
    with pytest.raises(errors.NotFound):
        await client.update("nope", {"a": "1"})


async def test_lease_ttl_expiry_deletes_entries_in_one_revision(client: Client) -> None:
    # Watching from before the grant, so a slow machine cannot let the lease
    # pass before the watch is there to see it.
    watch = client.watch({"svc": "x"})
    it = await started(watch)
    lease = await client.grant(2_000)
    for i in range(3):
        await client.register(f"tcp!h!{i}", {"svc": "x"}, lease=lease)

    def deletes_of(ms: list) -> list:
        return [e for e in events_of(ms) if e.type is EventType.DELETE]

    got = await collect(it, lambda ms: len(deletes_of(ms)) >= 3)
    deletes = deletes_of(got)
    assert len(deletes) == 3
    assert len({e.revision for e in deletes}) == 1
    found, revision = await client.find({"svc": "x"})
    assert found == [] and revision >= deletes[0].revision
    assert [x.id for x in await client.leases()] == []
    await watch.close()


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from geryon.client import Client
    async def main():
        c = Client(sys.argv[1])
        lease = c.lease(60_000)
        await lease.start()
        await c.register("tcp!doomed!1", {"svc": "doomed"}, lease=lease.id)
        print("ready", flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


async def test_kill9_of_lease_holder_deletes_its_entries(registry: Registry, client) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, registry.address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert [s.name for s in (await client.find({"svc": "doomed"}))[0]] == ["tcp!doomed!1"]
        proc.kill()
        proc.wait()

        # The lease's TTL is a minute: only the stream rule can remove it this soon.
        async def gone():
            return (await client.find({"svc": "doomed"}))[0] == []

        await eventually(gone, timeout=10)
        assert await client.leases() == []
    finally:
        proc.kill()
        proc.wait()


async def test_restart_keeps_persistent_and_resumed_leases_without_events(
    registry: Registry,
) -> None:
    async with registry.client(user="node0") as c, registry.client(user="node1") as idle:
        await c.register("d0.mbox", {"addr": "tcp!h0!1"}, persist=True)
        kept = c.lease(10_000)
        await kept.start()
        await c.register("tcp!kept!1", {"svc": "kfs"}, lease=kept.id)
        dropped = await idle.grant(5_000)  # nobody keeps this one alive
        await idle.register("tcp!dropped!1", {"svc": "kfs"}, lease=dropped)
        _, before = await c.find()

        registry.restart()

        # Every entry is back, the revision did not go back (a front of etcd
        # may make revisions of its own as it starts: never any event).
        names, after = await c.find()
        assert after >= before
        assert [s.name for s in names] == ["d0.mbox", "tcp!dropped!1", "tcp!kept!1"]
        # The kept lease reconnects: watchers from the old revision see only
        # the unrenewed lease's entry go, nothing for the kept one.
        watch = c.watch(start_revision=before + 1)
        got = await collect(aiter(watch), lambda ms: events_of(ms), timeout=20)
        ev = events_of(got)
        assert [(e.type, e.service.name) for e in ev] == [(EventType.DELETE, "tcp!dropped!1")]
        assert not kept.lost.is_set()
        assert [s.name for s in (await c.find())[0]] == ["d0.mbox", "tcp!kept!1"]
        await watch.close()
        await kept.close(revoke=True)


async def test_filtered_watch_sees_entry_leave_as_delete(client: Client) -> None:
    await client.register("tcp!h!1", {"svc": "rstyx"}, persist=True)
    watch = client.watch({"svc": "rstyx"}, snapshot=True)
    it = aiter(watch)
    first = await anext(it)
    assert first.kind == "snapshot" and [s.name for s in first.services] == ["tcp!h!1"]
    await client.register("tcp!h!2", {"svc": "kfs"}, persist=True)  # never matches
    await client.update("tcp!h!1", {"svc": "kfs"})  # leaves the filter
    await client.update("tcp!h!2", {"svc": "rstyx"})  # enters it
    got = await collect(it, lambda ms: len(events_of(ms)) >= 2)
    assert [(e.type, e.service.name) for e in events_of(got)] == [
        (EventType.DELETE, "tcp!h!1"),
        (EventType.PUT, "tcp!h!2"),
    ]
    # Replaying the watch gives Find's answer.
    state = {s.name for s in first.services}
    for e in events_of(got):
        (state.add if e.type is EventType.PUT else state.discard)(e.service.name)
    assert state == {s.name for s in (await client.find({"svc": "rstyx"}))[0]}
    await watch.close()


async def test_watch_sees_every_event_once_across_restart(registry: Registry) -> None:
    async with registry.client() as c:
        watch = c.watch({"svc": "*"}, progress_interval_ms=200)
        it = aiter(watch)
        await anext(it)
        for i in range(20):
            await c.register(f"tcp!a!{i}", {"svc": "x"}, persist=True)

        async def writer():
            for i in range(20, 40):
                await c.register(f"tcp!a!{i}", {"svc": "x"}, persist=True)

        registry.restart()
        await writer()
        got = await collect(it, lambda ms: len(events_of(ms)) >= 40, timeout=20)
        revs = [e.revision for e in events_of(got)]
        assert len(revs) == 40 and revs == sorted(set(revs))
        assert [e.service.name for e in events_of(got)] == [f"tcp!a!{i}" for i in range(40)]
        await watch.close()


async def test_compacted_history_is_out_of_range_and_client_relists(
    start_registry,
) -> None:
    registry = start_registry(extra=["--history", "5"])
    async with registry.client() as c:
        for i in range(20):
            await c.register(f"tcp!c!{i}", {"svc": "x"}, persist=True)
        # The raw stream ends with OUT_OF_RANGE naming the oldest revision.
        async with grpc.aio.insecure_channel(registry.address) as ch:
            stub = pb_grpc.RegistryStub(ch)

            async def reqs():
                yield pb.WatchRequest(create_request=pb.WatchCreateRequest(start_revision=1))

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Watch(reqs()):
                    pass
            assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
            assert "oldest held is" in info.value.details()
        # The client library re-lists and goes on.
        watch = c.watch({"svc": "x"}, start_revision=1)
        it = aiter(watch)
        m = await asyncio.wait_for(anext(it), 10)
        assert m.kind == "snapshot" and len(m.services) == 20
        await c.unregister("tcp!c!0")
        m = await asyncio.wait_for(anext(it), 10)
        assert m.kind == "events" and m.events[0].type is EventType.DELETE
        await watch.close()


async def test_history_is_bounded_in_bytes(start_registry) -> None:
    """Large entries: --history-bytes drops the oldest history by its size,
    and what is held is replayed after a restart (read back from the store)."""
    registry = start_registry(extra=["--history-bytes", "20000"])
    big = {"v": "x" * 1000}
    async with registry.client() as c:
        revs = [(await c.register(f"tcp!b!{i}", big, persist=True)).mod_revision for i in range(40)]
        async with grpc.aio.insecure_channel(registry.address) as ch:
            stub = pb_grpc.RegistryStub(ch)

            async def reqs():
                yield pb.WatchRequest(create_request=pb.WatchCreateRequest(start_revision=1))

            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.Watch(reqs()):
                    pass
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        oldest = int(dict(info.value.trailing_metadata())["geryon-resume-revision"])
        assert revs[0] < oldest < revs[-1]
        registry.restart()
        watch = c.watch(start_revision=oldest)
        got = await collect(
            aiter(watch), lambda ms: any(e.service.name == "tcp!b!39" for e in events_of(ms))
        )
        assert [e.revision for e in events_of(got)] == [r for r in revs if r >= oldest]
        await watch.close()


async def test_stalled_watcher_is_cut_off(start_registry) -> None:
    registry = start_registry(extra=["--watch-backlog", "50"])
    # A watcher that never reads, on a connection with a small fixed window so
    # the server's sends block and its backlog fills.
    async with (
        grpc.aio.insecure_channel(registry.address, options=[("grpc.http2.bdp_probe", 0)]) as ch,
        registry.client() as c,
    ):
        stub = pb_grpc.RegistryStub(ch)

        async def reqs():
            yield pb.WatchRequest(create_request=pb.WatchCreateRequest())
            await asyncio.sleep(3600)

        call = stub.Watch(reqs())
        await call.read()  # established
        big = "v" * 1000
        for i in range(400):
            await c.register(f"tcp!s!{i}", {f"a{j}": big for j in range(8)}, persist=True)
        # Other clients are unaffected, and the stalled stream ends with a
        # status naming where to resume.
        assert len((await c.find())[0]) == 400
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                await asyncio.wait_for(call.read(), 10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "resume from revision" in info.value.details()


async def test_progress_notices_on_timer_and_request(client: Client) -> None:
    watch = client.watch({"svc": "quiet"}, progress_interval_ms=200)
    it = aiter(watch)
    await anext(it)
    loud = await client.register("tcp!loud!1", {"svc": "loud"}, persist=True)
    # Notices keep coming on the timer and catch up with the write, which the
    # filter hides from this watcher.
    got = await collect(it, lambda ms: ms[-1].revision >= loud.mod_revision)
    assert {m.kind for m in got} == {"progress"}
    await watch.close()
    watch = client.watch({"svc": "quiet"}, progress_interval_ms=3_600_000)
    it = aiter(watch)
    await anext(it)
    watch.request_progress()
    m = await asyncio.wait_for(anext(it), 10)
    assert m.kind == "progress"
    await watch.close()


async def test_watch_with_its_request_side_closed_keeps_streaming(
    registry: Registry, client: Client
) -> None:
    async with grpc.aio.insecure_channel(registry.address) as ch:
        call = pb_grpc.RegistryStub(ch).Watch()
        await call.write(
            pb.WatchRequest(create_request=pb.WatchCreateRequest(attrs={"svc": "half"}))
        )
        await call.done_writing()
        await call.read()  # the starting progress notice
        await client.register("tcp!half!1", {"svc": "half"}, persist=True)
        message = await asyncio.wait_for(call.read(), 10)
        assert [e.service.name for e in message.events] == ["tcp!half!1"]
        call.cancel()


async def test_sigterm_ends_streams_unavailable_and_exits_zero(registry: Registry) -> None:
    async with grpc.aio.insecure_channel(registry.address) as ch:
        stub = pb_grpc.RegistryStub(ch)

        async def reqs():
            yield pb.WatchRequest(create_request=pb.WatchCreateRequest())
            await asyncio.sleep(3600)

        call = stub.Watch(reqs())
        await call.read()
        registry.signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                await asyncio.wait_for(call.read(), 10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert registry.proc.wait(15) == 0


async def test_static_entries_from_ndb_file(start_registry, tmp_path) -> None:
    static = tmp_path / "static"
    static.write_text(
        "service=tcp!fs!564 svc=styx auth=infpk1\n"
        "service=tcp!cpu!6666\n\tsvc=rstyx 'note'='a b'\n"
        "name=notaservice kfs\n"
    )
    registry = start_registry(extra=["-f", str(static)])
    async with registry.client() as c:
        found, _ = await c.find()
        assert {s.name: dict(s.attrs) for s in found} == {
            "tcp!cpu!6666": {"svc": "rstyx", "note": "a b"},
            "tcp!fs!564": {"svc": "styx", "auth": "infpk1"},
        }
        assert all(s.persistent for s in found)
    registry.stop()
    static.write_text("service=tcp!fs!564\n\t'bad attr'=1\n")
    r = subprocess.run(
        [
            registry.argv[0],
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "other"),
            "-f",
            str(static),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"-f {static}:1: attrs: bad attribute name" in r.stderr


async def test_health_and_reflection(registry: Registry) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(registry.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        r = await health.Check(health_pb2.HealthCheckRequest(service="geryon.v1.Registry"))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")
            yield reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="geryon.v1.Registry"
            )

        answers = [a async for a in refl.ServerReflectionInfo(ask())]
        listed = {s.name for s in answers[0].list_services_response.service}
        assert "geryon.v1.Registry" in listed
        from google.protobuf import descriptor_pb2

        fd = descriptor_pb2.FileDescriptorProto.FromString(
            answers[1].file_descriptor_response.file_descriptor_proto[0]
        )
        assert [s.name for s in fd.service] == ["Registry"]
        assert "Watch" in [m.name for m in fd.service[0].method]


def test_refuses_plaintext_on_non_loopback(tmp_path) -> None:
    r = subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "geryon-registryd"),
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0
    assert "refusing plain text" in r.stderr and "Traceback" not in r.stderr


# The embedded store's own lease keeper; with etcd, etcd keeps the TTLs and a
# stalled front's clients move to another front.
@pytest.mark.parametrize("backend", ["sqlite"])
async def test_stalled_registry_extends_leases_instead_of_expiring(registry: Registry) -> None:
    async with registry.client() as c:
        lease = c.lease(2_000)
        await lease.start()
        await c.register("tcp!stall!1", {"svc": "x"}, lease=lease.id)
        # Freeze the registry well past the TTL: its clients could not renew,
        # and that was its fault, not theirs.
        registry.signal(signal.SIGSTOP)
        await asyncio.sleep(4.0)
        registry.signal(signal.SIGCONT)
        await asyncio.sleep(2.0)  # a whole TTL: keepalives have resumed
        assert [s.name for s in (await c.find())[0]] == ["tcp!stall!1"]
        assert not lease.lost.is_set()
        await lease.close(revoke=True)
    assert "stalled" in registry.log()


async def test_metrics_endpoint(start_registry) -> None:
    import urllib.request

    from conftest import free_port

    port = free_port()
    registry = start_registry(extra=["--metrics", f"127.0.0.1:{port}"])
    async with registry.client() as c:
        await c.register("tcp!m!1", {"svc": "x"}, persist=True)
        with pytest.raises(errors.NotFound):
            await c.get("nope")
        watch = c.watch(start_revision=1)
        await anext(aiter(watch))
        await watch.close()

    def scrape() -> str:
        return (
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        )

    # An RPC is counted as its handler ends, which may be just after the
    # client has its answer.
    def counted() -> str:
        body = scrape()
        return body if 'method="Get"' in body else ""

    body = await eventually(counted)
    assert "geryon_services 1.0" in body
    assert 'geryon_rpcs_total{code="OK",method="Register"} 1.0' in body
    assert 'geryon_rpcs_total{code="NOT_FOUND",method="Get"} 1.0' in body
    assert "geryon_commit_seconds_count" in body
    body = await eventually(lambda: "CANCELLED" in (b := scrape()) and b)
    assert 'geryon_rpcs_total{code="CANCELLED",method="Watch"} 1.0' in body


@pytest.mark.parametrize("backend", ["sqlite"])  # a data dir is the embedded store's
async def test_one_registry_per_port_and_data_dir(registry: Registry, tmp_path) -> None:
    argv = [registry.argv[0], "--listen"]
    same_dir = subprocess.run(
        [*argv, "127.0.0.1:0", "--data-dir", str(registry.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert same_dir.returncode == 1
    assert (
        same_dir.stderr == f"geryon-registryd: {registry.data_dir} is in use by another registry\n"
    )
    same_port = subprocess.run(
        [*argv, registry.address, "--data-dir", str(tmp_path / "other")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert same_port.returncode == 1 and "cannot listen" in same_port.stderr
    assert same_port.stderr.count("\n") == 1


async def test_static_file_is_checked_whole_and_followed(start_registry, tmp_path) -> None:
    static = tmp_path / "static"
    static.write_text("service=tcp!a!1 svc=x\nservice=tcp!b!1 svc=y\n")
    registry = start_registry(extra=["-f", str(static)])
    registry.stop()
    # A bad line refuses the whole file: nothing of it is written.
    static.write_text("service=tcp!c!1 svc=z\nservice=new\n")
    r = subprocess.run(registry.argv, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and ":2: service:" in r.stderr
    # An entry the file no longer names goes.
    static.write_text("service=tcp!a!1 svc=x2\n")
    registry.start()
    async with registry.client() as c:
        found, _ = await c.find()
    assert {s.name: s.attrs for s in found} == {"tcp!a!1": {"svc": "x2"}}


async def test_plain_text_limits_count_per_connection(start_registry, backend) -> None:
    """Over plain text every local process is "admin": one holding all the
    watches it may must not leave `geryon watch` in another none."""
    registry = start_registry(extra=["--max-watches", "2"])
    async with registry.client() as greedy:
        held = [greedy.watch() for _ in range(2)]
        streams = [await started(w) for w in held]  # held open while referenced
        with pytest.raises(errors.ResourceExhausted, match=r"admin on \S+ already has 2 watches"):
            await started(greedy.watch())
        proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "geryon"), "--registry",
             registry.address, "watch", "--snapshot"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout.readline().startswith("SYNCED ")
            await greedy.register("seen", {"a": "1"}, persist=True)
            assert proc.stdout.readline().split()[0] == "PUT"
        finally:
            proc.kill()
            proc.wait()
        for w in held:
            await w.close()
        del streams
