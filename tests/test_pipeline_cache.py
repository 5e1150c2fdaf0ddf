"""kfp.local step caching works for tasks with an ``Output[Metrics]`` once the metrics file is written.

kfp 2.17 stores no file for a Metrics artifact, so a cached entry "references a missing artifact" and is
never a hit (platform notes §1a). Every dfka component writes its metrics through
``dfka.stages.component_io.write_metrics``, which also writes the file.
"""

from pathlib import Path

from kfp import dsl, local
from kfp.dsl import Metrics, Output


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def counted(counter: str, metrics: Output[Metrics]):
    with open(counter, "a") as fh:
        fh.write("ran\n")
    from dfka.stages.component_io import write_metrics

    write_metrics(metrics, {"runs": 1.0})


@dsl.pipeline(name="dfka-cache-check")
def cache_check(counter: str):
    counted(counter=counter)


def test_a_metrics_task_is_a_cache_hit_the_second_time(tmp_path: Path) -> None:
    counter = tmp_path / "counter.txt"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        enable_caching=True,
        raise_on_error=True,
    )
    cache_check(counter=str(counter))
    cache_check(counter=str(counter))
    assert counter.read_text().splitlines() == ["ran"]
