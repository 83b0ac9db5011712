"""A CPU emulator for Metal compute kernels.

``compile_library(source)`` compiles a ``.metal`` file as C++ against the shim header in
``include/metal_stdlib`` and returns an object that is called the way the library from
``torch.mps.compile_shader`` is: ``lib.kernel_name(*args, threads=..., group_size=...)``, with CPU
tensors standing in for MPS ones. Arguments are bound as PyTorch binds them (see
docs/metal.md): argument i to ``[[buffer(i)]]``; a tensor as its raw storage from its
storage offset, strides ignored; a Python int as 8 bytes (int64); a Python float as 4 bytes
(float32); a list of ints as an array of int64 (for a ``constant`` struct of ``long`` fields).
Bindings that the real one would get silently wrong are refused with BindingError: a scalar of
the wrong byte size, a tensor whose dtype differs from the pointer's type, a list whose size is
not the struct's, a missing or extra argument. Where a dispatch writes a buffer
(``device T*`` without const) and never reads what it held before, the bytes it did not write
become NaN, so an element the kernel fails to write shows up as NaN; a buffer the kernel updates
in place (reads before it writes) keeps its contents, as on a GPU.

The lanes of a threadgroup run as fibers with true barrier semantics (runtime.cpp), in a
different order in each threadgroup (forward, backward, shuffled). The kernel code is compiled
with GCC's thread-sanitizer instrumentation, whose hooks the runtime supplies, so that every load
and store is seen. A dispatch fails with EmulatorError, as a GPU would go wrong, on: a data race
on threadgroup memory, a read of threadgroup memory no lane wrote, two lanes writing one device
byte, an access outside a buffer, a barrier some lane does not reach, more than 32 KiB of
threadgroup memory or more than 1024 lanes in a threadgroup. Each dispatch's memory traffic is
measured (see ``Traffic``).
"""

import ctypes
import functools
import hashlib
import itertools
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).parent
SHIM_INCLUDE = HERE / "include"
RUNTIME_SOURCE = HERE / "runtime.cpp"
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
# Position attributes: those given as three components, and those given as one number.
VECTOR_ATTRIBUTES = {
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
}
SCALAR_ATTRIBUTES = {
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "threads_per_simdgroup",
}
ATTRIBUTE_TYPES = {"uint": 1, "uint2": 2, "uint3": 3}


class BindingError(TypeError):
    """An argument that compile_shader would bind to a kernel parameter wrongly."""


class EmulatorError(RuntimeError):
    """A dispatch that would be undefined, or hang, on a GPU."""


@dataclass(frozen=True)
class Parameter:
    name: str
    address_space: str  # "device", "constant" or "" for thread attributes
    scalar_type: str
    is_pointer: bool
    is_const: bool
    attribute: str  # "buffer" or a position attribute
    index: int  # buffer index, -1 for position attributes

    @property
    def declaration(self) -> str:
        const = "const " if self.is_const and self.address_space == "device" else ""
        return f"{self.address_space} {const}{self.scalar_type}{'*' if self.is_pointer else '&'} {self.name}"

    @property
    def is_struct(self) -> bool:
        return self.attribute == "buffer" and not self.is_pointer and self.scalar_type not in SCALAR_TYPES


@dataclass(frozen=True)
class Kernel:
    host_name: str
    call: str  # the C++ function, with template arguments
    parameters: tuple


@dataclass(frozen=True)
class Traffic:
    """What one dispatch asked of device memory, by the emulator's model: every load and store
    counted (no caches), and each SIMD-group instruction's accesses (the k-th execution of one
    access site by the lanes of a SIMD-group) by the 64-byte segments they touch."""

    kernel: str
    bytes_read: int
    bytes_written: int
    useful_bytes: int  # distinct bytes the instructions asked for
    segment_bytes: int  # 64 x the segments they touched
    instructions: int
    threadgroup_bytes: int

    @property
    def coalescing(self) -> float:
        """Share of the touched segments' bytes that the instructions used (1 when coalesced)."""
        return self.useful_bytes / self.segment_bytes if self.segment_bytes else 1.0


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
    attribute = match["attr"]
    if attribute in SCALAR_ATTRIBUTES and scalar_type in ("uint", "ushort"):
        return Parameter(match["name"], "", "uint", False, True, attribute, -1)
    if attribute in VECTOR_ATTRIBUTES and scalar_type in ATTRIBUTE_TYPES:
        return Parameter(match["name"], "", scalar_type, False, True, attribute, -1)
    raise ValueError(f"parameter {text!r}: the emulator knows no attribute {attribute!r} of type {scalar_type!r}")


