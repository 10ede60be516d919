//! Lets the worker find libtorch at run time without LD_LIBRARY_PATH: the libraries
//! torch-sys linked against are in `$LIBTORCH/lib`, which goes into the rpath.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
