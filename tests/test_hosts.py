"""Across hosts: 2 and 3 hosts made of network namespaces on this machine (link-local addresses,
one bridge, each host pinned to a core of its own), torchrun on every host exactly as the README
says, no hand-set environment variables. Skipped, saying why, only where namespaces cannot be made.

The host name resolves to 127.0.0.1 inside the namespaces, as on many Debian/Ubuntu hosts: the
ranks must find the interface that routes to MASTER_ADDR themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_fresh_cache  # noqa: E402

from tpllama.bench import hosts as hostsmod  # noqa: E402
from tpllama.weights.parts import cut  # noqa: E402

OK, WHY = hostsmod.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"network namespaces cannot be made here: {WHY}")

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
GENERATE = str(Path(__file__).parent / "hosts" / "generate_ids.py")
PORT = 29611
CORES = [str(i % (os.cpu_count() or 1)) for i in range(3)]


def torchrun(hosts, h, nproc: int, script: list[str], timeout_s: float = 30, env=None) -> list[str]:
    """The torchrun command line for host ``h`` (the README's, plus a rendezvous timeout)."""
    return [TORCHRUN, "--nnodes", str(len(hosts.hosts)), "--node_rank", str(h.index), "--master_addr",
            hosts[0].address, "--master_port", str(PORT), "--nproc_per_node", str(nproc),
            "--rdzv_conf", f"timeout={int(timeout_s)}", *script]


def start(hosts, nproc: int, script: list[str], caches: list[Path], timeout_s: float = 30, only=None):
    procs = []
    for h in hosts:
        if only is not None and h.index not in only:
            continue
        env = dict(os.environ, TPLLAMA_CACHE=str(caches[h.index]))
        procs.append(h.popen(torchrun(hosts, h, nproc, script, timeout_s), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs, timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def reference_ids(model, new: int = 12) -> list[list[int]]:
    import tpllama

    prompts = [[5, 6, 7, 8, 9], [11, 3, 42, 17, 99, 23, 5, 61]]
    with tpllama.load(model) as engine:
        return [engine.generate(torch.tensor([p]), max_new_tokens=new, ignore_eos=True)[0].tolist() for p in prompts]


@pytest.fixture
def caches(tmp_path):
    from tpllama import kernels

    kernels.get(), kernels.collectives(), kernels.tcp_collectives()  # built once, here, not by every host at once
    return [make_fresh_cache(tmp_path / f"cache-host{i}") for i in range(3)]


def run_ids(n_hosts: int, nproc: int, model, tmp_path, caches, timeout_s: float = 60) -> dict:
    out = tmp_path / "ids.json"
    with hostsmod.Hosts(n_hosts, cores=CORES[:n_hosts]) as hosts:
        results = finish(start(hosts, nproc, [GENERATE, str(model), str(out), str(timeout_s)], caches))
    for code, text in results:
        assert code == 0, text[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("n_hosts,nproc,backend", [(2, 1, "tcp"), (3, 1, "tcp"), (2, 2, "shared memory + tcp")])
def test_hosts_give_the_greedy_ids_of_one_rank(tiny_dirs, tmp_path, caches, n_hosts, nproc, backend):
    model = tiny_dirs["smol-like"] if n_hosts * nproc <= 3 else tiny_dirs["mha4-llama3"]  # 4 ranks: 4 KV heads
    world = n_hosts * nproc
    parts = cut(model, tmp_path / f"tp{world}", world, progress=False)
    got = run_ids(n_hosts, nproc, parts, tmp_path, caches)
    assert got["backend"] == backend
    assert got["ids"] == reference_ids(model)


def test_default_model_across_two_hosts(smol_gguf, tmp_path, caches):
    got = run_ids(2, 1, smol_gguf, tmp_path, caches)
    assert got["backend"] == "tcp"
    assert got["ids"] == reference_ids(smol_gguf)


def test_a_host_without_the_cut_gets_its_part_once(tiny_dirs, tmp_path, caches):
    """Host 1 does not see host 0's files (a mount namespace hides the cut): rank 0 ships part 1
    into host 1's cache, checked against the manifest; the next run reuses it."""
    hidden = tmp_path / "only-on-host0"
    parts = cut(tiny_dirs["smol-like"], hidden / "tp2", 2, progress=False)
    out = tmp_path / "ids.json"
    shipped = caches[1] / "parts" / "tp2"
    with hostsmod.Hosts(2, cores=CORES[:2]) as hosts:
        for attempt in range(2):
            procs = []
            for h in hosts:
                cmd = torchrun(hosts, h, 1, [GENERATE, str(parts), str(out), "60"])
                if h.index == 1:  # no shared filesystem: an empty directory over the cut
                    cmd = ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs none "{hidden}" && exec "$@"', "sh", *cmd]
                env = dict(os.environ, TPLLAMA_CACHE=str(caches[h.index]))
                procs.append(h.popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for code, text in finish(procs):
                assert code == 0, text[-3000:]
            if attempt == 0:
                assert sorted(p.name for p in (shipped / "part_model").iterdir()) == ["1"]
                first = (shipped / "part_model" / "1" / "model.safetensors").stat().st_mtime_ns
    assert (shipped / "part_model" / "1" / "model.safetensors").stat().st_mtime_ns == first  # reused, not sent again
    assert json.loads(out.read_text())["ids"] == reference_ids(tiny_dirs["smol-like"])


LONG = """
import os, sys, torch, tpllama
with tpllama.load(sys.argv[1], world_size=int(os.environ["WORLD_SIZE"]), timeout_s=float(sys.argv[2])) as engine:
    print("generating", flush=True)
    for _ in range(1000):
        engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=200, ignore_eos=True)
"""


def _is_rank(pid: int) -> bool:
    """A rank torchrun started (running long.py), not the torchrun agent itself."""
    line = " ".join(psutil.Process(pid).cmdline())
    return "long.py" in line and "torchrun" not in line


def _gone(pids: list[int]) -> bool:
    return not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)


@pytest.mark.parametrize("failure", ["rank killed", "link down"])
def test_a_failure_on_one_host_ends_every_rank(tiny_dirs, tmp_path, caches, failure):
    timeout_s = 8
    parts = cut(tiny_dirs["q32"], tmp_path / "tp2", 2, progress=False)
    script = tmp_path / "long.py"
    script.write_text(LONG)
    with hostsmod.Hosts(2, cores=CORES[:2]) as hosts:
        procs = start(hosts, 1, [str(script), str(parts), str(timeout_s)], caches, timeout_s=30)
        assert "generating" in _wait_for_line(procs[0], "generating", 120)
        time.sleep(1)
        ranks = [p for h in hosts for p in h.pids() if _is_rank(p)]
        assert len(ranks) == 2
        t0 = time.monotonic()
        if failure == "rank killed":
            victim = next(p for p in hosts[1].pids() if _is_rank(p))
            os.kill(victim, 9)
        else:
            hosts[1].set_link(False)
        results = finish(procs, timeout=3 * timeout_s + 30)
        took = time.monotonic() - t0
        everything = [p for h in hosts for p in h.pids()]
    assert all(code != 0 for code, _ in results), [c for c, _ in results]
    assert took < 2 * timeout_s + 20, took
    assert _gone(ranks) and _gone(everything)


def _wait_for_line(proc, text: str, timeout: float) -> str:
    seen = []
    deadline = time.monotonic() + timeout

    def read():
        for line in proc.stdout:
            seen.append(line)
            if text in line:
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(max(0.1, deadline - time.monotonic()))
    return "".join(seen)


def test_a_host_that_never_joins(tiny_dirs, tmp_path, caches):
    parts = cut(tiny_dirs["q32"], tmp_path / "tp2", 2, progress=False)
    with hostsmod.Hosts(2, cores=CORES[:2]) as hosts:
        t0 = time.monotonic()
        results = finish(start(hosts, 1, [GENERATE, str(parts), str(tmp_path / "x.json"), "10"], caches, timeout_s=10,
                               only=[0]), timeout=120)
        took = time.monotonic() - t0
        left = hosts[0].pids()
    (code, text), = results
    assert code != 0 and "1/2 clients joined" in text, text[-2000:]
    assert took < 60 and left == []


def test_our_sockets_listen_on_the_cluster_interface(tiny_dirs, tmp_path, caches):
    """The ranks' sockets (store, gloo, the TCP mesh) listen on the host's cluster address only;
    torchrun's own agent store is torchrun's."""
    parts = cut(tiny_dirs["q32"], tmp_path / "tp2", 2, progress=False)
    script = tmp_path / "long.py"
    script.write_text(LONG)
    with hostsmod.Hosts(2, cores=CORES[:2]) as hosts:
        procs = start(hosts, 1, [str(script), str(parts), "30"], caches)
        _wait_for_line(procs[0], "generating", 120)
        listening = []
        for h in hosts:
            for pid in h.pids():
                if _is_rank(pid):
                    out = subprocess.run(["ip", "netns", "exec", h.netns, "ss", "-Hltnp"], capture_output=True,
                                         text=True).stdout
                    listening += [(h.address, line.split()[3]) for line in out.splitlines() if f"pid={pid}," in line]
        for p in procs:
            p.kill()
    assert listening, "no listening socket of the ranks found"
    assert all(addr.rsplit(":", 1)[0] in (ip, "127.0.0.1") for ip, addr in listening), listening


CLIENT = """
import json, sys
from openai import OpenAI
client = OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=60)
name = client.models.list().data[0].id
r = client.completions.create(model=name, prompt="The quick brown fox", max_tokens=16, temperature=0)
c = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Name a planet."}],
                                   max_tokens=12, temperature=0)
print(json.dumps({"text": r.choices[0].text, "chat": c.choices[0].message.content}))
"""


def test_serve_with_ranks_on_two_hosts(tmp_path, caches):
    from helpers import make_tiny_hf

    import tpllama
    from tpllama.env import cache_dir
    from tpllama.weights.default_model import default_model_path
    from tpllama.weights.tokenizer import gguf_tokenizer_dir

    model = make_tiny_hf(tmp_path / "tiny-chat", "smol-like", seed=3, vocab_size=49152, max_position_embeddings=512)
    tdir = gguf_tokenizer_dir(default_model_path(), cache_dir())
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tdir / name).is_file():
            (model / name).write_bytes((tdir / name).read_bytes())
    with tpllama.load(model) as engine:
        tok = engine.tokenizer
        ids = tok.encode("The quick brown fox")
        want_text = tok.decode(engine.generate(torch.tensor([ids]), max_new_tokens=16)[0, len(ids):])
        chat = engine.encode_chat([{"role": "user", "content": "Name a planet."}])
        want_chat = tok.decode(engine.generate(torch.tensor([chat]), max_new_tokens=12)[0, len(chat):])
    parts = cut(model, tmp_path / "tp2", 2, progress=False)
    port = 8611
    with hostsmod.Hosts(2, cores=CORES[:2]) as hosts:
        procs = start(hosts, 1, ["-m", "tpllama", "serve", "--model", str(parts), "--port", str(port)], caches)
        assert "serving" in _wait_for_line(procs[0], "serving", 180)
        client = hosts[0].run([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{port}/v1"], timeout=120,
                              capture_output=True, text=True)
        rank0 = [p for p in hosts[0].pids() if "serve" in (line := " ".join(psutil.Process(p).cmdline()))
                 and "torchrun" not in line]
        os.kill(rank0[0], 2)  # SIGINT to the server (rank 0): it stops, every rank with it, torchrun exits 0
        results = finish(procs, timeout=60)
    assert client.returncode == 0, client.stderr[-2000:]
    got = json.loads(client.stdout)
    assert got == {"text": want_text, "chat": want_chat}
    assert [code for code, _ in results] == [0, 0], [t[-6000:] for _, t in results]
