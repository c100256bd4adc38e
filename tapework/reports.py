"""Evaluation reports: per-class / per-bin tables (pandas), plot data for `dvc plots`, a PNG summary."""

from __future__ import annotations

import io
import typing
from pathlib import Path

import numpy as np

from tapework.io import atomic_write_bytes, atomic_write_text

if typing.TYPE_CHECKING:
    import pandas as pd


def class_scores(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support per class (float64 arrays) from a confusion matrix (rows: actual)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positives = np.diag(confusion)
    predicted = confusion.sum(axis=0)
    support = confusion.sum(axis=1)
    # divide-by-zero (a class never predicted or absent) yields 0, as scikit-learn's zero_division=0.
    precision = np.divide(true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0)
    recall = np.divide(true_positives, support, out=np.zeros_like(true_positives), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positives), where=denominator > 0)
    return precision, recall, f1, support


def per_class_report(confusion: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class, plus macro and support-weighted averages."""
    import pandas as pd  # imported here, as in regression_report: the export stage scores classes without tables

    precision, recall, f1, support = class_scores(confusion)
    table = pd.DataFrame({"class": class_names, "precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)})
    weights = support / max(support.sum(), 1.0)
    averages = pd.DataFrame(
        {
            "class": ["macro avg", "weighted avg"],
            "precision": [precision.mean(), (precision * weights).sum()],
            "recall": [recall.mean(), (recall * weights).sum()],
            "f1": [f1.mean(), (f1 * weights).sum()],
            "support": [int(support.sum())] * 2,
        }
    )
    return pd.concat([table, averages], ignore_index=True)


def regression_report(actual: np.ndarray, predicted: np.ndarray, bins: int = 5) -> pd.DataFrame:
    """Errors per quantile bin of the true target: shows where the model is worst (e.g. the top end)."""
    import pandas as pd  # imported here: about 0.25 s that the export stage does not need

    frame = pd.DataFrame({"actual": actual.astype(np.float64), "predicted": predicted.astype(np.float64)})
    frame["bin"] = pd.qcut(frame["actual"], q=bins, duplicates="drop")
    frame["error"] = frame["predicted"] - frame["actual"]
    grouped = frame.groupby("bin", observed=True)["error"]
    table = pd.DataFrame(
        {
            "target_range": [str(interval) for interval in grouped.groups.keys()],
            "count": grouped.size().to_numpy(),
            "mae": grouped.apply(lambda errors: errors.abs().mean()).to_numpy(),
            "rmse": grouped.apply(lambda errors: float(np.sqrt((errors**2).mean()))).to_numpy(),
            "bias": grouped.mean().to_numpy(),
        }
    )
    return table


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    # Fixed float format so the same numbers always give the same bytes.
    atomic_write_text(path, table.to_csv(sep="\t", index=False, float_format="%.6f", lineterminator="\n"))


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    atomic_write_text(path, frame.to_csv(index=False, float_format="%.6g", lineterminator="\n"))


def summary_figure(history: pd.DataFrame, task: str, confusion: np.ndarray | None, class_names: list[str], actual: np.ndarray, predicted: np.ndarray, path: str | Path) -> None:
    """One PNG for people who do not open `dvc plots`: curves + confusion matrix or predicted-vs-actual."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    metric = "accuracy" if task == "classification" else "mae"
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for split in ("train", "val"):
        axes[0].plot(history["epoch"], history[f"{split}_loss"], label=f"{split} loss")
        axes[1].plot(history["epoch"], history[f"{split}_{metric}"], label=f"{split} {metric}")
    for axis, title in zip(axes[:2], ("loss", metric)):
        axis.xaxis.get_major_locator().set_params(integer=True)  # epochs are whole numbers
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.legend()
    if confusion is not None:
        axes[2].imshow(confusion, cmap="Blues")
        if len(class_names) <= 20:  # beyond that the numbers would not be readable
            threshold = confusion.max() / 2
            for (row, column), count in np.ndenumerate(confusion):
                if count:
                    axes[2].text(column, row, str(count), ha="center", va="center", fontsize=7, color="white" if count > threshold else "black")
        axes[2].set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=7)
        axes[2].set_yticks(range(len(class_names)), class_names, fontsize=7)
        axes[2].set_xlabel("predicted")
        axes[2].set_ylabel("actual")
        axes[2].set_title("test confusion matrix")
    else:
        axes[2].scatter(actual, predicted, s=4, alpha=0.4)
        low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
        axes[2].plot([low, high], [low, high], color="black", linewidth=1)
        axes[2].set_xlabel("actual")
        axes[2].set_ylabel("predicted")
        axes[2].set_title("test: predicted vs actual")
    figure.tight_layout()
    buffer = io.BytesIO()
    # No "Software"/date metadata: the PNG bytes then depend only on the pixels.
    figure.savefig(buffer, format="png", dpi=80, metadata={"Software": None})
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


