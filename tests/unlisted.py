"""A dataset index's view of a split's paths that refuses to be listed, for tests that a loader or task serves
the compact index as it is (shared by the DALI and regression tests)."""

from __future__ import annotations

from fasttrain.data.index import IndexedPaths


class UnlistedPaths(IndexedPaths):
    """The dataset index's view of a split's paths that refuses to be listed: code that builds a ``str`` per
    sample up front (``list(paths)``, a comprehension, ``zip``) fails; indexing one path at a time works."""

    def __iter__(self):
        raise AssertionError("a list of every path was built from the dataset index's view")

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return UnlistedPaths(got.table, got.ids) if isinstance(got, IndexedPaths) else got

    def take(self, indices):
        return UnlistedPaths(self.table, super().take(indices).ids)

    def __repr__(self) -> str:
        return f"UnlistedPaths({len(self)} paths)"
