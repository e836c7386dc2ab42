"""Tests for tpllama.shm (shared-memory collectives between processes of one host)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback

import pytest
import torch

from tpllama.parallel import shm
from tpllama.parallel.shm import ShmCollectives

pytestmark = [
    pytest.mark.skipif(not shm.available(), reason="shared-memory collectives extension not available"),
    pytest.mark.timeout(120),
]

SLOT = 1 << 16  # small slots, so that chunking is exercised with small tensors
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- helpers (run in children)

def _input(it: int, rank: int, n: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * it + rank)
    return (torch.randn(n, generator=g) * (1 + rank)).to(dtype)


def _ref_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    """Sum in rank order with float32 accumulation, one rounding at the end."""
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    return acc.to(xs[0].dtype)


def _check_collectives(s: ShmCollectives, rank: int, world: int, iters: int) -> int:
    """All ranks run the same random sequence of ops (sizes up to > 3 slots) and check each result
    bit for bit against the rank-order sum computed locally from every rank's (reproducible) input."""
    plan = torch.Generator().manual_seed(world)
    sizes = [1, 3, 576, 1000, SLOT // 4, SLOT // 4 + 5, SLOT // 2 + 1, 3 * SLOT // 4 + 17]
    checked = 0
    for it in range(iters):
        op = int(torch.randint(0, 10, (1,), generator=plan))
        n = sizes[int(torch.randint(0, len(sizes), (1,), generator=plan))]
        dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=plan))]
        if op < 6:  # all_reduce, various shapes
            x = _input(it, rank, n, dtype)
            shape = (1, 1, n) if n % 2 else (2, n // 2)
            y = s.all_reduce(x.clone().view(shape))
            ref = _ref_sum([_input(it, r, n, dtype) for r in range(world)]).view(shape)
            assert y.shape == shape and y.dtype == dtype
            assert torch.equal(y, ref), f"all_reduce mismatch it={it} n={n} {dtype}"
        elif op < 8:  # all_gather
            x = _input(it, rank, n, dtype)
            y = s.all_gather(x)
            ref = torch.stack([_input(it, r, n, dtype) for r in range(world)])
            assert torch.equal(y, ref), f"all_gather mismatch it={it} n={n}"
        else:  # broadcast int64 from rank 0 / floats from the last rank; sources run ahead
            for k in range(3):
                src = 0 if k < 2 else world - 1
                want = torch.arange(n, dtype=torch.int64) * (it + 1) + k if src == 0 else _input(it, src, n, dtype)
                x = want.clone() if rank == src else torch.zeros_like(want)
                s.broadcast(x, src=src)
                assert torch.equal(x, want), f"broadcast mismatch it={it} n={n} src={src}"
        checked += 1
    # a run of small header broadcasts (what idle workers wait on), then an all_reduce
    for it in range(50):
        h = torch.tensor([it, 1, 2, 3, 4, 5], dtype=torch.int64) if rank == 0 else torch.empty(6, dtype=torch.int64)
        s.broadcast(h, timeout_s=None)
        assert h.tolist() == [it, 1, 2, 3, 4, 5]
    x = torch.full((1, 1, 576), float(rank + 1))
    assert torch.equal(s.all_reduce(x), torch.full((1, 1, 576), float(world * (world + 1) // 2)))
    return checked


def _scenario_world2(rank: int, world: int, names: dict, iters: int) -> dict:
    out = {}
    # correctness + close
    s = ShmCollectives(names["main"], rank, world, slot_bytes=SLOT, timeout_s=30)
    out["checked"] = _check_collectives(s, rank, world, iters)
    s.barrier()
    s.close()
    s.close()  # double close is fine

    # poison(): rank 1 waits (idle broadcast, no timeout), rank 0 poisons it after 0.3 s
    s = ShmCollectives(names["poison"], rank, world, slot_bytes=SLOT, timeout_s=30)
    s.barrier()
    if rank == 0:
        time.sleep(0.3)
        out["t_poison"] = time.monotonic()
        s.poison()
        assert s.poisoned
    else:
        try:
            s.broadcast(torch.empty(6, dtype=torch.int64), timeout_s=None)
            out["err"] = "no error"
        except RuntimeError as e:
            out["t_raise"] = time.monotonic()
            out["err"] = str(e)
    with pytest.raises(RuntimeError, match="poisoned"):
        s.all_reduce(torch.ones(4))  # poisoned for good, on every rank
    s.close()

    # poison by name (as a launcher would) while rank 1 waits in an all_reduce with a long timeout
    s = ShmCollectives(names["byname"], rank, world, slot_bytes=SLOT, timeout_s=30)
    s.barrier()
    if rank == 0:
        time.sleep(0.3)
        out["t_poison2"] = time.monotonic()
        assert ShmCollectives.poison_by_name(names["byname"])
    else:
        try:
            s.all_reduce(torch.ones(576))
            out["err2"] = "no error"
        except RuntimeError as e:
            out["t_raise2"] = time.monotonic()
            out["err2"] = str(e)
    s.close()

    # mismatched ops are detected, not silently mixed
    s = ShmCollectives(names["mismatch"], rank, world, slot_bytes=SLOT, timeout_s=10)
    try:
        s.all_reduce(torch.ones(10 + rank))
        out["err3"] = "no error"
    except RuntimeError as e:
        out["err3"] = str(e)
    s.close()
    return out


def _scenario_world3(rank: int, world: int, names: dict, iters: int) -> dict:
    out = {}
    s = ShmCollectives(names["main"], rank, world, slot_bytes=SLOT, timeout_s=30)
    out["checked"] = _check_collectives(s, rank, world, iters)
    s.barrier()
    s.close()

    # rank 2 never arrives (but is alive): ranks 0 and 1 raise after the 2 s timeout
    s = ShmCollectives(names["absent"], rank, world, slot_bytes=SLOT, timeout_s=2.0)
    s.barrier()
    if rank < 2:
        t0 = time.monotonic()
        try:
            s.all_reduce(torch.ones(1, 1, 576))
            out["err"] = "no error"
        except RuntimeError as e:
            out["err"] = str(e)
        out["elapsed"] = time.monotonic() - t0
    else:
        time.sleep(4.0)
        try:  # the segment was poisoned by the timeout: a late rank fails at once
            t0 = time.monotonic()
            s.all_reduce(torch.ones(1, 1, 576))
            out["err"] = "no error"
        except RuntimeError as e:
            out["err"] = str(e)
        out["elapsed"] = time.monotonic() - t0
    s.close()

    # rank 2's process exits: the others notice without waiting for their (long) timeout
    s = ShmCollectives(names["died"], rank, world, slot_bytes=SLOT, timeout_s=30)
    s.barrier()
    if rank < 2:
        t0 = time.monotonic()
        try:
            s.all_reduce(torch.ones(576))
            out["err2"] = "no error"
        except RuntimeError as e:
            out["err2"] = str(e)
        out["elapsed2"] = time.monotonic() - t0
        s.close()
    else:
        out["died"] = True  # returns and exits without closing
    return out


def _child(fn, rank, world, args, q):
    torch.set_num_threads(1)
    try:
        q.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        q.put((rank, "error", traceback.format_exc()))


def _spawn(fn, world: int, *args, timeout: float = 90.0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world, args, q), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            for p in procs:
                p.join(0)  # reap exited children (a zombie still "exists" for kill(pid, 0))
            try:
                rank, status, value = q.get(timeout=0.2)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise AssertionError(f"ranks timed out; results so far: {results} {errors}")
                continue
            (results.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    assert not errors, "\n".join(errors)
    return results


def _names(*keys) -> dict:
    base = ShmCollectives.make_name()
    return {k: f"{base}-{k}" for k in keys}


def _exists(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


# --------------------------------------------------------------------------- tests

def test_two_ranks():
    names = _names("main", "poison", "byname", "mismatch")
    res = _spawn(_scenario_world2, 2, names, 300)
    assert res[0]["checked"] == res[1]["checked"] == 300
    # poison(): the waiter raised at once, not after a timeout
    assert "poisoned by rank 0" in res[1]["err"], res[1]["err"]
    assert 0 <= res[1]["t_raise"] - res[0]["t_poison"] < 0.5
    assert "poisoned by another process" in res[1]["err2"], res[1]["err2"]
    assert 0 <= res[1]["t_raise2"] - res[0]["t_poison2"] < 0.5
    for r in (0, 1):
        assert "mismatch" in res[r]["err3"] or "poisoned" in res[r]["err3"], res[r]["err3"]
    # close() unlinked every segment
    assert not any(_exists(n) for n in names.values())


def test_three_ranks_timeout_and_death():
    names = _names("main", "absent", "died")
    res = _spawn(_scenario_world3, 3, names, 200)
    assert res[0]["checked"] == res[1]["checked"] == res[2]["checked"] == 200
    for r in (0, 1):
        err = res[r]["err"]
        assert ("timed out after 2 s waiting for rank 2" in err
                or "timed out waiting for rank 2" in err), err  # raised itself / poisoned by the other
        assert 1.9 <= res[r]["elapsed"] < 5.0, res[r]["elapsed"]
        assert "rank 2" in res[r]["err2"] and "exited" in res[r]["err2"], res[r]["err2"]
        assert res[r]["elapsed2"] < 10.0
    assert "poisoned" in res[2]["err"] and res[2]["elapsed"] < 0.5, res[2]
    # rank 2 died without close(); rank 0 (the creator) still unlinked every segment
    assert not any(_exists(n) for n in names.values())


def _crash_after_create(name):
    s = ShmCollectives(name, 0, 2, slot_bytes=SLOT)
    assert not s.closed
    os._exit(1)  # no close(): the segment's file stays behind


def test_unlink_early_and_stale_cleanup():
    # unlink right after everybody opened: the file is gone, the mappings keep working
    name = ShmCollectives.make_name()
    a = ShmCollectives(name, 0, 2, slot_bytes=SLOT)
    b = ShmCollectives(name, 1, 2, slot_bytes=SLOT)
    assert _exists(a.name)
    a.unlink()
    assert not _exists(a.name)
    x = torch.arange(8, dtype=torch.int64)
    a.broadcast(x)
    y = b.broadcast(torch.zeros(8, dtype=torch.int64))
    assert torch.equal(y, x)
    a.close(), b.close(), a.close()

    # a crashed creator leaves its segment; the next creator sweeps it
    ctx = mp.get_context("spawn")
    stale = ShmCollectives.make_name()
    p = ctx.Process(target=_crash_after_create, args=(stale,))
    p.start()
    p.join(60)
    assert p.exitcode == 1 and _exists(stale)
    assert stale in shm.cleanup_stale()
    assert not _exists(stale)


def test_single_process_api():
    name = ShmCollectives.make_name()
    with ShmCollectives(name, 0, 1, slot_bytes=SLOT) as s:  # world 1: identity
        x = torch.randn(3, 5)
        assert s.all_reduce(x.clone()).equal(x)
        assert s.all_gather(x).equal(x[None])
        assert s.broadcast(x.clone(), timeout_s=None).equal(x)
        with pytest.raises(ValueError, match="contiguous"):
            s.all_reduce(torch.randn(4, 4).t())
    assert not _exists(name) and s.closed
    with pytest.raises(RuntimeError, match="closed"):
        s.all_reduce(torch.ones(2))
    s.poison()  # a no-op once closed

    # opening a segment nobody creates fails after the timeout
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 0 must create it"):
        ShmCollectives(ShmCollectives.make_name(), 1, 2, slot_bytes=SLOT, timeout_s=0.3)
    assert time.monotonic() - t0 < 5

    # geometry mismatch is reported
    name = ShmCollectives.make_name()
    with ShmCollectives(name, 0, 2, slot_bytes=SLOT):
        with pytest.raises(RuntimeError, match="world_size"):
            ShmCollectives(name, 1, 3, slot_bytes=SLOT, timeout_s=0.5)
        with pytest.raises(RuntimeError, match="slot_bytes"):
            ShmCollectives(name, 1, 2, slot_bytes=2 * SLOT, timeout_s=0.5)
    assert not ShmCollectives.poison_by_name(name)  # gone


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("TPLLAMA_NO_SHM", "1")
    assert not shm.available()
    monkeypatch.delenv("TPLLAMA_NO_SHM")
    assert shm.available()
