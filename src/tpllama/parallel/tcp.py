"""Collectives over the network: a mesh of persistent TCP sockets, and shared memory inside each host.

``TcpCollectives`` connects every pair of its members once, at start, through the rendezvous
store (each member listens on its cluster address and publishes it there; the member with the
higher rank dials the lower one), then runs each collective in C++ from the calling thread
(``kernels/tcp_collectives.cpp``): one exchange per peer, no I/O thread, sockets with TCP_NODELAY
and kernel keep-alive, so a dead peer, or a host whose link went down, fails the next
collective (or the idle wait for it) within seconds.

``HostCollectives`` is the hierarchical path when hosts run several ranks each: the ranks of a host
sum (or gather) through shared memory, one rank per host (its leader) exchanges the host's
result with the other leaders over TCP, and hands the total back through shared memory. Every
rank ends with bit-identical results (host sums in local-rank order, then the host totals in
host order).
"""

from __future__ import annotations

import socket
import struct
import time

import torch

from .. import kernels

SPIN_US = 300.0  # an op polls its sockets without sleeping this long first (see tcp_collectives.cpp)
KEEPALIVE_IDLE_S = 5  # a silent connection is probed after this long ...
KEEPALIVE_INTERVAL_S = 2  # ... every this long ...
KEEPALIVE_PROBES = 3  # ... and given up after this many unanswered probes (about 11 s)


def available() -> bool:
    return kernels.tcp_collectives() is not None


def tune(sock: socket.socket) -> None:
    """TCP_NODELAY (a few KB per exchange must leave at once), and keep-alive probes plus a user
    timeout, so that the kernel notices a peer whose host or link is gone."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                       ("TCP_KEEPCNT", KEEPALIVE_PROBES),
                       ("TCP_USER_TIMEOUT", 1000 * (KEEPALIVE_IDLE_S + KEEPALIVE_INTERVAL_S * KEEPALIVE_PROBES))):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


class MeshError(RuntimeError):
    """A member of the mesh could not be reached, or never joined."""


def connect_mesh(store, key: str, rank: int, members: list[int], bind_ip: str, timeout_s: float,
                 describe=lambda r: f"rank {r}") -> list[int]:
    """Connected socket file descriptors to every other member (-1 at our own index), made
    through ``store`` under ``key``. ``members``: global ranks, ours among them. Raises MeshError
    naming the member, its address and port, and what to check."""
    me = members.index(rank)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((bind_ip, 0))
    listener.listen(len(members))
    port = listener.getsockname()[1]
    store.set(f"{key}/addr/{rank}", f"{bind_ip}:{port}")
    deadline = time.monotonic() + timeout_s
    socks: dict[int, socket.socket] = {}
    try:
        for peer in members[:me]:  # dial the lower ranks
            addr = _peer_address(store, key, peer, deadline, describe)
            host, _, p = addr.rpartition(":")
            socks[peer] = _dial(host, int(p), rank, deadline, describe(peer))
        listener.settimeout(0.2)
        expected = set(members[me + 1:])
        while expected:  # the higher ranks dial us
            if time.monotonic() > deadline:
                missing = ", ".join(describe(r) for r in sorted(expected))
                raise MeshError(f"{describe(rank)} listening on {bind_ip}:{port}: {missing} did not connect within "
                                f"{timeout_s:g} s; check that TCP port {port} on {bind_ip} is reachable from there "
                                f"(firewall, the interface chosen: --iface) and that every host runs the same command")
            try:
                conn, _ = listener.accept()
            except (socket.timeout, BlockingIOError):
                continue
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            (peer,) = struct.unpack("<i", _recv_exact(conn, 4))
            if peer not in expected:
                conn.close()
                continue
            expected.discard(peer)
            socks[peer] = conn
    except BaseException:
        for s in socks.values():
            s.close()
        raise
    finally:
        listener.close()
    fds = []
    for peer in members:
        if peer == rank:
            fds.append(-1)
            continue
        s = socks[peer]
        tune(s)
        s.setblocking(True)
        fds.append(s.detach())
    return fds


def _peer_address(store, key: str, peer: int, deadline: float, describe) -> str:
    import datetime

    left = deadline - time.monotonic()
    try:
        store.wait([f"{key}/addr/{peer}"], datetime.timedelta(seconds=max(0.1, left)))
    except Exception:
        raise MeshError(f"{describe(peer)} never joined within the timeout: is its host running the same command "
                        f"with the same --master_addr / --master_port?") from None
    return store.get(f"{key}/addr/{peer}").decode()


def _dial(host: str, port: int, rank: int, deadline: float, who: str) -> socket.socket:
    last = None
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(min(2.0, max(0.1, deadline - time.monotonic())))
        try:
            s.connect((host, port))
            s.sendall(struct.pack("<i", rank))
            return s
        except OSError as err:
            last = err
            s.close()
            time.sleep(0.1)
    raise MeshError(f"cannot reach {who} at {host}:{port} ({last}); check the firewall between the hosts (that TCP "
                    f"port must be open on the cluster network) and the interface each host chose (--iface)")


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise MeshError("a peer closed its connection during the handshake")
        buf += chunk
    return buf


class TcpCollectives:
    """The collectives of a mesh of ``len(fds)`` members over TCP (see the module docstring)."""

    def __init__(self, index: int, fds: list[int], timeout_s: float):
        ext = kernels.tcp_collectives()
        if ext is None:
            raise RuntimeError("tpllama TCP collectives are not available (no C++ compiler?)")
        self.index, self.size = index, len(fds)
        self.timeout_s = timeout_s
        self._mesh = ext.Mesh(index, fds, timeout_s, SPIN_US)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self._mesh.all_reduce(x, self.timeout_s)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self._mesh.all_gather(x.contiguous(), self.timeout_s)

    def broadcast(self, x: torch.Tensor, src: int = 0, timeout_s: float | None = ...) -> torch.Tensor:
        """``timeout_s``: ``...`` = the mesh's, ``None`` = no limit (an idle worker)."""
        t = self.timeout_s if timeout_s is ... else (-1.0 if timeout_s is None else timeout_s)
        return self._mesh.broadcast(x, src, t)

    def stats(self) -> dict:
        m = self._mesh
        return {"ops": m.ops, "seconds": m.seconds, "bytes_sent": m.bytes_sent, "bytes_received": m.bytes_received}

    def poison(self) -> None:
        self._mesh.poison()

    def close(self) -> None:
        self._mesh.close()


