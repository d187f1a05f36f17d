//! keepfix's own heap: the library's `#[global_allocator]`, so that keepfix never allocates
//! through the program's malloc.
//!
//! Through glibc's malloc, keepfix's thread would get an arena of its own (64 MiB of address
//! space reserved at its first allocation), and its allocations would share the program's heap,
//! limits and locks. Instead, dlmalloc (the Rust port that is the standard library's allocator on
//! wasm) manages memory that this module maps itself with raw mmap syscalls (rustix), in segments
//! of 256 KiB or more as they are needed, and unmaps when dlmalloc releases them. It never calls
//! libc's malloc, and no more than [`LIMIT`] bytes are ever mapped.
//!
//! Who allocates: the constructor, the destructor, fork()'s child handler and the watchdog. Hooks
//! never do, so the spin lock around dlmalloc is never taken in a signal handler that interrupted
//! its holder. fork() takes the lock in its prepare handler and releases it in both processes, so
//! a child never inherits a heap half-way through an update. A child made by _Fork() (no
//! handlers) may: the first hook that notices such a child calls [`after_unhandled_fork`], which
//! gives the child a fresh heap (what the copy held is abandoned; nothing allocated before the
//! fork is ever freed in a child, the old watchdog's objects being gone with it).
//!
//! When the heap cannot grow (the limit, or the program has used up its address space), an
//! allocation fails: on the watchdog's thread it stops for good (see `watchdog::control::out_of_memory`, registered with [`set_oom_handler`])
//! and the program goes on with hooks only; elsewhere Rust aborts, as with any allocator.

use core::alloc::{GlobalAlloc, Layout};

/// What a failed allocation calls first (the watchdog registers its own at load: this module is
/// below it and does not name it).
static OOM: core::sync::atomic::AtomicPtr<()> = core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

pub fn set_oom_handler(f: fn()) {
    OOM.store(f as *mut (), core::sync::atomic::Ordering::Release);
}

fn on_oom() {
    let f = OOM.load(core::sync::atomic::Ordering::Acquire);
    if !f.is_null() {
        // SAFETY: set_oom_handler stored a `fn()`.
        let f: fn() = unsafe { core::mem::transmute(f) };
        f();
    }
}
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};
use dlmalloc::Dlmalloc;

/// The most keepfix ever maps for its heap: 64 MiB. keepfix's heap holds the CLOSE_WAIT sockets
/// it is following (about 130 bytes each in the detector's map), the program's epoll fds and the
/// metrics text; its fd table is mapped separately. 64 MiB is room for some 250,000 leaked
/// sockets at once, far more than a program has before it hits its fd limit in practice.
pub const LIMIT: usize = 64 << 20;
/// dlmalloc asks for segments of at least this size.
const GRANULARITY: usize = 256 << 10;

static MAPPED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of heap mapped now (for metrics and tests).
pub fn mapped() -> usize {
    MAPPED.load(Relaxed)
}

/// dlmalloc's system layer: anonymous mappings made by raw syscalls, within [`LIMIT`].
struct Pages;

