"""What the training loop needs from the process group, kept out of the loop: how the launch was asked
for (so a launch that asked for N processes but runs one says so), the per-step control flags all ranks
agree on (a non-finite step to skip, a stop request), and the SIGTERM handler of preempted jobs.

The engines do the work (accelerate over torch.distributed: DDP, DeepSpeed; torchrun / srun start
the processes); nothing here reimplements them.
"""
from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import torch

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM, requeue me (launch/slurm_train.sbatch)


def requested_processes() -> tuple[int, str] | None:
    """(processes, launcher) that the command which started this process asked for, read from the
    parent's command line (``accelerate launch --num_processes N``, ``torchrun --nproc_per_node N``)
    or from SLURM (``SLURM_NTASKS``); None when nothing says."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        parent = []
    args = [a.decode(errors="replace") for a in parent]
    joined = " ".join(args)
    for flag, launcher in (("num_processes", "accelerate launch"), ("nproc_per_node", "torchrun"),
                           ("nproc-per-node", "torchrun")):
        m = re.search(rf"--{flag}[ =](\d+)", joined)
        if m and ("accelerate" in joined or "torch" in joined):
            n = int(m.group(1))
            if launcher == "torchrun":
                nodes = re.search(r"--nnodes[ =](\d+)", joined)
                n *= int(nodes.group(1)) if nodes else 1
            return n, launcher
    if os.environ.get("SLURM_NTASKS") and "WORLD_SIZE" not in os.environ:
        return int(os.environ["SLURM_NTASKS"]), "srun"
    return None


def launch_warning(world_size: int) -> str | None:
    """A sentence when the launch asked for more processes than run (e.g. `accelerate launch --cpu
    --num_processes 2`, which runs ONE process), else None."""
    asked = requested_processes()
    if asked is None or asked[0] <= world_size:
        return None
    n, launcher = asked
    how = ("`accelerate launch --cpu` starts a single process; on CPUs use `accelerate launch --multi_gpu "
           "--num_processes N` (gloo) or `torchrun --nproc_per_node N`" if launcher == "accelerate launch" else
           "srun started separate single-process runs; start the ranks with `accelerate launch` or `torchrun` "
           "inside srun (launch/slurm_train.sbatch)" if launcher == "srun" else
           "check the launcher's settings")
    return f"this launch asked for {n} processes ({launcher}) but this run has {world_size}: {how}"


class StopSignal:
    """Remembers a SIGTERM (a preempted SLURM job: `--signal=TERM@120`), SIGUSR1 or the first Ctrl-C
    (SIGINT) instead of dying, so the loop can finish the step, checkpoint on every rank at the same
    step and exit (``PREEMPTED_EXIT`` for a scheduler's signals, ``Interrupted`` for Ctrl-C). A second
    Ctrl-C restores Python's default and raises ``KeyboardInterrupt`` at once."""

    def __init__(self, announce=None):
        self.received: int | None = None
        self._old = {}
        self._announce = announce  # called once with a line on the first Ctrl-C (rank 0 prints it)

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.received == signal.SIGINT:  # the second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            if self._announce is not None:
                self._announce("interrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit at "
                               "once, losing the steps since the last checkpoint)")
        if self.received is None or signum == signal.SIGINT:
            self.received = signum

    @property
    def interrupted(self) -> bool:
        """The stop was asked for by Ctrl-C (not by a scheduler)."""
        return self.received == signal.SIGINT

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def agree(flags: list[bool | torch.Tensor], device, world_size: int) -> list[bool]:
    """Every rank's flags OR-ed together (one all-reduce of a few numbers, one host read): the ranks
    skip a step or stop together, never one alone (which would hang the others in a collective)."""
    t = torch.stack([torch.as_tensor(f, device=device).float().reshape(()) for f in flags])
    if world_size > 1:
        import torch.distributed as dist  # noqa: PLC0415

        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]
