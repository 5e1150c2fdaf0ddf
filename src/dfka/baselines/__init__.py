"""Baselines, in the same harness and on the same teachers as dfka (issue #6).

=============  ==========================================  ===========================================
method         module                                      data
=============  ==========================================  ===========================================
``ensemble``   :mod:`dfka.baselines.ensemble`              none (the teachers themselves, reference)
``dafl``       :mod:`dfka.baselines.dafl`                  data-free (generator: one-hot/entropy/act.)
``dfad``       :mod:`dfka.baselines.dfad`                  data-free (adversarial generator)
``noise``      :mod:`dfka.baselines.noise`                 data-free (Gaussian noise, lower bound)
``kd-real``    :mod:`dfka.baselines.kd_real`               real unlabeled training images (upper bound)
``layerwise``  :mod:`dfka.baselines.layerwise`             real unlabeled training images (Shen et al.)
=============  ==========================================  ===========================================

Every student is ``build_student(cfg.student, teachers)`` and learns the same target, the union rule
applied to the teachers' logits. The data-free ones run inside :func:`dfka.data.data_free`.
"""

from __future__ import annotations

from dfka.baselines.dafl import DaflConfig, PlainGenerator, train_dafl
from dfka.baselines.dfad import DfadConfig, train_dfad
from dfka.baselines.ensemble import TeacherEnsemble, build_ensemble, teacher_logits, union_targets
from dfka.baselines.kd_real import KDRealConfig, train_kd_real
from dfka.baselines.layerwise import LayerwiseAmalgamator, LayerwiseConfig, train_layerwise
from dfka.baselines.noise import NoiseConfig, NoiseSource, train_noise

__all__ = [
    "DaflConfig",
    "DfadConfig",
    "KDRealConfig",
    "LayerwiseAmalgamator",
    "LayerwiseConfig",
    "NoiseConfig",
    "NoiseSource",
    "PlainGenerator",
    "TeacherEnsemble",
    "build_ensemble",
    "teacher_logits",
    "train_dafl",
    "train_dfad",
    "train_kd_real",
    "train_layerwise",
    "train_noise",
    "union_targets",
]
