"""Multi-node training, tested on one machine: two torchrun agents as two nodes (``--nnodes 2 --nproc_per_node 1``,
c10d rendezvous on localhost) train the same weights as one torchrun agent with two processes. Global rank decides
the data shard, the checkpoint writes and the logs (rank 0 alone), the local world size the loading workers."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from crate_kernels import checkpoint

pytestmark = pytest.mark.e2e
TINY = ["--input_size", "16", "--patch_size", "4", "--epoch_size", "16", "--batch_size", "2", "--eval_every", "0",
        "--no_tensorboard", "--num_workers", "0", "--log_every", "1", "--seed", "5", "--warmup_steps", "2",
        "--blr", "1e-2", "--max_steps", "4", "--save_every", "2", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*launch):
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "crate_kernels.train", *TINY]


def _records(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return [r for r in map(json.loads, f) if r["type"] == "train"]


def test_two_nodes_train_the_weights_of_two_processes_on_one_node(tmp_path):
    one_node, two_nodes = str(tmp_path / "one_node"), str(tmp_path / "two_nodes")
    proc = subprocess.run(_torchrun("--standalone", "--nproc_per_node", "2") + ["--output_dir", one_node],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = _free_port()
    rendezvous = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "crate-test",
                  "--rdzv_endpoint", f"localhost:{port}", "--max_restarts", "0"]
    agents = [subprocess.Popen(_torchrun(*rendezvous) + ["--output_dir", two_nodes], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    try:
        results = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
    for agent, (_, stderr) in zip(agents, results):
        assert agent.returncode == 0, stderr[-3000:]
    banners = [out for out, _ in results if "crate-train: model demo" in out]
    assert len(banners) == 1 and "2 processes on cpu" in banners[0]  # global rank 0 alone reports
    a, b = _records(one_node), _records(two_nodes)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and [r["lr"] for r in a] == [r["lr"] for r in b]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in b]), torch.tensor([r["loss"] for r in a]),
                               rtol=0, atol=0)
    ckpt = checkpoint.load(os.path.join(two_nodes, "checkpoint-last.pth"))
    assert ckpt["args"]["world_size"] == 2 and len(ckpt["rng"]) == 2  # both ranks' RNG states, gathered
    assert not [f for f in os.listdir(two_nodes) if f.endswith(".tmp") or f == ".lock"]
    torch.testing.assert_close(load_file(os.path.join(two_nodes, "model.safetensors")),
                               load_file(os.path.join(one_node, "model.safetensors")), rtol=0, atol=0)


def test_slurm_script_starts_one_torchrun_agent_per_node_with_rendezvous_on_the_first(tmp_path):
    """scripts/slurm_pretrain.sbatch under stand-ins for scontrol and srun (which record the command they get)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n"\n')
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "srun_args"}\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4", "OUTPUT_DIR": "/shared/run"}
    proc = subprocess.run(["bash", os.path.join(root, "scripts", "slurm_pretrain.sbatch"), "--epochs", "1"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    expected = ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_id", "4242", "--rdzv_backend", "c10d",
                "--rdzv_endpoint", "gpu07:29500", "-m", "crate_kernels.train"]
    start = args.index("torchrun") + 1
    assert args[start:start + len(expected)] == expected
    assert args[-2:] == ["--epochs", "1"] and args[args.index("--output_dir") + 1] == "/shared/run"
