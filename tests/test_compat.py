"""robustbench 1.1.1 imports and runs on a PyPI-only install through advgkl.compat.

Each check runs in a fresh interpreter, so `sys.modules` starts without `autoattack`.
"""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def run_python(code, **env):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def robustbench_calls():
    """Keyword names robustbench.eval passes to AutoAttack(...) and run_standard_evaluation(...)."""
    import importlib.util

    source = Path(importlib.util.find_spec("robustbench").submodule_search_locations[0], "eval.py")
    calls = {}
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in ("AutoAttack", "run_standard_evaluation"):
                calls[name] = (len(node.args), [k.arg for k in node.keywords])
    return calls


def test_robustbench_imports_and_builds_its_wide_resnet():
    out = run_python("""
        import sys, torch
        from advgkl.compat import import_robustbench
        rb = import_robustbench()
        from robustbench.model_zoo.architectures.wide_resnet import WideResNet
        net = WideResNet(depth=10, widen_factor=1, sub_block1=False).eval()
        print(sys.modules["autoattack"].__name__, tuple(net(torch.rand(2, 3, 32, 32)).shape))
    """)
    assert out.split() == ["advgkl.legacy_autoattack", "(2,", "10)"]


@pytest.mark.slow
def test_robustbench_eval_call_path_runs_on_a_tiny_model(tmp_path):
    calls = robustbench_calls()
    # The contract the adapter implements: if robustbench changes how it calls, this fails first.
    assert calls["AutoAttack"] == (1, ["norm", "eps", "version", "device", "log_path"])
    assert calls["run_standard_evaluation"] == (2, ["bs", "state_path"])
    log = tmp_path / "aa.log"
    out = run_python(f"""
        import torch
        from advgkl.compat import import_robustbench
        import_robustbench()
        from robustbench.eval import AutoAttack  # the name robustbench.eval itself uses
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
        x = torch.rand(16, 3, 8, 8)
        with torch.no_grad():
            y = model(x).argmax(1)  # every point clean-correct, so all four attacks can run
        eps = 8 / 255
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu",
                               log_path={str(log)!r})
        x_adv = adversary.run_standard_evaluation(x, y, bs=8, state_path=None)
        assert x_adv.shape == x.shape
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            print((model(x_adv).argmax(1) == y).float().mean().item())
    """)
    robust = float(out.strip().splitlines()[-1])
    assert 0.0 <= robust < 1.0  # a linear model at eps 8/255 loses some points
    text = log.read_text()
    assert "robust accuracy" in text and "apgd-ce" in text


def test_adapter_matches_pyautoattack_with_the_same_seed():
    run_python("""
        import torch, pyautoattack
        from advgkl import legacy_autoattack
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
        x = torch.rand(12, 3, 8, 8)
        with torch.no_grad():
            y = model(x).argmax(1)
        kw = dict(norm="Linf", eps=4 / 255, seed=0, device="cpu")
        ours = legacy_autoattack.AutoAttack(model, version="custom",
                                            attacks_to_run=["apgd-ce", "apgd-t"], verbose=False,
                                            **kw)
        x_ours, y_ours = ours.run_standard_evaluation(x, y, bs=5, return_labels=True)
        ref = pyautoattack.AutoAttack(model, version="custom", attacks=["apgd-ce", "apgd-t"], **kw)
        x_ref, y_ref = ref.run_standard_evaluation(x, y, batch_size=5)
        assert torch.equal(x_ours, x_ref) and torch.equal(y_ours, y_ref)
    """)


def test_a_real_autoattack_package_is_left_untouched(tmp_path):
    pkg = tmp_path / "autoattack"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("REAL = True\nclass AutoAttack: pass\n")
    (pkg / "state.py").write_text("class EvaluationState: pass\n")
    out = run_python("""
        import sys
        from advgkl.compat import import_robustbench, install_autoattack_adapter
        assert install_autoattack_adapter() is False
        import_robustbench()
        import robustbench.eval
        print(sys.modules["autoattack"].REAL, robustbench.eval.AutoAttack.__module__)
    """, PYTHONPATH=str(tmp_path))
    assert out.split() == ["True", "autoattack"]


@pytest.mark.parametrize("flag", ["is_tf_model=True"])
def test_unsupported_legacy_options_fail_clearly(flag):
    run_python(f"""
        import torch
        from advgkl.legacy_autoattack import AutoAttack
        try:
            AutoAttack(torch.nn.Linear(2, 2), {flag}, device="cpu")
        except ValueError as e:
            assert "TensorFlow" in str(e)
        else:
            raise SystemExit("no error")
    """)
