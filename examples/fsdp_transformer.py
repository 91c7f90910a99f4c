"""Hessian spectrum, trace and a loss slice of an FSDP2-sharded transformer (2 CPU ranks, gloo).

Usage: python examples/fsdp_transformer.py [--ranks 2] [--layers 2] [--d-model 64]

A small GPT-style classifier is built from a config (token + position embeddings, a stack of
``nn.TransformerEncoderLayer`` with GELU, mean pooling, a linear head; no ``transformers`` needed),
each layer is sharded with ``fully_shard`` and so is the root, and every rank holds its own shard
of a synthetic dataset. flatness detects the DTensor parameters and computes Hessian-vector
products as finite differences of ordinary FSDP gradient passes, keeping only this rank's shard of
every vector. The same script runs on GPUs with ``--backend nccl`` under ``torchrun``.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

F = nn.functional

CONFIG = {"vocab": 256, "seq": 16, "d_model": 64, "heads": 4, "ff": 128, "layers": 2, "classes": 8}


class Classifier(nn.Module):
    """Token + position embeddings, GELU transformer encoder layers, mean pooling, linear head."""

    def __init__(self, vocab, seq, d_model, heads, ff, layers, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation="gelu", batch_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def data_shard(rank: int, world: int, config: dict, samples: int = 256, batch: int = 32):
    """This rank's batches of a synthetic task (the class is a function of the first token)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config["vocab"], (samples, config["seq"]), generator=g)
    labels = tokens[:, 0] % config["classes"]
    mine = slice(rank * samples // world, (rank + 1) * samples // world)
    tokens, labels = tokens[mine], labels[mine]
    return [(tokens[i : i + batch], labels[i : i + batch]) for i in range(0, len(tokens), batch)]


def run(rank: int, world: int, config: dict, device: str = "cpu") -> dict:
    """Shard the model, then the spectrum, trace and a 1-D slice; the same numbers on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import flatness

    torch.manual_seed(0)  # the same initial weights on every rank
    model = Classifier(**config).to(device)
    mesh = init_device_mesh(device.split(":")[0], (world,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    data = [(x.to(device), y.to(device)) for x, y in data_shard(rank, world, config)]
    out = {"n": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    top = flatness.hessian_topk(model, F.cross_entropy, data, k=2, tol=1e-3)
    out["topk"] = (top.eigenvalues.tolist(), top.n_matvec, top.converged, time.perf_counter() - t0)
    out["eigvec_shard"] = tuple(top.eigenvector_dicts()[0]["head.weight"].shape)
    tr = flatness.hessian_trace(model, F.cross_entropy, data, n_hvp=30, seed=1)
    out["trace"] = (tr.estimate, tr.std_error)
    line = flatness.landscape_1d(model, F.cross_entropy, data, alphas=torch.linspace(-1, 1, 5), seed=2)
    out["slice"] = line.loss.tolist()
    return out


def _worker(rank: int, world: int, port: int, config: dict, queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = run(rank, world, config)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--layers", type=int, default=CONFIG["layers"])
    parser.add_argument("--d-model", type=int, default=CONFIG["d_model"])
    args = parser.parse_args(argv)
    config = dict(CONFIG, layers=args.layers, d_model=args.d_model, ff=2 * args.d_model)
    if "RANK" in os.environ:  # launched by torchrun: one process per GPU (or CPU rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(device)
        result = run(dist.get_rank(), dist.get_world_size(), config, device)
        dist.destroy_process_group()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(_worker, args=(args.ranks, port, config, queue), nprocs=args.ranks, join=True)
        result = queue.get()
    vals, n_hvp, converged, seconds = result["topk"]
    print(f"n = {result['n']:,} parameters on {args.ranks} rank(s)")
    print(f"top-2 eigenvalues {vals} ({n_hvp} products, converged={converged}, {seconds:.1f} s)")
    print(f"rank 0's shard of the top eigenvector's head.weight: {result['eigvec_shard']}")
    print(f"trace {result['trace'][0]:.4g} ± {result['trace'][1]:.2g}")
    print("loss along a filter-normalized random direction:", [f"{v:.4f}" for v in result["slice"]])
    return result


if __name__ == "__main__":
    main()
