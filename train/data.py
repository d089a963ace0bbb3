"""Datasets as uint8 arrays in memory, decoded once and cached.

Every source (image-folder tree or zip, CIFAR-10 python batches, FER-2013 CSV, torchvision download)
ends as the same :class:`ImageData`: NHWC uint8 images, int64 labels, class names in sorted-folder
order, and mean/std computed from the dataset's own train split. The test split is only ever used
to evaluate a finished model; validation is carved out of train (:func:`split_validation`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import pickle
import stat
import sys
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .errors import DataError, ReslabWarning
from .files import file_lock

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# The format a suffix names, tried first: Pillow otherwise tries up to seven formats per image before WebP
# (CIFAR-10's 60,000 .webp members decode ~1.9 s sooner). A file whose suffix lies is decoded as before.
SUFFIX_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".gif": "GIF", ".webp": "WEBP",
                  ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}
CACHE_VERSION = 3  # 3: the test split's named parts (DatasetInfo.test_parts) are cached too
# A member or file larger than this is refused before it is read: dataset images are kilobytes, and a
# zip's declared size is what its decompression is cut at, so a zip bomb never gets decompressed.
MAX_IMAGE_BYTES = 64 << 20
# Images with more pixels are skipped from their header, before decoding (Pillow's own bomb limit,
# ~179 MP, would still decode 90 MP images: 270 MB each).
MAX_IMAGE_PIXELS = 25_000_000
# The official CIFAR-10 python batches (torchvision.datasets.CIFAR10.train_list/test_list/meta):
# they are pickles, which can run code when loaded, so nothing else is unpickled.
CIFAR_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    classes: tuple[str, ...]
    image_size: int
    channels: int
    # Named parts of the test split that published results quote on their own, told apart by the file name's
    # prefix before "_" (image folders and zips) or the CSV's Usage column: FER-2013's PrivateTest is the
    # challenge's final test set, the one its literature reports (e.g. 73.28% for the best single network),
    # while reslab's test split is PublicTest + PrivateTest.
    test_parts: tuple[str, ...] = ()


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        "cifar10",
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        32,
        3,
    ),
    "fer2013": DatasetInfo(
        "fer2013", ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"), 48, 1,
        ("PrivateTest", "PublicTest"),
    ),
}
# The label order of FER-2013's original challenge CSV.
FER_CSV_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")


@dataclass
class ImageData:
    name: str
    classes: list[str]
    train_x: np.ndarray  # (N, H, W, C) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    mean: list[float]  # per channel, on the 0..1 scale
    std: list[float]
    source: str = ""
    fingerprint: str = ""
    skipped: int = 0
    extra: dict = field(default_factory=dict)
    test_part: np.ndarray | None = None  # (N_test,) int8: index into DatasetInfo.test_parts, -1 for none

    def test_parts(self) -> dict[str, np.ndarray]:
        """{part name: indices into the test split}, for the parts the split has. Empty where the test
        arrays were replaced without ``test_part`` (a subset taken with ``dataclasses.replace``)."""
        part = self.test_part
        if part is None or len(part) != len(self.test_y) or self.name not in DATASETS:
            return {}
        names = DATASETS[self.name].test_parts
        return {n: idx for i, n in enumerate(names) if len(idx := np.flatnonzero(part == i))}

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def metadata(self) -> dict:
        """What a served model needs to preprocess inputs like training did."""
        return {
            "dataset": self.name,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


# --------------------------------------------------------------------------- locating the data


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def default_data_dir() -> Path | None:
    """``$RESLAB_DATA``, else ``../shared/datasets`` beside the project (or the working folder)."""
    env = os.environ.get("RESLAB_DATA")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), project_root()):
        cand = base.parent / "shared" / "datasets"
        if cand.is_dir():
            return cand
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("RESLAB_CACHE", Path.home() / ".cache" / "reslab")).expanduser()


def resolve_source(name: str, data: str | Path | None) -> tuple[str, Path]:
    """Return (kind, path) with kind in {folder, zip, cifar-batches, fer-csv}."""
    if data is None:
        data = default_data_dir()
        if data is None:
            raise DataError(
                f"no data for {name}: pass --data PATH, set RESLAB_DATA to a folder holding it, or use --download"
            )
    p = Path(data).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder (expected a {name} zip, image folder, or archive)")
    if p.is_dir():
        for cand in (p / f"{name}.zip", p / name, p / "cifar-10-batches-py", p / "fer2013.csv", p / "fer2013" / "fer2013.csv"):
            if cand.exists() and cand != p:
                if cand.name == "cifar-10-batches-py" and name != "cifar10":
                    continue
                if cand.suffix == ".csv" and name != "fer2013":
                    continue
                return resolve_source(name, cand)
        if (p / "train").is_dir() or (p / "test").is_dir():
            return "folder", p
        if (p / "data_batch_1").exists():
            return "cifar-batches", p
        raise DataError(
            f"{p}: expected train/<class>/<image> and test/<class>/<image>, {name}.zip, "
            "cifar-10-batches-py/ or fer2013.csv inside"
        )
    if p.suffix.lower() == ".zip":
        return "zip", p
    if p.suffix.lower() == ".csv":
        return "fer-csv", p
    raise DataError(f"{p}: unsupported file (expected a .zip image-folder archive or FER-2013's .csv)")


def fingerprint(path: Path) -> str:
    """Identity of a source: the bytes of every file in it (a copy made with ``cp -p`` or ``rsync -t``
    keeps size and mtime, so those cannot tell a changed file), their paths, and the decoder's version.
    Hashing CIFAR-10's 117 MB zip takes ~0.1 s, far less than decoding it."""
    from PIL import __version__ as pillow_version

    h = hashlib.sha256(f"v{CACHE_VERSION}|pillow {pillow_version}|numpy {np.__version__}".encode())
    files = [path] if path.is_file() else sorted(q for q in path.rglob("*") if q.is_file())
    for q in files:
        h.update(f"{q.resolve()}|{q.stat().st_size}|".encode())
        with open(q, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- readers


class ImageTooLarge(ValueError):
    """An image whose header declares more than MAX_IMAGE_PIXELS: skipped like an unreadable one."""


def _open(raw: bytes, suffix: str) -> Image.Image:
    """``raw`` opened as the format its file suffix names, else as whatever it is (header only)."""
    fmt = SUFFIX_FORMATS.get(suffix.lower())
    if fmt:
        try:
            return Image.open(io.BytesIO(raw), formats=[fmt])
        except UnidentifiedImageError:
            pass
    return Image.open(io.BytesIO(raw))


def _decode(raw: bytes, info: DatasetInfo, suffix: str = "") -> np.ndarray:
    with _open(raw, suffix) as im:  # reads the header only; Image.DecompressionBombError above ~179 MP
        if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(f"{im.size[0]}x{im.size[1]} pixels")
        im = im.convert("RGB" if info.channels == 3 else "L")
        if im.size != (info.image_size, info.image_size):
            im = im.resize((info.image_size, info.image_size), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr.reshape(info.image_size, info.image_size, info.channels)


def _split_members(names: list[str], where: Path) -> dict[str, dict[str, list[str]]]:
    """Group member paths as {split: {class: [members]}}; tolerates one wrapping folder."""
    tree: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for n in names:
        parts = n.strip("/").split("/")
        for i in range(min(2, len(parts))):
            if parts[i] in tree and len(parts) - i >= 2:
                split, cls, rest = parts[i], parts[i + 1], parts[i + 2 :]
                tree[split].setdefault(cls, [])
                if rest and Path(rest[-1]).suffix.lower() in IMAGE_SUFFIXES and not n.endswith("/"):
                    tree[split][cls].append(n)
                break
    for split in ("train", "test"):
        if not tree[split]:
            raise DataError(f"{where}: no {split}/<class>/<image> entries (expected train/ and test/ folders)")
    if set(tree["train"]) != set(tree["test"]):
        only_train = sorted(set(tree["train"]) - set(tree["test"]))
        only_test = sorted(set(tree["test"]) - set(tree["train"]))
        raise DataError(
            f"{where}: class folders differ between train and test (only in train: {only_train}, only in test: {only_test})"
        )
    for split in ("train", "test"):
        for cls, members in tree[split].items():
            if not members:
                raise DataError(f"{where}: class folder {split}/{cls} holds no images")
            members.sort()  # the same order from a folder as from its zip
    return tree


def part_of(label: str, info: DatasetInfo) -> int:
    """The index of ``label`` (a file name's prefix before "_", or a CSV Usage value) in ``info.test_parts``; -1."""
    return info.test_parts.index(label) if label in info.test_parts else -1


def _read_image_tree(info: DatasetInfo, path: Path, progress: bool) -> tuple:
    if path.is_dir():
        names = [q.relative_to(path).as_posix() + ("/" if q.is_dir() else "") for q in path.rglob("*")]
        read = lambda n: _read_file(path / n)  # noqa: E731
        zf = None
    else:
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: not a readable zip archive ({e})") from None
        names = zf.namelist()
        read = lambda n: _read_member(zf, n, path)  # noqa: E731
    try:
        tree = _split_members(names, path)
        classes = sorted(tree["train"])
        total = sum(len(m) for split in tree.values() for m in split.values())
        bar = tqdm(total=total, desc=f"decoding {path.name}", unit="img", disable=not progress, file=sys.stderr)
        out, skipped, parts, first_bad = [], 0, None, ""
        for split in ("train", "test"):
            x, y, parts, bad, first = _decode_members(info, read, [tree[split][c] for c in classes], bar)
            if not len(x):
                raise DataError(f"{path}: none of the {split} images could be decoded (first failure: {first})")
            out += [x, y]
            skipped, first_bad = skipped + bad, first_bad or first
        bar.close()
    finally:
        if zf is not None:
            zf.close()
    _warn_skipped(path, skipped, first_bad)
    return (*out, classes, skipped, parts)


def _warn_skipped(path: Path, skipped: int, first_bad: str) -> None:
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} unreadable image(s), first: {first_bad}", ReslabWarning, stacklevel=3)


def _decode_members(info: DatasetInfo, read, members: list[list[str]], bar) -> tuple:
    """Decode each class's members (label = position in ``members``): (x, y, test parts, skipped, first
    failure). An unreadable image is skipped (the caller warns once); a refused file stops the load."""
    xs, ys, parts, skipped, first_bad = [], [], [], 0, ""
    for label, names in enumerate(members):
        for member in names:
            bar.update()
            try:
                xs.append(_decode(read(member), info, Path(member).suffix))
                ys.append(label)
                parts.append(part_of(Path(member).name.split("_", 1)[0], info))
            except DataError:
                raise
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zipfile.BadZipFile,
                    Image.DecompressionBombError) as e:
                skipped += 1
                why = f"{type(e).__name__}: {e}" if isinstance(e, (ImageTooLarge, Image.DecompressionBombError)) else type(e).__name__
                first_bad = first_bad or f"{member} ({why})"
    shape = (0, info.image_size, info.image_size, info.channels)
    x = np.stack(xs) if xs else np.zeros(shape, np.uint8)
    return x, np.asarray(ys, dtype=np.int64), np.asarray(parts, np.int8), skipped, first_bad


