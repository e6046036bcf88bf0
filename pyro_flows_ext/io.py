"""Saving and loading flows as builder name + arguments + ``state_dict``."""

import os
import pickle
import tempfile

import torch

FORMAT = "pyro_flows_ext/1"


def atomic_save(obj, path):
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _storable(value):
    """Whether ``value`` survives ``torch.load(weights_only=True)``: tensors, numbers,
    strings, ``None`` and lists, tuples and str-keyed dicts of them."""
    if value is None or type(value) in (bool, int, float, str) or torch.is_tensor(value):
        return True
    if type(value) in (list, tuple):  # exact types: subclasses do not load with weights_only
        return all(_storable(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _storable(v) for k, v in value.items())
    return False


def _guide_record(guide, store_model_args=True):
    """The saveable description of a trained :class:`~pyro_flows_ext.infer.AutoFlowGuide`:
    constructor arguments, latent sites' unconstrained shapes, model arguments (when
    storable) and ``state_dict``."""
    import warnings

    from .infer.guide import AutoFlowGuide

    if not isinstance(guide, AutoFlowGuide):
        raise ValueError(
            f"save() stores flows and AutoFlowGuides, not {type(guide).__name__}; save its "
            "torch.save(guide.state_dict(), path), and to restore it build the guide for the "
            "same model, call guide() once (it traces the model) and "
            "guide.load_state_dict(torch.load(path))")
    if guide.prototype_trace is None:
        raise ValueError("save(): the guide has not been set up yet (train it, or call "
                         "guide(*model_args) once): there is nothing to save")
    spec, kwargs = guide._flow_spec, dict(guide._flow_kwargs)
    if isinstance(spec, tuple) and not spec:
        flow = []  # flow=(): site couplings and LocScale only
    elif isinstance(spec, str) and _storable(kwargs):
        flow = spec
    else:  # a callable or a list of transforms: only the caller can rebuild it
        flow, kwargs = None, {}
    record = {"format": FORMAT, "guide": "AutoFlowGuide",
              "guide_args": {"flow": flow, "flow_kwargs": kwargs,
                             "init_scale": float(guide._init_scale),
                             "structured": guide._structured, "stl": guide.stl,
                             "full_rank": guide._full_rank, "clip": guide._clip,
                             "site_clamp": guide._site_clamp},
              "latent_shapes": {k: list(v) for k, v in guide._unconstrained_shapes.items()},
              "state_dict": guide.state_dict()}
    args, kwargs = getattr(guide, "_model_args", ((), {}))
    if store_model_args and (args or kwargs):
        if _storable(list(args)) and _storable(dict(kwargs)):
            record["model_args"], record["model_kwargs"] = list(args), dict(kwargs)
        else:
            warnings.warn("save(): the model arguments the guide was traced with are not "
                          "tensors, numbers or strings and were not stored; pass them to "
                          "pfe.load(path, model=model, model_args=(...))", stacklevel=3)
    return record


def to_record(flow, store_model_args=True):
    """The saveable description of a flow made by a builder of ``pfe.flows``, or of a trained
    :class:`~pyro_flows_ext.infer.AutoFlowGuide` (see :func:`save`)."""
    spec = getattr(flow, "spec", None)
    if spec is None and hasattr(flow, "prototype_trace"):  # an autoguide: rebuilt with its model
        return _guide_record(flow, store_model_args)
    if spec is None:
        raise ValueError(
            "save() stores a builder name and its arguments, and this flow was not made by a "
            "builder of pyro_flows_ext.flows; save its state_dict() with torch.save instead"
        )
    return {"format": FORMAT, "spec": spec, "state_dict": flow.state_dict()}


def _guide_from_record(record, path, model, model_args, model_kwargs, flow):
    """Rebuilds an AutoFlowGuide from :func:`_guide_record`'s output for ``model``."""
    from pyro import poutine

    from .infer.guide import GUIDE_LEGACY_ARGS, AutoFlowGuide

    if model is None:
        raise ValueError(f"{path} holds an AutoFlowGuide: pass the model it was trained for, "
                         "pfe.load(path, model=model)")
    # arguments a file written before they existed does not hold: the values of that time
    saved = {**GUIDE_LEGACY_ARGS, **record["guide_args"]}
    if flow is None and saved["flow"] is None:
        raise ValueError(f"{path} holds an AutoFlowGuide whose flow was a user callable or "
                         "list of transforms, which a file cannot rebuild: pass the same "
                         "flow, pfe.load(path, model=model, flow=...)")
    if flow is None:
        flow = tuple(saved["flow"]) if isinstance(saved["flow"], list) else saved["flow"]
        kwargs = dict(saved["flow_kwargs"])
    else:
        kwargs = {}
    args = tuple(record.get("model_args", ())) if model_args is None else tuple(model_args)
    kw = dict(record.get("model_kwargs", {})) if model_kwargs is None else dict(model_kwargs)
    guide = AutoFlowGuide(model, flow=flow, init_scale=saved["init_scale"],
                          structured=saved["structured"], stl=saved["stl"],
                          full_rank=saved["full_rank"], clip=saved["clip"],
                          site_clamp=saved["site_clamp"], **kwargs)
    try:
        # the prototype trace draws from the prior: keep the caller's RNG as it was
        with torch.random.fork_rng(), poutine.block():
            guide._setup_prototype(*args, **kw)
    except Exception as e:
        stored = "the stored" if "model_args" in record and model_args is None else "the given"
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"loading {path}: the model failed to run with {stored} model "
                         f"arguments ({why}); pass the arguments it was trained with, "
                         "pfe.load(path, model=model, model_args=(...), model_kwargs={...})"
                         ) from e
    shapes = {k: list(v) for k, v in guide._unconstrained_shapes.items()}
    if shapes != record["latent_shapes"]:
        expected = ", ".join(f"{k} {tuple(v)}" for k, v in record["latent_shapes"].items())
        found = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"{path} was saved for a model with latent sites {expected} "
                         f"(unconstrained shapes), but this model has {found}: load it with "
                         "the model (and model arguments) it was trained for")
    try:
        guide.load_state_dict(record["state_dict"])
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the guide its arguments build: "
                         f"{str(e).splitlines()[0]} (was it saved with another flow=?)") from e
    return guide


