"""A cheaper `import tensorflow` for the stage processes and the predict command: Keras's optional
integrations are skipped.

`import tensorflow` imports Keras, and Keras imports scikit-learn (for its scikit-learn wrappers),
matplotlib.pyplot (for `plot_image_gallery`) and pandas (for DataFrame inputs to `fit`) whenever
they are installed; TensorFlow's legacy Keras engine imports scipy.sparse (for sparse inputs to
`fit`). This project installs all four for its own reasons (scikit-learn ships the default digits
data set and brings SciPy, which tapework.stats uses; matplotlib draws summary.png; pandas reads
CSV files), and no stage uses those Keras features, yet every stage that imports TensorFlow paid
for them: measured by `benchmarks/startup.py` (README, Performance).

`skip_keras_extras()` installs an import hook that makes `SKIPPED` unimportable *only while a
module in `LOADING` is being imported*. Keras then treats them as absent, as it does on a machine
without them: its scikit-learn wrappers and image gallery do not work in that process. Imported
at any other time they load normally (the download stage's digits, the evaluate stage's charts
and pandas tables), and one already imported before TensorFlow is left alone. Nothing numeric
changes: none of the skipped packages takes part in a forward or backward pass.

The hook counts imports in progress, so it assumes TensorFlow loads on the main thread while no
other thread imports one of `SKIPPED` (true of every stage: they import at start-up).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# Imported by Keras (scipy: by TensorFlow's legacy Keras engine) only when installed; no stage uses them through Keras.
SKIPPED = frozenset({"sklearn", "matplotlib", "pandas", "scipy"})
# While one of these top-level packages is being imported, SKIPPED cannot be imported.
LOADING = frozenset({"tensorflow", "keras"})


class _CountingLoader(importlib.abc.Loader):
    """Runs the real loader while the hook counts one more import of a LOADING package in progress."""

    def __init__(self, loader: importlib.abc.Loader, hook: SkipWhileLoading) -> None:
        self.loader, self.hook = loader, hook

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # The module keeps its real loader (importlib.resources and pkgutil ask it for files).
        module.__loader__ = module.__spec__.loader = self.loader
        self.hook.loading += 1
        try:
            self.loader.exec_module(module)
        finally:
            self.hook.loading -= 1


class SkipWhileLoading(importlib.abc.MetaPathFinder):
    """The import hook: refuses `skipped` packages while a `loading` package imports; otherwise finds nothing."""

    def __init__(self, skipped: frozenset[str] = SKIPPED, loading: frozenset[str] = LOADING) -> None:
        self.skipped, self.watched = skipped, loading
        self.loading = 0  # imports of watched packages in progress

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        if self.loading and name.partition(".")[0] in self.skipped:
            raise ModuleNotFoundError(f"No module named {name!r} (skipped while TensorFlow loads: tapework.lean_import)", name=name)
        if name not in self.watched:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _CountingLoader(spec.loader, self)
        return spec


def skip_keras_extras() -> None:
    """Install the hook (once), before anything imports TensorFlow or Keras."""
    if not any(isinstance(finder, SkipWhileLoading) for finder in sys.meta_path):
        sys.meta_path.insert(0, SkipWhileLoading())
