"""The HDKD family (EL-Assiouti et al.): the models (registered in timm on import) and, in the
submodules that import kdkit, the paper's experiment.

Only :mod:`kdkit_zoo.hdkd.model` is imported here: it imports nothing of kdkit, so ``import
kdkit`` (which imports the zoo to register the models) has no import cycle. The experiment is
imported on demand: :mod:`kdkit_zoo.hdkd.experiment` is its Python interface
(:func:`~kdkit_zoo.hdkd.experiment.run_experiment` and the names it is configured and read
with), :mod:`kdkit_zoo.hdkd.cli` the command line of ``examples/hdkd_brain.py`` and
``examples/hdkd_ham10000.py``; both are built from ``datasets``, ``augmentations``, ``config``,
``settings``, ``claims``, ``run_plan``, ``training`` and ``report``.
"""

from __future__ import annotations

from kdkit_zoo.hdkd.model import (
    Cbam,
    DfltBlock,
    DfltPatchEmbed,
    HdkdStudent,
    HdkdStudentDistilled,
    HdkdTeacher,
    MbcsaBlock,
)

__all__ = ["Cbam", "DfltBlock", "DfltPatchEmbed", "HdkdStudent", "HdkdStudentDistilled", "HdkdTeacher", "MbcsaBlock"]
