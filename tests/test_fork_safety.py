"""No DataLoader worker is forked from a rank, and a stuck worker is an error, not a hang.

A rank runs threads (gloo, wandb, the loader's queue feeders). Forking it while one of them
holds the interpreter's runtime lock leaves the child stuck inside ``os.fork()`` (it hung a
2-rank run once in ~500): workers must be spawned (or come from a forkserver).
"""

import os
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from cmr.config import from_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.pipeline import DataConfig
from cmr.data.source import DataError
from tests.launch import REPO, command
from tests.tiny_data import write_split


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("fork_safety")
    write_split(root, "train", 24, shard_size=6)
    write_split(root, "val", 8, shard_size=4)
    return root


def make_cfg(root, **overrides):
    base = {"shards": str(root), "batch_size": 4, "num_workers": 1, "shuffle_buffer": 8, "image": {"size": 16}}
    return from_dict(DataConfig, {**base, **overrides})


def loader_workers(process: psutil.Process) -> list[psutil.Process]:
    """DataLoader workers of ``process``: its spawned children, and its forkserver's children."""
    workers = []
    for child in process.children():
        cmd = command(child)
        if "forkserver" in cmd:
            workers += child.children()
        elif "spawn_main" in cmd:
            workers.append(child)
    return workers


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_train_and_eval_workers_are_never_forked_from_the_rank(dataset, method):
    cfg = make_cfg(dataset, worker_start_method=method)
    vocab = build_vocabulary(cfg)
    train = build_loader(cfg, vocab, split="train", mode="train")
    evaluation = build_loader(cfg, vocab, split="val", mode="eval")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    train.end_epoch = 2  # the next epoch's lane starts too
    train.set_epoch(0)
    next(iter(train))
    next(iter(evaluation))
    # train + the next epoch's lane + eval, one worker each, none a fork of this process (a
    # forked child would be this process's child with pytest's command line).
    workers = [p for p in loader_workers(me) if p.pid not in before]
    assert len(workers) >= 3, [command(p) for p in me.children(recursive=True)]
    assert not [command(p) for p in me.children() if "pytest" in command(p)]


def test_a_worker_that_sends_nothing_is_an_error_naming_it(dataset):
    cfg = make_cfg(dataset, worker_timeout_s=4, prefetch_next_epoch=False)
    loader = build_loader(cfg, build_vocabulary(cfg), split="train", mode="train")
    loader.set_epoch(0)
    before = {p.pid for p in loader_workers(psutil.Process())}
    stopped, done = [], threading.Event()

    def stop_workers_as_they_start():  # alive but silent, as a worker stuck on a dead mount is
        while not done.is_set():
            for p in loader_workers(psutil.Process()):
                if p.pid not in before and p.pid not in [w.pid for w in stopped]:
                    p.suspend()
                    stopped.append(p)
            time.sleep(0.02)

    watcher = threading.Thread(target=stop_workers_as_they_start, daemon=True)
    watcher.start()
    try:
        start = time.time()
        with pytest.raises(DataError, match=r"no batch from the data workers in 4 s \(data.worker_timeout_s\); workers: pid \d+ alive"):
            next(iter(loader))
        assert time.time() - start < 30
    finally:
        done.set()
        watcher.join()
        for worker in stopped:
            worker.kill()


CHURN = textwrap.dedent("""
    import sys, threading, queue
    from cmr.config import from_dict
    from cmr.data.loader import build_loader, build_vocabulary
    from cmr.data.pipeline import DataConfig

    def churn(stop):  # threads start and end all the time, as wandb's and gloo's do
        q = queue.Queue()
        while not stop.is_set():
            t = threading.Thread(target=q.put, args=(1,))
            t.start()
            q.get()
            t.join()

    if __name__ == "__main__":
        root, rounds = sys.argv[1], int(sys.argv[2])
        stop = threading.Event()
        threads = [threading.Thread(target=churn, args=(stop,), daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        cfg = from_dict(DataConfig, {"shards": root, "batch_size": 4, "num_workers": 2, "shuffle_buffer": 8,
                                     "image": {"size": 16}, "prefetch_next_epoch": False})
        vocab = build_vocabulary(cfg)
        for i in range(rounds):  # a fresh loader each round: its workers start now
            loader = build_loader(cfg, vocab, split="train", mode="train")
            loader.set_epoch(i)
            assert sum(b.size for b in loader) == 24
        stop.set()
        print("rounds done", rounds)
""")


