"""A plain multilayer perceptron conditioner, stored as one flat parameter tensor."""

import math

import torch
from torch import nn


class MLP(nn.Module):
    r"""``in_dim -> hidden_dims -> out_dim`` with ReLU (or ``activation``) between layers.

    All weights and biases live in one flat parameter, ``self.flat``: Pyro's optimizers keep
    one torch optimizer per parameter tensor, so a flow guide with one tensor per layer
    instead of six trains several milliseconds per step faster; the maths is that of
    ``nn.Linear`` layers (same default initialisation), each a view into ``flat``.

    Args:
        in_dim: input size.
        out_dim: output size.
        hidden_dims: sizes of the hidden layers.
        activation: activation module class.
        zero_init: zero the last layer, so a conditioner starts at the identity map.
        masks: optional fixed 0/1 ``(out, in)`` masks, one per layer, multiplied into the
            weights (MADE's masked layers).
        readout_scale: ``c`` in the last layer's ``c (W h + b)``. Adam moves every weight by
            about ``lr`` per step whatever its gradient's size, so a zero-initialised readout
            over ``H`` hidden units moves the output by about ``lr * H * E|h|`` per step;
            ``c = 1 / H`` (muP's readout scaling) makes that independent of the width (guides
            use it). Saved in the ``state_dict``.
    Shapes: ``(*batch, in_dim) -> (*batch, out_dim)``.
    """

    def __init__(self, in_dim, out_dim, hidden_dims=(64, 64), activation=nn.ReLU, zero_init=True,
                 masks=None, readout_scale=1.0):
        super().__init__()
        self.readout_scale = float(readout_scale)
        self.register_buffer("readout", torch.tensor(self.readout_scale))
        sizes = [in_dim, *hidden_dims, out_dim]
        self.shapes = [(n_out, n_in) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        chunks = []
        for i, (n_out, n_in) in enumerate(self.shapes):
            bound = 1.0 / math.sqrt(n_in) if n_in else 0.0  # nn.Linear's default
            if zero_init and i == len(self.shapes) - 1:
                bound = 0.0
            chunks.append(torch.empty(n_out * n_in + n_out).uniform_(-bound, bound))
        self.flat = nn.Parameter(torch.cat(chunks))
        self.activation = None if activation is nn.ReLU else activation()
        self.masked = masks is not None
        for i, mask in enumerate(masks or ()):
            if tuple(mask.shape) != self.shapes[i]:
                raise ValueError(f"mask {i} must have shape {self.shapes[i]}, "
                                 f"got {tuple(mask.shape)}")
            self.register_buffer(f"mask_{i}", mask.to(self.flat.dtype))

    def layers(self):
        """``[(weight, bias), ...]``: views into ``flat`` (``weight`` is ``(out, in)``).
        One ``split`` rather than a slice per tensor: its backward is one ``cat``, where each
        slice's backward zero-fills a ``flat``-sized gradient (a fifth of a small guide's
        step)."""
        parts = self.flat.split([n for n_out, n_in in self.shapes for n in (n_out * n_in, n_out)])
        return [(parts[2 * i].view(shape), parts[2 * i + 1])
                for i, shape in enumerate(self.shapes)]

    def forward(self, x):
        # Batch dims flattened once, addmm and in-place ReLU: at flow-conditioner sizes the
        # per-call overhead is a large share of the network's time.
        batch = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])
        layers = self.layers()
        last = len(layers) - 1
        for i, (weight, bias) in enumerate(layers):
            if self.masked:
                weight = weight * getattr(self, f"mask_{i}")
            if i < last:
                h = torch.addmm(bias, h, weight.t())
                h = h.relu_() if self.activation is None else self.activation(h)
            else:
                c = self.readout_scale
                h = torch.addmm(bias, h, weight.t(), beta=c, alpha=c)
        return h.reshape(batch + h.shape[-1:])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        key = prefix + "readout"
        if key not in state_dict:  # files saved before the scale was a buffer: keep the built one
            state_dict = {**state_dict, key: self.readout.detach().clone()}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)
        if not self.readout.is_meta:
            self.readout_scale = float(self.readout)
