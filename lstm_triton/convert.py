"""Migration: swap ``torch.nn.LSTM`` / ``LSTMCell`` modules of a model for ours in place, and back.

A module is moved whole, not rebuilt: the new module is created without running ``__init__`` and takes over the
old one's instance state. So everything a model put on its LSTM carries across: the parameters themselves (the
same ``Parameter`` objects: device, dtype, values, optimizer state keyed by parameter, ties between modules),
buffers, plain attributes, the training flag, every kind of hook (the same hook dictionaries, so handles
returned before the move still remove them), ``torch.nn.utils.parametrize`` parametrizations, and parameters
removed on purpose (the weight-drop pattern: the name stays unregistered and is read at forward time).
"""
from __future__ import annotations

import types
from typing import Optional

from torch import nn
from torch.nn.modules.module import _WrappedHook
from torch.nn.utils import parametrize

from .modules import LSTM, LSTMCell

__all__ = ["convert", "to_torch"]

# What torch.nn.utils.parametrize puts into the class it creates (besides one property per parametrized tensor).
_PARAMETRIZED_CLASS_ENTRIES = {
    "__getstate__", "__deepcopy__", "__module__", "__doc__", "__qualname__", "__dict__", "__weakref__",
    "__static_attributes__", "__firstlineno__",
}
# Instance containers that describe the module's structure: copied, so the old and the new module do not
# change each other's structure; what they contain (tensors, submodules) is shared.
_STRUCTURE = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def _swap(model: nn.Module, pairs, moved: dict) -> nn.Module:
    def make(old: nn.Module) -> Optional[nn.Module]:
        if id(old) in moved:  # a module registered in several places stays one module
            return moved[id(old)]
        # A parametrized module's class is a subclass created by torch.nn.utils.parametrize.
        base = parametrize.type_before_parametrizations(old)
        for src, dst in pairs:
            if base is src:
                moved[id(old)] = _move(old, dst)
                return moved[id(old)]
        return None

    root = make(model)
    if root is not None:
        return root
    for name, child in list(model._modules.items()):
        if child is None:
            continue
        new = make(child)
        if new is not None:
            setattr(model, name, new)
        else:
            _swap(child, pairs, moved)
    return model


def _describe(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _check_movable(old: nn.Module, cls: type) -> None:
    """Refuse, naming it, state that cannot follow the module to its new class."""
    if getattr(old, "recurrent_dropout", 0) and not issubclass(cls, LSTM):
        raise TypeError(
            f"to_torch: this LSTM uses recurrent_dropout={old.recurrent_dropout}, which torch.nn.LSTM does not "
            "have; set it to 0 first if the torch module should run without it"
        )
    if "forward" in old.__dict__:
        raise TypeError(
            f"convert/to_torch: this {_describe(old)} has its own `forward` set on the instance; the replacement "
            "module would keep calling it instead of its own forward. Convert before patching forward."
        )
    if old.__dict__.get("_compiled_call_impl") is not None:
        raise TypeError(
            f"convert/to_torch: this {_describe(old)} was compiled in place with Module.compile(); the compiled "
            "code belongs to the old module. Convert first, then compile."
        )
    if parametrize.is_parametrized(old):
        extra = sorted(set(vars(type(old))) - _PARAMETRIZED_CLASS_ENTRIES - set(old.parametrizations))
        if extra or type(old).__bases__ != (parametrize.type_before_parametrizations(old),):
            raise TypeError(
                f"convert/to_torch: the parametrized class {_describe(old)} carries more than torch.nn.utils."
                f"parametrize puts there ({', '.join(extra) or 'its bases'}); it cannot be recreated for the new "
                "module."
            )


def _rebind(value, old: nn.Module, new: nn.Module):
    """Things in the module's state that point at the old module itself point at the new one instead."""
    if value is old:
        return new
    if isinstance(value, types.MethodType) and value.__self__ is old:
        return types.MethodType(value.__func__, new)
    if isinstance(value, _WrappedHook) and value.with_module and value.module() is old:
        # load_state_dict pre-hooks hold a weak reference to their module.
        return _WrappedHook(value.hook, new)
    return value


def _move(old: nn.Module, cls: type) -> nn.Module:
    _check_movable(old, cls)
    new = cls.__new__(cls)
    state = {}
    for key, value in old.__dict__.items():
        if key in _STRUCTURE:
            value = type(value)(value)
        elif "_hooks" in key and isinstance(value, dict):
            # The same dictionaries (a RemovableHandle finds its hook there by weak reference); entries bound to
            # the old module are re-bound in place.
            for hook_id, hook in list(value.items()):
                value[hook_id] = _rebind(hook, old, new)
        else:
            value = _rebind(value, old, new)
        state[key] = value
    new.__dict__.update(state)

    if parametrize.is_parametrized(old):
        # The class torch.nn.utils.parametrize would have made for `cls`, made by parametrize itself: a subclass
        # with one property per parametrized tensor, computed from new.parametrizations at every access.
        parametrize._inject_new_class(new)
        for name in new.parametrizations:
            parametrize._inject_property(new, name)

    if isinstance(new, nn.RNNBase):
        # Own copies of the lists (RNNBase.__setattr__ writes into _flat_weights in place) with the same entries:
        # the weights the old module would have run with. Its forward re-reads them from the attributes when
        # they change (RNNBase._update_flat_weights), so a weight removed on purpose, replaced or parametrized is
        # read at forward time as in torch.
        new._flat_weights_names = list(new._flat_weights_names)
        new._all_weights = [list(names) for names in new._all_weights]
        new._flat_weights = list(new._flat_weights)
        new._flat_weight_refs = list(new._flat_weight_refs)
        new.flatten_parameters()  # torch's module (to_torch) on cuDNN wants them in one buffer; ours: no-op
    return new


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` in ``model`` (or ``model`` itself) by
    :class:`lstm_triton.LSTM` / :class:`lstm_triton.LSTMCell`, moving each module's whole state over (parameters,
    buffers, attributes, hooks, parametrizations; see the module docstring). Returns the model (a new object only
    when ``model`` itself was an LSTM). The old module objects are retired: they still hold the same tensors, but
    share their hooks with the new modules. Subclasses of the torch modules are left alone: their forward may do
    more than the torch module's. State that cannot follow (a ``forward`` patched onto the instance, an in-place
    ``Module.compile()``) raises ``TypeError`` naming it."""
    return _swap(model, ((nn.LSTM, LSTM), (nn.LSTMCell, LSTMCell)), {})


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: back to ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` (e.g. for
    ``torch.ao.quantization.quantize_dynamic``, which matches the exact torch types), with the same guarantees."""
    return _swap(model, ((LSTM, nn.LSTM), (LSTMCell, nn.LSTMCell)), {})