@pytest.mark.slow
def test_workers_start_while_threads_come_and_go(dataset, tmp_path):
    script = tmp_path / "churn.py"
    script.write_text(CHURN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), str(dataset), "8"], env=env, capture_output=True,
                            text=True, timeout=240)  # ~20 s here, ~35 s on a loaded machine; a hang ends here
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rounds done 8" in result.stdout


EXIT_HOLDING = textwrap.dedent("""
    import gc, multiprocessing, os, signal, sys, time
    from cmr.config import from_dict
    from cmr.data.loader import build_loader, build_vocabulary
    from cmr.data.pipeline import DataConfig

    def users_child(path):  # the user's own daemonic process, which cleans up on SIGTERM
        def on_term(*_):
            open(path, "w").write("terminated")
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
        open(path + ".ready", "w").close()
        time.sleep(600)

    if __name__ == "__main__":
        child = multiprocessing.get_context("spawn").Process(target=users_child, args=(sys.argv[3],), daemon=True)
        child.start()
        while not os.path.exists(sys.argv[3] + ".ready"):
            time.sleep(0.05)
        cfg = from_dict(DataConfig, {"shards": sys.argv[1], "batch_size": 4, "num_workers": 2,
                                     "shuffle_buffer": 8, "image": {"size": 16}})
        loader = build_loader(cfg, build_vocabulary(cfg), split="train", mode="train")
        loader.set_epoch(0)
        batches = iter(loader)
        next(batches)  # mid-epoch, workers busy
        workers = [w.pid for w in loader._lanes[0].loader._iterator._workers]
        print("workers", *workers, flush=True)
        if sys.argv[2] == "stuck-and-dropped":  # workers that never take their done signal
            for pid in workers:
                os.kill(pid, signal.SIGSTOP)
            del batches, loader  # torch joins them 5 s each, then sends SIGTERM, in vain
            gc.collect()
        # else: "held", the loader stays referenced until exit
""")


@pytest.mark.parametrize("case", ["held", "stuck-and-dropped"])
def test_a_process_that_exits_holding_a_busy_loader_ends_with_its_workers(dataset, tmp_path, case):
    """A loader still referenced at exit (a global; a traceback's frames after an error), or
    dropped while its workers were stuck: multiprocessing's exit handler sends them SIGTERM,
    which they ignore (SLURM's), and joins them; without the loader's own exit handler that
    wait never ends."""
    script = tmp_path / "exit_holding.py"
    script.write_text(EXIT_HOLDING)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    users_child = tmp_path / "users_child"
    result = subprocess.run([sys.executable, str(script), str(dataset), case, str(users_child)], env=env,
                            capture_output=True, text=True, timeout=180)  # ~11-21 s; it hung without the handler
    assert result.returncode == 0, result.stderr[-3000:]
    workers = [int(pid) for pid in result.stdout.split("workers", 1)[1].split()]
    assert len(workers) == 2
    time.sleep(0.5)
    assert not [pid for pid in workers if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    # Only the loader's workers are killed: the user's own daemonic child got multiprocessing's
    # SIGTERM and ran its handler.
    assert users_child.read_text() == "terminated"


ENV_READER = textwrap.dedent("""
    import os
    import torch
    from cmr.procs import WorkerInit

    class EnvReader(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield os.environ.get("CMR_TEST_SET_LATER", "missing")

    def read_env():
        loader = torch.utils.data.DataLoader(EnvReader(), batch_size=None, num_workers=1,
                                             multiprocessing_context="forkserver", worker_init_fn=WorkerInit())
        return list(loader)

    if __name__ == "__main__":
        read_env()  # the forkserver is running from here on, with the environment of now
        os.environ["CMR_TEST_SET_LATER"] = "now"
        print("worker saw", read_env())
""")


def test_forkserver_workers_see_the_environment_of_now(tmp_path):
    """The forkserver is started once, with the environment of then; a worker must still see
    what the rank set since (an s3 endpoint, credentials). In a fresh interpreter: a forkserver
    that another test started (from another directory) could not import this script."""
    script = tmp_path / "env_reader.py"
    script.write_text(ENV_READER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "worker saw ['now']" in result.stdout
