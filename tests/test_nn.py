import torch

from pyro_flows_ext.nn import MLP


def test_mlp_batch_shapes_and_zero_init():
    net = MLP(2, 3)
    assert net(torch.randn(4, 5, 2)).shape == (4, 5, 3)
    assert (net(torch.randn(6, 2)) == 0).all()
    assert len(list(net.parameters())) == 1  # one tensor: one Pyro optimizer per network


def test_mlp_matches_linear_layers_and_gradcheck():
    for activation in (torch.nn.ReLU, torch.nn.Tanh):
        net = MLP(3, 4, hidden_dims=(5, 6), activation=activation, zero_init=False).double()
        linears = [torch.nn.Linear(n_in, n_out).double() for n_out, n_in in net.shapes]
        with torch.no_grad():
            for lin, (w, b) in zip(linears, net.layers()):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        reference = torch.nn.Sequential(linears[0], activation(), linears[1], activation(),
                                        linears[2])
        x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
        torch.testing.assert_close(net(x), reference(x))
        assert torch.autograd.gradcheck(lambda x, p, net=net: net(x), (x, net.flat))


def test_mlp_without_hidden_layers_is_affine():
    net = MLP(3, 2, hidden_dims=(), zero_init=False)
    (w, b), = net.layers()
    x = torch.randn(5, 3)
    torch.testing.assert_close(net(x), x @ w.T + b)
