"""A CPU emulator for Metal compute kernels.

``compile_library(source)`` compiles a ``.metal`` file as C++ against the shim header in
``include/metal_stdlib`` and returns an object that is called the way the library from
``torch.mps.compile_shader`` is: ``lib.kernel_name(*args, threads=..., group_size=...)``, with CPU
tensors standing in for MPS ones. Arguments are bound as PyTorch binds them (see
docs/metal.md): argument i to ``[[buffer(i)]]``; a tensor as its raw storage from its
storage offset, strides ignored; a Python int as 8 bytes (int64); a Python float as 4 bytes
(float32). Bindings that the real one would get silently wrong are refused with BindingError:
a scalar of the wrong byte size, a tensor whose dtype differs from the pointer's type, a missing
or extra argument. Every buffer is surrounded by guard zones filled with NaN bytes; a write
outside a buffer is reported, and a read outside it yields NaN. Buffers the kernel may write
(``device T*`` without const) are filled with NaN before the run, so an element the kernel
fails to write shows up as NaN.

Threads run one after another, in reverse order, which is faithful for kernels without
threadgroup memory or barriers (those are refused, as this emulator does not model them).
"""

import ctypes
import hashlib
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SHIM_INCLUDE = Path(__file__).parent / "include"
GUARD_BYTES = 256
MAX_THREADS_PER_GROUP = 1024

# Metal scalar types: (torch dtype of a buffer of them, size in bytes).
SCALAR_TYPES = {
    "float": (torch.float32, 4),
    "half": (torch.float16, 2),
    "bfloat": (torch.bfloat16, 2),
    "long": (torch.int64, 8),
    "ulong": (torch.int64, 8),
    "int": (torch.int32, 4),
    "uint": (torch.int32, 4),
    "short": (torch.int16, 2),
    "ushort": (torch.int16, 2),
    "char": (torch.int8, 1),
    "uchar": (torch.uint8, 1),
    "bool": (torch.bool, 1),
}
THREAD_ATTRIBUTES = {"thread_position_in_grid"}


class BindingError(TypeError):
    """An argument that compile_shader would bind to a kernel parameter wrongly."""


@dataclass(frozen=True)
class Parameter:
    name: str
    address_space: str  # "device", "constant" or "" for thread attributes
    scalar_type: str
    is_pointer: bool
    is_const: bool
    attribute: str  # "buffer" or a thread attribute
    index: int  # buffer index, -1 for thread attributes

    @property
    def declaration(self) -> str:
        const = "const " if self.is_const and self.address_space == "device" else ""
        return f"{self.address_space} {const}{self.scalar_type}{'*' if self.is_pointer else '&'} {self.name}"


@dataclass(frozen=True)
class Kernel:
    host_name: str
    call: str  # the C++ function, with template arguments
    parameters: tuple


