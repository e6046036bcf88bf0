import torch

from pyro_flows_ext.nn import MLP


def test_mlp_batch_shapes_and_zero_init():
    net = MLP(2, 3)
    assert net(torch.randn(4, 5, 2)).shape == (4, 5, 3)
    assert (net(torch.randn(6, 2)) == 0).all()


def test_mlp_matches_its_layers_and_gradcheck():
    for activation in (torch.nn.ReLU, torch.nn.Tanh):
        net = MLP(3, 4, hidden_dims=(5, 6), activation=activation, zero_init=False).double()
        x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
        reference = torch.nn.Sequential.forward(net, x)  # the plain module chain
        torch.testing.assert_close(net(x), reference)
        assert torch.autograd.gradcheck(lambda x, *ps: net(x), (x, *net.parameters()))
