"""Safe torch.save reader: round trips against torch, and malicious files that must not run.

Every checkpoint here is written by torch (or crafted in torch's zip layout) in
tmp_path; `load_torch_pickle` must return the same values as numpy arrays and
must refuse, without executing anything, any pickle that names a global off
its allow-list.
"""
import collections
import io
import os
import pickle
import pickletools
import subprocess
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from ldm_jax.convert.errors import CheckpointError, UnsafePickleError
from ldm_jax.convert.torch_pickle import PickledObject, load_torch_pickle
from ldm_jax.convert.weights_io import read_state_dict

NOTHING_RAN = "Nothing from the file was imported or executed"


# ----------------------------------------------------------------------------- helpers


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """What the reader must return for tensor `t` (exact, including bf16 / float8)."""
    t = t.detach()
    special = {torch.bfloat16: ml_dtypes.bfloat16, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
               torch.float8_e5m2: ml_dtypes.float8_e5m2}
    if t.dtype in special:
        return t.float().numpy().astype(special[t.dtype])
    return t.contiguous().numpy().copy()


def _assert_same(got, want, where="root"):
    """Structural equality of a loaded object and the object torch saved."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, np.ndarray), f"{where}: {type(got)}"
        exp = _to_numpy(want)
        assert got.dtype == exp.dtype and got.shape == exp.shape, (where, got.dtype, got.shape)
        assert got.flags.c_contiguous and got.flags.writeable, where
        if exp.dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
            np.testing.assert_array_equal(got.view(np.uint8 if exp.itemsize == 1 else np.uint16),
                                          exp.view(np.uint8 if exp.itemsize == 1 else np.uint16))
        else:
            np.testing.assert_array_equal(got, exp, err_msg=where)
    elif isinstance(want, dict):
        assert type(got) is type(want), (where, type(got), type(want))
        assert list(got) == list(want), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


def _write_archive(path, data_pkl: bytes, records=None, name="archive", byteorder="little",
                   compression=zipfile.ZIP_STORED):
    """A zip archive in torch.save's layout around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        z.writestr(f"{name}/data.pkl", data_pkl)
        z.writestr(f"{name}/byteorder", byteorder)
        for key, raw in (records or {}).items():
            z.writestr(f"{name}/data/{key}", raw)
        z.writestr(f"{name}/version", "3\n")
    return str(path)


