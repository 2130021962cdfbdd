"""Names that become paths stay in their folder, one study runs at a time, a disk that fills at the finals ends in
one line, and retried trials are counted (issue 37: 3, 5, 12, 15). The CLI's refusals of a name that leaves its
folder and of a finals folder pfnas did not make are in tests/test_cli_exit_codes.py."""
from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from conftest import one_error_line, run_cli, tiny_config, write_one_trial_space

from pfnas.config import ConfigError, check_name, load_config
from pfnas.tracking import make_client
from pfnas.tune import load_space, run_tune


@pytest.fixture
def tracking(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def parent_run(uri: str, experiment: str):
    client = make_client(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string="tags.`pfnas.kind` = 'study'")
    assert len(runs) == 1
    return runs[0]


# ----------------------------------------------------------------------------- 3: names
@pytest.mark.parametrize("name", ["proxy", "CUB_200_2011", "Stanford-dogs", "v1.2", "a..b"])
def test_plain_names_pass(name):
    assert check_name("--experiment", name) == name


@pytest.mark.parametrize("name,why", [("", "it is empty"), ("..", "starts with '.'"), (".hidden", "starts with '.'"),
                                      ("-rf", "starts with '-'"), ("../x", "path separator '/'"),
                                      ("/abs", "path separator '/'"), ("a\\b", "path separator '\\\\'"),
                                      ("a\0b", "NUL"), ("a b", "holds ' '"), ("x" * 201, "longer than 200")])
def test_names_that_could_leave_their_folder_are_refused(name, why):
    with pytest.raises(ConfigError, match="is not a plain folder name") as e:
        check_name("--experiment", name)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_tasks_and_run_names_are_checked(tmp_path):
    """``pfnas run --set name=../escaped``: tests/test_cli_exit_codes.py."""
    space = write_one_trial_space(tmp_path, "t", tasks=["ok", "../../up"])
    with pytest.raises(ConfigError, match=r"^tasks: '\.\./\.\./up' is not a plain folder name"):
        load_space(space)
    with pytest.raises(ConfigError, match=r"^name: '\.\./escaped' is not a plain folder name"):
        load_config(None, ["name=../escaped"])


# ----------------------------------------------------------------------------- 5: one study at a time
@pytest.mark.slow
def test_a_second_tune_of_a_running_study_is_refused(ray_session, tmp_path, tracking, capsys, monkeypatch):
    """While a study runs, ``pfnas tune`` of the same storage and name (with or without --resume) exits 2 naming the
    study and the holder, and leaves the running study alone; once it ended the name is free (and resumable)."""
    from pfnas.tune import display

    storage = tmp_path / "ray"
    space = write_one_trial_space(tmp_path, "held")
    args = ["tune", "--space", str(space), "--storage", str(storage), "--tracking-uri", tracking]
    real, second = display.Progress.on_step_end, []

    def during(self, iteration, trials, **info):  # a second pfnas tune, started while this study runs
        real(self, iteration, trials, **info)
        if not second and any(t.status == "RUNNING" for t in trials):
            second.append(run_cli(capsys, *args))
            second.append(run_cli(capsys, *args, "--resume"))

    monkeypatch.setattr(display.Progress, "on_step_end", during)
    s = run_tune(space, storage=str(storage), tracking_uri=tracking).studies[0]
    assert len(second) == 2
    for rc, err in second:
        assert rc == 2
        one_error_line(err, f"study {storage / 'held'} is in use by another pfnas tune (pid {os.getpid()})")
    assert [t.status for t in s.trials] == ["TERMINATED"] and s.best is not None  # the first study is whole
    monkeypatch.setattr(display.Progress, "on_step_end", real)
    rc, err = run_cli(capsys, *args)
    assert rc == 2
    one_error_line(err, "already exists; pass --resume")  # the lock is free again
    rc, err = run_cli(capsys, *args, "--resume")
    assert rc == 0, err


# ----------------------------------------------------------------------------- 12: disk full at the finals
@pytest.mark.slow
def test_disk_full_writing_the_finals_is_one_line_and_a_failed_parent(ray_session, tmp_path, tracking, capsys,
                                                                      monkeypatch):
    """The trials finished; writing the finals folder fails with ENOSPC (as a full disk does: no file name on the
    error). One line naming the path, exit 2, the MLflow parent FAILED; --resume then runs the finals."""
    storage = tmp_path / "ray"
    space = write_one_trial_space(tmp_path, "dfull", final={"seeds": 1})
    finals = storage / "dfull-final"
    real = Path.write_text

    def full_disk(self, *a, **kw):
        if self.parent == finals:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full_disk)
    args = ["tune", "--space", str(space), "--storage", str(storage), "--tracking-uri", tracking]
    rc, err = run_cli(capsys, *args)
    assert rc == 2
    line = one_error_line(err, f"cannot write {finals}", "No space left on device", "--resume")
    parent = parent_run(tracking, "dfull")
    assert parent.info.status == "FAILED" and "No space left on device" in parent.data.tags["pfnas.error"]
    assert line.endswith(parent.data.tags["pfnas.error"])

    monkeypatch.setattr(Path, "write_text", real)
    rc, err = run_cli(capsys, *args, "--resume")
    assert rc == 0, err
    parent = parent_run(tracking, "dfull")
    assert parent.info.status == "FINISHED" and parent.data.metrics["final_n"] == 1
    assert "pfnas.error" not in parent.data.tags  # the reopened parent no longer says what stopped the first try


# ----------------------------------------------------------------------------- 15: retried trials are counted
@pytest.mark.slow
def test_a_trial_retried_after_its_worker_died_is_counted(ray_session, tmp_path, tracking, monkeypatch):
    """A trial whose worker is killed (SIGKILL, as the OOM killer does) is retried from its checkpoint and finishes:
    the summary says "1 retried" and why, the MLflow parent carries n_retried / n_retries."""
    from pfnas.tune import display

    base = tiny_config(search={"epochs": 4}, train={"epochs": 4}).model_dump(mode="json")
    space = write_one_trial_space(tmp_path, "retry", base=base, max_failures=1)
    real, killed = display.Progress.on_step_end, []

    def kill_once(self, iteration, trials, **info):
        real(self, iteration, trials, **info)
        for t in trials:
            r = t.last_result or {}
            if not killed and t.status == "RUNNING" and t.checkpoint is not None and r.get("phase") == "search":
                killed.append(int(r["pid"]))
                os.kill(killed[0], signal.SIGKILL)

    monkeypatch.setattr(display.Progress, "on_step_end", kill_once)
    s = run_tune(space, storage=str(tmp_path / "ray"), tracking_uri=tracking).studies[0]
    assert len(killed) == 1 and killed[0] != os.getpid()
    (trial,) = s.trials
    assert trial.status == "TERMINATED" and trial.retries == 1 and trial.value is not None
    text = str(s.__rich__().renderables[0].title)
    assert "1 retried" in text and "0 errored" in text
    lines = str(s.__rich__().renderables[1])
    assert f"trial {trial.name} retried 1x from its last checkpoint after: " in lines
    parent = parent_run(tracking, "retry")
    assert parent.data.metrics["n_retried"] == 1 and parent.data.metrics["n_retries"] == 1
    assert parent.data.metrics["n_errored"] == 0
