"""The HDKD family (EL-Assiouti et al.): the models (registered in timm on import) and, in the
submodules that import kdkit, the paper's experiment.

Only :mod:`kdkit_zoo.hdkd.model` is imported here: it imports nothing of kdkit, so ``import
kdkit`` (which imports the zoo to register the models) has no import cycle.
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