def _rewrite_archive(src, dst, transform, compression=zipfile.ZIP_STORED):
    """Copy a torch zip archive, passing every (name, bytes) through `transform`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compression) as zout:
        for info in zin.infolist():
            item = transform(info.filename, zin.read(info.filename))
            if item is not None:
                zout.writestr(item[0], item[1])
    return str(dst)


def _legacy_stream(object_pickle: bytes) -> bytes:
    """The legacy (pre-1.6) torch stream header followed by `object_pickle`."""
    return (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
            + pickle.dumps({"protocol_version": 1001, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
            + object_pickle)


def _rich_checkpoint():
    """Every dtype, view kind and container a state dict or training checkpoint holds."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    attr = torch.randn(3, generator=g)
    attr.note = "a tensor with a Python attribute"  # -> torch._tensor._rebuild_from_type_v2
    param = torch.nn.Parameter(torch.randn(2, 3, generator=g))
    param.extra = 1  # -> _rebuild_parameter_with_state
    tensors = {
        "f32": torch.randn(2, 3, generator=g),
        "f16": torch.randn(3, 2, generator=g).half(),
        "bf16": torch.randn(5, generator=g).bfloat16(),
        "f64": torch.randn(2, generator=g).double(),
        "i64": torch.randint(-2**40, 2**40, (3, 2), generator=g),
        "i32": torch.randint(-9, 9, (4,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-9, 9, (4,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-9, 9, (4,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4,), generator=g, dtype=torch.uint8),
        "u16": torch.arange(5).to(torch.uint16),  # new dtypes: _rebuild_tensor_v3
        "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "f8e5": torch.randn(4, generator=g).to(torch.float8_e5m2),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "bool": torch.randn(6, generator=g) > 0,
        "scalar": torch.tensor(3.5),
        "scalar_bf16": torch.tensor(-2.25, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "param": param,
        "attr": attr,
        # views of one storage: the storage is written once and shared
        "base": base,
        "transposed": base.t(),
        "row": base[2],
        "column": base[:, 3],  # strided, storage offset 3
        "window": base[1:3, 2:],  # storage offset 7
        "stepped": base[::2, ::3],
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "nhwc": torch.randn(1, 3, 4, 2, generator=g).permute(0, 2, 3, 1),
    }
    return {
        "tensors": tensors,
        "ordered": collections.OrderedDict([("z", torch.ones(2)), ("a", 1)]),
        "meta": {"global_step": 470000, "epoch": 6, "name": "ldm", "lr": 1.5e-4, "flag": True,
                 "none": None, "list": [1, "two", (3, 4.0)], "tuple": (torch.zeros(1), "x"),
                 "bytes": b"\x00\xffabc", "empty_bytes": b"", "set": {1, 2}, "big": 2**70,
                 "complex": 1 + 2j},
    }


def _save(obj, path, fmt):
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "zip-protocol4":  # STACK_GLOBAL / FRAME / MEMOIZE opcodes
        torch.save(obj, path, pickle_protocol=4)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    return str(path)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["zip", "zip-protocol4", "legacy"])
def test_round_trip_matches_torch(tmp_path, fmt):
    obj = _rich_checkpoint()
    path = _save(obj, tmp_path / "rich.pt", fmt)
    if fmt != "legacy":
        with zipfile.ZipFile(path) as z:  # the views above really share storages
            records = [n for n in z.namelist() if "/data/" in n]
        assert len(records) == len(obj["tensors"]) + 2 - 5  # +2 outside "tensors"; views add none
    got = load_torch_pickle(path)
    _assert_same(got, obj)
    # views of one storage come back as independent arrays
    got["tensors"]["base"][:] = 0
    _assert_same(got["tensors"]["row"], obj["tensors"]["row"])


def test_round_trip_survives_recompressed_and_big_endian_archives(tmp_path):
    obj = {"a": torch.randn(3, 4), "view": None, "h": torch.randn(5).bfloat16(),
           "i": torch.arange(6, dtype=torch.int64)}
    obj["view"] = obj["a"][1:, ::2]
    src = _save(obj, tmp_path / "le.pt", "zip")
    deflated = _rewrite_archive(src, tmp_path / "deflated.pt", lambda n, b: (n, b),
                                compression=zipfile.ZIP_DEFLATED)
    _assert_same(load_torch_pickle(deflated), obj)

    # torch writes "<name>/byteorder"; a big-endian writer stores every element swapped.
    itemsize = {"0": 4, "1": 2, "2": 8}  # storage keys in pickling order: a (view shares), h, i

    def to_big(name, raw):
        if name.endswith("/byteorder"):
            return name, b"big"
        if "/data/" in name and name.rsplit("/", 1)[-1] in itemsize:
            n = itemsize[name.rsplit("/", 1)[-1]]
            return name, np.frombuffer(raw, np.dtype(f"<u{n}")).astype(f">u{n}").tobytes()
        return name, raw

    _assert_same(load_torch_pickle(_rewrite_archive(src, tmp_path / "be.pt", to_big)), obj)


def test_legacy_file_with_a_pickle_longer_than_the_read_buffer(tmp_path):
    # The legacy reader seeks to storage data while the object pickle is being unpickled;
    # a pickle longer than the file's read-ahead buffer exposed a shared-position bug.
    sd = {f"blocks.{i}.weight": torch.full((2,), float(i)) for i in range(600)}
    path = _save(sd, tmp_path / "long.pt", "legacy")
    _assert_same(load_torch_pickle(path), sd)


def test_works_without_torch_importable(tmp_path):
    path = _save({"w": torch.arange(6.0).reshape(2, 3).t()}, tmp_path / "w.pt", "zip")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ldm_jax.convert.torch_pickle import load_torch_pickle\n"
            f"w = load_torch_pickle({path!r})['w']\n"
            "assert w.tolist() == [[0, 3], [1, 4], [2, 5]], w\n"
            "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo)


def test_module_state_dict_through_read_state_dict(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.GroupNorm(2, 8),
                              torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    net[2].running_mean.normal_()
    sd = net.state_dict()  # an OrderedDict with a `_metadata` attribute, 0-d int64 counter
    path = _save(sd, tmp_path / "pytorch_model.bin", "zip")
    raw = load_torch_pickle(path)
    _assert_same(raw, sd)
    assert raw._metadata == sd._metadata  # set by BUILD on the OrderedDict
    flat = read_state_dict(path)
    assert list(flat) == list(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(flat[k], v.numpy())
    assert flat["2.num_batches_tracked"].shape == () and flat["2.num_batches_tracked"].dtype == np.int64

    half = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    flat16 = read_state_dict(_save(half, tmp_path / "half.bin", "legacy"))
    for k, v in half.items():
        np.testing.assert_array_equal(flat16[k], v.numpy())


def _fake_module(monkeypatch, dotted, **attrs):
    """Register a module (and its parents) so pickle can name classes in it at save time."""
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for key, value in attrs.items():
        value.__module__, value.__qualname__ = dotted, key
        setattr(sys.modules[dotted], key, value)
    return sys.modules[dotted]


def test_lightning_checkpoint_with_callbacks_and_numpy_scalars(tmp_path, monkeypatch):
    torch.manual_seed(0)
    sd = torch.nn.Linear(3, 2).state_dict()

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_score = "val/loss", torch.tensor(0.25)

    class AttributeDict(dict):
        pass

    with monkeypatch.context() as m:  # PL is not installed: fake its modules for saving
        _fake_module(m, "pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint)
        _fake_module(m, "pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict)
        ckpt = {
            "epoch": 1, "global_step": 3, "pytorch-lightning_version": torch.__version__,
            "state_dict": sd,
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "dirpath": "x"},
                          "instance": ModelCheckpoint()},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2, 3)}},
                                  "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}],
            "hyper_parameters": AttributeDict(lr=1e-4, channels=64),
            "numpy": {"step": np.int64(470000), "epoch": np.int32(6), "loss": np.float32(0.25),
                      "double": np.float64(-1.5), "ok": np.bool_(True)},
        }
        path = _save(ckpt, tmp_path / "last.ckpt", "zip")
        globals_in_file = [arg for op, arg, _ in pickletools.genops(
            zipfile.ZipFile(path).read("last/data.pkl")) if op.name == "GLOBAL"]
    assert "pytorch_lightning.callbacks.model_checkpoint ModelCheckpoint" in globals_in_file
    assert "torch.torch_version TorchVersion" in globals_in_file
    assert any(g.endswith("multiarray scalar") for g in globals_in_file)

    # A package named like Lightning that would leave a mark if anything imported it.
    marker = tmp_path / "imported"
    pkg = tmp_path / "site" / "pytorch_lightning"
    (pkg / "callbacks").mkdir(parents=True)
    for init in (pkg / "__init__.py", pkg / "callbacks" / "__init__.py"):
        init.write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    got = load_torch_pickle(path)
    assert not marker.exists() and "pytorch_lightning" not in sys.modules
    assert got["epoch"] == 1 and got["global_step"] == 3
    assert got["pytorch-lightning_version"] == torch.__version__
    assert type(got["pytorch-lightning_version"]).__bases__ == (str,)
    _assert_same(got["state_dict"], sd)
    (cls_key,) = [k for k in got["callbacks"] if isinstance(k, type)]
    assert cls_key.pickled_class == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    np.testing.assert_array_equal(got["callbacks"][cls_key]["best_model_score"], np.float32(0.5))
    inst = got["callbacks"]["instance"]
    assert isinstance(inst, PickledObject) and inst.state["monitor"] == "val/loss"
    np.testing.assert_array_equal(inst.state["best_model_score"], np.float32(0.25))
    assert dict(got["hyper_parameters"]) == {"lr": 1e-4, "channels": 64}
    for key, want in ckpt["numpy"].items():
        assert type(got["numpy"][key]) is type(want) and got["numpy"][key] == want, key
    np.testing.assert_array_equal(got["optimizer_states"][0]["state"][0]["exp_avg"], np.ones((2, 3)))

    flat = read_state_dict(path)
    assert sorted(flat) == ["bias", "weight"]
    np.testing.assert_array_equal(flat["weight"], sd["weight"].numpy())


def test_numpy_scalars_from_numpy_1_and_2_are_rebuilt_from_bytes(tmp_path):
    src = _save({"global_step": np.int64(470000), "epoch": np.int32(6)}, tmp_path / "np2.ckpt", "zip")
    np1 = _rewrite_archive(src, tmp_path / "np1.ckpt", lambda n, b: (n, b.replace(
        b"cnumpy._core.multiarray\nscalar", b"cnumpy.core.multiarray\nscalar")))
    with zipfile.ZipFile(np1) as z:
        assert b"numpy.core.multiarray\nscalar" in z.read("np2/data.pkl")
    for path in (src, np1):
        got = load_torch_pickle(path)
        assert type(got["global_step"]) is np.int64 and got["global_step"] == 470000
        assert type(got["epoch"]) is np.int32 and got["epoch"] == 6
    # object dtypes would make numpy unpickle a Python object: refused
    obj = _write_archive(tmp_path / "obj.ckpt", b"\x80\x02cnumpy._core.multiarray\nscalar\n"
                         b"cnumpy\ndtype\nX\x01\x00\x00\x00O\x89\x88\x87RN\x86R.")
    with pytest.raises(CheckpointError, match="'O' is not a plain number type"):
        load_torch_pickle(obj)


def test_hand_made_untyped_storage_with_rebuild_tensor_v3(tmp_path):
    # A storage of raw bytes (torch.storage.UntypedStorage) viewed as float32 from
    # element 1 with stride 2: offsets and strides count dtype elements, not bytes.
    values = np.arange(8, dtype=np.float32)
    storage_id = ("storage", torch.storage.UntypedStorage, "0", "cpu", values.nbytes)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return storage_id if obj == "STORAGE" else None

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v3,
                    ("STORAGE", 1, (3,), (2,), False, collections.OrderedDict(), torch.float32))

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"t": Tensor()})
    path = _write_archive(tmp_path / "v3.pt", buf.getvalue(), {"0": values.tobytes()})
    np.testing.assert_array_equal(torch.load(path, weights_only=True)["t"].numpy(), [1, 3, 5])
    np.testing.assert_array_equal(load_torch_pickle(path)["t"], np.array([1, 3, 5], np.float32))