_INSTANTIATION = re.compile(
    r"template\s*\[\[\s*host_name\(\s*(?P<host>(?:\"\w*\"\s*)+)\)\s*\]\]\s*kernel\s+void\s+(?P<func>\w+)\s*"
    r"<(?P<args>[^>]*)>\s*\((?P<params>.*?)\)\s*;",
    re.S,
)
_PLAIN_KERNEL = re.compile(r"(?<![>\]])\s(?:\[\[kernel\]\]|kernel)\s+void\s+(?P<func>\w+)\s*\((?P<params>.*?)\)\s*\{", re.S)
_TEMPLATE_HEAD = re.compile(r"template\s*<(?P<params>[^>]*)>\s*kernel\s+void\s+(?P<func>\w+)\s*\(")
# `threadgroup T name[...]...;`: a threadgroup array declared in a kernel's body.
_THREADGROUP_ARRAY = re.compile(r"\bthreadgroup\s+(?P<type>[A-Za-z_][\w:]*)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\];]+\]\s*)+);")


def find_kernels(preprocessed: str):
    """The kernels of a preprocessed Metal source, by host name."""
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


def shared_threadgroup_arrays(source: str) -> str:
    """The source with each threadgroup array declaration made a static array (one for all lanes,
    as the threadgroups run one at a time) that registers itself with the runtime. Lines keep
    their numbers, so compiler messages point at the Metal source."""
    return _THREADGROUP_ARRAY.sub(
        lambda m: f"static {m['type']} {m['name']}{m['dims']}; "
        f'metal_emulator_threadgroup_memory({m["name"]}, sizeof({m["name"]}), "{m["name"]}");',
        source,
    )


def _attribute_value(p: Parameter) -> str:
    if p.attribute in SCALAR_ATTRIBUTES:
        return f"lane->{p.attribute}"
    components = [f"lane->{p.attribute}[{i}]" for i in range(ATTRIBUTE_TYPES[p.scalar_type])]
    return components[0] if p.scalar_type == "uint" else f"{p.scalar_type}{{{', '.join(components)}}}"


def _launcher(kernel: Kernel) -> str:
    """C++ that runs one lane of the kernel, and tells the sizes of its struct parameters."""
    args, sizes = [], []
    buffer = 0
    for p in kernel.parameters:
        if p.attribute == "buffer":
            const = "const " if p.address_space == "constant" else ""
            if p.is_pointer:
                args.append(f"static_cast<{p.scalar_type}*>(args[{buffer}])")
            else:
                args.append(f"*static_cast<{const}{p.scalar_type}*>(args[{buffer}])")
            if p.is_struct:
                sizes.append(f'extern "C" unsigned long size_{kernel.host_name}_{buffer}() {{ return sizeof({p.scalar_type}); }}\n')
            buffer += 1
        else:
            args.append(_attribute_value(p))
    return (
        f'extern "C" void lane_{kernel.host_name}(void** args, const metal_emulator_lane* lane) {{\n'
        f"  {kernel.call}({', '.join(args)});\n}}\n" + "".join(sizes)
    )


def _compiler_output(command, what):
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr}")
    return result.stdout


@functools.lru_cache(maxsize=None)
def _runtime_object(compiler: str, flags: tuple) -> Path:
    """The runtime compiled once per process: every library links the same object."""
    runtime_object = Path(tempfile.mkdtemp(prefix="metal_emulator_runtime_")) / "runtime.o"
    _compiler_output([compiler, *flags, "-c", str(RUNTIME_SOURCE), "-o", str(runtime_object)], "compiling the emulator's runtime")
    return runtime_object


