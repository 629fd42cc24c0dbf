"""Time training steps of the FSM codebook model built with the authors' library (`codebook-features` 0.1.2).

Run by benchmarks/train_speed.py with the Python of the old-stack virtual environment (see
benchmarks/reference/README.md); it only imports and calls that library.
The model matches cbinterp's FSM model: a GPT-NeoX with 4 layers, d_model 128, 4 heads, d_mlp 512, full rotary,
sequential residual, vocabulary 11; a codebook per attention head (before the output projection) and per MLP,
1000 codes, k=1, inner-product similarity, aeloss. One step: forward with labels, backward, AdamW step.

With --serve it builds the model, runs --warmup steps, prints {"ready": true, ...}, then for every line N on stdin
times N more steps and prints {"times_s": [...]}; "quit" or an empty line ends it.
"""

from __future__ import annotations

import warnings

from serve_loop import parser, reply, serve, timer  # beside this script: its folder is sys.path[0] when run as a file


def main() -> None:
    options = parser(
        __doc__, batch=64, seq_len=128, n_layers=4, d_model=128, n_heads=4, d_mlp=512, n_codes=1000, vocab=11, warmup=2
    )
    args = options.parse_args()

    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from codebook_features import models

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    base = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=args.vocab,
            hidden_size=args.d_model,
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            intermediate_size=args.d_mlp,
            rotary_pct=1.0,
            hidden_act="gelu",
            max_position_embeddings=max(args.seq_len, 128),
            use_parallel_residual=False,
        )
    )
    config = models.CodebookModelConfig(
        codebook_type=["group", "vanilla"],
        num_codebooks=[-1, 1],
        k_codebook=[1, 1],
        num_codes=args.n_codes,
        layers_to_snap="all",
        similarity_metric="inner_product",
        codebook_at=["attn_preproj", "mlp"],
        loss="aeloss",
    )
    model = models.wrap_codebook(model_or_path=base, config=config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(
        0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
    ).to(device)

    def step() -> None:
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    timed = timer(step, sync)

    for _ in range(args.warmup):
        step()
    n_codebooks = sum(len(layers) for layers in model.all_codebooks.values())
    meta = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "threads": torch.get_num_threads(),
        "codebook_layers": n_codebooks,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if args.serve:
        serve(meta, timed)
        return
    reply({**meta, "times_s": timed(5)})


if __name__ == "__main__":
    main()
