"""A small directed acyclic graph: deterministic topological order, cycles named by their path."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

Node = TypeVar("Node", bound=Hashable)


class CycleError(ValueError):
    """The graph has a cycle; `cycle` lists its nodes, first node repeated at the end."""

    def __init__(self, cycle: list) -> None:
        self.cycle = cycle
        super().__init__("dependency cycle: " + " -> ".join(str(n) for n in cycle))


class DAG(Generic[Node]):
    """Nodes with their upstream dependencies (`node -> the nodes it reads`)."""

    def __init__(self, graph: Mapping[Node, Iterable[Node]] | None = None) -> None:
        self._upstream: dict[Node, set[Node]] = {}
        for node, deps in (graph or {}).items():
            self.add(node, deps)

    def add(self, node: Node, deps: Iterable[Node] = ()) -> None:
        """Add `node` reading `deps`; dependencies not added yet become nodes of their own."""
        self._upstream.setdefault(node, set()).update(deps)
        for dep in list(self._upstream[node]):
            self._upstream.setdefault(dep, set())

    def upstream(self, node: Node) -> set[Node]:
        return set(self._upstream[node])

    def sorted(self) -> list[Node]:
        """Every node after all of its dependencies; ties broken by name so runs repeat exactly.

        Raises:
            CycleError: with the path of one cycle, e.g. `a -> b -> a`.
        """
        cycle = self.find_cycle()
        if cycle:
            raise CycleError(cycle)
        done: list[Node] = []
        placed: set[Node] = set()
        # Repeatedly take the smallest ready node: O(n^2), fine for tens of models, and stable.
        while len(done) < len(self._upstream):
            ready = sorted(
                (n for n, deps in self._upstream.items() if n not in placed and deps <= placed), key=str
            )
            done.append(ready[0])
            placed.add(ready[0])
        return done

    def find_cycle(self) -> list[Node] | None:
        """One cycle as a path whose last node repeats its first, or None."""
        state: dict[Node, str] = {}
        for start in sorted(self._upstream, key=str):
            path = self._cycle_from(start, state, [])
            if path:
                return path
        return None

    def _cycle_from(self, node: Node, state: dict[Node, str], stack: list[Node]) -> list[Node] | None:
        # Depth-first along dependencies; meeting a node still on the stack closes a cycle.
        if state.get(node) == "done":
            return None
        if state.get(node) == "open":
            return stack[stack.index(node) :] + [node]
        state[node] = "open"
        stack.append(node)
        for dep in sorted(self._upstream[node], key=str):
            path = self._cycle_from(dep, state, stack)
            if path:
                return path
        stack.pop()
        state[node] = "done"
        return None