def compile_library(source_path, build_dir=None, compiler: str = "g++") -> "EmulatedLibrary":
    source_path = Path(source_path).resolve()
    source = source_path.read_text()
    build_dir = Path(build_dir or tempfile.mkdtemp(prefix="metal_emulator_"))
    build_dir.mkdir(parents=True, exist_ok=True)
    preprocessed = _compiler_output(
        [compiler, "-E", "-P", "-x", "c++", "-std=c++17", "-I", str(SHIM_INCLUDE), "-D", "METAL_SHIM_KEEP_KEYWORDS",
         str(source_path)],
        "preprocessing the Metal source",
    )
    kernels = find_kernels(preprocessed)
    runtime = RUNTIME_SOURCE.read_text()
    digest = hashlib.sha256((source + runtime + (SHIM_INCLUDE / "metal_stdlib").read_text()).encode()).hexdigest()[:16]
    rewritten = build_dir / f"source_{digest}.metal.cpp"
    rewritten.write_text(f'#line 1 "{source_path}"\n' + shared_threadgroup_arrays(source))
    wrapper = build_dir / f"kernels_{digest}.cpp"
    wrapper.write_text(f'#include "{rewritten}"\n\n' + "\n".join(_launcher(k) for k in kernels.values()))
    flags = ["-x", "c++", "-std=c++17", "-O1", "-g", "-fPIC", "-Wall", "-Werror", "-I", str(SHIM_INCLUDE)]
    kernels_object = build_dir / f"kernels_{digest}.o"
    _compiler_output(
        [compiler, *flags, "-fsanitize=thread", "-Wno-attributes", "-Wno-unknown-pragmas", "-c", str(wrapper),
         "-o", str(kernels_object)],
        "compiling the Metal source as C++",
    )
    runtime_object = _runtime_object(compiler, tuple(flags))
    shared_object = build_dir / f"kernels_{digest}.so"
    # Every hook the instrumentation calls must come from the runtime: refuse undefined symbols
    # (GNU ld's spelling; Apple's linker refuses them by default).
    no_undefined = ["-Wl,-z,defs"] if sys.platform.startswith("linux") else []
    _compiler_output(
        [compiler, "-shared", *no_undefined, str(kernels_object), str(runtime_object), "-o", str(shared_object)],
        "linking the emulated kernels",
    )
    return EmulatedLibrary(ctypes.CDLL(str(shared_object)), kernels)


def syntax_check_address_spaces(source_path, compiler: str = "clang++-19") -> None:
    """Checks with clang that the source mixes no address spaces (device, constant, threadgroup,
    thread) where Metal would refuse it. clang rejects attributes on explicit instantiations, so
    those are stripped first, and local variables in an address space, so threadgroup arrays
    become static there."""
    source = Path(source_path).read_text()
    source = re.sub(r"template\s*\[\[\s*host_name\([^)]*\)\s*\]\]", "template", source)
    source = _THREADGROUP_ARRAY.sub(lambda m: f"static {m.group(0)}", source)
    with tempfile.NamedTemporaryFile("w", suffix=".cpp", delete=False) as f:
        f.write(source)
    _compiler_output(
        [compiler, "-fsyntax-only", "-x", "c++", "-std=c++17", "-Wno-unknown-attributes", "-Werror",
         "-D", "METAL_SHIM_ADDRESS_SPACES", "-I", str(SHIM_INCLUDE), f.name],
        "the address-space check with clang",
    )