def labelled_folder(path: str | Path | None, classes: list[str]) -> Path | None:
    """The folder of labelled images ``path`` names, if it is one on its own: ``<class>/<image>`` or
    ``test/<class>/<image>`` with no train/, each class one of ``classes``; None for a dataset source."""
    if path is None or not Path(path).expanduser().is_dir():
        return None
    root = Path(path).expanduser()
    if (root / "train").is_dir():
        return None
    root = root / "test" if (root / "test").is_dir() else root
    found = {c.name for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")}
    if not found & set(classes):
        return None
    if unknown := sorted(found - set(classes)):
        raise DataError(f"{root}: sub-folder(s) {', '.join(unknown)} are not classes of this model "
                        f"({', '.join(classes)}): rename or move them")
    return root


def read_labelled_folder(name: str, root: Path, classes: list[str], progress: bool = True) -> ImageData:
    """The images of ``root/<class>/`` as the test split of ``name`` with ``classes``' labels (a model's own
    list; a folder may hold some of them): what ``reslab evaluate --data`` reads from a user's own labelled
    images. There is no training split, so no mean or std: an evaluation uses the model's own."""
    info = DATASETS[name]
    def images(folder: Path) -> list[str]:  # not .ipynb_checkpoints/ and the like
        names = (q.relative_to(root).as_posix() for q in folder.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        return sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))

    members = [images(root / c) if (root / c).is_dir() else [] for c in classes]
    if not any(members):
        raise DataError(f"{root}: no images in its class folders ({', '.join(c for c in classes if (root / c).is_dir())})")
    bar = tqdm(total=sum(map(len, members)), desc=f"decoding {root.name}", unit="img", disable=not progress, file=sys.stderr)
    x, y, parts, skipped, first_bad = _decode_members(info, lambda n: _read_file(root / n), members, bar)
    bar.close()
    if not len(x):
        raise DataError(f"{root}: none of the images could be decoded (first failure: {first_bad})")
    _warn_skipped(root, skipped, first_bad)
    empty = np.zeros((0, *x.shape[1:]), np.uint8)
    return ImageData(name, list(classes), empty, np.zeros(0, np.int64), x, y, [0.0] * info.channels,
                     [1.0] * info.channels, str(root), fingerprint(root), skipped, extra={"labelled_folder": True},
                     test_part=parts)


