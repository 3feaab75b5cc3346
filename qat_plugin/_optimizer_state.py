"""Laying a built optimizer's state out for a new list of trainable variables.

Part of the in-place switch (see `_switch.py`): relies on Keras 3.15 optimizer
internals (`_variables`, `_trainable_variables`, `_trainable_variables_indices`,
the tracker, and the slot variables `build()` makes).
"""

from __future__ import annotations

import collections
from typing import Any, Callable

import keras
from keras.src import backend
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer
from keras.src.utils import tracking

from qat_plugin._journal import Journal, copy_state
from qat_plugin.errors import SwapError


def realign_optimizer(optimizer: BaseOptimizer, variables: list) -> None:
    """Lay a built optimizer's state out for `variables`, keeping existing slots.

    Afterwards the optimizer is as if `optimizer.build(variables)` had been called
    (same variable order, which `.keras` files rely on: optimizer state is loaded
    by position), except that the slots of variables it already tracked are the
    same objects, with their values. New variables get fresh slots; variables no
    longer listed lose theirs. Nothing happens when the variables are unchanged,
    or when the optimizer is not built yet (it builds at its first step).

    Slot lists are attributes private to each optimizer class (`_momentums`,
    `momentums`, ...), so rather than knowing them, this runs the optimizer's own
    `build()` twice with `add_variable_from_reference` / `add_variable`
    intercepted: on the old variables, to learn which (model variable, slot name)
    each existing slot stands for, then on the new ones, handing back the existing
    slot for every known pair. Variables `build()` makes directly (Nadam's
    `_u_product`, Adafactor's placeholders) are recreated and get the old values
    by creation order. On failure the optimizer is restored and `SwapError` raised.
    """
    journal = Journal()
    try:
        realign(optimizer, list(variables), journal)
    except Exception as exc:
        journal.rollback()
        raise SwapError(f"Could not realign optimizer '{optimizer.name}'; it was restored. Cause: {exc}") from exc


def realign(optimizer: BaseOptimizer, variables: list, journal: Journal) -> None:
    if isinstance(optimizer, LossScaleOptimizer):
        # Its own state (loss scale, step counter) does not depend on the variables.
        realign(optimizer.inner_optimizer, variables, journal)
        if optimizer.built:
            indices = {optimizer._var_key(v): i for i, v in enumerate(variables)}
            journal.set_raw(optimizer, "_trainable_variables_indices", indices)
            journal.set_raw(optimizer, "_trainable_variables", list(variables))
        return
    if not optimizer.built:
        return
    old_vars = list(optimizer._trainable_variables)
    if [optimizer._var_key(v) for v in old_vars] == [optimizer._var_key(v) for v in variables]:
        return  # Same variables in the same order: every slot already fits.
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        raise SwapError("MultiOptimizer can't follow a change of the trainable variables.")
    journal.snapshot(optimizer._tracker)
    journal.isolate_tf_dependencies(optimizer)
    original = list(optimizer._variables)
    own = (optimizer._iterations, getattr(optimizer, "_learning_rate", None))
    n_pre = 0  # Variables made in `__init__` (iterations, learning rate) come first.
    while n_pre < len(original) and any(original[n_pre] is v for v in own):
        n_pre += 1
    saved = copy_state(optimizer)

    # Replay the original build to learn what each existing slot stands for.
    roles = _RecordRoles(optimizer)
    _run_build(optimizer, old_vars, original[:n_pre], roles, journal)
    replayed, created = optimizer._variables[n_pre:], original[n_pre:]
    if len(replayed) != len(created):
        raise SwapError(f"replaying build() made {len(replayed)} optimizer variables, there are {len(created)}")
    by_role, direct = {}, []
    for stand_in, variable in zip(replayed, created):
        role = roles.role_of(stand_in)
        if role is None:
            direct.append(variable)
        elif tuple(stand_in.shape) != tuple(variable.shape):
            raise SwapError(f"optimizer variable {variable.path} does not have its replayed shape {stand_in.shape}")
        else:
            by_role[role] = variable
    vars(optimizer).clear()
    vars(optimizer).update(copy_state(saved))

    # Build for the new variables, handing back the existing slot where there is one.
    reuse = _ReuseSlots(optimizer, by_role)
    with backend.name_scope(optimizer.name, caller=optimizer):
        _run_build(optimizer, variables, original[:n_pre], reuse, journal)
    remade = [v for v in optimizer._variables[n_pre:] if reuse.role_of(v) is None]
    for new, old in zip(remade, direct):
        if tuple(new.shape) == tuple(old.shape) and new.dtype == old.dtype:
            new.assign(old)


