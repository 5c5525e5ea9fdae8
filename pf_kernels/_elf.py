"""The shared libraries an ELF file needs (its DT_NEEDED entries), read without binutils.

Used by setup.py after building pf_kernels._C and by pf_kernels._extension before loading it: a _C
that carries its own static copy of the C++ standard library, beside the shared one torch uses,
crashes the process the first time a kernel formats an error message (seen on a GPU machine whose
$CXX wrapper linked libstdc++ statically: a segfault inside std::ostream in _C).
Standard library only: setup.py loads this file by path, before pf_kernels is importable.
"""
from __future__ import annotations

import struct
from typing import List, Optional

_SHT_DYNAMIC, _DT_NEEDED = 6, 1


def needed_libraries(path: str) -> Optional[List[str]]:
    """The DT_NEEDED names of a 64-bit little-endian ELF shared object; None if it is not one.
    Reads the headers and the dynamic section only (a _C with CUDA kernels is tens of MB)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return None
        shoff, = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [struct.unpack_from("<IIQQQQIIQQ", table, i * shentsize) for i in range(shnum)]
        names = []
        for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
            if sh_type != _SHT_DYNAMIC:
                continue
            f.seek(sections[link][4])
            strtab = f.read(sections[link][5])
            f.seek(offset)
            dynamic = f.read(size)
            for at in range(0, size, entsize or 16):
                tag, value = struct.unpack_from("<qQ", dynamic, at)
                if tag == 0:
                    break
                if tag == _DT_NEEDED:
                    names.append(strtab[value:strtab.index(b"\0", value)].decode())
    return names


def static_cxx_runtime(path: str) -> bool:
    """True where a C++ shared object needs no shared C++ standard library (it carries its own)."""
    needed = needed_libraries(path)
    return needed is not None and not any(n.startswith(("libstdc++", "libc++")) for n in needed)
