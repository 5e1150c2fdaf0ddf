"""Start N data-parallel ranks of a dfka command on this machine with ``torchrun`` (PyTorch's own
launcher, ``torch.distributed.run``): ``dfka amalgamate --nproc N`` and in-pod multi-GPU stages.

``torchrun`` watches its workers: when one dies (killed, out of memory, an error), it stops the
others and exits non-zero, so a lost rank fails the whole command instead of leaving the rest
waiting in a collective (which would otherwise end after ``DFKA_DIST_TIMEOUT`` seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from dfka.engine import distributed as dist
from dfka.errors import ConfigError, RankFailed

#: the standard torchrun variables a worker sees; a launcher must not hand its own to its children
_RANK_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def torchrun_command(nproc: int, module: str, args: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local ranks of ``python -m module args``."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--max-restarts=0", "-m", module, *args,
    ]  # fmt: skip


def run_ranks(nproc: int, module: str, args: Sequence[str], what: str) -> None:
    """Run the ranks and wait; :class:`~dfka.errors.RankFailed` if any of them failed."""
    if dist.launched():
        raise ConfigError(
            f"{what}: --nproc inside a torchrun worker", "drop --nproc: torchrun already started the ranks"
        )
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    threads = env.get("OMP_NUM_THREADS")
    if not threads:  # split the cores between the ranks rather than oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    rc = subprocess.run(torchrun_command(nproc, module, args), env=env, check=False).returncode
    if rc != 0:
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        raise RankFailed(
            f"{what}: a rank of the {nproc}-process run failed ({how}); torchrun stopped the others and "
            "no output was written (the failing rank's error is printed above)",
            "fix the error above and run the same command again; if a process was killed (out of memory, "
            "preempted), run again or with fewer processes (--nproc)",
        )