class HostCollectives:
    """Shared memory among the ranks of each host, TCP among the hosts' leaders (local rank 0)."""

    def __init__(self, local, leaders: TcpCollectives | None, local_rank: int, local_size: int, hosts: int):
        self.local = local  # ShmCollectives of this host's ranks
        self.leaders = leaders  # TcpCollectives of the leaders; None on the other ranks
        self.local_rank, self.local_size, self.hosts = local_rank, local_size, hosts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.local.all_reduce(x)
        if self.leaders is not None:
            self.leaders.all_reduce(x)
        return self.local.broadcast(x, src=0)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        here = self.local.all_gather(x)  # [local_size, *x.shape]
        everything = torch.empty((self.hosts, *here.shape), dtype=x.dtype)
        if self.leaders is not None:
            everything = self.leaders.all_gather(here)
        self.local.broadcast(everything, src=0)
        return everything.view(self.hosts * self.local_size, *x.shape)

    def broadcast(self, x: torch.Tensor, src: int = 0, timeout_s: float | None = ...) -> torch.Tensor:
        """From global rank ``src``, which must lead its host (rank 0 always does)."""
        host, local = divmod(src, self.local_size)
        if local != 0:
            raise ValueError(f"broadcast from rank {src}: only a host's first rank can be the source")
        if self.leaders is not None:
            self.leaders.broadcast(x, host, timeout_s)
        return self.local.broadcast(x, src=0, timeout_s=timeout_s if timeout_s is not ... else self.local.timeout_s)

    def stats(self) -> dict:
        return self.leaders.stats() if self.leaders is not None else {}

    def poison(self) -> None:
        self.local.poison()
        if self.leaders is not None:
            self.leaders.poison()

    def close(self) -> None:
        self.local.close()
        if self.leaders is not None:
            self.leaders.close()
