"""The engine and the bench run on a bare GPU machine: torch + timm, no Ray, Optuna, MLflow (or matplotlib/pandas).

Each test runs a fresh Python whose ``sys.meta_path`` finders do not find those packages, as if they were
not installed.
"""
from __future__ import annotations

import pytest

import os
import subprocess
import sys
import textwrap

import yaml

from conftest import REPO, TINY_BACKBONE

BLOCKED = ("ray", "optuna", "mlflow", "matplotlib", "pandas")

PRELUDE = textwrap.dedent(f"""
    import sys

    BLOCKED = {BLOCKED!r}

    class Hide:
        # wraps an import finder so that the blocked packages look not installed (find_spec -> None)

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    try:
        import ray  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker does not work")

    def check_leaks():
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
""")


def _run(code: str, cwd, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_engine_and_bench_import_without_ray_optuna_mlflow(tmp_path):
    proc = _run("""
        import pfnas.engine, pfnas.bench, pfnas.model, pfnas.data, pfnas.methods, pfnas.pae, pfnas.cli
        check_leaks()
        print("ok")
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_cli_bench_runs_without_ray_optuna_mlflow(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "bare", "backbone": TINY_BACKBONE,
        "data": {"kind": "synthetic", "batch_size": 4, "synthetic_classes": 3, "synthetic_per_class": 4},
        "prompts": {"length": 4, "dropout": 0.1, "fusion_dim": 4}}))
    out = tmp_path / "bench.json"
    proc = _run("""
        import runpy
        try:
            runpy.run_module("pfnas", run_name="__main__", alter_sys=True)  # python -m pfnas ...
        except SystemExit as e:
            code = e.code
        else:
            code = 0
        check_leaks()
        sys.exit(code)
    """, tmp_path, "bench", "-c", str(config), "--steps", "1", "--warmup", "0", "--batch-size", "4",
        "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plain VPT-deep" in proc.stdout and out.is_file()