def _read_file(f: Path) -> bytes:
    """An image file of a folder: only a regular file (a symlink to one is fine), size checked first. A
    FIFO would block the load forever and /dev/zero fill the memory, so they are refused, not skipped."""
    st = f.stat()  # follows symlinks: what would be read
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{f}: not a regular file (a device, FIFO or socket, or a link to one); refusing to read it")
    if st.st_size > MAX_IMAGE_BYTES:
        raise DataError(f"{f}: {st.st_size} bytes, more than an image may have ({MAX_IMAGE_BYTES >> 20} MB); refusing to read it")
    with open(f, "rb") as fh:
        return fh.read(MAX_IMAGE_BYTES + 1)


def _read_member(zf: zipfile.ZipFile, name: str, where: Path) -> bytes:
    """A zip member, refused from its declared size before anything is decompressed (a zip bomb); Python's
    zipfile stops decompressing at that declared size, so a member that lies about it is cut there."""
    size = zf.getinfo(name).file_size
    if size > MAX_IMAGE_BYTES:
        raise DataError(f"{where}: member {name} decompresses to {size} bytes, more than an image may have "
                        f"({MAX_IMAGE_BYTES >> 20} MB): a zip bomb? refusing to read it")
    with zf.open(name) as fh:
        return fh.read(MAX_IMAGE_BYTES + 1)


