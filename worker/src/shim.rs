//! What the worker's C++ shims (`collective/c10d_shim.cpp`, `models/linear/fbgemm_shim.cpp`)
//! share on the Rust side: a failed call leaves a message from malloc in `err`
//! (`shim_error.hpp`), which is taken and freed here. Also the one libc call the worker
//! makes, [`trim_heap`].
#![allow(unsafe_code)]

use std::ffi::{CStr, c_char};

unsafe extern "C" {
    fn rw_free_error(err: *mut c_char);
}

/// The message a shim call left in `err`, freed.
pub(crate) fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error".to_owned();
    }
    // SAFETY: the shim set `err` to a NUL-terminated string from malloc, which we own and
    // free exactly once here.
    unsafe {
        let m = CStr::from_ptr(err).to_string_lossy().into_owned();
        rw_free_error(err);
        m
    }
}

/// Gives the heap's free memory back to the system. Loading a model makes a float32 copy
/// of every matrix before it is packed or converted; glibc keeps those freed pages in the
/// process, so without this a rank with int8 weights measured more resident memory than
/// one with float32 (1766 against 1559 MiB).
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
