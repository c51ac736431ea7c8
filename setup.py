"""Build of pifi_fast with its compiled extension pifi_fast._C.

The extension is built with torch's cpp_extension and ninja:
  * with CUDA when the installed torch is a CUDA build and nvcc is found
    (arch list: $TORCH_CUDA_ARCH_LIST, default 7.5;8.0;8.6;8.9;9.0;9.0a),
  * as C++ only (CPU and Meta kernels) otherwise,
  * not at all when PIFI_FAST_NO_EXT=1; the package then runs its plain PyTorch path.
Build with `pip install . --no-build-isolation` (the build must see the installed torch).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0;9.0a"


def _find_nvcc():
    # torch guesses /usr/local when CUDA_HOME is unset; the toolkit here lives in /usr/local/cuda.
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    home = os.environ.get("CUDA_HOME")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _extensions():
    if os.environ.get("PIFI_FAST_NO_EXT") == "1":
        print("pifi_fast: PIFI_FAST_NO_EXT=1, skipping the compiled extension", file=sys.stderr)
        return [], {}
    nvcc = _find_nvcc()  # before cpp_extension is imported: it reads CUDA_HOME at import
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("pifi_fast: torch is not importable in the build environment (use "
              "--no-build-isolation); building without the compiled extension", file=sys.stderr)
        return [], {}

    sources = ["csrc/frozen_linear.cpp"]
    with_cuda = torch.version.cuda is not None and nvcc is not None
    if os.environ.get("PIFI_FAST_FORCE_CPU_EXT") == "1":
        with_cuda = False
    extra = {"cxx": ["-O3"]}
    include_dirs = [os.path.abspath("csrc")]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        # ATen/cuda/CUDAContext.h includes cusparse.h, which the pip CUDA wheels keep here.
        for site in {os.path.dirname(os.path.dirname(torch.__file__))}:
            include_dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        sources.append("csrc/frozen_linear_cuda.cu")
        extra["cxx"].append("-DPIFI_FAST_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DPIFI_FAST_WITH_CUDA"]
        ext_cls = cpp_extension.CUDAExtension
        print(f"pifi_fast: building pifi_fast._C with CUDA for {os.environ['TORCH_CUDA_ARCH_LIST']}",
              file=sys.stderr)
    else:
        ext_cls = cpp_extension.CppExtension
        print("pifi_fast: building pifi_fast._C as C++ only (no CUDA torch or no nvcc)",
              file=sys.stderr)
    ext = ext_cls("pifi_fast._C", sources, include_dirs=include_dirs, extra_compile_args=extra)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
