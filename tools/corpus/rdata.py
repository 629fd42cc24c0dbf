"""Reading an R lazy-load database (.rdb/.rdx) without R: XDR unserialization of the types a data package holds."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path


class RUnserializer:
    """Reader for R's XDR serialization (format 2 and 3), covering the types a data package holds."""

    _SINGLETONS = frozenset(range(241, 255))  # NULL, special environments, missing-argument markers
    _PAIRS = frozenset({2, 3, 5, 6, 17})  # pairlist, closure, promise, call, dots: attr?, tag?, car, cdr

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.pos = 2
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()  # then the native encoding's name (a separate statement: += would read pos too early)
            self.pos += n

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            n = (self.int() << 32) + self.int()
        return n

    def item(self):
        """Next object: str/None for strings, list for vectors, dict for pairlists, tuple for symbols."""
        flags = self.int()
        sexp_type, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if sexp_type in self._SINGLETONS:
            return None
        if sexp_type == 255:  # reference to an earlier symbol or environment
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sexp_type == 1:  # symbol
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if sexp_type == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            # Flag bit 2 of the level field (1 << 14) marks latin-1; UTF-8 and ASCII both decode as UTF-8.
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8")
        if sexp_type in self._PAIRS:
            result = {}
            while True:
                attr = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                key = tag[1] if isinstance(tag, tuple) else len(result)
                result[key] = self.item()
                if attr:
                    result.setdefault("__attributes__", attr)
                # Walk the cdr chain iteratively: long pairlists would otherwise recurse deeply.
                flags = self.int()
                sexp_type, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if sexp_type not in self._PAIRS:
                    self.pos -= 4
                    self.item()  # the terminating NULL (or a dotted tail)
                    return result
        if sexp_type == 4:  # environment
            env: dict = {}
            self.refs.append(env)
            self.int()  # locked
            for _ in range(4):  # enclosure, frame, hash table, attributes
                self.item()
            return env
        if sexp_type in (16, 19, 20):  # character vector, list, expression
            value = [self.item() for _ in range(self.length())]
        elif sexp_type in (10, 13):  # logical, integer
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif sexp_type == 14:  # double
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif sexp_type == 238:  # ALTREP: class info, state, attributes
            self.item()
            value = self.item()
            self.item()
            return value
        else:
            raise ValueError(f"unsupported R type {sexp_type} at byte {self.pos}")
        if has_attr:
            value = RVector(value)
            value.attributes = self.item()
        return value


class RVector(list):
    """An R vector that carried attributes (such as names)."""

    attributes: dict | None = None


def read_r_lazyload(data_dir: Path, name: str = "Rdata") -> dict[str, object]:
    """Objects of an R lazy-load DB: the .rdx index names (offset, length) records of the .rdb."""
    index = RUnserializer(gzip.decompress((data_dir / f"{name}.rdx").read_bytes())).item()
    rdb = (data_dir / f"{name}.rdb").read_bytes()
    # The index is list(variables=, references=, compressed=); "variables" is a named list of c(offset, length).
    variables = index[0]
    if not isinstance(variables, RVector) or "names" not in (variables.attributes or {}):
        raise SystemExit(f"unexpected layout of {name}.rdx")
    objects = {}
    for var_name, (offset, length) in zip(variables.attributes["names"], variables):
        record = rdb[offset : offset + length]
        (size,) = struct.unpack(">I", record[:4])  # record: uncompressed size (big-endian) + zlib stream
        payload = zlib.decompress(record[4:])
        if len(payload) != size:
            raise SystemExit(f"{name}.rdb record {var_name}: {len(payload)} bytes, header says {size}")
        objects[var_name] = RUnserializer(payload).item()
    return objects