def from_record(record, path="<record>", model=None, model_args=None, model_kwargs=None,
                flow=None):
    """Rebuilds a flow (or, with ``model``, an AutoFlowGuide) from :func:`to_record`'s
    output."""
    from .flows import get_builder

    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro_flows_ext model file (expected one written by "
                         "pyro_flows_ext.save or `pyro-flows fit`)")
    if record.get("guide"):
        return _guide_from_record(record, path, model, model_args, model_kwargs, flow)
    if model is not None or model_args is not None or model_kwargs is not None or flow is not None:
        raise TypeError(f"{path} holds a flow, not a guide: model=, model_args=, model_kwargs= "
                        "and flow= are only for files that hold an AutoFlowGuide")
    spec = record["spec"]
    kwargs = dict(spec["kwargs"])
    from .flows import LEGACY_DEFAULTS

    for name, value in LEGACY_DEFAULTS.get(spec["flow"], {}).items():
        kwargs.setdefault(name, value)  # an argument the writing version did not have
    legacy = "gaussian_start" not in kwargs  # written before builders had data-side layers
    if legacy:
        # rebuild exactly the layers it had; a CLI fit's standardisation becomes a layer
        kwargs.update(gaussian_start=False, standardize="data_scale" in record)
    try:
        flow = get_builder(spec["flow"])(spec["dim"], **kwargs)
    except TypeError as e:
        raise ValueError(f"{path} was written for {spec['flow']}({spec['dim']}, ...) with "
                         f"arguments this version does not take ({e}); load it with the "
                         "version that wrote it") from e
    state = dict(record["state_dict"])
    if legacy and "data_scale" in record:
        layer = flow.transforms[-1]  # the Standardize layer, last in generative order
        prefix = next(n for n, m in flow.named_modules() if m is layer)
        state[f"{prefix}.loc"] = torch.as_tensor(record["data_loc"]).reshape(-1)
        state[f"{prefix}.scale"] = torch.as_tensor(record["data_scale"]).reshape(-1)
        state[f"{prefix}.initialized"] = torch.tensor(True)
    try:
        flow.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the flow its spec builds "
                         f"({spec['flow']}({spec['dim']}, ...)): "
                         f"{str(e).splitlines()[0]}") from e
    return flow


def save(flow, path, store_model_args=True, **extra):
    """Saves ``flow`` (builder name, arguments and ``state_dict``) to ``path``; ``extra``
    entries (tensors, numbers, strings) are stored alongside.

    A trained :class:`~pyro_flows_ext.infer.AutoFlowGuide` is saved too: its constructor
    arguments (builder name and keyword arguments, ``init_scale``, ``structured``, ``stl``,
    ``full_rank``, ``clip``; a file without the last two rebuilds them as they were before
    they existed, ``GUIDE_LEGACY_ARGS``;
    a user callable or list of transforms as flow is not stored and must be passed again to
    :func:`load`), the unconstrained shapes of its latent sites (checked on load), the model
    arguments it was traced with when they are tensors, numbers, strings or containers of
    them (``store_model_args=False`` leaves them out, e.g. for a large data set) and its
    ``state_dict``. ``init_loc_fn`` is not stored: the state holds the trained location.
    """
    atomic_save({**extra, **to_record(flow, store_model_args)}, path)


def read(path):
    """The raw record in a model file, with clear errors for a missing or foreign file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        reason = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, pickle.UnpicklingError):
            # torch's text advises weights_only=False, which cannot help a corrupt file and
            # would run a foreign file's code: keep only its first sentence
            reason = reason.split(". ")[0]
        raise ValueError(f"could not load model file {path!r}: {type(e).__name__}: {reason} "
                         "(expected a file written by pyro_flows_ext.save or `pyro-flows "
                         "fit`)") from e


def load(path, map_location=None, *, model=None, model_args=None, model_kwargs=None,
         flow=None):
    """Loads a flow saved by :func:`save` (or a ``pyro-flows fit`` checkpoint), or a saved
    :class:`~pyro_flows_ext.infer.AutoFlowGuide` for ``model``.

    For a guide, ``pfe.load(path, model=model)`` rebuilds it from its stored arguments, traces
    the model once (with the stored model arguments, or ``model_args`` / ``model_kwargs`` when
    given: they replace the stored ones; neither: the model is called without arguments),
    checks that the latent sites and their shapes are the saved ones and loads the trained
    state. No RNG draws leak out (the prototype trace runs under ``torch.random.fork_rng``).
    ``flow`` replaces the stored flow; it is needed when the guide's flow was a user callable
    or list of transforms (a file cannot hold one): pass the same one. Raises ``ValueError``
    for another model's latent structure, a missing ``model=`` or ``flow=``, or a model that
    fails with the arguments.
    """
    obj = from_record(read(path), path, model, model_args, model_kwargs, flow)
    return obj.to(map_location) if map_location is not None else obj
