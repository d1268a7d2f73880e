"""Reading the launcher's environment (torchrun, SLURM, none): in-process, no process group."""

from __future__ import annotations

import pytest
import torch

from loopkit.strategies import DDP, FSDP
from loopkit.strategies.env import (
    DistEnv,
    backend_for,
    detect_env,
    device_for,
    first_host,
    init_distributed,
)

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "node07",
    "MASTER_PORT": "29500",
}
SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[012-015,020],cpu3",
    "SLURM_JOB_ID": "123456",
}


def test_torchrun_variables():
    assert detect_env(TORCHRUN) == DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        master_addr="node07",
        master_port=29500,
        source="torchrun",
    )


def test_local_rank_defaults_to_rank_on_one_node():
    env = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}
    assert detect_env(env).local_rank == 3


def test_slurm_variables_without_torchrun():
    assert detect_env(SLURM) == DistEnv(
        rank=5,
        world_size=8,
        local_rank=1,
        master_addr="gpu012",
        master_port=10000 + 123456 % 20000,
        source="slurm",
    )


def test_slurm_step_values_and_explicit_master_win():
    env = {**SLURM, "SLURM_STEP_NUM_TASKS": "6", "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    got = detect_env(env)
    assert (got.world_size, got.master_addr, got.master_port) == (6, "head", 1234)


def test_torchrun_inside_a_slurm_job_uses_torchrun():
    assert detect_env({**SLURM, **TORCHRUN}).source == "torchrun"


def test_no_launcher_is_one_process():
    env = detect_env({"MASTER_ADDR": "somewhere", "PATH": "/bin"})
    assert (env.source, env.rank, env.world_size, env.local_rank) == ("single", 0, 1, 0)


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node01", "node01"),
        ("node[01-04]", "node01"),
        ("node[07,03-04],gpu1", "node07"),
        ("rack[1-2]-n[009-010]", "rack1-n009"),
        ("a-b.c", "a-b.c"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "node]", "node[01"])
def test_unreadable_node_list(nodelist):
    with pytest.raises(ValueError, match="cannot read a host name"):
        first_host(nodelist)


@pytest.mark.parametrize(
    "env, names",
    [
        ({"RANK": "0"}, ["WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]),
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["RANK"]),
        ({"LOCAL_RANK": "0"}, ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]),
    ],
)
def test_half_set_torchrun_environment_names_what_is_missing(env, names):
    with pytest.raises(ValueError, match="torchrun") as info:
        detect_env(env)
    missing_part = str(info.value).split(" but ")[1].split(" not")[0]
    assert missing_part == ", ".join(names)
    for name in env:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "drop, named",
    [
        ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS or SLURM_NTASKS"),
        ("SLURM_LOCALID", "SLURM_LOCALID"),
        ("SLURM_JOB_NODELIST", "MASTER_ADDR"),
        ("SLURM_JOB_ID", "SLURM_JOB_ID or MASTER_PORT"),
    ],
)
def test_half_set_slurm_environment_names_what_is_missing(drop, named):
    env = {k: v for k, v in SLURM.items() if k != drop}
    with pytest.raises(ValueError, match="SLURM_PROCID is set but") as info:
        detect_env(env)
    assert named in str(info.value) and "srun" in str(info.value)


@pytest.mark.parametrize(
    "env, message",
    [
        ({**TORCHRUN, "RANK": "x"}, "RANK='x': expected an integer"),
        ({**TORCHRUN, "RANK": "4"}, "rank 4 is not in 0..world_size-1"),
        ({**TORCHRUN, "WORLD_SIZE": "0"}, "WORLD_SIZE='0': must be >= 1"),
        ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT='70000': not a TCP port"),
        ({**SLURM, "SLURM_PROCID": "8"}, "rank 8 is not in 0..world_size-1"),
    ],
)
def test_bad_values_are_named(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        detect_env(env)


def test_device_and_backend():
    env = detect_env(TORCHRUN)
    assert device_for(env, "cpu", "DDP") == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    if not torch.cuda.is_available():
        assert device_for(env, None, "DDP") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"DDP\(device='gpu7'\): not a device"):
        device_for(env, "gpu7", "DDP")
    with pytest.raises(ValueError, match="runs on 'cpu' \\(gloo\\) or 'cuda'"):
        device_for(env, "meta", "FSDP")


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), "10", True])
def test_timeout_is_checked_before_anything_starts(timeout_s):
    with pytest.raises(ValueError, match=r"init_distributed\(timeout_s="):
        init_distributed(timeout_s=timeout_s, environ={})


def test_strategy_arguments_are_checked_when_built():
    # All of these fail before joining a process group (none exists in this process).
    with pytest.raises(TypeError, match=r"DDP\(static_graph=1\): expected True or False"):
        DDP(static_graph=1)
    with pytest.raises(ValueError, match=r"DDP\(bucket_cap_mb=0\)"):
        DDP(bucket_cap_mb=0)
    with pytest.raises(TypeError, match=r"FSDP\(shard='blocks'\)"):
        FSDP(shard="blocks")
    with pytest.raises(ValueError, match=r"FSDP\(param_dtype='half'\)"):
        FSDP(param_dtype="half")
    with pytest.raises(ValueError, match=r"FSDP\(reshard_after_forward=0\)"):
        FSDP(reshard_after_forward=0)
    with pytest.raises(TypeError, match=r"FSDP\(cpu_offload=None\)"):
        FSDP(cpu_offload=None)
    assert not torch.distributed.is_initialized()
