"""Fault suite: a saver, a trainer and a cacher killed with SIGKILL at random (seeded) moments, KILLS times each.

After every kill the result must be the old state, the new state, or a correct resumable prefix; the next load or
resume must reach the right final state, and no debris (temporaries, folders set aside, stray chunks) may be left.
A killed save must also load from a read-only folder, and a reader loading while another process saves to the same
path must get the old or the new model, never an error. The children are forked from one server process
(tests/_fault_worker.py) that imports torch once.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _fault_worker as worker  # tests/ is on the path: pytest puts the root conftest's folder there
import pytest
import torch
from tiny_models import make_cb_model

import cbinterp
from cbinterp.core.storage.atomic import HOST
from cbinterp.core.storage.manifest import MANIFEST_FILE

KILLS = 8
# About 45 s on the shared 2-core machine (a fork server, 3 x (KILLS + 1) children): over the fast tier's budget.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::cbinterp.ResumeWarning"),
]


class Server:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cbinterp.__file__).parents[1]), *sys.path])}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(worker.__file__))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, op: str, path: Path, ready: Path, timeout: float = 60.0, **args) -> int:
        """Start `op` in a child and wait until it is ready; returns its pid."""
        ready.unlink(missing_ok=True)
        pid = self.ask({"op": op, "args": {"path": str(path), "ready": str(ready), **args}})["pid"]
        deadline = time.monotonic() + timeout
        while not ready.exists():
            assert time.monotonic() < deadline, f"{op} child never got ready"
            time.sleep(0.002)
        return pid

    def run(
        self, op: str, path: Path, ready: Path, delay: float | None, timeout: float = 60.0, **args
    ) -> tuple[bool, float]:
        """Run `op` in a child; kill it `delay` s after it is ready (None: let it finish). Returns (killed, s)."""
        pid = self.start(op, path, ready, timeout, **args)
        start = time.monotonic()
        if delay is not None:
            time.sleep(delay)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = self.ask({"wait": pid})
        elapsed = time.monotonic() - start
        assert status["killed"] or status["code"] == 0, f"{op} child failed: {status}"
        return status["killed"], elapsed

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def entries(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def delays(seed: int, duration: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.0, duration * 1.1) for _ in range(KILLS)]


def report(name: str, outcomes: dict) -> None:
    print(f"\n[faults] {name}: {KILLS} kills, outcomes {outcomes}")


def test_killed_saver_leaves_old_or_new(server, tmp_path):
    old, new = make_cb_model(seed=0), make_cb_model(seed=1)
    ready = tmp_path / "ready"
    _, duration = server.run("save", tmp_path / "probe" / "d", ready, None)
    outcomes = {"old": 0, "new": 0, "debris_cleaned": 0}
    for i, delay in enumerate(delays(1, duration)):
        root = tmp_path / f"trial{i}"
        root.mkdir()
        cbinterp.save(old, root / "d")
        server.run("save", root / "d", ready, delay)
        outcomes["debris_cleaned"] += bool(entries(root) - {"d"})
        loaded = cbinterp.load(root / "d", device="cpu")  # checks every checksum; recovers a half-done swap
        if state_equal(loaded, old):
            outcomes["old"] += 1
        else:
            assert state_equal(loaded, new), "neither the old nor the new model"
            outcomes["new"] += 1
        assert entries(root) == {"d"}, entries(root)  # no temporaries, nothing set aside
        assert entries(root / "d") == {"config.json", "model.safetensors", MANIFEST_FILE}
    report("save", outcomes)


def test_killed_trainer_resumes_to_the_uninterrupted_result(server, tmp_path):
    ready = tmp_path / "ready"
    reference = make_cb_model(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = cbinterp.train(reference, worker.batch_at, worker.train_config(str(tmp_path / "straight")))
    _, duration = server.run("train", tmp_path / "probe", ready, None)
    outcomes = {"no_checkpoint": 0, "prefix": 0, "finished": 0, "debris_cleaned": 0}
    files = {"config.json", "model.safetensors", "trainer.json", "trainer.safetensors", MANIFEST_FILE}
    for i, delay in enumerate(delays(2, duration)):
        root = tmp_path / f"trial{i}"
        root.mkdir()
        ckpt = root / "ckpt"
        server.run("train", ckpt, ready, delay)
        outcomes["debris_cleaned"] += bool(entries(root) - {"ckpt"})
        model = make_cb_model(seed=0)
        result = cbinterp.train(model, worker.batch_at, worker.train_config(str(ckpt)))
        step = result.resumed_from
        if step is None:
            outcomes["no_checkpoint"] += 1
        else:
            outcomes["finished" if step == 6 else "prefix"] += 1
        assert result.losses == straight.losses  # the prefix was correct and resumed exactly
        assert state_equal(model, reference)
        assert entries(root) == {"ckpt"} and entries(ckpt) == files
    report("train", outcomes)


def test_killed_cacher_keeps_a_correct_prefix(server, tmp_path):
    ready = tmp_path / "ready"
    model = make_cb_model(seed=0)
    full = cbinterp.cache_codes(model, worker.docs(), batch_size=2, progress=False)
    _, duration = server.run("cache", tmp_path / "probe", ready, None)
    outcomes = {"nothing": 0, "prefix": 0, "complete": 0, "debris_cleaned": 0}
    for i, delay in enumerate(delays(3, duration)):
        path = tmp_path / f"trial{i}"
        server.run("cache", path, ready, delay)
        try:
            partial = cbinterp.CodeCache.open(path)
        except FileNotFoundError:
            partial = None
        if partial is None or partial.n_docs == 0:
            outcomes["nothing"] += 1
        else:
            n = partial.n_tokens
            outcomes["complete" if partial.n_docs == 24 else "prefix"] += 1
            assert partial.n_docs * 8 == n
            for name in full.codebook_names:
                assert torch.equal(partial.codes(name), full.codes(name)[:n])
            assert torch.equal(partial.tokens, full.tokens[:n])
        if path.exists():
            listed = (
                set(json.loads((path / MANIFEST_FILE).read_text())["files"])
                if (path / MANIFEST_FILE).exists()
                else set()
            )
            outcomes["debris_cleaned"] += bool(entries(path) - listed - {MANIFEST_FILE})
        resumed = cbinterp.cache_codes(
            model, worker.docs(), batch_size=2, directory=path, chunk_tokens=16, progress=False
        )
        for name in full.codebook_names:
            assert torch.equal(resumed.codes(name), full.codes(name))
        assert torch.equal(resumed.doc, full.doc) and torch.equal(resumed.pos, full.pos)
        listed = set(json.loads((path / MANIFEST_FILE).read_text())["files"])
        assert entries(path) == listed | {MANIFEST_FILE}, entries(path) - listed
    report("cache", outcomes)


def test_killed_saver_then_a_read_only_load(server, tmp_path):
    """After each kill the folder is made read-only (and, run as root, the load runs as nobody): the load must
    still give the old or the new model, skipping the cleanup it cannot do."""
    # A folder outside pytest's private tmp, so that the user nobody may read it.
    base = Path(tempfile.mkdtemp(prefix="cbinterp-faults-"))
    base.chmod(0o755)

    def writable(root: Path, mode: int) -> None:
        for p in (root, *(q for q in root.rglob("*") if q.is_dir())):
            p.chmod(mode)

    try:
        old = make_cb_model(seed=0)
        ready = base / "ready"
        _, duration = server.run("save", base / "probe" / "d", ready, None)
        outcomes = {"debris_left_read_only": 0}
        for i, delay in enumerate(delays(4, duration)):
            root = base / f"trial{i}"
            root.mkdir(mode=0o755)
            cbinterp.save(old, root / "d")
            server.run("save", root / "d", ready, delay)
            # and a killed writer's temporary file, under the name cbinterp gives it and the one of earlier versions
            gone = dead_pid()
            (root / f".d.cbinterp-{HOST}.{gone}-0badc0de.tmp").write_bytes(b"debris")
            (root / f".d.{gone}-0badc0de.tmp").write_bytes(b"debris")
            writable(root, 0o555)
            try:
                server.run("load_check", root / "d", ready, None, seeds=[0, 1])  # exits 0 only if one of them
                outcomes["debris_left_read_only"] += bool(entries(root) - {"d"})
            finally:
                writable(root, 0o755)
            cbinterp.load(root / "d", device="cpu")  # writable again: cbinterp's debris goes
            assert entries(root) == {"d", f".d.{gone}-0badc0de.tmp"}, entries(root)  # not named by cbinterp: kept
        report("read-only load", outcomes)
    finally:
        writable(base, 0o755)
        shutil.rmtree(base, ignore_errors=True)


def test_concurrent_reader_sees_old_or_new(server, tmp_path):
    """One process saves two models in turn to one path while this one loads it LOADS times."""
    loads = 40
    path, ready, stop = tmp_path / "d", tmp_path / "ready", tmp_path / "stop"
    models = {1: make_cb_model(seed=1), 2: make_cb_model(seed=2, sites=("mlp",))}  # as save_loop saves
    cbinterp.save(models[1], path)
    pid = server.start("save_loop", path, ready, stop=str(stop))
    seen = {1: 0, 2: 0}
    try:
        for _ in range(loads):
            loaded = cbinterp.load(path, device="cpu")
            which = [seed for seed, model in models.items() if state_equal(loaded, model)]
            assert which, "neither of the two models"
            seen[which[0]] += 1
    finally:
        stop.touch()
        status = server.ask({"wait": pid})
    assert status == {"killed": False, "code": 0}, status  # and the writer never failed either
    print(f"\n[faults] concurrent: {loads} loads during saves, models seen {seen}")
    assert entries(tmp_path) == {"d", "ready", "stop"}, entries(tmp_path)
