"""Copy-on-write edits of module trees (private): light copies that share every child, replacing one module
of a tree without touching another path to it, the module tree of one more use of a reused block, and the check
that a block fits where another is."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from reuse._errors import ReuseError

__all__ = ["check_same_structure", "clone_for_use", "replace_at", "shallow_copy"]


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the same attributes, whose registries (children, parameters, buffers,
    hooks) are new dicts holding the same objects, so that replacing a child does not touch ``module``."""
    new = copy.copy(module)
    for name, value in vars(module).items():
        if isinstance(value, dict):
            setattr(new, name, copy.copy(value))
        elif isinstance(value, set):
            setattr(new, name, set(value))
    return new


def replace_at(root: nn.Module, path: str, new: nn.Module, owned: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """Set ``root.<path> = new`` (copy on write): each module on the way that is not ``owned`` (may be seen by
    another path, or was handed in by the user) is first replaced by a light copy of its own, so that nothing
    else sees the change. Returns the copies made, in path order.

    Example:
        >>> shared = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        >>> root = nn.ModuleList([shared, shared])
        >>> made = replace_at(root, "1.0", nn.Identity(), owned=lambda m: False)
        >>> type(root[1][0]).__name__, type(root[0][0]).__name__, made[0] is root[1]
        ('Identity', 'Conv2d', True)
    """
    *ancestors, leaf = path.split(".")
    made = []
    parent = root
    for name in ancestors:
        child = parent._modules[name]
        if not owned(child):
            child = shallow_copy(child)
            parent._modules[name] = child
            made.append(child)
        parent = child
    parent._modules[leaf] = new
    return made


def _has_per_use(module: nn.Module, is_per_use: Callable[[nn.Module], bool]) -> bool:
    return any(is_per_use(m) for m in module.modules())


def clone_for_use(
    template: nn.Module,
    is_per_use: Callable[[nn.Module], bool],
    source: nn.Module | None = None,
    memo: dict[int, nn.Module] | None = None,
) -> nn.Module:
    """The module tree of one more use: per-use modules deep-copied (from ``source`` where given, which
    has ``template``'s structure), everything else the very same objects as in ``template``.

    One module object stays one object within the use: a BatchNorm held under two attribute names gets one
    copy, seen under both (``memo`` maps each template module to its counterpart in the new use).
    """
    memo = {} if memo is None else memo
    if id(template) in memo:
        return memo[id(template)]
    source = template if source is None else source
    if is_per_use(template):
        new = copy.deepcopy(source)
    elif not _has_per_use(template, is_per_use):
        new = template
    else:
        new = shallow_copy(template)
        for name, child in template._modules.items():  # every name, aliases included
            if child is not None:
                new._modules[name] = clone_for_use(child, is_per_use, source._modules[name], memo)
    memo[id(template)] = new
    return new


def _shapes(module: nn.Module, recurse: bool) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(t.shape)) for n, t in module.named_parameters(recurse=recurse, remove_duplicate=False)]


def _same_structure(template: nn.Module, other: nn.Module, is_per_use: Callable[[nn.Module], bool]) -> bool:
    """Whether ``other`` fits where ``template`` is, as :func:`clone_for_use` uses it: a per-use module
    (decided on the template, like there) is copied whole from ``other``, so it needs only the same
    parameter shapes (a block's ``nn.Identity`` where the others hold ``DropPath`` is fine); any other
    module must have the same class, parameter shapes and children."""
    if is_per_use(template):
        return _shapes(template, True) == _shapes(other, True)
    if type(template) is not type(other) or _shapes(template, False) != _shapes(other, False):
        return False
    names = [n for n, c in template.named_children()]
    if names != [n for n, c in other.named_children()]:
        return False
    return all(_same_structure(c, other.get_submodule(n), is_per_use) for n, c in template.named_children())


def check_same_structure(
    first: nn.Module, other: nn.Module, index: int, is_per_use: Callable[[nn.Module], bool]
) -> None:
    if not _same_structure(first, other, is_per_use):
        raise ReuseError(
            f"LayerReuse.from_blocks: block {index} ({type(other).__name__}) differs in structure from block 0 "
            f"({type(first).__name__}); all blocks must have the same submodules and parameter shapes"
        )
