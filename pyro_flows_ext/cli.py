"""The ``pyro-flows`` command: parse arguments, then call flows / infer / plots."""

import argparse
import json
import os
import sys

EPILOG = "Example: pyro-flows fit moons --steps 2000 --out runs/moons"


class CLIError(Exception):
    """An error reported as one line, without a traceback."""


def _device(name):
    import torch

    try:
        device = torch.device(name)
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"device {name!r} is not usable here ({str(e).splitlines()[0]}); "
                       "try --device cpu") from e
    return device


def _load_data(source, n, seed):
    """``(train, test, name)`` from a toy name or a data file (a 20% test split)."""
    import torch

    from . import datasets

    if source in datasets.TOY:
        return datasets.toy(source, n, seed), datasets.toy(source, max(n // 4, 1000), seed + 1), source
    if not os.path.exists(source):
        raise CLIError(f"{source!r} is neither a toy data set ({', '.join(datasets.TOY)}) "
                       "nor an existing .csv/.npy/.npz file")
    data = datasets.load(source)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, len(data) // 5)
    name = os.path.splitext(os.path.basename(source))[0]
    return data[perm[n_test:]], data[perm[:n_test]], name


def cmd_fit(args):
    import pyro
    import torch

    from . import datasets, flows, io, plots
    from .infer.density import as_data, fit_density, mean_nll

    torch.manual_seed(args.seed)
    device = _device(args.device)
    builder = flows.get_builder(args.flow)
    train, test, name = _load_data(args.data, args.n, args.seed)
    out = args.out or os.path.join("runs", name)
    os.makedirs(out, exist_ok=True)
    # standardise file data so default flow settings fit any scale; toy sets are used as is
    loc, scale = torch.zeros(train.shape[1]), torch.ones(train.shape[1])
    if args.data not in datasets.TOY:
        loc, scale = train.mean(0), train.std(0).clamp_min(1e-8)
    flow = builder(train.shape[1]).to(device)
    train, test = as_data((train - loc) / scale, flow), as_data((test - loc) / scale, flow, "test")
    checkpoint = os.path.join(out, "model.pt")
    history = fit_density(flow, train, num_steps=args.steps, batch_size=args.batch_size,
                          optim=pyro.optim.Adam({"lr": args.lr}), checkpoint=checkpoint,
                          resume=args.resume, progress=not args.quiet, seed=args.seed,
                          eval_every=max(1, min(100, args.steps // 10)))
    bound = "" if flow.is_exact else " (upper bound)"
    log_scale = scale.log().sum().item()  # NLL in the data's own units
    metrics = {"data": args.data, "flow": args.flow, "steps": len(history["loss"]),
               "train_nll": mean_nll(flow, train) + log_scale,
               "val_nll": history["best_val_nll"] + log_scale,
               "test_nll": mean_nll(flow, test) + log_scale, "exact": flow.is_exact,
               "stopped": history["stopped"], "n_train": len(train), "n_test": len(test)}
    io.save(flow, checkpoint, data_loc=loc, data_scale=scale, **_resume_fields(checkpoint))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plots.plot_training(history, os.path.join(out, "loss.png"))
    if train.shape[1] == 2:
        bounds = (min(-4.0, float(train.min()) - 0.5), max(4.0, float(train.max()) + 0.5))
        plots.plot_density(flow, os.path.join(out, "density.png"), bounds=bounds)
        plots.plot_samples(flow, os.path.join(out, "samples.png"), data=train.cpu(), bounds=bounds)
    for split in ("train", "val", "test"):
        print(f"{split} NLL{bound}: {metrics[split + '_nll']:.4f} nats")
    if history["stopped"]:
        print(f"note: {history['stopped']}")
    print(f"wrote {out}/: model.pt, metrics.json, loss.png"
          + (", density.png, samples.png" if train.shape[1] == 2 else ""))


def _resume_fields(checkpoint):
    """Keeps the fields ``--resume`` needs when the final model overwrites the checkpoint."""
    from . import io

    record = io.read(checkpoint) if os.path.exists(checkpoint) else {}
    keys = ("current_state", "step", "history", "optimizer")
    return {k: record[k] for k in keys if k in record}


def cmd_sample(args):
    import numpy as np
    import torch

    from . import io

    record = io.read(args.checkpoint)
    flow = io.from_record(record, args.checkpoint)
    flow.eval()
    torch.manual_seed(args.seed)
    with torch.no_grad():
        x = flow.sample((args.n,))
    if "data_scale" in record:  # undo the standardisation applied by `fit`
        x = x * record["data_scale"] + record["data_loc"]
    x = x.reshape(args.n, -1).cpu().numpy()
    if args.output.endswith(".npy"):
        np.save(args.output, x)
    else:
        np.savetxt(args.output, x, delimiter=",", fmt="%.6g")
    print(f"wrote {args.n} samples to {args.output}")


def build_parser():
    from .flows import FLOWS

    parser = argparse.ArgumentParser(prog="pyro-flows", description="Normalizing flows for Pyro.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a density model to a toy set or a data file")
    fit.add_argument("data", help="toy set name (moons, checkerboard, 8gaussians, spirals, "
                                  "pinwheel, rings) or a .csv/.npy/.npz file")
    fit.add_argument("--flow", default="realnvp", help=f"one of: {', '.join(sorted(FLOWS))}")
    fit.add_argument("--steps", type=int, default=2000)
    fit.add_argument("--batch-size", type=int, default=512)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--n", type=int, default=20_000, help="toy training points")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="cpu")
    fit.add_argument("--out", default=None, help="output folder (default runs/<data>)")
    fit.add_argument("--resume", action="store_true", help="continue from <out>/model.pt")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(run=cmd_fit)
    sample = sub.add_parser("sample", help="draw samples from a saved flow")
    sample.add_argument("checkpoint")
    sample.add_argument("-n", type=int, default=1000)
    sample.add_argument("-o", "--output", default="samples.csv", help=".csv or .npy")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(run=cmd_sample)
    return parser


def _check(args):
    for name in ("steps", "batch_size", "n"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, "
                           f"got {getattr(args, name)}")
    if getattr(args, "lr", 1.0) <= 0:
        raise CLIError(f"--lr must be positive, got {args.lr}")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check(args)
        args.run(args)
    except (CLIError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"pyro-flows: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-flows: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
