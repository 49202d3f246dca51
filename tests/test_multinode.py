"""Several nodes on one machine (issue 25), on the CPU with gloo: two torchrun agents (`--nnodes 2
--nproc-per-node 1`, node ranks 0 and 1, c10d rendezvous on 127.0.0.1) run a real `viewpipe pretrain` with
ContrastiveCrop and CsMl. Each agent is a node: its own sample-state segment, written by its own leader. Every
rank's loader sees the same boxes and neighbours as in a one-node two-rank run, step for step; the per-node
attach follows the node whatever the rank layout; killing one node mid-epoch stops the other within the stated
time with one line naming the lost rank, `--resume auto` on both continues to the uninterrupted losses, and no
segment is left behind. Each run has a shared-memory folder of its own (VIEWPIPE_SHM_DIR)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from viewpipe.dist import node_leaders

from conftest import step_losses, tiny_run_args

TIMEOUT_S = 20  # dist_timeout_s of these runs: the stated bound on how long a survivor waits for a lost rank
EPOCHS, STEPS = 3, 18  # 96 images, batches of 16 (8 per rank): 6 steps an epoch

# `viewpipe pretrain` (the command's own `main`) with every training step's view of the data recorded: the
# batch's indices, windows and companions, and the rank's sample state (its segment, boxes and neighbours)
RECORDER = """
import hashlib, json, os, sys
import numpy as np, torch
torch.set_num_threads(1)
from viewpipe.tools.cli import main
from viewpipe.trainers.engine import Trainer

def digest(*xs):
    h = hashlib.sha1()
    for x in xs:
        h.update(b"-" if x is None else np.ascontiguousarray(np.asarray(x)).tobytes())
    return h.hexdigest()[:16]

seen, step = [], Trainer.train_step

def train_step(self, batch, lr, progress):
    s = self.state
    seen.append({"step": self.step + 1, "segment": s.name, "writer": self.writer, "owner": s.is_owner,
                 "batch": digest(batch.indices, batch.windows, batch.neighbours), "boxes": digest(s.boxes()),
                 "neighbours": digest(s.neighbours())})
    return step(self, batch, lr, progress)

Trainer.train_step = train_step
rc = main(["pretrain", *sys.argv[1:]])
with open(os.path.join(os.environ["RECORDS"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump(seen, f)
sys.stdout.flush()
os._exit(rc)  # (gloo's threads at interpreter exit can abort a finished process)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    """CsMl (3 neighbours mined before every epoch) with ContrastiveCrop (boxes after every epoch), 3 epochs,
    a checkpoint every 2 steps, collectives timing out after TIMEOUT_S."""
    return tiny_run_args(data, out, "method=csml", "method_args={queue: 64, k: 3, interval: 1}", "ccrop.enabled=true",
                         "ccrop.warmup=0", "ccrop.interval=1", f"epochs={EPOCHS}", "save_every=2", "logger=none",
                         f"dist_timeout_s={TIMEOUT_S}", *extra)


@pytest.fixture
def shm(tmp_path: Path):  # noqa: ANN201
    """A shared-memory folder of the test's own, in /dev/shm: every segment the runs leave is seen here."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = base / f"viewpipe-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Node:
    """One torchrun agent (`python -m torch.distributed.run`) in a session of its own, its output in files."""

    def __init__(self, folder: Path, nodes: int, nproc: int, node_rank: int, port: int, command: list[str],
                 env: dict) -> None:
        self.out, self.err = folder / f"node{node_rank}.out", folder / f"node{node_rank}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
                 str(nproc), "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                 f"127.0.0.1:{port}", "--max-restarts", "0", *command],
                stdout=out, stderr=err, text=True, env=env, start_new_session=True)

    def workers(self) -> list[int]:
        """The agent's worker processes (each in a session of its own: torchrun starts them so)."""
        found = []
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*"):
            try:
                found += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return found

    def kill(self) -> list[int]:
        """The whole node at once, as a machine going down: the agent and its workers, SIGKILL."""
        workers = self.workers()
        os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in workers:
            with_pid_gone(lambda: os.killpg(pid, signal.SIGKILL))
        return workers

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            raise

    def stderr(self) -> str:
        return self.err.read_text()


def with_pid_gone(call) -> None:  # noqa: ANN001
    try:
        call()
    except ProcessLookupError:
        pass


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the first agent hosts the rendezvous store on `port` (so that node 0's agent holds it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"no rendezvous store on port {port} (agent exit {proc.poll()})")


def start(folder: Path, nodes: int, nproc: int, command: list[str], env: dict) -> list[Node]:
    port = free_port()
    first = Node(folder, nodes, nproc, 0, port, command, env)
    if nodes == 1:
        return [first]
    wait_listening(port, first.proc)
    return [first, *(Node(folder, nodes, nproc, n, port, command, env) for n in range(1, nodes))]


def finish(agents: list[Node], timeout: float = 240) -> None:
    for n, a in enumerate(agents):
        rc = a.wait(timeout)
        assert rc == 0, f"node {n}: exit {rc}\n" + a.stderr()[-3000:]


def environment(shm: Path, records: Path | None = None) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "VIEWPIPE_SHM_DIR": str(shm), "PYTHONUNBUFFERED": "1"}
    return env | ({"RECORDS": str(records)} if records else {})


def recorded(folder: Path, nodes: int, nproc: int, args: list[str], shm: Path) -> list[list[dict]]:
    """A run under the recorder; each rank's steps (see RECORDER)."""
    records = folder / "records"
    records.mkdir(parents=True)
    script = folder / "recorder.py"
    script.write_text(textwrap.dedent(RECORDER))
    finish(start(folder, nodes, nproc, [str(script), *args], environment(shm, records)))
    return [json.loads((records / f"rank{r}.json").read_text()) for r in range(nodes * nproc)]


@pytest.fixture(scope="module")
def one_node(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict]]]:
    """The reference: one node, two ranks (torchrun --nnodes 1 --nproc-per-node 2), recorded."""
    folder = tmp_path_factory.mktemp("one_node")
    shm = Path("/dev/shm") / f"viewpipe-test-{uuid.uuid4().hex[:8]}"
    shm.mkdir()
    try:
        ranks = recorded(folder, 1, 2, run_args(image_folder, folder / "run"), shm)
        assert not list(shm.iterdir())
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    return folder / "run", ranks


