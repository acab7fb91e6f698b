"""Rank discovery from torchrun or SLURM variables, and SLURM variables -> torchrun arguments."""

from __future__ import annotations

import pytest

from braid.launch.env import DistEnv, expand_nodelist, export_torch_env, torchrun_args_from_slurm

SLURM_TASK = {  # task 5 of 8: the second task on the second of two nodes (srun, one task per GPU)
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NNODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
}
BATCH_SCRIPT = {  # the batch script of a 2-node job: SLURM_PROCID and SLURM_NTASKS, but no step
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_NODEID": "0",
    "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "16",
}


def test_torchrun_variables_win_over_slurm():
    env = dict(SLURM_TASK, RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", GROUP_RANK="1")
    assert DistEnv.from_environ(env) == DistEnv(
        rank=3, local_rank=1, world_size=4, local_world_size=2, node_rank=1, num_nodes=2, source="torchrun"
    )


def test_slurm_variables_give_rank_local_rank_and_world_size():
    assert DistEnv.from_environ(SLURM_TASK) == DistEnv(
        rank=5, local_rank=1, world_size=8, local_world_size=4, node_rank=1, num_nodes=2, source="slurm"
    )
    assert DistEnv.from_environ({}) == DistEnv()
    assert DistEnv.from_environ(BATCH_SCRIPT) == DistEnv(), "a batch script is not rank 0 of 16"


def test_inconsistent_variables_raise():
    with pytest.raises(ValueError, match="rank 4 is outside world size 4"):
        DistEnv.from_environ({"RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS='x'"):
        DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "x"})


def test_export_torch_env_from_slurm_and_leaves_torchrun_alone():
    env = dict(SLURM_TASK)
    export_torch_env(env)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
    }
    assert env["MASTER_PORT"] == str(20000 + 4242)
    torchrun = dict(SLURM_TASK, RANK="0", LOCAL_RANK="0", WORLD_SIZE="16")
    export_torch_env(torchrun)
    assert torchrun["WORLD_SIZE"] == "16" and "MASTER_ADDR" not in torchrun


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[07-08]", ["gpu07", "gpu08"]),
        ("a1,b[1-2,9],c", ["a1", "b1", "b2", "b9", "c"]),
        ("n[8-11]-ib", ["n8-ib", "n9-ib", "n10-ib", "n11-ib"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
    ],
)
def test_expand_nodelist_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_slurm_variables_to_torchrun_arguments():
    args = torchrun_args_from_slurm(SLURM_TASK, nproc_per_node=4)
    assert args == [
        "--nnodes=2", "--nproc-per-node=4", "--rdzv-id=4242", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=gpu07:{20000 + 4242}",
    ]
    args = torchrun_args_from_slurm(dict(SLURM_TASK, MASTER_PORT="29400"), nproc_per_node=8)
    assert args[-1] == "--rdzv-endpoint=gpu07:29400"
    with pytest.raises(ValueError, match="inside a SLURM allocation"):
        torchrun_args_from_slurm({"SLURM_NNODES": "2"}, nproc_per_node=8)
