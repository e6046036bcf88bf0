import torch

from pyro_flows_ext.nn import MLP


def test_mlp_batch_shapes_and_zero_init():
    net = MLP(2, 3)
    assert net(torch.randn(4, 5, 2)).shape == (4, 5, 3)
    assert (net(torch.randn(6, 2)) == 0).all()