class _Buffer:
    """A tensor's raw storage from its storage offset, copied between guard zones: nothing else
    lives within GUARD_BYTES of the buffer, so the runtime takes an access there for an overrun
    of this buffer (and reports it)."""

    def __init__(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        start = tensor.storage_offset() * tensor.element_size()
        self.data = torch.empty(0, dtype=torch.uint8).set_(storage)[start:]
        self.padded = torch.full((GUARD_BYTES + self.data.numel() + GUARD_BYTES,), 0xFF, dtype=torch.uint8)
        self.padded[GUARD_BYTES : GUARD_BYTES + self.data.numel()] = self.data

    def address(self) -> int:
        return self.padded.data_ptr() + GUARD_BYTES

    def finish(self, runtime, index: int) -> None:
        contents = self.padded[GUARD_BYTES : GUARD_BYTES + self.data.numel()]
        written = torch.empty_like(contents)
        if runtime.metal_emulator_written_bytes(ctypes.c_uint(index), ctypes.c_void_p(written.data_ptr())):
            contents[written == 0] = 0xFF  # NaN in every float type
        self.data.copy_(contents)


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


def _as_triple(value, name):
    value = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(value) <= 3 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ValueError(f"{name} must be 1 to 3 positive ints, got {value}")
    return value + (1,) * (3 - len(value)), len(value)


class EmulatedLibrary:
    def __init__(self, shared_object, kernels):
        self._shared_object = shared_object
        self._kernels = kernels
        self._dispatches = itertools.count()
        self._log = None
        shared_object.metal_emulator_error.restype = ctypes.c_char_p

    @property
    def function_names(self):
        return sorted(self._kernels)

    def __getattr__(self, name):
        kernels = self.__dict__.get("_kernels", {})
        if name not in kernels:
            raise AttributeError(f"no kernel named {name!r} in the library")
        return lambda *args, **kwargs: self._run(kernels[name], args, **kwargs)

    @contextmanager
    def recording(self):
        """Collects the Traffic of each dispatch run inside the block, in order."""
        self._log = log = []
        try:
            yield log
        finally:
            self._log = None

    def _bind_struct(self, kernel: Kernel, position: int, value, p: Parameter):
        if not all(isinstance(v, int) for v in value):
            raise BindingError(f"{p.name}: only lists of ints (int64 arrays) are emulated")
        size = getattr(self._shared_object, f"size_{kernel.host_name}_{position}")
        size.restype = ctypes.c_ulong
        if size() != 8 * len(value):
            raise BindingError(
                f"{p.name}: a list of {len(value)} ints is sent as {8 * len(value)} bytes, but `{p.declaration}` "
                f"takes {size()}"
            )
        return (ctypes.c_int64 * len(value))(*value)

    def _run(self, kernel: Kernel, args, threads, group_size=None, arg_casts=None):
        if arg_casts:
            raise NotImplementedError("arg_casts is not emulated")
        buffers = [p for p in kernel.parameters if p.attribute == "buffer"]
        for position, p in enumerate(buffers):
            if p.index != position:
                raise BindingError(f"{kernel.host_name}: parameter {p.name} is [[buffer({p.index})]] but argument {position} binds to buffer({position})")
        if len(args) != len(buffers):
            raise BindingError(f"{kernel.host_name} takes {len(buffers)} arguments, got {len(args)}")
        grid, rank = _as_triple(threads, "threads")
        if group_size is None:
            group_size = min(grid[0], MAX_THREADS_PER_GROUP) if rank == 1 else (1,) * rank
        group, group_rank = _as_triple(group_size, "group_size")
        if group_rank != rank:
            raise ValueError(f"group_size {group_size} and threads {threads} differ in rank")
        if group[0] * group[1] * group[2] > MAX_THREADS_PER_GROUP:
            raise ValueError(f"group_size {group_size} has more than {MAX_THREADS_PER_GROUP} threads")
        bound, keep, tensors = [], [], []
        runtime = self._shared_object
        runtime.metal_emulator_reset_buffers()
        for position, (value, p) in enumerate(zip(args, buffers)):
            if isinstance(value, torch.Tensor):
                if not p.is_pointer:
                    raise BindingError(f"{p.name}: a tensor binds as a buffer, but the kernel declares `{p.declaration}`")
                expected = SCALAR_TYPES.get(p.scalar_type, (None,))[0]
                if value.dtype != expected:
                    raise BindingError(f"{p.name}: tensor of dtype {value.dtype} bound to `{p.declaration}`")
                if value.device.type != "cpu":
                    raise BindingError(f"{p.name}: the emulator runs on CPU tensors, got {value.device}")
                buffer = _Buffer(value)
                tensors.append(buffer)
                runtime.metal_emulator_add_buffer(
                    ctypes.c_void_p(buffer.address()), ctypes.c_ulong(buffer.data.numel()), int(not p.is_const),
                    p.name.encode(),
                )
                bound.append(ctypes.c_void_p(buffer.address()))
            elif isinstance(value, (list, tuple)):
                if not p.is_struct:
                    raise BindingError(f"{p.name}: a list binds as an array, but the kernel declares `{p.declaration}`")
                array = self._bind_struct(kernel, position, value, p)
                keep.append(array)
                bound.append(ctypes.cast(array, ctypes.c_void_p))
            else:
                if p.is_pointer:
                    raise BindingError(f"{p.name}: a {type(value).__name__} cannot bind to pointer `{p.declaration}`")
                scalar = _bind_scalar(value, p)
                keep.append(scalar)
                bound.append(ctypes.cast(ctypes.pointer(scalar), ctypes.c_void_p))
        array = (ctypes.c_void_p * max(1, len(bound)))(*bound)
        status = runtime.metal_emulator_dispatch(
            getattr(runtime, f"lane_{kernel.host_name}"), array, (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*group),
            ctypes.c_uint(next(self._dispatches) % 3),
        )
        if status != 0:
            raise EmulatorError(f"{kernel.host_name}: {runtime.metal_emulator_error().decode()}")
        if self._log is not None:
            figures = (ctypes.c_uint64 * 6)()
            runtime.metal_emulator_traffic(figures)
            self._log.append(Traffic(kernel.host_name, *figures))
        for index, buffer in enumerate(tensors):
            buffer.finish(runtime, index)