# ------------------------------------------------------------------------------------------------ the node layout
def test_node_leaders_follow_the_node_whatever_the_rank_layout() -> None:
    assert node_leaders(["a", "a", "b", "b"]) == [0, 0, 2, 2]  # torchrun's: contiguous
    assert node_leaders(["a", "b", "a", "b"]) == [0, 1, 0, 1]  # round robin (a scheduler's own launch)
    assert node_leaders(["b", "a", "a", "b", "c"]) == [0, 1, 1, 0, 4]
    assert node_leaders(["a"]) == [0]


LAYOUT = """
import json, os, sys, torch
torch.set_num_threads(1)
from viewpipe import dist
from viewpipe.trainers.config import load_config
from viewpipe.trainers.engine import Trainer
t = Trainer(load_config(None, sys.argv[1:]))
print(json.dumps({"segment": t.state.name, "owner": t.state.is_owner, "writer": t.data.writer}), flush=True)
t.close()
dist.teardown()
os._exit(0)
"""


def test_state_attach_follows_the_node_not_the_rank_order(image_folder: Path, tmp_path: Path, shm: Path) -> None:
    """Three ranks on two nodes laid out round robin (node 0: ranks 0 and 2, node 1: rank 1; GROUP_RANK as
    torchrun sets it): rank 2 attaches its own node's segment (made by rank 0), not rank 1's, which the old
    `names[rank - local_rank]` took; each node's lowest rank creates and writes its node's."""
    port = free_port()
    layout = {0: (0, 0), 1: (1, 0), 2: (0, 1)}  # rank: (node, local rank)
    args = run_args(image_folder, tmp_path / "run", "data.batch_size=12")
    procs = {}
    for rank, (node, local) in layout.items():
        env = environment(shm) | {"WORLD_SIZE": "3", "RANK": str(rank), "LOCAL_RANK": str(local),
                                  "GROUP_RANK": str(node), "LOCAL_WORLD_SIZE": "2" if node == 0 else "1",
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs[rank] = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LAYOUT), *args], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = {rank: p.communicate(timeout=180) for rank, p in procs.items()}
    for rank, p in procs.items():
        assert p.returncode == 0, f"rank {rank}: {outs[rank][1][-3000:]}"
    seen = {rank: json.loads(out.strip().splitlines()[-1]) for rank, (out, _) in outs.items()}
    assert seen[0]["segment"] == seen[2]["segment"] != seen[1]["segment"]
    assert [seen[r]["owner"] for r in range(3)] == [seen[r]["writer"] for r in range(3)] == [True, True, False]
    assert not list(shm.iterdir())


