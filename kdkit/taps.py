"""Feature taps: forward hooks on named modules that capture their outputs.

A *selector* names the modules to tap on one model:

* an exact module path, ``"stages.2"`` or ``"blocks.11.mlp"``;
* a glob pattern over module paths (all matches, in module order): ``*`` stands for one
  path component, ``**`` for any number, ``?`` for one character: ``"stages.*"`` taps every
  stage, ``"blocks.*.attn"`` every attention module, ``"**.mlp"`` every MLP at any depth;
* an ``int``: an index into the timm model's ``feature_info`` (``-1`` is the last stage);
* a callable ``(path, module) -> bool`` (all matches, in module order).

Paths are resolved on the unwrapped model, so DDP's ``module.``, ``torch.compile``'s
``_orig_mod.`` and Accelerate's wrappers never need to be spelled out.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Union

from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

__all__ = ["FeatureTaps", "Selector", "TapSpec", "match_taps", "resolve_selector", "unwrap_model"]

Selector = Union[str, int, Callable[[str, nn.Module], bool]]
"""One selector; see the module docstring."""

TapSpec = Union[Sequence[Selector], Sequence[tuple[Selector, Selector]], Mapping[str, Sequence[Selector]]]
"""Taps for a teacher/student pair: selectors applied to both models (matched in order),
explicit ``(teacher_selector, student_selector)`` pairs, or ``{"teacher": [...], "student": [...]}``."""

_GLOB_CHARS = frozenset("*?")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Returns ``model`` without DDP, DataParallel, DeepSpeed or ``torch.compile`` wrappers."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcards = {"**": ".*", "*": "[^.]*", "?": "[^.]"}
    return re.compile("".join(wildcards.get(part, re.escape(part)) for part in parts))


def _feature_info_paths(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ValueError(
            f"{type(model).__name__} has no timm `feature_info`, so integer tap selectors cannot be "
            "resolved; select modules by path or pattern instead"
        )
    # timm keeps a list of dicts on models and a FeatureInfo object on features_only wrappers.
    entries = info.info if hasattr(info, "info") else info
    return [entry["module"] for entry in entries]


def resolve_selector(model: nn.Module, selector: Selector) -> list[str]:
    """Resolves one selector to the module paths it names on ``model``.

    Args:
        model: The model, wrapped or not.
        selector: An exact path, a glob pattern, a ``feature_info`` index or a predicate.

    Returns:
        Module paths, in the model's module order for patterns and predicates.

    Raises:
        ValueError: The selector matches nothing; the message lists the closest paths.
    """
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    modules.pop("", None)
    name = type(model).__name__
    if isinstance(selector, bool):
        raise TypeError(f"a tap selector cannot be a bool, got {selector!r}")
    if isinstance(selector, int):
        paths = _feature_info_paths(model)
        if not -len(paths) <= selector < len(paths):
            raise ValueError(f"feature_info index {selector} is out of range: {name} has {len(paths)} feature stages {paths}")
        return [paths[selector]]
    if isinstance(selector, str):
        if _GLOB_CHARS & set(selector):
            regex = _glob_regex(selector)
            matches = [path for path in modules if regex.fullmatch(path)]
            if not matches:
                raise ValueError(f"tap pattern {selector!r} matches no module of {name}")
            return matches
        if selector not in modules:
            close = difflib.get_close_matches(selector, modules, n=5, cutoff=0.5)
            hint = f"; closest: {', '.join(map(repr, close))}" if close else ""
            raise ValueError(f"{name} has no module {selector!r}{hint}")
        return [selector]
    if callable(selector):
        matches = [path for path, module in modules.items() if selector(path, module)]
        if not matches:
            raise ValueError(f"tap predicate {getattr(selector, '__name__', selector)!r} matches no module of {name}")
        return matches
    raise TypeError(f"a tap selector is a str, an int or a callable, got {type(selector).__name__}")


def _resolve_all(model: nn.Module, selectors: Sequence[Selector]) -> list[str]:
    return [path for selector in selectors for path in resolve_selector(model, selector)]


def match_taps(teacher: nn.Module, student: nn.Module, spec: TapSpec) -> list[tuple[str, str]]:
    """Resolves a tap spec to ``(teacher_path, student_path)`` pairs.

    Raises:
        ValueError: The two sides resolve to different numbers of modules.
    """
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"teacher", "student"}
        if unknown or len(spec) != 2:
            raise ValueError(f"a tap mapping has exactly the keys 'teacher' and 'student', got {sorted(spec)}")
        teacher_paths = _resolve_all(teacher, spec["teacher"])
        student_paths = _resolve_all(student, spec["student"])
    elif isinstance(spec, (str, int)) or callable(spec):
        teacher_paths = resolve_selector(teacher, spec)
        student_paths = resolve_selector(student, spec)
    else:
        pairs: list[tuple[str, str]] = []
        for item in spec:
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise ValueError(f"an explicit tap pair is (teacher_selector, student_selector), got {item!r}")
                t_paths, s_paths = resolve_selector(teacher, item[0]), resolve_selector(student, item[1])
            else:
                t_paths, s_paths = resolve_selector(teacher, item), resolve_selector(student, item)
            if len(t_paths) != len(s_paths):
                raise ValueError(
                    f"tap selector {item!r} matches {len(t_paths)} teacher modules {t_paths} "
                    f"but {len(s_paths)} student modules {s_paths}"
                )
            pairs.extend(zip(t_paths, s_paths))
        return pairs
    if len(teacher_paths) != len(student_paths):
        raise ValueError(
            f"the taps select {len(teacher_paths)} teacher modules {teacher_paths} "
            f"but {len(student_paths)} student modules {student_paths}; they are matched in order"
        )
    return list(zip(teacher_paths, student_paths))


def _output_tensor(path: str, output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"tapped module {path!r} returned {type(output).__name__}, not a tensor; tap a submodule instead")


class FeatureTaps:
    """Forward hooks on named modules of one model, capturing outputs on demand.

    Hooks record only inside :meth:`capture`, so the model runs untouched elsewhere (e.g. in
    evaluation), and :meth:`collect` hands the tensors over and forgets them, so nothing
    outlives a training step. Use as a context manager, or call :meth:`remove`.

    Args:
        model: The model to tap, wrapped or not.
        paths: Module paths on the unwrapped model.
        role: ``"teacher"`` or ``"student"``, for error messages.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], role: str = "model") -> None:
        self.paths = list(paths)
        self.role = role
        self._captured: dict[str, Tensor] = {}
        self._recording = False
        modules = dict(unwrap_model(model).named_modules())
        missing = [path for path in self.paths if path not in modules]
        if missing:
            raise ValueError(f"the {role} has no modules {missing}")
        self._handles = [modules[path].register_forward_hook(self._hook_for(path)) for path in self.paths]

    def _hook_for(self, path: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if self._recording:
                self._captured[path] = _output_tensor(path, output)

        return hook

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Records the tapped outputs of the forward passes run inside the block."""
        self._captured.clear()
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def collect(self) -> list[Tensor]:
        """Returns the captured outputs in tap order and releases them.

        Raises:
            RuntimeError: A tapped module did not run in the captured forward pass.
        """
        missing = [path for path in self.paths if path not in self._captured]
        if missing:
            self._captured.clear()
            raise RuntimeError(
                f"the {self.role}'s tapped modules {missing} did not run during its forward pass; "
                "tap modules that forward() actually calls"
            )
        features = [self._captured[path] for path in self.paths]
        self._captured.clear()
        return features

    def remove(self) -> None:
        """Removes the hooks; the model is left as it was."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"FeatureTaps({self.role}, {self.paths})"