def _run_build(optimizer: BaseOptimizer, variables: list, pre: list, hooks: _Hooks, journal: Journal) -> None:
    """Run `optimizer.build(variables)` from scratch with creation hooks installed."""
    state = vars(optimizer)
    state["_variables"] = journal.replace_store(optimizer._tracker, "variables", pre)
    state["_trainable_variables_indices"] = tracking.TrackedDict({}, optimizer._tracker)
    state["built"] = False
    # Instance attributes shadow the methods, so `build()` calls the hooks.
    state["add_variable_from_reference"], state["add_variable"] = hooks.functions()
    try:
        optimizer.build(variables)
    finally:
        state.pop("add_variable_from_reference", None)
        state.pop("add_variable", None)
    state["built"] = True


class _Hooks:
    """Intercepts an optimizer's variable creation and names each slot's role.

    A role is ("ref", key of the model variable, slot name, n) for a slot made from
    a model variable, and ("plain", name, n) for another `add_variable` call; `n`
    counts repeats, so roles are unique. Subclasses decide what to hand out.
    """

    def __init__(self, optimizer: BaseOptimizer) -> None:
        self.optimizer = optimizer
        self._counts: collections.Counter = collections.Counter()
        self._in_reference_call = 0
        self._roles: dict[int, tuple] = {}
        self._handed_out: list = []  # Keeps the objects alive, so their ids stay theirs.

    def role_of(self, obj: Any) -> tuple | None:
        return self._roles.get(id(obj))

    def functions(self) -> tuple[Callable, Callable]:
        real_reference = type(self.optimizer).add_variable_from_reference.__get__(self.optimizer)
        real_plain = type(self.optimizer).add_variable.__get__(self.optimizer)

        def add_variable_from_reference(reference_variable, name=None, initializer="zeros"):
            def create():
                return real_reference(reference_variable, name, initializer)

            role = self._role(("ref", self.optimizer._var_key(reference_variable), name or "var"))
            self._in_reference_call += 1
            try:
                return self._hand_out(role, reference_variable.shape, create, reference_variable)
            finally:
                self._in_reference_call -= 1

        def add_variable(shape, initializer="zeros", dtype=None, aggregation="none", layout=None, name=None):
            def create():
                return real_plain(shape, initializer, dtype, aggregation, layout, name)

            if self._in_reference_call:  # Made for `add_variable_from_reference`: role known.
                return create()
            return self._hand_out(self._role(("plain", name)), shape, create)

        return add_variable_from_reference, add_variable

    def _role(self, base: tuple) -> tuple:
        self._counts[base] += 1
        return base + (self._counts[base],)

    def _hand_out(self, role: tuple, shape, create: Callable, reference=None) -> Any:
        obj = self._provide(role, shape, create, reference)
        self._roles[id(obj)] = role
        self._handed_out.append(obj)
        return obj

    def _provide(self, role: tuple, shape, create: Callable, reference) -> Any:
        raise NotImplementedError


class _StandIn:
    """What the replay hands out instead of a slot: its shape, no memory."""

    def __init__(self, shape) -> None:
        self.shape = tuple(shape)


class _RecordRoles(_Hooks):
    """Replay: hand out stand-ins, tracked in creation order."""

    def _provide(self, role, shape, create, reference):
        stand_in = _StandIn(shape)
        self.optimizer._tracker.add_to_store("variables", stand_in)
        return stand_in


class _ReuseSlots(_Hooks):
    """Rebuild: hand back the existing slot for a known role, create the others."""

    def __init__(self, optimizer: BaseOptimizer, by_role: dict) -> None:
        super().__init__(optimizer)
        self._by_role = by_role

    def _provide(self, role, shape, create, reference):
        existing = self._by_role.get(role)
        if existing is not None:
            self.optimizer._tracker.add_to_store("variables", existing)
            return existing
        slot = create()
        if role[0] == "ref" and role[2] == "average" and self.optimizer.use_ema:
            # An EMA made mid-training must start at the variable, not at zero: Keras
            # copies the variable in only at step 0, and `fit` ends by writing the
            # averages into the model.
            slot.assign(reference)
        return slot
