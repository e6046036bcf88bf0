"""Importing every module of the package (what ``--doctest-modules`` collection does, and what
a user's ``import`` may do) has no global side effects: matplotlib's backend is left alone
and zuko is not imported (it turns torch's argument validation off globally). (pyplot does
get imported, by arviz in ``diagnostics``; it keeps the backend it is given.)"""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent("""
    import importlib, pkgutil, sys
    import torch
    import pyro_flows_ext
    validate = torch.distributions.Distribution._validate_args
    names = [m.name for m in pkgutil.walk_packages(pyro_flows_ext.__path__, "pyro_flows_ext.")]
    for name in names:
        importlib.import_module(name)
    import matplotlib
    assert matplotlib.get_backend().lower() == "svg", f"backend is {matplotlib.get_backend()}"
    assert "zuko" not in sys.modules, "importing the package imports zuko"
    assert torch.distributions.Distribution._validate_args == validate
    print(len(names), "modules")
""")


def test_importing_every_module_has_no_global_side_effects():
    env = {**os.environ, "MPLBACKEND": "svg", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[0]) > 20  # the walk found the package's modules
