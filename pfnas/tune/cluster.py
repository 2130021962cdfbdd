"""The Ray side of a study before it starts: the address answers, a trial fits the cluster, the data is on
every node, and Ray's, Tune's and Optuna's loggers kept quiet for the live table."""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

import optuna
import ray
from ray.exceptions import GetTimeoutError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config import merge_dotted
from ..data import check_data_paths
from ..errors import ConfigError, DataError, PfnasError
from ..tracking import format_value
from .space import SpaceConfig, StudyPlan

log = logging.getLogger("pfnas.tune")


class Quiet:
    """Quiet Ray/Tune/Optuna loggers for the run (``on``), restored afterwards; ``init_kwargs`` for ``ray.init``."""

    LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "optuna")

    def __init__(self, on: bool):
        self.on = on
        self.levels = {n: logging.getLogger(n).level for n in self.LOGGERS}
        self.optuna = None
        self.new_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
        if on:
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # the new engine prints its header and paths even at verbose=0
            self.optuna = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            for n in self.LOGGERS:
                logging.getLogger(n).setLevel(logging.WARNING)

    def init_kwargs(self) -> dict[str, Any]:
        # ERROR: no "Started a local Ray instance" / token-authentication notes on the quiet terminal; worker output
        # (actor shutdown noise included) stays in Ray's session logs, trial errors reach the summary anyway
        return {"logging_level": logging.ERROR, "log_to_driver": False} if self.on else {}

    def restore(self) -> None:
        if not self.on:
            return
        optuna.logging.set_verbosity(self.optuna)
        if self.new_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = self.new_output
        for n, level in self.levels.items():
            logging.getLogger(n).setLevel(level)


def check_ray_address(address: str | None) -> None:
    """One try of an explicit ``host:port`` or ``ray://host:port`` before ``ray.init``, which retries a dead address
    for minutes; ``auto`` and None are left to Ray (it fails fast when no cluster is running)."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # not host:port: Ray reports what it makes of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it "
                          "(ray start --head) or fix --address") from None


def check_trial_fits(space: SpaceConfig, local: bool) -> None:
    """A trial asking for more CPUs or GPUs than the Ray cluster has would stay pending forever: refused on a local
    Ray (its one node is all there is), a warning on a cluster (an autoscaler may still add nodes)."""
    have = ray.cluster_resources()
    for key, want in (("cpu", space.resources.cpu), ("gpu", space.resources.gpu)):
        total = float(have.get(key.upper(), 0.0))
        if want > total:
            msg = (f"resources.{key}={format_value(want)} per trial, but the Ray cluster has {format_value(total)} "
                   f"{key.upper()}s: no trial could ever start")
            if local:
                hint = " or run on a GPU machine" if key == "gpu" else ""
                raise ConfigError(f"{msg}; lower resources.{key}{hint}")
            log.warning("%s unless the cluster adds nodes", msg)


def data_configs(plans: list[StudyPlan]) -> list:
    """The distinct data sections the studies' trials will read (one per plan and variant)."""
    out: dict[str, Any] = {}
    for p in plans:
        for v in p.variants or [{}]:
            d = merge_dotted(p.base, {k: x for k, x in v.items() if k.startswith("data.")}).data
            out.setdefault(d.model_dump_json(), d)
    return list(out.values())


def check_data_on_nodes(data_cfgs: list, timeout_s: float = 120.0) -> None:
    """Cluster pre-flight: :func:`check_data_paths` on every alive Ray node with CPUs, where trials may run.

    A path missing on any node raises :class:`DataError` naming the node, before a trial starts. Nodes that
    do not answer within ``timeout_s`` (busy or starting) are not waited for: their trials still check.
    """
    files = [d for d in data_cfgs if d.kind != "synthetic"]
    if not files:
        return

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(cfgs: list) -> str | None:
        for d in cfgs:
            try:
                check_data_paths(d)
            except DataError as e:
                return str(e)
        return None

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    refs = {n.get("NodeManagerAddress", n["NodeID"]): probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(files) for n in nodes}
    for where, ref in refs.items():
        try:
            err = ray.get(ref, timeout=timeout_s)
        except GetTimeoutError:
            ray.cancel(ref, force=True)
            continue
        except RayError as e:  # e.g. pfnas not importable there: its trials could not run either
            raise PfnasError(f"on Ray node {where}: the data pre-flight failed: {str(e).strip().splitlines()[-1]}") from None
        if err:
            raise DataError(f"on Ray node {where}: {err}")
