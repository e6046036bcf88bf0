"""A fuzz pass over the CLI: malformed input files and bad arguments never give a raw
traceback. Each case runs ``pyro_flows_ext.cli.main([...])`` in-process and must return 1 or
2 (or exit 2 from argparse) with a short message on stderr that names the problem, and no
``Traceback``. One case also runs as a subprocess, so the installed entry point's behaviour
(exit status, stderr) is checked end to end.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_flows_ext import cli


def _rows(text, n=30):
    return "\n".join([text] * n) + "\n"


def _write(path, content):
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content)
    return str(path)


# name -> (files to create: {name: content or a callable(path)}, argv with {tmp} for the
# folder, the expected words in the one-line message)
def _npy_object(path):
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _npz_empty(path):
    np.savez(path)


def _npz_two(path):
    np.savez(path, a=np.zeros((30, 2)), b=np.ones((30, 2)))


def _npy_3d(path):
    np.save(path, np.zeros((30, 2, 2)))


def _npy_strings(path):
    np.save(path, np.array([["a", "b"]] * 30))


def _tensor_pt(path):
    torch.save(torch.zeros(3), path)


def _dict_pt(path):
    torch.save({"hello": 1}, path)


def _mkdir(path):
    os.makedirs(path)


MODEL_OK = "import pyro, pyro.distributions as dist\n" \
    "def model():\n    pyro.sample('z', dist.Normal(0., 1.))\n"

FIT = ["fit", "--steps", "2", "--quiet", "--out", "{tmp}/out"]
INFER = ["infer", "--flow", "none", "--steps", "2", "--quiet"]

CASES = {
    # malformed data files
    "ragged rows": ({"d.csv": "1,2\n3\n4,5,6\n" * 10}, FIT + ["{tmp}/d.csv"], "could not read"),
    "text cells": ({"d.csv": "x,y\n" + _rows("1,abc")}, FIT + ["{tmp}/d.csv"], "could not read"),
    "header only": ({"d.csv": "x,y\n"}, FIT + ["{tmp}/d.csv"], "rows"),
    "empty file": ({"d.csv": ""}, FIT + ["{tmp}/d.csv"], "d.csv"),
    "single column": ({"d.csv": "\n".join(str(i * 0.37 % 1) for i in range(40)) + "\n"},
                      FIT + ["{tmp}/d.csv"], "--flow nsf"),
    "1e308 values": ({"d.csv": _rows("1e308,1")}, FIT + ["{tmp}/d.csv"], "float32"),
    "inf values": ({"d.csv": _rows("1,2") + "inf,1\n"}, FIT + ["{tmp}/d.csv"], "infinite"),
    "NaN values": ({"d.csv": _rows("1,2") + "nan,1\n"}, FIT + ["{tmp}/d.csv"], "NaN"),
    "binary garbage": ({"d.csv": bytes(range(256)) * 8}, FIT + ["{tmp}/d.csv"], "d.csv"),
    "too few rows": ({"d.csv": "1,2\n3,4\n5,7\n"}, FIT + ["{tmp}/d.csv"], "at least 20"),
    "directory as data": ({"d.csv": _mkdir}, FIT + ["{tmp}/d.csv"], "is a folder"),
    "object .npy": ({"d.npy": _npy_object}, FIT + ["{tmp}/d.npy"], "d.npy"),
    ".npz without arrays": ({"d.npz": _npz_empty}, FIT + ["{tmp}/d.npz"], "d.npz"),
    ".npz with two arrays": ({"d.npz": _npz_two}, FIT + ["{tmp}/d.npz"], "'data'"),
    "3-D .npy": ({"d.npy": _npy_3d}, FIT + ["{tmp}/d.npy"], "(N, D)"),
    "string .npy": ({"d.npy": _npy_strings}, FIT + ["{tmp}/d.npy"], "numeric"),
    "garbage .npy": ({"d.npy": b"\x93NUMPY garbage" * 10}, FIT + ["{tmp}/d.npy"], "d.npy"),
    "garbage .npz": ({"d.npz": b"PK\x03\x04 garbage" * 10}, FIT + ["{tmp}/d.npz"], "d.npz"),
    "wrong extension": ({"d.txt": _rows("1,2")}, FIT + ["{tmp}/d.txt"], "extension"),
    "missing data file": ({}, FIT + ["{tmp}/nope.csv"], "neither a toy"),
    # bad arguments
    "negative steps": ({}, ["fit", "moons", "--steps", "-5"], "--steps"),
    "zero steps": ({}, ["fit", "moons", "--steps", "0"], "--steps"),
    "zero batch": ({}, ["fit", "moons", "--batch-size", "0"], "--batch-size"),
    "zero points": ({}, ["fit", "moons", "--n", "0"], "--n"),
    "zero threads": ({}, ["fit", "moons", "--threads", "0"], "--threads"),
    "unknown flow": ({}, FIT + ["moons", "--flow", "nosuch"], "unknown flow"),
    "unknown device": ({}, FIT + ["moons", "--device", "nosuch"], "device"),
    "absent cuda": ({}, FIT + ["moons", "--device", "cuda:7"], "device"),
    "bad --lr": ({}, ["fit", "moons", "--lr", "abc"], "--lr"),
    "negative --lr": ({}, ["fit", "moons", "--lr", "-1"], "--lr"),
    "nan --lr": ({}, ["fit", "moons", "--lr", "nan"], "--lr"),
    "inf --lr": ({}, ["fit", "moons", "--lr", "inf"], "--lr"),
    "non-integer steps": ({}, ["fit", "moons", "--steps", "1.5"], "--steps"),
    "out is a file": ({"out": "x"}, ["fit", "moons", "--steps", "2", "--quiet", "--out",
                                     "{tmp}/out"], "expected a folder"),
    "unknown command": ({}, ["frobnicate"], "invalid choice"),
    # sample
    "sample: missing model": ({}, ["sample", "{tmp}/none.pt", "-o", "{tmp}/s.csv"], "none.pt"),
    "sample: text model": ({"m.pt": "not a checkpoint"}, ["sample", "{tmp}/m.pt"], "m.pt"),
    "sample: garbage model": ({"m.pt": bytes(range(256))}, ["sample", "{tmp}/m.pt"], "m.pt"),
    "sample: tensor file": ({"m.pt": _tensor_pt}, ["sample", "{tmp}/m.pt"], "m.pt"),
    "sample: dict file": ({"m.pt": _dict_pt}, ["sample", "{tmp}/m.pt"], "m.pt"),
    "sample: directory": ({"m.pt": _mkdir}, ["sample", "{tmp}/m.pt"], "is a folder"),
    "sample: zero -n": ({}, ["sample", "{tmp}/m.pt", "-n", "0"], "-n"),
    # infer
    "infer: missing file": ({}, INFER + ["{tmp}/nofile.py:model"], "does not exist"),
    "infer: no function name": ({"m.py": MODEL_OK}, INFER + ["{tmp}/m.py:"], "expected"),
    "infer: missing function": ({"m.py": MODEL_OK}, INFER + ["{tmp}/m.py:nosuch"], "nosuch"),
    "infer: syntax error": ({"m.py": "def model(:\n"}, INFER + ["{tmp}/m.py:model"],
                            "could not import"),
    "infer: not callable": ({"m.py": "model = 3\n"}, INFER + ["{tmp}/m.py:model"],
                            "not callable"),
    "infer: model raises": ({"m.py": "def model():\n    raise KeyError('boom')\n"},
                            INFER + ["{tmp}/m.py:model"], "failed to run"),
    "infer: no latent sites": ({"m.py": "def model():\n    return 1\n"},
                               INFER + ["{tmp}/m.py:model"], "no latent"),
    "infer: directory": ({"m.py": _mkdir}, INFER + ["{tmp}/m.py:model"], "is a folder"),
    "infer: binary file": ({"m.py": bytes(range(256))}, INFER + ["{tmp}/m.py:model"],
                           "could not import"),
}


def _prepare(tmp_path, files, argv):
    for name, content in files.items():
        path = os.path.join(tmp_path, name)
        content(path) if callable(content) else _write(path, content)
    return [a.replace("{tmp}", str(tmp_path)) for a in argv]


def run_main(argv):
    """``(exit code, stderr)`` of ``cli.main(argv)`` in-process (argparse errors included)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: usage line(s) and "error: ..." with status 2
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_errors_are_one_line(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files, argv, expected = CASES[name]
    code, err = run_main(_prepare(tmp_path, files, argv))
    assert "Traceback" not in err, err
    assert code in (1, 2), (code, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    message = lines[-1]
    assert message.startswith(("pyro-flows: error:", "usage:", "pyro-flows fit: error:",
                               "pyro-flows sample: error:", "pyro-flows: error")) or \
        "error:" in message, err
    if not err.startswith("usage:"):  # ours: exactly one line
        assert len(lines) == 1, err
    assert expected.lower() in message.lower(), f"{expected!r} not in {message!r}"


def test_subprocess_gives_status_2_and_one_line(tmp_path):
    path = _write(tmp_path / "d.csv", "1,2\n3\n" * 20)
    proc = subprocess.run([sys.executable, "-m", "pyro_flows_ext.cli", "fit", path, "--steps",
                           "1", "--quiet", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "could not read" in proc.stderr
