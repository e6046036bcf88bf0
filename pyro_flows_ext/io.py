"""Saving and loading flows as builder name + arguments + ``state_dict``."""

import os
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


def to_record(flow):
    """The saveable description of a flow made by a builder of ``pfe.flows``."""
    spec = getattr(flow, "spec", None)
    if spec is None and hasattr(flow, "prototype_trace"):  # an autoguide: it needs its model
        raise ValueError(
            "save() stores flows; to save a guide use torch.save(guide.state_dict(), path), and "
            "to restore it build the guide for the same model, call guide() once (it traces "
            "the model) and guide.load_state_dict(torch.load(path))")
    if spec is None:
        raise ValueError(
            "save() stores a builder name and its arguments, and this flow was not made by a "
            "builder of pyro_flows_ext.flows; save its state_dict() with torch.save instead"
        )
    return {"format": FORMAT, "spec": spec, "state_dict": flow.state_dict()}


def from_record(record, path="<record>"):
    """Rebuilds a flow from :func:`to_record`'s output."""
    from .flows import get_builder

    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro_flows_ext model file (expected one written by "
                         "pyro_flows_ext.save or `pyro-flows fit`)")
    spec = record["spec"]
    kwargs = dict(spec["kwargs"])
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


def save(flow, path, **extra):
    """Saves ``flow`` (builder name, arguments and ``state_dict``) to ``path``; ``extra``
    entries (tensors, numbers, strings) are stored alongside."""
    atomic_save({**extra, **to_record(flow)}, path)


def read(path):
    """The raw record in a model file, with clear errors for a missing or foreign file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise ValueError(f"could not load model file {path!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''} (expected a file written "
                         "by pyro_flows_ext.save or `pyro-flows fit`)") from e


def load(path, map_location=None):
    """Loads a flow saved by :func:`save` (or a ``pyro-flows fit`` checkpoint)."""
    flow = from_record(read(path), path)
    return flow.to(map_location) if map_location is not None else flow