def _unpickle_official(f: Path) -> dict:
    """Unpickle one of CIFAR-10's official batch files, after checking its MD5 against the published one."""
    want = CIFAR_MD5.get(f.name)
    h = hashlib.md5(usedforsecurity=False)
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
        if want is None or h.hexdigest() != want:
            raise DataError(f"{f}: MD5 {h.hexdigest()} is not that of the official CIFAR-10 {f.name} ({want}); refusing "
                            "to unpickle it (a pickle can run code): download it again, or use an image-folder zip")
        fh.seek(0)
        return pickle.load(fh, encoding="bytes")  # the official format is a pickle


def _read_cifar_batches(info: DatasetInfo, path: Path, progress: bool) -> tuple:
    def load(fname: str) -> tuple[np.ndarray, np.ndarray]:
        f = path / fname
        if not f.exists():
            raise DataError(f"{path}: missing {fname} (expected CIFAR-10's python batches)")
        d = _unpickle_official(f)
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), np.asarray(d[b"labels"], dtype=np.int64)

    parts = [load(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = load("test_batch")
    classes = list(info.classes)
    meta = path / "batches.meta"
    if meta.exists():
        classes = [c.decode() for c in _unpickle_official(meta)[b"label_names"]]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), test_x, test_y, classes, 0, None)