# ------------------------------------------------------------------------------------------------ two nodes
def test_two_nodes_equal_one_node_step_for_step(image_folder: Path, tmp_path: Path, shm: Path,
                                                one_node: tuple[Path, list[list[dict]]]) -> None:
    """2 nodes × 1 rank against 1 node × 2 ranks, same seed: each node has a segment of its own, written by its
    own rank; at every step both ranks' states hold the same boxes and neighbours (which change: updates), and
    each rank's batches (indices, crop windows, companions) and the losses equal the one-node run's."""
    reference_out, reference = one_node
    ranks = recorded(tmp_path, 2, 1, run_args(image_folder, tmp_path / "run"), shm)
    assert [len(r) for r in ranks] == [len(r) for r in reference] == [STEPS, STEPS]
    assert len({r[0]["segment"] for r in ranks}) == 2 and all(s["writer"] and s["owner"] for r in ranks for s in r)
    assert reference[0][0]["segment"] == reference[1][0]["segment"]  # (one node: one segment)
    assert [s["writer"] for s in (reference[0][0], reference[1][0])] == [True, False]
    for a, b in zip(*ranks):
        assert (a["step"], a["boxes"], a["neighbours"]) == (b["step"], b["boxes"], b["neighbours"])
    assert len({s["boxes"] for s in ranks[0]}) >= 2 and len({s["neighbours"] for s in ranks[0]}) >= 2
    keys = ("step", "batch", "boxes", "neighbours")
    for rank in (0, 1):
        assert [[s[k] for k in keys] for s in ranks[rank]] == [[s[k] for k in keys] for s in reference[rank]]
    assert step_losses(tmp_path / "run") == step_losses(reference_out)
    assert len(step_losses(reference_out)) == STEPS
    assert not list(shm.iterdir())


def wait_for_step(log: Path, step: int, agents: list[Node], timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.is_file() and any(json.loads(line).get("step", 0) >= step for line in log.read_text().splitlines()
                                 if line.endswith("}")):
            return
        assert all(a.proc.poll() is None for a in agents), [a.stderr()[-2000:] for a in agents]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not logged in {timeout} s")


def test_a_killed_node_stops_the_other_and_both_resume(image_folder: Path, tmp_path: Path, shm: Path,
                                                       one_node: tuple[Path, list[list[dict]]]) -> None:
    """Node 1 (agent and worker, SIGKILL) killed mid-epoch 1: node 0 exits non-zero within TIMEOUT_S plus
    torchrun's teardown (measured: about 5 s; gloo sees the closed connection at once, a silent peer takes
    dist_timeout_s), with one line naming rank 1, its own segment removed (the killed worker's alone is left,
    stale). `--resume auto` on both nodes ends with the one-node run's losses at every step, and no segment."""
    out = tmp_path / "run"
    env, command = environment(shm), ["-m", "viewpipe.tools", "pretrain", *run_args(image_folder, out)]
    (tmp_path / "killed").mkdir()
    agents = start(tmp_path / "killed", 2, 1, command, env)
    t_start = time.monotonic()
    wait_for_step(out / "log.jsonl", 8, agents)
    print(f"step 8 after {time.monotonic() - t_start:.1f} s")
    t0 = time.monotonic()
    killed = agents[1].kill()
    rc = agents[0].wait(TIMEOUT_S + 60)
    took = time.monotonic() - t0
    err = agents[0].stderr()
    assert rc != 0 and took < TIMEOUT_S + 30, (rc, took, err[-3000:])
    lines = [line for line in err.splitlines() if line.startswith("viewpipe: error: ")]
    print(f"node 0 exited {took:.1f} s after node 1 was killed: {lines}")
    assert len(lines) == 1 and "lost rank 1 (pid " in lines[0] and "--resume auto" in lines[0], err[-3000:]
    left = [p.name for p in shm.iterdir()]
    assert len(killed) == 1 and all(name.startswith(f"viewpipe.{killed[0]}-") for name in left), left
    stopped_at = max(step_losses(out))
    assert 8 <= stopped_at < STEPS
    (tmp_path / "resumed").mkdir()
    t_resume = time.monotonic()
    finish(start(tmp_path / "resumed", 2, 1, [*command, "--resume", "auto"], env))
    print(f"resumed from step {stopped_at} to {STEPS} in {time.monotonic() - t_resume:.1f} s")
    assert step_losses(out) == step_losses(one_node[0])
    assert not list(shm.iterdir())  # (the killed worker's stale segment reclaimed by the resumed run)


SILENT = """
import os, signal, sys, time
from viewpipe import dist
dist.setup("cpu", timeout_s=float(sys.argv[1]))
if dist.rank_world()[0] == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # alive, connected, never answering (a hung node)
t = time.monotonic()
try:
    dist.barrier()
except Exception as exc:
    print("FAILED", round(time.monotonic() - t, 1), dist.peer_failure(exc), "|", dist.lost_rank(exc, 0), flush=True)
    os._exit(3)
"""


def test_a_silent_peer_times_out_naming_it() -> None:
    """A peer that stops answering (SIGSTOP: its connections stay open) fails the collective after the
    timeout `setup` was given, not torch's 30 minutes; the failure is a peer's, naming rank 1."""
    port = free_port()
    base = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                         "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(SILENT), "3"], env=base | {"RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 3, err[-2000:]
    _, took, is_peer, *_ = out.split()
    assert 2.5 <= float(took) < 15 and is_peer == "True", out
    assert out.split("|", 1)[1].strip().startswith(f"lost rank 1 (pid {procs[1].pid} on "), out