# ----------------------------------------------------------------------------- malicious files


class _Reduce:
    """An object whose unpickling would call `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _malicious_pickles(marker):
    cmd = f"touch {marker}"
    enc = cmd.encode()
    return {
        # pickled by Python: os.system is posix.system, eval is (__)builtin(__).eval
        "posix.system": pickle.dumps(_Reduce(os.system, cmd), protocol=2),
        "builtins.eval": pickle.dumps(_Reduce(eval, f"__import__('os').system({cmd!r})"), protocol=2),
        "subprocess.Popen": pickle.dumps(_Reduce(subprocess.Popen, ["touch", str(marker)]), protocol=2),
        "builtins.exec": pickle.dumps(_Reduce(exec, f"import os; os.system({cmd!r})"), protocol=4),
        # hand-written opcodes: GLOBAL, STACK_GLOBAL, INST, OBJ, nested getattr/__import__
        "os.system": b"\x80\x02cos\nsystem\nX" + len(enc).to_bytes(4, "little") + enc + b"\x85R.",
        "nt.system": b"cnt\nsystem\n(V" + enc + b"\ntR.",
        "os.popen": b"\x80\x04\x8c\x02os\x8c\x05popen\x93\x8c" + bytes([len(enc)]) + enc + b"\x85R.",
        "sys.modules": b"\x80\x04\x8c\x03sys\x8c\x07modules\x93.",
        "posix.system ": b"(V" + enc + b"\niposix\nsystem\n.",  # INST
        "os.system ": b"(cos\nsystem\nV" + enc + b"\no.",  # OBJ
        "builtins.getattr": (b"c__builtin__\ngetattr\n(c__builtin__\n__import__\n(Vos\ntRVsystem\n"
                             b"tR(V" + enc + b"\ntR."),
        "functools.partial": pickle.dumps(_Reduce(__import__("functools").partial, os.system, cmd)),
        # an allow-listed name cannot be smuggled: STACK_GLOBAL checks the real pair
        "torch._utils.os": b"\x80\x04\x8c\x0ctorch._utils\x8c\x02os\x93.",
    }


def _splice(real_pkl: bytes, payload: bytes) -> bytes:
    """`real_pkl` with its string "HOLE_XYZ" (the last value it pickles) replaced by `payload`."""
    body = pickletools.optimize(payload)  # drops memo PUTs that could clash with the outer pickle
    if body[:1] == b"\x80":
        body = body[2:]  # PROTO
    if body[:1] == b"\x95":
        body = body[9:]  # FRAME and its length
    hole = b"X\x08\x00\x00\x00HOLE_XYZ"
    assert real_pkl.count(hole) == 1 and body.endswith(b".")
    return real_pkl.replace(hole, body[:-1])


@pytest.mark.parametrize("container", ["zip", "zip-in-real-checkpoint", "legacy", "plain-pickle"])
def test_malicious_pickles_are_refused_and_never_run(tmp_path, container):
    marker = tmp_path / "pwned"
    real_path = tmp_path / "real.ckpt"
    for rejected, payload in _malicious_pickles(marker).items():
        path = str(tmp_path / f"evil_{container}.ckpt")
        if container == "zip":
            _write_archive(path, payload)
        elif container == "zip-in-real-checkpoint":  # deep inside a genuine torch.save file
            real = _save({"state_dict": {"w": torch.ones(2)}, "z": "HOLE_XYZ"}, real_path, "zip")
            _rewrite_archive(real, path, lambda n, b: (n, _splice(b, payload) if n.endswith(
                "data.pkl") else b))
        elif container == "legacy":
            with open(path, "wb") as f:
                f.write(_legacy_stream(payload))
        else:  # the payload as a bare file: a plain pickle, not a torch archive
            with open(path, "wb") as f:
                f.write(payload)
        with pytest.raises(CheckpointError) as info:
            load_torch_pickle(path)
        msg = str(info.value)
        if container != "plain-pickle" or payload[:1] == b"\x80":
            assert info.type is UnsafePickleError, (rejected, msg)
            assert f"`{rejected.strip()}`" in msg and NOTHING_RAN in msg and path in msg, msg
        else:  # protocol-0 bare pickles are not even unpickled
            assert "not a PyTorch checkpoint" in msg and path in msg, msg
        assert not marker.exists(), rejected
        assert not (tmp_path / "ldm_evil_probe_ran").exists()


def test_refused_globals_are_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "ldm_evil_probe_ran"
    (tmp_path / "ldm_evil_probe.py").write_text(f"open({str(marker)!r}, 'w').close()\nrun = print\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for payload in (b"\x80\x02cldm_evil_probe\nrun\n.", b"\x80\x04\x8c\x0eldm_evil_probe\x8c\x03run\x93.",
                    b"\x80\x02cpytorch_lightning.callbacks.ldm_evil_probe\nrun\n."):
        path = _write_archive(tmp_path / "probe.ckpt", payload)
        if b"pytorch_lightning" in payload:  # a placeholder: allowed, but not imported
            assert load_torch_pickle(path).pickled_class == "pytorch_lightning.callbacks.ldm_evil_probe.run"
        else:
            with pytest.raises(UnsafePickleError, match="`ldm_evil_probe.run`"):
                load_torch_pickle(path)
        assert not marker.exists() and "ldm_evil_probe" not in sys.modules


def test_stand_ins_cannot_be_patched_by_build(tmp_path):
    # BUILD (setstate / setattr) on the objects find_class hands out must fail, or a file
    # could rewire the reader for the next file it loads.
    for payload, reason in (
            (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x0c\x00\x00\x00__defaults__)sb.",
             "tried to set the state of torch._utils._rebuild_tensor_v2"),
            (b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtype\x89s\x86b.",
             "tried to set the state of torch.FloatStorage"),
            (b"\x80\x02ccollections\nOrderedDict\nN}X\x08\x00\x00\x00__repr__K\x01s\x86b.",
             "cannot set '__repr__' attribute of immutable type"),
            (b"\x80\x02cpytorch_lightning.callbacks\nX\nN}X\x07\x00\x00\x00__new__K\x01s\x86b.",
             r"__setstate__\(\) missing 1 required positional argument")):
        path = _write_archive(tmp_path / "build.ckpt", payload)
        with pytest.raises(CheckpointError, match="corrupt or unsupported pickle .*" + reason):
            load_torch_pickle(path)
    _assert_same(load_torch_pickle(_save({"w": torch.ones(2, 2).t()}, tmp_path / "ok.pt", "zip")),
                 {"w": torch.ones(2, 2)})


# ----------------------------------------------------------------------------- bad files


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    obj = {"a": torch.randn(64, 64), "b": torch.arange(10)}
    good = _save(obj, tmp_path / "good.pt", "zip")
    blob = open(good, "rb").read()

    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt: truncated or corrupt zip"):
        load_torch_pickle(str(cut))

    short = _rewrite_archive(good, tmp_path / "short.pt",
                             lambda n, b: (n, b[:100] if n.endswith("/data/0") else b))
    with pytest.raises(CheckpointError, match=r"short\.pt: record good/data/0 has 100 bytes"):
        load_torch_pickle(short)

    missing = _rewrite_archive(good, tmp_path / "missing.pt",
                               lambda n, b: None if n.endswith("/data/1") else (n, b))
    with pytest.raises(CheckpointError, match=r"missing\.pt: .*storage '1'"):
        load_torch_pickle(missing)

    legacy = _save(obj, tmp_path / "legacy.pt", "legacy")
    blob = open(legacy, "rb").read()
    (tmp_path / "legacy_cut.pt").write_bytes(blob[:-50])
    with pytest.raises(CheckpointError, match=r"legacy_cut\.pt: truncated"):
        load_torch_pickle(str(tmp_path / "legacy_cut.pt"))
    (tmp_path / "legacy_cut2.pt").write_bytes(blob[:200])  # inside the object pickle
    with pytest.raises(CheckpointError, match=r"legacy_cut2\.pt: corrupt or unsupported pickle"):
        load_torch_pickle(str(tmp_path / "legacy_cut2.pt"))

    with pytest.raises(CheckpointError, match="no such file"):
        load_torch_pickle(str(tmp_path / "absent.ckpt"))


@pytest.mark.parametrize("kind", ["plain-dict", "protocol0", "garbage", "empty", "safetensors",
                                  "empty-zip", "torchscript", "sparse", "numpy-array", "module"])
def test_unsupported_inputs_give_clear_errors(tmp_path, kind):
    path = str(tmp_path / f"{kind}.ckpt")
    expect = {
        "plain-dict": "a plain pickle, not a PyTorch checkpoint",
        "protocol0": "not a PyTorch checkpoint",
        "garbage": "not a PyTorch checkpoint",
        "empty": "not a PyTorch checkpoint",
        "safetensors": "looks like a safetensors file",
        "empty-zip": "without exactly one <name>/data.pkl",
        "torchscript": "TorchScript archive",
        "sparse": "sparse tensors",
        "numpy-array": "numpy arrays",
        "module": "nn.Module",
    }[kind]
    if kind == "plain-dict":
        open(path, "wb").write(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    elif kind == "protocol0":
        open(path, "wb").write(pickle.dumps({"w": 1}, protocol=0))
    elif kind == "garbage":
        open(path, "wb").write(b"GARBAGE!" + np.random.default_rng(0).bytes(4096))
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "safetensors":
        from safetensors.numpy import save_file
        save_file({"w": np.ones(2, np.float32)}, path)
    elif kind == "empty-zip":
        zipfile.ZipFile(path, "w").close()
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    elif kind == "sparse":
        torch.save({"s": torch.eye(3).to_sparse()}, path)
    elif kind == "numpy-array":
        torch.save({"a": np.ones(3)}, path)
    elif kind == "module":  # legacy files can hold a whole module by source reference
        _legacy = _legacy_stream(b"\x80\x02(X\x06\x00\x00\x00moduleNNNtQ.")
        open(path, "wb").write(_legacy)
    with pytest.raises(CheckpointError) as info:
        load_torch_pickle(path)
    assert expect in str(info.value) and path in str(info.value), str(info.value)
    assert info.type is CheckpointError  # unsupported, not unsafe
