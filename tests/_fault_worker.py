"""A fork server for tests/test_faults.py: imports torch and cbinterp once, then forks one child per operation.

Protocol (one JSON object per line): the test sends {"op": name, "args": {...}} and gets {"pid": child}; the child
touches `args["ready"]` once its model is built, then runs the operation and exits 0 (or 3 on an exception). The test
kills the child with SIGKILL whenever it likes and sends {"wait": pid}, answered with {"killed": bool, "code": int}.
Operations: "save", "train", "cache" (each killed at random by the test), "save_loop" (saves two models, seed 1 and
seed 2 with MLP codebooks only, in turn to one path until `args["stop"]` exists) and "load_check" (loads
`args["path"]` without write permission, as the user nobody when run as root, and checks it is the model of one of
`args["seeds"]`).
The server warms up single-threaded (no thread pool for a child to inherit) before it forks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
from tiny_models import make_cb_model  # beside this file: the tests' tiny model, one definition

import cbinterp
from cbinterp.core.training.train import TrainConfig, train


def batch_at(step: int) -> torch.Tensor:
    return torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(step))


def docs() -> torch.Tensor:
    return torch.randint(0, 11, (24, 8), generator=torch.Generator().manual_seed(7))


def train_config(checkpoint_dir) -> TrainConfig:
    return TrainConfig(steps=6, lr=3e-3, checkpoint_every=1, checkpoint_dir=checkpoint_dir, progress=False)


def run(op: str, args: dict) -> None:
    if op == "save":
        model = make_cb_model(seed=1)
        Path(args["ready"]).touch()
        cbinterp.save(model, args["path"])
    elif op == "train":
        model = make_cb_model(seed=0)
        Path(args["ready"]).touch()
        train(model, batch_at, train_config(args["path"]))
    elif op == "save_loop":
        models = [make_cb_model(seed=1), make_cb_model(seed=2, sites=("mlp",))]  # other codebooks: a mix cannot load
        Path(args["ready"]).touch()
        stop = Path(args["stop"])
        for i in range(args.get("max_saves", 2000)):
            if stop.exists():
                break
            cbinterp.save(models[i % 2], args["path"])
    elif op == "load_check":
        expected = [make_cb_model(seed=seed).state_dict() for seed in args["seeds"]]
        Path(args["ready"]).touch()
        if os.geteuid() == 0:  # permissions do not stop root: read as a user who may not change the folder
            os.setgid(65534)
            os.setuid(65534)
        state = cbinterp.load(args["path"], device="cpu").state_dict()
        if not any(s.keys() == state.keys() and all(torch.equal(s[k], state[k]) for k in s) for s in expected):
            raise AssertionError(f"{args['path']} holds none of the models of seeds {args['seeds']}")
    elif op == "cache":
        model = make_cb_model(seed=0)
        Path(args["ready"]).touch()
        cbinterp.cache_codes(model, docs(), batch_size=2, directory=args["path"], chunk_tokens=16, progress=False)
    else:
        raise ValueError(op)


def warm_up() -> None:
    """Build, run and save a model once, single-threaded (no thread pool to inherit), so that the lazy imports and
    first-call setup are done once here, not in every child."""
    import tempfile

    torch.set_num_threads(1)
    model = make_cb_model(seed=0)
    with torch.no_grad():
        model(batch_at(0))
    with tempfile.TemporaryDirectory() as tmp:
        cbinterp.save(model, Path(tmp) / "m")
        cbinterp.load(Path(tmp) / "m", device="cpu")


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    warm_up()
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            reply = {"killed": os.WIFSIGNALED(status), "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1}
        else:
            pid = os.fork()
            if pid == 0:
                try:
                    torch.set_num_threads(1)
                    run(request["op"], request["args"])
                    code = 0
                except BaseException:
                    traceback.print_exc()
                    code = 3
                sys.stdout.flush()
                os._exit(code)
            reply = {"pid": pid}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
