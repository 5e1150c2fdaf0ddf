"""One lightweight KFP component per stage, each a thin wrapper over a ``dfka.stages`` function.

The components run in the stage image (``images/stage.Dockerfile``, kfp preinstalled, so
``install_kfp_package=False``) on a cluster, and as subprocesses of the current venv under
``kfp.local.SubprocessRunner(use_venv=False)``. They map typed artifacts and parameters to the stage
function's paths and arguments, and its result dict back to ``Metrics``/``Markdown``/``HTML`` outputs.
"""

from components.evaluate import evaluate
from components.export_synthetic_samples import export_synthetic_samples
from components.gather_sweep import gather_sweep
from components.ingest_teachers import ingest_teachers
from components.open_sweep import open_sweep
from components.regroup_target_net import regroup_target_net
from components.train_amalgamating_gan import train_amalgamating_gan
from components.train_dual_generator_blocks import train_dual_generator_blocks

__all__ = [
    "evaluate",
    "export_synthetic_samples",
    "gather_sweep",
    "ingest_teachers",
    "open_sweep",
    "regroup_target_net",
    "train_amalgamating_gan",
    "train_dual_generator_blocks",
]
