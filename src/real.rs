//! Resolution of the real functions behind our hooks: dlsym(RTLD_NEXT), once per symbol, stored
//! atomically. A symbol the C library lacks (close_range before glibc 2.34) resolves to "missing",
//! and the hook then fails with ENOSYS instead of aborting the process.

use core::ffi::{CStr, c_void};
use core::sync::atomic::{AtomicPtr, Ordering::*};

/// Marks a symbol that was looked up and is not there.
const MISSING: *mut c_void = core::ptr::without_provenance_mut(1);

/// One real function: its name and, once resolved, its address.
pub struct Sym {
    name: &'static CStr,
    ptr: AtomicPtr<c_void>,
}

impl Sym {
    pub const fn new(name: &'static CStr) -> Sym {
        Sym { name, ptr: AtomicPtr::new(core::ptr::null_mut()) }
    }

    /// The function's address, or null if the C library does not have it.
    #[inline]
    pub fn get(&self) -> *mut c_void {
        let p = self.ptr.load(Acquire);
        if p.is_null() {
            return self.resolve();
        }
        if p == MISSING { core::ptr::null_mut() } else { p }
    }

    /// Looks the symbol up. The constructor does this for every hook, so that a hook called later
    /// (from a signal handler, say) never enters dlsym, which may take locks and allocate. Before
    /// the constructor, or if two threads race, the lookup may run twice: both get the same answer.
    #[cold]
    pub fn resolve(&self) -> *mut c_void {
        let _errno = crate::sys::ErrnoGuard::save();
        // SAFETY: a NUL-terminated name; RTLD_NEXT finds the definition after ours.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) };
        self.ptr.store(if p.is_null() { MISSING } else { p }, Release);
        p
    }
}
