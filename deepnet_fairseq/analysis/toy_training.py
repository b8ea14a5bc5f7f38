"""A small in-process training loop for the toy-scale analyses (Figs. 3-5 of the DeepNet paper).

Models, data, criterion and batches are fairseq's own (built as ``fairseq-train`` builds them); the
loop itself is plain PyTorch so that every update can be measured: Adam (0.9, 0.98) with fairseq's
inverse-square-root schedule (linear warmup), no gradient clipping, label-smoothed cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from fairseq import utils
from fairseq.logging import metrics
from torch import nn

from deepnet_fairseq.build import build_from_command_line


@dataclass
class ToySetup:
    """Hyperparameters shared by the analyses (the paper's tiny 64-128-2 models by default)."""

    embed_dim: int = 64
    ffn_dim: int = 128
    heads: int = 2
    lr: float = 1e-3
    warmup: int = 10
    max_tokens: int = 1000
    dropout: float = 0.0
    seed: int = 1


def build_model_and_task(data: Path, scheme: str, layers: int, setup: ToySetup, extra: Sequence[str] = ()):
    """Build ``(args, task, model, criterion)`` from a toy ``fairseq-train`` command line (seed ``setup.seed``)."""
    argv = [
        data, "--arch", "deepnet_transformer", "--cpu",
        "--residual-scheme", scheme, "--encoder-layers", str(layers), "--decoder-layers", str(layers),
        "--encoder-embed-dim", str(setup.embed_dim), "--decoder-embed-dim", str(setup.embed_dim),
        "--encoder-ffn-embed-dim", str(setup.ffn_dim), "--decoder-ffn-embed-dim", str(setup.ffn_dim),
        "--encoder-attention-heads", str(setup.heads), "--decoder-attention-heads", str(setup.heads),
        "--share-all-embeddings", "--dropout", str(setup.dropout), "--seed", str(setup.seed),
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens",
        str(setup.max_tokens), *extra,
    ]
    model, task, args = build_from_command_line(argv, seed=setup.seed)
    criterion = task.build_criterion(args)
    return args, task, model, criterion


def batches(task, args, seed: int) -> Iterator[dict]:
    """Endless training batches (reshuffled each epoch)."""
    task.load_dataset("train")
    dataset = task.dataset("train")
    epoch = 1
    while True:
        iterator = task.get_batch_iterator(
            dataset=dataset, max_tokens=args.max_tokens, max_positions=utils.resolve_max_positions(
                task.max_positions(), (args.max_source_positions, args.max_target_positions)),
            seed=seed, epoch=epoch, required_batch_size_multiple=1, num_workers=0,
        ).next_epoch_itr(shuffle=True)
        yield from iterator
        epoch += 1


def inverse_sqrt_lr(update: int, lr: float, warmup: int) -> float:
    """fairseq's inverse_sqrt schedule: linear warmup to ``lr``, then ``lr * sqrt(warmup / update)``."""
    update = max(update, 1)
    return lr * update / warmup if update < warmup else lr * (warmup / update) ** 0.5


def train_toy(
    model: nn.Module,
    criterion: nn.Module,
    batch_stream: Iterator[dict],
    updates: int,
    setup: ToySetup,
    measure: Callable[[int, dict, Dict[str, float]], None],
    measure_every: int = 1,
) -> List[float]:
    """Train ``updates`` steps; ``measure(update, sample, logged_metrics)`` runs on measured steps.

    ``logged_metrics`` are the fairseq metrics logged during that update (e.g. ``stab_*`` from
    ``--log-stability``).  Returns the training losses (per token, base 2 as fairseq logs them).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=setup.lr, betas=(0.9, 0.98))
    losses: List[float] = []
    model.train()
    for update in range(updates):
        sample = next(batch_stream)
        for group in optimizer.param_groups:
            group["lr"] = inverse_sqrt_lr(update + 1, setup.lr, setup.warmup)
        model.set_num_updates(update)
        with metrics.aggregate(new_root=True) as aggregator:
            loss, sample_size, _ = criterion(model, sample)
            optimizer.zero_grad()
            (loss / sample_size).backward()
            logged = {key: meter.avg for key, meter in aggregator.items()}
        losses.append(loss.item() / sample_size / torch.log(torch.tensor(2.0)).item())
        if update % measure_every == 0:
            measure(update, sample, logged)
        optimizer.step()
    return losses
