"""pykd's CUDA sources (csrc/cuda/) built for the host and run by emulated_cuda.h, for tests on
machines without a GPU.

`load()` builds them (once per source change, with torch's JIT extension builder) into ops
`torch.ops.pykd_emulated_cuda.<op>` that take CPU tensors and run the CUDA drivers and kernels;
within `emulated()` they are pykd's CPU kernels, so that the ordinary CPU tests run the CUDA code.
Needs the CUDA toolkit's headers (CUDA_HOME, else /usr/local/cuda), not a GPU or nvcc.

PYKD_EMULATED_CUDA_FLAGS adds compiler and linker flags, e.g. for AddressSanitizer (libstdc++
preloaded too, or ASan cannot intercept the C++ exceptions of the checks):
    PYKD_EMULATED_CUDA_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
    ASAN_OPTIONS=detect_leaks=0:log_path=/tmp/asan \
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
    PYKD_EMULATED_CUDA=forward pytest tests/test_cuda.py
(log_path: pytest captures stderr, and ASan ends the process before pytest can show it.)
"""

import contextlib
import hashlib
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils.cpp_extension

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
NAMESPACE = "pykd_emulated_cuda"
OPS = ["kd_loss", "sparse_kd_loss", "multi_teacher_kd_loss", "hint_loss", "scale_grads_"]
FLAGS = ["-O1", "-U_FORTIFY_SOURCE", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-fno-strict-aliasing", "-Wno-unknown-pragmas", "-Wno-unused-function"]

_EXTERN_SHARED = re.compile(
    r"extern __shared__\s+(?:__align__\(\d+\)\s+)?"
    r"(?P<type>[A-Za-z_][\w:]*(?:\s+[A-Za-z_]\w*)*?)\s+(?P<name>\w+)\[\];"
)


def cuda_include_dir():
    """The CUDA toolkit's include directory, or None when its runtime header is missing."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    include = Path(home) / "include"
    return include if (include / "cuda_runtime.h").is_file() else None


def to_host_cpp(text, name):
    """The CUDA source `text` in C++ for emulated_cuda.h: a launch kernel<<<config>>>(args)
    becomes kernel ^ ::emu::Config{config}(args), an extern __shared__ array a pointer to the
    launch's dynamic shared memory."""
    text = _EXTERN_SHARED.sub(
        r"\g<type>* \g<name> = reinterpret_cast<\g<type>*>(::emu::dynamic_shared());", text
    )
    if text.count("<<<") != text.count(">>>"):
        raise RuntimeError(f"{name}: every <<< of a launch needs its >>>")
    text = text.replace("<<<", " ^ ::emu::Config{").replace(">>>", "}")
    if "extern __shared__" in text:
        raise RuntimeError(f"{name}: an extern __shared__ declaration that build.py cannot read")
    return text


def _write_if_changed(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def _binding(schemas):
    defs = "\n".join(f'  m.def("{schema}");' for schema in schemas)
    return f"""#include "emulated_cuda.h"

namespace {{
void set_schedule(int64_t schedule, int64_t seed) {{
  TORCH_CHECK(schedule >= 0 && schedule <= 2, "set_schedule: 0, 1 or 2, got ", schedule);
  emu::settings().schedule = static_cast<emu::Schedule>(schedule);
  emu::settings().seed = static_cast<uint32_t>(seed);
}}
}}  // namespace

TORCH_LIBRARY({NAMESPACE}, m) {{
{defs}
  m.def("set_schedule(int schedule, int seed) -> ()", &set_schedule);
}}
"""


def load(verbose=False):
    """Builds (when the sources changed) and loads the emulated CUDA ops."""
    import pykd  # noqa: F401  (registers the pykd ops, whose schemas the emulated ones copy)

    if hasattr(torch.ops, NAMESPACE) and hasattr(getattr(torch.ops, NAMESPACE), "set_schedule"):
        return getattr(torch.ops, NAMESPACE)
    include = cuda_include_dir()
    if include is None:
        raise RuntimeError("emulated CUDA needs the CUDA toolkit's headers: set CUDA_HOME")
    flags = FLAGS + os.environ.get("PYKD_EMULATED_CUDA_FLAGS", "").split()
    schemas = [
        str(getattr(torch.ops.pykd, op).default._schema).replace("pykd::", "", 1) for op in OPS
    ]
    files = {
        p.relative_to(CSRC): p.read_text()
        for p in [*sorted(CSRC.glob("*.h")), *sorted((CSRC / "cuda").iterdir())]
        if p.suffix in {".h", ".cuh", ".cu"}
    }
    # One build directory per torch and flags; ninja rebuilds what changed in it.
    key = hashlib.sha256("\n".join([torch.__version__, *flags, *schemas]).encode())
    root = Path(tempfile.gettempdir()) / "pykd_emulated_cuda" / key.hexdigest()[:16]
    sources = []
    for rel, text in files.items():
        if rel.suffix == ".cu":
            target = root / "csrc" / rel.with_suffix(".cpp")
            _write_if_changed(target, '#include "emulated_cuda.h"\n' + to_host_cpp(text, rel))
            sources.append(str(target))
        else:
            _write_if_changed(root / "csrc" / rel, to_host_cpp(text, rel))
    binding = root / "binding.cpp"
    _write_if_changed(binding, _binding(schemas))
    sources.append(str(binding))
    build = root / "build"
    build.mkdir(exist_ok=True)
    torch.utils.cpp_extension.load(
        name=NAMESPACE,
        sources=sources,
        extra_include_paths=[str(HERE), str(root / "csrc"), str(include)],
        extra_cflags=flags,
        extra_ldflags=flags[len(FLAGS):],
        build_directory=str(build),
        is_python_module=False,
        verbose=verbose,
    )
    return getattr(torch.ops, NAMESPACE)


@contextlib.contextmanager
def emulated():
    """Within it, pykd's CPU kernels are the emulated CUDA ones (the real ones come back after)."""
    ops = load()
    library = torch.library.Library("pykd", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Oo]verrid")
            for op in OPS:
                library.impl(op, getattr(ops, op).default, "CPU")
        yield ops
    finally:
        library._destroy()
