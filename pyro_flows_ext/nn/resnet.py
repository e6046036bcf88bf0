"""A small convolutional ResNet: the conditioner of image couplings and image slices."""

import torch
from torch import nn

__all__ = ["ConvResNet"]


class _Block(nn.Module):
    r""":math:`h + W_2 * \mathrm{relu}(W_1 * \mathrm{relu}(h))` with a 3x3 then a 1x1 convolution
    (Glow's conditioner shape)."""

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, h):
        return h + self.conv2(torch.relu(self.conv1(torch.relu(h))))


class ConvResNet(nn.Module):
    r"""``in_channels -> hidden_channels`` (3x3 convolution), ``num_blocks`` residual blocks,
    ReLU and a 3x3 convolution to ``out_channels``; zero padding keeps ``H, W``.

    The last convolution starts at zero (``zero_init``), so a coupling or a conditional
    density using it starts at the identity / at :math:`N(0, I)`.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        hidden_channels: width of the hidden feature maps.
        num_blocks: residual blocks (0: two plain convolutions).
        kernel_size: odd spatial kernel size of the 3x3 layers.
        zero_init: zero the last layer.
    Shapes: ``(*batch, in_channels, H, W) -> (*batch, out_channels, H, W)``.
    """

    def __init__(self, in_channels, out_channels, hidden_channels=64, num_blocks=1, kernel_size=3,
                 zero_init=True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (so H and W are kept), got {kernel_size}")
        pad = kernel_size // 2
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.head = nn.Conv2d(in_channels, hidden_channels, kernel_size, padding=pad)
        self.blocks = nn.Sequential(*[_Block(hidden_channels, kernel_size)
                                      for _ in range(num_blocks)])
        self.out = nn.Conv2d(hidden_channels, out_channels, kernel_size, padding=pad)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x):
        if x.dim() < 3 or x.shape[-3] != self.in_channels:
            raise ValueError(f"ConvResNet expects inputs of shape (..., {self.in_channels}, H, "
                             f"W), got {tuple(x.shape)}")
        batch = x.shape[:-3]
        h = self.head(x.reshape(-1, *x.shape[-3:]))
        h = self.out(torch.relu(self.blocks(h)))
        return h.reshape(*batch, *h.shape[-3:])
