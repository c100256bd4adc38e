"""The catalogue: one entry per data set and per model family, and the choices params offer.

This is the base layer: it imports nothing from tapework and no TensorFlow, so validating
params (and the cheap checks that run before any stage) can read it. Adding a data set whose
files come in a format listed in `FORMATS` is one `DatasetSpec` entry in `DATASETS`; adding a
model family is one `ModelFamily` entry in `MODELS`, plus its builder class in
`tapework/models.py` and its settings section in `tapework/params.py` and `params.yaml`.
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("classification", "regression")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "exponential", "step")
NORMALIZATIONS = ("standard", "minmax", "none")
STRATEGIES = ("none", "mirrored", "multi_worker")
NONFINITE_POLICIES = ("error", "skip")
# How preprocess writes the prepared data (tapework/preprocess.py, tapework/shards.py).
PREPARED_FORMATS = ("arrays", "shards", "auto")
# The metrics a split reports, per task (tapework/metrics.py, MetricSet); the first is the loss.
METRICS = {
    "classification": ("loss", "accuracy", "huber"),
    "regression": ("loss", "mae", "rmse", "r2", "huber"),
}
# Computed on the test split only, from the per-class report (tapework/evaluation.py).
TEST_ONLY_METRICS = {"classification": ("macro_f1",), "regression": ()}
SPLITS = ("train", "val", "test")
HIGHER_IS_BETTER_METRICS = frozenset({"accuracy", "r2", "macro_f1"})  # the others are errors: lower is better
# What early stopping may watch, per task: the validation metrics.
MONITORS = {task: tuple(f"val_{name}" for name in names) for task, names in METRICS.items()}
HIGHER_IS_BETTER = frozenset(name for names in MONITORS.values() for name in names if name.removeprefix("val_") in HIGHER_IS_BETTER_METRICS)


def split_metrics(task: str) -> tuple[str, ...]:
    """Every `<split>.<metric>` a run of `task` reports, as `dvc metrics show` names them."""
    return tuple(
        f"{split}.{name}" for split in SPLITS for name in METRICS[task] + (TEST_ONLY_METRICS[task] if split == "test" else ())
    )

# How a data set's raw files become arrays. Each format has one fetch and one load function in
# tapework/datasets.py (a test checks that every format here has both).
# idx_params: the IDX layout of `idx`, with pins, class names and image shape from download.idx
# (params.yaml) and the files' headers instead of this catalogue.
FORMATS = ("sklearn", "idx", "cifar10_binary", "california_housing", "csv", "idx_params")


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the cache, on a mirror and in data/raw
    url: str | None  # canonical URL; None = only reachable through a mirror
    sha256: str  # pinned SHA-256 of the canonical bytes
    size: int  # bytes of the canonical file: a download stops beyond it, a body of another length is refused


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: str | None  # None: taken from download.csv.task
    format: str  # one of FORMATS
    files: tuple[RemoteFile, ...] = ()  # pinned remote files (empty for bundled and csv data)
    # A bundled data set is what `sklearn.datasets.<sklearn_loader>(**sklearn_options)` returns. The
    # download stage records the loader in the manifest and reads the loader's own files from
    # scikit-learn's package data instead of calling it (tapework.datasets.bundled_arrays);
    # tests/test_datasets.py calls the loader and checks the arrays against it:
    sklearn_loader: str | None = None
    sklearn_options: tuple[tuple[str, object], ...] = ()
    bundled_files: tuple[str, ...] = ()  # the features file, then the target file unless it is the last column
    bundled_delimiter: str | None = None  # np.loadtxt's delimiter; None = whitespace
    feature_names: tuple[str, ...] = ()  # tabular bundled data: the loader's column names
    class_names: tuple[str, ...] = ()  # classification: names in label order
    image_shape: tuple[int, int, int] | None = None  # (height, width, channels); None = tabular
    target_name: str | None = None  # regression: what the target is
    target_units: str | None = None  # regression: the target's units
    images_from_files: bool = False  # images whose shape the files' headers give (image_shape None until loaded)

    @property
    def input_kind(self) -> str:
        return "image" if self.image_shape is not None or self.images_from_files else "tabular"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    builder: str  # class name in tapework.models; built there, so this module needs no TensorFlow
    inputs: tuple[str, ...]  # "image" and/or "tabular"
    tasks: tuple[str, ...] = TASKS
    # XLA for the single-device step: `allowed` False makes `jit_compile: true` a params error,
    # `auto` is what `jit_compile: auto` picks (measured; see each entry's comment).
    xla_allowed: bool = True
    xla_auto: bool = False


DIGIT_CLASSES = tuple(str(digit) for digit in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
)


def _idx_files(base_url: str, pins: tuple[str, str, str, str], sizes: tuple[int, int, int, int]) -> tuple[RemoteFile, ...]:
    return tuple(RemoteFile(name, base_url + name, pin, size) for name, pin, size in zip(IDX_FILES, pins, sizes, strict=True))


_DATASET_LIST = (
    DatasetSpec(
        "digits", "classification", "sklearn", sklearn_loader="load_digits", bundled_files=("digits.csv.gz",), bundled_delimiter=",",
        class_names=DIGIT_CLASSES, image_shape=(8, 8, 1),
    ),
    DatasetSpec(
        # scaled=False: the features as recorded (age in years, ...), not scikit-learn's rescaling.
        "diabetes", "regression", "sklearn", sklearn_loader="load_diabetes", sklearn_options=(("scaled", False),),
        bundled_files=("diabetes_data_raw.csv.gz", "diabetes_target.csv.gz"),
        feature_names=("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"),
        target_name="disease progression one year after baseline", target_units="score (25 to 346)",
    ),
    # TensorFlow Datasets' MNIST source (the CVDF mirror of yann.lecun.com); pins as in TFDS's checksums.
    DatasetSpec(
        "mnist", "classification", "idx",
        _idx_files(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
            (9_912_422, 28_881, 1_648_877, 4_542),
        ),
        class_names=DIGIT_CLASSES,
        image_shape=(28, 28, 1),
    ),
    # Keras' fashion_mnist.load_data() source; pins as in TFDS's / Keras' checksums.
    DatasetSpec(
        "fashion_mnist", "classification", "idx",
        _idx_files(
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            (
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
            (26_421_880, 29_515, 4_422_102, 5_148),
        ),
        class_names=FASHION_CLASSES,
        image_shape=(28, 28, 1),
    ),
    # The *binary* release (170,052,171 bytes, MD5 c32a1d4ab5d03f1284b67883e8d87530): never unpickle network data.
    DatasetSpec(
        "cifar10", "classification", "cifar10_binary",
        (
            RemoteFile(
                "cifar-10-binary.tar.gz",
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
                170_052_171,
            ),
        ),
        class_names=CIFAR10_CLASSES,
        image_shape=(32, 32, 3),
    ),
    # cal_housing.data is StatLib's "houses" data (Pace & Barry 1997, https://lib.stat.cmu.edu/datasets/houses.zip)
    # as repackaged by L. Torgo: member CaliforniaHousing/cal_housing.data of cal_housing.tgz
    # (https://www.dcc.fc.up.pt/~ltorgo/Regression/cal_housing.tgz; scikit-learn's copy,
    # https://ndownloader.figshare.com/files/5976036, is pinned at
    # aaa5c9a6afe2225cc2aed2723682ae403280c4a3695a2ddda4ffb5d8215ea681).
    # No canonical URL serves the bare file, so it is fetched only through download.mirror / TAPEWORK_MIRROR.
    DatasetSpec(
        "california_housing", "regression", "california_housing",
        (RemoteFile("cal_housing.data", None, "a2b44dcc7e1c9091b43c4f458b25cbd1f7e8068d08edd26bc4703108d3fa6214", 2_071_484),),
        target_name="median house value of a block group", target_units="US dollars (1990 census)",
    ),
    DatasetSpec("csv", None, "csv"),  # task, target and columns come from download.csv
    # MNIST-style IDX files of the user's own: path, pins and class names from download.idx.
    DatasetSpec("idx", "classification", "idx_params", images_from_files=True),
)
DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _DATASET_LIST}

_MODEL_LIST = (
    # auto XLA for the MLP families: on CPU their step is many small ops (Adam's update is ~20 per
    # variable), and one XLA cluster fuses them (README, Performance).
    ModelFamily("mlp", "MLP", inputs=("image", "tabular"), xla_auto=True),
    ModelFamily("residual_mlp", "ResidualMLP", inputs=("image", "tabular"), xla_auto=True),
    # XLA has no deterministic max-pool gradient, and op determinism is always on.
    ModelFamily("cnn", "CNN", inputs=("image",), xla_allowed=False),
    # Slower compiled on CPU: 6.4 s against 3.9 s per 100 steps, measured.
    ModelFamily("vit", "VisionTransformer", inputs=("image",)),
)
MODELS: dict[str, ModelFamily] = {family.name: family for family in _MODEL_LIST}


def dataset_task(name: str, csv_task: str) -> str:
    """`classification` or `regression` for data set `name` (csv: its configured task)."""
    return DATASETS[name].task or csv_task
