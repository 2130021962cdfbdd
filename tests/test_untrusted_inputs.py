"""Property tests: a mutated ``pfnas_model.json`` or config YAML gives a result or one ``pfnas: error:`` line with
exit 2 through the CLI (called in-process), never a traceback."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import tiny_config
from pfnas import cli
from pfnas.methods import run_method
from pfnas.config import OPS, ConfigError, load_config
from pfnas.export import META_FILE

DEMO_YAML = Path(__file__).resolve().parents[1] / "pfnas" / "configs" / "demo.yaml"
SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6))
GARBAGE = st.one_of(
    SCALAR,
    st.sampled_from([-1, 0, 1, 2, 3, 16, 2**31, 10**9, 10**18, 2**64, -(10**12), 3.0, -0.5, 1e300,
                     math.nan, math.inf, -math.inf, "4", "four", "", "../x", *OPS, "none", "conv"]),
    st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6),
)


def _paths(doc, prefix=()):
    """Every key path into the nested dicts and lists of ``doc`` (the root is ``()``)."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    """``base`` with 1-3 mutations: a value replaced by garbage (wrong type, negative, huge, NaN, nested), a key
    removed, or an extra key / item added (the whole document replaced only rarely)."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, (dict, list)) or draw(st.integers(0, 49)) == 0:
            doc = draw(GARBAGE)
            continue
        kind = draw(st.sampled_from(["replace", "delete", "extra"]))
        paths = [p for p in _paths(doc) if p and (kind != "extra" or isinstance(_at(doc, p), (dict, list)))]
        paths = sorted(paths, key=len, reverse=True) + ([()] if kind == "extra" else [])  # nested ones first
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        target = _at(doc, path)
        if kind == "extra":
            if isinstance(target, dict):
                target[draw(st.text(max_size=8))] = draw(GARBAGE)
            else:
                target.append(draw(GARBAGE))
        elif kind == "replace":
            _at(doc, path[:-1])[path[-1]] = draw(GARBAGE)
        else:
            del _at(doc, path[:-1])[path[-1]]
    return doc


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _cli(args: list[str]) -> tuple[int, str]:
    """``pfnas <args>`` in-process: exit code and stderr (stdout is dropped)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(args)
    return rc, err.getvalue()


def _assert_result_or_one_error(rc: int, stderr: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if rc == 0:
        return
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1 and lines[0].startswith("pfnas: error: "), stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real export of a tiny 2-layer model, its json, and an image; the hub is offline (no downloads)."""
    root = tmp_path_factory.mktemp("untrusted")
    run_method(tiny_config(method={"kind": "fixed", "policy": ["add", "cross_attn"]}, train={"epochs": 1}),
               root / "run")
    Image.new("RGB", (24, 20), (10, 120, 200)).save(root / "img.png")
    folder = root / "run" / "retrain"
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield folder, json.loads((folder / META_FILE).read_text()), root / "img.png"
    if saved is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = saved


@pytest.mark.slow
def test_mutated_model_file_is_a_result_or_one_error(exported) -> None:
    folder, meta, image = exported
    assert _cli(["predict", "-m", str(folder), str(image)])[0] == 0  # the untouched export predicts
    original = (folder / META_FILE).read_text()
    outcomes = []

    @SETTINGS
    @given(mutated(meta))
    def check(doc) -> None:
        (folder / META_FILE).write_text(json.dumps(doc))
        rc, stderr = _cli(["predict", "-m", str(folder), str(image)])
        _assert_result_or_one_error(rc, stderr)
        outcomes.append(rc)

    try:
        check()
    finally:
        (folder / META_FILE).write_text(original)
    assert 2 in outcomes  # the mutations reached the validation


@pytest.fixture(scope="module")
def config_bases() -> list[dict]:
    """The demo config and the tests' tiny config, as the dicts their YAML files hold."""
    return [yaml.safe_load(DEMO_YAML.read_text()), tiny_config().model_dump(mode="json")]


@pytest.mark.slow
def test_mutated_config_yaml_is_a_config_or_one_error(config_bases, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("configs")
    blocker = folder / "a-file"
    blocker.write_text("")
    out = blocker / "out"  # `pfnas search` stops at its output folder once the config loaded: no training here
    outcomes = []

    @SETTINGS
    @given(st.sampled_from(range(len(config_bases))).flatmap(lambda i: mutated(config_bases[i])))
    def check(doc) -> None:
        path = folder / "config.yaml"
        path.write_text(yaml.safe_dump(doc))
        rc, stderr = _cli(["search", "-c", str(path), "-o", str(out)])
        _assert_result_or_one_error(rc, stderr)
        assert rc == 2
        try:
            load_config(path)
            loaded = True
        except ConfigError:
            loaded = False
        assert ("output folder" in stderr) == loaded, stderr  # a loadable config passed, every other one stopped
        outcomes.append(loaded)

    check()
    assert False in outcomes
