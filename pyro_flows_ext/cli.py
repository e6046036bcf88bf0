"""The ``pyro-flows`` command: parse arguments, then call flows / infer / plots."""

import argparse
import json
import math
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


def _no_directory(path, what):
    """A clear error when a path given as a file is a folder."""
    if os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a folder; expected a file")


def _load_data(source, n, seed):
    """``(train, test, name)`` from a toy name or a data file (a 20% test split). A file's
    rows are checked for NaN/inf before anything else, so errors name the row in the file."""
    import torch

    from . import datasets

    if source in datasets.TOY:
        return (datasets.toy(source, n, seed),
                datasets.toy(source, max(n // 4, 1000), seed + 1), source)
    _no_directory(source, "data file")
    if not os.path.exists(source):
        raise CLIError(f"{source!r} is neither a toy data set ({', '.join(datasets.TOY)}) "
                       "nor an existing .csv/.npy/.npz file")
    try:
        data = datasets.load(source, finite=True)
    except (ValueError, OSError):
        raise  # already clear (main prints them in one line)
    except Exception as e:  # a corrupt file (e.g. zipfile.BadZipFile from a broken .npz)
        raise CLIError(f"could not read {source!r}: {type(e).__name__}: {e}") from e
    if len(data) < 20:
        raise CLIError(f"{source!r} has {len(data)} rows; fitting needs at least 20 (a 20% test "
                       "split and 10 training rows)")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, len(data) // 5)
    name = os.path.splitext(os.path.basename(source))[0]
    return data[perm[n_test:]], data[perm[:n_test]], name


def cmd_fit(args):
    from .datasets import IMAGES

    if args.data in IMAGES:
        return _fit_images(args)
    import pyro
    import torch

    from . import datasets, flows, plots
    from .infer.density import as_data, fit_density, mean_nll

    if args.batch_size is None:
        args.batch_size = 512
    from .distributed import is_distributed, is_main_process, local_device

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = local_device(_device(args.device))
    builder = flows.get_builder(args.flow)
    train, test, name = _load_data(args.data, args.n, args.seed)
    out = args.out or os.path.join("runs", name)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out!r} is a file; expected a folder (new or existing)")
    if is_main_process():  # data-parallel: rank 0 writes every file
        os.makedirs(out, exist_ok=True)
    # file data: a Standardize layer inside the flow (set from the training rows by
    # fit_density), so the saved model is a density in the file's own units
    standardize = args.data not in datasets.TOY
    try:
        flow = builder(train.shape[1], standardize=standardize).to(device)
    except ValueError as e:  # e.g. a coupling flow on one column
        hint = "; try --flow nsf or maf" if train.shape[1] == 1 else ""
        raise CLIError(f"--flow {args.flow} cannot model {train.shape[1]}-column data: "
                       f"{e}{hint}") from e
    train, test = as_data(train, flow), as_data(test, flow, "test")
    checkpoint = os.path.join(out, "model.pt")
    start = _checkpoint_step(checkpoint) if args.resume else None
    fit = fit_density
    if getattr(args, "objective", "likelihood") == "flow-matching":
        if is_distributed():
            raise CLIError("--objective flow-matching trains in one process; drop --nproc / "
                           "torchrun, or use --objective likelihood")
        from .infer.flow_matching import fit_flow_matching as fit
    history = fit(flow, train, num_steps=args.steps, batch_size=args.batch_size,
                  optim=pyro.optim.Adam({"lr": args.lr}), checkpoint=checkpoint,
                  resume=args.resume, progress=not args.quiet, seed=args.seed)
    if not is_main_process():
        return
    bound = "" if flow.is_exact else " (upper bound)"
    steps_done = len(history["loss"]) - history.get("start_step", 0)
    metrics = {"data": args.data, "flow": args.flow, "steps": len(history["loss"]),
               "steps_this_run": steps_done, "train_nll": mean_nll(flow, train),
               "val_nll": history["best_val_nll"], "test_nll": mean_nll(flow, test),
               "best_step": history["best_step"], "exact": flow.is_exact,
               "stopped": history["stopped"], "n_train": history["n_train"],
               "n_val": history["n_val"], "n_test": len(test), "units": "data"}
    _save_final(flow, checkpoint, metrics)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    units = "nats, data units" if standardize else "nats"
    plots.plot_training(history, os.path.join(out, "loss.png"),
                        title=f"{args.flow} on {name}: test NLL {metrics['test_nll']:.3f} "
                              f"{units}")
    if train.shape[1] == 2:
        both = torch.cat([train, test]).cpu()
        title = f"{args.flow} density on {name} (test NLL {metrics['test_nll']:.3f} {units})"
        plots.plot_density(flow, os.path.join(out, "density.png"), data=both, title=title)
        plots.plot_samples(flow, os.path.join(out, "samples.png"), data=train.cpu())
    if start is not None:
        if start >= args.steps:
            print(f"resume: the checkpoint is already at step {start} and --steps {args.steps} "
                  "is a total, so nothing was trained; pass a larger --steps to continue")
        else:
            print(f"resume: continued from step {start} to step {len(history['loss'])} of "
                  f"--steps {args.steps} (a total): {steps_done} more steps")
    for split in ("train", "val", "test"):
        print(f"{split} NLL{bound}: {metrics[split + '_nll']:.4f} {units}")
    print(f"best validation at step {history['best_step']}"
          + (" (the Gaussian start)" if history["best_step"] == 0 else ""))
    if history["stopped"]:
        print(f"note: {history['stopped']}")
    print(f"wrote {out}/: model.pt, metrics.json, loss.png"
          + (", density.png, samples.png" if train.shape[1] == 2 else ""))


def _fit_images(args):
    """``pyro-flows fit digits|digits16 --flow glow``: a dequantized Glow on the integer
    images; prints test bits/dim (the dequantization bound, the importance-weighted estimate
    and the per-pixel categorical baseline) and writes model.pt, metrics.json, loss.png and
    samples.png."""
    import pyro
    import torch

    from . import datasets, flows, plots
    from .infer import bits_per_dim, categorical_bits_per_dim, iw_bits_per_dim
    from .infer.density import as_data, fit_density

    if args.flow != "glow":
        raise CLIError(f"{args.data} is an image data set and needs an image flow: --flow glow "
                       f"(got --flow {args.flow})")
    if args.objective != "likelihood":
        raise CLIError("image data train by likelihood only (no --objective flow-matching)")
    size, k = datasets.IMAGES[args.data]
    levels = args.levels or (2 if size == 8 else 3)
    batch_size = args.batch_size or 64
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    if args.conditional and args.resume:
        raise CLIError("--conditional trains without checkpoints; --resume is not available")
    try:
        train_int, train_y = datasets.digits("train", seed=0, size=size, labels=True)
        test_int, test_y = datasets.digits("test", seed=0, size=size, labels=True)
    except ImportError as e:
        raise CLIError(str(e)) from e
    out = args.out or os.path.join("runs", args.data)
    os.makedirs(out, exist_ok=True)
    flow = flows.get_builder("glow")(
        (1, size, size), levels=levels, steps_per_level=args.steps_per_level,
        hidden_channels=args.hidden_channels, factor_out=args.factor_out,
        dequantize=args.dequantize, k=k, context_dim=10 if args.conditional else 0).to(device)
    train, test = as_data(train_int, flow), as_data(test_int, flow, "test")
    checkpoint = os.path.join(out, "model.pt")
    if args.conditional:
        history = _fit_conditional(flow, train, train_y.to(device), args, batch_size)
    else:
        history = fit_density(flow, train, num_steps=args.steps, batch_size=batch_size,
                              optim=pyro.optim.Adam({"lr": args.lr}), checkpoint=checkpoint,
                              resume=args.resume, progress=not args.quiet, seed=args.seed)
    torch.manual_seed(args.seed)  # the reported bounds draw their noise reproducibly
    if args.conditional:  # -log P(x | class), scored class by class
        eye = torch.eye(10, dtype=train.dtype, device=device)
        test_y = test_y.to(device)
        bpd = torch.cat([bits_per_dim(flow.condition(eye[c]), test[test_y == c],
                                      per_example=True) for c in range(10)]).mean().item()
        iw = torch.cat([iw_bits_per_dim(flow.condition(eye[c]), test[test_y == c],
                                        num_samples=args.iw_samples, per_example=True)
                        for c in range(10)]).mean().item()
    else:
        bpd = bits_per_dim(flow, test)
        iw = iw_bits_per_dim(flow, test, num_samples=args.iw_samples)
    baseline = categorical_bits_per_dim(train_int, test_int, k)
    nats = size * size * math.log(2)  # nats per image in one bit per dimension
    val = None if args.conditional else history["best_val_nll"]
    metrics = {"data": args.data, "flow": "glow", "conditional": bool(args.conditional),
               "factor_out": args.factor_out,
               "dequantize": args.dequantize, "levels": levels, "k": k,
               "steps": len(history["loss"]), "best_step": history["best_step"],
               "val_nll": val, "stopped": history["stopped"],
               "test_bits_per_dim": bpd, "test_iw_bits_per_dim": iw,
               "iw_samples": args.iw_samples, "categorical_bits_per_dim": baseline,
               "n_train": history["n_train"], "n_val": history["n_val"], "n_test": len(test),
               "parameters": sum(p.numel() for p in flow.parameters()),
               "units": "bits per dimension (an upper bound: dequantization)"}
    _save_final(flow, checkpoint, metrics)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    plots.plot_training(history, os.path.join(out, "loss.png"), units="nats per image",
                        title=f"glow ({args.factor_out}) on {args.data}: test {bpd:.3f} bits/dim"
                              + ("" if val is None else f" ({val / nats:.3f} on validation)"))
    with torch.no_grad():
        if args.conditional:  # one row per digit class
            samples = torch.cat([flow.condition(eye[c]).sample((10,)) for c in range(10)]).cpu()
        else:
            samples = flow.sample((40,)).cpu()
    what = "class-conditional glow" if args.conditional else "glow"
    plots.plot_images(samples, os.path.join(out, "samples.png"), ncol=10, vmax=k - 1,
                      title=f"{what} ({args.factor_out}) samples, {args.data}",
                      row_labels=range(10) if args.conditional else None)
    if args.conditional:
        print("bits/dim below are of x given its class, -log P(x | c) / (D ln 2)")
    print(f"test bits/dim (dequantization bound, upper bound): {bpd:.4f}")
    print(f"test bits/dim (importance-weighted, K={args.iw_samples}): {iw:.4f}")
    print(f"per-pixel categorical baseline: {baseline:.4f} bits/dim")
    if val is not None:
        print(f"best validation at step {history['best_step']}")
    if history["stopped"]:
        print(f"note: {history['stopped']}")
    print(f"wrote {out}/: model.pt, metrics.json, loss.png, samples.png")


def _fit_conditional(flow, train, labels, args, batch_size):
    """Adam on ``-log p(x | one_hot(class))`` over minibatches (a plain loop: ``fit_density``
    takes no contexts); returns a ``fit_density``-style history without validation."""
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(flow.parameters(), lr=args.lr)
    eye = torch.eye(10, dtype=train.dtype, device=train.device)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    flow.train()
    for step in tqdm(range(args.steps), disable=args.quiet, desc="fit", mininterval=0.5):
        idx = torch.randint(0, len(train), (min(batch_size, len(train)),), generator=gen)
        idx = idx.to(train.device)
        loss = -flow.condition(eye[labels[idx]]).log_prob(train[idx]).mean()
        if not torch.isfinite(loss):
            raise CLIError(f"the loss became {loss.item()} at step {step}; try a smaller --lr")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    flow.eval()
    return {"loss": losses, "val_step": [], "val_nll": [], "best_step": args.steps,
            "best_val_nll": math.nan, "stopped": None, "n_train": len(train), "n_val": 0}


def _checkpoint_step(checkpoint):
    """The step a resumable checkpoint reached (None when there is none)."""
    from . import io

    if not os.path.exists(checkpoint):
        return None
    return io.read(checkpoint).get("step")


def _save_final(flow, checkpoint, metrics):
    """Writes the final (best) model into the checkpoint, keeping the fields ``--resume``
    needs (fit_density's record already holds the same best state)."""
    from . import io

    record = io.read(checkpoint) if os.path.exists(checkpoint) else {}
    record.update(io.to_record(flow), metrics=metrics)
    io.atomic_save(record, checkpoint)


def cmd_sample(args):
    import numpy as np
    import torch

    from . import io

    _no_directory(args.checkpoint, "model file")
    flow = io.load(args.checkpoint)  # in data units (old checkpoints are converted)
    flow.eval()
    torch.manual_seed(args.seed)
    with torch.no_grad():
        x = flow.sample((args.n,))
    x = x.cpu().numpy()
    if args.output.endswith(".npy"):
        np.save(args.output, x)  # (n, *event_shape): images keep (C, H, W)
    else:
        np.savetxt(args.output, x.reshape(args.n, -1), delimiter=",", fmt="%.6g")  # a row each
    print(f"wrote {args.n} samples to {args.output}")


def _load_model(spec):
    """The callable named by ``path/to/file.py:function`` (default function ``model``)."""
    import importlib.util

    path, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "model")
    if not path or not name:
        raise CLIError(f"expected a model as path/to/file.py:function, got {spec!r}")
    _no_directory(path, "model file")
    if not os.path.isfile(path):
        raise CLIError(f"model file {path!r} does not exist")
    module_name = "_pyro_flows_user_" + os.path.splitext(os.path.basename(path))[0]
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file failed to import: report its error in one line
        raise CLIError(f"could not import {path!r}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
    fn = getattr(module, name, None)
    if fn is None:
        found = sorted(k for k, v in vars(module).items() if callable(v) and not
                       k.startswith("_") and getattr(v, "__module__", None) == module_name)
        raise CLIError(f"{path!r} has no function {name!r}"
                       + (f" (found: {', '.join(found)})" if found else ""))
    if not callable(fn):
        raise CLIError(f"{path}:{name} is not callable")
    return fn


def _trace_model(model):
    """Runs the model once so structural errors become one clear line."""
    from pyro import poutine

    try:
        with poutine.block():
            trace = poutine.trace(model).get_trace()
    except Exception as e:
        raise CLIError(f"the model failed to run with no arguments: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from e
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample"
              and not s["is_observed"] and type(s["fn"]).__name__ != "_Subsample"]
    if not latent:
        raise CLIError("the model has no latent sample sites: nothing to infer")
    discrete = [n for n in latent if trace.nodes[n]["fn"].support.is_discrete]
    if discrete:
        raise CLIError(f"the model has discrete latent sites ({', '.join(discrete)}); "
                       "AutoFlowGuide needs continuous ones (enumerate them out)")
    return latent


def cmd_infer(args):
    import pyro
    import torch
    from tqdm.auto import tqdm

    from .flows import FLOWS
    from .infer import AutoFlowGuide, neutra_mcmc

    if args.flow not in FLOWS and args.flow != "none":
        raise CLIError(f"unknown flow {args.flow!r}; expected 'none' (site couplings only) or "
                       f"one of: {', '.join(sorted(FLOWS))}")
    if args.neutra and (args.num_samples < 1 or args.warmup < 0):
        raise CLIError("--num-samples must be >= 1 and --warmup >= 0")
    model = _load_model(args.model)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    latent = _trace_model(model)
    out = args.out or os.path.join("runs", "infer_" + _model_stem(args.model))
    os.makedirs(out, exist_ok=True)

    guide = AutoFlowGuide(model, flow=() if args.flow == "none" else args.flow, stl=args.stl)
    # a sticking-the-landing guide clips its own gradient elements at 1 (see AutoFlowGuide)
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1 / args.steps),
                                    "clip_norm": 10.0})
    svi = pyro.infer.SVI(model, guide, optim, _elbo(args.jit))
    losses = []
    bar = tqdm(range(args.steps), desc="SVI", disable=args.quiet, mininterval=0.5)
    for step in bar:
        try:
            loss = svi.step()
        except Exception as error:  # a model torch.jit cannot trace: train it eagerly
            if not (args.jit and step == 0):
                raise
            print(f"warning: --jit: the model does not trace ({_one_line(error)}); "
                  "training eagerly instead")
            svi = pyro.infer.SVI(model, guide, optim, _elbo(False))
            loss = svi.step()
        if not math.isfinite(loss):
            raise CLIError(f"the ELBO became {loss} at step {step}; try a smaller --lr")
        losses.append(loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()

    from . import diagnostics

    est = diagnostics.log_evidence(model, guide, num_samples=args.diag_samples)
    tail = losses[-max(1, len(losses) // 10):]
    print(f"flow: {args.flow}  latent sites: {', '.join(latent)}  (dimension {guide.latent_dim})")
    print(f"ELBO (last 10% of steps, mean): {-sum(tail) / len(tail):.4f}")
    print(f"ELBO ({args.diag_samples} draws): {est['elbo']:.4f} +- {est['elbo_se']:.4f}")
    print(f"importance-weighted log evidence: {est['log_evidence']:.4f} +- "
          f"{est['log_evidence_se']:.4f} (s.e., {args.diag_samples} draws"
          f"{'; unreliable when k-hat > 0.5' if est['khat'] > 0.5 else ''})")
    verdict = ("< 0.5: no sign of too-light tails" if est["khat"] < 0.5 else
               "0.5-0.7: usable with care" if est["khat"] < 0.7 else
               "> 0.7: do not trust the guide's draws")
    print(f"PSIS k-hat: {est['khat']:.3f} ({verdict}); {diagnostics.KHAT_SCOPE}")

    warned = []
    if est["khat"] > 0.7 and not args.neutra:
        warned.append("the guide's k-hat is above 0.7: its draws (the summary below) may be "
                      "far from the posterior; train longer, or check with --neutra")
        print(f"warning: {warned[-1]}")
    if args.neutra:
        import warnings

        from .infer.neutra import guide_advice

        advice = guide_advice(est["khat"], cli=True, flow=args.flow)
        if advice:
            print(f"warning: {advice}")
            warned.append(advice)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", diagnostics.DiagnosticWarning)
            result = neutra_mcmc(model, guide, num_samples=args.num_samples,
                                 warmup_steps=args.warmup, num_chains=args.chains,
                                 seed=args.seed, max_tree_depth=args.max_tree_depth,
                                 progress=not args.quiet, check_guide=False)
        for w in caught:
            if issubclass(w.category, diagnostics.DiagnosticWarning):
                message = str(w.message).removeprefix("neutra_mcmc: ")
                print(f"warning: {message}")
                warned.append(message)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        idata, source = result.idata, "NeuTra NUTS"
        print(f"NeuTra NUTS: {args.chains} chain{'s' if args.chains > 1 else ''} x "
              f"{args.num_samples} draws, {result.divergences} divergences, "
              f"{result.seconds:.1f} s")
    else:
        idata = diagnostics.to_inference_data(None, model=model, guide=guide,
                                              num_samples=args.num_samples)
        source = "guide"
    import arviz as az

    summary = az.summary(idata, kind="all" if args.neutra else "stats")
    print(f"posterior summary ({source}):")
    print(summary.to_string())
    _plot_inference(idata, out)
    metrics = {"model": args.model, "flow": args.flow, "steps": args.steps, "jit": args.jit,
               "elbo": est["elbo"], "log_evidence": est["log_evidence"],
               "log_evidence_se": est["log_evidence_se"], "khat": est["khat"],
               "neutra": bool(args.neutra), "warnings": warned}
    if args.neutra:
        metrics.update(chains=args.chains, divergences=result.divergences)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    summary.to_csv(os.path.join(out, "summary.csv"))
    print(f"wrote {out}/: trace.png, posterior.png, summary.csv, metrics.json")
    if warned:
        print(f"warning: {len(warned)} diagnostic warning{'s' if len(warned) > 1 else ''} "
              "above: do not trust this summary as it stands")


def _elbo(jit):
    """Trace_ELBO, or its torch.jit-traced twin (the same estimator, 1.6-2.6x faster steps)."""
    import pyro

    return pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True) if jit else pyro.infer.Trace_ELBO()


def _model_stem(spec):
    path = spec.rpartition(":")[0] if ":" in spec else spec
    return os.path.splitext(os.path.basename(path))[0]


def _plot_inference(idata, out):
    import arviz as az
    import matplotlib.pyplot as plt

    # arviz draws with pyplot: switch to Agg for these figures only, then restore the
    # caller's backend (main() may run inside a notebook)
    backend = plt.get_backend()
    plt.switch_backend("Agg")
    try:
        _plot_inference_figures(az, plt, idata, out)
    finally:
        try:
            plt.switch_backend(backend)
        except ImportError:  # an interactive backend that cannot load here
            pass


def _plot_inference_figures(az, plt, idata, out):
    # at most 8 scalar panels keep the figures readable for models with many coordinates
    names = list(idata.posterior.data_vars)
    coords = {}
    for name in names:
        extra = [d for d in idata.posterior[name].dims if d not in ("chain", "draw")]
        for d in extra:
            coords[d] = idata.posterior[name][d].values[:4]
    az.plot_trace(idata, var_names=names, coords=coords, compact=True)
    plt.gcf().tight_layout()
    plt.savefig(os.path.join(out, "trace.png"), dpi=80)
    plt.close("all")
    az.plot_posterior(idata, var_names=names, coords=coords)
    plt.savefig(os.path.join(out, "posterior.png"), dpi=80)
    plt.close("all")


def build_parser():
    from .flows import FLOWS
    from .infer.guide import default_flow

    parser = argparse.ArgumentParser(prog="pyro-flows", description="Normalizing flows for Pyro.",
                                     epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a density model to a toy set or a data file")
    fit.add_argument("data", help="toy set name (moons, checkerboard, 8gaussians, spirals, "
                                  "pinwheel, rings), a .csv/.npy/.npz file, or an image set "
                                  "(digits: scikit-learn's 8x8 digits; digits16: upsampled)")
    fit.add_argument("--flow", default="realnvp", help=f"one of: {', '.join(sorted(FLOWS))}")
    fit.add_argument("--steps", type=int, default=2000,
                     help="total optimisation steps; with --resume training continues up to "
                          "this total (it is not a number of additional steps)")
    fit.add_argument("--batch-size", type=int, default=None,
                     help="minibatch size (default 512; 64 for image data)")
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--n", "--num-points", dest="n", type=int, default=20_000,
                     help="toy training points (spell it --num-points after torchrun, whose "
                          "own parser takes --n for an ambiguous abbreviation)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default="cpu")
    fit.add_argument("--out", default=None, help="output folder (default runs/<data>)")
    fit.add_argument("--resume", action="store_true",
                     help="continue from <out>/model.pt (parameters, optimizer, RNG and data "
                          "order) up to --steps in total; the same --flow and data are required")
    fit.add_argument("--threads", type=int, default=1,
                     help="torch threads (1 is fastest for small flows on shared machines)")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument("--nproc", type=int, default=1,
                     help="train data-parallel in N local processes (torch.distributed, gloo "
                          "on CPU); the same as torchrun --nproc-per-node N -m "
                          "pyro_flows_ext.cli fit ...; each uses --threads threads")
    fit.add_argument("--objective", choices=("likelihood", "flow-matching"),
                     default="likelihood", help="maximum likelihood, or flow matching (a "
                     "CNF flow such as --flow ffjord: no ODE solve per step)")
    images = fit.add_argument_group("image data (digits, digits16; --flow glow)")
    images.add_argument("--factor-out", choices=("slice", "maxpool"), default="slice",
                        help="multi-scale factor-out between Glow's scales")
    images.add_argument("--dequantize", choices=("uniform", "variational"), default="uniform")
    images.add_argument("--levels", type=int, default=None,
                        help="Glow scales (default 2 for 8x8 digits, 3 for digits16)")
    images.add_argument("--steps-per-level", type=int, default=4)
    images.add_argument("--hidden-channels", type=int, default=64)
    images.add_argument("--iw-samples", type=int, default=50,
                        help="K of the importance-weighted test bits/dim")
    images.add_argument("--conditional", action="store_true",
                        help="a class-conditional Glow (one-hot digit class as context; "
                             "samples.png has one row per class)")
    fit.set_defaults(run=cmd_fit)
    sample = sub.add_parser("sample", help="draw samples from a saved flow")
    sample.add_argument("checkpoint")
    sample.add_argument("-n", type=int, default=1000)
    sample.add_argument("-o", "--output", default="samples.csv", help=".csv or .npy")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(run=cmd_sample)
    infer = sub.add_parser("infer", help="SVI with a flow guide on a Pyro model, optional NeuTra")
    infer.add_argument("model", help="path/to/model.py:function (a model taking no arguments)")
    infer.add_argument("--flow", default=default_flow(),
                       help=f"guide flow: 'none' (site couplings and location-scale only) or "
                            f"one of: {', '.join(sorted(FLOWS))}")
    infer.add_argument("--stl", action=argparse.BooleanOptionalAction, default=None,
                       help="force sticking-the-landing gradients (with the guide's gradient "
                            "clip) on or off; default: on for affine guides (--flow none, "
                            "realnvp), off for splines and IAF")
    infer.add_argument("--steps", type=int, default=2000)
    infer.add_argument("--lr", type=float, default=1e-2)
    infer.add_argument("--jit", action="store_true",
                       help="train the guide with Pyro's JitTrace_ELBO (same objective, "
                            "faster steps; models whose structure changes between calls "
                            "fall back to eager training)")
    infer.add_argument("--neutra", action="store_true", help="then NeuTra NUTS with the guide")
    infer.add_argument("--num-samples", type=int, default=1000,
                       help="NUTS draws (or guide draws for the summary)")
    infer.add_argument("--warmup", type=int, default=500, help="NUTS warmup steps")
    infer.add_argument("--chains", type=int, default=2,
                       help="NUTS chains, one after another (R-hat needs 2 or more)")
    infer.add_argument("--max-tree-depth", type=int, default=10, help="NUTS tree depth")
    infer.add_argument("--diag-samples", type=int, default=4000,
                       help="guide draws for k-hat and the evidence estimate (k-hat from a few "
                            "hundred draws is noisy: 0.3-0.9 for one funnel guide at 500)")
    infer.add_argument("--threads", type=int, default=1, help="torch threads")
    infer.add_argument("--seed", type=int, default=0)
    infer.add_argument("--out", default=None, help="output folder (default runs/infer_<file>)")
    infer.add_argument("--quiet", action="store_true", help="no progress bars")
    infer.set_defaults(run=cmd_infer)
    return parser


def _check(args):
    for name in ("steps", "batch_size", "n", "num_samples", "diag_samples", "threads",
                 "max_tree_depth", "chains", "levels", "steps_per_level", "hidden_channels",
                 "iw_samples", "nproc"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, "
                           f"got {getattr(args, name)}")
    if not 0 < getattr(args, "lr", 1.0) < math.inf:
        raise CLIError(f"--lr must be positive and finite, got {args.lr}")


def _global_state():
    """Torch threads and the global RNGs the commands set; ``main`` restores them on return, so
    calling ``main([...])`` in-process (tests, notebooks) leaves the caller's settings alone."""
    import random

    import numpy as np
    import torch

    return torch.get_num_threads(), torch.get_rng_state(), np.random.get_state(), random.getstate()


def _restore_global_state(state):
    import random

    import numpy as np
    import torch

    threads, torch_rng, numpy_rng, python_rng = state
    torch.set_num_threads(threads)
    torch.set_rng_state(torch_rng)
    np.random.set_state(numpy_rng)
    random.setstate(python_rng)


def _start_distributed(args):
    """Joins torchrun's process group (its environment variables) for ``fit``; ``True`` when
    this call started it. ``--nproc`` must then be 1 or torchrun's world size."""
    if args.command != "fit":
        return False
    from .distributed import get_world_size, init_from_env

    started = init_from_env(args.device)
    if args.nproc > 1 and get_world_size() > 1 and args.nproc != get_world_size():
        raise CLIError(f"--nproc {args.nproc} under torchrun with {get_world_size()} "
                       "processes: drop --nproc (torchrun sets the number of processes)")
    return started


def _rank_main(argv):
    """One process of ``--nproc``: the command itself, with the group already joined."""
    code = main(argv)
    if code:
        sys.exit(code)  # the launcher stops the other processes
    return code


def _launch_nproc(args, argv):
    """Runs the command in ``--nproc`` local processes (spawned, gloo); their exit code."""
    import logging

    import torch.multiprocessing as mp

    from .distributed import launch

    # a failed rank stops the others; torch's "Terminating process ..." line is noise here
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        codes = launch(_rank_main, args.nproc, list(sys.argv[1:] if argv is None else argv),
                       threads=args.threads, timeout=24 * 3600)
    except mp.ProcessExitedException as e:  # a rank failed: it printed its error itself
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(f"pyro-flows: error: a training process failed: "
              f"{_one_line(str(e).strip().splitlines()[-1])}", file=sys.stderr)
        return 1
    return max(codes)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    saved = _global_state()
    started = False
    try:
        _check(args)
        if getattr(args, "nproc", 1) > 1 and not _in_process_group() and not _torchrun_env():
            return _launch_nproc(args, argv)
        started = _start_distributed(args)
        args.run(args)
    except (CLIError, ValueError, OSError, TypeError) as e:  # OSError: the user's paths
        print(f"pyro-flows: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-flows: interrupted", file=sys.stderr)
        return 130
    finally:
        _restore_global_state(saved)
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _in_process_group():
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _torchrun_env():
    from .distributed import TORCHRUN_VARS

    return all(v in os.environ for v in TORCHRUN_VARS)


def _one_line(error):
    text = " ".join(str(error).split())
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
