"""DP-SGD step time vs the same non-private step (same model, batch, device), one run.

    .venv/bin/python benchmarks/bench_dpsgd.py [--batch 256] [--steps 30] [--threads 1]

Prints the warm median step time of plain SGD (the baseline) and of DP-SGD through
``privacy.make_private`` (per-example clipping + OS-drawn noise) with Opacus hooks, with
Opacus ghost clipping (two backward passes) and with ghost clipping in one backward pass
(``privacy.bookkeeping``, what ``grad_sample_mode="auto"`` picks for this CNN), all measured
in the same run, and their ratios to the baseline;
writes benchmarks/results/dpsgd_step_time.json.
The model is the 26k-parameter tanh CNN for 28x28 inputs (Papernot et al. 2021) used by
the MNIST benchmark. Random inputs: the cost does not depend on the pixel values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tanh_cnn(num_classes: int = 10) -> nn.Module:
    """Papernot et al. 2021 / Tramer & Boneh 2021 MNIST CNN (26,010 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 32), nn.Tanh(),
        nn.Linear(32, num_classes),
    )


def _time_step(model, optimizer, batch, loss_fn, device) -> float:
    x, y = batch[0].to(device), batch[1].to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/dpsgd_step_time.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from privacy.dpsgd import make_private, resolve_device

    device = resolve_device(args.device)
    n = args.batch * (args.steps + args.warmup)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)

    # Same model (same initial weights), same fixed batches, same device, noise from the OS
    # (make_private's default). The four steps are interleaved batch by batch so that load
    # from other processes hits them alike.
    torch.manual_seed(0)
    plain = tanh_cnn().to(device)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    runs = {"plain": (plain, plain_opt, nn.CrossEntropyLoss())}
    privates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("hooks", "ghost", "bookkeeping"):
            dp = tanh_cnn()
            dp.load_state_dict(plain.state_dict())
            # no Poisson sampling here: a like-for-like step on exactly `batch` examples
            private = make_private(
                model=dp, optimizer=torch.optim.SGD(dp.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=args.batch),
                noise_multiplier=1.0, max_grad_norm=1.0, device=device, poisson_sampling=False,
                criterion=nn.CrossEntropyLoss(), grad_sample_mode=mode,
            )
            runs[mode] = (private.model, private.optimizer, private.criterion)
            privates.append(private)
        dp = tanh_cnn()  # what grad_sample_mode="auto" picks for this model and loss
        auto = make_private(
            model=dp, optimizer=torch.optim.SGD(dp.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=args.batch),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
            criterion=nn.CrossEntropyLoss(),
        )
        auto.close()
        times: dict[str, list[float]] = {name: [] for name in runs}
        batches = DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=False)
        for i, batch in enumerate(batches):
            for name, (model, optimizer, loss_fn) in runs.items():
                t = _time_step(model, optimizer, batch, loss_fn, device)
                if i >= args.warmup:
                    times[name].append(t)
    for private in privates:
        private.close()

    median = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "benchmark": "dpsgd_step_time",
        "model": "tanh_cnn (26,010 params)",
        "params": sum(p.numel() for p in plain.parameters()),
        "batch": args.batch,
        "steps_timed": len(times["plain"]),
        "device": str(device),
        "torch_threads": args.threads,
        "plain_median_s": median["plain"],
        "hooks_median_s": median["hooks"],
        "ghost_median_s": median["ghost"],
        "bookkeeping_median_s": median["bookkeeping"],
        "hooks_ratio": median["hooks"] / median["plain"],
        "ghost_ratio": median["ghost"] / median["plain"],
        "bookkeeping_ratio": median["bookkeeping"] / median["plain"],
        "auto_choice": auto.clipping.mode,
        "load_average_1m": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(
        f"batch {args.batch} on {device} ({args.threads} thread(s)), warm medians of "
        f"{result['steps_timed']} interleaved steps, load {result['load_average_1m']:.1f}:\n"
        f"  plain step (baseline)                             {median['plain'] * 1e3:7.1f} ms  1.00x\n"
        f"  DP-SGD, Opacus hooks                              {median['hooks'] * 1e3:7.1f} ms  "
        f"{result['hooks_ratio']:.2f}x\n"
        f"  DP-SGD, Opacus ghost clipping (2 backward passes) {median['ghost'] * 1e3:7.1f} ms  "
        f"{result['ghost_ratio']:.2f}x\n"
        f"  DP-SGD, ghost clipping in 1 backward pass         {median['bookkeeping'] * 1e3:7.1f} ms  "
        f"{result['bookkeeping_ratio']:.2f}x\n"
        f"  make_private's automatic choice: {auto.clipping.mode}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
