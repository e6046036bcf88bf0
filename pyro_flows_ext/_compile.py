"""``torch.compile`` helpers: a compiled minibatch NLL with an eager fallback, and a graph-break
report (``torch._dynamo.explain``) for any function of tensors.

Inside a compiled graph the layers neither read nor write their pair caches
(:meth:`~pyro_flows_ext.core.FlowLayer.inverse_with_cache`), so a compiled ``log_prob`` is the
pure ``inverse_and_ladj`` chain of the flow; everything else is the eager code.
"""

import warnings

import torch

__all__ = ["compiled_nll", "graph_report"]


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def compiled_nll(flow, enabled=True, **compile_kwargs):
    r"""A function ``x -> -mean(flow.log_prob(x))`` (``x``: ``(B, *event_shape)``), compiled
    with ``torch.compile(..., dynamic=False, **compile_kwargs)`` when ``enabled``.

    Compilation happens on the first call (and again for a new batch shape). If it fails
    (an unsupported layer, no C++ compiler for inductor), a warning says why and every later
    call runs eagerly: training goes on with the same numbers, only slower. Errors of the
    eager code itself are raised as usual.
    """

    def nll(x):
        return -flow.log_prob(x).mean()

    if not enabled:
        return nll
    compile_kwargs.setdefault("dynamic", False)
    state = {"fn": torch.compile(nll, **compile_kwargs)}

    def call(x):
        if state["fn"] is nll:
            return nll(x)
        try:
            return state["fn"](x)
        except Exception as e:  # noqa: BLE001  (any compiler failure: fall back, see below)
            state["fn"] = nll
            out = nll(x)  # a genuine error of the model is raised here, eagerly
            warnings.warn(f"torch.compile failed ({_first_line(e)}); continuing without "
                          "compilation (compile=False gives the same numbers)", stacklevel=2)
            return out

    call.eager = nll
    return call


def graph_report(fn, *args, **kwargs):
    """``(graph_count, break_reasons)`` for ``fn(*args, **kwargs)`` from
    ``torch._dynamo.explain``: one graph and no reasons means no graph break. Each reason is
    ``"<first line of the reason> @ file:line function"``, deduplicated, with its count."""
    import collections

    import torch._dynamo as dynamo

    dynamo.reset()
    ex = dynamo.explain(fn)(*args, **kwargs)
    counts = collections.Counter()
    for b in ex.break_reasons:
        where = ""
        if b.user_stack:
            frame = b.user_stack[-1]
            where = f" @ {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
        counts[str(b.reason).strip().splitlines()[0][:160] + where] += 1
    dynamo.reset()
    return ex.graph_count, [f"{n}x {r}" for r, n in counts.items()]
