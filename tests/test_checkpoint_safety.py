"""Loading a file never runs its code: checkpoints are read with weights_only=True, a crafted file is
refused with a message that says why (and the code in it does not run), RNG states survive a safe
load exactly, and a trusted old checkpoint converts once into a safe one."""

import ast
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

np = pytest.importorskip("numpy")

from inplace_abn import cli  # noqa: E402
from inplace_abn.training.checkpoint import (  # noqa: E402
    CheckpointError,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
)


class HiddenCode:
    """Unpickling this calls os.mkdir(marker): the way a crafted model file runs a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def crafted_files(tmp_path):
    marker = tmp_path / "code_ran"
    zipped = tmp_path / "model.pt"
    torch.save({"model": {"weight": torch.ones(3)}, "extra": HiddenCode(marker)}, zipped)
    files = [zipped]
    for protocol in (2, pickle.HIGHEST_PROTOCOL):  # a bare pickle, as older torch.save / pickle.dump write
        path = tmp_path / f"model_protocol{protocol}.pkl"
        with open(path, "wb") as file:
            pickle.dump({"state_dict": HiddenCode(marker)}, file, protocol=protocol)
        files.append(path)
    return marker, files


def test_crafted_files_are_refused_and_their_code_does_not_run(tmp_path):
    marker, files = crafted_files(tmp_path)
    for path in files:
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(str(path))
        message = str(caught.value)
        assert not marker.exists(), f"loading {path.name} ran its code"
        assert message.startswith(f"refused to load {path}: ") and "could run code" in message
        assert "inplace-abn convert-checkpoint --trust" in message
    assert "posix.mkdir" in str(pytest.raises(CheckpointError, load_checkpoint, str(files[0])).value)
    # the files are real attacks: the unsafe load this replaces runs the code
    torch.load(files[0], weights_only=False)
    assert marker.is_dir()


def test_evaluate_and_resume_refuse_a_crafted_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")
    marker, files = crafted_files(tmp_path)
    assert cli.main(["evaluate", str(files[0]), "--quiet"]) != 0
    assert "refused to load" in capsys.readouterr().err and not marker.exists()
    code = cli.main(["train", "--network", "deeplabv3_resnet18", "--width", "0.125", "--synthetic-samples", "4",
                     "--synthetic-size", "32x64", "--crop", "32x64", "--batch-size", "2", "--steps", "1",
                     "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet",
                     "--resume", str(files[0])])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "refused to load" in err and "Traceback" not in err
    assert not marker.exists()


def test_damaged_checkpoints_say_so(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint({"weights": torch.randn(100)}, str(good))
    data = good.read_bytes()
    for name, content in (("empty.pt", b""), ("text.pt", b"not a checkpoint at all"),
                          ("truncated.pt", data[: len(data) // 2])):  # fmt: skip
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"(cannot read checkpoint|refused to load) .*{name}.*damaged"):
            load_checkpoint(str(tmp_path / name))


def _draws():
    return (random.random(), random.getrandbits(64), np.random.random(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist())  # fmt: skip


def test_rng_states_survive_a_weights_only_load(tmp_path):
    random.seed(7)
    np.random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state: it must round-trip too
    torch.manual_seed(7)
    path = str(tmp_path / "rng.pt")
    save_checkpoint({"rng": rng_states()}, path)
    expected = _draws()
    _draws()  # move every generator on
    set_rng_states(load_checkpoint(path)["rng"])
    assert _draws() == expected


def _legacy_checkpoint(path):
    """A checkpoint as the previous version wrote it: NumPy's state tuple (an ndarray inside)."""
    np.random.seed(3)
    state = {
        "step": 5,
        "model": {"weight": torch.randn(4)},
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy": np.random.get_state()},
        "class_weights": np.arange(4, dtype=np.float32),
    }
    torch.save(state, path)
    return state


def test_convert_checkpoint_makes_a_trusted_old_file_load_safely(tmp_path, capsys):
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    legacy = _legacy_checkpoint(old)
    with pytest.raises(CheckpointError, match="refused to load .*numpy"):
        load_checkpoint(str(old))
    assert cli.main(["convert-checkpoint", str(old), str(new)]) == 2  # without --trust: nothing read
    assert "--trust" in capsys.readouterr().err and not new.exists()

    assert cli.main(["convert-checkpoint", "--trust", str(old), str(new)]) == 0
    converted = load_checkpoint(str(new))
    assert converted["step"] == 5 and torch.equal(converted["model"]["weight"], legacy["model"]["weight"])
    assert torch.equal(converted["class_weights"], torch.arange(4, dtype=torch.float32))
    np.random.set_state(legacy["rng"]["numpy"])
    expected = np.random.random(5)
    np.random.seed(99)
    set_rng_states(converted["rng"])
    assert np.random.random(5).tolist() == expected.tolist()


def test_convert_checkpoint_names_what_it_cannot_convert(tmp_path, capsys):
    import argparse
    import collections

    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save({"model": collections.OrderedDict(w=torch.ones(1)), "args": [argparse.Namespace(lr=0.1)]}, old)
    assert cli.main(["convert-checkpoint", "--trust", str(old), str(new)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint['args'][0] is of type argparse.Namespace" in err and not new.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    """A static guard: each torch.load call passes weights_only=True, but the one trusted conversion."""
    package = Path(__file__).resolve().parents[1] / "inplace_abn"
    trusted = {package / "tools" / "convert_checkpoint.py"}
    calls = []
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":  # fmt: skip
                flags = {k.arg: k.value for k in node.keywords}
                safe = isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True
                calls.append(source)
                assert safe or source in trusted, f"{source}:{node.lineno}: torch.load without weights_only=True"
    assert package / "training" / "checkpoint.py" in calls  # the guard sees the calls it is meant to see


def test_the_safe_loader_runs_nothing_in_a_fresh_process(tmp_path):
    """Nothing imported earlier (numpy, the test module) makes the refusal pass by accident."""
    marker, files = crafted_files(tmp_path)
    script = ("import sys\nfrom inplace_abn.training.checkpoint import load_checkpoint, CheckpointError\n"
              "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError:\n    print('refused')\n")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", script, str(files[0])], capture_output=True, text=True,
                            timeout=120, env=env)  # fmt: skip
    assert result.stdout.strip() == "refused", result.stderr[-2000:]
    assert not marker.exists()
