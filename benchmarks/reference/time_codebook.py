"""Time forward+backward of the authors' codebook layer (`codebook-features` 0.1.2) and print JSON.

Run by benchmarks/codebook_speed.py with the Python of a separate old-stack virtual environment (see
benchmarks/reference/README.md); it only imports and calls that library.

    /tmp/refvenv/bin/python benchmarks/reference/time_codebook.py --shape mlp --warmup 3 --repeats 20 --seed 0

With --serve it sets up, warms up, prints one JSON line {"ready": true, ...}, then for every line N read from
stdin times N more steps and prints {"times_s": [...]}: the benchmark interleaves these steps with its own, so
that load from other processes on the machine hits both alike. An empty line or "quit" ends it.
"""

from __future__ import annotations

import statistics
import warnings

from serve_loop import parser, reply, serve, timer  # beside this script: its folder is sys.path[0] when run as a file

SHAPES = {
    # name: (input shape, per-code dim given to the layer, number of codebooks)
    "mlp": ((64, 128, 128), 128, 1),
    "attn": ((64, 128, 4, 32), 128, 4),
}


def main() -> None:
    options = parser(__doc__, n_codes=1000, k=1, warmup=3, repeats=20)
    options.add_argument("--shape", choices=sorted(SHAPES), required=True)
    options.add_argument("--input-shape", type=int, nargs="+", default=None, help="override the input shape (tests)")
    args = options.parse_args()

    warnings.filterwarnings("ignore")
    import torch
    from codebook_features import models

    shape, dim, num_codebooks = SHAPES[args.shape]
    if args.input_shape:
        shape = tuple(args.input_shape)
        dim = shape[-1] * (shape[-2] if args.shape == "attn" else 1)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    models.BaseSnapFunction.loss = "aeloss"
    if args.shape == "attn":
        # The authors' per-head codebooks: one CodebookLayer of dim // num_codebooks per head, applied to
        # x[:, :, head] for 4-d input (batch, pos, heads, d_head).
        layer = models.GroupCodebookLayer(
            dim=dim,
            num_codes=args.n_codes,
            key="attn",
            num_codebooks=num_codebooks,
            snap_fn=models.InnerProductSnapFunction,
            kcodes=args.k,
        )
    else:
        layer = models.CodebookLayer(dim, args.n_codes, "mlp", snap_fn=models.InnerProductSnapFunction, kcodes=args.k)
    layer = layer.to(device).train()
    x = torch.randn(shape, device=device).requires_grad_()
    grad = torch.randn(shape, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        out = layer(x)
        out.backward(grad)
        x.grad = None
        layer.zero_grad(set_to_none=True)

    timed = timer(step, sync)
    for _ in range(args.warmup):
        step()
    sync()
    meta = {
        "shape": args.shape,
        "input_shape": list(shape),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "layer": type(layer).__name__,
        "codebook_features_version": _version(),
    }
    if args.serve:
        serve(meta, timed)
        return
    times = timed(args.repeats)
    reply({**meta, "median_s": statistics.median(times), "times_s": times})


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("codebook-features")
    except Exception:  # pragma: no cover - metadata missing
        return "unknown"


if __name__ == "__main__":
    main()
