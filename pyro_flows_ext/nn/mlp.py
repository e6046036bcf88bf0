"""A plain multilayer perceptron conditioner."""

from torch import nn


class MLP(nn.Sequential):
    r"""``in_dim -> hidden_dims -> out_dim`` with ReLU between layers.

    Args:
        in_dim: input size.
        out_dim: output size.
        hidden_dims: sizes of the hidden layers.
        activation: activation module class.
        zero_init: zero the last layer, so a conditioner starts at the identity map.
    Shapes: ``(*batch, in_dim) -> (*batch, out_dim)``.
    """

    def __init__(self, in_dim, out_dim, hidden_dims=(64, 64), activation=nn.ReLU, zero_init=True):
        sizes = [in_dim, *hidden_dims, out_dim]
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)
        if zero_init:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)

    def forward(self, x):
        # Flatten batch dims once: nn.Linear on 2-D inputs takes the fastest (addmm) path.
        batch = x.shape[:-1]
        y = super().forward(x.reshape(-1, x.shape[-1]))
        return y.reshape(batch + y.shape[-1:])

