"""Model zoo for kdkit: importing this package registers its models in timm.

Example:
    >>> import timm, kdkit_zoo
    >>> model = timm.create_model("hdkd_student", num_classes=7, img_size=64)
"""

from __future__ import annotations

from kdkit_zoo.hdkd.model import HdkdStudent, HdkdStudentDistilled, HdkdTeacher

__all__ = ["HdkdStudent", "HdkdStudentDistilled", "HdkdTeacher"]
