//! Builds the C++ shims (`src/collective/c10d_shim.cpp`, `src/models/linear/fbgemm_shim.cpp`,
//! `src/models/parallel_shim.cpp`) against the libtorch that torch-sys uses (`$LIBTORCH`),
//! and writes `$LIBTORCH/lib` into the binary's rpath so it runs without LD_LIBRARY_PATH.
//! Gloo's headers come from Debian's libgloo-dev (the torch wheel does not ship them).
//! With the `cuda` feature, ProcessGroupNCCL is compiled in.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    const SOURCES: [&str; 3] = [
        "src/collective/c10d_shim.cpp",
        "src/models/linear/fbgemm_shim.cpp",
        "src/models/parallel_shim.cpp",
    ];
    for file in SOURCES.iter().chain(&["src/shim_error.hpp"]) {
        println!("cargo:rerun-if-changed={file}");
    }
    let libtorch = PathBuf::from(
        std::env::var("LIBTORCH")
            .expect("set LIBTORCH to the torch/ folder of the torch wheel (see Makefile)"),
    );
    let include = libtorch.join("include");
    let lib = libtorch.join("lib");
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .files(SOURCES)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // at::parallel_for (parallel_shim.cpp) is a header template over OpenMP: without
        // -fopenmp its `omp parallel` compiles to one thread.
        .flag("-fopenmp")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    if cuda {
        build.define("RANKWAY_NCCL", None);
        // CUDA, CCCL and NCCL headers from the nvidia-* wheels beside torch (torch's own
        // CUDA dependencies plus nvidia-cuda-crt and nvidia-cuda-cccl).
        let nvidia = libtorch.parent().expect("site-packages").join("nvidia");
        for sub in ["cu13/include", "cu13/include/cccl", "nccl/include"] {
            build.include(nvidia.join(sub));
        }
    }
    build.compile("rankway_shims");

    println!("cargo:rustc-link-search=native={}", lib.display());
    if cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // The OpenMP runtime libtorch itself loads (the wheel's own libgomp.so.1, by the rpath
    // below), so the shim's parallel regions run on libtorch's threads.
    println!("cargo:rustc-link-lib=dylib:+verbatim=libgomp.so.1");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
