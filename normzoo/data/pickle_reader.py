"""Read the CIFAR "python version" batch files without unpickling them.

Those files are pickles of a dict of numpy arrays, lists, strings and ints. An unpickler, even one restricted to
numpy's own globals, lets the file choose what numpy does: an object-dtype array rebuilt from raw bytes makes
numpy dereference pointers the file wrote, and crashes the process. So nothing here calls into pickle or into
numpy's reconstruction functions. :func:`read_pickled_data` walks the pickle opcodes itself (protocols 0-5, the
subset such files use), keeps every value as plain data, and builds arrays at the end with ``np.frombuffer`` from
their raw bytes, for plain numeric dtypes only (bool, ints, floats: no objects, no structured records). Anything
else (any other global, an object dtype, a shape that does not match the bytes, an unknown opcode) is a one-line
:class:`PickleDataError`; no file content is ever executed or used as an address.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from normzoo.errors import NormzooError

# numpy typestrings the readable arrays may have: plain numbers, nothing that holds references or records.
SAFE_DTYPES = frozenset({"b1", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"})
MAX_ELEMENTS = 2**32  # no CIFAR batch comes close; a larger claim is refused before any arithmetic on it


class PickleDataError(NormzooError):
    """The file is not a plain-data pickle of the kind this reader accepts."""


# -- the values a pickle may build here -----------------------------------------------------------------------
@dataclass
class _Global:
    """A global the file names; only these few names are accepted, and none is ever called."""

    name: str


@dataclass
class _DType:
    typestr: str
    byteorder: str = "|"


@dataclass
class _Array:
    """An array announced by ``_reconstruct`` and filled by BUILD, or given whole by ``_frombuffer``."""

    shape: tuple[int, ...] = ()
    dtype: _DType | None = None
    fortran: bool = False
    data: bytes | None = None
    built: bool = False


_RECONSTRUCT = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
_FROMBUFFER = {"numpy.core.numeric._frombuffer", "numpy._core.numeric._frombuffer"}
_ALLOWED = _RECONSTRUCT | _FROMBUFFER | {"numpy.ndarray", "numpy.dtype", "_codecs.encode"}


@dataclass
class _Machine:
    data: bytes
    pos: int = 0
    stack: list[Any] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)
    memo: dict[int, Any] = field(default_factory=dict)

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PickleDataError("the pickle is truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise PickleDataError("the pickle is truncated")
        text, self.pos = self.data[self.pos:end], end + 1
        return text

    def pop(self) -> Any:
        if not self.stack or (self.marks and len(self.stack) <= self.marks[-1]):
            raise PickleDataError("the pickle pops from an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise PickleDataError("the pickle has no mark to pop to")
        start = self.marks.pop()
        items, self.stack[start:] = self.stack[start:], []
        return items


def _reduce(func: Any, args: Any) -> Any:
    """What calling ``func(*args)`` would describe, as data (nothing is called)."""
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        raise PickleDataError("the pickle applies something that is not an allowed global")
    if func.name in _RECONSTRUCT:
        return _Array()
    if func.name == "numpy.dtype":
        if not args or not isinstance(args[0], str):
            raise PickleDataError("the pickle builds a dtype from something that is not a type string")
        return _DType(args[0])
    if func.name == "_codecs.encode":
        if len(args) != 2 or not isinstance(args[0], str) or args[1] not in ("latin1", "latin-1"):
            raise PickleDataError("the pickle encodes text other than latin-1 bytes")
        return args[0].encode("latin1")
    if func.name in _FROMBUFFER:
        if len(args) != 4 or not isinstance(args[0], (bytes, bytearray)) or not isinstance(args[1], _DType):
            raise PickleDataError("the pickle builds an array from something that is not bytes and a dtype")
        return _Array(shape=args[2], dtype=args[1], fortran=args[3] == "F", data=bytes(args[0]), built=True)
    raise PickleDataError(f"the pickle calls {func.name}, which rebuilds nothing this reader accepts")


def _build(target: Any, state: Any) -> Any:
    """BUILD: ``__setstate__`` of a dtype or an array, taken as data."""
    if isinstance(target, _DType):
        if not (isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str)):
            raise PickleDataError("the pickle gives a dtype a state this reader does not know")
        if any(part is not None for part in state[2:5]):  # subarray, field names, fields: records
            raise PickleDataError("the pickle holds a structured dtype; only plain numbers are read")
        target.byteorder = state[1]
        return target
    if isinstance(target, _Array) and not target.built:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)):
            raise PickleDataError("the pickle gives an array a state this reader does not know")
        _, shape, dtype, fortran, raw = state
        target.shape, target.dtype, target.fortran, target.built = shape, dtype, bool(fortran), True
        target.data = raw.encode("latin1") if isinstance(raw, str) else raw
        return target
    raise PickleDataError("the pickle sets the state of something that is not an array or a dtype")


def _array(spec: _Array) -> np.ndarray:
    if spec.dtype is None or not spec.built:
        raise PickleDataError("the pickle announces an array it never fills")
    code = spec.dtype.typestr.lstrip("<>|=")
    if code not in SAFE_DTYPES:
        raise PickleDataError(f"the pickle holds an array of dtype '{spec.dtype.typestr[:20]}'; only plain numbers "
                              "(bool, int, uint, float) are read")
    if not isinstance(spec.data, (bytes, bytearray)):
        raise PickleDataError("the pickle fills an array with something other than its raw bytes")
    shape = spec.shape
    if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_ELEMENTS
                                             for d in shape)):
        raise PickleDataError("the pickle gives an array a shape that is not a tuple of sizes")
    order = {">": ">", "<": "<"}.get(spec.dtype.byteorder, "<")
    dtype = np.dtype(code).newbyteorder(order) if np.dtype(code).itemsize > 1 else np.dtype(code)
    count = int(np.prod(shape, dtype=object))
    if count > MAX_ELEMENTS or count * dtype.itemsize != len(spec.data):
        raise PickleDataError(f"the pickle's array claims shape {list(shape)[:8]} of {code} but holds "
                              f"{len(spec.data)} bytes")
    return np.frombuffer(spec.data, dtype=dtype).reshape(shape, order="F" if spec.fortran else "C")


def _plain(value: Any, done: dict[int, Any] | None = None) -> Any:
    """The finished value with arrays made real; anything left half-described is an error.

    A value the pickle refers to twice is converted once (``done``), so a file of nested references cannot make
    the conversion exponential, and a list that contains itself stays a list that contains itself.
    """
    done = {} if done is None else done
    if id(value) in done:
        return done[id(value)]
    if isinstance(value, _Array):
        result: Any = _array(value)
    elif isinstance(value, dict):
        result = done[id(value)] = {}
        result.update({_plain(k, done): _plain(v, done) for k, v in value.items()})
    elif isinstance(value, list):
        result = done[id(value)] = []
        result.extend(_plain(v, done) for v in value)
    elif isinstance(value, tuple):
        result = tuple(_plain(v, done) for v in value)
    elif isinstance(value, (_Global, _DType)):
        raise PickleDataError("the pickle's data contains a bare global or dtype")
    else:
        return value
    done[id(value)] = result
    return result


def _set_items(target: Any, items: list[Any]) -> None:
    if not isinstance(target, dict) or len(items) % 2:
        raise PickleDataError("the pickle sets items on something that is not a dict")
    for key, value in zip(items[::2], items[1::2]):
        if not isinstance(key, (str, bytes, int)):
            raise PickleDataError("the pickle has a dict key that is not a string or an int")
        target[key] = value


def read_pickled_data(path: str | Path) -> Any:
    """The plain data (dicts, lists, tuples, str, bytes, int, float, bool, None, numeric arrays) of a pickle."""
    path = Path(path)
    try:
        machine = _Machine(path.read_bytes())
    except OSError as exc:
        raise NormzooError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return _run(machine)
    except PickleDataError as exc:
        raise PickleDataError(f"{path}: {exc}") from None
    except (RecursionError, MemoryError, OverflowError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise PickleDataError(f"{path}: the pickle is malformed ({type(exc).__name__})") from None


def _run(m: _Machine) -> Any:  # noqa: C901 - one branch per opcode reads best as one table
    s = m.stack
    while True:
        op = m.take(1)[0]
        if op == 0x80:  # PROTO
            m.take(1)
        elif op == 0x95:  # FRAME
            m.take(8)
        elif op == 0x2E:  # STOP
            if len(s) != 1 or m.marks:
                raise PickleDataError("the pickle ends with a stack that is not one value")
            return _plain(s[0])
        elif op == 0x28:  # MARK
            m.marks.append(len(s))
        elif op == 0x30:  # POP
            m.pop()
        elif op == 0x31:  # POP_MARK
            m.pop_mark()
        elif op == 0x32:  # DUP
            s.append(s[-1] if s else m.pop())
        elif op == 0x4E:  # NONE
            s.append(None)
        elif op in (0x88, 0x89):  # NEWTRUE, NEWFALSE
            s.append(op == 0x88)
        elif op == 0x4A:  # BININT
            s.append(int.from_bytes(m.take(4), "little", signed=True))
        elif op == 0x4B:  # BININT1
            s.append(m.uint(1))
        elif op == 0x4D:  # BININT2
            s.append(m.uint(2))
        elif op in (0x8A, 0x8B):  # LONG1, LONG4
            n = m.uint(1 if op == 0x8A else 4)
            if n > 64:
                raise PickleDataError("the pickle holds an integer longer than 64 bytes")
            s.append(int.from_bytes(m.take(n), "little", signed=True))
        elif op == 0x49:  # INT (text)
            text = m.line()
            s.append(True if text == b"01" else False if text == b"00" else int(text))
        elif op == 0x4C:  # LONG (text)
            s.append(int(m.line().rstrip(b"L")))
        elif op == 0x47:  # BINFLOAT
            s.append(struct.unpack(">d", m.take(8))[0])
        elif op == 0x46:  # FLOAT (text)
            s.append(float(m.line()))
        elif op in (0x55, 0x54):  # SHORT_BINSTRING, BINSTRING: Python 2 str, read as latin-1 text
            s.append(m.take(m.uint(1 if op == 0x55 else 4)).decode("latin1"))
        elif op in (0x8C, 0x58, 0x8D):  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            s.append(m.take(m.uint({0x8C: 1, 0x58: 4, 0x8D: 8}[op])).decode("utf-8"))
        elif op in (0x43, 0x42, 0x8E, 0x96):  # SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
            s.append(m.take(m.uint({0x43: 1, 0x42: 4, 0x8E: 8, 0x96: 8}[op])))
        elif op == 0x29:  # EMPTY_TUPLE
            s.append(())
        elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
            n = op - 0x84
            if len(s) < n:
                raise PickleDataError("the pickle pops from an empty stack")
            s[-n:] = [tuple(s[-n:])]
        elif op == 0x74:  # TUPLE
            s.append(tuple(m.pop_mark()))
        elif op == 0x5D:  # EMPTY_LIST
            s.append([])
        elif op == 0x6C:  # LIST
            s.append(m.pop_mark())
        elif op == 0x7D:  # EMPTY_DICT
            s.append({})
        elif op == 0x64:  # DICT
            target: dict[Any, Any] = {}
            _set_items(target, m.pop_mark())
            s.append(target)
        elif op == 0x61:  # APPEND
            value = m.pop()
            if not s or not isinstance(s[-1], list):
                raise PickleDataError("the pickle appends to something that is not a list")
            s[-1].append(value)
        elif op == 0x65:  # APPENDS
            items = m.pop_mark()
            if not s or not isinstance(s[-1], list):
                raise PickleDataError("the pickle appends to something that is not a list")
            s[-1].extend(items)
        elif op == 0x73:  # SETITEM
            value, key = m.pop(), m.pop()
            _set_items(s[-1] if s else None, [key, value])
        elif op == 0x75:  # SETITEMS
            items = m.pop_mark()
            _set_items(s[-1] if s else None, items)
        elif op in (0x70, 0x71, 0x72, 0x94):  # PUT, BINPUT, LONG_BINPUT, MEMOIZE
            index = int(m.line()) if op == 0x70 else m.uint(1) if op == 0x71 else m.uint(4) if op == 0x72 \
                else len(m.memo)
            if not s:
                raise PickleDataError("the pickle memoizes an empty stack")
            m.memo[index] = s[-1]
        elif op in (0x67, 0x68, 0x6A):  # GET, BINGET, LONG_BINGET
            index = int(m.line()) if op == 0x67 else m.uint(1) if op == 0x68 else m.uint(4)
            if index not in m.memo:
                raise PickleDataError("the pickle refers to a value it never stored")
            s.append(m.memo[index])
        elif op in (0x63, 0x93):  # GLOBAL, STACK_GLOBAL
            if op == 0x63:
                module, name = m.line().decode("latin1"), m.line().decode("latin1")
            else:
                name, module = m.pop(), m.pop()
            qualified = f"{module}.{name}"
            if qualified not in _ALLOWED:
                raise PickleDataError(f"the pickle names the global '{qualified[:80]}'; only numpy arrays of plain "
                                      "numbers are read")
            s.append(_Global(qualified))
        elif op == 0x52:  # REDUCE
            args, func = m.pop(), m.pop()
            s.append(_reduce(func, args))
        elif op == 0x62:  # BUILD
            state = m.pop()
            if not s:
                raise PickleDataError("the pickle builds on an empty stack")
            s[-1] = _build(s[-1], state)
        else:
            raise PickleDataError(f"the pickle uses opcode 0x{op:02x}, which plain CIFAR data never needs")
