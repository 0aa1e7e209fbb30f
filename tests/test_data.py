"""The dataset layer: CIFAR (binary and torchvision-pickle layouts), idx files, the bundled Fashion-MNIST subset,
the generated datasets, data-folder resolution and on-device augmentation. Fixtures are written into tmp_path."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normzoo.data import Dataset, augment, load_dataset, resolve_data_dir, to_device
from normzoo.data import cifar, idx, make_fashion_mnist_mini, mini
from normzoo.data.pickle_reader import PickleDataError, read_pickled_data
from normzoo.errors import NormzooError, PluginError, SpecError
from normzoo.hookspecs import hookimpl

DEBIAN = idx.DEBIAN_FASHION_MNIST
needs_debian = pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                                  reason=f"{DEBIAN} (Debian package dataset-fashion-mnist) is not installed")


# -- helpers -----------------------------------------------------------------------------------------------------

def fake_cifar(n_train_per_batch: int, n_test: int, batches: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    train = [(rng.integers(0, 256, (n_train_per_batch, 3, 32, 32), dtype=np.uint8),
              rng.integers(0, classes, n_train_per_batch)) for _ in range(batches)]
    test = (rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), rng.integers(0, classes, n_test))
    return train, test


def write_cifar10_bin(folder: Path, train, test) -> None:
    folder.mkdir(parents=True)
    for i, (images, labels) in enumerate(train, 1):
        records = [bytes([int(label)]) + image.tobytes() for image, label in zip(images, labels)]
        (folder / f"data_batch_{i}.bin").write_bytes(b"".join(records))
    images, labels = test
    (folder / "test_batch.bin").write_bytes(b"".join(bytes([int(l)]) + im.tobytes() for im, l in zip(images, labels)))
    (folder / "batches.meta.txt").write_text("\n".join(cifar.CIFAR10_CLASSES) + "\n\n")


def write_cifar10_py(folder: Path, train, test) -> None:
    folder.mkdir(parents=True)
    for i, (images, labels) in enumerate(train, 1):
        # mix the layouts found in the wild: bytes keys (encoding="bytes" re-dumps), protocols 2, 4 and 5
        key = (lambda k: k.encode()) if i == 1 else (lambda k: k)
        batch = {key("batch_label"): f"training batch {i} of 5", key("data"): images.reshape(len(images), -1),
                 key("labels"): [int(l) for l in labels], key("filenames"): [f"img{j}.png" for j in range(len(labels))]}
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch, f, protocol=(2, 4, 5)[i % 3])
    images, labels = test
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images.reshape(len(images), -1), "labels": [int(l) for l in labels]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(cifar.CIFAR10_CLASSES), "num_cases_per_batch": 10000}, f)


def unnormalize(x: torch.Tensor, dataset: Dataset) -> np.ndarray:
    mean = torch.tensor(dataset.mean).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std).view(1, -1, 1, 1)
    return ((x.double() * std + mean) * 255).numpy()


def check_normalisation(dataset: Dataset, train_images: np.ndarray, test_images: np.ndarray) -> None:
    """Mean/std are the train set's exact per-channel statistics and both splits are normalised with them."""
    scaled = train_images.astype(np.float64) / 255
    np.testing.assert_allclose(dataset.mean, scaled.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(dataset.std, scaled.std(axis=(0, 2, 3)), rtol=1e-12)
    for x, images in ((dataset.train_x, train_images), (dataset.test_x, test_images)):
        assert x.dtype == torch.float32
        expected = (images / 255 - np.array(dataset.mean)[:, None, None]) / np.array(dataset.std)[:, None, None]
        np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(unnormalize(x, dataset), images, atol=1e-3)
    assert dataset.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (dataset.train_x.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-5


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist_folder(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = {"train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train)),
              "test": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test))}
    suffix = ".gz" if gz else ""
    for split, (images_stem, labels_stem) in idx.SPLIT_FILES.items():
        write_idx(folder / (images_stem + suffix), arrays[split][0])
        write_idx(folder / (labels_stem + suffix), arrays[split][1].astype(np.uint8))
    return arrays


# -- CIFAR ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def cifar10_data():
    return fake_cifar(n_train_per_batch=4, n_test=3, batches=5, classes=10)


def test_cifar10_binary(tmp_path, cifar10_data):
    train, test = cifar10_data
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10_bin(folder, train, test)
    ds = load_dataset("cifar10,download=false", data_dir=tmp_path)
    train_images = np.concatenate([b[0] for b in train])
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_y.dtype == torch.int64
    assert ds.train_y.tolist() == np.concatenate([b[1] for b in train]).tolist()
    assert ds.test_y.tolist() == test[1].tolist()
    assert (ds.name, ds.num_classes, ds.input_shape, ds.task) == ("cifar10", 10, (3, 32, 32), "classification")
    assert ds.classes == cifar.CIFAR10_CLASSES and ds.source == str(folder)
    assert ds.spec == "cifar10,download=false"
    check_normalisation(ds, train_images, test[0])
    # the record layout itself: label byte, then 1024 red, 1024 green, 1024 blue bytes, rows of 32
    record = (folder / "data_batch_2.bin").read_bytes()[: 1 + 3072]
    assert ds.train_y[4].item() == record[0]
    assert round(unnormalize(ds.train_x[4:5], ds)[0, 1, 2, 5]) == record[1 + 1024 + 2 * 32 + 5]
    # data_dir may be the folder itself
    direct = load_dataset("cifar10,download=false", data_dir=folder)
    assert torch.equal(direct.train_x, ds.train_x) and direct.source == str(folder)


def test_cifar10_torchvision_pickles_match_binary(tmp_path, cifar10_data):
    train, test = cifar10_data
    write_cifar10_bin(tmp_path / "bin" / "cifar-10-batches-bin", train, test)
    write_cifar10_py(tmp_path / "py" / "cifar-10-batches-py", train, test)
    from_bin = load_dataset("cifar10,download=false", data_dir=tmp_path / "bin")
    from_py = load_dataset("cifar10,download=false", data_dir=tmp_path / "py")
    assert from_py.source == str(tmp_path / "py" / "cifar-10-batches-py")
    assert from_py.classes == cifar.CIFAR10_CLASSES
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(from_py, name), getattr(from_bin, name)), name
    check_normalisation(from_py, np.concatenate([b[0] for b in train]), test[0])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_cifar_pickle_is_refused(tmp_path, cifar10_data):
    train, test = cifar10_data
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10_py(folder, train, test)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Evil(marker), "labels": [0]}, f)
    with pytest.raises(PickleDataError, match="posix.system|nt.system"):
        read_pickled_data(folder / "data_batch_3")
    with pytest.raises(NormzooError, match="data_batch_3.*global"):
        load_dataset("cifar10,download=false", data_dir=tmp_path)
    assert not marker.exists()
    # other classic gadgets are refused too, even inside an otherwise valid batch
    for gadget in (eval, getattr, np.load):
        with open(tmp_path / "g", "wb") as f:
            pickle.dump({"data": gadget, "labels": []}, f)
        with pytest.raises(PickleDataError, match="global"):
            read_pickled_data(tmp_path / "g")


