"""Torch's threads follow the cores this process may use, shared among the ranks (issue 14, item 8)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dreambench.utils.threads import cgroup_cpu_limit, ranks_on_this_node, usable_cores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cgroup_quota_v2_v1_and_none(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 0.5
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(v1) is None
    assert cgroup_cpu_limit(tmp_path / "none") is None


def test_usable_cores_is_the_smaller_of_affinity_and_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one core's quota
    affinity = len(os.sched_getaffinity(0))
    cores, how = usable_cores(tmp_path)
    assert cores == 1 and how == f"affinity {affinity}, cgroup quota 1"
    (tmp_path / "cpu.max").write_text(f"{(affinity + 7) * 100000} 100000\n")  # a quota above the mask
    assert usable_cores(tmp_path)[0] == affinity
    (tmp_path / "cpu.max").write_text("1 100000\n")  # a sliver of a core still gets one thread
    assert usable_cores(tmp_path)[0] == 1


def test_ranks_from_the_trainer_and_the_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert ranks_on_this_node(OmegaConf.create({"devices": 1, "strategy": "auto"})) == 1
    assert ranks_on_this_node(OmegaConf.load(os.path.join(REPO, "conf/trainer/ddp_cpu.yaml"))) == 2
    assert ranks_on_this_node(OmegaConf.create({"devices": [0, 1, 2], "strategy": "ddp"})) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ranks_on_this_node(OmegaConf.create({"devices": 1})) == 4


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin one")
def test_a_process_pinned_to_one_core_gets_one_thread_and_ranks_share_cores():
    # The process's own affinity mask, as `taskset -c 0` would set it; OMP_NUM_THREADS unset so the rule applies.
    code = ("import os, torch; from dreambench.utils.threads import configure_threads as c\n"
            "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); print(c(None, 1)[0], torch.get_num_threads())\n"
            "os.sched_setaffinity(0, set(range(os.cpu_count()))); n = len(os.sched_getaffinity(0))\n"
            "print(c(None, 2)[0] == max(1, n // 2), c(3, 2)[0], torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert out.stdout.split() == ["1", "1", "True", "3", "3"], out.stderr
    env["OMP_NUM_THREADS"] = "1"  # given by the user: respected
    out = subprocess.run([sys.executable, "-c", "from dreambench.utils.threads import configure_threads as c; "
                          "print(c(None, 1))"], capture_output=True, text=True, env=env, cwd=REPO, check=True)
    assert out.stdout.strip() == "(1, 'OMP_NUM_THREADS')"