def _read_fer_csv(info: DatasetInfo, path: Path, progress: bool) -> tuple:
    order = {name: i for i, name in enumerate(info.classes)}
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    skipped, first_bad, parts = 0, "", []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"emotion", "pixels"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected FER-2013 CSV columns emotion,pixels,Usage; found {reader.fieldnames}")
        for n, row in enumerate(tqdm(reader, desc=f"parsing {path.name}", unit="img", disable=not progress, file=sys.stderr), 2):
            try:
                emotion = int(row.get("emotion") or "")
                px = np.asarray((row.get("pixels") or "").split(), dtype=np.int64)
                img = px.reshape(48, 48, 1)
            except ValueError as e:  # a torn row (wrong pixel count, an empty or non-numeric field): skipped, counted
                skipped += 1
                first_bad = first_bad or f"line {n} ({str(e).splitlines()[0][:80]})"
                continue
            # a value out of range is a wrong file, not a row to guess at (-1 would index 'neutral')
            if not 0 <= emotion < len(FER_CSV_LABELS):
                raise DataError(f"{path}: line {n}: emotion {emotion} is outside 0..{len(FER_CSV_LABELS) - 1}")
            if px.min() < 0 or px.max() > 255:
                raise DataError(f"{path}: line {n}: pixel value {px.min() if px.min() < 0 else px.max()} is outside 0..255")
            label, img = order[FER_CSV_LABELS[emotion]], img.astype(np.uint8)
            usage = row.get("Usage", "Training")
            split = "train" if usage == "Training" else "test"
            splits[split][0].append(img)
            splits[split][1].append(label)
            if split == "test":
                parts.append(part_of(usage, info))
    for split, (xs, _) in splits.items():
        if not xs:
            raise DataError(f"{path}: no valid {split} rows (Usage 'Training' for train, 'PublicTest'/'PrivateTest' for test)")
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} torn row(s) (not 2304 pixel values 0..255, or an empty emotion), "
                      f"first: {first_bad}", ReslabWarning, stacklevel=2)
    arrays = [f(v) for xs, ys in splits.values() for f, v in ((np.stack, xs), (lambda y: np.asarray(y, np.int64), ys))]
    return (*arrays, list(info.classes), skipped, np.asarray(parts, np.int8))


READERS = {"folder": _read_image_tree, "zip": _read_image_tree, "cifar-batches": _read_cifar_batches, "fer-csv": _read_fer_csv}


def _download(name: str) -> Path:
    if name != "cifar10":
        raise DataError(f"{name} cannot be downloaded automatically (Kaggle needs a login); pass --data PATH")
    from torchvision.datasets import CIFAR10

    root = cache_dir() / "download"
    CIFAR10(root=str(root), train=True, download=True)
    return root / "cifar-10-batches-py"


# --------------------------------------------------------------------------- the entry point


def channel_stats(x: np.ndarray, chunk: int = 1 << 20) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 NHWC images, in [0, 1] units. Exact, from each
    channel's 256-level histogram (counted a chunk of pixels at a time): a float copy of CIFAR-10's train
    split would be 1.2 GB and took ~10 s of the first load's ~19 s (docs/data.md)."""
    if x.dtype != np.uint8:
        raise TypeError(f"channel_stats takes uint8 images, not {x.dtype}")
    flat = x.reshape(-1, x.shape[-1])
    counts = np.zeros((flat.shape[1], 256), dtype=np.int64)
    for i in range(0, len(flat), chunk):
        for c in range(flat.shape[1]):
            counts[c] += np.bincount(flat[i : i + chunk, c], minlength=256)
    levels = np.arange(256) / 255.0
    mean = counts @ levels / counts.sum(1)
    var = (counts * (levels[None, :] - mean[:, None]) ** 2).sum(1) / counts.sum(1)
    return mean.tolist(), np.sqrt(var).tolist()