// SAFETY: alloc returns fresh, page-aligned, zeroed mappings or null; free and free_part unmap
// only what dlmalloc got from alloc.
unsafe impl dlmalloc::Allocator for Pages {
    fn alloc(&self, size: usize) -> (*mut u8, usize, u32) {
        let size = size.next_multiple_of(self.page_size());
        if MAPPED.fetch_update(Relaxed, Relaxed, |m| m.checked_add(size).filter(|&t| t <= LIMIT)).is_err() {
            return (core::ptr::null_mut(), 0, 0);
        }
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous mapping.
        match unsafe {
            rustix::mm::mmap_anonymous(
                core::ptr::null_mut(),
                size,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        } {
            Ok(p) => (p.cast(), size, 0),
            Err(_) => {
                MAPPED.fetch_sub(size, Relaxed);
                (core::ptr::null_mut(), 0, 0)
            }
        }
    }

    fn remap(&self, _ptr: *mut u8, _oldsize: usize, _newsize: usize, _can_move: bool) -> *mut u8 {
        // Not offered: dlmalloc then allocates, copies and frees.
        core::ptr::null_mut()
    }

    fn free_part(&self, ptr: *mut u8, oldsize: usize, newsize: usize) -> bool {
        // SAFETY: the tail of a mapping made by alloc.
        let ok = unsafe { rustix::mm::munmap(ptr.wrapping_add(newsize).cast(), oldsize - newsize) }.is_ok();
        if ok {
            MAPPED.fetch_sub(oldsize - newsize, Relaxed);
        }
        ok
    }

    fn free(&self, ptr: *mut u8, size: usize) -> bool {
        // SAFETY: a mapping made by alloc.
        let ok = unsafe { rustix::mm::munmap(ptr.cast(), size) }.is_ok();
        if ok {
            MAPPED.fetch_sub(size, Relaxed);
        }
        ok
    }

    fn can_release_part(&self, _flags: u32) -> bool {
        true
    }

    fn allocates_zeros(&self) -> bool {
        true
    }

    fn page_size(&self) -> usize {
        page_size()
    }
}

/// The kernel's page size: 4 KiB on x86_64, and 4, 16 or 64 KiB on aarch64 (RHEL 8's aarch64
/// kernels use 64 KiB pages), where munmap of a 4 KiB-aligned segment tail would fail. Read from
/// the auxv glibc saved at exec (getauxval: no system call, async-signal-safe), once.
fn page_size() -> usize {
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    let mut p = PAGE.load(Relaxed);
    if p == 0 {
        // getauxval sets errno only when the entry is missing; the caller's errno stays anyway.
        let _g = crate::sys::ErrnoGuard::save();
        // SAFETY: getauxval reads the process's saved auxv.
        let v = unsafe { libc::getauxval(libc::AT_PAGESZ) } as usize;
        p = if v.is_power_of_two() && v >= 4096 { v } else { 4096 };
        PAGE.store(p, Relaxed);
    }
    p
}

const fn new_heap() -> Dlmalloc<Pages> {
    let mut d = Dlmalloc::new_with_allocator(Pages);
    d.set_granularity(GRANULARITY);
    d
}

/// dlmalloc behind a spin lock. Holders never block and are never interrupted by a handler that
/// could allocate (the watchdog blocks every signal; other callers are the constructor, the
/// destructor and fork's child handler).
pub struct Heap {
    locked: AtomicBool,
    dl: UnsafeCell<Dlmalloc<Pages>>,
}

// SAFETY: every access to `dl` happens with `locked` held.
unsafe impl Sync for Heap {}

impl Heap {
    pub const fn new() -> Heap {
        Heap { locked: AtomicBool::new(false), dl: UnsafeCell::new(new_heap()) }
    }

    fn lock(&self) {
        let mut spins = 0u32;
        while self.locked.compare_exchange_weak(false, true, Acquire, Relaxed).is_err() {
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 {
                rustix::thread::sched_yield();
            } else {
                core::hint::spin_loop();
            }
        }
    }

    fn unlock(&self) {
        self.locked.store(false, Release);
    }

    fn with<R>(&self, f: impl FnOnce(&mut Dlmalloc<Pages>) -> R) -> R {
        self.lock();
        // SAFETY: the lock is held.
        let r = f(unsafe { &mut *self.dl.get() });
        self.unlock();
        r
    }
}

impl Default for Heap {
    fn default() -> Self {
        Heap::new()
    }
}

// SAFETY: dlmalloc's functions return memory of the layout asked for, or null.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the layout's size and alignment, as dlmalloc wants them.
        let p = self.with(|d| unsafe { d.malloc(layout.size(), layout.align()) });
        if p.is_null() {
            on_oom();
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in alloc.
        let p = self.with(|d| unsafe { d.calloc(layout.size(), layout.align()) });
        if p.is_null() {
            on_oom();
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: ptr came from this heap with this layout.
        self.with(|d| unsafe { d.free(ptr, layout.size(), layout.align()) })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: ptr came from this heap with this layout.
        let p = self.with(|d| unsafe { d.realloc(ptr, layout.size(), layout.align(), new_size) });
        if p.is_null() {
            on_oom();
        }
        p
    }
}

#[cfg(not(test))]
#[global_allocator]
static HEAP: Heap = Heap::new();
#[cfg(test)]
static HEAP: Heap = Heap::new();

extern "C" fn fork_prepare() {
    HEAP.lock();
}

extern "C" fn fork_release() {
    HEAP.unlock();
}

/// Registers the fork handlers. Called first in the constructor, so that the child's unlock runs
/// before any other child handler of keepfix's, which may allocate.
pub fn init() {
    // SAFETY: plain function pointers with the C signature.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_release), Some(fork_release)) };
}

/// In a child made without fork handlers: if the heap was locked when the parent was copied, the
/// thread that held it is gone and the heap may be half-updated. The child takes a fresh one and
/// abandons the copy (it stays mapped, and counted against [`LIMIT`]). Single-threaded.
pub fn after_unhandled_fork() {
    if HEAP.locked.load(Acquire) {
        // SAFETY: the child has one thread, and it is not inside the allocator (hooks never are).
        unsafe { *HEAP.dl.get() = new_heap() };
        HEAP.unlock();
    }
}