def _split_top_level(text: str, separator: str = ","):
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([<":
            depth += 1
        elif ch in ")]>":
            depth -= 1
        if ch == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return [p.strip() for p in parts]


_PARAMETER = re.compile(
    r"^(?P<space>device|constant|threadgroup|thread)?\s*(?P<const>const\s+)?(?P<type>\w+)\s*(?P<ref>[*&]?)\s*"
    r"(?P<name>\w+)\s*\[\[\s*(?P<attr>\w+)\s*(?:\(\s*(?P<index>\d+)\s*\))?\s*\]\]$"
)


def _parse_parameter(text: str, substitutions: dict) -> Parameter:
    match = _PARAMETER.match(" ".join(text.split()))
    if not match:
        raise ValueError(f"cannot parse kernel parameter: {text!r}")
    scalar_type = substitutions.get(match["type"], match["type"])
    if match["attr"] == "buffer":
        if match["space"] not in ("device", "constant") or not match["ref"]:
            raise ValueError(f"buffer parameter {match['name']!r} must be a device/constant pointer or reference")
        is_const = match["space"] == "constant" or bool(match["const"])
        return Parameter(
            match["name"], match["space"], scalar_type, match["ref"] == "*", is_const, "buffer", int(match["index"])
        )
    if match["attr"] not in THREAD_ATTRIBUTES or scalar_type != "uint":
        raise ValueError(f"parameter {text!r}: only `uint name [[thread_position_in_grid]]` is emulated")
    return Parameter(match["name"], "", scalar_type, False, True, match["attr"], -1)


_INSTANTIATION = re.compile(
    r"template\s*\[\[\s*host_name\(\s*(?P<host>(?:\"\w*\"\s*)+)\)\s*\]\]\s*kernel\s+void\s+(?P<func>\w+)\s*"
    r"<(?P<args>[^>]*)>\s*\((?P<params>.*?)\)\s*;",
    re.S,
)
_PLAIN_KERNEL = re.compile(r"(?<![>\]])\s(?:\[\[kernel\]\]|kernel)\s+void\s+(?P<func>\w+)\s*\((?P<params>.*?)\)\s*\{", re.S)
_TEMPLATE_HEAD = re.compile(r"template\s*<(?P<params>[^>]*)>\s*kernel\s+void\s+(?P<func>\w+)\s*\(")


def find_kernels(preprocessed: str):
    """The kernels of a preprocessed Metal source, by host name."""
    if "threadgroup_barrier" in preprocessed or re.search(r"\bthreadgroup\s+\w+\s+\w+\s*\[", preprocessed):
        raise ValueError("threadgroup memory and barriers are not emulated")
    template_params = {
        m["func"]: [p.split()[-1] for p in _split_top_level(m["params"])] for m in _TEMPLATE_HEAD.finditer(preprocessed)
    }
    kernels = {}
    for m in _INSTANTIATION.finditer(preprocessed):
        args = _split_top_level(m["args"])
        substitutions = dict(zip(template_params.get(m["func"], []), args))
        params = tuple(_parse_parameter(p, substitutions) for p in _split_top_level(m["params"]))
        host_name = "".join(re.findall(r'"(\w*)"', m["host"]))  # adjacent literals, as from #T
        kernels[host_name] = Kernel(host_name, f"{m['func']}<{m['args']}>", params)
    for m in _PLAIN_KERNEL.finditer(preprocessed):
        if m["func"] not in template_params:
            params = tuple(_parse_parameter(p, {}) for p in _split_top_level(m["params"]))
            kernels[m["func"]] = Kernel(m["func"], m["func"], params)
    return kernels


def _launcher(kernel: Kernel) -> str:
    """C++ that runs every thread of a 1-D grid, last thread first."""
    args = []
    buffer = 0
    for p in kernel.parameters:
        if p.attribute == "buffer":
            const = "const " if p.address_space == "constant" else ""
            if p.is_pointer:
                args.append(f"static_cast<{p.scalar_type}*>(args[{buffer}])")
            else:
                args.append(f"*static_cast<{const}{p.scalar_type}*>(args[{buffer}])")
            buffer += 1
        else:
            args.append("static_cast<uint>(thread_index)")
    return (
        f'extern "C" void launch_{kernel.host_name}(void** args, long threads) {{\n'
        f"  for (long thread_index = threads - 1; thread_index >= 0; --thread_index) {{\n"
        f"    {kernel.call}({', '.join(args)});\n  }}\n}}\n"
    )


def _compiler_output(command, what):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr}")
    return result.stdout


def compile_library(source_path, build_dir=None, compiler: str = "g++") -> "EmulatedLibrary":
    source_path = Path(source_path).resolve()
    source = source_path.read_text()
    build_dir = Path(build_dir or tempfile.mkdtemp(prefix="metal_emulator_"))
    preprocessed = _compiler_output(
        [compiler, "-E", "-P", "-x", "c++", "-std=c++17", "-I", str(SHIM_INCLUDE), "-D", "METAL_SHIM_KEEP_KEYWORDS",
         str(source_path)],
        "preprocessing the Metal source",
    )
    kernels = find_kernels(preprocessed)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    wrapper = build_dir / f"kernels_{digest}.cpp"
    wrapper.write_text(
        f'#include "{source_path}"\n\n' + "\n".join(_launcher(k) for k in kernels.values())
    )
    shared_object = build_dir / f"kernels_{digest}.so"
    _compiler_output(
        [compiler, "-x", "c++", "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-Wall", "-Werror",
         "-Wno-attributes", "-Wno-unknown-pragmas", "-I", str(SHIM_INCLUDE), str(wrapper), "-o", str(shared_object)],
        "compiling the Metal source as C++",
    )
    return EmulatedLibrary(ctypes.CDLL(str(shared_object)), kernels)


def syntax_check_address_spaces(source_path, compiler: str = "clang++-19") -> None:
    """Checks with clang that the source mixes no address spaces (device, constant, thread) where
    Metal would refuse it. clang rejects attributes on explicit instantiations, so those are
    stripped first."""
    source = Path(source_path).read_text()
    source = re.sub(r"template\s*\[\[\s*host_name\([^)]*\)\s*\]\]", "template", source)
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", delete=False) as f:
        f.write(source)
    _compiler_output(
        [compiler, "-fsyntax-only", "-x", "c++", "-std=c++17", "-Wno-unknown-attributes", "-Werror",
         "-D", "METAL_SHIM_ADDRESS_SPACES", "-I", str(SHIM_INCLUDE), f.name],
        "the address-space check with clang",
    )


class _Buffer:
    """A tensor's raw storage from its storage offset, copied between NaN guard zones."""

    def __init__(self, tensor: torch.Tensor, poison: bool):
        storage = tensor.untyped_storage()
        start = tensor.storage_offset() * tensor.element_size()
        self.data = torch.empty(0, dtype=torch.uint8).set_(storage)[start:]
        self.padded = torch.full((GUARD_BYTES + self.data.numel() + GUARD_BYTES,), 0xFF, dtype=torch.uint8)
        if not poison:
            self.padded[GUARD_BYTES : GUARD_BYTES + self.data.numel()] = self.data
        self.guard = self.padded.clone()

    def address(self) -> int:
        return self.padded.data_ptr() + GUARD_BYTES

    def finish(self, name: str) -> None:
        end = GUARD_BYTES + self.data.numel()
        if not (torch.equal(self.padded[:GUARD_BYTES], self.guard[:GUARD_BYTES]) and torch.equal(self.padded[end:], self.guard[end:])):
            raise RuntimeError(f"out-of-bounds write to buffer {name!r}")
        self.data.copy_(self.padded[GUARD_BYTES:end])


def _bind_scalar(value, parameter: Parameter):
    if isinstance(value, (bool, int)):
        sent, size, ctype = "int64", 8, ctypes.c_int64(int(value))
    elif isinstance(value, float):
        sent, size, ctype = "float32", 4, ctypes.c_float(value)
    else:
        raise BindingError(f"{parameter.name}: cannot bind a {type(value).__name__}")
    declared = SCALAR_TYPES.get(parameter.scalar_type)
    if declared is None or declared[1] != size or (sent == "float32") != (declared[0].is_floating_point):
        raise BindingError(
            f"{parameter.name}: a Python {type(value).__name__} is sent as {size} bytes ({sent}), "
            f"but the kernel declares `{parameter.declaration}`"
        )
    return ctype


class EmulatedLibrary:
    def __init__(self, shared_object, kernels):
        self._shared_object = shared_object
        self._kernels = kernels

    @property
    def function_names(self):
        return sorted(self._kernels)

    def __getattr__(self, name):
        kernels = self.__dict__.get("_kernels", {})
        if name not in kernels:
            raise AttributeError(f"no kernel named {name!r} in the library")
        return lambda *args, **kwargs: self._run(kernels[name], args, **kwargs)

    def _run(self, kernel: Kernel, args, threads, group_size=None, arg_casts=None):
        if arg_casts:
            raise NotImplementedError("arg_casts is not emulated")
        buffers = [p for p in kernel.parameters if p.attribute == "buffer"]
        for position, p in enumerate(buffers):
            if p.index != position:
                raise BindingError(f"{kernel.host_name}: parameter {p.name} is [[buffer({p.index})]] but argument {position} binds to buffer({position})")
        if len(args) != len(buffers):
            raise BindingError(f"{kernel.host_name} takes {len(buffers)} arguments, got {len(args)}")
        threads = threads[0] if isinstance(threads, (tuple, list)) and len(threads) == 1 else threads
        if not isinstance(threads, int):
            raise NotImplementedError("only 1-D grids are emulated")
        if group_size is not None:
            group = group_size[0] if isinstance(group_size, (tuple, list)) else group_size
            if not 0 < group <= MAX_THREADS_PER_GROUP:
                raise ValueError(f"group_size {group} is outside 1..{MAX_THREADS_PER_GROUP}")
        bound, keep = [], []
        tensors = []
        for value, p in zip(args, buffers):
            if isinstance(value, torch.Tensor):
                if not p.is_pointer:
                    raise BindingError(f"{p.name}: a tensor binds as a buffer, but the kernel declares `{p.declaration}`")
                expected = SCALAR_TYPES.get(p.scalar_type, (None,))[0]
                if value.dtype != expected:
                    raise BindingError(f"{p.name}: tensor of dtype {value.dtype} bound to `{p.declaration}`")
                if value.device.type != "cpu":
                    raise BindingError(f"{p.name}: the emulator runs on CPU tensors, got {value.device}")
                buffer = _Buffer(value, poison=not p.is_const)
                tensors.append((buffer, p.name))
                bound.append(ctypes.c_void_p(buffer.address()))
            else:
                if p.is_pointer:
                    raise BindingError(f"{p.name}: a {type(value).__name__} cannot bind to pointer `{p.declaration}`")
                scalar = _bind_scalar(value, p)
                keep.append(scalar)
                bound.append(ctypes.cast(ctypes.pointer(scalar), ctypes.c_void_p))
        array = (ctypes.c_void_p * max(1, len(bound)))(*bound)
        getattr(self._shared_object, f"launch_{kernel.host_name}")(array, ctypes.c_long(threads))
        for buffer, name in tensors:
            buffer.finish(name)
