"""An undo log for in-place edits of Keras objects (used by the graph switch).

Each object's `__dict__` is copied before its first change, and callers never
edit a container that existed before; they replace it with an edited copy. So
restoring the copies is a complete undo, even after a failure part-way.
"""

from __future__ import annotations

from typing import Any

from keras.src.utils import tracking

# Containers TF's `_track_trackable` edits in place.
_TF_DEPENDENCY_ATTRS = (
    "_self_unconditional_checkpoint_dependencies",
    "_self_unconditional_dependency_names",
    "_self_unconditional_deferred_dependencies",
)


class Journal:
    """Undo log: each object's `__dict__` is copied before its first change.

    Callers never edit a container that existed before the swap; they replace it
    with an edited copy. Restoring the copies is then a complete undo.
    """

    def __init__(self) -> None:
        self._saved: list[tuple[object, dict]] = []
        self._seen: set[int] = set()
        self._isolated: set[int] = set()

    def snapshot(self, obj: object) -> None:
        if id(obj) not in self._seen:
            self._seen.add(id(obj))
            self._saved.append((obj, dict(vars(obj))))

    def set_raw(self, obj: object, name: str, value: Any) -> None:
        """Write an attribute as Keras does with tracking off: no Keras or TF tracking."""
        self.snapshot(obj)
        vars(obj)[name] = value

    def set_tracked(self, obj: object, name: str, value: Any) -> None:
        """Write an attribute as Keras does under `DotNotTrackScope`: TF records the dependency."""
        self.isolate_tf_dependencies(obj)
        with tracking.DotNotTrackScope():
            setattr(obj, name, value)

    def isolate_tf_dependencies(self, obj: object) -> None:
        """Give `obj` its own copies of the containers TF's `_track_trackable` edits in place."""
        self.snapshot(obj)
        if id(obj) not in self._isolated:
            self._isolated.add(id(obj))
            vars(obj).update(copy_state(obj))

    def replace_store(self, tracker: tracking.Tracker, store: str, items: list) -> list:
        """Point a Keras `Tracker` store at a new list of `items` and return that list."""
        self.snapshot(tracker)
        check, _ = tracker.config[store]
        new_list = list(items)
        tracker.config = {**tracker.config, store: (check, new_list)}
        tracker.stored_ids = {**tracker.stored_ids, store: {id(x) for x in new_list}}
        return new_list

    def rollback(self) -> None:
        while self._saved:
            obj, saved = self._saved.pop()
            vars(obj).clear()
            vars(obj).update(saved)
        self._seen.clear()
        self._isolated.clear()


def copy_state(obj_or_state) -> dict:
    """A copy of an object's `__dict__`, with its own TF dependency containers."""
    state = dict(obj_or_state if isinstance(obj_or_state, dict) else vars(obj_or_state))
    for name in _TF_DEPENDENCY_ATTRS:
        if isinstance(state.get(name), (list, dict)):
            state[name] = type(state[name])(state[name])
    return state