def crafted_array(typestr: str, shape: tuple[int, ...], raw: bytes, *, key: str = "data") -> bytes:
    """A protocol-2 pickle of ``{key: array}`` written opcode by opcode, as an attacker would, from only the globals
    the old restricted unpickler allowed (numpy's _reconstruct, ndarray, dtype)."""
    def text(value: str) -> bytes:
        data = value.encode()
        return b"X" + struct.pack("<I", len(data)) + data

    def number(value: int) -> bytes:  # BININT, or LONG1 for what does not fit 32 bits
        if -2**31 <= value < 2**31:
            return b"J" + struct.pack("<i", value)
        data = value.to_bytes(9, "little", signed=True)
        return b"\x8a" + bytes([len(data)]) + data

    dims = b"(" + b"".join(number(d) for d in shape) + b"t"
    dtype = (b"cnumpy\ndtype\n" + text(typestr) + b"K\x00K\x01\x87R"
             + b"(K\x03" + text("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
             + b"(K\x01" + dims + dtype + b"\x89B" + struct.pack("<I", len(raw)) + raw + b"tb")
    return b"\x80\x02}" + text(key) + array + b"s" + text("labels") + b"]K\x00as."


def test_crafted_array_pickle_matches_what_numpy_writes(tmp_path):
    # The crafting helper is honest: for a plain uint8 array it writes what the real reader reads back.
    (tmp_path / "b").write_bytes(crafted_array("u1", (1, 3072), bytes(range(256)) * 12))
    batch = read_pickled_data(tmp_path / "b")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (1, 3072)
    assert batch["data"][0, :256].tolist() == list(range(256)) and batch["labels"] == [0]


@pytest.mark.parametrize("typestr, shape, raw, words", [
    ("O", (1, 2), b"\x41" * 16, "dtype 'O'"),  # object array of pointers the file chose: segfaulted before
    ("V8", (1, 1), b"\x00" * 8, "dtype 'V8'"),
    ("u1", (1, 3072), b"\x00" * 10, "holds 10 bytes"),  # shape claims more than the bytes
    ("u1", (2**40, 2**40), b"", "shape"),
    ("u1", (-1, 3072), b"", "shape"),
    ("U4", (1, 1), b"\x00" * 16, "dtype 'U4'"),
])
def test_crafted_cifar_batches_are_refused_in_one_line(tmp_path, typestr, shape, raw, words):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(crafted_array(typestr, shape, raw))
    with pytest.raises(NormzooError) as info:
        load_dataset("cifar10,download=false", data_dir=tmp_path)
    assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("payload, words", [
    (b"\x80\x02]q\x00(h\x00h\x00e.", "not a dict"),  # a list that contains itself
    (b"\x80\x02}X\x04\x00\x00\x00dataK\x05s.", "no 'labels' entry"),
    (b"\x80\x02}X\x04\x00\x00\x00data", "truncated"),
    (b"\x80\x02\x81.", "opcode 0x81"),  # NEWOBJ: builds an object from a class
    (b"", "truncated"),
    (b"\x80\x02cos\nsystem\n.", "'os.system'"),
])
def test_malformed_pickles_are_one_line_errors(tmp_path, payload, words):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(payload)
    with pytest.raises(NormzooError) as info:
        load_dataset("cifar10,download=false", data_dir=tmp_path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_nested_references_do_not_blow_up(tmp_path):
    # 40 levels, each a list holding the previous level twice: 2**40 leaves as a tree, 40 lists as a graph.
    levels = b"".join(b"]q" + bytes([i + 1]) + b"(h" + bytes([i]) + b"h" + bytes([i]) + b"e0" for i in range(40))
    body = b"\x80\x02]q\x000" + levels + b"h\x28."  # each level is put in the memo, popped, fetched by the next
    (tmp_path / "p").write_bytes(body)
    value = read_pickled_data(tmp_path / "p")
    depth = 0
    while value:
        assert value[0] is value[1]
        value, depth = value[0], depth + 1
    assert depth == 40


def test_cifar100_binary_and_python(tmp_path):
    rng = np.random.default_rng(1)
    train_images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    test_images = rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    train_fine, test_fine = rng.integers(0, 100, 6), rng.integers(0, 100, 2)
    coarse_of = rng.integers(0, 20, 100)
    fine_names = [f"fine{i}" for i in range(100)]
    coarse_names = [f"coarse{i}" for i in range(20)]

    binary = tmp_path / "bin" / "cifar-100-binary"
    binary.mkdir(parents=True)
    for name, images, fine in (("train.bin", train_images, train_fine), ("test.bin", test_images, test_fine)):
        (binary / name).write_bytes(b"".join(bytes([int(coarse_of[f]), int(f)]) + im.tobytes()
                                             for im, f in zip(images, fine)))
    (binary / "fine_label_names.txt").write_text("\n".join(fine_names) + "\n")
    (binary / "coarse_label_names.txt").write_text("\n".join(coarse_names) + "\n")

    python = tmp_path / "py" / "cifar-100-python"
    python.mkdir(parents=True)
    for name, images, fine in (("train", train_images, train_fine), ("test", test_images, test_fine)):
        with open(python / name, "wb") as f:
            pickle.dump({"data": images.reshape(len(images), -1), "fine_labels": [int(x) for x in fine],
                         "coarse_labels": [int(coarse_of[x]) for x in fine]}, f, protocol=2)
    with open(python / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, f)

    for root in (tmp_path / "bin", tmp_path / "py"):
        fine = load_dataset("cifar100,download=false", data_dir=root)
        assert (fine.name, fine.num_classes, fine.classes) == ("cifar100", 100, fine_names)
        assert fine.train_y.tolist() == train_fine.tolist() and fine.test_y.tolist() == test_fine.tolist()
        check_normalisation(fine, train_images, test_images)
        coarse = load_dataset("cifar100,download=false,labels=coarse", data_dir=root)
        assert (coarse.num_classes, coarse.classes) == (20, coarse_names)
        assert coarse.train_y.tolist() == coarse_of[train_fine].tolist()


def test_cifar_missing_data_names_folders(tmp_path):
    with pytest.raises(NormzooError) as info:
        load_dataset("cifar10,download=false", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-bin") in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "cifar-10-binary.tar.gz" in message and "--data-dir" in message
    with pytest.raises(NormzooError, match="cifar-100-binary"):
        load_dataset("cifar100,download=false", data_dir=tmp_path)


def test_cifar_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    def offline(layout, root):
        raise OSError("<urlopen error [Errno -3] Temporary failure\nin name resolution>")

    monkeypatch.setattr(cifar, "_download", offline)
    with pytest.raises(NormzooError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and "downloading failed" in message
    assert cifar.CIFAR10.url in message and str(tmp_path / "cifar-10-batches-py") in message


def test_cifar_truncated_binary_file(tmp_path, cifar10_data):
    train, test = cifar10_data
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10_bin(folder, train, test)
    with open(folder / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(NormzooError, match="test_batch.bin.*3073-byte"):
        load_dataset("cifar10,download=false", data_dir=tmp_path)


# -- idx (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, gz", [("mnist", True), ("MNIST/raw", False), (".", True)])
def test_mnist_idx_files(tmp_path, layout, gz):
    folder = tmp_path / layout
    arrays = write_mnist_folder(folder, gz=gz)
    ds = load_dataset("mnist,download=false", data_dir=tmp_path)
    assert ds.source == str(folder)
    assert ds.train_x.shape == (12, 1, 32, 32) and ds.test_x.shape == (5, 1, 32, 32)
    assert ds.input_shape == (1, 32, 32) and ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
    assert ds.train_y.tolist() == arrays["train"][1].tolist()
    padded = np.pad(arrays["train"][0], ((0, 0), (2, 2), (2, 2)))[:, None]
    check_normalisation(ds, padded, np.pad(arrays["test"][0], ((0, 0), (2, 2), (2, 2)))[:, None])
    unpadded = load_dataset("mnist,download=false,pad=0", data_dir=tmp_path)
    assert unpadded.input_shape == (1, 28, 28)
    np.testing.assert_allclose(unnormalize(unpadded.train_x, unpadded)[:, 0], arrays["train"][0], atol=1e-3)


def test_fashion_mnist_subfolder_wins_and_missing_mnist_errors(tmp_path):
    arrays = write_mnist_folder(tmp_path / "FashionMNIST" / "raw", seed=3)
    ds = load_dataset("fashion-mnist,download=false", data_dir=tmp_path)
    assert ds.source == str(tmp_path / "FashionMNIST" / "raw") and ds.classes == idx.FASHION_MNIST_CLASSES
    assert ds.test_y.tolist() == arrays["test"][1].tolist()
    # Fashion-MNIST files are never taken for MNIST
    with pytest.raises(NormzooError) as info:
        load_dataset("mnist,download=false", data_dir=tmp_path)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value) and "\n" not in str(info.value)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(NormzooError, match="magic"):
        idx.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((3, 2), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(NormzooError, match="header declares"):
        idx.read_idx(tmp_path / "short")


@needs_debian
def test_fashion_mnist_from_debian_package(tmp_path):
    ds = load_dataset("fashion-mnist,download=false", data_dir=tmp_path)  # empty data_dir: the Debian folder
    assert ds.source == str(DEBIAN)
    assert ds.train_x.shape == (60000, 1, 32, 32) and ds.test_x.shape == (10000, 1, 32, 32)
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10
    assert ds.classes == idx.FASHION_MNIST_CLASSES


# -- the bundled Fashion-MNIST subset ---------------------------------------------------------------------------

def test_fashion_mnist_mini_shapes_balance_determinism():
    from normzoo.plugins import registry

    registry("datasets")  # time the data, not the first plugin load
    start = time.perf_counter()
    ds = load_dataset("fashion-mnist-mini")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"fashion-mnist-mini took {elapsed:.2f} s to load"
    assert ds.train_x.shape == (10000, 1, 32, 32) and ds.test_x.shape == (2000, 1, 32, 32)
    assert ds.input_shape == (1, 32, 32) and ds.num_classes == 10
    assert ds.classes == idx.FASHION_MNIST_CLASSES
    assert torch.bincount(ds.train_y, minlength=10).tolist() == [1000] * 10
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [200] * 10
    assert ds.source == str(mini.MINI_PATH) and ds.spec == "fashion-mnist-mini,pad=2"
    # the 2-pixel border is zero padding: the value (0 - mean) / std everywhere
    border = torch.cat([ds.train_x[..., :2, :].flatten(), ds.train_x[..., :, -2:].flatten()])
    assert torch.allclose(border, torch.tensor(-ds.mean[0] / ds.std[0]))
    assert ds.train_x.mean().abs() < 1e-5 and (ds.train_x.std(unbiased=False) - 1).abs() < 1e-5
    again = load_dataset("fashion-mnist-mini")
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    arrays = mini.read_mini()
    for split, n in (("train", 10000), ("test", 2000)):
        index = arrays[f"{split}_index"]
        assert len(index) == n and np.all(np.diff(index) > 0) and index.min() >= 0
    assert index.max() < 10000 and arrays["train_index"].max() < 60000
    assert "sha256" in str(arrays["provenance"])
    assert (mini.MINI_PATH.parent / "LICENSE-fashion-mnist.txt").read_text().count("Zalando") >= 1
    assert mini.MINI_PATH.stat().st_size < 6_000_000


@needs_debian
def test_fashion_mnist_mini_provenance():
    arrays = mini.read_mini()
    for split in ("train", "test"):
        images, labels = idx.read_split(DEBIAN, split)
        index = arrays[f"{split}_index"]
        np.testing.assert_array_equal(arrays[f"{split}_images"][0], images[index[0]])  # the first, spelled out
        np.testing.assert_array_equal(arrays[f"{split}_images"], images[index])
        np.testing.assert_array_equal(arrays[f"{split}_labels"], labels[index])
        per_class = make_fashion_mnist_mini.PER_CLASS[split]
        assert index.tolist() == make_fashion_mnist_mini.select(labels, split, per_class).tolist()
    # the recipe rebuilds the bundled file byte for byte
    assert make_fashion_mnist_mini.build(DEBIAN) == mini.MINI_PATH.read_bytes()


# -- generated datasets -----------------------------------------------------------------------------------------

def test_synthetic_is_learnable_and_seeded():
    ds = load_dataset("synthetic,n=200,n_test=100,size=16,channels=2,classes=5,seed=3")
    assert ds.train_x.shape == (200, 2, 16, 16) and ds.test_x.shape == (100, 2, 16, 16)
    assert ds.num_classes == 5 and ds.input_shape == (2, 16, 16) and ds.train_y.dtype == torch.int64
    assert torch.bincount(ds.train_y).tolist() == [40] * 5
    centroids = torch.stack([ds.train_x[ds.train_y == c].mean(0) for c in range(5)])
    nearest = torch.cdist(ds.test_x.flatten(1), centroids.flatten(1)).argmin(1)
    assert (nearest == ds.test_y).float().mean() > 0.9
    same = load_dataset("synthetic,n=200,n_test=100,size=16,channels=2,classes=5,seed=3")
    assert torch.equal(same.train_x, ds.train_x)
    other = load_dataset("synthetic,n=200,n_test=100,size=16,channels=2,classes=5,seed=4")
    assert not torch.equal(other.train_x, ds.train_x)
    with pytest.raises(NormzooError, match="'classes' must be"):
        load_dataset("synthetic,classes=0")


def test_synthetic_loss_drops_with_a_linear_model():
    ds = load_dataset("synthetic")
    weight = torch.zeros(3 * 32 * 32, ds.num_classes, requires_grad=True)
    losses = []
    for _ in range(20):  # plain gradient descent (building a torch.optim optimizer costs seconds on first use)
        loss = F.cross_entropy(ds.train_x.flatten(1) @ weight, ds.train_y)
        (grad,) = torch.autograd.grad(loss, weight)
        with torch.no_grad():
            weight -= 0.01 * grad
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gaussian_regression():
    ds = load_dataset("gaussian-regression,features=6,n_train=100,n_test=20,seed=1")
    assert ds.task == "regression" and ds.input_shape == (6,) and ds.num_classes == 6
    assert ds.train_x.shape == (100, 6) and ds.train_y.shape == (100, 6) and ds.train_y.dtype == torch.float32
    a = ds.extra["A"]
    assert torch.allclose(ds.train_y, ds.train_x @ a.T, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ds.test_y, ds.test_x @ a.T, rtol=1e-4, atol=1e-4)
    bigger = load_dataset("gaussian-regression,features=6,n_train=200,n_test=20,seed=1")
    assert torch.equal(bigger.extra["A"], a) and torch.equal(bigger.test_x, ds.test_x)
    noisy = load_dataset("gaussian-regression,features=6,n_train=100,n_test=20,seed=1,noise=0.5")
    residual = noisy.train_y - noisy.train_x @ a.T
    assert 0.3 < residual.std().item() < 0.7


# -- registry, data folder, device -------------------------------------------------------------------------------

def test_unknown_dataset_and_parameter_suggest():
    with pytest.raises(SpecError, match="unknown dataset 'cifar-10'.*did you mean 'cifar10'"):
        load_dataset("cifar-10")
    with pytest.raises(SpecError, match="did you mean 'download'"):
        load_dataset("cifar10,downlaod=false")


def test_data_dir_resolution_order(tmp_path, monkeypatch, cifar10_data):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("NORMZOO_DATA", raising=False)
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "normzoo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "normzoo"
    monkeypatch.setenv("NORMZOO_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("NORMZOO_DATA", "")
    assert resolve_data_dir() == tmp_path / "xdg" / "normzoo"
    # load_dataset uses the same order: the environment variable finds the data
    write_cifar10_bin(tmp_path / "env" / "cifar-10-batches-bin", *cifar10_data)
    monkeypatch.setenv("NORMZOO_DATA", str(tmp_path / "env"))
    assert load_dataset("cifar10,download=false").source == str(tmp_path / "env" / "cifar-10-batches-bin")
    with pytest.raises(NormzooError, match=str(tmp_path / "arg")):
        load_dataset("cifar10,download=false", data_dir=tmp_path / "arg")


def test_to_device_copies():
    ds = load_dataset("synthetic,n=20,n_test=10")
    moved = to_device(ds, "meta")
    assert moved.train_x.device.type == "meta" and moved.test_y.device.type == "meta"
    assert ds.train_x.device.type == "cpu" and moved.classes == ds.classes and moved.spec == ds.spec
    assert ds.to("meta").device.type == "meta"


def test_plugin_dataset_contract_is_checked(fresh_plugins):
    class BadPlugin:
        @hookimpl
        def register_datasets(self, register):
            register("bad-tuple", lambda *, data_dir=None: (1, 2), summary="returns a tuple")
            register("bad-labels", lambda *, data_dir=None: Dataset(
                "bad-labels", torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 9]), torch.zeros(1, 1, 2, 2),
                torch.zeros(1, dtype=torch.long), num_classes=3, input_shape=(1, 2, 2)), summary="label 9")

    fresh_plugins.register(BadPlugin(), "bad")
    with pytest.raises(PluginError, match="returned tuple"):
        load_dataset("bad-tuple")
    with pytest.raises(PluginError, match=r"labels outside \[0, 3\)"):
        load_dataset("bad-labels")


# -- augmentation ------------------------------------------------------------------------------------------------

def reference_augment(x: torch.Tensor, crop_padding: int, flip: bool, seed: int) -> torch.Tensor:
    """Per-image reference: the documented draws (offsets, then flips), then slice and flip each image."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    p = crop_padding
    dy, dx = torch.randint(0, 2 * p + 1, (2, n), generator=g) if p else torch.zeros(2, n, dtype=torch.long)
    flips = torch.randint(0, 2, (n,), generator=g).bool() if flip else torch.zeros(n, dtype=torch.bool)
    out = []
    for i in range(n):
        image = F.pad(x[i], (p, p, p, p))[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(image.flip(-1) if flips[i] else image)
    return torch.stack(out)


@pytest.mark.parametrize("crop_padding, flip", [(4, True), (4, False), (0, True), (2, True)])
def test_augment_matches_per_image_reference(crop_padding, flip):
    x = torch.randn(64, 3, 8, 10)
    out = augment(x, crop_padding=crop_padding, flip=flip, generator=torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, reference_augment(x, crop_padding, flip, seed=7))
    channels_last = x.to(memory_format=torch.channels_last).to(torch.bfloat16)
    out = augment(channels_last, crop_padding=crop_padding, flip=flip, generator=torch.Generator().manual_seed(7))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference_augment(x.to(torch.bfloat16), crop_padding, flip, seed=7))


def test_augment_flip_and_crop_on_known_images():
    ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(32, 2, 4, 6).contiguous()
    flipped = augment(ramp, crop_padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    is_flipped = torch.tensor([torch.equal(img, ramp[0].flip(-1)) for img in flipped])
    is_same = torch.tensor([torch.equal(img, ramp[0]) for img in flipped])
    assert torch.all(is_flipped | is_same) and is_flipped.any() and is_same.any()
    assert flipped[is_flipped][0, 0, 0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    # crops are shifted copies of the zero-padded image: find each one's offset and check it
    image = torch.arange(1.0, 1 + 4 * 6).view(1, 1, 4, 6)
    crops = augment(image.expand(50, 1, 4, 6), crop_padding=2, flip=False, generator=torch.Generator().manual_seed(1))
    padded = F.pad(image[0], (2, 2, 2, 2))
    offsets = set()
    for crop in crops:
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(crop, padded[:, dy:dy + 4, dx:dx + 6])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # the offsets really vary


def test_augment_determinism_and_edge_cases():
    x = torch.randn(16, 3, 32, 32)
    a = augment(x, generator=torch.Generator().manual_seed(5))
    b = augment(x, generator=torch.Generator().manual_seed(5))
    c = augment(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = augment(x)
    torch.manual_seed(0)
    assert torch.equal(d, augment(x))
    assert torch.equal(augment(x, crop_padding=0, flip=False), x)
    assert augment(x[:0]).shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="N, C, H, W"):
        augment(torch.zeros(3, 32, 32))


@pytest.mark.cuda
def test_augment_on_cuda_matches_cpu():
    x = torch.randn(128, 3, 32, 32)
    cpu = augment(x, generator=torch.Generator().manual_seed(3))
    gpu = augment(x.cuda(), generator=torch.Generator().manual_seed(3))  # CPU generator, CUDA tensor
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)
    on_device = augment(x.cuda(), generator=torch.Generator(device="cuda").manual_seed(3))
    assert on_device.device.type == "cuda" and on_device.shape == x.shape