def load_dataset(
    name: str,
    data: str | Path | None = None,
    download: bool = False,
    progress: bool = True,
    use_cache: bool = True,
) -> ImageData:
    """Load a dataset from any supported source, through the uint8 cache."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    info = DATASETS[name]
    kind, path = ("cifar-batches", _download(name)) if download and data is None else resolve_source(name, data)
    fp = fingerprint(path)
    cache_file = cache_dir() / f"{name}-{fp}.npz"
    if not use_cache:
        return _decode_source(name, info, kind, path, fp, progress, None)
    cached = _read_cache(cache_file, name, path, fp)
    if cached is not None:
        return cached
    with _decoding_lock(cache_file):  # processes starting together on a cold cache: one decodes, the rest read
        cached = _read_cache(cache_file, name, path, fp)
        return cached if cached is not None else _decode_source(name, info, kind, path, fp, progress, cache_file)


def _read_cache(cache_file: Path, name: str, path: Path, fp: str) -> ImageData | None:
    """The cached arrays, or None when there are none; a torn cache file (empty, truncated) is removed."""
    if not cache_file.exists():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            return ImageData(
                name, [str(c) for c in z["classes"]], z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                z["mean"].tolist(), z["std"].tolist(), str(path), fp, int(z["skipped"]),
                test_part=z["test_part"] if len(z["test_part"]) else None,
            )
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        cache_file.unlink(missing_ok=True)
        return None


@contextlib.contextmanager
def _decoding_lock(cache_file: Path) -> Iterator[None]:
    """An exclusive lock on ``cache_file``'s lock file while it is decoded and written. Without it, every
    process that starts on a cold cache (tune workers, torchrun ranks, a test suite's workers) decodes the
    whole dataset at once (CIFAR-10: ~7 s of CPU each). Where no lock can be taken (a read-only cache folder),
    the process decodes on its own, as before."""
    try:
        _make_cache_folder(cache_file.parent)
    except OSError:
        yield
        return
    with file_lock(cache_file.with_suffix(".lock")):
        yield


def _decode_source(name: str, info: DatasetInfo, kind: str, path: Path, fp: str, progress: bool,
                   cache_file: Path | None) -> ImageData:
    """Decode the source into arrays; write them to ``cache_file`` (None: no cache)."""
    train_x, train_y, test_x, test_y, classes, skipped, test_part = READERS[kind](info, path, progress)
    if sorted(classes) != sorted(info.classes):
        warnings.warn(f"{path}: classes {classes} differ from the usual {name} classes", ReslabWarning, stacklevel=2)
    mean, std = channel_stats(train_x)
    if test_part is not None and not (test_part >= 0).any():
        test_part = None  # no test image belongs to a named part
    ds = ImageData(name, list(classes), train_x, train_y, test_x, test_y, mean, std, str(path), fp, skipped,
                   test_part=test_part)
    if cache_file is not None:
        try:
            write_cache(cache_file, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                        classes=np.asarray(classes), mean=np.asarray(mean), std=np.asarray(std), skipped=skipped,
                        test_part=np.zeros(0, np.int8) if test_part is None else test_part)
        except OSError as e:
            warnings.warn(f"could not write the data cache {cache_file}: {e}", ReslabWarning, stacklevel=2)
    return ds


def _make_cache_folder(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is cut by the umask


def write_cache(cache_file: Path, **arrays: object) -> None:
    """Write the cache atomically and durably: a temp file of this writer's own (pid and a random tag),
    fsynced, renamed over the old one, the folder fsynced; the temp file is removed on any failure (a
    full disk, Ctrl-C). A new cache folder is private (0700): it holds the decoded dataset."""
    folder = cache_file.parent
    _make_cache_folder(folder)
    tmp = folder / f".{cache_file.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cache_file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stratified_indices(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (rest, picked) with ``fraction`` of every class picked."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        picked.append(idx[:k])
    chosen = np.sort(np.concatenate(picked)) if picked else np.empty(0, np.int64)
    rest = np.setdiff1d(np.arange(len(y)), chosen, assume_unique=True)
    return rest, chosen


def split_indices(train_y: np.ndarray, subset: int | None, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices into the training split that a run uses: the seeded stratified
    subset (if any), then the fixed validation split carved out of it. One place, so that training and
    what is logged about its data (train/lineage.py) cannot disagree."""
    train_idx = np.arange(len(train_y))
    if subset:
        train_idx = stratified_subset(train_y, subset, seed)
    val_idx = np.empty(0, dtype=np.int64)
    if val_fraction > 0:
        rest, val = split_validation(train_y[train_idx], val_fraction, seed=0)
        train_idx, val_idx = train_idx[rest], train_idx[val]
    return train_idx, val_idx


def split_validation(y: np.ndarray, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) index split of the train set; fixed seed so every run sees the same."""
    if not 0 < fraction < 1:
        raise DataError(f"validation fraction must be between 0 and 1, got {fraction}")
    return stratified_indices(y, fraction, seed)


def spread_sample(count: int, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random ``n`` of ``count`` items: a sample across a split that is sorted by
    class (its first images are all of its first class), the same every time."""
    return np.sort(np.random.default_rng(seed).permutation(count)[:n])


def stratified_sample(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly ``n`` items (all, if fewer), each class's count its share of ``n`` rounded so that
    the counts add up (largest remainder): ``evaluate --limit N`` means N images, where per-class rounding gave 51
    for 50 on FER-2013 and none for 4 on CIFAR-10."""
    if n >= len(y):
        return np.arange(len(y))
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n / len(y)
    take = np.floor(quota).astype(np.int64)
    take[np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]] += 1
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]))


def stratified_subset(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced subset of about ``n`` items (for quick runs and tests)."""
    if n >= len(y):
        return np.arange(len(y))
    return stratified_indices(y, n / len(y), seed)[1]
